"""G.711 mu-law codec: bit-exact with audioop while it exists, sane without it."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import numpy as np
import pytest

from realtime.media.mulaw import (
    ULAW_DECODE_TABLE,
    ULAW_ENCODE_TABLE,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
)

ALL_CODES = bytes(range(256))
ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)


def _audioop() -> ModuleType:
    """audioop, or a skip on Python >= 3.13 where it was removed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module("audioop")
        except ImportError:
            pytest.skip("audioop is gone (Python >= 3.13); bit-exactness was proven on 3.11")


def test_decode_matches_audioop_for_all_256_codes() -> None:
    audioop = _audioop()
    expected = np.frombuffer(audioop.ulaw2lin(ALL_CODES, 2), dtype="<i2")
    np.testing.assert_array_equal(ulaw_to_pcm16(ALL_CODES), expected)


def test_encode_matches_audioop_for_all_65536_samples() -> None:
    audioop = _audioop()
    expected = audioop.lin2ulaw(ALL_SAMPLES.astype("<i2").tobytes(), 2)
    assert pcm16_to_ulaw(ALL_SAMPLES) == expected


def test_decode_then_encode_is_identity_except_negative_zero() -> None:
    # 0x7F (-0) and 0xFF (+0) both decode to 0, which encodes back as 0xFF.
    round_trip = pcm16_to_ulaw(ulaw_to_pcm16(ALL_CODES))
    diffs = [c for c, r in zip(ALL_CODES, round_trip, strict=True) if c != r]
    assert diffs == [0x7F]


def test_encode_error_is_within_half_a_quantisation_step() -> None:
    x = ALL_SAMPLES.astype(np.int32)
    err = np.abs(ulaw_to_pcm16(pcm16_to_ulaw(ALL_SAMPLES)).astype(np.int32) - x)
    # The step doubles per segment up to 1024; half of that, plus up to 4 for the
    # 2 bits audioop drops first. Beyond +-32124 (the largest code) it clips.
    assert err[np.abs(x) <= 32124].max() <= 512 + 4
    # Relative error stays a few % at any level: why 8 bits of mu-law do the
    # job of ~13 bits of linear PCM on speech.
    loud = (np.abs(x) > 256) & (np.abs(x) <= 32124)
    assert (err[loud] / np.abs(x[loud])).max() < 0.06


def test_known_values() -> None:
    assert pcm16_to_ulaw(np.array([0], np.int16)) == b"\xff"
    assert ulaw_to_pcm16(b"\x00\x80\xff\x7f").tolist() == [-32124, 32124, 0, 0]


def test_types_and_shapes() -> None:
    frame = bytes(range(160))
    pcm = ulaw_to_pcm16(frame)
    assert pcm.dtype == np.int16
    assert pcm.shape == (160,)
    assert ulaw_to_pcm16(b"").shape == (0,)
    assert pcm16_to_ulaw(np.zeros(0, np.int16)) == b""
    # memoryview / bytearray input (websocket payloads) and 2-D or non-contiguous arrays.
    np.testing.assert_array_equal(ulaw_to_pcm16(memoryview(bytearray(frame))), pcm)
    encoded = pcm16_to_ulaw(pcm)
    assert len(encoded) == 160
    assert pcm16_to_ulaw(pcm.reshape(2, 80)) == encoded
    assert pcm16_to_ulaw(np.repeat(pcm, 2)[::2]) == encoded
    # Other integer dtypes are taken as int16.
    assert pcm16_to_ulaw(pcm.astype(np.int32)) == encoded


def test_tables_are_read_only() -> None:
    with pytest.raises(ValueError):
        ULAW_DECODE_TABLE[0] = 1
    with pytest.raises(ValueError):
        ULAW_ENCODE_TABLE[0] = 1
    assert ULAW_DECODE_TABLE.shape == (256,)
    assert ULAW_ENCODE_TABLE.shape == (65536,)

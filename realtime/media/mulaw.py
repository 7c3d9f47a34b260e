"""G.711 mu-law <-> 16-bit linear PCM, table driven.

Twilio and Telnyx media streams carry 8 kHz mu-law. ``audioop`` did this in C
but is deprecated in 3.11 and gone in 3.13, so the codec is two lookup tables
built once at import with numpy. The encode table is indexed by the raw 16-bit
sample (65,536 entries, 64 KiB): one fancy-index per frame, no per-sample
branching. Both tables are read-only so they can be shared by every call
without locks. The arithmetic mirrors CPython's ``audioop`` (Sun's g711.c)
so the results are bit-exact with ``audioop.ulaw2lin`` / ``audioop.lin2ulaw``.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["ULAW_DECODE_TABLE", "ULAW_ENCODE_TABLE", "pcm16_to_ulaw", "ulaw_to_pcm16"]

_BIAS: Final = 0x84  # added before the segment search so segment 0 is not a special case
_CLIP: Final = 8159  # largest 14-bit magnitude the 8 segments can represent
# Upper bounds of the 8 segments, for the biased 14-bit magnitude.
_SEG_UPPER: Final = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], np.int32)


def _build_decode_table() -> npt.NDArray[np.int16]:
    """Expand every mu-law code to its 16-bit value (ITU-T G.711 reference formula)."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF  # codes are stored inverted on the wire
    t = (((u & 0x0F) << 3) + _BIAS) << ((u & 0x70) >> 4)
    table = np.where(u & 0x80, _BIAS - t, t - _BIAS).astype(np.int16)
    table.flags.writeable = False
    return table


def _build_encode_table() -> npt.NDArray[np.uint8]:
    """Compress every 16-bit sample, indexed by its two's-complement bit pattern.

    Same steps as audioop's ``st_14linear2ulaw(sample >> 2)``: drop to 14 bits with
    an arithmetic shift, fold the sign into a mask, clip, bias, find the segment,
    keep 4 mantissa bits, then invert.
    """
    pcm = np.arange(65536, dtype=np.int32)
    pcm = np.where(pcm >= 32768, pcm - 65536, pcm) >> 2  # uint16 index -> int16 -> 14-bit
    negative = pcm < 0
    mask = np.where(negative, 0x7F, 0xFF)
    mag = np.minimum(np.where(negative, -pcm, pcm), _CLIP) + (_BIAS >> 2)
    seg = np.searchsorted(_SEG_UPPER, mag, side="left")  # first segment whose bound >= mag
    mantissa = (mag >> (seg + 1)) & 0x0F
    # Bias can push a clipped magnitude one past the last segment (8159 + 33 = 8192):
    # audioop answers with the largest code there, so do the same.
    code = np.where(seg >= 8, 0x7F, (seg << 4) | mantissa)
    table = ((code ^ mask) & 0xFF).astype(np.uint8)
    table.flags.writeable = False
    return table


ULAW_DECODE_TABLE: Final[npt.NDArray[np.int16]] = _build_decode_table()
ULAW_ENCODE_TABLE: Final[npt.NDArray[np.uint8]] = _build_encode_table()


def ulaw_to_pcm16(data: bytes | bytearray | memoryview) -> npt.NDArray[np.int16]:
    """Decode mu-law bytes to a new int16 array (one sample per byte)."""
    codes = np.frombuffer(data, dtype=np.uint8)
    return ULAW_DECODE_TABLE[codes]


def pcm16_to_ulaw(samples: npt.NDArray[np.int16] | npt.NDArray[np.integer]) -> bytes:
    """Encode 16-bit samples to mu-law bytes.

    Accepts any integer array; values are taken as int16 (callers with wider
    ints must clip first, as a cast would wrap around).
    """
    pcm = np.asarray(samples)
    if pcm.dtype != np.int16:
        pcm = pcm.astype(np.int16)
    # Viewing int16 as uint16 turns the signed sample into a table index for free.
    index = np.ascontiguousarray(pcm).reshape(-1).view(np.uint16)
    return ULAW_ENCODE_TABLE[index].tobytes()

"""Offline speech synthesis with Piper (en_US-joe-medium, 22.05 kHz) in-process.

Piper is GPL-3.0, so it is an optional extra (``builder-engine[piper]``) and is
imported only here, only when a voice is first loaded.

Streaming: Piper synthesizes one sentence per ONNX run and yields sentence by
sentence, so audio for the first sentence goes out while the rest is still
text. First audio measured here: p50 55 ms for a short sentence, ~135 ms when
the first sentence is ~3 s long (``bench/local_providers.py``); RTF ~0.045.
Each sentence runs as one call on ``LocalModelCache.piper_lane``; the next
one is only started when the consumer asks for more. Stopping the iteration
(``aclose()``, or cancelling the task that iterates) therefore stops synthesis
after at most the sentence already running: an ONNX run cannot be interrupted.

Audio is converted in the same worker thread: resampled with the streaming
resampler (one per ``synthesize`` call, so sentence joins have no clicks) and
encoded to the requested ``output_format`` (mu-law 8 kHz for phones, PCM16
16 kHz for browsers).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from builder_engine.agent_config import TtsConfig
from realtime.media.mulaw import pcm16_to_ulaw
from realtime.media.resample import SUPPORTED_RATES, StreamResampler
from realtime.providers.base import MULAW_8K, AudioFormat, ProviderError
from realtime.providers.local_models import (
    LocalModelCache,
    LocalModelUnavailable,
    PiperVoiceFiles,
    piper_voice_files,
)

if TYPE_CHECKING:
    from piper import AudioChunk, PiperVoice

__all__ = ["PiperLocalTts"]

PROVIDER: Final = "piper-local"
_INSTALL_HINT: Final = "pip install 'builder-engine[piper]'"


class PiperLocalTts:
    """``TtsProvider`` for one agent voice and one output format; cheap to create.

    The loaded voice lives in the ``LocalModelCache`` and is shared process-wide.
    """

    name = PROVIDER

    def __init__(
        self,
        cache: LocalModelCache,
        *,
        voice: str | None = None,
        output_format: AudioFormat = MULAW_8K,
        speed: float = 1.0,
    ) -> None:
        _check_format(output_format)
        if not 0.5 <= speed <= 2.0:
            raise ValueError("speed must be within 0.5..2.0")
        self._cache = cache
        # Located now so a missing package or unknown voice fails at configuration time.
        self._files: Final = piper_voice_files(voice)
        # Plain attributes: the TtsProvider protocol declares them as variables.
        self.output_format: AudioFormat = output_format
        self.speed: float = speed

    @classmethod
    def from_config(
        cls,
        config: TtsConfig,
        cache: LocalModelCache,
        *,
        output_format: AudioFormat = MULAW_8K,
    ) -> PiperLocalTts:
        """Provider for an agent's ``tts`` section; the transport picks ``output_format``.

        ``voice`` names a packaged voice (default ``en_US-joe-medium``, alias ``joe``);
        ``model`` and ``base_url`` do not apply to Piper and are ignored.
        """
        if config.provider != PROVIDER:
            raise ValueError(f"TtsConfig.provider is {config.provider!r}, not {PROVIDER!r}")
        return cls(cache, voice=config.voice, output_format=output_format, speed=config.speed)

    @property
    def voice_name(self) -> str:
        return self._files.name

    async def warm_up(self) -> None:
        """Load the voice now (e.g. at worker start) instead of at the first sentence."""
        await self._voice()

    async def synthesize(self, text: str) -> AsyncGenerator[bytes, None]:
        """Audio for ``text`` in ``output_format``, one chunk per sentence as it is made."""
        voice = await self._voice()
        if not text.strip():
            return
        from piper import SynthesisConfig  # lazily, like every piper import

        # Piper's length_scale is duration per phoneme: the inverse of speed.
        syn_config = SynthesisConfig(length_scale=voice.config.length_scale / self.speed)
        # Lazy: phonemizing happens at the first next(), in the worker thread.
        sentences = iter(voice.synthesize(text, syn_config=syn_config))
        converter = _Converter(voice.config.sample_rate, self.output_format)
        lane = self._cache.piper_lane

        def next_sentence() -> bytes | None:
            try:
                chunk: AudioChunk = next(sentences)
            except StopIteration:
                return None
            return converter.convert(chunk.audio_float_array)

        # No explicit close of ``sentences``: after a cancellation its next() may still
        # be running in the worker thread, where closing it would raise; it holds no
        # resources and is collected once that sentence is done.
        while True:
            try:
                audio = await lane.run(next_sentence)
            except ProviderError:
                raise
            except Exception as exc:
                raise ProviderError(
                    PROVIDER, f"synthesis failed: {exc!r}", retryable=False
                ) from exc
            if audio is None:
                break
            if audio:
                yield audio
        tail = converter.flush()
        if tail:
            yield tail

    async def _voice(self) -> PiperVoice:
        files = self._files
        threads = self._cache.limits.piper_cpu_threads
        try:
            return await self._cache.aget(f"piper:{files.model}", lambda: _load(files, threads))
        except ProviderError:
            raise
        except Exception as exc:
            raise LocalModelUnavailable(PROVIDER, f"cannot load {files.model}: {exc!r}") from exc


def _load(files: PiperVoiceFiles, threads: int) -> PiperVoice:
    try:
        # onnxruntime ships no types; looked up by name so no ignore comment depends on
        # the mypy configuration of the day.
        onnxruntime = importlib.import_module("onnxruntime")
        from piper import PiperConfig, PiperVoice
    except ImportError as exc:
        raise LocalModelUnavailable(
            PROVIDER, f"piper-tts is not installed: {_INSTALL_HINT}"
        ) from exc
    # Own session instead of PiperVoice.load(): it would use every core per run, and
    # on 2 cores one thread gave lower first-audio latency (73 ms vs 134 ms).
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(files.model), sess_options=options, providers=["CPUExecutionProvider"]
    )
    config = PiperConfig.from_dict(json.loads(files.config.read_text(encoding="utf-8")))
    return PiperVoice(session=session, config=config)


def _check_format(fmt: AudioFormat) -> None:
    if fmt.channels != 1:
        raise ValueError("only mono output is supported")
    if fmt.encoding not in ("mulaw", "pcm16"):
        raise ValueError(f"unsupported encoding {fmt.encoding!r}")
    if fmt.sample_rate not in SUPPORTED_RATES:
        raise ValueError(f"unsupported sample rate {fmt.sample_rate} ({sorted(SUPPORTED_RATES)})")


class _Converter:
    """Float audio at the voice's rate -> bytes in ``fmt``, keeping resampler state across
    sentences. Used by one worker call at a time (calls of one stream are sequential)."""

    def __init__(self, in_rate: int, fmt: AudioFormat) -> None:
        self._resampler = StreamResampler(in_rate, fmt.sample_rate)
        self._mulaw = fmt.encoding == "mulaw"

    def convert(self, audio: npt.NDArray[np.float32]) -> bytes:
        # Piper normalizes each sentence to full scale: clip rather than wrap around.
        pcm = np.clip(np.rint(audio * 32767.0), -32768, 32767).astype(np.int16)
        return self._encode(self._resampler.process(pcm))

    def flush(self) -> bytes:
        return self._encode(self._resampler.flush(np.int16))

    def _encode(self, pcm: npt.NDArray[np.int16]) -> bytes:
        # The int16 resampler path rounds and clips its own overshoot.
        return pcm16_to_ulaw(pcm) if self._mulaw else pcm.astype("<i2").tobytes()

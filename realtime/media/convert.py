"""Streaming conversion between the audio formats of transports and providers."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from realtime.media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from realtime.media.resample import StreamResampler
from realtime.providers.base import AudioFormat


def decode(audio: bytes, fmt: AudioFormat) -> npt.NDArray[np.int16]:
    if fmt.encoding == "mulaw":
        return ulaw_to_pcm16(audio)
    return np.frombuffer(audio[: len(audio) - len(audio) % 2], dtype="<i2").astype(np.int16)


def encode(samples: npt.NDArray[np.int16], fmt: AudioFormat) -> bytes:
    if fmt.encoding == "mulaw":
        return pcm16_to_ulaw(samples)
    return samples.astype("<i2").tobytes()


class AudioConverter:
    """One stream, one direction: decode, resample with state kept, encode."""

    def __init__(self, source: AudioFormat, target: AudioFormat) -> None:
        self.source = source
        self.target = target
        self.passthrough = source == target
        self._resampler = (
            StreamResampler(source.sample_rate, target.sample_rate)
            if source.sample_rate != target.sample_rate
            else None
        )
        self._odd_byte = b""  # PCM16 arriving split between chunks

    def convert(self, audio: bytes) -> bytes:
        if self.passthrough:
            return audio
        return encode(self.convert_to_pcm(audio), self.target)

    def convert_to_pcm(self, audio: bytes) -> npt.NDArray[np.int16]:
        """Decoded samples at the target rate."""
        if self.source.encoding == "pcm16":
            audio = self._odd_byte + audio
            cut = len(audio) - len(audio) % 2
            audio, self._odd_byte = audio[:cut], audio[cut:]
        samples = decode(audio, self.source)
        if self._resampler is not None:
            samples = self._resampler.process(samples)
        return samples

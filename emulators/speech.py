"""Caller speech for tests and benchmarks: espeak-ng when installed, speech-like audio otherwise."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

from emulators._server import speech_for_text
from realtime.media.resample import StreamResampler


def caller_speech(text: str, seconds: float | None = None) -> npt.NDArray[np.int16]:
    """8 kHz PCM of ``text``, trimmed to its voiced part. Without espeak-ng: ``seconds``
    (default ~80 ms per character) of speech-like audio."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        samples = round((seconds or 0.08 * len(text)) * 8000)
        return speech_for_text(text, samples, 8000)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run([espeak, "-s", "165", "-w", str(path), text], check=True)
        with wave.open(str(path)) as reader:
            rate = reader.getframerate()
            pcm = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    resampler = StreamResampler(rate, 8000)
    audio = np.concatenate([resampler.process(pcm.astype(np.int16)), resampler.flush(np.int16)])
    voiced = np.flatnonzero(np.abs(audio) > 300)
    return audio[voiced[0] : voiced[-1] + 1] if voiced.size else audio

"""Benchmark of the inbound media path, one 20 ms Twilio frame at a time.

    160 bytes mu-law @ 8 kHz -> PCM16 -> resample to 16 kHz -> Silero VAD

This is the work done per caller every 20 ms on the event loop, so its tail
latency (p99) is what matters. Audio is a speech-like signal (voiced
syllables, pauses, background noise) looped to the requested frame count, so
the VAD sees both speech and silence like on a real call.

Run: ``python bench/media_frame.py [--frames 20000]``. The last line printed
is machine-readable: ``frames=N decode_p99_ms=.. resample_p99_ms=..
vad_p99_ms=.. frame_p50_ms=.. frame_p99_ms=..``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from realtime.media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from realtime.media.resample import StreamResampler
from realtime.media.vad import SileroVad

RATE_IN, RATE_VAD, FRAME_BYTES = 8000, 16000, 160
_VOWELS = (
    ((700, 80), (1220, 90), (2600, 120)),
    ((300, 60), (2300, 100), (3000, 120)),
    ((500, 60), (900, 80), (2500, 120)),
    ((400, 60), (2000, 100), (2550, 120)),
)


def _utterance(rng: np.random.Generator, seconds: float, rate: int) -> npt.NDArray[np.float64]:
    """Voiced syllables (gliding pitch, formants, -6 dB/oct source) and consonant-like noise."""
    parts: list[npt.NDArray[np.float64]] = []
    total = 0
    while total < seconds * rate:
        n = int(rng.uniform(0.12, 0.25) * rate)
        f0s = rng.uniform(100, 220)
        f0 = np.linspace(f0s, f0s * rng.uniform(0.85, 1.15), n)
        phase = 2 * np.pi * np.cumsum(f0) / rate
        formants = _VOWELS[rng.integers(len(_VOWELS))]
        y = np.zeros(n)
        for k in range(1, int(3800 / f0.max()) + 1):
            y += sum(1 / (1 + ((k * f0 - f) / b) ** 2) for f, b in formants) / k * np.sin(k * phase)
        y *= np.sin(np.pi * np.arange(n) / n) ** 0.5 / np.abs(y).max()
        parts += [y, rng.normal(0, 0.02, int(rng.uniform(0.03, 0.08) * rate))]
        total += n + parts[-1].size
    return np.concatenate(parts)


def make_call_audio(seconds: float = 30.0, seed: int = 0) -> bytes:
    """Mu-law 8 kHz bytes: alternating talk (0.5-3 s) and pauses, over -50 dBFS noise."""
    rng = np.random.default_rng(seed)
    rate = RATE_IN
    chunks: list[npt.NDArray[np.float64]] = []
    total = 0
    while total < seconds * rate:
        chunks.append(_utterance(rng, rng.uniform(0.5, 3.0), rate) * rng.uniform(0.1, 0.6))
        chunks.append(np.zeros(int(rng.uniform(0.2, 2.0) * rate)))
        total += chunks[-2].size + chunks[-1].size
    x = np.concatenate(chunks)[: int(seconds * rate)]
    x += rng.normal(0, 0.003, x.size)
    pcm = np.clip(x * 32767, -32768, 32767).astype(np.int16)
    return pcm16_to_ulaw(pcm)


def run(frames: int, warmup: int = 200) -> dict[str, npt.NDArray[np.float64]]:
    audio = make_call_audio()
    n_loop = len(audio) // FRAME_BYTES
    payloads = [audio[i * FRAME_BYTES : (i + 1) * FRAME_BYTES] for i in range(n_loop)]
    resampler = StreamResampler(RATE_IN, RATE_VAD)
    vad = SileroVad(RATE_VAD)
    clock = time.perf_counter_ns
    t = np.zeros((frames, 3), dtype=np.int64)
    speech_windows = windows = 0
    for i in range(-warmup, frames):
        payload = payloads[i % n_loop]
        t0 = clock()
        pcm8 = ulaw_to_pcm16(payload)
        t1 = clock()
        pcm16 = resampler.process(pcm8)
        t2 = clock()
        probs = vad.process_windows(pcm16)
        t3 = clock()
        if i >= 0:
            t[i] = (t1 - t0, t2 - t1, t3 - t2)
            windows += len(probs)
            speech_windows += sum(p >= 0.5 for p in probs)
    vad.close()
    ms = t.astype(np.float64) / 1e6
    print(f"VAD windows: {windows}, speech: {100 * speech_windows / max(windows, 1):.0f}%")
    return {"decode": ms[:, 0], "resample": ms[:, 1], "vad": ms[:, 2], "frame": ms.sum(axis=1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20000)
    args = parser.parse_args()
    stats = run(args.frames)
    print(f"{'stage':<10}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, v in stats.items():
        p50, p90, p99 = np.percentile(v, [50, 90, 99])
        print(f"{name:<10}{p50:>10.4f}{p90:>10.4f}{p99:>10.4f}{v.max():>10.3f}")
    frame_rate = 1000.0 / stats["frame"].mean()
    print(
        f"this path alone: ~{frame_rate:,.0f} frames/s per core = ~{frame_rate / 50:,.0f} calls"
        " (before websocket, JSON and base64 costs)"
    )

    def p(name: str, q: float) -> str:
        return f"{np.percentile(stats[name], q):.4f}"

    print(
        f"frames={args.frames} decode_p99_ms={p('decode', 99)} "
        f"resample_p99_ms={p('resample', 99)} vad_p99_ms={p('vad', 99)} "
        f"frame_p50_ms={p('frame', 50)} frame_p99_ms={p('frame', 99)}"
    )


if __name__ == "__main__":
    main()

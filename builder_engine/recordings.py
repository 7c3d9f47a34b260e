"""Where call recordings live: the recordings folder by default, S3-compatible storage by URL.

The realtime worker writes ``{recordings_dir}/{call_id}.wav`` while the call runs. A call
that moved to another realtime worker mid-call (its first one died, realtime/resume.py)
gets one file per session - segments: the first session's ``{call_id}.wav``, then
``{call_id}.part2.wav``, ``{call_id}.part3.wav``, ... (each session claims the next free
name, so none overwrites another's audio). After the call, the post-call workflow checks
the file (repairing the WAV header of a writer that died mid-call) - joining the segments
in order into ``{call_id}.wav`` first when there are several - then either leaves it there
(``Call.recording_url`` = ``file://...``) or, with ``BUILDER_RECORDINGS_URL=s3://bucket/prefix``,
uploads it to ``s3://bucket/prefix/{call_id}.wav`` and removes the local copy. The API
streams both.

S3 needs the optional ``boto3`` package; endpoint and credentials come from boto3's own
configuration (``AWS_ENDPOINT_URL`` for MinIO/R2/..., ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), never from a workflow payload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import struct
import wave
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

import anyio
import numpy as np

CHUNK_BYTES = 64 * 1024
#: Audio frames copied at a time when joining segments (memory stays flat).
JOIN_CHUNK_FRAMES = 64 * 1024


class RecordingStorageError(Exception):
    """The storage is misconfigured or unreachable."""


@dataclass(frozen=True)
class WavInfo:
    size_bytes: int
    duration_s: float
    repaired: bool
    segments: int = 1  # the sessions' segments joined into it


def local_path(recordings_dir: Path, call_id: str) -> Path:
    if not call_id or "/" in call_id or "\\" in call_id or call_id.startswith("."):
        raise ValueError(f"not a call id: {call_id!r}")
    return recordings_dir / f"{call_id}.wav"


def segment_path(recording: Path, number: int) -> Path:
    """Segment ``number`` of the recording ``recording`` (``{call_id}.wav``): the first
    session's is the recording itself, the next ones ``{call_id}.part{number}.wav``."""
    if number < 1:
        raise ValueError(f"segments count from 1, not {number}")
    if number == 1:
        return recording
    return recording.with_name(f"{recording.stem}.part{number}.wav")


def create_segment(recording: Path) -> tuple[Path, BinaryIO]:
    """Create the recording's next free segment file (exclusively: a session never
    overwrites another's audio) and open it for writing: its path and the file."""
    recording.parent.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        path = segment_path(recording, number)
        try:
            return path, path.open("xb")
        except FileExistsError:
            number += 1


def later_segments(recording: Path) -> list[Path]:
    """The segments after the first one that are there, in order."""
    found = []
    number = 2
    while (path := segment_path(recording, number)).exists():
        found.append(path)
        number += 1
    return found


def assemble(recordings_dir: Path, call_id: str) -> WavInfo | None:
    """Make ``{call_id}.wav`` the call's whole recording and measure it (None: the call
    left no recording). One segment (one session) is checked and repaired in place;
    several are joined in order. Safe to run again after dying at any point: the joined
    audio goes to ``{call_id}.joined.wav`` (complete once it has that name), then the
    segments are removed, then it becomes ``{call_id}.wav``."""
    path = local_path(recordings_dir, call_id)
    joined = path.with_name(f"{call_id}.joined.wav")
    parts = later_segments(path)
    segments = 1
    if parts or joined.exists():
        segments = 1 + len(parts)
        if not joined.exists():
            segments = join_wavs([path, *parts], joined)
        for part in reversed(parts):
            part.unlink(missing_ok=True)
        os.replace(joined, path)
    if not path.exists():
        return None
    return dataclasses.replace(check_wav(path), segments=segments)


def join_wavs(sources: Sequence[Path], target: Path) -> int:
    """Write the audio of ``sources`` one after the other into ``target``, in the format
    of the first readable one (one at another sample rate is resampled). Sources that are
    missing or no PCM WAV (a session that died before its first second was written) are
    skipped. ``target`` appears complete or not at all. Returns how many were joined;
    raises ValueError when none could be read."""
    tmp = target.with_name(target.name + ".tmp")
    writer: wave.Wave_write | None = None
    joined = 0
    try:
        for source in sources:
            try:
                check_wav(source)
                reader = wave.open(str(source), "rb")  # noqa: SIM115 - closed below
            except (OSError, ValueError, EOFError, wave.Error):
                continue
            with reader:
                if writer is None:
                    writer = wave.open(str(tmp), "wb")  # noqa: SIM115 - closed below
                    writer.setnchannels(reader.getnchannels())
                    writer.setsampwidth(reader.getsampwidth())
                    writer.setframerate(reader.getframerate())
                if _copy_frames(reader, writer):
                    joined += 1
        if writer is None or not joined:
            raise ValueError("no readable recording segment")
        writer.close()
        os.replace(tmp, target)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return joined


def _copy_frames(reader: wave.Wave_read, writer: wave.Wave_write) -> bool:
    """Append ``reader``'s audio to ``writer``; False when its format cannot be."""
    channels, width = writer.getnchannels(), writer.getsampwidth()
    if reader.getnchannels() != channels or reader.getsampwidth() != width:
        return False
    if reader.getframerate() == writer.getframerate():
        while frames := reader.readframes(JOIN_CHUNK_FRAMES):
            writer.writeframes(frames)
        return True
    if width != 2:
        return False
    # Another sample rate (not what one call's sessions write): linear interpolation.
    audio = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    audio = audio.reshape(-1, channels).astype(np.float64)
    count = round(len(audio) * writer.getframerate() / reader.getframerate())
    if count == 0:
        return True
    at = np.linspace(0, len(audio) - 1, count)
    out = np.empty((count, channels), dtype="<i2")
    for channel in range(channels):
        out[:, channel] = np.rint(np.interp(at, np.arange(len(audio)), audio[:, channel]))
    writer.writeframes(out.tobytes())
    return True


def check_wav(path: Path) -> WavInfo:
    """Make the RIFF and data chunk sizes match the file (a writer that died mid-call
    leaves them short) and measure the audio. Raises ValueError when it is no WAV."""
    with path.open("r+b") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ValueError("not a RIFF/WAVE file")
        size = path.stat().st_size
        byte_rate = 0
        repaired = False
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"fmt ":
                fmt = f.read(min(chunk_size, 16))
                if len(fmt) >= 12:
                    byte_rate = struct.unpack("<I", fmt[8:12])[0]
            elif chunk_id == b"data":
                actual = size - offset - 8
                if chunk_size != actual:
                    f.seek(offset + 4)
                    f.write(struct.pack("<I", actual))
                    chunk_size = actual
                    repaired = True
                if struct.unpack("<I", head[4:8])[0] != size - 8:
                    f.seek(4)
                    f.write(struct.pack("<I", size - 8))
                    repaired = True
                duration = chunk_size / byte_rate if byte_rate else 0.0
                return WavInfo(size, round(duration, 3), repaired)
            offset += 8 + chunk_size + (chunk_size & 1)
    raise ValueError("the WAV file has no data chunk")


# ------------------------------------------------------------------ S3


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise RecordingStorageError(f"not an s3://bucket/key URL: {url}")
        return cls(parsed.netloc, unquote(parsed.path.lstrip("/")))

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, name: str) -> S3Location:
        prefix = self.key.rstrip("/")
        return S3Location(self.bucket, f"{prefix}/{name}" if prefix else name)


def _s3_client() -> Any:
    try:
        import boto3  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as exc:
        raise RecordingStorageError(
            "BUILDER_RECORDINGS_URL is an s3:// URL but boto3 is not installed"
        ) from exc
    return boto3.client("s3")


async def upload(path: Path, recordings_url: str, call_id: str) -> str:
    """Upload a finished recording; returns its ``s3://`` location."""
    target = S3Location.parse(recordings_url).child(f"{call_id}.wav")

    def put() -> None:
        _s3_client().upload_file(
            str(path), target.bucket, target.key, ExtraArgs={"ContentType": "audio/wav"}
        )

    try:
        await asyncio.to_thread(put)
    except RecordingStorageError:
        raise
    except Exception as exc:  # botocore's errors; retried by the activity
        raise RecordingStorageError(f"upload to {target.url} failed: {exc}") from exc
    return target.url


# ------------------------------------------------------------------ reading


@dataclass(frozen=True)
class StoredRecording:
    location: str
    size: int


def local_file(location: str) -> Path | None:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return None


async def stat(location: str) -> StoredRecording | None:
    """The recording's size, or None when it is not there (any more)."""
    path = local_file(location)
    if path is not None:
        try:
            size = (await anyio.Path(path).stat()).st_size
        except FileNotFoundError:
            return None
        return StoredRecording(location, size)
    target = S3Location.parse(location)

    def head() -> int | None:
        try:
            answer = _s3_client().head_object(Bucket=target.bucket, Key=target.key)
        except Exception as exc:
            if "404" in str(exc) or "NoSuchKey" in str(exc) or "Not Found" in str(exc):
                return None
            raise RecordingStorageError(f"cannot read {target.url}: {exc}") from exc
        return int(answer["ContentLength"])

    length: int | None = await asyncio.to_thread(head)
    return None if length is None else StoredRecording(location, length)


async def read_range(location: str, start: int, end: int) -> AsyncIterator[bytes]:
    """Bytes ``start`` to ``end`` (inclusive), in chunks."""
    path = local_file(location)
    if path is not None:
        async with await anyio.open_file(path, "rb") as f:
            await f.seek(start)
            left = end - start + 1
            while left > 0:
                data = await f.read(min(CHUNK_BYTES, left))
                if not data:
                    break
                left -= len(data)
                yield data
        return
    target = S3Location.parse(location)
    body = await asyncio.to_thread(
        lambda: _s3_client().get_object(
            Bucket=target.bucket, Key=target.key, Range=f"bytes={start}-{end}"
        )["Body"]
    )
    try:
        while data := await asyncio.to_thread(body.read, CHUNK_BYTES):
            yield data
    finally:
        body.close()

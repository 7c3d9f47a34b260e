"""Re-chunking of sample streams into fixed-size windows.

Telephony frames are 20 ms, models want their own window (Silero: 32 ms), and
resampled chunks can vary by a sample. ``Rechunker`` bridges any input chunk
size to a fixed output size without dropping or duplicating samples.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["Rechunker", "samples_per_frame"]


def samples_per_frame(sample_rate: int, frame_ms: float = 20.0) -> int:
    """Samples in one frame (20 ms at 8 kHz -> 160); must be a whole number."""
    n = sample_rate * frame_ms / 1000.0
    if n != int(n):
        raise ValueError(f"{frame_ms} ms is not a whole number of samples at {sample_rate} Hz")
    return int(n)


class Rechunker:
    """Accumulate float32 samples and hand out complete windows of ``size`` samples.

    At most ``size - 1`` samples are ever held back. Windows are fresh arrays,
    so callers may keep or mutate them.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("size must be positive")
        self.size = size
        self._buf = np.zeros(size, dtype=np.float32)
        self._fill = 0

    @property
    def pending(self) -> int:
        """Samples waiting for the next window."""
        return self._fill

    def reset(self) -> None:
        """Drop pending samples."""
        self._fill = 0

    def push(self, samples: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
        """Add samples; return the windows they complete (often none or one)."""
        out: list[npt.NDArray[np.float32]] = []
        x = samples.reshape(-1)
        i = 0
        while i < x.size:
            take = min(self.size - self._fill, x.size - i)
            self._buf[self._fill : self._fill + take] = x[i : i + take]
            self._fill += take
            i += take
            if self._fill == self.size:
                out.append(self._buf.copy())
                self._fill = 0
        return out

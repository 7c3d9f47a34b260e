"""Audio plumbing for phone calls: G.711 mu-law, resampling, re-chunking, VAD.

Everything here works on mono numpy arrays, one stream per object, and keeps
per-frame work small enough to run inline on the event loop (see
``bench/media_frame.py``). Importing the package does not load the VAD model;
the first ``SileroVad`` does.
"""

from realtime.media.frames import Rechunker, samples_per_frame
from realtime.media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from realtime.media.resample import SUPPORTED_RATES, StreamResampler
from realtime.media.vad import SileroVad, VadConfig, VadEvent, VadEventKind, VadSegmenter

__all__ = [
    "SUPPORTED_RATES",
    "Rechunker",
    "SileroVad",
    "StreamResampler",
    "VadConfig",
    "VadEvent",
    "VadEventKind",
    "VadSegmenter",
    "pcm16_to_ulaw",
    "samples_per_frame",
    "ulaw_to_pcm16",
]

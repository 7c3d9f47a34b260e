"""Per-turn latency measurements, on one monotonic clock."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TurnMetrics:
    """When each step of one answer happened (monotonic seconds).

    ``speech_end`` is the end of the caller's last voiced audio; voice-to-voice
    latency runs from there to the first frame of the answer sent to the caller.
    """

    speech_end: float | None = None
    endpoint: float | None = None
    asr_final: float | None = None
    llm_first_token: float | None = None
    first_sentence: float | None = None  # the first speakable chunk went to TTS
    tts_first_byte: float | None = None
    first_audio: float | None = None

    def as_latency_ms(self) -> dict[str, float]:
        """Milliseconds after the end of speech, for the turn record."""
        if self.speech_end is None:
            return {}
        out: dict[str, float] = {}
        names = (
            "endpoint",
            "asr_final",
            "llm_first_token",
            "first_sentence",
            "tts_first_byte",
            "first_audio",
        )
        for name in names:
            value = getattr(self, name)
            if value is not None:
                out[f"{name}_ms"] = round((value - self.speech_end) * 1000.0, 1)
        if self.first_audio is not None:
            out["voice_to_voice_ms"] = out["first_audio_ms"]
        return out

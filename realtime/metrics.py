"""Per-turn latency measurements, on one monotonic clock."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TurnMetrics:
    """When each step of one answer happened (monotonic seconds).

    ``speech_end`` is the end of the caller's last voiced audio; voice-to-voice
    latency runs from there to the first frame of the answer sent to the caller.
    """

    speech_start: float | None = None  # the caller's turn began (their voice, a key)
    speech_end: float | None = None
    endpoint: float | None = None
    asr_final: float | None = None
    llm_request: float | None = None  # the LLM request went out
    llm_first_token: float | None = None
    first_sentence: float | None = None  # the first speakable chunk went to TTS
    tts_first_byte: float | None = None
    first_audio: float | None = None
    window_s: float | None = None  # the silence the endpoint waited for, by policy

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
        platform = self.platform_ms()
        if platform is not None:
            out["platform_ms"] = round(platform, 1)
        return out

    def platform_ms(self) -> float | None:
        """Time our own code added between the providers' events: deciding the end of the
        turn late (beyond ``window``), going from transcript to LLM request, and from the
        first TTS bytes to the first frame on the wire. Provider waits are excluded."""
        parts = (
            self.speech_end,
            self.endpoint,
            self.asr_final,
            self.llm_request,
            self.tts_first_byte,
            self.first_audio,
        )
        if any(p is None for p in parts) or self.window_s is None:
            return None
        assert self.speech_end is not None and self.endpoint is not None
        assert self.asr_final is not None and self.llm_request is not None
        assert self.tts_first_byte is not None and self.first_audio is not None
        late_endpoint = max(0.0, self.endpoint - self.speech_end - self.window_s)
        return 1000.0 * (
            late_endpoint
            + (self.llm_request - self.asr_final)
            + (self.first_audio - self.tts_first_byte)
        )

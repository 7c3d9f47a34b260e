"""End-of-turn and barge-in decisions from VAD probabilities and transcripts. Pure logic.

Times are stream milliseconds (audio received so far), so the decisions are exact and
reproducible; the session maps them to wall-clock deadlines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from builder_engine.agent_config import TurnConfig

_ENDS_MID_NUMBER = re.compile(
    r"(\d|\b(zero|oh|one|two|three|four|five|six|seven|eight|nine))[\s,.-]*$", re.IGNORECASE
)
_WORD = re.compile(r"[\w'-]+")


def ends_mid_number(text: str) -> bool:
    """A caller dictating a number pauses between groups; wait longer for them."""
    return bool(_ENDS_MID_NUMBER.search(text.strip()))


def meaningful_words(text: str, backchannels: frozenset[str]) -> int:
    """Words that are not a backchannel ("mm-hm", "okay") - those never interrupt."""
    cleaned = text.lower().strip(" .,!?")
    if cleaned in backchannels:
        return 0
    return sum(1 for word in _WORD.findall(cleaned) if word not in backchannels)


@dataclass
class VoiceTracker:
    """Follows the caller's voice: confirmed speech onsets and the end of the last voiced audio."""

    start_threshold: float = 0.5
    end_threshold: float = 0.35
    #: Two model windows of voice confirm speech (one can be a click). How long speech
    #: must last to count - to interrupt the agent, say - is the turn policy's business
    #: (``interrupt_min_ms``), measured from when the sound began; confirming later than
    #: that only delayed every barge-in (by ~60 ms with four windows).
    min_speech_ms: float = 64.0

    #: A frame this far above the noise floor (and above the absolute floor) is sound.
    loud_over_floor_db: float = 12.0
    loud_floor_dbfs: float = -55.0

    def __post_init__(self) -> None:
        self.in_speech = False
        self.onset_ms: float | None = None  # start of the current (confirmed or candidate) speech
        self.last_voice_end_ms: float | None = None
        self.last_loud_end_ms: float | None = None
        self.loud_since_ms: float | None = None  # start of the current stretch of sound
        self.noise_floor_dbfs = -70.0

    def push_energy(self, rms_dbfs: float, start_ms: float, end_ms: float) -> None:
        """Account for one short audio frame's loudness (finer-grained than VAD windows)."""
        if rms_dbfs > max(self.noise_floor_dbfs + self.loud_over_floor_db, self.loud_floor_dbfs):
            if self.loud_since_ms is None or (
                self.last_loud_end_ms is not None and start_ms - self.last_loud_end_ms > 100.0
            ):
                self.loud_since_ms = start_ms
            self.last_loud_end_ms = end_ms
        # The floor follows quiet frames at once and loud ones only slowly.
        if rms_dbfs < self.noise_floor_dbfs:
            self.noise_floor_dbfs = max(rms_dbfs, -90.0)
        else:
            self.noise_floor_dbfs += 0.02

    @property
    def speech_end_ms(self) -> float | None:
        """When the caller's voice stopped. The model's probability lingers for a window or
        two after the last sound; the end of the last loud frame just before is closer."""
        voice_end = self.last_voice_end_ms
        loud_end = self.last_loud_end_ms
        if voice_end is None:
            return None
        if loud_end is not None and voice_end - 160.0 <= loud_end < voice_end:
            return loud_end
        return voice_end

    def push(self, probability: float, start_ms: float, duration_ms: float) -> bool:
        """Account for one VAD window; True when it confirms a new speech onset."""
        end_ms = start_ms + duration_ms
        voiced = probability >= (self.end_threshold if self.in_speech else self.start_threshold)
        if voiced:
            if self.onset_ms is None:
                self.onset_ms = start_ms
            self.last_voice_end_ms = end_ms
            if not self.in_speech and end_ms - self.onset_ms >= self.min_speech_ms:
                self.in_speech = True
                return True
        elif not self.in_speech:
            self.onset_ms = None  # a click, not speech
        return False

    def maybe_speaking(self, now_ms: float, hangover_ms: float = 200.0) -> bool:
        """Speech (or what may become speech) is under way, or there was sound within
        ``hangover_ms``: the audio may hold words."""
        if self.in_speech or self.onset_ms is not None:
            return True
        loud_end = self.last_loud_end_ms
        return loud_end is not None and now_ms - loud_end <= hangover_ms

    def pause_ms(self, now_ms: float) -> float:
        """Silence since the last voiced audio (0 while voiced)."""
        if self.last_voice_end_ms is None:
            return 0.0
        return max(0.0, now_ms - self.last_voice_end_ms)

    def speech_ms(self, now_ms: float) -> float:
        """How long the current speech has lasted (0 when there is none)."""
        onset = self.speech_onset_ms
        if onset is None:
            return 0.0
        return now_ms - onset

    def voiced_ms(self) -> float:
        """How much of the current speech was voice: from its onset to the last voiced
        window. Unlike ``speech_ms`` it does not grow in the silence after a short sound,
        so a cough cannot become "long speech" by waiting."""
        onset = self.speech_onset_ms
        end = self.last_voice_end_ms
        if onset is None or end is None:
            return 0.0
        loud_end = self.last_loud_end_ms
        if self.in_speech and loud_end is not None and end < loud_end <= end + 100.0:
            # Confirmed speech going on: the frames after the last model window are as
            # good as voiced, and 20 ms fresher than waiting for the next 32 ms window.
            end = loud_end
        return max(0.0, end - onset)

    @property
    def speech_onset_ms(self) -> float | None:
        """When the caller's voice started. The model needs a window or two of voice to be
        sure; the sound itself usually started at the beginning of that stretch."""
        onset = self.onset_ms
        loud = self.loud_since_ms
        if onset is None:
            return None
        if loud is not None and onset - 200.0 <= loud < onset:
            return loud
        return onset

    def end_speech(self) -> None:
        """The turn was taken (endpoint): the next voiced window starts a new onset."""
        self.in_speech = False
        self.onset_ms = None


@dataclass(frozen=True)
class TurnPolicy:
    endpointing_ms: float
    digit_patience_ms: float
    interrupt_min_ms: float
    interrupt_min_words: int
    backchannels: frozenset[str]

    @classmethod
    def from_config(cls, turn: TurnConfig) -> TurnPolicy:
        return cls(
            endpointing_ms=turn.endpointing_ms,
            digit_patience_ms=max(turn.digit_patience_ms, turn.endpointing_ms),
            interrupt_min_ms=turn.interrupt_min_ms,
            interrupt_min_words=turn.interrupt_min_words,
            backchannels=frozenset(p.lower() for p in turn.backchannel_phrases),
        )

    def silence_needed_ms(self, transcript_so_far: str) -> float:
        if ends_mid_number(transcript_so_far):
            return self.digit_patience_ms
        return self.endpointing_ms

    def is_interruption(self, speech_ms: float, heard_text: str) -> bool:
        """Caller speech over the agent interrupts it only when it is real speech."""
        if speech_ms < self.interrupt_min_ms:
            return False
        if self.interrupt_min_words == 0:
            return True
        return meaningful_words(heard_text, self.backchannels) >= self.interrupt_min_words

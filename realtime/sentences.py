"""Cut an LLM's streamed text into chunks that can be spoken on their own.

TTS starts on the first chunk while the model is still writing, so a chunk is released
as soon as it is safely complete: at a sentence end, at a line break, or - for the first
chunk of a reply only, to get audio out sooner - at a clause boundary once it is long
enough. A period is not a sentence end inside a number ("3.5"), time or address
("example.com", "a@b.co"), after a title or Latin abbreviation ("Dr.", "e.g."), an
initial ("J. Smith") or a list number ("1. "). For a few abbreviations that may or may not
end the sentence ("a.m.", "etc.", "Inc.") the next word decides: a capital starts a new
sentence. Deciding costs at most one more token of waiting, and only at those spots.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

_TERMINATORS = ".!?\u2026"  # ... and the ellipsis character
_CJK_TERMINATORS = "\u3002\uff01\uff1f"  # full-width period, !, ? need no space after
_CLOSERS = "\"')]}\u201d\u2019\u00bb"
_OPENERS = "\"'([{\u201c\u2018\u00ab"
_CLAUSE_MARKS = ",;:\u2014\u2013"

# fmt: off
# Never end a sentence: titles and Latin abbreviations are followed by more of it.
_NEVER_END = frozenset((
    "mr", "mrs", "ms", "mx", "dr", "prof", "sr", "st", "mt", "ft", "vs", "e.g", "i.e",
    "cf", "viz", "approx", "gen", "col", "lt", "sgt", "capt", "cmdr", "rev", "hon", "gov",
    "sen", "rep", "pres", "supt", "dept",
))
# End the sentence unless a number follows ("No. 5", "p. 12", "ext. 204").
_BEFORE_NUMBER = frozenset(("no", "nos", "vol", "pp", "p", "fig", "ext", "tel", "art", "sec", "ch"))
# Often sentence-final: end only when the next word is capitalized.
_MAYBE_END = frozenset((
    "a.m", "p.m", "etc", "inc", "ltd", "co", "corp", "llc", "plc", "jr", "esq",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
))
# fmt: on
_DOTTED = re.compile(r"^(?:[a-z]{1,2}\.)+[a-z]{1,2}$")  # u.s, ph.d, a.m
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ChunkerConfig:
    """``min_chars``: shortest chunk cut at a sentence end (shorter ones wait for the
    next boundary). ``first_clause_min_chars``: the first chunk may end at a comma,
    semicolon, colon or dash once this long (``None``: sentences only).
    ``max_chars``: a run-on without any boundary is cut near this length."""

    min_chars: int = 3
    first_clause_min_chars: int | None = 40
    max_chars: int = 250

    def __post_init__(self) -> None:
        if self.min_chars < 1 or self.max_chars < max(self.min_chars, 20):
            raise ValueError("need min_chars >= 1 and max_chars >= max(min_chars, 20)")


class SentenceChunker:
    """``push(delta)`` returns the chunks completed by it; ``flush()`` returns the rest.

    One chunker per reply: the first-chunk rule depends on what it already released.
    """

    def __init__(self, config: ChunkerConfig | None = None) -> None:
        self.config = config or ChunkerConfig()
        self._buffer = ""
        self._scan_from = 0  # no boundary before this index (decided already)
        self._at_line_start = True  # the buffer begins a line (for "1. " list markers)
        self.chunks_released = 0

    def push(self, text: str) -> list[str]:
        self._buffer += text
        chunks = []
        while (cut := self._find_cut()) is not None:
            chunk = _normalize(self._buffer[:cut])
            self._at_line_start = "\n" in self._buffer[max(0, cut - 1) : cut + 1]
            self._buffer = self._buffer[cut:]
            self._scan_from = 0
            if chunk:
                chunks.append(chunk)
                self.chunks_released += 1
        return chunks

    def flush(self) -> str:
        """Everything not released yet (the reply ended), normalized; "" if nothing."""
        rest = _normalize(self._buffer)
        self._buffer, self._scan_from, self._at_line_start = "", 0, True
        if rest:
            self.chunks_released += 1
        return rest

    # ------------------------------------------------------------ scanning

    def _find_cut(self) -> int | None:
        buf = self._buffer
        i = self._scan_from
        while i < len(buf):
            decision = self._boundary_at(i)
            if decision is None:  # need more text to decide
                self._scan_from = i
                return None
            if decision > 0 and len(buf[:decision].strip()) >= self._min_length(buf, i):
                return decision
            i += 1
        self._scan_from = i
        if len(buf) >= self.config.max_chars:
            return _forced_cut(buf, self.config.max_chars)
        return None

    def _min_length(self, buf: str, i: int) -> int:
        if buf[i] in _CLAUSE_MARKS:
            return self.config.first_clause_min_chars or 0
        return self.config.min_chars

    def _boundary_at(self, i: int) -> int | None:
        """Cut position if a chunk may end at ``buf[i]``; 0 if not; None if undecided."""
        buf = self._buffer
        ch = buf[i]
        if ch == "\n":
            return i + 1
        if ch in _CJK_TERMINATORS:
            return _skip(buf, i + 1, _CLOSERS)
        if ch in _CLAUSE_MARKS:
            return self._clause_at(i)
        if ch not in _TERMINATORS:
            return 0
        end = _skip(buf, i + 1, _TERMINATORS + _CLOSERS)
        if end == len(buf):
            return None  # "3." may become "3.5", "example." "example.com"
        if not buf[end].isspace():
            return 0
        run = buf[i:end]
        if "!" in run or "?" in run:
            return end
        if i > 0 and buf[i - 1] in _TERMINATORS:
            return 0  # inside a run already judged from its first character
        verdict = self._period_ends_sentence(i, end)
        if verdict is None:
            return None
        return end if verdict else 0

    def _clause_at(self, i: int) -> int | None:
        first_clause = self.config.first_clause_min_chars
        if self.chunks_released or first_clause is None or i + 1 < first_clause:
            return 0
        buf = self._buffer
        if i + 1 == len(buf):
            return None  # "1," may become "1,000"
        return i + 1 if buf[i + 1].isspace() else 0

    def _period_ends_sentence(self, i: int, end: int) -> bool | None:
        buf = self._buffer
        start = i
        while start > 0 and not buf[start - 1].isspace():
            start -= 1
        word = buf[start:i].lstrip(_OPENERS)
        lower = word.lower()
        following = _next_visible(buf, end)
        ellipsis = buf[i:end].rstrip(_CLOSERS) != "." or buf[i] == "\u2026"
        if lower in _NEVER_END:
            return False
        if len(word) == 1 and word.isupper():
            return False  # an initial: "J. R. R. Tolkien"
        if word.isdigit() and self._starts_line(start):
            return False  # a list item: "1. Open the app"
        if lower in _BEFORE_NUMBER:
            return None if following is None else not following.isdigit()
        if ellipsis or lower in _MAYBE_END or _DOTTED.match(lower):
            return None if following is None else following.isupper()
        return True

    def _starts_line(self, start: int) -> bool:
        before = self._buffer[:start].rstrip(" \t")
        return before.endswith("\n") or (not before and self._at_line_start)


def _skip(buf: str, i: int, chars: str) -> int:
    while i < len(buf) and buf[i] in chars:
        i += 1
    return i


def _next_visible(buf: str, i: int) -> str | None:
    while i < len(buf):
        if not buf[i].isspace() and buf[i] not in _OPENERS:
            return buf[i]
        i += 1
    return None


def _forced_cut(buf: str, limit: int) -> int:
    """Where to cut a run-on: the last clause mark, else the last space, before ``limit``."""
    window = buf[:limit]
    for marks in (_CLAUSE_MARKS, " "):
        best = max(window.rfind(m) for m in marks)
        if best > limit // 3:
            return best + 1
    return limit


def _normalize(text: str) -> str:
    # Line breaks and runs of spaces mean nothing to a voice; TTS engines read some of
    # them as long pauses.
    return _WHITESPACE.sub(" ", text).strip()


async def speakable_chunks(
    deltas: AsyncIterable[str], config: ChunkerConfig | None = None
) -> AsyncIterator[str]:
    """Chunks of a stream of text deltas, each as soon as it is complete."""
    chunker = SentenceChunker(config)
    async for delta in deltas:
        for chunk in chunker.push(delta):
            yield chunk
    if rest := chunker.flush():
        yield rest

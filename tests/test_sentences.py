"""Splitting streamed LLM text into speakable chunks."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from emulators.openai import split_tokens
from realtime.sentences import ChunkerConfig, SentenceChunker, speakable_chunks

SENTENCES_ONLY = ChunkerConfig(first_clause_min_chars=None)


def chunk_all(text: str, config: ChunkerConfig | None = None) -> list[str]:
    """Chunks of ``text`` fed whole, one character at a time, as LLM-like tokens and as
    random pieces: the result must not depend on how the stream was cut."""
    results = []
    rng = random.Random(7)
    pieces_list = [[text], list(text), split_tokens(text)]
    for _ in range(3):
        pieces, i = [], 0
        while i < len(text):
            size = rng.randint(1, 9)
            pieces.append(text[i : i + size])
            i += size
        pieces_list.append(pieces)
    for pieces in pieces_list:
        chunker = SentenceChunker(config)
        chunks = [c for p in pieces for c in chunker.push(p)]
        if rest := chunker.flush():
            chunks.append(rest)
        results.append(chunks)
    assert all(r == results[0] for r in results), results
    return results[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Sure. Let me check that!", ["Sure.", "Let me check that!"]),
        ("Really?! Wow. Okay", ["Really?!", "Wow.", "Okay"]),
        ("It costs 3.5 dollars. Anything else?", ["It costs 3.5 dollars.", "Anything else?"]),
        ("Dr. Smith and Mrs. Jones are in. St. Louis too.",
         ["Dr. Smith and Mrs. Jones are in.", "St. Louis too."]),
        ("Bring ID, e.g. a passport, i.e. photo ID. Thanks.",
         ["Bring ID, e.g. a passport, i.e. photo ID.", "Thanks."]),
        ("We open at 9 a.m. and close at 5 p.m. See you!",
         ["We open at 9 a.m. and close at 5 p.m.", "See you!"]),
        ("We open at 9 a.m. Tomorrow is different.",
         ["We open at 9 a.m.", "Tomorrow is different."]),
        ("Your slot is at 10:30. Please arrive early.",
         ["Your slot is at 10:30.", "Please arrive early."]),
        ("Visit www.example.com/book. Or email help@example.co.uk. Bye.",
         ["Visit www.example.com/book.", "Or email help@example.co.uk.", "Bye."]),
        ("J. R. R. Tolkien wrote it. Right.", ["J. R. R. Tolkien wrote it.", "Right."]),
        ("Call ext. 204 now. No. That's wrong.", ["Call ext. 204 now.", "No.", "That's wrong."]),
        ("Apples, pears, etc. are fine. Etc. Then more.",
         ["Apples, pears, etc. are fine.", "Etc.", "Then more."]),
        ("See you Jan. 5 then. Bye.", ["See you Jan. 5 then.", "Bye."]),
        ('He said "hello." Then he left.', ['He said "hello."', "Then he left."]),
        ("Well... maybe. Well... Maybe not.", ["Well... maybe.", "Well...", "Maybe not."]),
        ("The total is $1,234.56. Is that okay?", ["The total is $1,234.56.", "Is that okay?"]),
        ("Options:\n1. Pizza\n2. Pasta\n\nWhich one?",
         ["Options:", "1. Pizza", "2. Pasta", "Which one?"]),
        ("Hm\n- a\n- bcd", ["Hm - a", "- bcd"]),  # "Hm" is below min_chars
        ("こんにちは。元気ですか\uff1fはい", ["こんにちは。", "元気ですか\uff1f", "はい"]),
        ("Version 2.0.1 shipped. Done.", ["Version 2.0.1 shipped.", "Done."]),
        ("We have 25. Enough?", ["We have 25.", "Enough?"]),
    ],
)  # fmt: skip
def test_sentence_boundaries(text: str, expected: list[str]) -> None:
    assert chunk_all(text, SENTENCES_ONLY) == expected


def test_the_first_chunk_may_end_at_a_clause_once_long_enough() -> None:
    text = (
        "Thanks for calling Acme Dental, this is Ana speaking, how can I help you today? "
        "We have openings on Monday, Tuesday, and Friday."
    )
    assert chunk_all(text) == [
        "Thanks for calling Acme Dental, this is Ana speaking,",
        "how can I help you today?",
        "We have openings on Monday, Tuesday, and Friday.",  # later chunks: sentences only
    ]
    short_clause = ChunkerConfig(first_clause_min_chars=20)
    assert chunk_all(text, short_clause)[0] == "Thanks for calling Acme Dental,"
    assert chunk_all(
        "Up to 1,000 people: all of them, together.", ChunkerConfig(first_clause_min_chars=10)
    ) == [
        "Up to 1,000 people:",
        "all of them, together.",
    ]


def test_chunks_are_released_as_soon_as_they_are_safe() -> None:
    chunker = SentenceChunker(SENTENCES_ONLY)
    assert chunker.push("Sure") == []
    assert chunker.push(".") == []  # "Sure.com"? "Sure.5"? one more character decides
    assert chunker.push(" ") == ["Sure."]
    assert chunker.push("Dr.") == []
    assert chunker.push(" Who") == []  # a title: the sentence goes on
    assert chunker.push(" is in? ") == ["Dr. Who is in?"]
    assert chunker.push("At 9 a.m.") == []
    assert chunker.push(" ") == []  # "a.m." may or may not end it: wait for the next word
    assert chunker.push("T") == ["At 9 a.m."]
    assert chunker.flush() == "T"
    assert chunker.flush() == ""
    assert chunker.chunks_released == 4


def test_min_chars_holds_back_tiny_sentences() -> None:
    config = ChunkerConfig(min_chars=6, first_clause_min_chars=None)
    assert chunk_all("Hi. Yes. I can help.", config) == ["Hi. Yes.", "I can help."]


def test_a_run_on_is_cut_near_max_chars_at_a_clause_or_space() -> None:
    config = ChunkerConfig(max_chars=60, first_clause_min_chars=None)
    words = "and then we went on " * 12
    chunks = chunk_all(words, config)
    assert all(len(c) <= 60 for c in chunks)
    assert " ".join(chunks) == words.strip()
    with_comma = "one two three four five six seven, eight nine ten eleven twelve thirteen fourteen"
    assert chunk_all(with_comma, config)[0] == "one two three four five six seven,"


def test_whitespace_is_normalized() -> None:
    assert chunk_all("  Hello\tthere.   How  are\u00a0you?  ", SENTENCES_ONLY) == [
        "Hello there.",
        "How are you?",
    ]
    assert chunk_all("   ") == []


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        ChunkerConfig(min_chars=0)
    with pytest.raises(ValueError):
        ChunkerConfig(max_chars=10)


async def test_speakable_chunks_over_an_async_stream() -> None:
    async def deltas() -> AsyncIterator[str]:
        for piece in split_tokens("First one. Second one! And the rest"):
            yield piece

    assert [c async for c in speakable_chunks(deltas(), SENTENCES_ONLY)] == [
        "First one.",
        "Second one!",
        "And the rest",
    ]

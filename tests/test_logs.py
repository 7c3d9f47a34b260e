"""Log redaction: phone numbers and e-mails masked, everything else left readable."""

from __future__ import annotations

import pytest

from builder_engine.logs import redact_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("calling +14155550123 now", "calling +14***23 now"),
        ("from (415) 555-0123.", "from 41***23."),
        ("to 415 555 0123", "to 41***23"),
        ("mail jane.doe@example.com", "mail ***@***"),
        ("tel:+442071838750", "tel:+44***50"),
    ],
)
def test_phone_numbers_and_emails_are_masked(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "no heartbeat since 2026-11-26 07:51:17.024000+00:00, moving it",
        "started 2026-11-26T07:51:17Z",
        "call call_789cc1f0e5100496c41621 ended",
        "run 01a216d6-1f4b-79b4-b877-5341e15aa3f3",
        "took 1234567.891 ms",
        "frames=12345 bytes=8000",
    ],
)
def test_dates_ids_and_figures_are_left_alone(text: str) -> None:
    assert redact_text(text) == text

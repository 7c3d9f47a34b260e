"""Logging set-up shared by every process, with phone numbers and e-mails masked by default."""

from __future__ import annotations

import logging
import re

# A run of 9+ digits and separators standing on its own: not digits inside an id
# (call_5f0e5100496c), and not a date or a time (see _NOT_A_PHONE).
_PHONE = re.compile(r"(?<![\w.+-])(?<!\d:)\+?\(?\d[\d\s().-]{7,}\d(?![\w:])")
_NOT_A_PHONE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[ T].*)?|\d+\.\d+")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")


def redact_phone(number: str) -> str:
    """Keep the country prefix and last two digits: enough to tell calls apart in a log."""
    digits = re.sub(r"\D", "", number)
    if len(digits) < 6:
        return "***"
    return f"{'+' if number.startswith('+') else ''}{digits[:2]}***{digits[-2:]}"


def redact_text(text: str) -> str:
    text = _EMAIL.sub("***@***", text)
    return _PHONE.sub(_redact_match, text)


def _redact_match(match: re.Match[str]) -> str:
    found = match.group(0)
    return found if _NOT_A_PHONE.fullmatch(found) else redact_phone(found)


class PiiRedactingFilter(logging.Filter):
    """Masks phone numbers and e-mail addresses in every record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure_logging(level: str, *, redact_pii: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if redact_pii:
        handler.addFilter(PiiRedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

"""The TwiML our API answers Twilio with, read the way Twilio follows it - the parts the
emulators act on: a ``<Connect><Stream>`` (its URL, parameters and ``action``), words to
say, and whether the call is hung up."""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.etree import ElementTree


@dataclass(frozen=True)
class StreamVerb:
    url: str
    parameters: dict[str, str]
    #: Where Twilio asks what next once the stream has ended; None: the call hangs up.
    action: str | None


@dataclass(frozen=True)
class Instructions:
    stream: StreamVerb | None = None
    said: list[str] = field(default_factory=list)
    hangs_up: bool = False


def read_twiml(document: str) -> Instructions:
    """What Twilio would do with ``document`` (raises ``ValueError`` for what it would not
    run either: no ``<Response>``, a ``<Stream>`` without a URL)."""
    root = ElementTree.fromstring(document)  # noqa: S314 - our own API's answer, in tests
    if root.tag != "Response":
        raise ValueError(f"not TwiML: <{root.tag}>")
    said: list[str] = []
    for verb in root:
        if verb.tag == "Say":
            said.append(verb.text or "")
        elif verb.tag == "Hangup":
            return Instructions(said=said, hangs_up=True)
        elif verb.tag == "Connect":
            stream = verb.find("Stream")
            if stream is None or not stream.get("url"):
                raise ValueError("<Connect> without a <Stream url>")
            parameters = {p.get("name", ""): p.get("value", "") for p in stream.iter("Parameter")}
            return Instructions(
                StreamVerb(stream.get("url", ""), parameters, verb.get("action")), said
            )
    # The document ran out: Twilio ends the call.
    return Instructions(said=said, hangs_up=True)

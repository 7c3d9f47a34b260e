"""Is this media stream Twilio's? The websocket handshake's ``X-Twilio-Signature``.

Twilio signs the HTTP request that opens a Media Streams websocket the way it signs a
webhook: base64(HMAC-SHA1(auth token, URL)) - the URL of ``<Stream url>``, no form
parameters (it is a GET). Without this check anyone who can reach the realtime server
and learns a call id could join that call's audio.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.websockets import WebSocket
from twilio.request_validator import RequestValidator

HEADER = "x-twilio-signature"


@dataclass(frozen=True)
class StreamSignature:
    """``stream_url``: the ``<Stream url>`` our TwiML names (the realtime server's public
    URL + ``/media/twilio``)."""

    auth_token: str
    stream_url: str

    def valid(self, websocket: WebSocket) -> bool:
        signature = websocket.headers.get(HEADER)
        if not signature:
            return False
        validator = RequestValidator(self.auth_token)
        return any(validator.validate(url, {}, signature) for url in self._urls(websocket))

    def _urls(self, websocket: WebSocket) -> list[str]:
        # The URL in the TwiML first. A realtime server reached under another name than
        # its configured one (processes with a public URL each) was still named in the
        # TwiML by that other name: the URL as requested, in either scheme (a proxy in
        # front terminates TLS), is what Twilio signed then.
        requested = urlsplit(str(websocket.url))
        urls = [self.stream_url]
        for scheme in ("wss", "ws"):
            url = requested._replace(scheme=scheme).geturl()
            if url not in urls:
                urls.append(url)
        return urls

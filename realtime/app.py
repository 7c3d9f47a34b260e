"""The realtime media server's ASGI app (``builder-engine serve realtime``).

It will carry the websocket media endpoints - ``/media/twilio``, ``/media/telnyx`` and
``/media/web`` - where each call's audio runs through transport, codec, VAD/ASR, turn
taking, the LLM brain and TTS in process. For now it serves only ``GET /healthz``, which
``builder-engine up`` and load balancers use to know the process is serving.
"""

from __future__ import annotations

from fastapi import FastAPI

from builder_engine.config import Settings


def create_app(settings: Settings) -> FastAPI:
    """Build the realtime server's app for ``settings``."""
    app = FastAPI(
        title="Builder Engine realtime",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app

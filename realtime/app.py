"""The realtime media server's ASGI app (``builder-engine serve realtime``).

Websocket media endpoints: ``/media/twilio`` (Twilio Media Streams) and ``/media/web``
(browsers and SDKs, docs/web-protocol.md). Each call's
audio runs through transport, codec, VAD/ASR, turn taking, the LLM and TTS in this
process; the call's lifecycle and turns go to its CallWorkflow in Temporal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from temporalio.client import Client

from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, session_factory
from builder_engine.temporal_setup import connect
from realtime.admission import Admission
from realtime.calls import CallLoader, ProviderFactory, SessionFactory
from realtime.collector import CallGarbageCollector
from realtime.instance import RealtimeInstance
from realtime.lifecycle import CallLifecycle, TemporalCallLifecycle
from realtime.media.vad import VadBatcher
from realtime.providers.http import CallPools
from realtime.providers.registry import (
    ProviderRegistry,
    ProviderResources,
    preload_cloud_adapters,
)
from realtime.stats import RealtimeStats
from realtime.transports.twilio import TwilioMediaHandler
from realtime.transports.twilio_signature import StreamSignature
from realtime.transports.web import WebMediaHandler
from workflows.liveness import ResumeState


@dataclass
class RealtimeContext:
    twilio: TwilioMediaHandler
    web: WebMediaHandler
    admission: Admission
    stats: RealtimeStats
    vad: VadBatcher
    collector: CallGarbageCollector
    pools: CallPools


def create_app(
    settings: Settings,
    *,
    providers: ProviderFactory | None = None,
    collect_garbage: bool = False,
) -> FastAPI:
    """Build the realtime server's app. ``providers`` replaces the registry (benchmarks).
    ``collect_garbage``: the process is the realtime server's own, its garbage collector
    tuned for it (workers/cli.py): run its full passes (realtime/collector.py)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_async_db_engine(settings)
        temporal: Client = await connect(settings)
        # Running before the first call: a CallWorkflow tells it about its call at once.
        instance = RealtimeInstance(
            temporal, settings.temporal_task_queue, lost_after_s=settings.realtime_lost_after_s
        )
        await instance.start()

        def lifecycle(call_id: str) -> CallLifecycle:
            return TemporalCallLifecycle(
                temporal, call_id, instance=instance, batch_delay_s=settings.turn_batch_s
            )

        async def resume_state(call_id: str) -> ResumeState:
            handle = temporal.get_workflow_handle(call_id)
            state: ResumeState = await handle.query("resume_state", result_type=ResumeState)
            return state

        preload_cloud_adapters()
        resources = ProviderResources(settings)
        factory = SessionFactory(
            providers or ProviderRegistry(resources),
            lifecycle,
            settings.effective_recordings_dir,
            resume_state=resume_state,
        )
        loader = CallLoader(session_factory(engine))
        stats = factory.stats
        collector = CallGarbageCollector(lambda: stats.calls_started - stats.active_calls)
        background = [asyncio.create_task(factory.stats.watch_loop(), name="loop-lag")]
        if collect_garbage:
            background.append(asyncio.create_task(collector.run(), name="garbage-collector"))
        admission = Admission(
            stats,
            max_calls=settings.realtime_max_calls,
            max_loop_lag_ms=settings.realtime_ready_max_loop_lag_ms,
        )
        app.state.context = RealtimeContext(
            twilio=TwilioMediaHandler(
                loader, factory, signature=_stream_signature(settings), admission=admission
            ),
            web=WebMediaHandler(loader, factory, admission=admission),
            admission=admission,
            stats=factory.stats,
            vad=factory.vad_batcher,
            collector=collector,
            pools=resources.pools,
        )
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await instance.aclose()
            await resources.aclose()
            await engine.dispose()

    app = FastAPI(
        title="Builder Engine realtime",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Whether this process should get new calls (realtime/admission.py): 200, or 503
        with the reason while it is at its call cap or its event loop runs late."""
        admission: Admission = app.state.context.admission
        busy = admission.busy()
        body = {"status": "busy" if busy else "ready", **admission.snapshot()}
        if busy:
            body["reason"] = busy
        return JSONResponse(body, status_code=503 if busy else 200)

    @app.get("/stats")
    async def stats() -> dict[str, float | int]:
        """Calls in progress, the cost of inbound frames (decode, resample, VAD), the full
        garbage collections, and the providers' connection pools."""
        context: RealtimeContext = app.state.context
        return {
            **context.stats.snapshot(),
            **context.vad.snapshot(),
            **context.collector.snapshot(),
            **context.pools.snapshot(),
            **context.admission.snapshot(),
        }

    @app.websocket("/media/twilio")
    async def media_twilio(websocket: WebSocket) -> None:
        context: RealtimeContext = websocket.app.state.context
        await context.twilio.handle(websocket)

    @app.websocket("/media/web")
    async def media_web(websocket: WebSocket) -> None:
        context: RealtimeContext = websocket.app.state.context
        await context.web.handle(websocket)

    return app


def _stream_signature(settings: Settings) -> StreamSignature | None:
    """With a Twilio auth token configured, only streams Twilio signed are taken (as the
    API's Twilio webhooks); without one (development, the web-only setup), any."""
    if settings.twilio_auth_token is None:
        return None
    return StreamSignature(
        settings.twilio_auth_token.get_secret_value(),
        f"{settings.effective_realtime_url}/media/twilio",
    )

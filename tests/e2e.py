"""A whole platform in one test process: Temporal dev server, worker, API, realtime server
on loopback, and the vendor emulators behind it. Used by the end-to-end call tests."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from ports import free_port
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from twilio.request_validator import RequestValidator

from activities.calls import CallActivities
from activities.post_call import PostCallActivities
from activities.telephony import TelephonyActivities
from activities.webhooks import WebhookActivities
from api.app import create_app as create_api
from builder_engine.apikeys import create_org_api_key
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine
from builder_engine.db.migrate import upgrade
from builder_engine.temporal_setup import ensure_search_attributes
from conftest import installed_binary
from emulators.deepgram import DeepgramEmulator
from emulators.elevenlabs import ElevenLabsEmulator
from emulators.openai import OpenAIEmulator, ScriptRule
from emulators.twilio_phone import TwilioPhone
from emulators.twiml import Instructions, read_twiml
from realtime.app import create_app as create_realtime
from realtime.calls import ProviderFactory
from workers.supervisor import TEMPORAL_SERVER_TUNING
from workers.temporal_worker import build_worker
from workflows.events import WebhookRetry

TWILIO_TOKEN = "twilio-test-auth-token"
PUBLIC_URL = "https://voice.example.test"


@dataclass
class Stack:
    settings: Settings
    api: httpx.AsyncClient
    api_key: str
    temporal: Client
    realtime_url: str
    deepgram: DeepgramEmulator
    openai: OpenAIEmulator
    elevenlabs: ElevenLabsEmulator
    #: Each call's answer to the voice webhook (TwiML), by call sid.
    answers: dict[str, str] = field(default_factory=dict)

    async def create_agent(self, **config: Any) -> dict[str, Any]:
        response = await self.api.post("/v1/agents", json=config)
        assert response.status_code == 201, response.text
        agent: dict[str, Any] = response.json()
        return agent

    async def add_number(self, agent_id: str) -> str:
        number = "+1415" + "".join(secrets.choice("0123456789") for _ in range(7))
        response = await self.api.post(
            "/v1/phone-numbers", json={"number": number, "carrier": "twilio", "agent_id": agent_id}
        )
        assert response.status_code == 201, response.text
        return number

    async def incoming_call(self, to_number: str) -> tuple[str, str, str]:
        """Twilio's signed voice webhook; returns (call sid, stream URL, call id)."""
        call_sid = "CA" + secrets.token_hex(16)
        params = {
            "CallSid": call_sid,
            "AccountSid": "AC" + "0" * 32,
            "From": "+14155550123",
            "To": to_number,
            "CallStatus": "ringing",
            "Direction": "inbound",
        }
        url = f"{PUBLIC_URL}/telephony/twilio/voice"
        signature = RequestValidator(TWILIO_TOKEN).compute_signature(url, params)
        response = await self.api.post(
            "/telephony/twilio/voice", data=params, headers={"X-Twilio-Signature": signature}
        )
        assert response.status_code == 200, response.text
        self.answers[call_sid] = response.text
        stream = read_twiml(response.text).stream
        assert stream is not None and "call_id" in stream.parameters, response.text
        return call_sid, stream.url, stream.parameters["call_id"]

    async def stream_ended(self, action: str, call_sid: str) -> Instructions:
        """Twilio after a ``<Connect><Stream>`` ended with the caller still on the line: a
        signed POST to the ``<Connect action>`` URL, and what its answer says to do."""
        assert action.startswith(PUBLIC_URL), action
        params = {
            "CallSid": call_sid,
            "AccountSid": "AC" + "0" * 32,
            "CallStatus": "in-progress",
            "Direction": "inbound",
        }
        signature = RequestValidator(TWILIO_TOKEN).compute_signature(action, params)
        response = await self.api.post(
            action.removeprefix(PUBLIC_URL), data=params, headers={"X-Twilio-Signature": signature}
        )
        assert response.status_code == 200, response.text
        return read_twiml(response.text)

    def phone(self, stream_url: str, call_id: str, call_sid: str) -> TwilioPhone:
        return TwilioPhone(
            stream_url, parameters={"call_id": call_id}, call_sid=call_sid, auth_token=TWILIO_TOKEN
        )


@contextlib.asynccontextmanager
async def running_stack(
    tmp_path: Path,
    *,
    asr_script: Sequence[str],
    llm_script: Sequence[ScriptRule],
    database_url: str | None = None,
    providers: ProviderFactory | None = None,
    asr_final_latency_ms: float = 100,
    llm_first_token_ms: float = 200,
    tts_first_byte_ms: float = 150,
    analysis: bool = False,
    webhook_retry: WebhookRetry | None = None,
    in_process_worker: bool = True,
    twilio_rest: tuple[str, str] | None = None,
) -> AsyncIterator[Stack]:
    """``analysis``: the post-call analysis asks the OpenAI emulator too (off by default,
    so tests that count the emulator's requests see only the conversation's).
    ``in_process_worker=False``: no Temporal worker here (the test runs its own, e.g. as
    a process it can kill) on ``settings.temporal_task_queue``."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=installed_binary("temporal"),
        dev_server_log_level="error",
        # As `builder-engine up` runs it (eager activities; the SQLite settings are moot
        # for this in-memory server).
        dev_server_extra_args=list(TEMPORAL_SERVER_TUNING),
    )
    try:
        await ensure_search_attributes(env.client, env.client.namespace)
        async with (
            DeepgramEmulator(script=list(asr_script), final_latency_ms=asr_final_latency_ms) as dg,
            OpenAIEmulator(llm_script, first_token_latency_ms=llm_first_token_ms) as oa,
            ElevenLabsEmulator(first_byte_latency_ms=tts_first_byte_ms) as el,
        ):
            realtime_port = free_port()
            settings = Settings(
                data_dir=tmp_path,
                database_url=database_url,
                temporal_address=env.client.service_client.config.target_host,
                temporal_task_queue=f"e2e-{secrets.token_hex(4)}",
                public_url=PUBLIC_URL,
                realtime_public_url=f"ws://127.0.0.1:{realtime_port}",
                realtime_port=realtime_port,
                # The test process runs the realtime server, worker, API and phones on one
                # event loop: a stall of a few seconds there (a slow CI host) is the
                # test's own, not a lost process to move calls away from. (The tests of
                # moves run realtime processes of their own, at the default.)
                realtime_lost_after_s=15.0,
                twilio_auth_token=TWILIO_TOKEN,
                openai_api_key=oa.api_key,
                openai_base_url=oa.base_url,
                deepgram_api_key=dg.api_key,
                deepgram_base_url=dg.url,
                elevenlabs_api_key=el.api_key,
                elevenlabs_base_url=el.url,
                twilio_account_sid=twilio_rest[1] if twilio_rest else None,
                twilio_api_base_url=twilio_rest[0] if twilio_rest else None,
                _env_file=None,
            )
            upgrade(settings)
            key = create_org_api_key(settings, f"e2e-{secrets.token_hex(3)}")
            engine = create_async_db_engine(settings)
            calls = CallActivities(engine)
            no_llm = settings.model_copy(update={"openai_api_key": None, "openai_base_url": None})
            post_call = PostCallActivities(calls.sessions, settings if analysis else no_llm)
            webhooks = WebhookActivities(
                calls.sessions, retry=webhook_retry, public_url=settings.effective_public_url
            )
            # twilio_rest = (emulator URL, account SID): transfers and hang-ups go there.
            telephony = TelephonyActivities.from_settings(calls.sessions, settings)
            worker = build_worker(
                env.client,
                settings.temporal_task_queue,
                calls,
                post_call=post_call,
                webhooks=webhooks,
                telephony=telephony,
            )
            api_app = create_api(settings)
            realtime_app = create_realtime(settings, providers=providers)
            server = uvicorn.Server(
                uvicorn.Config(
                    realtime_app,
                    host="127.0.0.1",
                    port=realtime_port,
                    log_level="warning",
                    ws="websockets-sansio",
                )
            )
            serving = asyncio.create_task(server.serve())
            try:
                while not server.started:
                    if serving.done():
                        serving.result()
                    await asyncio.sleep(0.01)
                async with (
                    worker if in_process_worker else contextlib.nullcontext(),
                    api_app.router.lifespan_context(api_app),
                    httpx.AsyncClient(
                        transport=httpx.ASGITransport(app=api_app),
                        base_url="http://testserver",
                        headers={"Authorization": f"Bearer {key}"},
                    ) as client,
                ):
                    yield Stack(
                        settings=settings,
                        api=client,
                        api_key=key,
                        temporal=env.client,
                        realtime_url=settings.effective_realtime_url,
                        deepgram=dg,
                        openai=oa,
                        elevenlabs=el,
                    )
            finally:
                server.should_exit = True
                await serving
                await post_call.aclose()
                await webhooks.aclose()
                await telephony.aclose()
                await engine.dispose()
    finally:
        await env.shutdown()

"""Tying a media stream to its call: load the call and its pinned agent version, build a session."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from builder_engine.agent_config import AgentConfig, VariableValue
from builder_engine.calls import CallStatus, EndedReason
from builder_engine.db.models import AgentVersion, Call
from builder_engine.tools import ToolDef, load_agent_tools
from realtime.lifecycle import CallLifecycle
from realtime.media.vad import SileroModel, SileroVad, VadBatcher
from realtime.playout import OutboundMedia
from realtime.providers.base import AudioFormat, ProviderError
from realtime.recorder import StereoRecorder
from realtime.resume import RESUME_LINE, rebuild
from realtime.session import CallSession, CallSetup, Providers
from realtime.stats import RealtimeStats
from workflows.liveness import ResumeState

log = logging.getLogger(__name__)


class CallNotFound(LookupError):
    pass


class SessionNotCreated(Exception):
    """The call's session could not be built here; the call has been ended with ``reason``
    (its workflow told). The transport closes its socket."""

    def __init__(self, call_id: str, reason: EndedReason) -> None:
        super().__init__(f"call {call_id}: no session ({reason})")
        self.reason = reason


@dataclass(frozen=True)
class LoadedCall:
    call_id: str
    organization_id: str
    config: AgentConfig
    variables: dict[str, VariableValue] = field(default_factory=dict)
    join_token_hash: str | None = None  # web calls: the hash of the token that may join
    tools: tuple[ToolDef, ...] = ()  # the agent's tools (organization-scoped, live ones)
    carrier_call_id: str | None = None  # the carrier's id of the call (Twilio's CallSid)


class CallLoader:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def load(self, call_id: str) -> LoadedCall:
        if not call_id:
            raise CallNotFound("no call id")
        async with self._sessions() as session:
            row = (
                await session.exec(
                    select(Call, AgentVersion)
                    .join(
                        AgentVersion,
                        (AgentVersion.agent_id == Call.agent_id)  # type: ignore[arg-type]
                        & (AgentVersion.version == Call.agent_version),
                    )
                    .where(Call.id == call_id)
                )
            ).first()
        if row is None:
            raise CallNotFound(call_id)
        call, version = row
        if call.status == CallStatus.ENDED:
            raise CallNotFound(f"{call_id} has ended")
        variables = call.call_metadata.get("variables") or {}
        config = AgentConfig.model_validate(version.config)
        tools: list[ToolDef] = []
        if config.tools:
            async with self._sessions() as session:
                tools = await load_agent_tools(session, call.organization_id, config.tools)
        return LoadedCall(
            call_id=call.id,
            organization_id=call.organization_id,
            config=config,
            variables=dict(variables),
            join_token_hash=call.call_metadata.get("join_token_hash"),
            tools=tuple(tools),
            carrier_call_id=call.carrier_call_id,
        )


class ProviderFactory(Protocol):
    def build(self, config: AgentConfig, media_format: AudioFormat) -> Providers: ...


#: A VAD window whose every sample is below this is not run through the model (a silent
#: line: realtime/media/vad.py, "Quiet windows").
QUIET_LINE_DBFS = -50.0


class SessionFactory:
    """Everything a new call session needs, shared by all calls of this process."""

    def __init__(
        self,
        providers: ProviderFactory,
        lifecycle: Callable[[str], CallLifecycle],
        recordings_dir: Path | None,
        stats: RealtimeStats | None = None,
        vad_model: SileroModel | None = None,
        resume_state: Callable[[str], Awaitable[ResumeState]] | None = None,
    ) -> None:
        self._resume_state = resume_state
        self.stats = stats or RealtimeStats()
        self._vad_model = vad_model or SileroModel()
        self.vad_batcher = VadBatcher(self._vad_model)
        self._providers = providers
        self._lifecycle = lifecycle
        self._recordings_dir = recordings_dir

    async def create(
        self,
        call: LoadedCall,
        outbound: OutboundMedia,
        media_format: AudioFormat,
        *,
        resume: bool = False,
        frame_ms: float = 20.0,
    ) -> CallSession:
        """``resume``: the call moved here from a realtime worker that died; the session
        restores the conversation from the CallWorkflow and does not greet again."""
        state = await self._load_resume_state(call.call_id) if resume else None
        lifecycle = self._lifecycle(call.call_id)
        providers: Providers | None = None
        recorder = None
        try:
            providers = self._providers.build(call.config, media_format)
            if self._recordings_dir is not None:
                recorder = StereoRecorder(
                    self._recordings_dir / f"{call.call_id}.wav", media_format.sample_rate
                )
            vad_rate = 8000 if media_format.sample_rate == 8000 else 16000
            session = CallSession(
                CallSetup(
                    call.call_id,
                    call.config,
                    media_format,
                    call.variables,
                    frame_ms=frame_ms,
                    tools=call.tools,
                ),
                providers,
                outbound,
                lifecycle,
                vad=SileroVad(vad_rate, model=self._vad_model, quiet_below_dbfs=QUIET_LINE_DBFS),
                vad_batcher=self.vad_batcher,
                recorder=recorder,
                stats=self.stats,
            )
        except Exception as exc:
            # No session will run to give these back, nor to tell the workflow: the call
            # ends here (an agent whose voice is not installed on this server, say).
            reason = (
                EndedReason.PROVIDER_ERROR if isinstance(exc, ProviderError) else EndedReason.FAILED
            )
            log.error("call %s: no session (%s): %s", call.call_id, reason, exc)
            if providers is not None:
                providers.release()
            if recorder is not None:
                recorder.close()
            lifecycle.ended(reason)
            await lifecycle.aclose()
            raise SessionNotCreated(call.call_id, reason) from exc
        if resume:
            turns = state.turns if state is not None else []
            session.resume(rebuild(session.conversation, turns), RESUME_LINE)
            log.info("call %s resumed here with %d turns", call.call_id, len(turns))
        return session

    async def _load_resume_state(self, call_id: str) -> ResumeState | None:
        if self._resume_state is None:
            return None
        try:
            return await self._resume_state(call_id)
        except Exception as exc:  # the call goes on, without its earlier history
            log.error("call %s: no resume state from the workflow: %s", call_id, exc)
            return None

"""Provider names (as agent configs spell them) -> adapters. One line per provider.

Adapters are imported when first used: the local ones need optional extras
(`local`, `piper`) that a cloud-only deployment does not install. The cloud adapters'
SDKs are always installed and are imported when the realtime server starts
(``preload_cloud_adapters``): imported by the first call, they held the event loop - and
every other call's audio - for ~200 ms.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from builder_engine.agent_config import AgentConfig
from builder_engine.config import Settings
from realtime.providers.base import AsrProvider, AudioFormat, LlmProvider, TtsProvider
from realtime.providers.http import streaming_http_client
from realtime.providers.local_models import LocalModelCache
from realtime.providers.openai_llm import OpenAIClients
from realtime.session import Providers


@dataclass
class ProviderResources:
    """Shared by every call of one realtime process (HTTP clients, loaded models)."""

    settings: Settings
    openai_clients: OpenAIClients = field(default_factory=OpenAIClients)
    local_models: LocalModelCache = field(default_factory=LocalModelCache)
    # One connection pool for HTTP streaming TTS: a client per call would cost ~15 ms of
    # TLS set-up on the event loop each time.
    http: httpx.AsyncClient = field(
        default_factory=lambda: streaming_http_client(httpx.Timeout(10.0, connect=3.0))
    )

    async def aclose(self) -> None:
        await self.http.aclose()
        self.local_models.close()


def _deepgram(config: AgentConfig, res: ProviderResources) -> AsrProvider:
    from realtime.providers.deepgram_asr import DeepgramAsr

    return DeepgramAsr.from_config(config.asr, config.turn, res.settings)


def _whisper(config: AgentConfig, res: ProviderResources) -> AsrProvider:
    from realtime.providers.whisper_local import WhisperLocalAsr

    return WhisperLocalAsr.from_config(config.asr, res.local_models)


def _openai(config: AgentConfig, res: ProviderResources) -> LlmProvider:
    from realtime.providers.openai_llm import build_llm

    return build_llm(config.brain, res.settings, clients=res.openai_clients)


def _elevenlabs(config: AgentConfig, res: ProviderResources, fmt: AudioFormat) -> TtsProvider:
    from realtime.providers.elevenlabs_tts import ElevenLabsTts

    return ElevenLabsTts.from_config(config.tts, res.settings, fmt, http_client=res.http)


def _piper(config: AgentConfig, res: ProviderResources, fmt: AudioFormat) -> TtsProvider:
    from realtime.providers.piper_local import PiperLocalTts

    return PiperLocalTts.from_config(config.tts, res.local_models, output_format=fmt)


ASR: dict[str, Callable[[AgentConfig, ProviderResources], AsrProvider]] = {
    "deepgram": _deepgram,
    "whisper-local": _whisper,
}
LLM: dict[str, Callable[[AgentConfig, ProviderResources], LlmProvider]] = {
    "openai": _openai,
}
TTS: dict[str, Callable[[AgentConfig, ProviderResources, AudioFormat], TtsProvider]] = {
    "elevenlabs": _elevenlabs,
    "piper-local": _piper,
}


CLOUD_ADAPTERS = ("realtime.providers.deepgram_asr", "realtime.providers.elevenlabs_tts")


def preload_cloud_adapters() -> None:
    for module in CLOUD_ADAPTERS:
        importlib.import_module(module)


class ProviderRegistry:
    def __init__(self, resources: ProviderResources) -> None:
        self.resources = resources

    def build(self, config: AgentConfig, media_format: AudioFormat) -> Providers:
        """The agent's providers; TTS speaks the transport's format (no transcoding)."""
        return Providers(
            asr=ASR[config.asr.provider](config, self.resources),
            llm=LLM[config.brain.provider](config, self.resources),
            tts=TTS[config.tts.provider](config, self.resources, media_format),
        )

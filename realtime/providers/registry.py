"""Provider names (as agent configs spell them) -> adapters. One line per provider.

Adapters are imported when first used: the local ones need optional extras
(`local`, `piper`) that a cloud-only deployment does not install. The cloud adapters'
SDKs are always installed and are imported when the realtime server starts
(``preload_cloud_adapters``): imported by the first call, they held the event loop - and
every other call's audio - for ~200 ms.
"""

from __future__ import annotations

import importlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from builder_engine.agent_config import AgentConfig
from builder_engine.config import Settings
from realtime.providers.base import AsrProvider, AudioFormat, LlmProvider, TtsProvider
from realtime.providers.http import CallPools, shared_tls_context, streaming_http_client
from realtime.providers.local_models import LocalModelCache
from realtime.providers.openai_llm import OpenAIClients
from realtime.session import Providers


@dataclass
class ProviderResources:
    """Shared by every call of one realtime process (HTTP clients, loaded models)."""

    settings: Settings
    local_models: LocalModelCache = field(default_factory=LocalModelCache)
    #: Which connection pool each call uses: a few calls per pool (realtime/providers/http.py).
    pools: CallPools = field(default_factory=CallPools)
    tls: ssl.SSLContext = field(default_factory=shared_tls_context)
    openai_clients: OpenAIClients = field(init=False)
    # HTTP streaming TTS clients, one per pool of calls: a client per call would cost a
    # cold pool (TCP and TLS handshakes on the event loop) each time.
    _http: dict[int, httpx.AsyncClient] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.openai_clients = OpenAIClients(tls=self.tls)

    def http(self, pool: int = 0) -> httpx.AsyncClient:
        """The streaming HTTP client of connection pool ``pool``."""
        client = self._http.get(pool)
        if client is None:
            client = streaming_http_client(httpx.Timeout(10.0, connect=3.0), tls=self.tls)
            self._http[pool] = client
        return client

    async def aclose(self) -> None:
        clients, self._http = list(self._http.values()), {}
        for client in clients:
            await client.aclose()
        await self.openai_clients.aclose()
        self.local_models.close()


def _deepgram(config: AgentConfig, res: ProviderResources, pool: int) -> AsrProvider:
    from realtime.providers.deepgram_asr import DeepgramAsr

    return DeepgramAsr.from_config(config.asr, config.turn, res.settings)


def _whisper(config: AgentConfig, res: ProviderResources, pool: int) -> AsrProvider:
    from realtime.providers.whisper_local import WhisperLocalAsr

    return WhisperLocalAsr.from_config(config.asr, res.local_models)


def _openai(config: AgentConfig, res: ProviderResources, pool: int) -> LlmProvider:
    from realtime.providers.openai_llm import build_llm

    return build_llm(config.brain, res.settings, clients=res.openai_clients, pool=pool)


def _elevenlabs(
    config: AgentConfig, res: ProviderResources, fmt: AudioFormat, pool: int
) -> TtsProvider:
    from realtime.providers.elevenlabs_tts import ElevenLabsTts

    return ElevenLabsTts.from_config(config.tts, res.settings, fmt, http_client=res.http(pool))


def _piper(config: AgentConfig, res: ProviderResources, fmt: AudioFormat, pool: int) -> TtsProvider:
    from realtime.providers.piper_local import PiperLocalTts

    return PiperLocalTts.from_config(config.tts, res.local_models, output_format=fmt)


#: Each factory gets the call's connection pool number (``ProviderResources.pools``).
ASR: dict[str, Callable[[AgentConfig, ProviderResources, int], AsrProvider]] = {
    "deepgram": _deepgram,
    "whisper-local": _whisper,
}
LLM: dict[str, Callable[[AgentConfig, ProviderResources, int], LlmProvider]] = {
    "openai": _openai,
}
TTS: dict[str, Callable[[AgentConfig, ProviderResources, AudioFormat, int], TtsProvider]] = {
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
        """The agent's providers for one call; TTS speaks the transport's format (no
        transcoding). The call's session releases them (``Providers.release``) at its end."""
        res = self.resources
        lease = res.pools.lease()
        try:
            return Providers(
                asr=ASR[config.asr.provider](config, res, lease.pool),
                llm=LLM[config.brain.provider](config, res, lease.pool),
                tts=TTS[config.tts.provider](config, res, media_format, lease.pool),
                release=lease.release,
            )
        except BaseException:
            lease.release()
            raise

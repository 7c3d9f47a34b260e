"""Calls spread over small connection pools (realtime/providers/http.py): which pool a
call gets, that it gives it back, and that the providers of one call use its pool."""

from __future__ import annotations

import ssl

import pytest

from builder_engine.agent_config import AgentConfig
from builder_engine.config import Settings
from realtime.providers.base import AudioFormat
from realtime.providers.http import CallPools
from realtime.providers.openai_llm import OpenAILlm, ResilientLlm
from realtime.providers.registry import ProviderRegistry, ProviderResources
from realtime.session import Providers

MULAW_8K = AudioFormat("mulaw", 8000)


def test_calls_fill_the_first_pool_with_room() -> None:
    pools = CallPools(calls_per_pool=3)
    leases = [pools.lease() for _ in range(7)]
    assert [lease.pool for lease in leases] == [0, 0, 0, 1, 1, 1, 2]
    assert pools.calls == [3, 3, 1]
    leases[1].release()
    leases[1].release()  # twice is once
    assert pools.calls == [2, 3, 1]
    assert pools.lease().pool == 0  # the warm pool first
    leases[6].release()
    assert pools.lease().pool == 2  # a pool without calls keeps its place
    with pytest.raises(ValueError):
        CallPools(calls_per_pool=0)


def _llm_client(providers: Providers) -> object:
    llm = providers.llm
    assert isinstance(llm, ResilientLlm) and isinstance(llm.primary, OpenAILlm)
    return llm.primary._client


async def test_a_call_uses_its_pool_and_gives_it_back() -> None:
    """Calls one to eight share the first pool's clients (warm connections), the ninth
    gets the second's, and a call that ends makes room in its pool. All clients share
    the process's one TLS context."""
    settings = Settings(
        openai_api_key="sk-test",
        deepgram_api_key="dg-test",
        elevenlabs_api_key="el-test",
        _env_file=None,
    )
    resources = ProviderResources(settings, pools=CallPools(calls_per_pool=8))
    registry = ProviderRegistry(resources)
    config = AgentConfig(name="Front desk")
    try:
        calls = [registry.build(config, MULAW_8K) for _ in range(9)]
        assert resources.pools.calls == [8, 1]
        first, ninth = calls[0], calls[8]
        assert all(c.tts._http is first.tts._http for c in calls[:8])  # type: ignore[attr-defined]
        assert ninth.tts._http is not first.tts._http  # type: ignore[attr-defined]
        assert all(_llm_client(c) is _llm_client(first) for c in calls[:8])
        assert _llm_client(ninth) is not _llm_client(first)
        assert isinstance(resources.tls, ssl.SSLContext)
        for client in (resources.http(0), resources.http(1)):
            assert client._transport._pool._ssl_context is resources.tls  # type: ignore[attr-defined]

        calls[3].release()
        calls[3].release()
        assert resources.pools.calls == [7, 1]
        again = registry.build(config, MULAW_8K)
        assert again.tts._http is first.tts._http  # type: ignore[attr-defined]
        assert resources.pools.calls == [8, 1]
    finally:
        await resources.aclose()

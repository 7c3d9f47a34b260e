"""ElevenLabs streaming text-to-speech (HTTP ``/v1/text-to-speech/{voice}/stream``) through
the official SDK.

Phone calls take ``ulaw_8000`` straight from ElevenLabs (no transcoding on our side);
browser calls take ``pcm_16000``. Audio is handed on as it arrives, cut into
``chunk_ms`` pieces so a piece never splits a 16-bit sample. One ``ElevenLabsTts`` is
meant to be shared by the calls of an agent: it owns the HTTP connection pool, which
keeps TLS sessions to ElevenLabs warm between sentences. Close it with ``aclose()``.
When providers are built per call, inject one shared ``httpx.AsyncClient`` instead
(``http_client=``): the provider is then a few microseconds to build and owns nothing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import Any, Final, Self, cast

import httpx
from elevenlabs import VoiceSettings
from elevenlabs.client import AsyncElevenLabs
from elevenlabs.core.api_error import ApiError

from builder_engine.agent_config import TtsConfig
from builder_engine.config import Settings
from realtime.providers.base import MULAW_8K, AudioFormat, ProviderError
from realtime.providers.http import streaming_http_client

__all__ = ["DEFAULT_MODEL", "DEFAULT_VOICE", "ElevenLabsTts", "elevenlabs_output_format"]

NAME: Final = "elevenlabs"
DEFAULT_VOICE: Final = "21m00Tcm4TlvDq8ikWAM"  # "Rachel", a premade voice every account has
DEFAULT_MODEL: Final = "eleven_flash_v2_5"  # ElevenLabs' lowest-latency model
_PCM_RATES: Final = frozenset({8000, 16000, 22050, 24000, 44100})


def elevenlabs_output_format(audio: AudioFormat) -> str:
    """ElevenLabs' name for a raw audio format (``ulaw_8000``, ``pcm_16000``, ...)."""
    if audio.channels == 1:
        if audio.encoding == "mulaw" and audio.sample_rate == 8000:
            return "ulaw_8000"
        if audio.encoding == "pcm16" and audio.sample_rate in _PCM_RATES:
            return f"pcm_{audio.sample_rate}"
    raise ValueError(f"ElevenLabs has no raw output format for {audio}")


class ElevenLabsTts:
    """``TtsProvider`` for ElevenLabs."""

    name = NAME

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        voice: str = DEFAULT_VOICE,
        model: str = DEFAULT_MODEL,
        output: AudioFormat = MULAW_8K,
        speed: float = 1.0,
        chunk_ms: float = 20.0,
        timeout_s: float = 10.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if not api_key:
            raise ProviderError(NAME, "no API key configured", retryable=False)
        self.output_format: AudioFormat = output
        self._format_name = elevenlabs_output_format(output)
        self.voice = voice
        self.model = model
        self.speed = speed
        bytes_per_sample = 1 if output.encoding == "mulaw" else 2
        samples = max(1, round(chunk_ms / 1000.0 * output.sample_rate))
        self._chunk_bytes = samples * bytes_per_sample * output.channels
        self._owns_http = http_client is None
        self._http = http_client or streaming_http_client()
        kwargs: dict[str, Any] = {"base_url": base_url.rstrip("/")} if base_url else {}
        self._client = AsyncElevenLabs(
            api_key=api_key, timeout=timeout_s, httpx_client=self._http, **kwargs
        )

    @classmethod
    def from_config(
        cls,
        tts: TtsConfig,
        settings: Settings,
        output: AudioFormat,
        *,
        http_client: httpx.AsyncClient | None = None,
    ) -> ElevenLabsTts:
        """The agent's TTS settings; its ``base_url`` wins over ``ELEVENLABS_BASE_URL``.

        Pass the process's shared ``http_client`` when building one provider per call:
        an own client costs ~15 ms of blocked loop (TLS certificates) and a cold pool.
        """
        key = settings.elevenlabs_api_key
        if key is None or not key.get_secret_value():
            raise ProviderError(NAME, "ELEVENLABS_API_KEY is not set", retryable=False)
        return cls(
            api_key=key.get_secret_value(),
            base_url=str(tts.base_url) if tts.base_url else settings.elevenlabs_base_url,
            voice=tts.voice or DEFAULT_VOICE,
            model=tts.model or DEFAULT_MODEL,
            output=output,
            speed=tts.speed,
            http_client=http_client,
        )

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        """Stream ``text`` as audio; closing or cancelling the iteration closes the request."""
        if not text.strip():
            return
        settings = VoiceSettings(speed=self.speed) if self.speed != 1.0 else None
        # The SDK's stream is an async generator; it is typed as a plain iterator.
        chunks = cast(
            AsyncGenerator[bytes, None],
            self._client.text_to_speech.stream(
                self.voice,
                text=text,
                model_id=self.model,
                output_format=self._format_name,
                voice_settings=settings,
                request_options={"chunk_size": self._chunk_bytes},
            ),
        )
        try:
            async for chunk in chunks:
                yield chunk
        except ApiError as exc:
            raise _api_error(exc) from exc
        except httpx.HTTPError as exc:
            raise ProviderError(NAME, f"request failed: {exc!r}") from exc
        finally:
            # Leaving early (cancel, aclose) must drop the HTTP stream now, not at GC.
            await chunks.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _api_error(exc: ApiError) -> ProviderError:
    status = exc.status_code or 0
    body = exc.body
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        message = str(detail.get("message") or detail.get("status") or detail)
    else:
        message = str(detail if detail is not None else body)
    # Bad key, bad voice or bad text will fail again; overload and outages may not.
    retryable = status >= 500 or status == 429
    return ProviderError(NAME, f"HTTP {status}: {message}", retryable=retryable)

"""Platform settings, read from ``BUILDER_*`` environment variables and a ``.env`` file.

This class is the single source of truth for configuration: docs/configuration.md is
generated from it (``builder-engine config-docs``) and a test fails when the two drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Temporal search attributes the platform registers (name -> Temporal type).
SEARCH_ATTRIBUTES: dict[str, str] = {
    "BuilderCallStatus": "Keyword",
    "BuilderAgentId": "Keyword",
    "BuilderDirection": "Keyword",
    "BuilderCampaignId": "Keyword",
    "BuilderEndedReason": "Keyword",
}


class Settings(BaseSettings):
    """Builder Engine configuration. Every field maps to one environment variable."""

    model_config = SettingsConfigDict(
        env_prefix="BUILDER_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    data_dir: Path = Field(
        default=Path("data"),
        description="Folder for everything the platform keeps on disk by default: "
        "SQLite database, Temporal dev server database, Qdrant local store, recordings.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the SQL database. Unset: a SQLite file in the data "
        "folder. `postgresql://...` or `postgresql+psycopg://...` switches to PostgreSQL.",
    )
    temporal_address: str | None = Field(
        default=None,
        description="host:port of an existing Temporal frontend. Unset: `builder-engine up` "
        "starts the Temporal dev server itself on 127.0.0.1:7233.",
    )
    temporal_namespace: str = Field(default="default", description="Temporal namespace.")
    temporal_task_queue: str = Field(
        default="builder-engine", description="Task queue of the platform's Temporal worker."
    )
    temporal_ui_port: int = Field(
        default=8233,
        description="Port of the dev server's Web UI (only when Temporal is embedded).",
    )
    temporal_port: int = Field(
        default=7233, description="Port of the embedded Temporal dev server's frontend."
    )
    worker_metrics_address: str | None = Field(
        default=None,
        description="host:port where the Temporal worker serves its SDK's Prometheus metrics "
        "(`/metrics`: workflow task and activity latencies, free task slots). Unset: none.",
    )
    host: str = Field(
        default="127.0.0.1", description="Interface the API and realtime servers bind."
    )
    api_port: int = Field(default=8000, description="Port of the REST API.")
    realtime_port: int = Field(default=8001, description="Port of the realtime (media) server.")
    public_url: str | None = Field(
        default=None,
        description="Public base URL (https://...) carriers use to reach this deployment; "
        "used in TwiML and webhook URLs. Unset: http://{host}:{api_port}.",
    )
    realtime_public_url: str | None = Field(
        default=None,
        description="Public base URL (wss://...) carriers stream call audio to. Unset: the "
        "public URL with a ws(s) scheme (a reverse proxy sends /media/* to the realtime "
        "server), or ws://{host}:{realtime_port} when no public URL is set.",
    )
    realtime_max_calls: int | None = Field(
        default=None,
        ge=1,
        description="Concurrent calls one realtime process takes; a new call's media "
        "stream beyond it is refused with close code 1013 (Twilio then streams the call "
        "again, through a load balancer to another process; a web client reconnects). "
        "Unset: no cap. Size it from bench/realtime_calls.py on the machine "
        "(docs/performance.md).",
    )
    realtime_lost_after_s: float = Field(
        default=3.0,
        ge=2.0,
        le=600.0,
        description="A realtime process whose liveness beats (one a second) stop this long "
        "is presumed dead, and its live calls are moved to a healthy one. Shorter: faster "
        "recovery; longer: a process stalled for a while (a paused VM, a host starved of "
        "CPU) keeps its calls instead of having them moved.",
    )
    realtime_ready_max_loop_lag_ms: float | None = Field(
        default=10.0,
        gt=0,
        description="GET /readyz on the realtime server answers 503 while its event loop "
        "runs later than this (a 20 ms timer's lag, smoothed over ~2 s) or it is at "
        "BUILDER_REALTIME_MAX_CALLS: for load balancers and readiness probes to send new "
        "calls elsewhere. Unset: the lag is not checked. On the 2-core test machine the "
        "smoothed lag stayed near 1 ms at 30 calls (platform overhead p95 4 ms) and near 13 "
        "ms at 60 (p95 over 300 ms): docs/performance.md.",
    )
    turn_batch_s: float = Field(
        default=5.0,
        ge=0.0,
        description="Longest a caller's committed turn waits in the realtime process for "
        "the agent's answer, to reach the call's workflow with it in one signal (one "
        "workflow task per exchange instead of per turn). A realtime process that dies "
        "loses at most the exchange in progress; the call resumes from the rest.",
    )
    recordings_dir: Path | None = Field(
        default=None, description="Folder for call recordings. Unset: {data_dir}/recordings."
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL. When set, API rate limits are shared through Redis across "
        "API replicas; otherwise they are kept in process.",
    )
    qdrant_url: str | None = Field(
        default=None,
        description="Qdrant server URL. Unset: Qdrant local mode in the data folder.",
    )
    recordings_url: str | None = Field(
        default=None,
        description="Where recordings go: unset for the data folder, or an S3-compatible "
        "`s3://bucket/prefix` URL.",
    )
    rate_limit_per_minute: int = Field(
        default=600, ge=1, description="API requests allowed per organization per minute."
    )
    rate_limit_burst: int = Field(
        default=100,
        ge=1,
        description="Requests an organization may send at once before the rate applies.",
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest request body the API accepts (413 above)."
    )
    log_level: str = Field(default="info", description="Log level of every process.")
    log_redact_pii: bool = Field(
        default=True, description="Mask phone numbers and e-mail addresses in logs."
    )
    twilio_account_sid: str | None = Field(default=None, description="Twilio account SID.")
    twilio_auth_token: SecretStr | None = Field(
        default=None,
        description=(
            "Twilio auth token: validates X-Twilio-Signature (the API's Twilio webhooks and "
            "the realtime server's `/media/twilio` handshake; set it on both) and calls "
            "Twilio's REST API."
        ),
    )
    twilio_api_base_url: str | None = Field(
        default=None,
        description="Base URL of Twilio's REST API (default https://api.twilio.com); "
        "tests point it at the emulator.",
    )
    openai_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_API_KEY", "BUILDER_OPENAI_API_KEY"),
        description="API key of the OpenAI(-compatible) LLM endpoint.",
    )
    openai_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_BASE_URL", "BUILDER_OPENAI_BASE_URL"),
        description="Base URL of an OpenAI-compatible endpoint (Groq, vLLM, Ollama, llama.cpp).",
    )
    deepgram_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("DEEPGRAM_API_KEY", "BUILDER_DEEPGRAM_API_KEY"),
        description="Deepgram API key (streaming ASR).",
    )
    deepgram_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DEEPGRAM_BASE_URL", "BUILDER_DEEPGRAM_BASE_URL"),
        description="Override of Deepgram's endpoint (self-hosted, regional, emulator).",
    )
    elevenlabs_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("ELEVENLABS_API_KEY", "BUILDER_ELEVENLABS_API_KEY"),
        description="ElevenLabs API key (streaming TTS).",
    )
    elevenlabs_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ELEVENLABS_BASE_URL", "BUILDER_ELEVENLABS_BASE_URL"),
        description="Override of ElevenLabs' endpoint.",
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError("must be one of critical, error, warning, info, debug")
        return level

    @property
    def sync_database_url(self) -> str:
        """URL for synchronous use (Alembic, CLI)."""
        return to_sync_url(self.database_url or self.default_sqlite_url)

    @property
    def async_database_url(self) -> str:
        """URL for the async engine the API uses."""
        return to_async_url(self.database_url or self.default_sqlite_url)

    @property
    def default_sqlite_url(self) -> str:
        return f"sqlite:///{(self.data_dir / 'builder.db').resolve()}"

    @property
    def embedded_temporal(self) -> bool:
        return self.temporal_address is None

    @property
    def effective_temporal_address(self) -> str:
        return self.temporal_address or f"127.0.0.1:{self.temporal_port}"

    @property
    def effective_public_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.api_port}").rstrip("/")

    @property
    def effective_realtime_url(self) -> str:
        if self.realtime_public_url:
            return self.realtime_public_url.rstrip("/")
        if self.public_url:
            scheme, _, rest = self.public_url.rstrip("/").partition("://")
            return f"{'wss' if scheme == 'https' else 'ws'}://{rest}"
        return f"ws://{self.host}:{self.realtime_port}"

    @property
    def effective_recordings_dir(self) -> Path:
        return self.recordings_dir or self.data_dir / "recordings"

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict safe to print: secrets show only whether they are set."""
        shown: dict[str, Any] = {}
        for name, value in self:
            if isinstance(value, SecretStr):
                shown[name] = "set" if value.get_secret_value() else "unset"
            elif name.endswith("_url") and isinstance(value, str):
                shown[name] = redact_url(value)
            else:
                shown[name] = value
        return shown


def to_sync_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+", 1)[0]
    if base in {"postgresql", "postgres"}:
        return f"postgresql+psycopg{sep}{rest}"
    if base == "sqlite":
        return f"sqlite{sep}{rest}"
    return url


def to_async_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+", 1)[0]
    if base in {"postgresql", "postgres"}:
        # psycopg 3 serves both the sync and the async engine.
        return f"postgresql+psycopg{sep}{rest}"
    if base == "sqlite":
        return f"sqlite+aiosqlite{sep}{rest}"
    return url


def redact_url(url: str) -> str:
    """Hide the password of a URL such as postgresql://user:secret@host/db."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, location = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{location}" if ":" in credentials else url


def env_name(field_name: str) -> str:
    """The environment variable that sets a settings field (first alias wins)."""
    field = Settings.model_fields[field_name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return str(first)
    return f"BUILDER_{field_name.upper()}"

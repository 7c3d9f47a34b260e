"""The ``builder-engine`` command line: run, inspect and administer the platform."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Union, get_args, get_origin
from urllib.parse import urlsplit

import typer
from pydantic import SecretStr, ValidationError

from builder_engine.config import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

app = typer.Typer(
    name="builder-engine",
    help="Builder Engine: self-hosted AI voice agents with durable Temporal workflows.",
    no_args_is_help=True,
    add_completion=False,
)
serve_app = typer.Typer(help="Run one server process.", no_args_is_help=True)
api_key_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(api_key_app, name="api-key")

DEFAULT_CONFIG_DOCS = Path("docs/configuration.md")


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the command line's non-None options on top."""
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as err:
        typer.echo(f"invalid configuration:\n{err}", err=True)
        raise typer.Exit(2) from err


def hard_exit(code: int) -> NoReturn:
    """End the process without interpreter finalization.

    A process that used a Temporal client or worker may abort at interpreter exit
    (temporalio sdk-python issue #300). Everything was shut down cleanly before this.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


@app.command()
def up(
    temporal_address: Annotated[
        str | None,
        typer.Option(help="host:port of an existing Temporal cluster (default: embedded)."),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder for the platform's data.")] = None,
    api_port: Annotated[int | None, typer.Option(help="Port of the REST API.")] = None,
    realtime_port: Annotated[int | None, typer.Option(help="Port of the realtime server.")] = None,
    temporal_port: Annotated[
        int | None, typer.Option(help="Port of the embedded Temporal dev server.")
    ] = None,
    temporal_ui_port: Annotated[
        int | None, typer.Option(help="Port of the embedded Temporal Web UI.")
    ] = None,
) -> None:
    """Run the whole platform on this machine: Temporal, migrations, API, realtime, worker."""
    from workers.supervisor import Supervisor

    settings = load_settings(
        temporal_address=temporal_address,
        data_dir=data_dir,
        api_port=api_port,
        realtime_port=realtime_port,
        temporal_port=temporal_port,
        temporal_ui_port=temporal_ui_port,
    )
    hard_exit(asyncio.run(Supervisor(settings).run()))


@app.command()
def doctor() -> None:
    """Show the configuration (no secrets), what is reachable and which providers are set up."""
    hard_exit(run_doctor(load_settings()))


@api_key_app.command("create")
def api_key_create(
    org: Annotated[str, typer.Option("--org", help="Organization name (created if missing).")],
) -> None:
    """Create an API key for an organization and print it (shown once)."""
    from builder_engine.apikeys import create_org_api_key

    key = create_org_api_key(load_settings(), org)
    typer.echo("Store this key now; it is shown once.")
    typer.echo(key)


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (Alembic migrations to head)."""
    from builder_engine.db.migrate import upgrade

    settings = load_settings()
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings)
    typer.echo("database schema is up to date")


def _serve(
    application: FastAPI, port: int, settings: Settings, *, realtime: bool = False
) -> NoReturn:
    import gc

    import uvicorn

    from builder_engine.logs import configure_logging

    configure_logging(settings.log_level, redact_pii=settings.log_redact_pii)
    config = uvicorn.Config(
        app=application,
        host=settings.host,
        port=port,
        log_level=settings.log_level,
        ws="websockets-sansio",
    )
    server = uvicorn.Server(config)
    if realtime:
        # The audio loop allocates small objects at 50 frames a second per call; with the
        # default thresholds the cyclic collector runs hundreds of times a second and its
        # full passes walk every object the imports made. Those are frozen out of its
        # sight, and it runs a tenth as often.
        gc.collect()
        gc.freeze()
        gc.set_threshold(7000, 20, 20)
    # Uvicorn re-raises the signal it shut down on; after a clean shutdown, exit 0 instead.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    hard_exit(0 if server.started else 3)


@serve_app.command("api")
def serve_api() -> None:
    """Run the REST API (uvicorn) on BUILDER_HOST:BUILDER_API_PORT."""
    from api.app import create_app

    settings = load_settings()
    _serve(create_app(settings), settings.api_port, settings)


@serve_app.command("realtime")
def serve_realtime() -> None:
    """Run the realtime media server (uvicorn) on BUILDER_HOST:BUILDER_REALTIME_PORT."""
    from realtime.app import create_app

    settings = load_settings()
    _serve(
        create_app(settings, collect_garbage=True), settings.realtime_port, settings, realtime=True
    )


@app.command()
def worker() -> None:
    """Run the platform's Temporal worker until SIGTERM/SIGINT."""
    from builder_engine.logs import configure_logging

    settings = load_settings()
    configure_logging(settings.log_level, redact_pii=settings.log_redact_pii)
    hard_exit(asyncio.run(_run_worker(settings)))


async def _run_worker(settings: Settings) -> int:
    from workers.temporal_worker import run_worker

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = asyncio.create_task(run_worker(settings), name="worker")
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not running.done():
        typer.echo("worker stopping")
        running.cancel()
    stopping.cancel()
    try:
        await running
    except asyncio.CancelledError:
        typer.echo("worker stopped")
        return 0
    except Exception:
        traceback.print_exc()
        typer.echo("worker failed", err=True)
        return 1
    return 0


@app.command("config-docs")
def config_docs(
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 if the file differs from the generated text.")
    ] = False,
    output: Annotated[Path, typer.Option(help="Where the page goes.")] = DEFAULT_CONFIG_DOCS,
) -> None:
    """Generate docs/configuration.md from the Settings class."""
    text = render_config_docs()
    if check:
        current = output.read_text(encoding="utf-8") if output.exists() else None
        if current != text:
            typer.echo(f"{output} is out of date: run `builder-engine config-docs`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{output} is up to date")
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {output}")


# --- doctor -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One reachability check of ``doctor``; ``ok`` is None when it does not apply."""

    name: str
    target: str
    ok: bool | None
    required: bool
    detail: str


def secret_values(settings: Settings) -> list[str]:
    """Every secret the settings hold: secret fields and passwords inside URLs."""
    found: list[str] = []
    for name, value in settings:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, str) and name.endswith("_url"):
            with contextlib.suppress(ValueError):
                found.append(urlsplit(value).password or "")
    return sorted({v for v in found if v}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _error_text(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def check_database(settings: Settings) -> Check:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    url = make_url(settings.sync_database_url)
    target = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    database = url.database or ""
    if backend == "sqlite" and database not in {"", ":memory:"} and not Path(database).exists():
        return Check(
            "database",
            target,
            False,
            True,
            "no database file yet: run `builder-engine migrate` (or `up`)",
        )
    connect_args: dict[str, Any] = {"connect_timeout": 3} if backend == "postgresql" else {}
    engine = create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            try:
                version = connection.execute(
                    text("SELECT version_num FROM alembic_version")
                ).scalar()
            except SQLAlchemyError:
                version = None
    except Exception as err:
        return Check("database", target, False, True, _error_text(err))
    finally:
        engine.dispose()
    detail = f"schema at migration {version}" if version else "reachable; no migration applied"
    return Check("database", target, True, True, detail)


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


async def _probe_temporal(settings: Settings) -> str:
    from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest

    from builder_engine.config import SEARCH_ATTRIBUTES
    from builder_engine.temporal_setup import connect

    client = await connect(settings, within=3.0)
    listed = await asyncio.wait_for(
        client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=settings.temporal_namespace)
        ),
        3.0,
    )
    missing = [name for name in SEARCH_ATTRIBUTES if name not in listed.custom_attributes]
    detail = f"namespace {settings.temporal_namespace}"
    if missing:
        return f"{detail}; search attributes not registered yet: {', '.join(missing)}"
    return f"{detail}; search attributes registered"


def check_temporal(settings: Settings) -> Check:
    address = settings.effective_temporal_address
    if settings.embedded_temporal and not _port_open("127.0.0.1", settings.temporal_port):
        return Check(
            "temporal",
            address,
            None,
            False,
            "embedded dev server not running (`builder-engine up` starts it)",
        )
    try:
        detail = asyncio.run(_probe_temporal(settings))
    except Exception as err:
        return Check("temporal", address, False, True, _error_text(err))
    return Check("temporal", address, True, True, detail)


def check_redis(settings: Settings) -> Check | None:
    if not settings.redis_url:
        return None
    import redis

    from builder_engine.config import redact_url

    target = redact_url(settings.redis_url)
    try:
        client = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=2
        )
        try:
            client.ping()
        finally:
            client.close()
    except Exception as err:
        return Check("redis", target, False, True, _error_text(err))
    return Check("redis", target, True, True, "PING answered")


def provider_status(settings: Settings) -> list[tuple[str, str, str]]:
    """(provider, configured/missing, note) for each cloud provider."""

    def state(*values: object) -> str:
        return "configured" if all(values) else "missing"

    def override(url: str | None) -> str:
        return f"endpoint {url}" if url else ""

    twilio_note = ""
    if settings.twilio_account_sid and not settings.twilio_auth_token:
        twilio_note = "auth token missing"
    elif settings.twilio_auth_token and not settings.twilio_account_sid:
        twilio_note = "account SID missing"
    return [
        ("openai", state(settings.openai_api_key), override(settings.openai_base_url)),
        ("deepgram", state(settings.deepgram_api_key), override(settings.deepgram_base_url)),
        ("elevenlabs", state(settings.elevenlabs_api_key), override(settings.elevenlabs_base_url)),
        ("twilio", state(settings.twilio_account_sid, settings.twilio_auth_token), twilio_note),
    ]


def _shown(value: object) -> str:
    return "unset" if value is None else str(value)


def run_doctor(settings: Settings) -> int:
    """Print the report; 0 when every required service is reachable, else 1."""
    from rich.console import Console
    from rich.table import Table

    from builder_engine.config import env_name

    secrets = secret_values(settings)
    console = Console(width=None if sys.stdout.isatty() else 140)

    config = Table(title="Configuration")
    for column in ("setting", "environment variable", "value"):
        config.add_column(column)
    for name, value in settings.redacted().items():
        config.add_row(name, env_name(name), scrub(_shown(value), secrets))

    checks = [check_database(settings), check_temporal(settings)]
    redis_check = check_redis(settings)
    if redis_check is not None:
        checks.append(redis_check)
    services = Table(title="Services")
    for column in ("service", "address", "status", "detail"):
        services.add_column(column)
    labels = {True: "[green]reachable[/]", False: "[red]unreachable[/]", None: "[dim]n/a[/]"}
    for check in checks:
        label = labels[check.ok]
        if check.ok is False and not check.required:
            label = "[yellow]unreachable (optional)[/]"
        services.add_row(
            check.name, scrub(check.target, secrets), label, scrub(check.detail, secrets)
        )

    providers = Table(title="Providers")
    for column in ("provider", "credentials", "note"):
        providers.add_column(column)
    for provider, state, note in provider_status(settings):
        colour = "green" if state == "configured" else "yellow"
        providers.add_row(provider, f"[{colour}]{state}[/]", scrub(note, secrets))

    for table in (config, services, providers):
        console.print(table)
    failed = [c.name for c in checks if c.required and c.ok is False]
    if failed:
        console.print(f"[red]not ready:[/] {', '.join(failed)} unreachable")
        return 1
    console.print("[green]all required services are reachable[/]")
    return 0


# --- config-docs --------------------------------------------------------------------------

_TYPE_NAMES: dict[object, str] = {
    str: "string",
    int: "integer",
    bool: "boolean",
    float: "number",
    Path: "path",
    SecretStr: "secret",
}


def _type_label(annotation: object) -> str:
    if get_origin(annotation) in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
    else:
        members = [annotation]
    return " or ".join(_TYPE_NAMES.get(m, getattr(m, "__name__", str(m))) for m in members)


def _default_label(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, Path):
        return f"`{value.as_posix()}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_config_docs() -> str:
    """docs/configuration.md, generated from the Settings class."""
    from pydantic import AliasChoices

    from builder_engine.config import SEARCH_ATTRIBUTES, env_name

    attributes = ", ".join(f"`{name}` ({kind})" for name, kind in SEARCH_ATTRIBUTES.items())
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `builder-engine config-docs` from builder_engine/config.py; do not",
        "     edit by hand. `builder-engine config-docs --check` fails when it is out of date. -->",
        "",
        "Every setting is read from an environment variable, or from a `.env` file in the",
        "working directory (the environment wins). `builder-engine up` also takes",
        "`--data-dir`, `--api-port`, `--realtime-port`, `--temporal-address`, `--temporal-port`",
        "and `--temporal-ui-port`, which override the variables for that run.",
        "`builder-engine doctor` shows the configuration in effect and what is reachable.",
        "",
        "Settings of type *secret* are never printed: `doctor` and the logs only say whether",
        "they are set.",
        "",
        "| Variable | Type | Default | Description |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        description = field.description or ""
        alias = field.validation_alias
        if isinstance(alias, AliasChoices) and len(alias.choices) > 1:
            others = ", ".join(f"`{choice}`" for choice in alias.choices[1:])
            description += f" Also read from {others}."
        for item in field.metadata:
            minimum = getattr(item, "ge", None)
            if minimum is not None:
                description += f" At least {minimum}."
        kind = _type_label(field.annotation)
        default = "unset" if kind == "secret" else _default_label(field.default)
        lines.append(
            f"| `{env_name(name)}` | {kind} | {_cell(default)} | {_cell(description.strip())} |"
        )
    lines += [
        "",
        "On its Temporal namespace the platform registers these search attributes "
        f"(`builder-engine up` does it): {attributes}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    app()


if __name__ == "__main__":
    main()

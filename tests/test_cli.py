"""The ``builder-engine`` CLI: generated configuration docs, doctor, up's port checks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from ports import free_port
from typer.testing import CliRunner

from workers.cli import app, render_config_docs

REPO = Path(__file__).resolve().parents[1]
CONFIG_DOCS = REPO / "docs" / "configuration.md"
SECRET_ENV = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "DEEPGRAM_API_KEY",
    "DEEPGRAM_BASE_URL",
    "ELEVENLABS_API_KEY",
    "ELEVENLABS_BASE_URL",
)


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without any platform setting, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("BUILDER_") and key not in SECRET_ENV
    }
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_config_docs_check_passes_on_committed_docs() -> None:
    result = CliRunner().invoke(app, ["config-docs", "--check", "--output", str(CONFIG_DOCS)])
    assert result.exit_code == 0, result.output
    assert CONFIG_DOCS.read_text(encoding="utf-8") == render_config_docs()


def test_config_docs_check_fails_when_stale(tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    runner = CliRunner()
    assert runner.invoke(app, ["config-docs", "--output", str(page)]).exit_code == 0
    assert runner.invoke(app, ["config-docs", "--check", "--output", str(page)]).exit_code == 0
    page.write_text(page.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    result = runner.invoke(app, ["config-docs", "--check", "--output", str(page)])
    assert result.exit_code == 1


def test_config_docs_cover_every_setting() -> None:
    from builder_engine.config import Settings, env_name

    text = render_config_docs()
    for name in Settings.model_fields:
        assert f"| `{env_name(name)}` |" in text
    assert "| `OPENAI_API_KEY` | secret | unset |" in text


def test_doctor_prints_no_secret(tmp_path: Path) -> None:
    secrets = {
        "OPENAI_API_KEY": "sk-secret-value",
        "BUILDER_TWILIO_AUTH_TOKEN": "twilio-secret-token",
        "BUILDER_DATABASE_URL": f"postgresql://builder:db-secret-pw@127.0.0.1:{free_port()}/x",
        "BUILDER_REDIS_URL": f"redis://:redis-secret-pw@127.0.0.1:{free_port()}/0",
    }
    env = clean_env(
        BUILDER_DATA_DIR=str(tmp_path / "data"),
        BUILDER_TEMPORAL_PORT=str(free_port()),
        BUILDER_TWILIO_ACCOUNT_SID="AC123",
        **secrets,
    )
    result = run_cli("doctor", env=env)
    output = result.stdout + result.stderr
    for needle in ("sk-secret-value", "twilio-secret-token", "db-secret-pw", "redis-secret-pw"):
        assert needle not in output
    assert result.returncode == 1  # nothing listens where the database and Redis are said to be
    lines = {line.split()[1]: line for line in output.splitlines() if line.startswith("│")}
    assert "configured" in lines["openai"]
    assert "configured" in lines["twilio"]
    assert "missing" in lines["deepgram"]
    assert "unreachable" in lines["database"]


def test_doctor_passes_on_a_migrated_sqlite_database(tmp_path: Path) -> None:
    env = clean_env(BUILDER_DATA_DIR=str(tmp_path / "data"), BUILDER_TEMPORAL_PORT=str(free_port()))
    before = run_cli("doctor", env=env)
    assert before.returncode == 1, before.stdout
    assert "builder-engine migrate" in before.stdout
    migrated = run_cli("migrate", env=env)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    after = run_cli("doctor", env=env)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "not running" in after.stdout  # the embedded Temporal is optional until `up`


def test_up_refuses_a_taken_port(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        result = run_cli(
            "up",
            "--data-dir", str(data_dir),
            "--api-port", str(port),
            "--realtime-port", str(free_port()),
            "--temporal-port", str(free_port()),
            "--temporal-ui-port", str(free_port()),
            env=clean_env(),
            timeout=30,
        )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"port {port} (API) is already in use" in output
    assert "--api-port" in output and "BUILDER_API_PORT" in output
    assert "started" not in output  # nothing was started
    assert not data_dir.exists()


def test_up_refuses_the_same_port_twice(tmp_path: Path) -> None:
    port = free_port()
    result = run_cli(
        "up",
        "--data-dir", str(tmp_path / "data"),
        "--api-port", str(free_port()),
        "--realtime-port", str(port),
        "--temporal-port", str(free_port()),
        "--temporal-ui-port", str(port),
        env=clean_env(),
        timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"port {port} is configured for both" in result.stdout
    assert "--temporal-ui-port" in result.stdout

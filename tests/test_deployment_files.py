"""docker-compose.yml and the docs stay consistent with the settings and the code."""

from __future__ import annotations

from typing import Any

import yaml

from builder_engine.config import Settings, env_name
from conftest import repo_root

SETTING_VARIABLES = {env_name(name) for name in Settings.model_fields}


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((repo_root() / "docker-compose.yml").read_text())
    return loaded


def test_compose_only_sets_real_settings() -> None:
    compose = _compose()
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}):
            if variable.startswith("BUILDER_"):
                assert variable in SETTING_VARIABLES, (name, variable)


def test_compose_has_the_production_topology() -> None:
    services = _compose()["services"]
    assert {"api", "realtime", "worker", "temporal", "temporal-ui", "postgres", "qdrant"} <= set(
        services
    )
    commands = {name: services[name].get("command") for name in ("api", "realtime", "worker")}
    assert commands == {
        "api": ["serve", "api"],
        "realtime": ["serve", "realtime"],
        "worker": ["worker"],
    }


def test_readme_opens_with_the_two_commands() -> None:
    readme = (repo_root() / "README.md").read_text().splitlines()
    block = readme[readme.index("```bash") + 1 : readme.index("```")]
    assert [line.split()[0] for line in block] == ["./scripts/up", "./scripts/test"]
    for script in ("up", "test"):
        assert (repo_root() / "scripts" / script).stat().st_mode & 0o111


def test_ci_runs_the_readme_test_command() -> None:
    ci = (repo_root() / ".ci" / "run").read_text()
    assert "./scripts/test" in ci and "ruff check" in ci and "mypy" in ci

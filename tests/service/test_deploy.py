"""What can be checked of the Docker setup without a Docker engine: the compose file parses, every service's
command exists in the CLI with its options, every SSTMERGE_* variable is a Settings field, and every file the
Dockerfiles copy exists."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import yaml

from app.domain.settings import Settings
from sstmerge_core.cli import _load_plugins, cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services(compose):
    services = compose["services"]
    assert {"redis", "postgres", "api", "worker"} <= set(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    for name in ("api", "worker"):
        mounts = services[name]["volumes"]
        assert any(m.startswith("artifacts:") for m in mounts), f"{name} must share the artifact volume"
        assert (ROOT / services[name]["build"]["dockerfile"]).is_file()


def test_compose_commands_exist(compose):
    _load_plugins()
    for name in ("api", "worker"):
        program, *args = compose["services"][name]["command"]
        assert program == "sstmerge"
        command = cli.get_command(click.Context(cli), args[0])
        assert command is not None, f"{name}: no `sstmerge {args[0]}` command"
        command.make_context(args[0], list(args[1:]), resilient_parsing=False)  # raises on unknown options


def test_compose_env_vars_are_settings(compose):
    fields = {f"SSTMERGE_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker"):
        env = compose["services"][name]["environment"]
        used = {key for key in env if key.startswith("SSTMERGE_")}
        assert used and used <= fields, used - fields


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfile_copies_existing_files(dockerfile):
    text = (ROOT / "docker" / dockerfile).read_text()
    sources = [src for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE) for src in line.split()[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile} copies missing {source}"
    for env in re.findall(r"\b(SSTMERGE_[A-Z_]+)=", text):
        assert env.removeprefix("SSTMERGE_").lower() in Settings.model_fields
    assert re.search(r'^CMD \["sstmerge", "(serve|worker)"', text, re.MULTILINE)


def test_every_setting_is_documented():
    docs = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`SSTMERGE_{name.upper()}`" not in docs]
    assert not missing, missing

"""The install extras: `pip install .[service]` (the API image) pulls no torch, and each half runs without the
other's packages: the API and `sstmerge serve --no-worker` with none of the core's (torch, numpy, …), the
`sstmerge` CLI with none of the service's (its service commands are then skipped, not broken).

Dependencies are read from pyproject.toml and followed through the installed packages' metadata; the
"without" runs block the other extra's packages in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]
TORCH_STACK = {"torch", "transformers", "peft", "accelerate", "triton"}


@cache
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def own_requirements(extras: Iterable[str]) -> list[Requirement]:
    """sstmerge's base requirements plus those of `extras` (as written in pyproject.toml)."""
    optional = project()["optional-dependencies"]
    return [Requirement(r) for r in project()["dependencies"]] + [
        Requirement(r) for extra in extras for r in optional[extra]
    ]


def closure(extras: Iterable[str]) -> set[str]:
    """Every distribution `pip install .[extras]` installs, from the metadata of the installed packages."""
    todo, seen, found = own_requirements(extras), set(), set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        if name == "sstmerge":
            todo += own_requirements(requirement.extras)
            continue
        found.add(name)
        chosen = requirement.extras or {""}
        for raw in metadata.distribution(name).requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in chosen):
                todo.append(sub)
    return found


def import_names(distributions: set[str]) -> set[str]:
    """Top-level modules provided only by `distributions`."""
    providers = metadata.packages_distributions()
    return {
        module
        for module, dists in providers.items()
        if dists and all(canonicalize_name(d) in distributions for d in dists) and module.isidentifier()
    }


def test_extras_are_layered():
    optional = project()["optional-dependencies"]
    assert optional["worker"] == ["sstmerge[core,service]"]
    assert "sstmerge[worker]" in optional["test"] and "sstmerge[test]" in optional["dev"]
    assert any(re.fullmatch(r"ruff==[\d.]+", r) for r in optional["dev"]), "ruff is pinned to one version"
    base = {canonicalize_name(Requirement(r).name) for r in project()["dependencies"]}
    assert not base & {"torch", "fastapi", "sqlalchemy", "celery"}, base


def test_service_install_pulls_no_torch():
    service = closure(["service"])
    assert {"fastapi", "sqlalchemy", "celery", "uvicorn"} <= service
    assert not {d for d in service if d in TORCH_STACK or d.startswith("nvidia-")}, service
    assert TORCH_STACK - {"triton"} <= closure(["worker"])


def test_api_image_installs_the_service_extra_only():
    dockerfile = (ROOT / "docker" / "Dockerfile.api").read_text()
    installs = re.findall(r"pip install[^\n]*", dockerfile)
    assert installs and all("torch" not in line for line in installs), installs
    assert any(re.search(r"""["']?\.\[service\]["']?""", line) for line in installs), installs
    worker = (ROOT / "docker" / "Dockerfile.worker").read_text()
    assert re.search(r"""pip install[^\n]*["']?\.\[worker\]""", worker)


BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed in this test)", name=name)
sys.meta_path.insert(0, Blocked())
"""

API_WITHOUT_CORE = """
import click
from fastapi.testclient import TestClient
from app.domain.settings import Settings
from app.main import create_app
from sstmerge_core.cli import _load_plugins, cli, main
from sstmerge_core.methods.catalog import CATALOG
with TestClient(create_app(Settings(data_dir=sys.argv[2], api_keys="acme:k"))) as client:
    assert client.get("/healthz").status_code == 200
    assert len(client.get("/methods").json()["items"]) == len(CATALOG)
    assert client.get("/openapi.json").status_code == 200
    bad = client.post("/merges", headers={"Authorization": "Bearer k"}, json={
        "base_model": "m", "safety_adapter": {"adapter_id": "a"}, "method": "linear", "params": {"bogus": 1}})
    assert bad.json()["error"]["code"] == "invalid_params", bad.text
_load_plugins()
commands = set(cli.list_commands(click.Context(cli)))
assert {"serve", "keys"} <= commands and "worker" not in commands, commands
assert main(["serve", "--data-dir", sys.argv[2]]) == 2  # a worker is needed and cannot run here
print("ok")
"""

CLI_WITHOUT_SERVICE = """
import click
from sstmerge_core.cli import _load_plugins, cli, main
_load_plugins()
commands = set(cli.list_commands(click.Context(cli)))
assert {"merge", "evaluate", "train-lora", "demo"} <= commands, commands
assert not commands & {"serve", "worker", "keys", "demo-service"}, commands
assert main(["merge", "--help"]) == 0
print("ok")
"""


def run_without(blocked: set[str], code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, ",".join(sorted(blocked)), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_api_runs_without_the_core_packages(tmp_path):
    core_only = import_names(closure(["core"]) - closure(["service"]))
    assert {"torch", "transformers", "numpy", "safetensors"} <= core_only
    result = run_without(core_only, API_WITHOUT_CORE, str(tmp_path))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    assert "sstmerge[worker]" in result.stderr  # the reason `serve` refused to start a worker


def test_cli_runs_without_the_service_packages():
    service_only = import_names(closure(["service"]) - closure(["core"]))
    # sqlalchemy is not in the list: optuna (the recipe search, a core feature) depends on it for its storages
    assert {"fastapi", "celery", "pydantic_settings", "uvicorn"} <= service_only
    result = run_without(service_only, CLI_WITHOUT_SERVICE)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]

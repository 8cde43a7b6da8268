"""The layering of the service, checked with import-linter (contracts in pyproject.toml, `[tool.importlinter]`):

    app.cli / app.main  →  app.api (HTTP)  →  app.domain  ←  workers  →  sstmerge_core

`app` never imports `workers`; the domain and the workers never import FastAPI/Starlette or `app.api`; the API
layers never import torch; the core imports no web, queue or database code; `sstmerge_core.contracts`
(metrics.json and the job summary, read by the API process) imports no torch, numpy or other core module. The
contracts are also run on copies of the tree with one forbidden import added, so that a contract that names the
wrong module (and so checks nothing) fails here too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "workers", "sstmerge_core")
LINT_IMPORTS = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]


def lint(tree: Path) -> tuple[int, set[str], str]:
    """Run every contract on the packages under `tree`; returns (exit code, names of broken contracts, output)."""
    result = subprocess.run(
        [*LINT_IMPORTS, "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    output = result.stdout + result.stderr
    return result.returncode, set(re.findall(r"^(.+) BROKEN$", output, re.MULTILINE)), output


def test_contracts_hold():
    code, broken, output = lint(ROOT)
    assert code == 0 and not broken, output
    assert re.search(r"Contracts: 8 kept, 0 broken", output), output


def test_the_contracts_package_is_forbidden_every_other_core_module():
    """A module added to the core is forbidden to `sstmerge_core.contracts` too (the contract lists them by name)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(
        c for c in config["tool"]["importlinter"]["contracts"] if c.get("source_modules") == ["sstmerge_core.contracts"]
    )
    core = ROOT / "sstmerge_core"
    siblings = {p.stem for p in core.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in core.iterdir() if (p / "__init__.py").is_file() and p.name != "contracts"
    }
    assert {f"sstmerge_core.{name}" for name in siblings} <= set(contract["forbidden_modules"])


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


VIOLATIONS = [
    ("app/domain/merges.py", "import fastapi", "the domain knows nothing of HTTP"),
    ("app/domain/settings.py", "from app.api import errors", "the domain knows nothing of HTTP"),
    ("app/domain/settings.py", "from app.api import errors", "app: entry points, then HTTP (app.api), then the domain"),
    ("app/api/deps.py", "import workers.runner", "app never imports the workers"),
    ("app/cli.py", "def _start():\n    from workers.main import create_worker_app", "app never imports the workers"),
    ("workers/inputs.py", "import starlette.responses", "workers use the domain and the core, never the HTTP layer"),
    ("workers/runner.py", "from app.api import schemas", "workers use the domain and the core, never the HTTP layer"),
    ("app/domain/requests.py", "import torch", "the API process never imports torch"),
    ("sstmerge_core/jobspec.py", "import sqlalchemy", "the core imports no web, queue or database code"),
    ("sstmerge_core/data.py", "from app.domain import settings", "the core imports no web, queue or database code"),
    ("app/client.py", "from app.domain import errors", "the Python client speaks HTTP only"),
    ("app/client.py", "from app.api import schemas", "the Python client speaks HTTP only"),
    ("app/client.py", "def _f():\n    import fastapi", "the Python client speaks HTTP only"),
    ("sstmerge_core/contracts/metrics.py", "import torch", "the contracts are pydantic models only"),
    ("sstmerge_core/contracts/summary.py", "import numpy", "the contracts are pydantic models only"),
    ("sstmerge_core/contracts/base.py", "from sstmerge_core.evaluation import stats", "the contracts are pydantic"),
    ("sstmerge_core/contracts/summary.py", "def _f():\n    from ..jobspec import MergeSpec", "the contracts are"),
]


@pytest.mark.parametrize(("path", "line", "contract"), VIOLATIONS, ids=[f"{v[0]}:{v[1]}" for v in VIOLATIONS])
def test_a_forbidden_import_breaks_its_contract(tree_copy, path, line, contract):
    target = tree_copy / path
    original = target.read_text()
    target.write_text(f"{original}\n\n{line}\n")
    try:
        code, broken, output = lint(tree_copy)
    finally:
        target.write_text(original)
    assert code != 0, output
    assert any(name.startswith(contract) for name in broken), (contract, broken, output)

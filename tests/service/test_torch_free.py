"""The API process never imports torch (model work happens in workers)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
from fastapi.testclient import TestClient
from app.domain.settings import Settings
from app.main import create_app
import app.cli, app.domain.queue
settings = Settings(data_dir=sys.argv[1])
with TestClient(create_app(settings)) as client:
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/healthz").status_code == 200
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "transformers", "peft")))
assert not loaded, loaded
"""


def test_api_does_not_import_torch(tmp_path):
    result = subprocess.run([sys.executable, "-c", CODE, str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]

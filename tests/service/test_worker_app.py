"""The worker's Celery app is built by a factory, never at import; `celery -A workers.main` finds it (the
lookup Celery's command line does) with the merge task registered under the name the API sends."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import workers.main
assert workers.main._default_app.cache_info().currsize == 0, "a Celery app was built at import"
from celery import Celery
from celery.app.utils import find_app
from app.domain.queue import RUN_MERGE_TASK
found = find_app("workers.main")
assert isinstance(found, Celery) and RUN_MERGE_TASK in found.tasks, sorted(found.tasks)
assert found.conf.task_default_queue == "queue-from-env" and found.conf.broker_url.startswith("sqla+sqlite:")
assert found.conf.task_acks_late and found.conf.worker_prefetch_multiplier == 1
print("ok")
"""


def test_celery_finds_the_worker_app_built_on_first_use(tmp_path):
    env = {"SSTMERGE_DATA_DIR": str(tmp_path), "SSTMERGE_QUEUE": "queue-from-env", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]

"""Writing a file so that readers see the old content or the new one, never half of it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomic(path: Path, payload: bytes) -> None:
    """Write `payload` to a temporary file beside `path`, then rename it over `path` (readers never see half).

    The file is created with mode 0666 less the process umask, like any file `open()` creates (0644 by default).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

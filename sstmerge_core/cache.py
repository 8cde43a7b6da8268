"""On-disk cache of Fisher factors, so that a sweep over α, selection, k or β costs no new data pass.

Key: sha256 of everything the factors depend on (base model fingerprint, adapter hashes and weights,
data hash, estimator and sample/length settings, code version). Entries are safetensors files written
atomically (temp file + rename). A hit refreshes the entry's modification time, so `trim(max_bytes)` evicts the
least recently used entries first; an entry evicted by another process between lookup and read is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .fisher import KFACFactors

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("SSTMERGE_CACHE", Path.home() / ".cache" / "sstmerge"))


def model_fingerprint(name_or_path: str, revision: str | None) -> str:
    """Hub id + revision, or for a local folder: config.json and each weight file's name, size and edges."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return f"hub:{name_or_path}@{revision or 'main'}"
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(size - (1 << 20), 0))
            digest.update(handle.read(1 << 20))
    return f"local:{digest.hexdigest()}"


def cache_key(**parts) -> str:
    payload = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class FisherCache:
    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder else default_cache_dir() / "fisher"
        self.hits: list[str] = []

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, KFACFactors] | None:
        path = self.path(key)
        try:
            tensors = load_file(str(path))
            os.utime(path)  # most recently used
        except FileNotFoundError:
            return None
        names = {k.rsplit(".", 1)[0] for k in tensors}
        return {n: KFACFactors(tensors[f"{n}.A"], tensors[f"{n}.G"], 1, 1) for n in names}

    def save(self, key: str, factors: dict[str, KFACFactors]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, f in factors.items():
            tensors[f"{name}.A"] = f.A.detach().cpu().contiguous()
            tensors[f"{name}.G"] = f.G.detach().cpu().contiguous()
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def entries(self) -> list[Path]:
        """Cached entries, least recently used first."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.glob("*.safetensors"):
            try:
                found.append((path.stat().st_mtime, path))
            except FileNotFoundError:
                continue
        return [path for _, path in sorted(found)]

    def trim(self, max_bytes: int) -> list[str]:
        """Delete least recently used entries until the cache holds at most `max_bytes`; returns the evicted keys."""
        sizes = []
        for path in self.entries():
            try:
                sizes.append((path, path.stat().st_size))
            except FileNotFoundError:
                continue
        total, evicted = sum(size for _, size in sizes), []
        for path, size in sizes:
            if total <= max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            evicted.append(path.stem)
        if evicted:
            log.info("fisher cache trimmed", extra={"evicted": len(evicted), "bytes": total})
        return evicted

    def get_or_compute(self, key: str, compute: Callable[[], dict[str, KFACFactors]]) -> dict[str, KFACFactors]:
        factors = self.load(key)
        if factors is not None:
            self.hits.append(key)
            log.info("fisher cache hit", extra={"key": key[:16], "modules": len(factors)})
            return factors
        factors = compute()
        self.save(key, factors)
        return factors

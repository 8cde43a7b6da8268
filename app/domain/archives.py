"""Safe extraction of uploaded .zip / .tar.gz archives.

Refused: absolute paths, `..`, drive letters and backslashes; symlinks, hardlinks, devices and FIFOs; more than
`max_members` entries; more than `max_bytes` uncompressed (counted while writing, so a lying header or a
zip bomb cannot exceed it). Members are written one by one with plain file writes: nothing from the archive
decides permissions, ownership or link targets.
"""

from __future__ import annotations

import gzip
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO


class ArchiveError(Exception):
    """The archive is unreadable or unsafe; `code` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Member:
    name: str
    is_dir: bool
    is_file: bool
    declared_size: int


def safe_member_path(name: str) -> PurePosixPath:
    """The relative path of a member, or ArchiveError if it could escape the extraction folder."""
    if "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError("unsafe_archive", f"member {name!r}: backslashes and drive letters are not allowed")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise ArchiveError("unsafe_archive", f"member {name!r}: absolute paths are not allowed")
    if ".." in path.parts:
        raise ArchiveError("unsafe_archive", f"member {name!r}: '..' is not allowed")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        raise ArchiveError("unsafe_archive", f"member {name!r}: empty path")
    return PurePosixPath(*parts)


def _zip_members(archive: zipfile.ZipFile) -> Iterator[tuple[Member, IO[bytes] | None]]:
    for info in archive.infolist():
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no Unix file type
        if kind == stat.S_IFLNK:
            raise ArchiveError("unsafe_archive", f"member {info.filename!r}: links are not allowed")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError("unsafe_archive", f"member {info.filename!r}: only files and folders are allowed")
        if info.is_dir():
            yield Member(info.filename, True, False, 0), None
        else:
            with archive.open(info) as handle:
                yield Member(info.filename, False, True, info.file_size), handle


def _tar_members(archive: tarfile.TarFile) -> Iterator[tuple[Member, IO[bytes] | None]]:
    for info in archive:
        if info.issym() or info.islnk():
            raise ArchiveError("unsafe_archive", f"member {info.name!r}: links are not allowed")
        if not (info.isreg() or info.isdir()):
            raise ArchiveError("unsafe_archive", f"member {info.name!r}: only files and folders are allowed")
        if info.isdir():
            yield Member(info.name, True, False, 0), None
        else:
            handle = archive.extractfile(info)
            if handle is None:
                raise ArchiveError("invalid_archive", f"member {info.name!r} cannot be read")
            with handle:
                yield Member(info.name, False, True, info.size), handle


@contextmanager
def _open(path: Path) -> Iterator[Iterator[tuple[Member, IO[bytes] | None]]]:
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                yield _zip_members(archive)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            raise ArchiveError("invalid_archive", f"not a readable zip file: {exc}") from exc
        return
    try:
        with tarfile.open(path, mode="r:*") as archive:
            yield _tar_members(archive)
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise ArchiveError("invalid_archive", f"not a readable .zip or .tar.gz file: {exc}") from exc


def extract(path: Path, destination: Path, *, max_members: int, max_bytes: int) -> list[PurePosixPath]:
    """Extract the archive at `path` into the empty folder `destination`; returns the extracted file paths.

    On any error the destination is left empty.
    """
    files: list[PurePosixPath] = []
    total = 0
    try:
        with _open(path) as members:
            for count, (member, handle) in enumerate(members, start=1):
                if count > max_members:
                    raise ArchiveError("archive_too_large", f"more than {max_members} entries")
                relative = safe_member_path(member.name)
                target = destination.joinpath(*relative.parts)
                if member.is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if member.declared_size > max_bytes - total:
                    raise ArchiveError("archive_too_large", f"uncompressed size exceeds {max_bytes} bytes")
                if target.exists():
                    raise ArchiveError("unsafe_archive", f"member {member.name!r} appears twice")
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("xb") as out:
                    assert handle is not None
                    while chunk := handle.read(1 << 20):
                        total += len(chunk)
                        if total > max_bytes:
                            raise ArchiveError("archive_too_large", f"uncompressed size exceeds {max_bytes} bytes")
                        out.write(chunk)
                files.append(relative)
    except BaseException:
        for child in destination.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return files

"""Safe extraction of uploaded .zip / .tar.gz archives, in bounded memory.

Refused: absolute paths, `..`, drive letters, backslashes, control characters and over-long names; symlinks,
hardlinks, devices, FIFOs and sparse files; encrypted zip entries; a path used twice, or as a file and as a folder;
more than `max_members` entries; more than `max_bytes` uncompressed (counted while writing, so a lying header or a
zip bomb cannot exceed it). Every header is bounded before it is read: a tar's pax and GNU long-name records by
`max_header_bytes` (Python's tarfile would read a 1 GiB pax record into memory), at most a few of them in a row,
and a zip's central directory by the member limit. Members are written one by one with plain file writes: nothing
from the archive decides permissions, ownership or link targets.
"""

from __future__ import annotations

import gzip
import lzma
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

from sstmerge_core.untrusted import control_free, quote

MAX_NAME_CHARS = 1024
MAX_PART_CHARS = 255
MAX_EXTENDED_HEADERS = 8  # pax / GNU long-name records before one member
ZIP_ENTRY_BYTES = 1024  # central-directory bytes allowed per member (46 fixed + name, extra field and comment)
_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


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
    """The relative path of a member, or ArchiveError if it could escape the extraction folder or cannot be a file
    name here."""
    shown = quote(name)
    if "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError("unsafe_archive", f"member {shown}: backslashes and drive letters are not allowed")
    if not control_free(name):
        raise ArchiveError("unsafe_archive", f"member {shown}: control characters are not allowed in names")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise ArchiveError("unsafe_archive", f"member {shown}: absolute paths are not allowed")
    if ".." in path.parts:
        raise ArchiveError("unsafe_archive", f"member {shown}: '..' is not allowed")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        raise ArchiveError("unsafe_archive", f"member {shown}: empty path")
    if len(name) > MAX_NAME_CHARS or any(len(p.encode()) > MAX_PART_CHARS for p in parts):
        raise ArchiveError("unsafe_archive", f"member {shown}: the name is too long")
    return PurePosixPath(*parts)


def _zip_members(archive: zipfile.ZipFile) -> Iterator[tuple[Member, IO[bytes] | None]]:
    for info in archive.infolist():
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no Unix file type
        if kind == stat.S_IFLNK:
            raise ArchiveError("unsafe_archive", f"member {quote(info.filename)}: links are not allowed")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError("unsafe_archive", f"member {quote(info.filename)}: only files and folders are allowed")
        if info.flag_bits & 0x1:
            raise ArchiveError("invalid_archive", f"member {quote(info.filename)} is encrypted")
        if info.is_dir():
            yield Member(info.filename, True, False, 0), None
        else:
            with archive.open(info) as handle:
                yield Member(info.filename, False, True, info.file_size), handle


def _check_zip_directory(path: Path, max_members: int) -> None:
    """Refuse a zip whose central directory (read whole by `zipfile`) lists or weighs more than the limits allow."""
    # zipfile's private helpers (absent from typeshed, hence the ignores) read the end of central directory record,
    # zip64 aware, without reading the directory itself, which is what this check must not do first
    with path.open("rb") as handle:
        end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
    if end is None:
        raise ArchiveError("invalid_archive", "not a readable zip file (no end of central directory)")
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if entries > max_members:
        raise ArchiveError("archive_too_large", f"more than {max_members} entries")
    if size > ZIP_ENTRY_BYTES * max(entries, 1):
        raise ArchiveError("archive_too_large", f"the zip directory is larger than {ZIP_ENTRY_BYTES} bytes per entry")


def _bounded_tarinfo(max_header_bytes: int) -> type[tarfile.TarInfo]:
    """A TarInfo class that refuses extended headers (pax, GNU long names) over `max_header_bytes` or more than
    `MAX_EXTENDED_HEADERS` in a row, and sparse files, before tarfile reads them."""

    class BoundedTarInfo(tarfile.TarInfo):
        chain = 0

        def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:  # tarfile's hook, on every header
            cls = type(self)
            if self.type in _EXTENDED:
                cls.chain += 1
                if self.size > max_header_bytes:
                    raise ArchiveError(
                        "archive_too_large", f"an extended tar header of {self.size} bytes exceeds {max_header_bytes}"
                    )
                if cls.chain > MAX_EXTENDED_HEADERS:
                    raise ArchiveError("invalid_archive", f"more than {MAX_EXTENDED_HEADERS} extended headers in a row")
            else:
                cls.chain = 0
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise ArchiveError("unsafe_archive", f"member {quote(self.name)}: sparse files are not allowed")
            return super()._proc_member(archive)  # type: ignore[misc]  # a private hook, absent from typeshed

        def _sparse(self, *_: object) -> None:
            raise ArchiveError("unsafe_archive", f"member {quote(self.name)}: sparse files are not allowed")

        _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _sparse

    return BoundedTarInfo


def _tar_members(archive: tarfile.TarFile) -> Iterator[tuple[Member, IO[bytes] | None]]:
    for info in archive:
        if info.issym() or info.islnk():
            raise ArchiveError("unsafe_archive", f"member {quote(info.name)}: links are not allowed")
        if not (info.isreg() or info.isdir()) or info.issparse():
            raise ArchiveError("unsafe_archive", f"member {quote(info.name)}: only files and folders are allowed")
        if info.isdir():
            yield Member(info.name, True, False, 0), None
        else:
            handle = archive.extractfile(info)
            if handle is None:
                raise ArchiveError("invalid_archive", f"member {quote(info.name)} cannot be read")
            with handle:
                yield Member(info.name, False, True, info.size), handle


_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    gzip.BadGzipFile,
    lzma.LZMAError,
    zlib.error,
    EOFError,
    NotImplementedError,
    RuntimeError,  # zipfile: encrypted or unsupported entries
    RecursionError,
    ValueError,  # bad headers: numbers, names, compression parameters
)


@contextmanager
def _open(path: Path, max_members: int, max_header_bytes: int) -> Iterator[Iterator[tuple[Member, IO[bytes] | None]]]:
    try:
        if zipfile.is_zipfile(path):
            _check_zip_directory(path, max_members)
            with zipfile.ZipFile(path) as archive:
                yield _zip_members(archive)
            return
        with tarfile.open(path, mode="r:*", tarinfo=_bounded_tarinfo(max_header_bytes)) as archive:
            yield _tar_members(archive)
    except _READ_ERRORS as exc:
        raise ArchiveError("invalid_archive", f"not a readable .zip or .tar.gz file: {quote(str(exc), 200)}") from None
    except OSError as exc:
        if exc.errno is not None:  # the filesystem here (disk full, …), not the archive
            raise
        raise ArchiveError("invalid_archive", f"not a readable .zip or .tar.gz file: {quote(str(exc), 200)}") from None


def extract(
    path: Path, destination: Path, *, max_members: int, max_bytes: int, max_header_bytes: int = 1 << 16
) -> list[PurePosixPath]:
    """Extract the archive at `path` into the empty folder `destination`; returns the extracted file paths.

    On any error the destination is left empty.
    """
    files: list[PurePosixPath] = []
    kinds: dict[PurePosixPath, bool] = {}  # path -> is a folder
    total = 0
    try:
        with _open(path, max_members, max_header_bytes) as members:
            for count, (member, handle) in enumerate(members, start=1):
                if count > max_members:
                    raise ArchiveError("archive_too_large", f"more than {max_members} entries")
                relative = safe_member_path(member.name)
                for parent in list(relative.parents)[:-1]:
                    if kinds.setdefault(parent, True) is False:
                        raise ArchiveError(
                            "unsafe_archive", f"member {quote(member.name)}: {quote(str(parent))} is a file"
                        )
                known = kinds.get(relative)
                if known is not None and known != member.is_dir:
                    raise ArchiveError("unsafe_archive", f"member {quote(member.name)} is both a file and a folder")
                if known is False:
                    raise ArchiveError("unsafe_archive", f"member {quote(member.name)} appears twice")
                kinds[relative] = member.is_dir
                target = destination.joinpath(*relative.parts)
                if member.is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if member.declared_size > max_bytes - total:
                    raise ArchiveError("archive_too_large", f"uncompressed size exceeds {max_bytes} bytes")
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

"""Where archive files come from: a listing with size and mtime, and a way to open one file.

:class:`LocalArchive` lists a folder with ``os.scandir`` (nanosecond mtimes, one
``lstat`` per file) and opens files with ``O_NOFOLLOW``. :class:`FsspecArchive`
does the same through any fsspec file system (``s3://`` ...). Neither follows a
symbolic link: links are listed as such, never opened, so a link that leaves
the archive root is never read. Paths are relative to the root, with ``/``.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import fsspec

from cohort.errors import DicomReadError


class EntryKind(StrEnum):
    FILE = "file"
    SYMLINK = "symlink"  # never followed, never opened
    OTHER = "other"  # fifo, socket, device: never opened
    UNLISTABLE = "unlistable"  # a folder that could not be listed


@dataclass(frozen=True)
class FileEntry:
    """One listed archive entry."""

    path: str  # relative to the archive root, '/'-separated
    size: int
    mtime_ns: int
    kind: EntryKind = EntryKind.FILE


@runtime_checkable
class ArchiveSource(Protocol):
    """A crawlable archive. Implementations must pickle (they travel to worker processes)."""

    @property
    def url(self) -> str:
        """Where the archive is (a local absolute path or a URL)."""
        ...

    def walk(self) -> Iterator[FileEntry]:
        """Every entry under the root, without following symbolic links."""
        ...

    def open(self, entry: FileEntry) -> tuple[BinaryIO, FileEntry]:
        """The file opened for binary reading, and its size and mtime as of opening."""
        ...

    def absolute(self, path: str) -> str:
        """The path or URL of a relative archive path (for readers outside the index)."""
        ...


@dataclass(frozen=True)
class LocalArchive:
    """An archive folder on a local (or mounted) file system."""

    root: Path

    @property
    def url(self) -> str:
        return str(self.root)

    def walk(self) -> Iterator[FileEntry]:
        if not self.root.is_dir():
            raise DicomReadError("archive folder does not exist or is not a folder", subject=str(self.root))
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                with os.scandir(self.root / rel if rel else self.root) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                if rel:  # recorded, so the files it hides are not silently missing
                    yield FileEntry(rel, 0, 0, EntryKind.UNLISTABLE)
                continue
            subdirs = []
            for entry in entries:
                path = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished while listing
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(path)
                elif stat.S_ISREG(st.st_mode):
                    yield FileEntry(path, st.st_size, st.st_mtime_ns)
                elif stat.S_ISLNK(st.st_mode):
                    yield FileEntry(path, st.st_size, st.st_mtime_ns, EntryKind.SYMLINK)
                else:
                    yield FileEntry(path, st.st_size, st.st_mtime_ns, EntryKind.OTHER)
            stack.extend(reversed(subdirs))

    def open(self, entry: FileEntry) -> tuple[BinaryIO, FileEntry]:
        # O_NOFOLLOW: a file swapped for a link since the listing is not followed; O_NONBLOCK: nor
        # does a fifo swapped in block the crawl (no effect on regular files).
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(self.root / entry.path, flags)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"not a regular file (mode {st.st_mode:o})")
            handle = os.fdopen(fd, "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise
        return handle, FileEntry(entry.path, st.st_size, st.st_mtime_ns, entry.kind)  # type: ignore[return-value]

    def absolute(self, path: str) -> str:
        return str(self.root / path)

    def prefetch(self, entry: FileEntry) -> None:
        """Ask the kernel to start reading a file that will be read soon (overlaps disk and CPU)."""
        if entry.kind is not EntryKind.FILE or not hasattr(os, "posix_fadvise"):
            return
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(self.root / entry.path, flags)
        except OSError:
            return  # the read itself will record why
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _mtime_ns(info: dict[str, Any]) -> int:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return int(value.timestamp() * 1_000_000) * 1000
        if isinstance(value, int | float):
            return round(value * 1_000_000) * 1000
        if isinstance(value, str) and value:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1_000_000) * 1000
    return 0


@dataclass(frozen=True)
class FsspecArchive:
    """An archive under ``root`` on an fsspec file system (object stores: mtime is LastModified)."""

    fs: fsspec.AbstractFileSystem
    root: str

    @property
    def url(self) -> str:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{self.root}"

    def _rel(self, name: str) -> str:
        return posixpath.relpath(name, self.root)

    def walk(self) -> Iterator[FileEntry]:
        if not self.fs.isdir(self.root):
            raise DicomReadError("archive folder does not exist or is not a folder", subject=self.url)
        stack = [self.root]
        while stack:
            folder = stack.pop()
            try:
                infos = sorted(self.fs.ls(folder, detail=True), key=lambda i: i["name"])
            except OSError:
                if folder != self.root:
                    yield FileEntry(self._rel(folder), 0, 0, EntryKind.UNLISTABLE)
                continue
            subdirs = []
            for info in infos:
                name = info["name"].rstrip("/")
                if name == folder.rstrip("/"):
                    continue
                rel = self._rel(name)
                size, mtime = int(info.get("size") or 0), _mtime_ns(info)
                if info.get("islink"):
                    yield FileEntry(rel, size, mtime, EntryKind.SYMLINK)
                elif info.get("type") == "directory":
                    subdirs.append(name)
                elif info.get("type") == "file":
                    yield FileEntry(rel, size, mtime)
                else:
                    yield FileEntry(rel, size, mtime, EntryKind.OTHER)
            stack.extend(reversed(subdirs))

    def open(self, entry: FileEntry) -> tuple[BinaryIO, FileEntry]:
        handle = self.fs.open(posixpath.join(self.root, entry.path), "rb")
        return handle, entry

    def absolute(self, path: str) -> str:
        return f"{self.url.rstrip('/')}/{path}"


def is_url(value: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` (an fsspec URL such as ``s3://bucket/key``)."""
    text = os.fspath(value)
    return "://" in text and not text.startswith("file://")


def open_archive(location: str | os.PathLike[str] | ArchiveSource, **storage_options: Any) -> ArchiveSource:
    """An archive source for a local folder, a ``file://`` or fsspec URL (``s3://bucket/prefix``)."""
    if not isinstance(location, str | os.PathLike):
        return location
    text = os.fspath(location)
    if is_url(text):
        fs, root = fsspec.core.url_to_fs(text, **storage_options)
        return FsspecArchive(fs, str(root).rstrip("/"))
    return LocalArchive(Path(text.removeprefix("file://")).absolute())


@contextmanager
def open_input(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A file of the archive opened for binary reading: a local path, or a URL read through fsspec
    (credentials and endpoint from the file system's own chain, e.g. ``AWS_*`` for S3)."""
    text = os.fspath(path)
    if is_url(text):
        with fsspec.open(text, "rb") as remote:
            yield remote
    else:
        with open(text.removeprefix("file://"), "rb") as local:
            yield local


def read_dicom(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``pydicom.dcmread`` of a local path or an archive URL (the whole dataset is read before closing)."""
    import pydicom

    with open_input(path) as handle:
        return pydicom.dcmread(handle, **kwargs)

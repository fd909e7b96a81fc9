"""Where store data lives: a local folder or an object-store prefix, through fsspec.

A :class:`Location` pairs an fsspec file system with a path on it. Local paths
keep their POSIX semantics (atomic rename, symbolic links, ``flock``); object
stores (``s3://bucket/prefix``) have none of those, and the store switches to a
commit log there (see :mod:`cohort.store.objects`).

Credentials come from the standard chain of the file system's library — for S3,
botocore's: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE``,
``~/.aws/credentials`` and ``~/.aws/config``, instance roles — and an S3-compatible
server (MinIO, SeaweedFS) is named by ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``). Nothing of it belongs in a cohort spec.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from cohort.errors import StoreError
from cohort.index.source import is_url


@dataclass(frozen=True)
class Location:
    """A path on an fsspec file system."""

    fs: fsspec.AbstractFileSystem
    path: str

    @classmethod
    def parse(cls, where: str | os.PathLike[str] | Location) -> Location:
        """A location from a local path or a URL such as ``s3://bucket/prefix``."""
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        if not is_url(text):
            return cls(LocalFileSystem(), str(Path(text.removeprefix("file://")).absolute()))
        try:
            fs, path = url_to_fs(text)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open {text}: {exc}", subject=text) from exc
        return cls(fs, str(path).rstrip("/"))

    # -- names ----------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def url(self) -> str:
        """The location as a user writes it (a local path, or ``s3://...``)."""
        if self.is_local:
            return self.path
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{self.path}"

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path))

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, name))

    def __str__(self) -> str:
        return self.url

    def local_path(self) -> Path:
        if not self.is_local:
            raise StoreError("needs a local path here", subject=self.url)
        return Path(self.path)

    # -- file system ----------------------------------------------------------
    def exists(self) -> bool:
        self.fs.invalidate_cache(self.path)
        return bool(self.fs.exists(self.path))

    def listdir(self) -> list[Location]:
        """Entries directly under this location (fresh: caches of other writers' changes dropped)."""
        self.fs.invalidate_cache(self.path)
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return [Location(self.fs, str(e).rstrip("/")) for e in entries if str(e).rstrip("/") != self.path]

    def modified(self) -> float:
        """Last modification time (POSIX seconds)."""
        info = self.fs.info(self.path)
        value = info.get("LastModified") or info.get("mtime") or info.get("created")
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
        raise StoreError("the file system reports no modification time", subject=self.url)

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes_atomic(self, data: bytes) -> None:
        """Readers see all of ``data`` or nothing (temp + rename locally; one PUT on an object store)."""
        if self.is_local:
            path = self.local_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{os.getpid()}.{id(data)}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(self.path, data)

    def create_exclusive(self, data: bytes) -> bool:
        """Create the object only if it does not exist; False when someone else did first.

        S3 and compatible servers honour ``If-None-Match: *`` (s3fs ``mode="create"``);
        locally ``O_EXCL``.
        """
        if self.is_local:
            path = self.local_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as exc:
            if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
                return False
            raise
        return True

    def open(self, mode: str = "rb", **kwargs: Any) -> Any:
        return self.fs.open(self.path, mode, **kwargs)

"""Content-addressed uploads: each local image file crosses the network once per server.

A local file is named by the SHA-256 of its bytes. The first request for it that a server
(replica) sees carries only the hash; the server answers at once when it holds the image
(cached, or being encoded), or asks for the bytes (``IMAGE_BYTES_NEEDED``), and then one
request carries them. Requests for the same file sent meanwhile, by hash, join that upload on
the server. Nothing of this is visible to the caller: a request that was answered
``IMAGE_BYTES_NEEDED`` is simply sent again.
"""

from __future__ import annotations

import enum
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from ._errors import ClipServeError

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LocalFile:
    path: Path
    size: int
    sha256: str

    def read(self) -> bytes:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise ClipServeError(grpc.StatusCode.NOT_FOUND, f"local image file not found: {self.path}") from None
        except OSError as exc:
            raise ClipServeError(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot read local image file {self.path}: {exc}"
            ) from None
        if len(data) != self.size:
            # Changed since it was hashed: the server would refuse the stale hash anyway.
            raise ClipServeError(
                grpc.StatusCode.ABORTED, f"local image file {self.path} changed while it was being sent"
            )
        return data


class FileDigests:
    """SHA-256 of local files, each file hashed once (again only if its size or mtime change).

    Thread-safe; hashing happens outside the lock, on whichever thread asks first (never the
    caller's: the SDK asks from its stream threads, or ``asyncio.to_thread``).
    """

    def __init__(self, max_upload_bytes: int) -> None:
        self.max_upload_bytes = max_upload_bytes
        self._known: dict[str, tuple[int, int, str]] = {}
        self._lock = threading.Lock()
        self.hashed_bytes = 0  # what hashing has read, and how long it took: its cost is bounded
        self.hash_seconds = 0.0

    def get(self, path: Path) -> LocalFile:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ClipServeError(grpc.StatusCode.NOT_FOUND, f"local image file not found: {path}") from None
        except OSError as exc:
            raise ClipServeError(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot read local image file {path}: {exc}"
            ) from None
        if stat.st_size > self.max_upload_bytes:
            raise ClipServeError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"local image file {path} is {stat.st_size} bytes, over the {self.max_upload_bytes}-byte upload limit",
            )
        key = os.fspath(path)
        with self._lock:
            known = self._known.get(key)
        if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return LocalFile(path, stat.st_size, known[2])
        started = time.perf_counter()
        digest = self._hash(path)
        with self._lock:
            self._known[key] = (stat.st_size, stat.st_mtime_ns, digest)
            self.hashed_bytes += stat.st_size
            self.hash_seconds += time.perf_counter() - started
        return LocalFile(path, stat.st_size, digest)

    @staticmethod
    def _hash(path: Path) -> str:
        sha = hashlib.sha256()
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    sha.update(chunk)
        except OSError as exc:
            raise ClipServeError(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot read local image file {path}: {exc}"
            ) from None
        return sha.hexdigest()


class Send(enum.Enum):
    HASH = "hash"  # image_sha256 alone
    BYTES = "bytes"  # image_bytes, with image_sha256 as the claim


class ServerImages:
    """What one server (replica) is believed to hold, for the requests sent to it.

    A request sent by hash remembers how many uploads of its file had gone out before it on
    the stream (which keeps its order). When it is answered IMAGE_BYTES_NEEDED:
    - if bytes for the file went out after it, or are queued to go, the server holds them
      (or is encoding them) by the time the request comes again: resend it by hash, and it
      joins them;
    - otherwise the server really lacks the file (first contact, eviction, a restart, a
      server without a cache): resend this request with the bytes.
    So each file's bytes go to a server once, plus once per time the server lost it.
    Used under the run's lock; reset when the replica's stream breaks (it may be a new process).
    """

    def __init__(self) -> None:
        self._uploads: dict[str, int] = {}  # sha256 -> bytes requests sent on this stream
        self._queued: set[str] = set()  # files whose bytes are decided on but not sent yet
        self._sent_at: dict[int, int] = {}  # request index -> uploads before it, when sent by hash

    def sent(self, sha256: str, index: int, send: Send) -> None:
        """Called as the request goes out, in stream order."""
        if send is Send.BYTES:
            self._uploads[sha256] = self._uploads.get(sha256, 0) + 1
            self._queued.discard(sha256)
            self._sent_at.pop(index, None)
        else:
            self._sent_at[index] = self._uploads.get(sha256, 0)

    def answered(self, index: int) -> None:
        self._sent_at.pop(index, None)

    def resend_as(self, sha256: str, index: int) -> Send:
        """How to resend a request that was answered IMAGE_BYTES_NEEDED."""
        sent_at = self._sent_at.pop(index, 0)
        if self._uploads.get(sha256, 0) > sent_at or sha256 in self._queued:
            return Send.HASH
        self._queued.add(sha256)
        return Send.BYTES

    def reset(self) -> None:
        self._uploads.clear()
        self._queued.clear()
        self._sent_at.clear()

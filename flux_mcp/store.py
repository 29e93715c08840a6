"""The result store: every output image lands on disk, whole, with a JSON sidecar, before a tool returns.

Layout (flat, one folder): ``<output dir>/<id>.<ext>`` and ``<output dir>/<id>.json``. An id looks
like ``20261125-181500-1a2b3c4d`` (UTC time + random), sorts by time and is safe in a URI and a file
name. Writes are atomic: each file is written to a hidden temp file in the same folder, flushed and
renamed into place; the sidecar is renamed last, so it is the commit marker — an image counts as
stored only when its sidecar exists. ``sweep()`` (run at start) removes what a crashed or killed
process left behind: temp files of dead processes and images whose sidecar never landed. New files
follow the user's umask (``write_atomic(mode=0o600)`` for files only the user may read); reads open
regular files only and never follow a symlink planted in the folder.

All methods block (file I/O); async callers run them in a worker thread.
This module knows nothing about MCP, backends or presets.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import ConfigError, NotFound

__all__ = [
    "EXTENSIONS",
    "ID_PATTERN",
    "ResultStore",
    "StoredFile",
    "image_uri",
    "read_regular",
    "sweep_partial",
    "write_atomic",
]

ID_PATTERN = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{8}$")
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
_CONTENT_TYPES = {ext: ct for ct, ext in EXTENSIONS.items()}
_TMP_PREFIX = ".tmp-"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
#: An image without a sidecar older than this is a leftover of a crash, not a write in progress.
_ORPHAN_AGE_S = 60.0


def image_uri(image_id: str) -> str:
    return f"flux://images/{image_id}"


@dataclass(frozen=True)
class StoredFile:
    """Where one stored image is and what its sidecar says."""

    id: str
    path: Path
    content_type: str
    sidecar: dict[str, Any]

    @property
    def uri(self) -> str:
        return image_uri(self.id)


class ResultStore:
    """Atomic, crash-safe storage of result images and their sidecars."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        """Create the folder, or say clearly why it cannot be used."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{_TMP_PREFIX}{os.getpid()}-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"FLUX_MCP_OUTPUT_DIR={self.root} cannot be written ({exc.strerror}); "
                "set it to a folder this user can write."
            ) from exc

    def new_id(self) -> str:
        return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"

    def save(self, image_id: str, data: bytes, content_type: str, sidecar: dict[str, Any]) -> StoredFile:
        """Write the image, then its sidecar, each atomically. Returns where it landed."""
        if not ID_PATTERN.match(image_id):
            raise ValueError(f"not a store id: {image_id!r}")
        ext = EXTENSIONS.get(content_type)
        if ext is None:
            raise ValueError(f"unsupported content type {content_type!r}")
        path = self.root / f"{image_id}{ext}"
        record = {"id": image_id, "file": path.name, "content_type": content_type, **sidecar}
        # Both files are complete on disk before either is renamed into place, so a kill between the
        # two renames (microseconds) is the only way to leave an image without its sidecar.
        image_tmp = _write_temp(path, data)
        try:
            sidecar_tmp = _write_temp(self._sidecar_path(image_id), _to_json(record))
        except BaseException:
            image_tmp.unlink(missing_ok=True)
            raise
        os.replace(image_tmp, path)
        os.replace(sidecar_tmp, self._sidecar_path(image_id))
        return StoredFile(image_id, path, content_type, record)

    def lookup(self, image_id: str) -> StoredFile:
        """The stored image with this id; NotFound when there is none (or the id is not one of ours)."""
        if not ID_PATTERN.match(image_id):
            raise NotFound(
                f"{image_id!r} is not an image id (ids look like 20261125-181500-1a2b3c4d; "
                "use the id or flux://images/<id> from an earlier result)."
            )
        try:
            record = json.loads(read_regular(self._sidecar_path(image_id)).decode("utf-8"))
        except FileNotFoundError:
            raise NotFound(f"No stored image has the id {image_id} in {self.root}.") from None
        except (OSError, ValueError) as exc:
            raise NotFound(f"The sidecar of image {image_id} cannot be read ({_reason(exc)}).") from None
        path = self.root / str(record.get("file", "")) if isinstance(record, dict) else self.root
        content_type = _CONTENT_TYPES.get(path.suffix)
        if path.parent != self.root or content_type is None or not path.is_file() or path.is_symlink():
            raise NotFound(f"The file of image {image_id} is missing from {self.root}.")
        return StoredFile(image_id, path, content_type, record)

    def read(self, image_id: str) -> tuple[bytes, StoredFile]:
        stored = self.lookup(image_id)
        try:
            return read_regular(stored.path), stored
        except OSError as exc:
            raise NotFound(f"The file of image {image_id} cannot be read ({_reason(exc)}).") from None

    def sweep(self) -> int:
        """Remove leftovers of crashed writers; returns how many files went."""
        if not self.root.is_dir():
            return 0
        removed = sweep_partial(self.root)
        now = time.time()
        for entry in self.root.iterdir():
            try:
                if entry.suffix in _CONTENT_TYPES and ID_PATTERN.match(entry.stem):
                    orphan = not self._sidecar_path(entry.stem).exists()
                    if orphan and now - entry.stat().st_mtime > _ORPHAN_AGE_S:
                        entry.unlink()
                        removed += 1
            except OSError:
                continue
        return removed

    def _sidecar_path(self, image_id: str) -> Path:
        return self.root / f"{image_id}.json"


def write_atomic(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    ``mode`` is filtered by the umask like any new file (0o600: readable by this user alone).
    """
    os.replace(_write_temp(path, data, mode), path)


def read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file; a symlink or a FIFO planted there raises OSError."""
    descriptor = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | getattr(os, "O_BINARY", 0))
    with os.fdopen(descriptor, "rb") as stream:
        if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return stream.read()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "it is a symlink, which the store does not follow"
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


def _write_temp(path: Path, data: bytes, mode: int = 0o666) -> Path:
    """``data`` flushed to a hidden temp file beside ``path`` (named after this process, for sweeping).

    Created with ``mode`` minus the umask: results follow the user's umask like any file they save.
    """
    tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{path.name}")
    try:
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
        with os.fdopen(descriptor, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def sweep_partial(folder: Path) -> int:
    """Remove the temp files of writers that are no longer alive; returns how many went."""
    removed = 0
    for entry in folder.glob(f"{_TMP_PREFIX}*"):
        if not _pid_alive(_tmp_owner(entry.name)):
            with contextlib.suppress(OSError):
                entry.unlink()
                removed += 1
    return removed


def _to_json(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")


def _tmp_owner(name: str) -> int:
    try:
        return int(name[len(_TMP_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return -1


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

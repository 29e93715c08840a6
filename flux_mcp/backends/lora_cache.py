"""The cache of downloaded LoRA files (FLUX_MCP_LORA_CACHE), keyed by content and bounded by bytes.

Layout (one flat folder):

- ``sha256-<hex>.safetensors``: a file's bytes, named by their hash, so one file reached through
  several URLs (the same signed URL with a fresh ``?token=`` each day) is kept once;
- ``url-<hash of the URL>.ref``: which content a URL gave last time (a hex digest, nothing else: the
  URL itself, whose query may hold a token, is never written down).

A download streams into a hidden staging file while it is hashed and counted (``Staging``); only a
file that passed the caller's check is renamed into place, so a refused, cut or oversized download
leaves nothing behind. After each new file the least recently used files go until the folder holds
at most ``max_bytes`` (FLUX_MCP_LORA_CACHE_MB); a hit refreshes a file's time.

Every method blocks (file I/O); async callers use worker threads. This module knows nothing about
URLs' fetching, safetensors or the pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["LoraCache", "Staging"]

_CONTENT_PREFIX = "sha256-"
_SUFFIX = ".safetensors"


class Staging:
    """A download on its way into the cache: a hidden temp file, its running hash and size."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(prefix=".staging-", suffix=_SUFFIX, dir=folder)
        self.path = Path(name)
        self._file: IO[bytes] = os.fdopen(descriptor, "w+b")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self, check: Callable[[IO[bytes], int], None]) -> str:
        """Flush, run ``check(stream, size)`` on the written bytes (it raises to refuse); the digest."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.seek(0)
        check(self._file, self.size)
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class LoraCache:
    """Content-addressed LoRA files in ``root``, at most ``max_bytes`` of them."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def content_path(self, digest: str) -> Path:
        return self.root / f"{_CONTENT_PREFIX}{digest}{_SUFFIX}"

    def lookup(self, url: str) -> tuple[Path, str] | None:
        """(file, digest) that ``url`` gave before, if it is still here; its use time is refreshed."""
        try:
            digest = self._ref(url).read_text("ascii").strip()
            path = self.content_path(digest)
            os.utime(path)
        except (OSError, ValueError):
            return None
        return path, digest

    def staging(self) -> Staging:
        return Staging(self.root)

    def commit(self, staging: Staging, url: str, digest: str) -> Path:
        """Move a finished download into place under its digest, remember the URL, evict old files."""
        path = self.content_path(digest)
        os.replace(staging.path, path)
        ref = self._ref(url)
        tmp = ref.with_name(f".{ref.name}.{secrets.token_hex(4)}")
        tmp.write_text(digest, "ascii")
        os.replace(tmp, ref)
        self.evict(keep=path)
        return path

    def evict(self, keep: Path) -> None:
        """Delete the least recently used files (never ``keep``) until the cache fits ``max_bytes``."""
        entries = []
        for entry in self.root.glob(f"{_CONTENT_PREFIX}*{_SUFFIX}"):
            with contextlib.suppress(OSError):
                info = entry.stat()
                entries.append((info.st_mtime, info.st_size, entry))
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries, key=lambda item: item[0]):
            if total <= self.max_bytes:
                break
            if entry != keep:
                entry.unlink(missing_ok=True)
                total -= size
        self._drop_dangling_refs()

    def _drop_dangling_refs(self) -> None:
        for ref in self.root.glob("url-*.ref"):
            with contextlib.suppress(OSError, ValueError):
                if not self.content_path(ref.read_text("ascii").strip()).exists():
                    ref.unlink()

    def _ref(self, url: str) -> Path:
        return self.root / f"url-{hashlib.sha256(url.encode()).hexdigest()[:32]}.ref"

"""One guard for every local file the server reads for a caller: input images and LoRA files.

A caller names a path; the server may read it only when it lies inside one of the allowed folders
(FLUX_MCP_INPUT_ROOTS, the output dir, for LoRAs also the LoRA cache). Checking a path and then
opening it by name again is a race a local user wins by swapping a symlink in between, so here the
check and the read are one descriptor:

1. the path is resolved (symlinks and ``..``) and must lie inside a root;
2. it is opened component by component from the root's own descriptor with ``O_NOFOLLOW``, so a
   component swapped for a symlink after step 1 makes the open fail instead of leaving the root;
3. the opened descriptor must be a regular file (``fstat``): folders, devices (``/dev/zero``) and
   FIFOs are refused at once (the open is non-blocking, so a FIFO never hangs a thread);
4. bytes are read from that same descriptor, never more than the size limit (+1 to notice).

Messages never say whether a path outside the folders exists, nor where a symlink points: only that
the path is outside the folders, missing, or not a readable file.

This module knows nothing about images, LoRAs, settings or MCP; callers pass the roots, the limit,
the field and the names of the settings that change them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from .errors import InvalidRequest

__all__ = ["GuardedPath", "open_inside", "read_capped", "read_inside"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_WALKS_BY_DESCRIPTOR = os.open in os.supports_dir_fd and bool(_NOFOLLOW)
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class GuardedPath:
    """How a caller's path is judged, and how messages about it are worded."""

    field: str
    roots: Sequence[Path]
    #: What the file is, for messages ("image file", "LoRA file").
    what: str = "file"
    #: The setting that adds folders, for messages.
    roots_setting: str = "FLUX_MCP_INPUT_ROOTS"
    error: type[InvalidRequest] = InvalidRequest

    def fail(self, shown: str, problem: str) -> InvalidRequest:
        return self.error(f"{self.field}: {shown} {problem}", field=self.field)


@contextlib.contextmanager
def open_inside(raw: str, guard: GuardedPath) -> Iterator[tuple[BinaryIO, os.stat_result, Path]]:
    """The regular file at ``raw`` (a path or file:// URL) opened read-only, if it lies inside a root.

    Yields (binary file, its fstat, its resolved path). Raises ``guard.error`` naming ``guard.field``.
    """
    text = unquote(urlsplit(raw).path) if raw.lower().startswith("file://") else raw
    shown = repr(text if len(text) <= 200 else text[:197] + "...")
    if "\x00" in text:
        raise guard.fail("the path", "contains a NUL character.")
    lexical = Path(os.path.abspath(os.path.expanduser(text)))
    real_roots = [Path(os.path.realpath(root.expanduser())) for root in guard.roots]
    outside = guard.fail(
        shown,
        f"is outside the folders this server may read ({', '.join(map(str, real_roots))}). "
        f"Move the {guard.what} there or add its folder to {guard.roots_setting}.",
    )
    lexical_roots = [Path(os.path.abspath(root.expanduser())) for root in guard.roots]
    if not any(lexical.is_relative_to(root) for root in (*lexical_roots, *real_roots)):
        raise outside  # said before looking at the file system: nothing about what exists out there
    real = Path(os.path.realpath(lexical))
    root = next((r for r in sorted(real_roots, key=lambda p: len(p.parts)) if real.is_relative_to(r)), None)
    if root is None:
        raise outside  # a symlink leads out: where it points is not echoed
    try:
        descriptor = _open_below(root, real.relative_to(root).parts)
    except FileNotFoundError:
        raise guard.error(
            f"{guard.field}: no file at {shown}. Give an existing file path, an https URL, a data URI "
            "or flux://images/<id>.",
            field=guard.field,
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise guard.fail(shown, "changed while it was being opened; try again.") from None
        raise guard.fail(shown, f"cannot be read ({exc.strerror}).") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise guard.fail(shown, f"is not a regular file (a folder, device or pipe); give a {guard.what}.")
    with os.fdopen(descriptor, "rb", buffering=0) as stream:
        yield stream, info, real  # type: ignore[misc]


def read_inside(raw: str, guard: GuardedPath, max_bytes: int, size_setting: str) -> tuple[bytes, Path]:
    """The whole file at ``raw`` (see ``open_inside``), refused beyond ``max_bytes``."""
    with open_inside(raw, guard) as (stream, info, real):
        too_big = guard.fail(
            repr(real.name),
            f"is larger than {max_bytes / 2**20:g} MiB ({size_setting}); shrink it or raise the limit.",
        )
        if info.st_size > max_bytes:
            raise too_big
        data = read_capped(stream, max_bytes)
        if data is None:  # it grew after fstat
            raise too_big
        return data, real


def read_capped(stream: BinaryIO, max_bytes: int) -> bytes | None:
    """At most ``max_bytes`` from ``stream``; None when there is more."""
    parts: list[bytes] = []
    left = max_bytes + 1
    while left > 0:
        chunk = stream.read(min(_CHUNK, left))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    data = b"".join(parts)
    return None if len(data) > max_bytes else data


def _open_below(root: Path, parts: Sequence[str]) -> int:
    """A read-only descriptor of ``root/parts...``, no component followed if it is a symlink."""
    final = os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _BINARY
    if not _WALKS_BY_DESCRIPTOR or not parts:
        # No openat here (Windows): open the resolved path, refusing a final symlink at least.
        return os.open(root.joinpath(*parts), final)
    directory = os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    try:
        for name in parts[:-1]:
            below = os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=directory)
            os.close(directory)
            directory = below
        return os.open(parts[-1], final, dir_fd=directory)
    finally:
        os.close(directory)

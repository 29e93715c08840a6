"""LoRA files and adapters for the local backend.

``LoraFiles`` turns ``loras[i].path`` into a verified ``.safetensors`` file on this machine (event-loop
side; its blocking parts run in worker threads). A path is one of:

- a local file, inside the folders the server may read (FLUX_MCP_INPUT_ROOTS, the output dir and
  FLUX_MCP_LORA_CACHE), checked and hashed through one descriptor by ``pathguard``;
- an http(s) URL, streamed through ``netguard.fetch_url`` (address guard, FLUX_MCP_MAX_LORA_MB cap
  from Content-Length and while streaming) straight to disk into ``lora_cache.LoraCache``: kept by
  content, bounded by FLUX_MCP_LORA_CACHE_MB, a refused download leaves nothing; later requests
  (and other server processes) reuse it;
- a Hugging Face repo id, ``owner/name`` or ``owner/name/path/file.safetensors``, fetched with
  huggingface_hub's ``hf_hub_download`` (its cache, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` apply) after
  the Hub said its size is within FLUX_MCP_MAX_LORA_MB.

Safety: pickle formats (.bin, .pt, .pth, .ckpt, .pkl) can run code when loaded and are refused by
name; and whatever its name says, a file must parse as safetensors by its content (the header is
checked here before anything is cached or loaded, and the tensors are read with safetensors' own
loader; neither ever unpickles).

``AdapterCache`` owns the adapters inside the pipeline (GPU worker thread only): one adapter per
distinct file content, named by the content hash, the least recently used evicted beyond
``capacity`` adapters or ``max_bytes`` of LoRA files (FLUX_MCP_MAX_ADAPTER_MB). After each load it checks that the adapter really reached the model (diffusers only
logs a warning when no key matches) and removes a half-loaded one. Per request it activates exactly
that request's adapters with their scales, or switches LoRA off, so a LoRA never leaks into the
next request.

This module knows nothing about MCP, presets, the result store or how the pipeline is called.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from .. import netguard
from ..errors import BackendError, BackendUnavailable, InvalidRequest
from ..pathguard import GuardedPath, open_inside
from .lora_cache import LoraCache

if TYPE_CHECKING:
    import torch

    from ..config import Settings

__all__ = ["AdapterCache", "LoraFile", "LoraFiles", "ModuleReport", "safetensors_problem"]

_MIB = 1024 * 1024
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
#: diffusers' default LoRA file name, chosen when a repo holds several .safetensors files.
_DEFAULT_HUB_FILE = "pytorch_lora_weights.safetensors"
#: safetensors itself refuses headers above 100 MB.
_MAX_HEADER_BYTES = 100 * _MIB
_HASH_CHUNK = 8 * _MIB
_FORMATS_HINT = "FLUX.2 [klein] LoRAs in diffusers, PEFT/fal, BFL/ai-toolkit or kohya format load"


@dataclass(frozen=True)
class LoraFile:
    """A verified LoRA file of one request."""

    path: Path
    sha256: str
    #: What messages call it: the file name, the URL without its query, or repo/file.
    label: str
    #: The request field it came from, e.g. ``loras.1.path``.
    field: str
    #: Bytes on disk (what an adapter costs, roughly, once loaded).
    size: int = 0

    @property
    def adapter_name(self) -> str:
        """Named by content, so one file under two paths is one adapter (and peft forbids dots)."""
        return f"lora_{self.sha256[:16]}"


# ---------------------------------------------------------------------------------------------
# Files


class LoraFiles:
    """Resolves request paths to verified local files; downloads and hashes are cached."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._max_bytes = int(settings.max_lora_mb * _MIB)
        self._hashes: dict[tuple[int, int, int, int], str] = {}
        self._download_locks: dict[str, anyio.Lock] = {}
        self._cache = LoraCache(settings.lora_cache, int(settings.lora_cache_mb * _MIB))

    async def resolve(self, index: int, raw: str) -> LoraFile:
        """The file behind ``loras[index].path``; InvalidRequest (naming the field) when unusable."""
        field = f"loras.{index}.path"
        text = raw.strip()
        if text.lower().startswith(("http://", "https://")):
            path, label, digest = await self._download(text, field)
        elif await anyio.to_thread.run_sync(_is_local, text):
            path, label, digest = await anyio.to_thread.run_sync(self._local, text, field)
        elif _REPO_ID.match("/".join(text.split("/")[:2])):
            path, label = await anyio.to_thread.run_sync(self._from_hub, text, field)
            digest = await anyio.to_thread.run_sync(self._verify, path, label, field)
        else:
            raise InvalidRequest(
                f"{field}: {text!r} is neither an existing local file, an https URL nor a Hugging Face "
                "repo id (owner/name or owner/name/file.safetensors).",
                field=field,
            )
        size = await anyio.to_thread.run_sync(lambda: path.stat().st_size)
        return LoraFile(path=path, sha256=digest, label=label, field=field, size=size)

    # -- the three sources ----------------------------------------------------------------------

    def _local(self, text: str, field: str) -> tuple[Path, str, str]:
        """Checked and hashed through one descriptor (``pathguard``): no swap between check and read."""
        guard = GuardedPath(
            field, (*self._settings.allowed_input_roots, self._settings.lora_cache), what="LoRA file"
        )
        with open_inside(text, guard) as (stream, info, real):
            _refuse_pickle(real.name, real.name, field)
            digest = self._checked_digest(stream, info, real.name, field)
        return real, real.name, digest

    async def _download(self, url: str, field: str) -> tuple[Path, str, str]:
        """Streamed to disk through the guard (never whole in memory), checked, kept by content."""
        label = _url_label(url)
        _refuse_pickle(PurePosixPath(urlsplit(url).path).name, label, field)
        # One download per URL even when several requests ask for it at once.
        lock = self._download_locks.setdefault(url, anyio.Lock())
        async with lock:
            cached = await anyio.to_thread.run_sync(self._cache.lookup, url)
            if cached is not None:
                return cached[0], label, cached[1]
            staging = await anyio.to_thread.run_sync(self._cache.staging)
            try:

                async def sink(chunk: bytes) -> None:
                    await anyio.to_thread.run_sync(staging.write, chunk)

                await netguard.fetch_url(
                    url,
                    allow_private=self._settings.allow_private_urls,
                    max_bytes=self._max_bytes,
                    timeout_s=self._settings.download_timeout_s,
                    what="LoRA file",
                    size_setting="FLUX_MCP_MAX_LORA_MB",
                    field=field,
                    sink=sink,
                )

                def check(stream: IO[bytes], size: int) -> None:
                    _raise_unless_safetensors(stream, size, label, field)

                digest = await anyio.to_thread.run_sync(staging.finish, check)
                path = await anyio.to_thread.run_sync(self._cache.commit, staging, url, digest)
            finally:
                await anyio.to_thread.run_sync(staging.discard)
        return path, label, digest

    def _from_hub(self, text: str, field: str) -> tuple[Path, str]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        parts = text.split("/")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        _refuse_odd_hub_name(filename, field)
        try:
            filename = filename or _pick_hub_file(repo_id, field)
            _refuse_pickle(filename, f"{repo_id}/{filename}", field)
            if not filename.endswith(".safetensors"):
                raise InvalidRequest(
                    f"{field}: {repo_id}/{filename} is not a .safetensors file; only safetensors LoRAs are loaded.",
                    field=field,
                )
            self._refuse_large_hub_file(repo_id, filename, field)
            return Path(hf_hub_download(repo_id, filename)), f"{repo_id}/{filename}"
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise InvalidRequest(
                f"{field}: the Hugging Face repo {repo_id} does not exist or is private/gated "
                "(accept its license on huggingface.co and set HF_TOKEN).",
                field=field,
            ) from exc
        except LocalEntryNotFoundError as exc:
            raise BackendUnavailable(
                f"{field}: {repo_id}/{filename} is not in the local Hugging Face cache and the Hub cannot be "
                "reached (no network, or HF_HUB_OFFLINE=1). Download it once while online, or pass a local path.",
            ) from exc
        except EntryNotFoundError as exc:
            raise InvalidRequest(f"{field}: {repo_id} has no file {filename}.", field=field) from exc
        except (HfHubHTTPError, OSError) as exc:
            raise BackendError(
                f"{field}: downloading {repo_id}/{filename} from Hugging Face failed: {exc}"
            ) from exc

    def _refuse_large_hub_file(self, repo_id: str, filename: str, field: str) -> None:
        """Ask the Hub for the file's size before downloading it (skipped when offline: then only the
        local cache is used, and ``_verify`` checks the size of what is there)."""
        import httpx
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

        if constants.HF_HUB_OFFLINE:
            return
        try:
            size = get_hf_file_metadata(hf_hub_url(repo_id, filename)).size
        except httpx.TransportError:
            return  # no network: hf_hub_download falls back to the local cache (or says it cannot)
        if size is not None and size > self._max_bytes:
            raise self._too_big(f"{repo_id}/{filename}", field, size)

    # -- checks ---------------------------------------------------------------------------------

    def _verify(self, path: Path, label: str, field: str) -> str:
        """Size cap and safetensors header check of a Hub file; the content's sha256."""
        try:
            with path.open("rb") as stream:
                return self._checked_digest(stream, os.fstat(stream.fileno()), label, field)
        except FileNotFoundError:
            raise InvalidRequest(f"{field}: no file at {label}.", field=field) from None
        except OSError as exc:
            raise InvalidRequest(f"{field}: cannot read {label}: {exc.strerror}.", field=field) from None

    def _checked_digest(self, stream: IO[bytes], info: os.stat_result, label: str, field: str) -> str:
        """Size cap and header check on an open file; its sha256 (memoised by device, inode and time)."""
        if info.st_size > self._max_bytes:
            raise self._too_big(label, field, info.st_size)
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if key in self._hashes:
            return self._hashes[key]
        _raise_unless_safetensors(stream, info.st_size, label, field)
        stream.seek(0)
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
        self._hashes[key] = digest
        return digest

    def _too_big(self, label: str, field: str, size: int) -> InvalidRequest:
        return InvalidRequest(
            f"{field}: {label} is {size / _MIB:,.1f} MiB, larger than {self._settings.max_lora_mb:g} MiB "
            "(FLUX_MCP_MAX_LORA_MB); nothing was downloaded. Use a smaller LoRA or raise the limit.",
            field=field,
        )


def _is_local(text: str) -> bool:
    """A path-looking string, or any existing file (a relative path could also read as owner/name)."""
    if text.startswith(("/", "~", "./", "../", "file://")) or re.match(r"^[A-Za-z]:[\\/]", text):
        return True
    return Path(text).expanduser().is_file()


def _pick_hub_file(repo_id: str, field: str) -> str:
    """The repo's one .safetensors file (or diffusers' default name among several)."""
    import httpx
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        files = HfApi().list_repo_files(repo_id)
    except (OfflineModeIsEnabled, httpx.TransportError, OSError):
        # Offline: look at what the local cache holds of this repo.
        snapshot = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.safetensors"]))
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.safetensors")]
    candidates = sorted(f for f in files if f.endswith(".safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    if _DEFAULT_HUB_FILE in candidates:
        return _DEFAULT_HUB_FILE
    if not candidates:
        raise InvalidRequest(
            f"{field}: the Hugging Face repo {repo_id} holds no .safetensors file.", field=field
        )
    shown = ", ".join(candidates[:8]) + (" ..." if len(candidates) > 8 else "")
    raise InvalidRequest(
        f"{field}: {repo_id} holds several .safetensors files ({shown}); name one as {repo_id}/<file>.",
        field=field,
    )


def _refuse_pickle(name: str, label: str, field: str) -> None:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        raise InvalidRequest(
            f"{field}: {label} is a pickle file ({suffix}); pickle formats can run code when loaded and are "
            "refused. Use the .safetensors version of this LoRA (or convert it).",
            field=field,
        )


def _url_label(url: str) -> str:
    """The URL without query and fragment: those may carry access tokens."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]  # never user:password
    return f"{parts.scheme}://{host}{parts.path}"


def _refuse_odd_hub_name(filename: str, field: str) -> None:
    """A file name inside a Hub repo is a plain relative path: no '..', no leading '/', no backslash."""
    if filename.startswith("/") or "\\" in filename or any(p in ("..", ".") for p in filename.split("/")):
        raise InvalidRequest(
            f"{field}: {filename[:120]!r} is not a file name inside a Hugging Face repo; give "
            "owner/name/path/to/file.safetensors without '..', '.' or a leading '/'.",
            field=field,
        )


def _raise_unless_safetensors(stream: IO[bytes], size: int, label: str, field: str) -> None:
    try:
        problem = safetensors_problem(stream, size)
    except RecursionError:  # a header of JSON nested thousands deep
        problem = "its header is nested too deeply to be a safetensors header"
    if problem is not None:
        raise InvalidRequest(
            f"{field}: {label} is not a safetensors file ({problem}). Only .safetensors LoRAs are loaded; "
            "pickle formats (.bin, .pt, .ckpt, .pth) are refused.",
            field=field,
        )


def safetensors_problem(stream: IO[bytes], size: int) -> str | None:
    """Why the bytes are not a safetensors file, or None when they are.

    Layout: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
    {dtype, shape, data_offsets}, then the data; every offset must lie inside the data.

    The verdict comes from parsing alone. The first bytes only name the likely format in the message
    once parsing failed: a safetensors file starts with its header length, so any first byte is
    possible (0x80, a pickle's first byte, for every header length of 128 mod 256). A file without
    tensors passes here; the adapter check refuses it later ("no LoRA keys match").
    """
    head = stream.read(8)
    if len(head) < 8:
        return "it is too short"
    header_len = int.from_bytes(head, "little")
    if header_len < 2 or header_len > min(_MAX_HEADER_BYTES, size - 8):
        return _archive_kind(head) or "its header length is invalid"
    try:
        header = json.loads(stream.read(header_len))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return _archive_kind(head) or "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data_size = size - 8 - header_len
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    for name, entry in tensors.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            return f"the entry for {str(name)[:80]!r} is invalid"
    return None


def _archive_kind(head: bytes) -> str | None:
    """What a file that failed to parse as safetensors probably is, judged by its first bytes."""
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive, e.g. a PyTorch .pt/.bin file"
    if head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocols 2-5
        return "it is a pickle, e.g. a PyTorch .pt/.bin file"
    return None


# ---------------------------------------------------------------------------------------------
# Adapters in the pipeline


class AdapterCache:
    """The pipeline's LoRA adapters; used only from the GPU worker thread, one job at a time."""

    def __init__(self, capacity: int = 8, max_bytes: int | None = None) -> None:
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> label, oldest first
        #: How many adapters were loaded into the pipeline so far (a scale change loads nothing).
        self.loads = 0
        #: adapter name -> which of its file's modules reached the transformer (see ``ModuleReport``)
        self.reports: dict[str, ModuleReport] = {}
        self._sizes: dict[str, int] = {}  # adapter name -> bytes of its file

    def activate(
        self, pipe: Any, loras: Sequence[tuple[LoraFile, float]], report: Callable[[str], None]
    ) -> list[dict[str, Any]]:
        """Load what is missing, then make exactly these adapters active with these scales.

        Returns what was applied, for the result's details.
        """
        wanted = {lora.adapter_name for lora, _ in loras}
        for lora, _scale in loras:
            if lora.adapter_name not in self._loaded:
                self._make_room(pipe, keep=wanted, incoming=lora.size)
                report(f"loading LoRA {lora.label}")
                self._load(pipe, lora)
                self._sizes[lora.adapter_name] = lora.size
            self._loaded.move_to_end(lora.adapter_name)
        if not loras:
            if self._loaded:
                pipe.disable_lora()
            return []
        weights: dict[str, float] = {}
        for lora, scale in loras:  # the same file twice adds up, as two copies of it would
            weights[lora.adapter_name] = weights.get(lora.adapter_name, 0.0) + scale
        # set_adapters does not undo an earlier disable_lora (seen on diffusers 0.42.1 / peft 0.21).
        pipe.enable_lora()
        pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
        return [
            {
                "path": lora.label,
                "adapter": lora.adapter_name,
                "scale": scale,
                **self.reports[lora.adapter_name].details(),
            }
            for lora, scale in loras
        ]

    def notes(self, loras: Sequence[tuple[LoraFile, float]]) -> list[str]:
        """A note for every LoRA of this request that was applied only in part."""
        return [
            note
            for lora in dict.fromkeys(lora for lora, _ in loras)
            if (note := self.reports[lora.adapter_name].note(lora.label))
        ]

    def clear(self) -> None:
        self._loaded.clear()
        self.reports.clear()
        self._sizes.clear()

    def _make_room(self, pipe: Any, keep: set[str], incoming: int) -> None:
        """Unload the least recently used adapters (not ``keep``) until one more of ``incoming`` bytes fits."""
        while self._full(incoming):
            victim = next((name for name in self._loaded if name not in keep), None)
            if victim is None:
                return
            pipe.delete_adapters([victim])
            del self._loaded[victim]
            self.reports.pop(victim, None)
            self._sizes.pop(victim, None)

    def _full(self, incoming: int) -> bool:
        if len(self._loaded) >= self._capacity:
            return True
        loaded = sum(self._sizes.get(name, 0) for name in self._loaded)
        return self._max_bytes is not None and bool(self._loaded) and loaded + incoming > self._max_bytes

    def _load(self, pipe: Any, lora: LoraFile) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = _fold_alphas(load_file(str(lora.path)))
        except (SafetensorError, OSError) as exc:
            raise InvalidRequest(f"{lora.field}: cannot read {lora.label}: {exc}.", field=lora.field) from exc
        name = lora.adapter_name
        self.loads += 1
        try:
            pipe.load_lora_weights(state, adapter_name=name)
        except (ValueError, RuntimeError, KeyError, IndexError) as exc:
            self._discard(pipe, name)
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise InvalidRequest(
                f"{lora.field}: {lora.label} does not fit this model ({reason}). It was probably trained for "
                f"another model; {_FORMATS_HINT}.",
                field=lora.field,
            ) from exc
        if not _reaches_model(pipe, name):
            self._discard(pipe, name)
            raise InvalidRequest(
                f"{lora.field}: no LoRA keys in {lora.label} match this model (the FLUX.2 [klein] transformer); "
                f"it was probably trained for another model. {_FORMATS_HINT}.",
                field=lora.field,
            )
        self._loaded[name] = lora.label
        self.reports[name] = ModuleReport.of(pipe, state, name)

    @staticmethod
    def _discard(pipe: Any, name: str) -> None:
        if name in pipe.get_list_adapters().get("transformer", []):
            pipe.delete_adapters([name])


#: A LoRA key = its module's path + one of these endings (diffusers/PEFT, kohya, LoKr, alpha, DoRA).
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:(?:lora_[AB]|lora_down|lora_up|lora\.down|lora\.up)\.(?:weight|bias)"
    r"|lokr_\w+|alpha|dora_scale)$"
)
#: How many dropped module names a note lists.
_SHOWN_DROPPED = 5


@dataclass(frozen=True)
class ModuleReport:
    """Which of a LoRA file's modules reached the transformer, and which diffusers dropped.

    diffusers drops parts of a LoRA with at most a log line: text-encoder modules, kohya keys its
    converter does not know, modules of blocks this model lacks. Each of the file's modules is
    converted alone by diffusers' own converter (``pipe.lora_state_dict``) to see which layers it
    targets; it counts as applied when the loaded adapter wraps at least one of them.
    """

    modules: int
    applied: int
    dropped: tuple[str, ...]

    @classmethod
    def of(cls, pipe: Any, state: dict[str, Any], adapter: str) -> ModuleReport:
        wrapped = {
            path
            for path, module in pipe.transformer.named_modules()
            if adapter in getattr(module, "lora_A", {})
        }
        groups: dict[str, dict[str, Any]] = {}
        for key, tensor in state.items():
            match = _LORA_KEY.match(key)
            groups.setdefault(match["module"] if match else key, {})[key] = tensor
        dropped = tuple(module for module, keys in groups.items() if not _targets(pipe, keys) & wrapped)
        return cls(modules=len(groups), applied=len(groups) - len(dropped), dropped=dropped)

    def details(self) -> dict[str, Any]:
        return {
            "modules": self.modules,
            "modules_applied": self.applied,
            "modules_dropped": list(self.dropped),
        }

    def note(self, label: str) -> str | None:
        if not self.dropped:
            return None
        shown = ", ".join(self.dropped[:_SHOWN_DROPPED])
        more = f" and {len(self.dropped) - _SHOWN_DROPPED} more" if len(self.dropped) > _SHOWN_DROPPED else ""
        return (
            f"LoRA {label}: {self.applied} of its {self.modules} modules were applied; {len(self.dropped)} "
            f"were dropped because they target nothing in this model's transformer (text-encoder keys, "
            f"unknown or missing layers): {shown}{more}."
        )


def _targets(pipe: Any, keys: dict[str, Any]) -> set[str]:
    """The transformer layers (dotted paths) that diffusers' converter maps these keys of one module to."""
    try:
        converted = pipe.lora_state_dict(dict(keys))
    except (ValueError, KeyError, IndexError, RuntimeError):
        return set()
    return {
        match["module"].removeprefix("transformer.")
        for key in converted
        if key.startswith("transformer.") and (match := _LORA_KEY.match(key))
    }


def _reaches_model(pipe: Any, name: str) -> bool:
    """The adapter is registered and wraps at least one layer of the transformer."""
    if name not in pipe.get_list_adapters().get("transformer", []):
        return False
    return any(name in getattr(module, "lora_A", {}) for module in pipe.transformer.modules())


def _fold_alphas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold ``.alpha`` keys of non-kohya files into ``lora_A`` (scale alpha / rank).

    diffusers converts kohya alphas itself but raises ValueError on the ``.alpha`` keys that some
    BFL/ai-toolkit exports carry; the update they describe is the same with the scale folded in.
    """
    if not any(key.endswith(".alpha") for key in state) or any(".lora_down." in key for key in state):
        return state
    folded = dict(state)
    for key in [k for k in state if k.endswith(".alpha")]:
        base = key.removesuffix(".alpha")
        down = folded.get(f"{base}.lora_A.weight")
        if down is not None:
            rank = down.shape[0]
            folded[f"{base}.lora_A.weight"] = down * (float(state[key]) / rank)
        del folded[key]
    return folded

"""The CNS gamma matrix on disk: one calibrated file per model in the user cache dir.

``flux-mcp calibrate-cns`` (``calibration.py``) writes it with ``save_gamma_matrix``; the local
backend reads it through ``GammaCache``, which re-reads a replaced file at the next CNS run (no
restart) and refuses one whose metadata names another model. A file holds the (steps x bands)
matrix ``gamma``, [ours] the noise level σ of each row (``sigmas``, by which rows are mapped onto a
run) and string metadata (model id, latent channel count, steps, guidance, ...). Writes are atomic.

torch and safetensors only; this module knows nothing about schedulers, pipelines or requests.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "Gamma",
    "GammaCache",
    "gamma_cache_path",
    "load_cached_gamma",
    "load_gamma_matrix",
    "save_gamma_matrix",
]

_GAMMA_KEY = "gamma"
_SIGMAS_KEY = "sigmas"


def save_gamma_matrix(
    path: Path | str, matrix: torch.Tensor, meta: dict[str, Any], sigmas: torch.Tensor | None = None
) -> None:
    """Write a gamma matrix (and the σ of each row) as safetensors; ``meta`` (model id, ...) as strings."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    metadata = {str(key): str(value) for key, value in meta.items()}
    tensors = {_GAMMA_KEY: matrix.detach().to("cpu", torch.float32).contiguous()}
    if sigmas is not None:
        tensors[_SIGMAS_KEY] = sigmas.detach().to("cpu", torch.float32).flatten().contiguous()
    save_file(tensors, str(partial), metadata)
    partial.replace(target)  # atomic: a reader never sees half a file


def load_gamma_matrix(path: Path | str) -> tuple[torch.Tensor, dict[str, str], torch.Tensor | None]:
    """Read a file written by ``save_gamma_matrix``: (matrix, metadata, row sigmas or None).

    ValueError when it is not a usable one.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            names = set(handle.keys())  # a safe_open handle is not a mapping: no `in handle`
            matrix = handle.get_tensor(_GAMMA_KEY) if _GAMMA_KEY in names else None
            sigmas = handle.get_tensor(_SIGMAS_KEY) if _SIGMAS_KEY in names else None
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read the CNS gamma matrix {path}: {exc}") from exc
    if matrix is None or matrix.dim() != 2 or min(matrix.shape) < 1:
        raise ValueError(f"{path} holds no (steps x bands) tensor named {_GAMMA_KEY!r}")
    if not torch.isfinite(matrix).all() or matrix.min() < 0 or matrix.max() > 1:
        raise ValueError(f"{path}: a gamma matrix must be finite with values in [0, 1]")
    if sigmas is not None and (sigmas.numel() != matrix.shape[0] or not torch.isfinite(sigmas).all()):
        raise ValueError(f"{path}: {_SIGMAS_KEY!r} must hold one finite sigma per row of the matrix")
    return matrix.to(torch.float32), meta, None if sigmas is None else sigmas.to(torch.float32)


def gamma_cache_path(cache_dir: Path | str, model_id: str) -> Path:
    """Where the calibrated matrix of ``model_id`` (hub id or local directory) is cached.

    The readable part is the id with anything but [A-Za-z0-9._-] replaced; a short hash of the exact
    id keeps two ids that sanitise alike (``a/b`` and ``a_b``) apart.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("._")[:80] or "model"
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:10]
    return Path(cache_dir) / f"cns-gamma-{readable}-{digest}.safetensors"


@dataclass(frozen=True)
class Gamma:
    """A calibrated gamma matrix, ready for ``configure_cns``."""

    matrix: torch.Tensor
    #: The σ of each row; None for a file written before rows were mapped by σ (then: by step fraction).
    sigmas: torch.Tensor | None
    label: str


def load_cached_gamma(
    cache_dir: Path | str, model_id: str, latent_channels: int | None = None
) -> Gamma | None:
    """The cached matrix of ``model_id``; None when not calibrated.

    ValueError when the file is unusable or its metadata names another model (id, or the number of
    latent channels when given), e.g. after FLUX_MCP_MODEL changed: recalibrate then.
    """
    path = gamma_cache_path(cache_dir, model_id)
    if not path.is_file():
        return None
    matrix, meta, sigmas = load_gamma_matrix(path)
    if meta.get("model", model_id) != model_id:
        raise ValueError(f"{path.name} was calibrated for {meta['model']!r}, not {model_id!r}")
    channels = meta.get("latent_channels")
    if latent_channels is not None and channels is not None and channels != str(latent_channels):
        raise ValueError(
            f"{path.name} was calibrated on {channels} latent channels, this model has {latent_channels}"
        )
    return Gamma(matrix, sigmas, f"calibrated: {path.name}")


class GammaCache:
    """The calibrated matrix of the loaded model, re-read whenever its file changes (no restart needed).

    ``current()`` stats the file on each call (cheap) and reloads when it was replaced; a file that
    cannot be used gives (None, why) and the caller uses the stand-in and says why.
    """

    def __init__(self, cache_dir: Path | str, model_id: str, latent_channels: int | None = None) -> None:
        self.path = gamma_cache_path(cache_dir, model_id)
        self._model_id, self._channels, self._cache_dir = model_id, latent_channels, cache_dir
        self._stamp: tuple[int, ...] | None = None
        self._value: tuple[Gamma | None, str | None] = (None, None)

    def current(self) -> tuple[Gamma | None, str | None]:
        try:
            stat = self.path.stat()
            stamp: tuple[int, ...] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            stamp = ()
        if stamp != self._stamp:
            try:
                self._value = (load_cached_gamma(self._cache_dir, self._model_id, self._channels), None)
            except ValueError as exc:
                self._value = (None, str(exc))
            self._stamp = stamp
        return self._value

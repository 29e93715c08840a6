"""``flux-mcp doctor``: a first-run check that says what to fix.

Each check is one line a person (or a host's MCP log) can read: what was found and, when it is not
right, what to change. The same report serves three readers:

- ``flux-mcp doctor`` runs every check, including the ones that cost something: it asks fal whether
  the key is accepted (one free token request; offline it says it could not check) and imports torch
  to look at CUDA and its memory.
- The server writes the quick form (no network, no torch import) to stderr when it starts.
- ``list_presets`` carries the quick form's problems, so an agent can tell its user what is wrong.

The key is never printed: only whether it is set and what fal answered. This module knows the
settings and how backends are chosen; it knows nothing about MCP.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .backends import _cuda_present, local_available
from .config import Settings
from .errors import ConfigError
from .store import ResultStore

__all__ = ["Check", "Report", "diagnose", "log_startup", "run_command", "setup_problems"]

Status = Literal["ok", "warn", "fail", "skip"]

KEYS_PAGE = "https://fal.ai/dashboard/keys"
INSTALL_LOCAL = "pip install 'flux-mcp[local]' (or uv tool install 'flux-mcp[local]')"
#: Below this much GPU memory the 9B pipeline only fits with CPU offload.
MIN_GPU_GIB_WITHOUT_OFFLOAD = 32


@dataclass(frozen=True)
class Check:
    """One finding: ``status`` ok | warn | fail | skip, what was found, and what to change."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"[{self.status}] {self.name}: {self.detail}"
        return f"{text} -> {self.fix}" if self.fix and self.status in ("warn", "fail") else text


@dataclass(frozen=True)
class Report:
    """All findings, in the order a person would fix them."""

    checks: list[Check]

    @property
    def failed(self) -> bool:
        return any(c.status == "fail" for c in self.checks)

    def problems(self) -> list[str]:
        """The lines that need attention (warnings and failures)."""
        return [c.line() for c in self.checks if c.status in ("warn", "fail")]

    def text(self) -> str:
        worst = "problems found" if self.failed else "warnings" if self.problems() else "all good"
        return "\n".join([f"flux-mcp doctor: {worst}", *(f"  {c.line()}" for c in self.checks)])

    def as_json(self) -> dict[str, Any]:
        return {"ok": not self.failed, "checks": [asdict(c) for c in self.checks]}


def diagnose(settings: Settings, *, online: bool = False, deep: bool = False) -> Report:
    """Run every check. ``online`` asks fal about the key; ``deep`` imports torch for CUDA facts."""
    checks = [backend_choice(settings), fal_key_status(settings, online), output_folder(settings)]
    checks += list(input_folders(settings))
    if _local_relevant(settings):
        checks += [local_packages(deep), cuda(settings, deep), model_files(settings), lora_cache(settings)]
    return Report(checks)


# -- which backend -----------------------------------------------------------------------------


def _local_relevant(settings: Settings) -> bool:
    return settings.backend == "local" or (settings.backend == "auto" and not settings.fal_key)


def backend_choice(settings: Settings) -> Check:
    """Which backend a call would use, and why (mirrors ``backends.create_backend``)."""
    if settings.backend == "fal":
        return Check("backend", "ok", "fal (FLUX_MCP_BACKEND=fal)")
    if settings.backend == "local":
        return Check("backend", "ok", "local (FLUX_MCP_BACKEND=local)")
    if settings.fal_key:
        return Check("backend", "ok", "auto picks fal: FAL_KEY is set")
    installed, gpu = local_available(), _cuda_present()
    if installed and gpu:
        return Check(
            "backend", "ok", "auto picks local: no FAL_KEY, the local extra and a CUDA GPU are present"
        )
    missing = " and ".join(
        reason
        for reason, absent in (("the local extra is not installed", not installed), ("no CUDA GPU", not gpu))
        if absent
    )
    return Check(
        "backend",
        "fail",
        f"auto finds no backend: FAL_KEY is not set, and {missing}",
        f"set FAL_KEY for the hosted endpoint ({KEYS_PAGE}), or on a CUDA machine {INSTALL_LOCAL} "
        "and set FLUX_MCP_BACKEND=local",
    )


# -- the fal key -------------------------------------------------------------------------------


def fal_key_status(settings: Settings, online: bool) -> Check:
    """Whether FAL_KEY is set and (online) accepted by fal. The key itself is never shown."""
    if not settings.fal_key:
        if settings.backend == "local" or (
            settings.backend == "auto" and backend_choice(settings).status == "ok"
        ):
            return Check("FAL_KEY", "skip", "not set (not needed for the local backend)")
        return Check("FAL_KEY", "fail", "not set", f"set FAL_KEY to a key from {KEYS_PAGE}")
    if not online:
        return Check("FAL_KEY", "ok", "set (not checked with fal; `flux-mcp doctor` checks it)")
    verdict, why = _ask_fal(settings)
    if verdict == "accepted":
        return Check("FAL_KEY", "ok", "set, and fal accepted it")
    if verdict == "rejected":
        return Check("FAL_KEY", "fail", f"set, but fal rejected it ({why})", f"create a key at {KEYS_PAGE}")
    return Check(
        "FAL_KEY", "warn", f"set; could not check it with fal ({why})", "check the network, then rerun"
    )


def _ask_fal(settings: Settings) -> tuple[Literal["accepted", "rejected", "unknown"], str]:
    """Ask fal's REST API for a CDN upload token: free, and it needs a valid key."""
    import fal_client
    import httpx

    base = (settings.fal_rest_url or fal_client.client.REST_URL).rstrip("/")
    try:
        with httpx.Client(timeout=httpx.Timeout(10.0)) as client:
            response = client.post(
                f"{base}/storage/auth/token?storage_type=fal-cdn-v3",
                headers={"Authorization": f"Key {settings.fal_key}", "Accept": "application/json"},
                json={},
            )
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return "unknown", f"no answer from {base}: {type(exc).__name__}"
    if response.status_code in (401, 403):
        return "rejected", f"HTTP {response.status_code}"
    if response.is_success:
        return "accepted", ""
    return "unknown", f"{base} answered HTTP {response.status_code}"


# -- folders -----------------------------------------------------------------------------------


def output_folder(settings: Settings) -> Check:
    try:
        ResultStore(settings.output_dir).ensure()
    except ConfigError as exc:
        return Check("output folder", "fail", str(exc).split(";")[0], _folder_fix("FLUX_MCP_OUTPUT_DIR"))
    return Check("output folder", "ok", f"{settings.output_dir} is writable")


def input_folders(settings: Settings) -> Iterator[Check]:
    for root in settings.input_roots:
        if root.is_dir():
            yield Check("input folder", "ok", f"{root} exists")
        else:
            yield Check(
                "input folder",
                "fail",
                f"{root} does not exist" if not root.exists() else f"{root} is not a folder",
                f"create it, or remove it from FLUX_MCP_INPUT_ROOTS (folders separated by {os.pathsep!r})",
            )


def _folder_fix(variable: str) -> str:
    return f"set {variable} to a folder this user can write, or fix the folder's permissions"


# -- the local backend -------------------------------------------------------------------------


def local_packages(deep: bool) -> Check:
    """torch and diffusers are installed (``deep``: and import without error)."""
    found = []
    for module in ("torch", "diffusers"):
        if importlib.util.find_spec(module) is None:
            return Check("local extra", "fail", f"{module} is not installed", INSTALL_LOCAL)
        if deep:
            try:
                found.append(f"{module} {importlib.import_module(module).__version__}")
            except Exception as exc:  # a broken install can fail in many ways; report, don't crash
                return Check("local extra", "fail", f"{module} fails to import: {exc}", INSTALL_LOCAL)
    return Check("local extra", "ok", ", ".join(found) if found else "torch and diffusers are installed")


def cuda(settings: Settings, deep: bool) -> Check:
    """A CUDA GPU for the local backend, with its memory when torch may be imported."""
    if settings.device.startswith("cpu"):
        return Check("CUDA", "skip", "FLUX_MCP_DEVICE=cpu: the local backend runs on the CPU (slow)")
    fix = "run on a machine with an NVIDIA GPU and a CUDA build of torch, or set FAL_KEY to use fal"
    if not deep or importlib.util.find_spec("torch") is None:
        if _cuda_present():
            return Check("CUDA", "ok", "an NVIDIA driver is present (`flux-mcp doctor` shows the GPU)")
        return Check("CUDA", "fail", "no NVIDIA driver found", fix)
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        return Check("CUDA", "fail", f"torch sees no CUDA GPU ({build})", fix)
    index = torch.device(settings.device or "cuda").index or 0
    free, total = torch.cuda.mem_get_info(index)
    detail = f"{torch.cuda.get_device_name(index)}: {total / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    if total / 2**30 < MIN_GPU_GIB_WITHOUT_OFFLOAD and settings.offload == "none":
        return Check("CUDA", "warn", detail, "set FLUX_MCP_OFFLOAD=model for a card under 32 GiB")
    return Check("CUDA", "ok", detail)


def model_files(settings: Settings) -> Check:
    """The model is a local pipeline folder, or a Hugging Face repo id whose files are cached."""
    model = settings.model
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return Check("model", "ok", f"{path} (a local pipeline folder)")
        return Check(
            "model", "fail", f"{path} has no model_index.json", "point FLUX_MCP_MODEL at a pipeline folder"
        )
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:  # a path, not "org/name"
        return Check(
            "model", "fail", f"{model} does not exist", "set FLUX_MCP_MODEL to a folder or a repo id"
        )
    cached = _hf_cached(model)
    if cached:
        return Check("model", "ok", f"{model}: in the Hugging Face cache ({cached})")
    return Check(
        "model",
        "warn",
        f"{model}: not downloaded yet; the first local edit downloads it (tens of GB)",
        f"download it ahead (hf download {model}), or set FLUX_MCP_MODEL to a local copy",
    )


def _hf_cached(repo_id: str) -> str:
    """The cached snapshot folder of ``repo_id`` ('' when absent); never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return ""
    found = try_to_load_from_cache(repo_id, "model_index.json")
    return str(Path(found).parent) if isinstance(found, str) else ""


def lora_cache(settings: Settings) -> Check:
    folder = settings.lora_cache
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return Check(
            "LoRA cache", "fail", f"{folder} cannot be written ({reason})", _folder_fix("FLUX_MCP_LORA_CACHE")
        )
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors"]
    size = sum(p.stat().st_size for p in files) / 2**20
    return Check("LoRA cache", "ok", f"{folder}: {len(files)} LoRA file(s), {size:.0f} MiB")


# -- the two faces -----------------------------------------------------------------------------


def run_command(settings: Settings, *, as_json: bool, online: bool) -> int:
    """``flux-mcp doctor``: print the full report; exit 1 when a check failed."""
    report = diagnose(settings, online=online, deep=True)
    print(json.dumps(report.as_json(), indent=2) if as_json else report.text())
    return 1 if report.failed else 0


def log_startup(settings: Settings) -> None:
    """The quick report on stderr when the server starts (hosts show it in their MCP logs)."""
    print(diagnose(settings).text(), file=sys.stderr, flush=True)


def setup_problems(settings: Settings) -> list[str]:
    """The quick report's problems, for list_presets (empty when all is well)."""
    return diagnose(settings).problems()

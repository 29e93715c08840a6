"""Settings from the environment (``FLUX_MCP_*`` and ``FAL_KEY``), read and validated once at start.

Each setting is declared once in ``SETTINGS`` (variable, default, meaning); ``Settings.from_env``
parses them and the README's settings table is generated from the same list. Nothing here is read
at import time: the faces call ``Settings.from_env()`` when they start.

This module knows nothing about MCP, fal-client or torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir, user_config_dir, user_data_dir

from .errors import ConfigError

__all__ = ["SETTINGS", "Setting", "Settings"]

APP = "flux-mcp"
DEFAULT_MODEL = "black-forest-labs/FLUX.2-klein-base-9B"
DEFAULT_SAFETY_LABELS = ("nsfw", "porn", "hentai", "sexy")


@dataclass(frozen=True)
class Setting:
    """One environment variable: where it goes, how it is parsed, what it means."""

    env: str
    attr: str
    parse: Callable[[str], Any]
    default_doc: str
    doc: str


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"must be a number from {lo:g} to {hi:g}")
        return value

    return parse


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if not lo <= value <= hi:
            raise ValueError(f"must be an integer from {lo} to {hi}")
        return value

    return parse


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _paths(raw: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip())


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _labels(raw: str) -> tuple[str, ...]:
    labels = tuple(label.strip().lower() for label in raw.split(",") if label.strip())
    if not labels:
        raise ValueError("give at least one label, separated by commas")
    return labels


def _secret(raw: str) -> str:
    return raw.strip()


def _str(raw: str) -> str:
    return raw.strip()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "FAL_KEY",
        "fal_key",
        _secret,
        "unset",
        "API key of the hosted endpoint (fal.ai). Never logged or shown.",
    ),
    Setting(
        "FLUX_MCP_BACKEND",
        "backend",
        _choice("auto", "fal", "local"),
        "auto",
        "auto: fal when FAL_KEY is set, else local when a CUDA GPU and the local extra are present; or force fal / local.",
    ),
    Setting(
        "FLUX_MCP_OUTPUT_DIR",
        "output_dir",
        _path,
        "user data dir/images",
        "Where every result image and its JSON sidecar is saved (e.g. ~/.local/share/flux-mcp/images on Linux).",
    ),
    Setting(
        "FLUX_MCP_INPUT_ROOTS",
        "input_roots",
        _paths,
        "home dir (and always the output dir)",
        f"Folders (separated by '{os.pathsep}') local input paths (images, LoRA files) may be read from; "
        "symlinks and '..' are resolved first. The shared temp dir is not allowed unless listed here.",
    ),
    Setting(
        "FLUX_MCP_PRESETS",
        "presets_file",
        _path,
        "user config dir/presets.toml",
        "The user's presets and LoRA library (TOML); re-read when it changes.",
    ),
    Setting(
        "FLUX_MCP_MODEL",
        "model",
        _str,
        DEFAULT_MODEL,
        "Local backend: Hugging Face repo id or local directory of the klein pipeline.",
    ),
    Setting(
        "FLUX_MCP_OFFLOAD",
        "offload",
        _choice("none", "model", "sequential"),
        "none",
        "Local backend: CPU offload for 16-24 GB cards (model = whole components, sequential = layer by layer, slowest).",
    ),
    Setting(
        "FLUX_MCP_DEVICE",
        "device",
        _str,
        "cuda if present, else cpu",
        "Local backend: torch device to run on (cuda, cuda:1, cpu).",
    ),
    Setting(
        "FLUX_MCP_COMPILE_BACKEND",
        "compile_backend",
        _choice("auto", "inductor", "eager", "aot_eager"),
        "auto",
        "Local backend: torch.compile backend of acceleration 'regular' (auto = inductor on CUDA, no "
        "compiling elsewhere; eager/aot_eager trace with dynamo on any device but run plain kernels: for checks).",
    ),
    Setting(
        "FLUX_MCP_SAFETY_MODEL",
        "safety_model",
        _str,
        "unset (no local check)",
        "Local backend: image classifier for enable_safety_checker (transformers model: Hugging Face id "
        "or local directory); flagged images come back black.",
    ),
    Setting(
        "FLUX_MCP_SAFETY_LABELS",
        "safety_labels",
        _labels,
        ",".join(DEFAULT_SAFETY_LABELS),
        "Local backend: the safety model's labels (comma-separated) that count as NSFW.",
    ),
    Setting(
        "FLUX_MCP_SAFETY_THRESHOLD",
        "safety_threshold",
        _float(0, 1),
        "0.5",
        "Local backend: an image is flagged when its NSFW labels' summed probability reaches this.",
    ),
    Setting(
        "FLUX_MCP_FAL_UPLOAD",
        "fal_upload",
        _choice("cdn", "data-uri"),
        "cdn",
        "How local files and earlier results reach the endpoint: fal's CDN upload, or inline data URIs.",
    ),
    Setting(
        "FLUX_MCP_FAL_CONCURRENCY",
        "fal_concurrency",
        _int(1, 64),
        "4",
        "Most hosted jobs in flight at once (compare_seeds and concurrent calls share it).",
    ),
    Setting(
        "FLUX_MCP_MAX_COST_USD",
        "max_cost_usd",
        _float(0, 1e6),
        "unset",
        "Refuse a call whose estimated price is above this many US dollars, before anything is sent.",
    ),
    Setting(
        "FLUX_MCP_MAX_GRID_CELLS",
        "max_grid_cells",
        _int(2, 64),
        "16",
        "Most cells (images) one compare_seeds call may make: seeds x the values of each varied argument.",
    ),
    Setting(
        "FLUX_MCP_CALL_BUDGET_S",
        "call_budget_s",
        _float(1, 3600),
        "50",
        "How long edit_image/compare_seeds wait before answering with a job id instead (keep it below the "
        "host's tool-call timeout, ~60 s in Claude Desktop); the work goes on and get_result collects it.",
    ),
    Setting(
        "FLUX_MCP_RESOURCE_LINKS",
        "resource_links",
        _bool,
        "false",
        "Also return one resource_link block (flux://images/<id>) per image. Off by default: LangChain "
        "agents turn such links into image URLs their model providers reject, and some Claude Desktop "
        "builds refused them; the ids and URIs are always in the text and structured content.",
    ),
    Setting(
        "FLUX_MCP_JOB_TIMEOUT_S",
        "job_timeout_s",
        _float(1, 86400),
        "600",
        "Deadline for one hosted job from submit to result (queue time included); it is cancelled after.",
    ),
    Setting(
        "FLUX_MCP_DOWNLOAD_TIMEOUT_S",
        "download_timeout_s",
        _float(1, 3600),
        "60",
        "Deadline for downloading one output image or input URL.",
    ),
    Setting(
        "FLUX_MCP_MAX_DOWNLOAD_MB",
        "max_download_mb",
        _float(1, 4096),
        "64",
        "Largest output image or fetched file accepted, in MiB.",
    ),
    Setting(
        "FLUX_MCP_MAX_INPUT_MB",
        "max_input_mb",
        _float(0.1, 1024),
        "32",
        "Largest input image file the server reads itself (path, data URI, earlier result), in MiB.",
    ),
    Setting(
        "FLUX_MCP_MAX_INPUT_MEGAPIXELS",
        "max_input_megapixels",
        _float(0.01, 1000),
        "64",
        "Largest input image in megapixels, checked from the header before decoding (guards against "
        "decompression bombs); the only pixel limit: Pillow's own is replaced by it.",
    ),
    Setting(
        "FLUX_MCP_MAX_QUEUED_JOBS",
        "max_queued_jobs",
        _int(0, 1000),
        "8",
        "Local backend: most jobs waiting for the GPU behind the running one; more are refused at once "
        "with a 'busy, N jobs ahead, try later' error.",
    ),
    Setting(
        "FLUX_MCP_MAX_LOCAL_WORK",
        "max_local_work",
        _float(1, 1e7),
        "450",
        "Local backend: largest call in megapixel-steps (output megapixels x images x steps; 450 allows "
        "eight 1024x1024 images at 50 steps, minutes on a 24 GB card); larger calls are refused before "
        "queuing.",
    ),
    Setting(
        "FLUX_MCP_HTTP_TOKEN",
        "http_token",
        _secret,
        "unset",
        "Bearer token for the streamable HTTP transport; required when binding to a non-loopback host.",
    ),
    Setting(
        "FLUX_MCP_ALLOW_PRIVATE_URLS",
        "allow_private_urls",
        _bool,
        "false",
        "Let server-side fetches (local backend inputs and LoRA URLs) reach private-network addresses.",
    ),
    Setting(
        "FLUX_MCP_CACHE_DIR",
        "cache_dir",
        _path,
        "user cache dir",
        "Local backend: the cache folder: calibrated CNS gamma matrices, the demo's tiny model and (unless "
        "FLUX_MCP_LORA_CACHE says otherwise) downloaded LoRAs (e.g. ~/.cache/flux-mcp on Linux).",
    ),
    Setting(
        "FLUX_MCP_LORA_CACHE",
        "lora_cache",
        _path,
        "cache dir/loras",
        "Local backend: where downloaded LoRA files are cached.",
    ),
    Setting(
        "FLUX_MCP_MAX_LORA_MB",
        "max_lora_mb",
        _float(1, 16384),
        "2048",
        "Local backend: largest LoRA file accepted, in MiB (checked before and while downloading).",
    ),
    Setting(
        "FLUX_MCP_LORA_CACHE_MB",
        "lora_cache_mb",
        _float(1, 1e7),
        "20480",
        "Local backend: most MiB of downloaded LoRA files kept in FLUX_MCP_LORA_CACHE; the least "
        "recently used go first.",
    ),
    Setting(
        "FLUX_MCP_MAX_ADAPTER_MB",
        "max_adapter_mb",
        _float(1, 1e7),
        "4096",
        "Local backend: most MiB of LoRA files kept loaded in the model at once (besides a count of 8); "
        "the least recently used are unloaded first.",
    ),
    Setting(
        "FLUX_MCP_FAL_REST_URL",
        "fal_rest_url",
        _str,
        "unset (fal's own)",
        "Advanced: base URL of fal's REST API for CDN upload tokens (proxies and test emulators).",
    ),
    Setting(
        "FLUX_MCP_FAL_CDN_URL",
        "fal_cdn_url",
        _str,
        "unset (fal's own)",
        "Advanced: base URL of fal's CDN upload API (proxies and test emulators).",
    ),
)


def _default_output_dir() -> Path:
    return Path(user_data_dir(APP)) / "images"


def _default_input_roots() -> tuple[Path, ...]:
    return (Path.home(),)


@dataclass(frozen=True)
class Settings:
    """All settings; build with ``Settings.from_env()``. ``repr`` never shows secrets."""

    fal_key: str = field(default="", repr=False)
    backend: str = "auto"
    output_dir: Path = field(default_factory=_default_output_dir)
    input_roots: tuple[Path, ...] = field(default_factory=_default_input_roots)
    presets_file: Path = field(default_factory=lambda: Path(user_config_dir(APP)) / "presets.toml")
    model: str = DEFAULT_MODEL
    offload: str = "none"
    device: str = ""
    compile_backend: str = "auto"
    safety_model: str = ""
    safety_labels: tuple[str, ...] = DEFAULT_SAFETY_LABELS
    safety_threshold: float = 0.5
    fal_upload: str = "cdn"
    fal_concurrency: int = 4
    max_cost_usd: float | None = None
    max_grid_cells: int = 16
    call_budget_s: float = 50.0
    resource_links: bool = False
    job_timeout_s: float = 600.0
    download_timeout_s: float = 60.0
    max_download_mb: float = 64.0
    max_input_mb: float = 32.0
    max_input_megapixels: float = 64.0
    max_queued_jobs: int = 8
    max_local_work: float = 450.0
    http_token: str = field(default="", repr=False)
    allow_private_urls: bool = False
    cache_dir: Path = field(default_factory=lambda: Path(user_cache_dir(APP)))
    #: Derived from ``cache_dir`` when not set (see ``__post_init__``).
    lora_cache: Path = None  # type: ignore[assignment]
    max_lora_mb: float = 2048.0
    lora_cache_mb: float = 20480.0
    max_adapter_mb: float = 4096.0
    fal_rest_url: str = ""
    fal_cdn_url: str = ""

    def __post_init__(self) -> None:
        if self.lora_cache is None:
            object.__setattr__(self, "lora_cache", self.cache_dir / "loras")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Parse every ``SETTINGS`` variable; a bad value raises ConfigError naming the variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = env.get(setting.env)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[setting.attr] = setting.parse(raw)
            except ValueError as exc:
                shown = "(hidden)" if setting.parse is _secret else repr(raw)
                raise ConfigError(f"{setting.env}={shown} is not valid: {exc}.") from None
        values.update(overrides)
        return cls(**values)

    @property
    def allowed_input_roots(self) -> tuple[Path, ...]:
        """The input roots plus the output dir (earlier results may always be re-used)."""
        return (*self.input_roots, self.output_dir)

    def secrets(self) -> list[str]:
        """Secret values, so logs and outputs can be scrubbed of them."""
        return [s for s in (self.fal_key, self.http_token) if s]


assert {s.attr for s in SETTINGS} == {f.name for f in fields(Settings)}, "SETTINGS and Settings drifted"

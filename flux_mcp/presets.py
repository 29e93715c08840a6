"""Presets (named sets of request fields) and the user's LoRA library.

A preset fills the arguments the caller did not give, sent as null or sent at the endpoint's default
(``PRESET_RULE``: strict function-calling hosts send every field, defaults included); any other value
the caller gives wins. The user's file (TOML, ``FLUX_MCP_PRESETS``) adds presets and
library LoRAs; it is re-read whenever it changes, and a broken file gives a ``PresetError`` naming the
file and line while the built-in presets keep working. ``examples/presets.toml`` shows every feature.

    [presets.ink]
    description = "Ink-drawing LoRA at a gentle scale, quality steps"
    num_inference_steps = 40
    loras = [{ path = "ink", scale = 0.8 }]      # "ink" names a library entry

    [loras.ink]
    path = "https://example.com/ink.safetensors"  # URL, Hugging Face repo id or local file
    scale = 1.0
    trigger_word = "INKSTYLE"
    description = "Turns photos into ink drawings"

This module knows nothing about MCP or the backends.
"""

from __future__ import annotations

import difflib
import re
import threading
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import InvalidRequest, PresetError
from .schema import EditRequest

__all__ = [
    "BUILTIN_PRESETS",
    "PRESET_RULE",
    "LoraEntry",
    "Preset",
    "PresetLibrary",
    "apply_preset",
    "did_you_mean",
]


#: Which arguments a preset fills (list_presets shows it; ``arguments.normalize`` applies it).
PRESET_RULE = (
    "A preset fills every argument you leave out, send as null, or send at the endpoint's default "
    "value; any other value you give wins. (Strict hosts send every field: their defaults never "
    "undo a preset.) To keep a default the preset changes, leave the preset out."
)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    params: dict[str, Any]
    source: str = "built-in"


@dataclass(frozen=True)
class LoraEntry:
    name: str
    path: str
    scale: float = 1.0
    trigger_word: str | None = None
    description: str = ""


_GUIDED_CNS = {
    "enable_cns": True,
    "cns_power_gamma": 0.5,
    "cns_gamma_divider": 25.0,
    "cns_alpha_tilt_start": -0.1,
    "cns_alpha_tilt_end": 0.03,
    "cns_alpha_exp_interp": False,
    "cns_energy_scale": 0.998,
}

BUILTIN_PRESETS: tuple[Preset, ...] = (
    Preset(
        "draft",
        "Fast previews: 12 steps with high acceleration. Trades fine detail and prompt adherence for ~2-3x speed.",
        {"num_inference_steps": 12, "acceleration": "high"},
    ),
    Preset(
        "balanced",
        "The endpoint's defaults (28 steps, guidance 5, regular acceleration): the usual speed/quality balance.",
        {"num_inference_steps": 28, "guidance_scale": 5.0, "acceleration": "regular"},
    ),
    Preset(
        "quality",
        "Final renders: 50 steps, no acceleration. About twice the time of balanced for more refined detail; same price.",
        {"num_inference_steps": 50, "acceleration": "none"},
    ),
    Preset(
        "cns_guided",
        "Colored Noise Sampling tuned for this CFG (Base) model, after the paper's guided setting (divider 25, "
        "gentle tilt, energy 0.998). Adds controlled variety; experimental, results differ from plain sampling.",
        {"num_inference_steps": 28, **_GUIDED_CNS},
    ),
    Preset(
        "cns_detail",
        "Colored Noise Sampling with a positive high-frequency tilt (0.5 -> 0.25): more texture and fine detail, "
        "at some risk of grain; experimental.",
        {
            "num_inference_steps": 36,
            **_GUIDED_CNS,
            "cns_power_gamma": 0.75,
            "cns_alpha_tilt_start": 0.5,
            "cns_alpha_tilt_end": 0.25,
            "cns_alpha_exp_interp": True,
        },
    ),
)

#: Fields a preset may not set: they describe the job, not a way of running it.
_NOT_IN_PRESETS = {"prompt", "image_urls"}


def _check_params(params: dict[str, Any], where: str) -> None:
    """Validate a preset's fields against EditRequest (names and ranges), naming the bad one."""
    unknown = sorted(set(params) - set(EditRequest.model_fields) | (set(params) & _NOT_IN_PRESETS))
    if unknown:
        raise PresetError(
            f"{where}: {', '.join(unknown)} cannot be set by a preset "
            f"(allowed: {', '.join(n for n in EditRequest.model_fields if n not in _NOT_IN_PRESETS)})."
        )
    probe = {"prompt": "x", "image_urls": ["x"], **params}
    if isinstance(params.get("loras"), list):
        # Library names are resolved at call time; check only the shape here.
        probe["loras"] = [
            {**lora, "path": "x"} if isinstance(lora, dict) else lora for lora in params["loras"]
        ]
    try:
        EditRequest.model_validate(probe)
    except ValidationError as exc:
        raise PresetError(f"{where}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """pydantic's errors as 'field: what is wrong (got X)' lines, with the allowed range."""
    return describe_errors_of(exc.errors(include_url=False), prefix)


def describe_errors_of(errors: Sequence[Any], prefix: str = "") -> str:
    """``describe_validation_error`` for a list of pydantic's error dicts."""
    lines = []
    for err in errors:
        # Field names come from the caller too (unknown keys): keep each part short.
        parts = [str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        loc = ".".join(p if len(p) <= 60 else p[:57] + "..." for p in parts)
        loc = loc or "arguments"
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict | list) else f" (got {_short(got)})"
        lines.append(f"{prefix}{loc}: {err['msg']}{shown}")
    return "; ".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class _Loaded:
    stamp: tuple[int, int] | None = None
    presets: dict[str, Preset] = field(default_factory=dict)
    loras: dict[str, LoraEntry] = field(default_factory=dict)
    error: PresetError | None = None


class PresetLibrary:
    """Built-in presets plus the user's file, re-read when the file changes (mtime or size)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._loaded = _Loaded()
        self._lock = threading.Lock()

    def snapshot(self) -> tuple[dict[str, Preset], dict[str, LoraEntry], PresetError | None]:
        """All presets (built-in first, user presets may override them), the library, and the file's error."""
        with self._lock:
            self._refresh()
            presets = {p.name: p for p in BUILTIN_PRESETS}
            presets.update(self._loaded.presets)
            return presets, dict(self._loaded.loras), self._loaded.error

    def _refresh(self) -> None:
        stamp = _stamp(self.path)
        if stamp == self._loaded.stamp:
            return
        if stamp is None:
            self._loaded = _Loaded()
            return
        try:
            presets, loras = _parse_file(self.path)  # type: ignore[arg-type]
            self._loaded = _Loaded(stamp, presets, loras)
        except PresetError as exc:
            self._loaded = _Loaded(stamp, error=exc)


def _stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _parse_file(path: Path) -> tuple[dict[str, Preset], dict[str, LoraEntry]]:
    try:
        doc = tomllib.loads(path.read_text("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message carries "(at line N, column M)".
        raise PresetError(
            f"{path}: not valid TOML: {exc}. Fix that line; built-in presets still work."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"{path}: cannot be read: {exc}") from None
    unknown = set(doc) - {"presets", "loras"}
    if unknown:
        raise PresetError(
            f"{path}: unknown top-level table(s) {sorted(unknown)}; use [presets.NAME] and [loras.NAME]."
        )
    loras: dict[str, LoraEntry] = {}
    for name, entry in _tables(doc, "loras", path).items():
        where = f"{path}: [loras.{name}]"
        extra = set(entry) - {"path", "scale", "trigger_word", "description"}
        if extra or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise PresetError(
                f'{where} needs path = "URL, repo id or file" (allowed keys: path, scale, '
                f"trigger_word, description){'; unknown: ' + ', '.join(sorted(extra)) if extra else ''}."
            )
        scale = entry.get("scale", 1.0)
        if not isinstance(scale, int | float) or not 0 <= scale <= 4:
            raise PresetError(f"{where}: scale must be a number from 0 to 4.")
        loras[name] = LoraEntry(
            name, entry["path"], float(scale), entry.get("trigger_word"), str(entry.get("description", ""))
        )
    presets: dict[str, Preset] = {}
    for name, entry in _tables(doc, "presets", path).items():
        params = {k: v for k, v in entry.items() if k != "description"}
        _check_params(params, f"{path}: [presets.{name}]")
        presets[name] = Preset(name, str(entry.get("description", "")), params, source=str(path))
    return presets, loras


def _tables(doc: dict[str, Any], key: str, path: Path) -> dict[str, dict[str, Any]]:
    tables = doc.get(key, {})
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise PresetError(f"{path}: '{key}' must hold tables, e.g. [{key}.NAME].")
    return tables


def did_you_mean(name: str, choices: list[str]) -> str:
    """'did you mean 'x' or 'y'?' for the choices nearest ``name`` (empty when none is close)."""
    near = difflib.get_close_matches(name, choices, n=2, cutoff=0.6)
    return f"did you mean {' or '.join(repr(n) for n in near)}?" if near else ""


_BARE_NAME = re.compile(r"^[^/:.\\]+$")


def _check_lora_path(path: str, index: int, names: list[str]) -> None:
    """A bare word is neither a URL, a repo id nor a .safetensors file: no backend can use it, so it
    is a misspelled library name. Refused before anything is sent or paid for."""
    if not _BARE_NAME.match(path.strip()):
        return
    hint = did_you_mean(path, names)
    library = f"library: {', '.join(names)}" if names else "the LoRA library is empty"
    raise InvalidRequest(
        f"loras.{index}.path: {_short(path)} is not a LoRA library name ({library}), an https URL or a "
        f"Hugging Face repo id (owner/name); nothing was sent.{' ' + hint.capitalize() if hint else ''}",
        field=f"loras.{index}.path",
    )


def apply_preset(
    args: dict[str, Any], library: PresetLibrary
) -> tuple[dict[str, Any], Preset | None, list[dict[str, Any]]]:
    """Merge a preset under the caller's explicit arguments and resolve library LoRA names.

    Returns (effective arguments, the preset used, notes on library LoRAs with their trigger words).
    """
    presets, loras, error = library.snapshot()
    args = dict(args)
    name = args.pop("preset", None)
    preset = None
    if name is not None and not isinstance(name, str):
        raise InvalidRequest("preset: must be a preset name (a string); see list_presets.", field="preset")
    if name is not None:
        preset = presets.get(name)
        if preset is None:
            hint = f" The presets file has an error: {error}" if error else ""
            raise InvalidRequest(
                f"preset: unknown preset {_short(name)}; choose one of {', '.join(sorted(presets))} "
                f"(see list_presets).{hint}",
                field="preset",
            )
        args = {**preset.params, **args}
    used: list[dict[str, Any]] = []
    if isinstance(args.get("loras"), list):
        resolved = []
        for lora in args["loras"]:
            if isinstance(lora, dict) and isinstance(lora.get("path"), str) and lora["path"] in loras:
                entry = loras[lora["path"]]
                lora = {"scale": entry.scale, **lora, "path": entry.path}
                used.append({"name": entry.name, "path": entry.path, "trigger_word": entry.trigger_word})
            elif isinstance(lora, dict) and isinstance(lora.get("path"), str):
                _check_lora_path(lora["path"], len(resolved), sorted(loras))
            resolved.append(lora)
        args["loras"] = resolved
    return args, preset, used

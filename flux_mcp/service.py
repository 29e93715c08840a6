"""The library API both faces use: preset -> request -> inputs -> backend -> store -> result.

``FluxService.edit`` and ``FluxService.compare`` take the caller's raw arguments (a dict, exactly as
given, so a preset can fill only what the caller left out), validate them into the one request
model, estimate the price, resolve the inputs, run the backend and write every image to the store
before returning. The results are plain pydantic models plus preview bytes; the MCP server and the
CLI only render them.

This module knows nothing about MCP or about how a backend talks to its model.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.to_thread
from pydantic import BaseModel, Field, ValidationError

from . import images as imaging
from .backends import Backend, BackendResult, GeneratedImage, InputImage, create_backend
from .config import Settings
from .errors import CostLimitExceeded, FluxMCPError, InvalidRequest
from .presets import LoraEntry, Preset, PresetLibrary, apply_preset, describe_validation_error
from .schema import IMAGE_SIZE_PRESETS, MAX_SEED, CompareSeedsArgs, EditImageArgs, EditRequest, output_size
from .store import ResultStore, StoredFile

__all__ = [
    "PRICE_PER_MEGAPIXEL_USD",
    "CompareOutcome",
    "CompareOutput",
    "EditOutcome",
    "EditOutput",
    "FluxService",
    "ImageOut",
    "PresetsOutput",
    "ProgressFn",
]

#: Published price of the hosted endpoint: inputs (counted at ~1 MP each) plus outputs.
PRICE_PER_MEGAPIXEL_USD = 0.02
#: All previews of one call together stay under this many bytes (base64 adds a third; hosts cap ~1 MiB).
PREVIEW_BUDGET_BYTES = 450_000

ProgressFn = Callable[[float, float | None, str], Awaitable[None]]


class ImageOut(BaseModel):
    """One stored result image."""

    id: str = Field(description="Store id; pass flux://images/<id> in image_urls to edit it further.")
    uri: str = Field(description="flux://images/<id>: readable as an MCP resource (full resolution).")
    path: str = Field(description="Absolute path of the saved file.")
    width: int
    height: int
    content_type: str
    seed: int = Field(description="Seed that reproduces this image.")
    nsfw: bool | None = Field(None, description="The backend's safety flag; null when no check ran.")


class LoraUse(BaseModel):
    name: str
    path: str
    trigger_word: str | None = None


class _CallOutput(BaseModel):
    prompt: str
    backend: str
    endpoint: str
    params: dict[str, Any] = Field(description="The effective request after the preset was applied.")
    preset: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    estimated_cost_usd: float = Field(
        description="Estimated price on the hosted endpoint ($0.02 per megapixel)."
    )
    notes: list[str] = Field(
        default_factory=list, description="Caveats to read, e.g. a field the backend adjusted."
    )
    library_loras: list[LoraUse] = Field(
        default_factory=list, description="Library LoRAs used, with trigger words to put in the prompt."
    )
    details: dict[str, Any] = Field(
        default_factory=dict, description="Backend facts (request id, CNS gamma)."
    )


class EditOutput(_CallOutput):
    """Structured result of edit_image."""

    images: list[ImageOut]
    seed: int = Field(description="Seed of the first image; image i used seed + i.")


class SeedRun(BaseModel):
    seed: int
    image: ImageOut | None = None
    error: str | None = None


class CompareOutput(_CallOutput):
    """Structured result of compare_seeds."""

    runs: list[SeedRun] = Field(description="One entry per seed, in the order of the contact sheet.")
    seeds: list[int]
    failed_seeds: list[int] = Field(default_factory=list)


class PresetOut(BaseModel):
    name: str
    description: str
    source: str = Field(description="'built-in' or the path of the user's presets file.")
    params: dict[str, Any]


class ImageSizeOut(BaseModel):
    name: str
    width: int
    height: int


class LoraOut(BaseModel):
    name: str
    path: str
    scale: float
    trigger_word: str | None
    description: str


class PresetsOutput(BaseModel):
    """Structured result of list_presets."""

    presets: list[PresetOut]
    image_sizes: list[ImageSizeOut]
    loras: list[LoraOut]
    backend: dict[str, Any] = Field(description="The active backend and what it supports.")
    presets_file: str | None
    presets_file_error: str | None = None


@dataclass
class EditOutcome:
    output: EditOutput
    previews: list[bytes]


@dataclass
class CompareOutcome:
    output: CompareOutput
    sheet: bytes


class _Monotonic:
    """Forwards progress, never letting the number go backwards (hosts may reject that)."""

    def __init__(self, sink: ProgressFn | None, offset: float = 0.0) -> None:
        self._sink = sink
        self._last = offset

    async def __call__(self, progress: float, total: float | None, message: str) -> None:
        self._last = max(self._last, progress)
        if self._sink is not None:
            await self._sink(self._last, total, message)


class FluxService:
    """One per process; owns the backend, the store and the preset library."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.store = ResultStore(settings.output_dir)
        self.library = PresetLibrary(settings.presets_file)
        self._backend = backend

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self.store.ensure)
        await anyio.to_thread.run_sync(self.store.sweep)

    async def aclose(self) -> None:
        if self._backend is not None:
            await self._backend.aclose()

    @property
    def backend(self) -> Backend:
        """The backend, created on first use (so a server without a key still starts and lists presets)."""
        if self._backend is None:
            self._backend = create_backend(self.settings)
        return self._backend

    # -- edit_image -----------------------------------------------------------------------------

    async def edit(self, args: dict[str, Any], progress: ProgressFn | None = None) -> EditOutcome:
        report = _Monotonic(progress)
        request, preset, library_loras = self._request(args, EditImageArgs)
        backend = self.backend
        await report(0, None, "checking inputs")
        inputs = await imaging.resolve_inputs(request.image_urls, self.settings, self.store)
        cost = estimate_cost(request, inputs, request.num_images)
        self._check_cost(cost, backend)
        started = time.perf_counter()
        result = await backend.edit(request, inputs, report)
        await report(_last(report), None, "saving results")
        stored = await self._store_all(result.images, request, preset, result, backend, library_loras)
        output = EditOutput(
            images=[_image_out(s) for s in stored],
            seed=result.seed,
            **self._common(request, preset, backend, result, cost, library_loras, started),
        )
        previews = await anyio.to_thread.run_sync(_previews, [img.data for img in result.images])
        return EditOutcome(output, previews)

    # -- compare_seeds --------------------------------------------------------------------------

    async def compare(self, args: dict[str, Any], progress: ProgressFn | None = None) -> CompareOutcome:
        report = _Monotonic(progress)
        parsed, preset, library_loras = self._validated(args, CompareSeedsArgs)
        seeds = list(parsed.pop("seeds", None) or _random_seeds(parsed.pop("count")))
        parsed.pop("count", None)
        request = self._to_request(parsed)
        backend = self.backend
        await report(0, None, "checking inputs")
        inputs = await imaging.resolve_inputs(request.image_urls, self.settings, self.store)
        cost = estimate_cost(request, inputs, len(seeds))
        self._check_cost(cost, backend)
        started = time.perf_counter()
        outcomes = await backend.edit_seeds(request, inputs, seeds, report)
        await report(_last(report), None, "saving results")
        runs: list[SeedRun] = []
        cells: list[tuple[bytes | None, str]] = []
        notes: list[str] = []
        details: dict[str, Any] = {}
        timings: dict[str, float] = {}
        for seed, outcome in zip(seeds, outcomes, strict=True):
            if isinstance(outcome, BackendResult):
                seeded = request.model_copy(update={"seed": seed, "num_images": 1})
                (stored,) = await self._store_all(
                    outcome.images[:1], seeded, preset, outcome, backend, library_loras
                )
                runs.append(SeedRun(seed=seed, image=_image_out(stored)))
                cells.append((outcome.images[0].data, f"seed {seed}"))
                notes.extend(n for n in outcome.notes if n not in notes)
                details = details or outcome.details
                timings = timings or outcome.timings
            else:
                runs.append(SeedRun(seed=seed, error=str(outcome)))
                cells.append((None, f"seed {seed} (failed)"))
        summary = BackendResult(images=[], seed=seeds[0], timings=timings, notes=notes, details=details)
        output = CompareOutput(
            runs=runs,
            seeds=seeds,
            failed_seeds=[r.seed for r in runs if r.error is not None],
            **self._common(request, preset, backend, summary, cost, library_loras, started),
        )
        sheet = await anyio.to_thread.run_sync(imaging.contact_sheet, cells)
        return CompareOutcome(output, sheet)

    # -- list_presets ---------------------------------------------------------------------------

    def presets(self) -> PresetsOutput:
        presets, loras, error = self.library.snapshot()
        try:
            backend: dict[str, Any] = {"name": self.backend.name, **self.backend.capabilities()}
        except FluxMCPError as exc:
            backend = {"name": None, "error": str(exc)}
        return PresetsOutput(
            presets=[
                PresetOut(name=p.name, description=p.description, source=p.source, params=p.params)
                for p in presets.values()
            ],
            image_sizes=[ImageSizeOut(name=n, width=w, height=h) for n, (w, h) in IMAGE_SIZE_PRESETS.items()],
            loras=[_lora_out(e) for e in loras.values()],
            backend=backend,
            presets_file=str(self.library.path) if self.library.path else None,
            presets_file_error=str(error) if error else None,
        )

    async def read_image(self, image_id: str) -> tuple[bytes, StoredFile]:
        return await anyio.to_thread.run_sync(self.store.read, image_id)

    # -- the steps ------------------------------------------------------------------------------

    def _validated(
        self, args: dict[str, Any], model: type[BaseModel]
    ) -> tuple[dict[str, Any], Preset | None, list[dict[str, Any]]]:
        """Apply the preset under the explicit arguments, then validate against the tool's model."""
        if not isinstance(args, dict):
            raise InvalidRequest("arguments must be a JSON object.")
        merged, preset, library_loras = apply_preset(_parse_json_strings(args, model), self.library)
        try:
            parsed = model.model_validate(merged)
        except ValidationError as exc:
            raise InvalidRequest(_validation_message(exc, preset)) from None
        fields = parsed.model_dump(exclude={"preset"})
        return fields, preset, library_loras

    def _request(
        self, args: dict[str, Any], model: type[BaseModel]
    ) -> tuple[EditRequest, Preset | None, list[dict[str, Any]]]:
        fields, preset, library_loras = self._validated(args, model)
        return self._to_request(fields), preset, library_loras

    def _to_request(self, fields: dict[str, Any]) -> EditRequest:
        try:
            return EditRequest.model_validate(fields)
        except ValidationError as exc:  # pragma: no cover - the tool models are derived from EditRequest
            raise InvalidRequest(_validation_message(exc, None)) from None

    def _check_cost(self, cost: float, backend: Backend) -> None:
        ceiling = self.settings.max_cost_usd
        if backend.name == "fal" and ceiling is not None and cost > ceiling:
            raise CostLimitExceeded(
                f"estimated cost ${cost:.3f} is above FLUX_MCP_MAX_COST_USD=${ceiling:g}; nothing was sent. "
                "Use fewer or smaller images (num_images, image_size, seeds/count) or raise the limit.",
                field="num_images",
            )

    async def _store_all(
        self,
        generated: list[GeneratedImage],
        request: EditRequest,
        preset: Preset | None,
        result: BackendResult,
        backend: Backend,
        library_loras: list[dict[str, Any]],
    ) -> list[StoredFile]:
        params = _public_params(request)
        created = datetime.now(UTC).isoformat(timespec="seconds")

        def write() -> list[StoredFile]:
            stored = []
            for index, image in enumerate(generated):
                image_id = self.store.new_id()
                sidecar = {
                    "created": created,
                    "backend": backend.name,
                    "endpoint": backend.endpoint,
                    "seed": image.seed,
                    "index": index,
                    "width": image.width,
                    "height": image.height,
                    "nsfw": image.nsfw,
                    "source_url": image.source_url,
                    "preset": preset.name if preset else None,
                    "request": params,
                    "library_loras": library_loras,
                    "timings": result.timings,
                    "notes": result.notes,
                    "details": result.details,
                }
                stored.append(self.store.save(image_id, image.data, image.content_type, sidecar))
            return stored

        return await anyio.to_thread.run_sync(write)

    def _common(
        self,
        request: EditRequest,
        preset: Preset | None,
        backend: Backend,
        result: BackendResult,
        cost: float,
        library_loras: list[dict[str, Any]],
        started: float,
    ) -> dict[str, Any]:
        timings = {**result.timings, "call_s": round(time.perf_counter() - started, 3)}
        notes = list(result.notes)
        if backend.name != "fal":
            notes.append(
                "estimated_cost_usd is what the hosted endpoint would charge; the local run costs nothing."
            )
        return {
            "prompt": request.prompt,
            "backend": backend.name,
            "endpoint": backend.endpoint,
            "params": _public_params(request),
            "preset": preset.name if preset else None,
            "timings": timings,
            "estimated_cost_usd": cost,
            "notes": notes,
            "library_loras": [LoraUse(**lora) for lora in library_loras],
            "details": result.details,
        }


# -- helpers ------------------------------------------------------------------------------------


def estimate_cost(request: EditRequest, inputs: list[InputImage], outputs: int) -> float:
    """$0.02 per megapixel of input (each counted at ~1 MP, as the endpoint resizes them) plus output."""
    size = output_size(request, inputs[0].size if inputs else None)
    out_mp = (size[0] * size[1] / 1e6) if size else 1.0
    total_mp = len(inputs) * 1.0 + outputs * out_mp
    return round(total_mp * PRICE_PER_MEGAPIXEL_USD, 4)


def _random_seeds(count: int) -> list[int]:
    seeds: list[int] = []
    while len(seeds) < count:
        seed = secrets.randbelow(MAX_SEED + 1)
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def _last(report: _Monotonic) -> float:
    return report._last


def _parse_json_strings(args: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Some hosts (Claude Desktop among them) send lists and objects as JSON strings; accept those."""
    import json

    fixed = dict(args)
    for name, value in args.items():
        info = model.model_fields.get(name)
        if info is None or info.annotation is str or not isinstance(value, str):
            continue
        stripped = value.strip()
        if stripped[:1] in ("[", "{"):
            try:
                fixed[name] = json.loads(stripped)
            except (ValueError, RecursionError):
                continue
    return fixed


def _validation_message(exc: ValidationError, preset: Preset | None) -> str:
    text = describe_validation_error(exc)
    text = text.replace(
        "Extra inputs are not permitted", "unknown argument; remove it (see the tool's schema)"
    )
    if preset is not None:
        text += f" (after applying preset {preset.name!r})"
    return text + "."


_DATA_URI_HEAD = re.compile(r"^(data:[^,]{0,100},)(.*)$", re.S)


def _public_params(request: EditRequest) -> dict[str, Any]:
    """The effective request for results and sidecars, with data URIs shortened (no base64 in results)."""
    params = request.model_dump(mode="json")
    params["image_urls"] = [_shorten(u) for u in params["image_urls"]]
    return params


def _shorten(url: str) -> str:
    match = _DATA_URI_HEAD.match(url)
    if not match:
        return url
    return f"{match.group(1)}<{len(match.group(2)) * 3 // 4} bytes omitted>"


def _image_out(stored: StoredFile) -> ImageOut:
    sc = stored.sidecar
    return ImageOut(
        id=stored.id,
        uri=stored.uri,
        path=str(stored.path),
        width=sc["width"],
        height=sc["height"],
        content_type=stored.content_type,
        seed=sc["seed"],
        nsfw=sc.get("nsfw"),
    )


def _lora_out(entry: LoraEntry) -> LoraOut:
    return LoraOut(
        name=entry.name,
        path=entry.path,
        scale=entry.scale,
        trigger_word=entry.trigger_word,
        description=entry.description,
    )


def _previews(datas: list[bytes]) -> list[bytes]:
    """Previews of every image, shrunk together until they fit the per-call budget."""
    if not datas:
        return []
    side = 512 if len(datas) == 1 else 384
    while True:
        previews = [imaging.preview(d, side) for d in datas]
        if sum(map(len, previews)) <= PREVIEW_BUDGET_BYTES or side <= 96:
            return previews
        side = max(96, math.floor(side * 0.75))

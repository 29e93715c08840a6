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
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
import anyio.to_thread
from pydantic import BaseModel, Field, ValidationError

from . import images as imaging
from .backends import Backend, BackendResult, GeneratedImage, InputImage, SeedOutcome, create_backend
from .config import Settings
from .errors import BackendError, BackendUnavailable, CostLimitExceeded, FluxMCPError, InvalidRequest
from .presets import LoraEntry, Preset, PresetLibrary, apply_preset, describe_validation_error
from .redact import public_url
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
    "JobInfo",
    "PreparedCall",
    "PresetsOutput",
    "ProgressFn",
    "public_params",
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


class JobInfo(BaseModel):
    """A call that outlived its time budget keeps running on the server as a job."""

    id: str = Field(description="Pass to get_result (to collect) or cancel_job (to stop).")
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float = 0.0
    total: float | None = None
    message: str = ""
    created: str
    updated: str
    error: str | None = None


class _CallOutput(BaseModel):
    job: JobInfo | None = Field(
        None, description="Set when the call is still running as a job: collect it with get_result."
    )
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

    images: list[ImageOut] = Field(default_factory=list)
    seed: int | None = Field(None, description="Seed of the first image; image i used seed + i.")


class SeedRun(BaseModel):
    seed: int
    image: ImageOut | None = None
    error: str | None = None


class CompareOutput(_CallOutput):
    """Structured result of compare_seeds."""

    runs: list[SeedRun] = Field(
        default_factory=list, description="One entry per seed, in the order of the contact sheet."
    )
    seeds: list[int] = Field(default_factory=list)
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


@dataclass
class PreparedCall:
    """A validated call, ready to run: what ``FluxService.prepare`` checked and resolved."""

    tool: str
    request: EditRequest
    preset: Preset | None
    library_loras: list[dict[str, Any]]
    inputs: list[InputImage]
    #: compare_seeds only: one run per seed.
    seeds: list[int] | None
    cost: float
    backend: Backend

    def pending(self, job: JobInfo) -> EditOutput | CompareOutput:
        """The structured result of a call that is still running as ``job``."""
        common: dict[str, Any] = {
            "job": job,
            "prompt": self.request.prompt,
            "backend": self.backend.name,
            "endpoint": self.backend.endpoint,
            "params": public_params(self.request),
            "preset": self.preset.name if self.preset else None,
            "estimated_cost_usd": self.cost,
            "library_loras": [LoraUse(**lora) for lora in self.library_loras],
        }
        if self.seeds is None:
            return EditOutput(seed=self.request.seed, **common)
        return CompareOutput(seeds=self.seeds, **common)


class _Monotonic:
    """Forwards progress, never letting the number go backwards (hosts may reject that)."""

    def __init__(self, sink: ProgressFn | None) -> None:
        self._sink = sink
        self.last = 0.0

    async def __call__(self, progress: float, total: float | None, message: str) -> None:
        self.last = max(self.last, progress)
        if self._sink is not None:
            await self._sink(self.last, total, message)


class FluxService:
    """One per process; owns the backend, the store and the preset library."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.store = ResultStore(settings.output_dir)
        self.library = PresetLibrary(settings.presets_file)
        self._backend = backend
        self._backend_lock = threading.Lock()

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self.store.ensure)
        await anyio.to_thread.run_sync(self.store.sweep)

    async def aclose(self) -> None:
        if self._backend is not None:
            await self._backend.aclose()

    @property
    def backend(self) -> Backend:
        """The backend, created on first use (so a server without a key still starts and lists presets).

        Blocking the first time (the local backend imports torch): async callers use a worker thread.
        """
        with self._backend_lock:
            if self._backend is None:
                self._backend = create_backend(self.settings)
            return self._backend

    # -- edit_image -----------------------------------------------------------------------------

    async def edit(self, args: dict[str, Any], progress: ProgressFn | None = None) -> EditOutcome:
        """edit_image in one go: prepare, run, store."""
        outcome = await self.run(await self.prepare("edit_image", args), progress)
        assert isinstance(outcome, EditOutcome)
        return outcome

    async def compare(self, args: dict[str, Any], progress: ProgressFn | None = None) -> CompareOutcome:
        """compare_seeds in one go: prepare, run, store."""
        outcome = await self.run(await self.prepare("compare_seeds", args), progress)
        assert isinstance(outcome, CompareOutcome)
        return outcome

    async def prepare(self, tool: str, args: dict[str, Any]) -> PreparedCall:
        """Everything that can refuse a call, before anything is sent: arguments, preset, backend,
        inputs, price. Errors here are the caller's to fix and never leave a job behind."""
        model = CompareSeedsArgs if tool == "compare_seeds" else EditImageArgs
        # Off the event loop: the presets file may be re-read, and the first local backend imports torch.
        fields, preset, library_loras = await anyio.to_thread.run_sync(self._validated, args, model)
        seeds = None
        if tool == "compare_seeds":
            seeds = list(fields.pop("seeds", None) or _random_seeds(fields.pop("count")))
            fields.pop("count", None)
        request = self._to_request(fields)
        backend = await anyio.to_thread.run_sync(lambda: self.backend)
        inputs = await imaging.resolve_inputs(request.image_urls, self.settings, self.store)
        cost = estimate_cost(request, inputs, len(seeds) if seeds else request.num_images)
        self._check_cost(cost, backend)
        return PreparedCall(tool, request, preset, library_loras, inputs, seeds, cost, backend)

    async def run(
        self, call: PreparedCall, progress: ProgressFn | None = None
    ) -> EditOutcome | CompareOutcome:
        """Run a prepared call on its backend and store every image before returning."""
        report = _Monotonic(progress)
        started = time.perf_counter()
        if call.seeds is None:
            result = await call.backend.edit(call.request, call.inputs, report)
            await report(report.last, None, "saving results")
            return await self._finish_edit(call, result, started)
        outcomes = await call.backend.edit_seeds(call.request, call.inputs, call.seeds, report)
        await report(report.last, None, "saving results")
        return await self._finish_compare(call, outcomes, started)

    async def collect(
        self, call: PreparedCall, remote: dict[str, int | None], progress: ProgressFn | None = None
    ) -> EditOutcome | CompareOutcome:
        """Finish a call whose jobs were already submitted (by request id), e.g. after a restart."""
        report = _Monotonic(progress)
        started = time.perf_counter()
        collect = getattr(call.backend, "collect", None)
        if collect is None:
            raise BackendUnavailable(f"the {call.backend.name} backend cannot resume submitted jobs")
        if call.seeds is None:
            (request_id,) = remote
            result = await collect(request_id, call.request, report)
            return await self._finish_edit(call, result, started)
        by_seed = {seed: rid for rid, seed in remote.items()}
        outcomes: list[SeedOutcome] = []
        for seed in call.seeds:
            if seed not in by_seed:
                outcomes.append(BackendError("this seed was not submitted before the server restarted"))
                continue
            try:
                outcomes.append(
                    await collect(by_seed[seed], call.request.model_copy(update={"seed": seed}), report)
                )
            except FluxMCPError as exc:
                outcomes.append(exc)
        return await self._finish_compare(call, outcomes, started)

    async def _finish_edit(self, call: PreparedCall, result: BackendResult, started: float) -> EditOutcome:
        stored = await self._store_all(result.images, call.request, call, result)
        output = EditOutput(
            images=[_image_out(s) for s in stored], seed=result.seed, **self._common(call, result, started)
        )
        previews = await anyio.to_thread.run_sync(_previews, [img.data for img in result.images])
        return EditOutcome(output, previews)

    async def _finish_compare(
        self, call: PreparedCall, outcomes: list[SeedOutcome], started: float
    ) -> CompareOutcome:
        assert call.seeds is not None
        runs: list[SeedRun] = []
        cells: list[tuple[bytes | None, str]] = []
        notes: list[str] = []
        details: dict[str, Any] = {}
        timings: dict[str, float] = {}
        for seed, outcome in zip(call.seeds, outcomes, strict=True):
            if isinstance(outcome, BackendResult):
                seeded = call.request.model_copy(update={"seed": seed, "num_images": 1})
                (stored,) = await self._store_all(outcome.images[:1], seeded, call, outcome)
                runs.append(SeedRun(seed=seed, image=_image_out(stored)))
                cells.append((outcome.images[0].data, f"seed {seed}"))
                notes.extend(n for n in outcome.notes if n not in notes)
                details = details or outcome.details
                timings = timings or outcome.timings
            else:
                runs.append(SeedRun(seed=seed, error=str(outcome)))
                cells.append((None, f"seed {seed} (failed)"))
        summary = BackendResult(images=[], seed=call.seeds[0], timings=timings, notes=notes, details=details)
        output = CompareOutput(
            runs=runs,
            seeds=call.seeds,
            failed_seeds=[r.seed for r in runs if r.error is not None],
            **self._common(call, summary, started),
        )
        sheet = await anyio.to_thread.run_sync(imaging.contact_sheet, cells)
        return CompareOutcome(output, sheet)

    async def reload(self, tool: str, output: dict[str, Any]) -> EditOutcome | CompareOutcome:
        """Rebuild a finished call's outcome from its structured output and the stored files
        (previews and contact sheets are made from the same bytes, so they come out the same)."""

        def build() -> EditOutcome | CompareOutcome:
            if tool == "compare_seeds":
                parsed = CompareOutput.model_validate(output)
                cells = [
                    (
                        self.store.read(r.image.id)[0] if r.image else None,
                        f"seed {r.seed}" if r.image else f"seed {r.seed} (failed)",
                    )
                    for r in parsed.runs
                ]
                return CompareOutcome(parsed, imaging.contact_sheet(cells))
            edit = EditOutput.model_validate(output)
            return EditOutcome(edit, _previews([self.store.read(img.id)[0] for img in edit.images]))

        return await anyio.to_thread.run_sync(build)

    # -- list_presets ---------------------------------------------------------------------------

    def presets(self) -> PresetsOutput:
        """What list_presets shows. Blocking (reads the presets file, may create the backend)."""
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
        self, generated: list[GeneratedImage], request: EditRequest, call: PreparedCall, result: BackendResult
    ) -> list[StoredFile]:
        preset, backend, library_loras = call.preset, call.backend, call.library_loras
        params = public_params(request)
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

    def _common(self, call: PreparedCall, result: BackendResult, started: float) -> dict[str, Any]:
        request, preset, backend = call.request, call.preset, call.backend
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
            "params": public_params(request),
            "preset": preset.name if preset else None,
            "timings": timings,
            "estimated_cost_usd": call.cost,
            "notes": notes,
            "library_loras": [LoraUse(**lora) for lora in call.library_loras],
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


def public_params(request: EditRequest) -> dict[str, Any]:
    """The effective request for results, sidecars and job files: URLs without their query (signed
    tokens), data URIs without their payload (``redact.public_url``)."""
    params = request.model_dump(mode="json")
    params["image_urls"] = [public_url(u) for u in params["image_urls"]]
    for lora in params["loras"]:
        lora["path"] = public_url(lora["path"])
    return params


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

"""The library API both faces use: preset -> request -> runs -> backend -> store -> result.

A call is prepared once (``FluxService.prepare``): the caller's raw arguments (a dict, exactly as
given, so a preset can fill only what the caller left out) are validated into the one request
model, expanded into a list of runs (one ``EditRequest`` per output cell: edit_image is one run,
compare_seeds one per seed or grid cell), priced by the backend and checked against the cost ceiling,
and the inputs are resolved. ``FluxService.run`` hands any such list to the backend and writes every
image to the store before returning; the call's *kind* only decides the output model and whether a
contact sheet or grid is drawn. The results are the models of ``results``; the faces render them.

This module knows nothing about MCP or about how a backend talks to its model.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
import anyio.to_thread
from pydantic import BaseModel, ValidationError

from . import doctor, sheets
from . import images as imaging
from .arguments import describe_errors, normalize, preset_notes, trigger_notes
from .backends import (
    Backend,
    BackendResult,
    GeneratedImage,
    InputImage,
    RunContext,
    RunOutcome,
    create_backend,
)
from .config import Settings
from .errors import CostLimitExceeded, FluxMCPError, InvalidRequest
from .grid import expand
from .presets import LoraEntry, Preset, PresetLibrary, apply_preset
from .process import process_effects
from .redact import public_url
from .results import (
    CompareOutcome,
    CompareOutput,
    EditOutcome,
    EditOutput,
    Grid,
    GridAxis,
    GridCell,
    ImageOut,
    ImageSizeOut,
    JobInfo,
    LoraOut,
    LoraUse,
    PresetOut,
    PresetsOutput,
    SeedRun,
)
from .schema import (
    IMAGE_SIZE_PRESETS,
    MAX_SEED,
    CompareSeedsArgs,
    EditImageArgs,
    EditRequest,
    VaryAxis,
    wrap_seed,
)
from .store import ResultStore, StoredFile

__all__ = ["CallSpec", "FluxService", "Kind", "Outcome", "PreparedCall", "ProgressFn", "public_params"]

#: All previews of one call together stay under this many bytes (base64 adds a third; hosts cap ~1 MiB).
PREVIEW_BUDGET_BYTES = 450_000

ProgressFn = Callable[[float, float | None, str], Awaitable[None]]
#: What a call is: one edit (edit_image) or a comparison of cells (compare_seeds, with or without a grid).
Kind = Literal["edit", "compare"]
Outcome = EditOutcome | CompareOutcome
_KIND_OF_TOOL: dict[str, Kind] = {"edit_image": "edit", "compare_seeds": "compare"}


class CallSpec(BaseModel):
    """A prepared call as data: what a job record keeps to resume or re-render the call."""

    kind: Kind
    #: The effective request after the preset (public form: data URIs shortened).
    request: dict[str, Any]
    #: One request per run (cell), in order.
    runs: list[dict[str, Any]]
    #: Each run's values on the grid's axes ({} for edit_image).
    values: list[dict[str, Any]]
    #: The varied axes (empty unless ``vary`` was given).
    axes: list[GridAxis] = []
    preset: str | None = None
    library_loras: list[dict[str, Any]] = []
    cost: float = 0.0
    billed: bool = True
    #: Warnings known before running (a preset overridden, a trigger word missing).
    notes: list[str] = []


@dataclass
class PreparedCall:
    """A validated call, ready to run: a kind plus a list of run requests, priced, inputs resolved."""

    kind: Kind
    request: EditRequest
    runs: list[EditRequest]
    values: list[dict[str, Any]]
    axes: list[GridAxis]
    preset: str | None
    library_loras: list[dict[str, Any]]
    inputs: list[InputImage]
    cost: float
    billed: bool
    backend: Backend
    notes: list[str] = dataclasses.field(default_factory=list)

    def spec(self) -> CallSpec:
        return CallSpec(
            kind=self.kind,
            request=public_params(self.request),
            runs=[public_params(run) for run in self.runs],
            values=self.values,
            axes=self.axes,
            preset=self.preset,
            library_loras=self.library_loras,
            cost=self.cost,
            billed=self.billed,
            notes=self.notes,
        )

    @classmethod
    def from_spec(cls, spec: CallSpec, backend: Backend) -> PreparedCall:
        """The call again (without its input bytes: enough to collect submitted runs and to render)."""
        return cls(
            kind=spec.kind,
            request=EditRequest.model_validate(spec.request),
            runs=[EditRequest.model_validate(run) for run in spec.runs],
            values=spec.values,
            axes=spec.axes,
            preset=spec.preset,
            library_loras=spec.library_loras,
            inputs=[],
            cost=spec.cost,
            billed=spec.billed,
            backend=backend,
            notes=spec.notes,
        )

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs if run.seed is not None]

    def pending(self, job: JobInfo) -> EditOutput | CompareOutput:
        """The structured result of a call that is still running as ``job``."""
        common: dict[str, Any] = {
            "job": job,
            "prompt": self.request.prompt,
            "backend": self.backend.name,
            "endpoint": self.backend.endpoint,
            "params": public_params(self.request),
            "preset": self.preset,
            "estimated_cost_usd": self.cost,
            "library_loras": [LoraUse(**lora) for lora in self.library_loras],
            "notes": self.notes,
        }
        if self.kind == "edit":
            return EditOutput(seed=self.request.seed, **common)
        grid = Grid(axes=self.axes, cells=[]) if self.axes else None
        return CompareOutput(seeds=sorted(set(self.seeds), key=self.seeds.index), grid=grid, **common)


async def _no_progress(progress: float, total: float | None, message: str) -> None:
    """Progress nobody listens to (the CLI with --quiet, library callers)."""


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
        self._effects = ExitStack()

    async def start(self) -> None:
        self._effects.enter_context(process_effects(self.settings))
        await anyio.to_thread.run_sync(self.store.ensure)
        await anyio.to_thread.run_sync(self.store.sweep)

    async def aclose(self) -> None:
        try:
            if self._backend is not None:
                await self._backend.aclose()
        finally:
            self._effects.close()

    @property
    def backend(self) -> Backend:
        """The backend, created on first use (so a server without a key still starts and lists presets).

        Blocking the first time (the local backend imports torch): async callers use a worker thread.
        """
        with self._backend_lock:
            if self._backend is None:
                self._backend = create_backend(self.settings)
            return self._backend

    # -- calls --------------------------------------------------------------------------------------

    async def edit(self, args: dict[str, Any], progress: ProgressFn | None = None) -> EditOutcome:
        """edit_image in one go: prepare, run, store."""
        outcome = await self.run(await self.prepare("edit_image", args), RunContext(progress or _no_progress))
        assert isinstance(outcome, EditOutcome)
        return outcome

    async def compare(self, args: dict[str, Any], progress: ProgressFn | None = None) -> CompareOutcome:
        """compare_seeds in one go: prepare, run, store."""
        outcome = await self.run(
            await self.prepare("compare_seeds", args), RunContext(progress or _no_progress)
        )
        assert isinstance(outcome, CompareOutcome)
        return outcome

    async def prepare(self, tool: str, args: dict[str, Any]) -> PreparedCall:
        """Everything that can refuse a call, before anything is sent: arguments, preset, the runs and
        their number, backend, inputs, price. Errors here are the caller's to fix and leave nothing behind."""
        kind = _KIND_OF_TOOL[tool]
        model = CompareSeedsArgs if kind == "compare" else EditImageArgs
        # Off the event loop: the presets file may be re-read, and the first local backend imports torch.
        fields, preset, library_loras, notes = await anyio.to_thread.run_sync(self._validated, args, model)
        if kind == "edit":
            request = self._to_request(fields)
            runs, values, axes = [request], [{}], []
        else:
            request, runs, values, axes = self._cells(fields)
        backend = await anyio.to_thread.run_sync(lambda: self.backend)
        inputs = await imaging.resolve_inputs(request.image_urls, self.settings, self.store)
        # The inputs hold the bytes now: a data URI (megabytes) need not stay in every run's request
        # while the call waits for its turn.
        request, runs = _without_payloads(request), [_without_payloads(run) for run in runs]
        estimate = backend.estimate_cost(runs, inputs)
        self._check_cost(estimate.usd, estimate.billed)
        return PreparedCall(
            kind=kind,
            request=request,
            runs=runs,
            values=values,
            axes=axes,
            preset=preset.name if preset else None,
            library_loras=library_loras,
            inputs=inputs,
            cost=estimate.usd,
            billed=estimate.billed,
            backend=backend,
            notes=notes,
        )

    async def run(self, call: PreparedCall, ctx: RunContext, remote: dict[int, str] | None = None) -> Outcome:
        """Run a prepared call's runs on its backend (or, given ``remote`` ids, collect runs it submitted
        before a restart) and store every image before returning."""
        report = _Monotonic(ctx.progress)
        ctx = dataclasses.replace(ctx, progress=report)
        started = time.perf_counter()
        if remote is None:
            outcomes = await call.backend.run(call.runs, call.inputs, ctx)
        else:
            outcomes = await call.backend.collect(remote, call.runs, ctx)
        await report(report.last, None, "saving results")
        if call.kind == "edit":
            return await self._finish_edit(call, outcomes[0], started)
        return await self._finish_compare(call, outcomes, started)

    async def _finish_edit(self, call: PreparedCall, outcome: RunOutcome, started: float) -> EditOutcome:
        if isinstance(outcome, FluxMCPError):
            raise outcome
        stored = await self._store_all(outcome.images, call.runs[0], call, outcome)
        output = EditOutput(
            images=[_image_out(s) for s in stored], seed=outcome.seed, **self._common(call, outcome, started)
        )
        previews = await anyio.to_thread.run_sync(_previews, [img.data for img in outcome.images])
        return EditOutcome(output, previews)

    async def _finish_compare(
        self, call: PreparedCall, outcomes: list[RunOutcome], started: float
    ) -> CompareOutcome:
        runs: list[SeedRun] = []
        tiles: list[bytes | None] = []
        notes: list[str] = []
        summary = BackendResult(images=[], seed=call.runs[0].seed or 0)
        for request, outcome in zip(call.runs, outcomes, strict=True):
            seed = request.seed if request.seed is not None else 0
            if isinstance(outcome, BackendResult):
                (stored,) = await self._store_all(outcome.images[:1], request, call, outcome)
                runs.append(SeedRun(seed=seed, image=_image_out(stored)))
                tiles.append(outcome.images[0].data)
                notes.extend(n for n in outcome.notes if n not in notes)
                summary.details = summary.details or outcome.details
                summary.timings = summary.timings or outcome.timings
            else:
                runs.append(SeedRun(seed=seed, error=str(outcome)))
                tiles.append(None)
        summary.notes = notes
        output = CompareOutput(
            runs=runs,
            seeds=sorted(set(call.seeds), key=call.seeds.index),
            failed_seeds=[r.seed for r in runs if r.error is not None],
            grid=_grid(call.axes, call.values, runs),
            **self._common(call, summary, started),
        )
        sheet = await anyio.to_thread.run_sync(_sheet, output, tiles)
        return CompareOutcome(output, sheet)

    async def reload(self, kind: Kind, output: dict[str, Any]) -> Outcome:
        """Rebuild a finished call's outcome from its structured output and the stored files
        (previews and contact sheets are made from the same bytes, so they come out the same)."""

        def build() -> Outcome:
            if kind == "compare":
                parsed = CompareOutput.model_validate(output)
                tiles = [self.store.read(r.image.id)[0] if r.image else None for r in parsed.runs]
                return CompareOutcome(parsed, _sheet(parsed, tiles))
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
            setup_problems=doctor.setup_problems(self.settings),
        )

    async def read_image(self, image_id: str) -> tuple[bytes, StoredFile]:
        return await anyio.to_thread.run_sync(self.store.read, image_id)

    # -- the steps ------------------------------------------------------------------------------

    def _validated(
        self, args: dict[str, Any], model: type[BaseModel]
    ) -> tuple[dict[str, Any], Preset | None, list[dict[str, Any]], list[str]]:
        """Apply the preset under the explicit arguments, then validate against the tool's model;
        also the warnings to show before running."""
        if not isinstance(args, dict):
            raise InvalidRequest("arguments must be a JSON object.")
        raw = normalize(_parse_json_strings(args, model), model)
        merged, preset, library_loras = apply_preset(raw, self.library)
        try:
            parsed = model.model_validate(merged)
        except ValidationError as exc:
            raise InvalidRequest(_validation_message(exc, preset, model)) from None
        fields = parsed.model_dump(exclude={"preset"})
        notes = preset_notes(raw, preset) + trigger_notes(fields.get("prompt"), library_loras)
        return fields, preset, library_loras, notes

    def _to_request(self, fields: dict[str, Any]) -> EditRequest:
        try:
            return EditRequest.model_validate(fields)
        except ValidationError as exc:  # pragma: no cover - the tool models are derived from EditRequest
            raise InvalidRequest(_validation_message(exc, None)) from None

    def _cells(
        self, fields: dict[str, Any]
    ) -> tuple[EditRequest, list[EditRequest], list[dict[str, Any]], list[GridAxis]]:
        """compare_seeds' runs: one per seed, or one per grid cell (axes x seeds), within the cap."""
        seeds = fields.pop("seeds", None)
        count = fields.pop("count", None)
        vary = [VaryAxis.model_validate(axis) for axis in fields.pop("vary", None) or []]
        seeds = list(seeds or _random_seeds(count or 1))
        request = self._to_request(fields)
        cells = math.prod(len(axis.values) for axis in vary) * len(seeds)
        if cells > self.settings.max_grid_cells:
            raise InvalidRequest(
                f"vary: this grid would make {cells} images, more than FLUX_MCP_MAX_GRID_CELLS="
                f"{self.settings.max_grid_cells}; nothing was run. Use fewer values or seeds (or raise the limit).",
                field="vary" if vary else "seeds",
            )
        axes, grid_cells = expand(request, vary, seeds)
        runs = [cell.request for cell in grid_cells]
        values = [cell.values for cell in grid_cells]
        labelled = [GridAxis(field=axis.field, values=axis.values) for axis in axes] if vary else []
        return request, runs, values, labelled

    def _check_cost(self, cost: float, billed: bool) -> None:
        ceiling = self.settings.max_cost_usd
        if billed and ceiling is not None and cost > ceiling:
            raise CostLimitExceeded(
                f"estimated cost ${cost:.3f} is above FLUX_MCP_MAX_COST_USD=${ceiling:g}; nothing was sent. "
                "Use fewer or smaller images (num_images, image_size, seeds/count, vary values) or raise the limit.",
                field="num_images",
            )

    async def _store_all(
        self, generated: list[GeneratedImage], request: EditRequest, call: PreparedCall, result: BackendResult
    ) -> list[StoredFile]:
        backend = call.backend
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
                    "seed": wrap_seed(image.seed),  # a backend's seed + i may pass MAX_SEED
                    "index": index,
                    "width": image.width,
                    "height": image.height,
                    "nsfw": image.nsfw,
                    "source_url": image.source_url,
                    "preset": call.preset,
                    "request": params,
                    "library_loras": call.library_loras,
                    "timings": result.timings,
                    "notes": result.notes,
                    "details": result.details,
                }
                stored.append(self.store.save(image_id, image.data, image.content_type, sidecar))
            return stored

        return await anyio.to_thread.run_sync(write)

    def _common(self, call: PreparedCall, result: BackendResult, started: float) -> dict[str, Any]:
        timings = {**result.timings, "call_s": round(time.perf_counter() - started, 3)}
        notes = [*call.notes, *result.notes]
        if not call.billed:
            notes.append(
                f"estimated_cost_usd is what the hosted endpoint would charge; the {call.backend.name} run "
                "costs nothing."
            )
        return {
            "prompt": call.request.prompt,
            "backend": call.backend.name,
            "endpoint": call.backend.endpoint,
            "params": public_params(call.request),
            "preset": call.preset,
            "timings": timings,
            "estimated_cost_usd": call.cost,
            "notes": notes,
            "library_loras": [LoraUse(**lora) for lora in call.library_loras],
            "details": result.details,
        }


# -- helpers ------------------------------------------------------------------------------------


def _without_payloads(request: EditRequest) -> EditRequest:
    """``request`` with each data URI in image_urls replaced by its public form (type and size)."""
    urls = [public_url(u) if u[:5].lower() == "data:" else u for u in request.image_urls]
    return request.model_copy(update={"image_urls": urls})


def _grid(axes: list[GridAxis], values: list[dict[str, Any]], runs: list[SeedRun]) -> Grid | None:
    """The grid's structured form (only when arguments were varied): each cell's values -> id, seed, path."""
    if not axes:
        return None
    cells = [
        GridCell(
            values=cell_values,
            seed=run.seed,
            image_id=run.image.id if run.image else None,
            path=run.image.path if run.image else None,
            error=run.error,
        )
        for cell_values, run in zip(values, runs, strict=True)
    ]
    return Grid(axes=axes, cells=cells)


def _sheet(output: CompareOutput, tiles: list[bytes | None]) -> bytes:
    """The labelled grid of a parameter comparison, or the contact sheet of a seed comparison."""
    if output.grid is not None:
        axes = output.grid.axes
        shared = [] if any(a.field == "seed" for a in axes) else output.seeds[:1]
        caption = " ".join(f"seed {s}" for s in shared)
        return sheets.within_budget(
            lambda side: sheets.grid_sheet(axes, tiles, caption=caption, cell_side=side),
            len(tiles),
            PREVIEW_BUDGET_BYTES,
        )
    cells = list(zip(tiles, [_label(r) for r in output.runs], strict=True))
    return sheets.within_budget(
        lambda side: sheets.contact_sheet(cells, cell_side=side), len(tiles), PREVIEW_BUDGET_BYTES
    )


def _label(run: SeedRun) -> str:
    return f"seed {run.seed}" if run.image else f"seed {run.seed} (failed)"


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


def _validation_message(
    exc: ValidationError, preset: Preset | None, model: type[BaseModel] = EditRequest
) -> str:
    text = describe_errors(exc, model)
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

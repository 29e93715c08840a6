"""What a call returns: the output models and their plain-text summaries, shared by both faces.

The structured models are what an MCP tool returns as structured content (with an output schema)
and what ``flux-mcp edit/compare --json`` prints; the summaries are the text an agent or a person
reads. The MCP server adds previews (and, when asked, resource links) around them; the CLI prints them.

This module knows nothing about MCP, the backends or the store's files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from .presets import PRESET_RULE
from .schema import cns_guide

__all__ = [
    "CompareOutcome",
    "CompareOutput",
    "EditOutcome",
    "EditOutput",
    "Grid",
    "GridAxis",
    "GridCell",
    "ImageOut",
    "ImageSizeOut",
    "JobInfo",
    "LoraOut",
    "LoraUse",
    "PresetOut",
    "PresetsOutput",
    "SeedRun",
    "cancel_step",
    "compare_summary",
    "edit_summary",
    "pending_step",
    "pending_summary",
    "presets_summary",
]


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
    state: Literal["queued", "running", "cancelling", "done", "failed", "cancelled"]
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
    next_step: str | None = Field(
        None, description="What to do next (collect a running job, or keep editing a result)."
    )

    @model_validator(mode="after")
    def _fill_next_step(self) -> _CallOutput:
        # In the structured content too: hosts such as pydantic-ai show the model only that when
        # every content block is text (a still-running job's answer).
        if self.next_step is None:
            self.next_step = pending_step(self.job) if self.job is not None else self._done_step()
        return self

    def _done_step(self) -> str:
        return EDIT_NEXT


class EditOutput(_CallOutput):
    """Structured result of edit_image."""

    images: list[ImageOut] = Field(default_factory=list)
    seed: int | None = Field(
        None, description="Seed of the first image; image i used seed + i (modulo 2^32)."
    )


#: What to do after an edit (text summary and structured content say the same).
EDIT_NEXT = "To keep editing a result, pass its flux://images/<id> in image_urls."
COMPARE_NEXT = (
    "Next: call edit_image with the seed you prefer (e.g. with preset 'quality'), "
    "or pass that image's flux://images/<id> in image_urls to edit it further."
)
GRID_NEXT = (
    "Next: re-run the cell you prefer with edit_image: params with that cell's values and seed "
    "(structured content: grid.cells), or pass its flux://images/<id> in image_urls."
)


def pending_step(info: JobInfo) -> str:
    """The next step of a call that is still running as a job."""
    if info.state == "cancelling":
        return (
            f"It is being cancelled and nothing will be saved; get_result with job_id={info.id!r} says when "
            "it has stopped."
        )
    return (
        f"Call get_result with job_id={info.id!r} (and wait_s up to a minute) to collect it, "
        "or cancel_job to stop it."
    )


def cancel_step(info: JobInfo) -> str:
    """The next step after cancel_job, by the job's state."""
    if info.state == "done":
        return f"It had already finished: call get_result with job_id={info.id!r} to collect it."
    if info.state == "failed":
        return f"It had failed: {info.error or 'see get_result'}."
    return "Nothing was saved for it; call edit_image or compare_seeds again to retry."


class SeedRun(BaseModel):
    seed: int
    image: ImageOut | None = None
    error: str | None = None


class GridAxis(BaseModel):
    field: str = Field(description="The varied argument (seed for the seeds' axis).")
    values: list[Any]


class GridCell(BaseModel):
    """One cell: re-run it with edit_image using ``params`` with ``values`` set (and this seed)."""

    values: dict[str, Any] = Field(description="This cell's value on each axis.")
    seed: int
    image_id: str | None = None
    path: str | None = None
    error: str | None = None


class Grid(BaseModel):
    """A parameter grid: the first axis is the rows, the second (or the seeds) the columns."""

    axes: list[GridAxis]
    cells: list[GridCell] = Field(description="Row-major, as drawn on the sheet.")


class CompareOutput(_CallOutput):
    """Structured result of compare_seeds."""

    runs: list[SeedRun] = Field(
        default_factory=list, description="One entry per cell, in the order of the contact sheet."
    )
    seeds: list[int] = Field(default_factory=list)
    failed_seeds: list[int] = Field(default_factory=list, description="The seed of each failed cell.")
    grid: Grid | None = Field(None, description="Set when arguments were varied (vary).")

    def _done_step(self) -> str:
        return COMPARE_NEXT if self.grid is None else GRID_NEXT


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
    setup_problems: list[str] = Field(
        default_factory=list, description="What `flux-mcp doctor` finds wrong with the set-up, with the fix."
    )
    preset_rule: str = Field(PRESET_RULE, description="Which arguments a preset fills.")
    cns_guide: dict[str, str] = Field(
        default_factory=cns_guide, description="What each cns setting of edit_image/compare_seeds does."
    )
    next_step: str = (
        "Name a preset in edit_image or compare_seeds (preset: NAME); use a library LoRA by its name as "
        "loras[].path and put its trigger word in the prompt."
    )


@dataclass
class EditOutcome:
    output: EditOutput
    previews: list[bytes]


@dataclass
class CompareOutcome:
    output: CompareOutput
    sheet: bytes


# -- plain-text summaries -----------------------------------------------------------------------


def edit_summary(out: EditOutput) -> str:
    lines = [
        f"Edited {len(out.images)} image(s) on {out.backend} ({out.endpoint}), seed {out.seed}, "
        f"{out.params['num_inference_steps']} steps"
        + (f", preset {out.preset}" if out.preset else "")
        + f"; estimated cost ${out.estimated_cost_usd:.3f}.",
    ]
    for i, img in enumerate(out.images, 1):
        lines.append(f"{i}. {img.uri} -> {img.path} ({img.width}x{img.height}, seed {img.seed})")
    lines += _tail(out.notes)
    lines.append(out.next_step or EDIT_NEXT)
    return "\n".join(lines)


def compare_summary(out: CompareOutput) -> str:
    ok = sum(1 for run in out.runs if run.image is not None)
    failed = len(out.runs) - ok
    if out.grid is None:
        what, labelled = f"{len(out.runs)} seeds", "by seed"
    else:
        axes = " x ".join(f"{axis.field} ({len(axis.values)})" for axis in out.grid.axes)
        what, labelled = f"a grid of {len(out.runs)} cells: {axes}", "with the axis values on its edges"
    lines = [
        f"Compared {what} on {out.backend} ({ok} succeeded"
        + (f", {failed} failed" if failed else "")
        + f"); estimated cost ${out.estimated_cost_usd:.3f}. The contact sheet is labelled {labelled}."
    ]
    cells = out.grid.cells if out.grid is not None else [None] * len(out.runs)
    for run, cell in zip(out.runs, cells, strict=True):
        label = f"seed {run.seed}"
        if cell is not None:
            label = (
                ", ".join(f"{k}={_short(v)}" for k, v in cell.values.items() if k != "seed") + f", {label}"
            )
        if run.image is not None:
            lines.append(f"- {label}: {run.image.uri} -> {run.image.path}")
        else:
            lines.append(f"- {label}: FAILED: {run.error}")
    lines += _tail(out.notes)
    lines.append(out.next_step or COMPARE_NEXT)
    return "\n".join(lines)


def pending_summary(info: JobInfo, notes: Sequence[str] = ()) -> str:
    done = f"{info.progress:g}/{info.total:g}" if info.total else f"{info.progress:g}"
    if info.state == "cancelling":
        return f"Job {info.id} is being cancelled (progress {done}): it stops at its next step; nothing will be saved."
    lines = [
        f"Still running after the server's time budget: job {info.id} ({info.state}, progress {done}: "
        f"{info.message or 'working'}). The work continues on the server and every image will be saved. "
        + pending_step(info),
        *_tail(list(notes)),
    ]
    return "\n".join(lines)


def presets_summary(out: PresetsOutput) -> str:
    lines = [f"Presets. {out.preset_rule}"]
    for p in out.presets:
        params = ", ".join(f"{k}={v}" for k, v in p.params.items())
        lines.append(f"- {p.name} [{p.source}]: {p.description} ({params})")
    lines.append("Image sizes: " + ", ".join(f"{s.name} {s.width}x{s.height}" for s in out.image_sizes))
    if out.loras:
        lines.append("LoRA library (use the name as loras[].path):")
        for lora in out.loras:
            trigger = f", trigger word {lora.trigger_word!r}" if lora.trigger_word else ""
            lines.append(f"- {lora.name}: {lora.description} (scale {lora.scale:g}{trigger}; {lora.path})")
    else:
        lines.append(f"LoRA library: empty (add [loras.NAME] entries to {out.presets_file}).")
    if out.presets_file_error:
        lines.append(f"WARNING: the presets file could not be used: {out.presets_file_error}")
    backend = out.backend
    if backend.get("name"):
        lines.append("Backend: " + ", ".join(f"{k}={v}" for k, v in backend.items()))
    else:
        lines.append(f"Backend: not available: {backend.get('error')}")
    lines += [f"Set-up problem: {line}" for line in out.setup_problems]
    lines.append(out.next_step)
    return "\n".join(lines)


def _tail(notes: list[str]) -> list[str]:
    return [f"Note: {n}" for n in notes]


def _short(value: Any) -> str:
    text = str(value)
    return repr(text[:37] + "...") if isinstance(value, str) and len(text) > 40 else str(value)

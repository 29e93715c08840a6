"""Parameter grids: which request fields compare_seeds can vary, and the cells a grid expands to.

A grid is one or two axes (``{field, values}``) plus the seeds. Every cell is a complete
``EditRequest`` that differs from the base request only in its axis values and seed, so that the only
thing changing between neighbouring cells is the thing being tested (the endpoint's own advice: fix the
seed, change one thing at a time). What can vary:

- any numeric, enum or boolean request field (``guidance_scale``, ``num_inference_steps``,
  ``acceleration``, ``enable_cns``, ``cns_s_churn``, ...), except ``seed`` and ``num_images``
  (seeds are their own axis, and each cell is one image);
- ``prompt`` and ``negative_prompt`` (variants of the prompt);
- ``loras.N.scale``: the scale of the request's N-th LoRA.

Cells are laid out row-major: the first axis is the rows, the second (or the seeds) the columns;
with two axes and several seeds, seeds vary fastest. This module is pure: no I/O, no PIL, no MCP.
"""

from __future__ import annotations

import itertools
import re
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError

from .errors import InvalidRequest
from .presets import describe_validation_error
from .schema import EditRequest, VaryAxis

__all__ = ["SEED_AXIS", "Cell", "expand", "variable_fields"]

#: The name of the seeds' axis in a grid's axes and cell values.
SEED_AXIS = "seed"
_LORA_SCALE = re.compile(r"^loras\.(\d)\.scale$")
_NOT_VARIED = {"seed", "num_images", "image_urls", "image_size", "loras"}
_TEXT_FIELDS = ("prompt", "negative_prompt")


@dataclass(frozen=True)
class Cell:
    """One run of a grid: its axis values (seed included when seeds are an axis) and its request."""

    values: dict[str, Any]
    request: EditRequest


def variable_fields() -> list[str]:
    """The request fields an axis may name (besides ``loras.N.scale``)."""
    names = []
    for name, info in EditRequest.model_fields.items():
        if name in _NOT_VARIED:
            continue
        if name in _TEXT_FIELDS or _is_scalar(info.annotation):
            names.append(name)
    return names


def expand(base: EditRequest, axes: list[VaryAxis], seeds: list[int]) -> tuple[list[VaryAxis], list[Cell]]:
    """Every cell of the grid, row-major, plus the axes as they are labelled (seeds last when several).

    Raises ``InvalidRequest`` naming the axis (``vary.N``) when a field cannot vary or a value is out
    of the field's range: nothing runs then.
    """
    _check_fields(base, axes)
    labelled = list(axes)
    if len(seeds) > 1:
        labelled.append(VaryAxis(field=SEED_AXIS, values=list(seeds)))
    shared_seed = seeds[0] if len(seeds) == 1 else None
    cells = []
    fields = [axis.field for axis in labelled]
    for combination in itertools.product(*(axis.values for axis in labelled)):
        values = dict(zip(fields, combination, strict=True))
        seed = values.get(SEED_AXIS, shared_seed)
        cells.append(Cell(values, _cell_request(base, axes, values, seed)))
    return labelled, cells


def _check_fields(base: EditRequest, axes: list[VaryAxis]) -> None:
    allowed = variable_fields()
    seen = set()
    for index, axis in enumerate(axes):
        where = f"vary.{index}.field"
        if axis.field in seen:
            raise InvalidRequest(
                f"{where}: {axis.field!r} is already an axis; vary each field once.", field=where
            )
        seen.add(axis.field)
        match = _LORA_SCALE.match(axis.field)
        if match:
            if int(match[1]) >= len(base.loras):
                raise InvalidRequest(
                    f"{where}: {axis.field} names LoRA {match[1]}, but the request has {len(base.loras)} "
                    "LoRA(s); add it to loras first (loras.0 is the first).",
                    field=where,
                )
        elif axis.field not in allowed:
            raise InvalidRequest(
                f"{where}: {axis.field!r} cannot vary. Vary one of: {', '.join(allowed)}, or loras.N.scale "
                "(seeds are varied with seeds/count).",
                field=where,
            )
        if len({repr(v) for v in axis.values}) != len(axis.values):
            raise InvalidRequest(f"vary.{index}.values: give distinct values.", field=f"vary.{index}.values")


def _cell_request(
    base: EditRequest, axes: list[VaryAxis], values: dict[str, Any], seed: int | None
) -> EditRequest:
    data = base.model_dump()
    data["seed"], data["num_images"] = seed, 1
    for axis in axes:
        value = values[axis.field]
        match = _LORA_SCALE.match(axis.field)
        if match:
            data["loras"][int(match[1])]["scale"] = value
        else:
            data[axis.field] = value
    try:
        return EditRequest.model_validate(data)
    except ValidationError as exc:
        index = next(
            (i for i, axis in enumerate(axes) if _mentions(exc, axis.field)),
            0,
        )
        raise InvalidRequest(
            f"vary.{index}.values: {describe_validation_error(exc)}; use values the field accepts "
            "(see the tool's schema).",
            field=f"vary.{index}.values",
        ) from None


def _mentions(exc: ValidationError, field: str) -> bool:
    wanted = tuple(int(p) if p.isdigit() else p for p in field.split("."))
    return any(tuple(err["loc"][: len(wanted)]) == wanted for err in exc.errors())


def _is_scalar(annotation: Any) -> bool:
    """int, float, bool or a Literal of them (optionally with None)."""
    if annotation in (int, float, bool):
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return True
    if origin in (Union, types.UnionType):
        return all(_is_scalar(arg) for arg in get_args(annotation) if arg is not type(None))
    return False

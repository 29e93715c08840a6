"""How a tool call's raw arguments become request fields, forgiving where agents commonly slip.

The tools advertise the CNS knobs as one ``cns`` object (``cns.s_churn`` is the endpoint's
``cns_s_churn``) to keep the per-turn tool list small; ``flatten_cns`` maps them back to the
endpoint's names, which ``EditRequest``, the backends and presets use. ``normalize`` accepts what
agents are seen to send: a bare string for ``image_urls``, ``"1024x768"`` for ``image_size``, ``null``
for an argument they mean to leave out, ``seed`` for a one-seed grid in compare_seeds.

The preset rule (``presets.PRESET_RULE``) works for callers that send only what they mean and for strict
function-calling hosts that send every field: with a preset, an argument equal to the endpoint's
default counts as not given. ``preset_notes`` and ``trigger_notes`` are the warnings a result carries.

This module knows nothing about MCP, the backends or the store.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import InvalidRequest
from .presets import Preset, describe_errors_of, did_you_mean
from .schema import CNS_GROUP, CNS_PREFIX, EditRequest, tool_input_schema

__all__ = [
    "describe_errors",
    "flatten_cns",
    "normalize",
    "preset_notes",
    "tool_field",
    "trigger_notes",
]


_SIZE = re.compile(r"^\s*(\d{1,5})\s*[x×X*,]\s*(\d{1,5})\s*$")


def flatten_cns(args: dict[str, Any]) -> dict[str, Any]:
    """``cns: {s_churn: 1}`` -> ``cns_s_churn: 1`` (the endpoint's names); flat names pass through."""
    out = {k: v for k, v in args.items() if k != CNS_GROUP}
    group = args.get(CNS_GROUP)
    if isinstance(group, str) and group.strip().startswith("{"):
        with contextlib.suppress(ValueError):
            group = json.loads(group)
    if group is None:
        return out
    if not isinstance(group, dict):
        raise InvalidRequest(
            'cns: must be an object of CNS settings, e.g. {"s_churn": 0.5}; leave it out for the defaults.',
            field=CNS_GROUP,
        )
    for name, value in group.items():
        key = CNS_PREFIX + str(name)
        if key in out and out[key] != value:
            raise InvalidRequest(
                f"cns.{name}: given twice with different values (also as {key}); give it once.", field=key
            )
        out[key] = value
    return out


def tool_field(name: str) -> str:
    """A request field as the tools name it: ``cns_s_churn`` -> ``cns.s_churn``."""
    return CNS_GROUP + "." + name[len(CNS_PREFIX) :] if name.startswith(CNS_PREFIX) else name


def normalize(args: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """The raw arguments with the usual slips fixed, CNS flattened and, when a preset is named,
    arguments at the endpoint default dropped (``presets.PRESET_RULE``)."""
    args = {k: v for k, v in flatten_cns(args).items() if v is not None or not _null_is_unset(k, model)}
    urls = args.get("image_urls")
    if isinstance(urls, str) and not urls.lstrip().startswith("["):  # "[..." is a broken JSON list
        args["image_urls"] = [urls]
    size = args.get("image_size")
    if isinstance(size, str) and (match := _SIZE.match(size)):
        args["image_size"] = {"width": int(match[1]), "height": int(match[2])}
    if isinstance(args.get("vary"), list):
        args["vary"] = [_axis(axis) for axis in args["vary"]]
    if "seed" in args and "seed" not in model.model_fields and "seeds" in model.model_fields:
        args = _seed_for_compare(args)
    if args.get("preset") is not None:
        args = {k: v for k, v in args.items() if not _is_default(k, v)}
    return args


def _null_is_unset(name: str, model: type[BaseModel]) -> bool:
    """``null`` means "not given" for a field that takes null anyway or an optional string (agents send
    ``negative_prompt: null``); elsewhere it stays an error naming the field (a NaN arrives as null)."""
    info = model.model_fields.get(name)
    if info is None:
        return False
    return not info.is_required() and (info.annotation is str or info.default is None)


def _axis(axis: Any) -> Any:
    """Grid axes may name CNS knobs either way: ``cns.s_churn`` or ``cns_s_churn``."""
    if isinstance(axis, dict) and isinstance(axis.get("field"), str):
        field = axis["field"]
        if field.startswith(CNS_GROUP + "."):
            return {**axis, "field": CNS_PREFIX + field[len(CNS_GROUP) + 1 :]}
    return axis


def _seed_for_compare(args: dict[str, Any]) -> dict[str, Any]:
    """compare_seeds has ``seeds`` and ``count``; a lone ``seed`` is one seed for a grid, else a slip."""
    seed = args["seed"]
    if args.get("vary") and "seeds" not in args and "count" not in args:
        return {**{k: v for k, v in args.items() if k != "seed"}, "seeds": [seed]}
    raise InvalidRequest(
        f"seed: compare_seeds has no 'seed'; did you mean 'seeds' (a list of 2-8 distinct integers, e.g. "
        f"[{_short(seed)}, ...]) or 'count' (how many random seeds)?",
        field="seed",
    )


def _is_default(name: str, value: Any) -> bool:
    info = EditRequest.model_fields.get(name)
    if info is None or info.is_required():
        return False
    default = info.get_default(call_default_factory=True)
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return bool(value == default)


def preset_notes(args: dict[str, Any], preset: Preset | None) -> list[str]:
    """What the caller's arguments did to the preset: never let a preset silently do nothing."""
    if preset is None or not preset.params:
        return []
    overridden = [k for k in preset.params if k in args and args[k] != preset.params[k]]
    if not overridden:
        return []
    names = ", ".join(f"{tool_field(k)}={args[k]!r}" for k in overridden)
    if len(overridden) == len(preset.params):
        return [
            f"preset {preset.name!r} had no effect: your arguments ({names}) override every field it sets. "
            "Leave them out (or send their defaults) to use the preset."
        ]
    return [f"preset {preset.name!r}: your {names} replaced the preset's value(s)."]


def trigger_notes(prompt: Any, library_loras: list[dict[str, Any]]) -> list[str]:
    """A warning for each library LoRA whose trigger word is missing from the prompt."""
    text = prompt.lower() if isinstance(prompt, str) else ""
    return [
        f"LoRA {lora['name']!r} is trained with the trigger word {lora['trigger_word']!r}, which the prompt "
        "does not contain; add it to the prompt for the LoRA to take effect (the prompt was sent as written)."
        for lora in library_loras
        if lora.get("trigger_word") and lora["trigger_word"].lower() not in text
    ]


def describe_errors(exc: ValidationError, model: type[BaseModel]) -> str:
    """pydantic's errors as one line per field: a union's branches flattened into what is accepted,
    unknown arguments with the nearest known name, CNS fields named as the tools name them."""
    schema_props = _tool_properties(model)
    by_field: dict[str, list[Any]] = {}
    for err in exc.errors(include_url=False):
        by_field.setdefault(str(err["loc"][0]) if err["loc"] else "", []).append(err)
    lines = []
    for field, errors in by_field.items():
        shown = tool_field(field) if len(field) <= 60 else field[:57] + "..."  # names come from callers
        if errors[0]["type"] == "extra_forbidden":
            hint = (
                did_you_mean(shown, [tool_field(n) for n in model.model_fields]) if len(field) <= 60 else ""
            )
            lines.append(f"{shown}: unknown argument ({hint or 'see the tool schema'}); remove or rename it")
        elif len(errors) > 1 and field in schema_props and "anyOf" in schema_props[field]:
            inside = [_untagged(e) for e in errors if len(_untagged(e)["loc"]) > 1]
            if inside:  # the value has one branch's shape (an object): what is wrong inside it
                lines.append(describe_errors_of(inside))
            else:
                got = errors[0].get("input")
                lines.append(f"{shown}: accepts {_accepted(schema_props[field])} (got {_short(got)})")
        else:
            text = describe_errors_of(errors)
            lines.append(text.replace(field, shown, 1) if field.startswith(CNS_PREFIX) else text)
    return "; ".join(lines)


_FIELD_PART = re.compile(r"^[a-z_][a-z0-9_]*$")


def _untagged(error: Any) -> Any:
    """An error whose location names pydantic's union branches (``ImageSize``, ``literal[...]``)
    without them: ``image_size.ImageSize.width`` -> ``image_size.width``."""
    loc = tuple(p for p in error["loc"] if isinstance(p, int) or _FIELD_PART.match(p))
    return {**error, "loc": loc}


def _tool_properties(model: type[BaseModel]) -> dict[str, Any]:
    return tool_input_schema(model, group=False).get("properties", {})


def _accepted(prop: dict[str, Any]) -> str:
    options = []
    for branch in prop["anyOf"]:
        if "enum" in branch:
            options.append("one of " + ", ".join(repr(v) for v in branch["enum"]))
        elif branch.get("type") == "object" and "properties" in branch:
            options.append("{" + ", ".join(f'"{k}": ...' for k in branch["properties"]) + "}")
        elif branch.get("type") == "array":
            options.append(f"a list of {branch.get('items', {}).get('type', 'values')}")
        elif branch.get("type") == "null":
            options.append("null (leave it out)")
        elif "type" in branch:
            options.append(f"a {branch['type']}")
    return " or ".join(options)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

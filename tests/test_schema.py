"""The tool schema printed by ``flux-mcp schema`` matches the endpoint's published input schema,
field by field, so drift between flux_mcp.schema and the endpoint is caught."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from flux_mcp.schema import CompareSeedsArgs, EditImageArgs, EditRequest

ENDPOINT = json.loads((Path(__file__).parent / "data" / "endpoint_input_schema.json").read_text())
CONSTRAINTS = ("default", "minimum", "maximum", "exclusiveMinimum", "minItems", "maxItems")
#: Where we are deliberately stricter than the endpoint (documented in schema.py / README).
OUR_TIGHTENINGS = {("seed", "minimum"), ("seed", "maximum")}


def _cli_schema(tool: str) -> dict[str, Any]:
    return json.loads(_cli_output(tool))


@functools.cache
def _cli_output(tool: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "flux_mcp", "schema", "--tool", tool],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def _types(prop: dict[str, Any], defs: dict[str, Any]) -> set[str]:
    if "$ref" in prop:
        return {"object"}
    if "anyOf" in prop:
        return set().union(*(_types(p, defs) for p in prop["anyOf"])) - {"null"}
    return {prop["type"]} if "type" in prop else set()


def _enum(prop: dict[str, Any]) -> set[str]:
    values: set[str] = set(prop.get("enum", []))
    for option in prop.get("anyOf", []):
        values |= set(option.get("enum", []))
    return values


def _nested(prop: dict[str, Any], schema: dict[str, Any], endpoint_side: bool) -> dict[str, Any] | None:
    """The object schema inside a property (ImageSize, LoRA items) on either side."""
    candidates = [prop, *prop.get("anyOf", []), prop.get("items", {})]
    for cand in candidates:
        if "$ref" in cand and endpoint_side:
            return ENDPOINT["components"]["schemas"][cand["$ref"].split("/")[-1]]
        if cand.get("type") == "object" and "properties" in cand:
            return cand
    return None


def _compare(ours: dict[str, Any], theirs: dict[str, Any], where: str) -> list[str]:
    problems = []
    for name, their_prop in theirs["properties"].items():
        our_prop = ours["properties"].get(name)
        if our_prop is None:
            problems.append(f"{where}{name}: missing")
            continue
        if _types(our_prop, {}) != _types(their_prop, {}):
            problems.append(f"{where}{name}: type {_types(our_prop, {})} != {_types(their_prop, {})}")
        if _enum(our_prop) != _enum(their_prop):
            problems.append(f"{where}{name}: enum {_enum(our_prop)} != {_enum(their_prop)}")
        for key in CONSTRAINTS:
            if (name, key) in OUR_TIGHTENINGS:
                continue
            if our_prop.get(key) != their_prop.get(key):
                problems.append(f"{where}{name}: {key} {our_prop.get(key)!r} != {their_prop.get(key)!r}")
        if not our_prop.get("description"):
            problems.append(f"{where}{name}: no description for the agent")
        their_nested = _nested(their_prop, ENDPOINT, endpoint_side=True)
        if their_nested is not None:
            our_nested = _nested(our_prop, ours, endpoint_side=False)
            if our_nested is None:
                problems.append(f"{where}{name}: nested object missing")
            else:
                problems += _compare(our_nested, their_nested, f"{where}{name}.")
    extra = set(ours["properties"]) - set(theirs["properties"]) - {"preset", "seeds", "count"}
    problems += [f"{where}{name}: not an endpoint field" for name in sorted(extra)]
    if set(ours.get("required", [])) != set(theirs.get("required", [])):
        problems.append(f"{where}required {ours.get('required')} != {theirs.get('required')}")
    return problems


def _endpoint_names(schema: dict[str, Any]) -> dict[str, Any]:
    """The tool schema with its ``cns`` object spread back into the endpoint's ``cns_<name>`` fields."""
    props: dict[str, Any] = {}
    for name, prop in schema["properties"].items():
        if name == "cns":
            props.update({f"cns_{k}": v for k, v in prop["properties"].items()})
        else:
            props[name] = prop
    return {**schema, "properties": props}


def test_edit_image_schema_matches_the_endpoint_field_by_field() -> None:
    ours = _cli_schema("edit_image")
    cns = ours["properties"]["cns"]
    assert cns["type"] == "object" and cns["additionalProperties"] is False
    assert "enable_cns is true" in cns["description"]
    ours = _endpoint_names(ours)
    assert _compare(ours, ENDPOINT, "") == []
    assert "$defs" not in json.dumps(ours) and "$ref" not in json.dumps(ours), (
        "refs must be inlined for hosts"
    )
    assert {"type": "string", "maxLength": 200} in ours["properties"]["preset"]["anyOf"]


def test_field_order_follows_the_endpoint() -> None:
    ours = list(_cli_schema("request")["properties"])
    assert ours == ENDPOINT["x-fal-order-properties"]


def test_compare_seeds_schema_is_edit_image_minus_seed_and_num_images() -> None:
    ours = _cli_schema("compare_seeds")
    edit = _cli_schema("edit_image")
    added = {"seeds", "count", "vary"}
    assert set(ours["properties"]) == set(edit["properties"]) - {"seed", "num_images"} | added
    # Shared arguments are described once, in edit_image (hosts send both every turn); else identical.
    for name in set(ours["properties"]) & set(edit["properties"]):
        assert "description" not in json.dumps(ours["properties"][name]), name
        assert ours["properties"][name] == _without_descriptions(edit["properties"][name]), name
    # One seed (or count 1) is allowed for a grid; without vary the model asks for at least two.
    assert ours["properties"]["count"]["anyOf"][0]["minimum"] == 1
    assert ours["properties"]["count"]["anyOf"][0]["maximum"] == 8
    vary = ours["properties"]["vary"]["anyOf"][0]
    assert vary["maxItems"] == 2 and vary["items"]["properties"]["values"]["maxItems"] == 8


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (
                {n: _without_descriptions(p) for n, p in v.items()}
                if k == "properties"
                else _without_descriptions(v)
            )
            for k, v in node.items()
            if k != "description"
        }
    return [_without_descriptions(v) for v in node] if isinstance(node, list) else node


def test_seeds_item_bounds_sit_inside_the_array_branch() -> None:
    seeds = _cli_schema("compare_seeds")["properties"]["seeds"]
    array = next(branch for branch in seeds["anyOf"] if branch.get("type") == "array")
    assert array["items"] == {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
    assert set(seeds) == {"anyOf", "default", "description"}


def test_no_pydantic_titles_and_every_object_is_closed() -> None:
    for tool in ("edit_image", "compare_seeds"):
        text = json.dumps(_cli_schema(tool))
        assert '"title"' not in text, tool

    def objects(node: Any) -> list[dict[str, Any]]:
        found = []
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                found.append(node)
            for key, value in node.items():
                found += objects(list(value.values()) if key == "properties" else value)
        elif isinstance(node, list):
            for value in node:
                found += objects(value)
        return found

    for tool in ("edit_image", "compare_seeds"):
        assert all(obj.get("additionalProperties") is False for obj in objects(_cli_schema(tool))), tool


def test_the_drift_check_itself_catches_a_changed_range() -> None:
    ours = _endpoint_names(_cli_schema("edit_image"))
    ours["properties"]["guidance_scale"]["maximum"] = 25
    del ours["properties"]["cns_energy_scale"]
    problems = _compare(ours, ENDPOINT, "")
    assert "guidance_scale: maximum 25 != 20" in problems
    assert "cns_energy_scale: missing" in problems


def test_payload_sends_every_field_with_endpoint_names() -> None:
    request = EditRequest(prompt="p", image_urls=["https://example.com/a.png"], seed=3)
    payload = request.payload()
    assert set(payload) == set(ENDPOINT["properties"]) - {"image_size"}
    assert payload["seed"] == 3 and payload["loras"] == []


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"guidance_scale": 25}, "guidance_scale"),
        ({"image_urls": ["a"] * 5}, "image_urls"),
        ({"loras": [{"path": "x"}] * 4}, "loras"),
        ({"loras": [{"path": "x", "scale": 5}]}, "loras.0.scale"),
        ({"num_inference_steps": 3}, "num_inference_steps"),
        ({"cns_num_freq_bins": 129}, "cns_num_freq_bins"),
        ({"image_size": "huge"}, "image_size"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"seed": -1}, "seed"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(args: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        EditImageArgs.model_validate({"prompt": "p", "image_urls": ["a"], **args})
    locs = {".".join(str(p) for p in err["loc"]) for err in info.value.errors()}
    assert any(loc == field or loc.startswith(field + ".") for loc in locs), locs


def test_compare_seeds_needs_exactly_one_of_seeds_or_count() -> None:
    base = {"prompt": "p", "image_urls": ["a"]}
    for bad in ({}, {"seeds": [1, 2], "count": 2}, {"seeds": [1, 1]}, {"seeds": [1]}, {"count": 9}):
        with pytest.raises(ValidationError):
            CompareSeedsArgs.model_validate({**base, **bad})
    assert CompareSeedsArgs.model_validate({**base, "count": 3}).count == 3

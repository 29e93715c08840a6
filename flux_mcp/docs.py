"""The README's generated tables: settings (from ``config.SETTINGS``) and tools (from the tools' own
input schemas), so the documentation cannot drift from the code.

    python -m flux_mcp.docs --write   # rewrite the tables between the markers in README.md
    python -m flux_mcp.docs --check   # exit 1 when README.md is out of date (the test suite does this)

Each table lives between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .config import SETTINGS
from .schema import CompareSeedsArgs, EditImageArgs

__all__ = ["render_settings", "render_tool", "update_readme", "value_range"]


def render_settings() -> str:
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    rows += [f"| `{s.env}` | {s.default_doc} | {_cell(s.doc)} |" for s in SETTINGS]
    return "\n".join(rows)


def _type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"] if p.get("type") != "null")
    kind = prop.get("type", "object")
    if kind == "array":
        return f"list of {_type(prop.get('items', {}))}"
    if kind == "object" and "properties" in prop:
        return "{" + ", ".join(prop["properties"]) + "}"
    return kind


def value_range(prop: dict[str, Any]) -> str:
    """A property's range as people read it: ``0–20``, ``>0–14142``, ``1–4 items``."""
    for option in prop.get("anyOf", []):
        if option.get("type") != "null":
            prop = {**option, **{k: v for k, v in prop.items() if k != "anyOf"}}
    parts = []
    lo = prop.get("minimum", prop.get("exclusiveMinimum"))
    if lo is not None or "maximum" in prop:
        lo_text = "" if lo is None else (f">{_num(lo)}" if "exclusiveMinimum" in prop else _num(lo))
        parts.append(f"{lo_text}–{_num(prop['maximum'])}" if "maximum" in prop else f"≥ {lo_text}")
    if "maxItems" in prop:
        parts.append(f"{prop.get('minItems', 0)}–{prop['maxItems']} items")
    return ", ".join(parts)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def render_tool(model: type[BaseModel]) -> str:
    """One row per argument; the ``cns`` object's members follow it as ``cns.<name>`` rows, each with
    the endpoint field it is (``cns_<name>``) and its full explanation."""
    from .schema import CNS_GROUP, CNS_PREFIX, cns_guide, tool_input_schema

    schema = tool_input_schema(model)
    required = set(schema.get("required", []))
    described_in = getattr(model, "described_in", None)
    elsewhere = f"as in {_TOOL_OF[described_in]}" if described_in else ""
    rows = ["| argument | type | default | range | meaning |", "|---|---|---|---|---|"]
    for name, prop in schema["properties"].items():
        rows.append(_row(name, prop, name in required, prop.get("description", elsewhere)))
        if name == CNS_GROUP:
            for member, inner in prop["properties"].items():
                meaning = f"endpoint: `{CNS_PREFIX}{member}`. " + (
                    elsewhere or cns_guide()[f"{CNS_GROUP}.{member}"]
                )
                rows.append(_row(f"{CNS_GROUP}.{member}", inner, False, meaning))
    return "\n".join(rows)


def _row(name: str, prop: dict[str, Any], required: bool, meaning: str) -> str:
    default = "required" if required else f"`{json.dumps(prop['default'])}`" if "default" in prop else ""
    return f"| `{name}` | {_type(prop)} | {default} | {value_range(prop)} | {_cell(meaning)} |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_TOOL_OF: dict[Any, str] = {EditImageArgs: "edit_image", CompareSeedsArgs: "compare_seeds"}


def _tables() -> dict[str, str]:
    return {
        "settings": render_settings(),
        "edit_image": render_tool(EditImageArgs),
        "compare_seeds": render_tool(CompareSeedsArgs),
    }


def update_readme(path: Path, check: bool = False) -> bool:
    """Rewrite (or, with check, compare) the generated tables; True when the file is up to date."""
    text = path.read_text("utf-8")
    new = text
    for name, table in _tables().items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n)(?:.*?\n)?(<!-- END {name} -->)", re.S)
        if not pattern.search(new):
            raise SystemExit(f"{path}: no <!-- BEGIN {name} --> ... <!-- END {name} --> markers")
        new = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), new)
    if new == text:
        return True
    if not check:
        path.write_text(new, "utf-8")
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--readme", default=str(Path(__file__).resolve().parent.parent / "README.md"))
    ns = parser.parse_args(argv)
    fresh = update_readme(Path(ns.readme), check=not ns.write)
    if ns.write:
        print("README.md tables are up to date" if fresh else "README.md tables rewritten")
        return 0
    if not fresh:
        print("README.md tables are out of date: run python -m flux_mcp.docs --write", file=sys.stderr)
    return 0 if fresh else 1


if __name__ == "__main__":
    sys.exit(main())

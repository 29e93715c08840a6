"""The human face, ``flux-mcp``: serve (stdio by default, --http), edit, compare, presets, schema, demo.

``flux-mcp`` with no command runs the stdio MCP server (what Claude Desktop starts), through the
``serve`` function the entry point (``__main__``) hands in: this face never imports the MCP face. The ``edit`` and
``compare`` commands build their options from the request model, so they take exactly the tools'
arguments; only options given on the command line are sent, so presets behave as in the tools.
Library errors become one readable line on stderr and exit code 1; stdout carries only results
(and, for ``serve``, the MCP protocol).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import anyio

from . import __version__, doctor
from .config import Settings
from .docs import value_range
from .errors import ConfigError, FluxMCPError
from .redact import install_log_scrubbing
from .schema import IMAGE_SIZE_PRESETS, CompareSeedsArgs, EditImageArgs, EditRequest, tool_input_schema

__all__ = ["main"]

logger = logging.getLogger("flux_mcp")

#: Fields with a hand-made CLI form: positional images, --lora PATH[:SCALE], --image-size NAME|WxH,
#: --vary FIELD=V1,V2,...
_SPECIAL = {"prompt", "image_urls", "loras", "image_size", "vary"}


def _setup_logging(settings: Settings, verbose: bool = False) -> None:
    """One stderr handler; every record of the process is scrubbed of secrets (``redact``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    install_log_scrubbing(settings.secrets(), root.handlers)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- argument parsing derived from the request model ---------------------------------------------


def _add_request_options(parser: argparse.ArgumentParser, model: type[Any]) -> None:
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="input images: file paths, https URLs, data URIs or flux://images/<id>",
    )
    parser.add_argument(
        "--prompt", "-p", required=True, help=_help(EditRequest.model_fields["prompt"].description)
    )
    parser.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:SCALE]",
        default=argparse.SUPPRESS,
        help="a LoRA (URL, repo id, library name or file) with an optional scale; repeat up to 3 times",
    )
    parser.add_argument(
        "--image-size",
        metavar="NAME|WxH",
        default=argparse.SUPPRESS,
        help=f"output size: {', '.join(IMAGE_SIZE_PRESETS)} or WIDTHxHEIGHT",
    )
    if "vary" in model.model_fields:
        parser.add_argument(
            "--vary",
            action="append",
            metavar="FIELD=V1,V2,...",
            default=argparse.SUPPRESS,
            help='a grid axis, e.g. guidance_scale=3,5,7 or loras.0.scale=0.5,1 or \'prompt=["a", "b"]\' '
            "(a JSON list); repeat for a second axis",
        )
    props = tool_input_schema(model, group=False)["properties"]
    for name, info in model.model_fields.items():
        if name in _SPECIAL:
            continue
        flag = "--" + name.replace("_", "-")
        annotation = info.annotation
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": _help(info.description, props[name]),
        }
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = list(get_args(annotation))
        elif name == "seeds":
            kwargs["type"] = lambda raw: [int(s) for s in raw.split(",")]
            kwargs["metavar"] = "S1,S2,..."
        else:
            base = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
            kwargs["type"] = base[0] if base[0] in (int, float, str) else str
        parser.add_argument(flag, **kwargs)


def _help(description: str | None, prop: dict[str, Any] | None = None) -> str:
    """An option's help: its description (naming this CLI's own commands), default and range, all
    derived from the request model like the tools' schemas."""
    text = (description or "").replace("list_presets", "`flux-mcp presets`")
    facts = []
    if prop is not None and prop.get("default") is not None:
        facts.append(f"default {json.dumps(prop['default'])}")
    if prop is not None and (span := value_range(prop)):
        facts.append(span)
    # argparse formats help with %: a literal percent sign must be doubled.
    return (text + (f" ({'; '.join(facts)})" if facts else "")).replace("%", "%%")


def _request_args(ns: argparse.Namespace, model: type[Any]) -> dict[str, Any]:
    args: dict[str, Any] = {"prompt": ns.prompt, "image_urls": list(ns.images)}
    for name in model.model_fields:
        if name not in _SPECIAL and hasattr(ns, name):
            args[name] = getattr(ns, name)
    if hasattr(ns, "lora"):
        args["loras"] = [_parse_lora(item) for item in ns.lora]
    if hasattr(ns, "image_size"):
        args["image_size"] = _parse_size(ns.image_size)
    if hasattr(ns, "vary"):
        args["vary"] = [_parse_axis(item) for item in ns.vary]
    return args


def _parse_axis(item: str) -> dict[str, Any]:
    """``FIELD=V1,V2`` (each value read as JSON when it parses: numbers, true/false) or ``FIELD=[JSON list]``."""
    field, _, raw = item.partition("=")
    raw = raw.strip()
    if raw.startswith("["):
        try:
            return {"field": field.strip(), "values": json.loads(raw)}
        except ValueError:
            pass
    return {"field": field.strip(), "values": [_json_or_text(part.strip()) for part in raw.split(",")]}


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_lora(item: str) -> dict[str, Any]:
    path, sep, scale = item.rpartition(":")
    if sep and path and not path.endswith(("https", "http")):
        try:
            return {"path": path, "scale": float(scale)}
        except ValueError:
            pass
    return {"path": item}


def _parse_size(raw: str) -> Any:
    if raw in IMAGE_SIZE_PRESETS:
        return raw
    width, sep, height = raw.lower().partition("x")
    if sep and width.isdigit() and height.isdigit():
        return {"width": int(width), "height": int(height)}
    return raw  # let the request model explain what is allowed


# -- commands -------------------------------------------------------------------------------------


def _print_progress(enabled: bool):  # type: ignore[no-untyped-def]
    async def report(progress: float, total: float | None, message: str) -> None:
        if enabled:
            shown = f"{progress:g}/{total:g}" if total else f"{progress:g}"
            print(f"  [{shown}] {message}", file=sys.stderr, flush=True)

    return report


async def _run_edit(settings: Settings, args: dict[str, Any], quiet: bool, as_json: bool) -> None:
    from .service import FluxService

    service = FluxService(settings)
    await service.start()
    try:
        outcome = await service.edit(args, _print_progress(not quiet))
    finally:
        await service.aclose()
    out = outcome.output
    if as_json:
        print(out.model_dump_json(indent=2))
        return
    for img in out.images:
        print(img.path)
    print(f"seed {out.seed}, estimated cost ${out.estimated_cost_usd:.3f}", file=sys.stderr)
    for note in out.notes:
        print(f"note: {note}", file=sys.stderr)


async def _run_compare(settings: Settings, args: dict[str, Any], quiet: bool, as_json: bool) -> None:
    from .service import FluxService

    service = FluxService(settings)
    await service.start()
    try:
        outcome = await service.compare(args, _print_progress(not quiet))
    finally:
        await service.aclose()
    out = outcome.output
    if as_json:
        print(out.model_dump_json(indent=2))
        return
    cells = out.grid.cells if out.grid is not None else [None] * len(out.runs)
    for run, cell in zip(out.runs, cells, strict=True):
        where = run.image.path if run.image else "FAILED: " + str(run.error)
        values = "".join(f"{k}={v}\t" for k, v in cell.values.items() if k != "seed") if cell else ""
        print(f"{values}seed {run.seed}\t{where}")


def _presets(settings: Settings, as_json: bool) -> None:
    from .results import presets_summary
    from .service import FluxService

    out = FluxService(settings).presets()
    print(out.model_dump_json(indent=2) if as_json else presets_summary(out))


def _schema(tool: str) -> None:
    model = {"edit_image": EditImageArgs, "compare_seeds": CompareSeedsArgs, "request": EditRequest}[tool]
    # "request" is the endpoint's own body: its names, flat.
    print(json.dumps(tool_input_schema(model, group=tool != "request"), indent=2))


def _calibrate(settings: Settings, ns: argparse.Namespace) -> int:
    from .backends import local_available

    if not local_available():
        raise ConfigError("calibrate-cns needs the local extra: pip install 'flux-mcp[local]'.")
    from .backends.calibration import calibrate

    print(
        f"Calibrating CNS gamma on {settings.model}: {ns.seeds} runs x {ns.steps} steps ...", file=sys.stderr
    )
    path, seconds = calibrate(
        settings,
        steps=ns.steps,
        guidance=ns.guidance,
        bins=ns.bins,
        seeds=ns.seeds,
        size=ns.size,
        image=Path(ns.image) if ns.image else None,
        prompt=ns.prompt,
    )
    print(f"saved {path} in {seconds:.1f} s; cns_gamma_source=matrix now uses it", file=sys.stderr)
    print(path)
    return 0


def _input_roots(ns: argparse.Namespace) -> dict[str, Any]:
    """``serve --input-root DIR ...`` as a settings override (empty picks are dropped)."""
    roots = tuple(Path(p).expanduser() for p in getattr(ns, "input_root", []) if p.strip())
    return {"input_roots": roots} if roots else {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux-mcp",
        description="MCP server and CLI for FLUX.2 [klein] 9B Base edit LoRAs (hosted on fal or local GPU). "
        "With no command, serves MCP over stdio.",
    )
    parser.add_argument("--version", action="version", version=f"flux-mcp {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="log at INFO level to stderr")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the MCP server (stdio, or streamable HTTP with --http)")
    serve.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="HTTP bind address (default 127.0.0.1; others need FLUX_MCP_HTTP_TOKEN)",
    )
    serve.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765)")
    serve.add_argument("--path", default="/mcp", help="HTTP endpoint path (default /mcp)")
    serve.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="extra Host header value to accept (DNS-rebinding protection stays on)",
    )
    serve.add_argument(
        "--input-root",
        nargs="*",
        action="extend",
        default=[],
        metavar="DIR",
        help="folders local input paths may be read from (replaces FLUX_MCP_INPUT_ROOTS; "
        "how an MCP bundle passes its folder pickers)",
    )

    for name, model, help_text in (
        ("edit", EditImageArgs, "run one edit and print the saved file paths"),
        (
            "compare",
            CompareSeedsArgs,
            "run one edit with several seeds or on a grid (--vary); print cell -> file",
        ),
    ):
        cmd = sub.add_parser(name, help=help_text)
        _add_request_options(cmd, model)
        cmd.add_argument("--json", action="store_true", help="print the structured result as JSON")
        cmd.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    presets = sub.add_parser("presets", help="list presets, image sizes, the LoRA library and the backend")
    presets.add_argument("--json", action="store_true", help="print the structured result as JSON")
    schema = sub.add_parser("schema", help="print a tool's JSON Schema (derived from the request model)")
    schema.add_argument(
        "--tool",
        choices=["edit_image", "compare_seeds", "request"],
        default="edit_image",
        help="which schema: a tool's arguments, or the endpoint's request body (default edit_image)",
    )

    calib = sub.add_parser(
        "calibrate-cns",
        help="measure the CNS gamma matrix on the local model "
        "(used by cns_gamma_source=matrix; until then an analytic stand-in is used)",
    )
    calib.add_argument("--steps", type=int, default=28, help="sampler steps to calibrate for (default 28)")
    calib.add_argument(
        "--guidance", type=float, default=5.0, help="guidance scale (default 5, the endpoint's)"
    )
    calib.add_argument("--bins", type=int, default=32, help="radial frequency bands (default 32)")
    calib.add_argument("--seeds", type=int, default=8, help="deterministic runs to average (default 8)")
    calib.add_argument("--size", type=int, default=1024, help="output side in pixels (default 1024)")
    calib.add_argument("--image", default=None, help="reference image (default: a built-in example)")
    calib.add_argument("--prompt", default="a detailed photograph", help="prompt for the runs")

    demo = sub.add_parser(
        "demo",
        help="run edit_image and compare_seeds through a real MCP client "
        "(offline tiny model without FAL_KEY, hosted endpoint with it)",
    )
    demo.add_argument(
        "--backend",
        choices=["auto", "local", "fal"],
        default="auto",
        help="auto: the hosted endpoint with FAL_KEY, else the offline tiny model (default auto)",
    )
    demo.add_argument("--output-dir", default=None, help="where the demo saves its results")

    check = sub.add_parser("doctor", help="check the set-up (backend, key, folders, GPU) and say what to fix")
    check.add_argument("--json", action="store_true", help="print the checks as JSON")
    check.add_argument("--offline", action="store_true", help="do not ask fal whether FAL_KEY is accepted")
    return parser


#: Runs the MCP server: ``serve(settings, http=, host=, port=, path=, allow_hosts=)`` (the entry point
#: passes the MCP face's; the CLI does not import it).
ServeFn = Callable[..., None]


def main(argv: Sequence[str] | None = None, *, serve: ServeFn | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        settings = Settings.from_env(**_input_roots(ns))
        _setup_logging(settings, ns.verbose)
        command = ns.command or "serve"
        if command == "serve":
            if ns.command is None:
                ns = parser.parse_args(["serve"])
            if serve is None:
                raise ConfigError("this entry point cannot serve MCP; run flux-mcp or python -m flux_mcp")
            serve(settings, http=ns.http, host=ns.host, port=ns.port, path=ns.path, allow_hosts=ns.allow_host)
        elif command == "edit":
            anyio.run(_run_edit, settings, _request_args(ns, EditImageArgs), ns.quiet, ns.json)
        elif command == "compare":
            anyio.run(_run_compare, settings, _request_args(ns, CompareSeedsArgs), ns.quiet, ns.json)
        elif command == "presets":
            _presets(settings, ns.json)
        elif command == "schema":
            _schema(ns.tool)
        elif command == "calibrate-cns":
            return _calibrate(settings, ns)
        elif command == "demo":
            from .demo import run_demo

            return run_demo(ns.backend, ns.output_dir)
        elif command == "doctor":
            return doctor.run_command(settings, as_json=ns.json, online=not ns.offline)
    except FluxMCPError as exc:
        print(f"flux-mcp: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0

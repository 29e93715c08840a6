"""The ``flux-mcp`` command and ``python -m flux_mcp``: the CLI face, serving through the MCP face.

The two faces never import each other: this entry point hands the CLI the MCP face's ``serve`` (imported
only when a command serves, so that ``flux-mcp edit`` does not load the MCP server).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from . import cli
from .config import Settings


def serve(settings: Settings, **options: Any) -> None:
    from .server import serve

    serve(settings, **options)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, serve=serve)


if __name__ == "__main__":
    sys.exit(main())

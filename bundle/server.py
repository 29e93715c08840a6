"""Entry point of the MCP bundle: the host runs this file with uv in the unpacked bundle.

It is exactly the ``flux-mcp`` command (stdio MCP server by default); uv installs the project from
the bundled ``pyproject.toml`` first, so the user needs no Python set-up.
"""

import sys

from flux_mcp.__main__ import main

sys.exit(main())

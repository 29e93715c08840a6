"""The shipped examples are valid: the Claude Desktop config is what the README shows and starts our
command; the presets file is covered by test_presets; the agent pipeline by test_e2e_presets_compare."""

from __future__ import annotations

import json
import re

from flux_mcp.config import SETTINGS

from .conftest import REPO


def test_claude_desktop_example_matches_the_readme_and_uses_real_settings() -> None:
    example = json.loads((REPO / "examples" / "claude_desktop_config.json").read_text())
    server = example["mcpServers"]["flux"]
    assert server["command"].endswith("/.venv/bin/flux-mcp")
    known = {s.env for s in SETTINGS}
    assert set(server["env"]) <= known, set(server["env"]) - known
    readme = (REPO / "README.md").read_text()
    block = re.search(r'```json\n(\{\n  "mcpServers".*?)\n```', readme, re.S)
    assert block is not None and json.loads(block.group(1)) == example

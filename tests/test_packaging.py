"""Install the way MCP users install: the wheel alone, ``uvx``, the MCP Bundle, the registry entry.

Every test works on what a user would get, never on the source tree:

- the sdist and wheel built by ``python -m build`` (checked by ``twine``);
- a fresh virtual environment holding only the wheel (+ the local extra), run from a folder with no
  repository around it: ``--version``, ``tools/list`` over stdio and ``flux-mcp demo``;
- ``uvx --from <wheel> flux-mcp``, the README's host-config line: a fresh tool environment without
  torch, answering ``tools/list``; its ``doctor`` says the local extra is missing;
- the ``.mcpb`` built by the official ``mcpb`` CLI, unpacked and started as a host would start it
  (the manifest's command, args and env with the user's answers substituted), then ``list_presets``;
- ``server.json`` against the MCP Registry's published schema (vendored in tests/data).

Slow installs are cached between runs under ``.test-cache/`` (uv's cache, and the wheel venv keyed
by a hash of pyproject.toml); npm packages stay in ``.node/mcpb``. Network: PyPI and npm only.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client as stdio_client_transport

import flux_mcp
from flux_mcp.config import SETTINGS

from .conftest import REPO, clean_env, server_env

pytestmark = pytest.mark.anyio

CACHE = REPO / ".test-cache"
#: The same pin as the Makefile's TORCH: on the project's CPU machines, the CPU wheel on disk.
TORCH = "torch==2.13.0"
TOOLS = {"edit_image", "compare_seeds", "list_presets", "get_result", "cancel_job"}
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{cmd[:4]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _uv_env(**extra: str) -> dict[str, str]:
    """uv with a persistent cache, never downloading a Python (the machine's is used)."""
    return clean_env(UV_CACHE_DIR=str(CACHE / "uv"), UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1", **extra)


async def _tool_names(command: str, args: list[str], env: dict[str, str], cwd: Path) -> set[str]:
    params = StdioServerParameters(command=command, args=args, env=env, cwd=str(cwd))
    async with Client(stdio_client_transport(params)) as client:
        return {tool.name for tool in (await client.list_tools()).tools}


# -- the sdist and the wheel ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)])
    return out


@pytest.fixture(scope="session")
def wheel(dist: Path) -> Path:
    (found,) = dist.glob("*.whl")
    return found


def test_sdist_and_wheel_pass_twine_and_carry_every_package_file(dist: Path, wheel: Path) -> None:
    _run([str(BIN / "twine"), "check", "--strict", *map(str, dist.iterdir())])
    version = flux_mcp.__version__
    assert wheel.name == f"flux_mcp-{version}-py3-none-any.whl"
    package = REPO / "flux_mcp"
    tracked = [
        p.relative_to(REPO).as_posix()
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"flux_mcp-{version}.dist-info/METADATA").decode()
    missing = [p for p in tracked if p not in names]
    assert not missing, f"files of the package missing from the wheel (add them to package-data): {missing}"
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    assert "Project-URL: Repository, " in metadata and "Classifier: Typing :: Typed" in metadata
    assert "Description-Content-Type: text/markdown" in metadata
    (sdist,) = dist.glob("*.tar.gz")
    assert sdist.name == f"flux_mcp-{version}.tar.gz"


@pytest.fixture(scope="session")
def wheel_venv(wheel: Path) -> Path:
    """A venv with only the wheel and its local extra; rebuilt when pyproject.toml changes."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()[:12]
    venv = CACHE / f"wheel-venv-{key}"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if (venv / ".complete").exists():
        _run([*pip, "--no-deps", "--force-reinstall", str(wheel)])  # today's code, cached dependencies
        return venv
    for stale in CACHE.glob("wheel-venv-*"):
        shutil.rmtree(stale)
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([*pip, TORCH])
    _run([*pip, f"{wheel}[local]"])
    (venv / ".complete").touch()
    return venv


async def test_the_wheel_alone_answers_version_tools_list_and_runs_the_demo(
    wheel_venv: Path, tmp_path: Path
) -> None:
    """From a folder with no repository around it, only what the wheel installed."""
    exe = wheel_venv / "bin" / "flux-mcp"
    env = {k: v for k, v in clean_env(OMP_NUM_THREADS="1").items() if k != "PYTHONPATH"}
    where = _run(
        [str(wheel_venv / "bin" / "python"), "-c", "import flux_mcp; print(flux_mcp.__file__)"], cwd=tmp_path
    )
    assert where.stdout.startswith(str(wheel_venv)), where.stdout
    assert (
        _run([str(exe), "--version"], cwd=tmp_path, env=env).stdout.strip()
        == f"flux-mcp {flux_mcp.__version__}"
    )
    assert await _tool_names(str(exe), [], server_env(tmp_path), tmp_path) == TOOLS

    demo = _run([str(exe), "demo", "--output-dir", str(tmp_path / "demo")], cwd=tmp_path, env=env)
    saved = sorted((tmp_path / "demo" / "results").glob("*.png"))
    assert len(saved) == 5, demo.stdout  # one edit + four seeds
    assert all(p.with_suffix(".json").exists() for p in saved)


# -- uvx -------------------------------------------------------------------------------------------


def readme_quick_start() -> dict[str, Any]:
    """The host-config entry the README's quick start tells users to paste."""
    readme = (REPO / "README.md").read_text()
    found = re.search(r"<!-- quick-start:.*?-->\n```json\n(.*?)\n```", readme, re.S)
    assert found, "README.md lost its quick-start entry"
    return json.loads("{" + found.group(1) + "}")["flux"]


async def test_uvx_runs_the_wheel_without_torch_and_doctor_names_the_missing_extra(
    wheel: Path, tmp_path: Path
) -> None:
    """The README's quick-start entry, with the built wheel in place of the git URL."""
    entry = readme_quick_start()
    assert entry["command"] == "uvx" and set(entry["env"]) <= {s.env for s in SETTINGS}
    args = entry["args"]
    args[args.index("--from") + 1] = str(wheel)
    uvx = [str(BIN / "uvx"), *args]
    env = _uv_env()
    assert (
        _run([*uvx, "--version"], cwd=tmp_path, env=env).stdout.strip() == f"flux-mcp {flux_mcp.__version__}"
    )
    assert await _tool_names(uvx[0], uvx[1:], server_env(tmp_path, **env), tmp_path) == TOOLS

    doctor = subprocess.run(
        [*uvx, "doctor", "--offline"],
        cwd=tmp_path,
        env={**env, "FLUX_MCP_BACKEND": "local", "FLUX_MCP_INPUT_ROOTS": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "[fail] local extra: torch is not installed -> pip install 'flux-mcp[local]'" in doctor.stdout


# -- the MCP Bundle --------------------------------------------------------------------------------


def host_launch(
    manifest: dict[str, Any], folder: Path, answers: dict[str, Any]
) -> tuple[list[str], dict[str, str]]:
    """What a host does with ``server.mcp_config``: substitute ``${__dirname}`` and the user's
    answers; an argument that is exactly one multi-valued answer becomes one argument per value."""

    def fill(text: str) -> str:
        text = text.replace("${__dirname}", str(folder))
        return re.sub(r"\$\{user_config\.(\w+)\}", lambda m: str(answers[m.group(1)]), text)

    config = manifest["server"]["mcp_config"]
    argv = [config["command"]]
    for arg in config["args"]:
        whole = re.fullmatch(r"\$\{user_config\.(\w+)\}", arg)
        if whole and isinstance(answers[whole.group(1)], list):
            argv += [str(v) for v in answers[whole.group(1)]]
        else:
            argv.append(fill(arg))
    return argv, {name: fill(value) for name, value in config["env"].items()}


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    done = _run([sys.executable, str(REPO / "bundle" / "build_bundle.py"), "--out", str(out)])
    assert "Manifest schema validation passes" in done.stdout  # mcpb validate ran
    return Path(done.stdout.strip().splitlines()[-1])


def test_bundle_manifest_matches_the_package(bundle: Path) -> None:
    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
    assert {"manifest.json", "icon.png", "server.py", "pyproject.toml", "flux_mcp/server.py"} <= names
    assert not any(n.startswith(("tests/", ".venv/", ".node/")) for n in names)
    assert manifest["manifest_version"] == "0.4" and manifest["server"]["type"] == "uv"
    assert manifest["version"] == flux_mcp.__version__
    assert {t["name"] for t in manifest["tools"]} == TOOLS
    assert manifest["repository"]["url"] == PYPROJECT["project"]["urls"]["Repository"]
    config = manifest["user_config"]
    assert config["fal_key"]["sensitive"] is True and config["input_roots"]["multiple"] is True
    assert config["output_dir"]["type"] == config["input_roots"]["type"] == "directory"
    known = {s.env for s in SETTINGS}
    assert set(manifest["server"]["mcp_config"]["env"]) <= known


async def test_bundle_starts_as_a_host_starts_it_and_lists_presets(bundle: Path, tmp_path: Path) -> None:
    installed = tmp_path / "Claude Extensions" / "flux-mcp"  # hosts unpack into a per-extension folder
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(installed)
    manifest = json.loads((installed / "manifest.json").read_text())
    pictures, desktop = tmp_path / "Pictures", tmp_path / "Desktop"
    pictures.mkdir()
    desktop.mkdir()
    key = "bundle-key-id:bundle-key-secret"
    answers = {
        "fal_key": key,
        "output_dir": tmp_path / "out",
        "input_roots": [pictures, desktop],
        "backend": "fal",
    }
    argv, env = host_launch(manifest, installed, answers)
    assert argv[0] == "uv"  # the host brings uv; here it is the one installed with the test extra
    log = tmp_path / "server.log"
    params = StdioServerParameters(
        command=str(BIN / "uv"), args=argv[1:], env={**_uv_env(), **env}, cwd=str(tmp_path)
    )
    with open(log, "w") as errlog:
        async with Client(stdio_client_transport(params, errlog=errlog)) as client:
            result = await client.call_tool("list_presets", {})
    out = result.structured_content
    assert out["backend"]["name"] == "fal" and out["setup_problems"] == []
    stderr = log.read_text()
    assert f"[ok] output folder: {tmp_path / 'out'} is writable" in stderr
    assert (
        f"[ok] input folder: {pictures} exists" in stderr and f"[ok] input folder: {desktop} exists" in stderr
    )
    assert key not in stderr and key not in json.dumps(out)


# -- the MCP Registry entry ------------------------------------------------------------------------


def test_server_json_follows_the_registry_schema_and_the_package() -> None:
    schema = json.loads((REPO / "tests" / "data" / "mcp_registry" / "server.schema.json").read_text())
    server = json.loads((REPO / "server.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    validator.validate(server)
    assert server["$schema"] == schema["$id"]
    broken = {**server, "name": "no-namespace", "packages": [{**server["packages"][0], "version": "latest"}]}
    assert len(list(validator.iter_errors(broken))) == 2  # the schema does catch what it should

    version = flux_mcp.__version__
    assert server["version"] == version and {p["version"] for p in server["packages"]} == {version}
    assert {p["identifier"] for p in server["packages"]} == {PYPROJECT["project"]["name"]}
    assert {p["transport"]["type"] for p in server["packages"]} == {"stdio", "streamable-http"}
    assert server["repository"]["url"] == PYPROJECT["project"]["urls"]["Repository"]
    docs = {s.env: s.doc for s in SETTINGS}
    for package in server["packages"]:
        for var in package["environmentVariables"]:
            assert var["description"] == docs[var["name"]], (
                f"{var['name']}: copy its text from flux_mcp/config.py"
            )
            assert var.get("isSecret", False) == (var["name"] in ("FAL_KEY", "FLUX_MCP_HTTP_TOKEN"))
    # The registry checks ownership of the PyPI package by this line in its description (the README).
    assert f"mcp-name: {server['name']}" in (REPO / "README.md").read_text()

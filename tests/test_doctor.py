"""``flux-mcp doctor``: each first-run failure gets a line that says what to change.

The checks run on real settings, real folders and (for the key) the loopback fal emulator, which
answers the key check exactly as fal would; a closed loopback port stands in for being offline.
The server's own uses of the report are tested through a real MCP client: the summary on stderr at
start, and the problems in list_presets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flux_mcp.backends import create_backend
from flux_mcp.config import Settings
from flux_mcp.doctor import Report, diagnose
from flux_mcp.errors import BackendUnavailable

from .conftest import clean_env, free_port, run_cli, server_env, stdio_client

pytestmark = pytest.mark.anyio


def _settings(tmp_path: Path, **env: str) -> Settings:
    base = {"FLUX_MCP_OUTPUT_DIR": str(tmp_path / "out"), "FLUX_MCP_INPUT_ROOTS": str(tmp_path)}
    return Settings.from_env({**base, **env})


def _check(report: Report, name: str) -> tuple[str, str]:
    """(status, line) of the one check called ``name``."""
    (found,) = [c for c in report.checks if c.name == name]
    return found.status, found.line()


def test_no_key_for_the_hosted_backend_fails_and_says_where_to_get_one(tmp_path: Path) -> None:
    report = diagnose(_settings(tmp_path, FLUX_MCP_BACKEND="fal"))
    status, line = _check(report, "FAL_KEY")
    assert status == "fail" and "set FAL_KEY" in line and "fal.ai/dashboard/keys" in line
    assert report.failed


def test_auto_without_key_or_gpu_explains_both_ways_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, also on a machine that has one
    status, line = _check(diagnose(_settings(tmp_path)), "backend")
    assert status == "fail" and "no CUDA GPU" in line
    assert "set FAL_KEY" in line and "FLUX_MCP_BACKEND=local" in line


@pytest.mark.parametrize(
    "env", [{}, {"FAL_KEY": "id:secret"}, {"FLUX_MCP_BACKEND": "fal", "FAL_KEY": "id:secret"}]
)
def test_the_backend_line_agrees_with_the_backend_the_server_creates(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    settings = _settings(tmp_path, **env)
    status, _ = _check(diagnose(settings), "backend")
    try:
        created = create_backend(settings).name
    except BackendUnavailable:
        created = None
    assert (status == "ok") == (created is not None)


def test_unwritable_output_folder_fails_and_names_the_variable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root may write anywhere, but never below a file
    report = diagnose(_settings(tmp_path, FLUX_MCP_OUTPUT_DIR=str(blocker / "images")))
    status, line = _check(report, "output folder")
    assert status == "fail" and "cannot be written" in line and "set FLUX_MCP_OUTPUT_DIR" in line


def test_missing_input_root_fails_and_says_how_to_fix_it(tmp_path: Path) -> None:
    missing = tmp_path / "Pictures"
    report = diagnose(_settings(tmp_path, FLUX_MCP_INPUT_ROOTS=f"{tmp_path}:{missing}"))
    roots = [c for c in report.checks if c.name == "input folder"]
    assert [c.status for c in roots] == ["ok", "fail"]
    assert f"{missing} does not exist" in roots[1].line() and "FLUX_MCP_INPUT_ROOTS" in roots[1].line()


def test_no_cuda_for_the_local_backend_fails_with_the_torch_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    report = diagnose(_settings(tmp_path, FLUX_MCP_BACKEND="local"), deep=True)
    status, line = _check(report, "CUDA")
    assert status == "fail" and "torch sees no CUDA GPU" in line and "set FAL_KEY" in line
    assert _check(report, "local extra")[0] == "ok"  # torch and diffusers import here
    assert _check(report, "FAL_KEY")[0] == "skip"


def test_local_model_folder_and_lora_cache_are_described(tmp_path: Path) -> None:
    model = tmp_path / "klein"
    model.mkdir()
    cache = tmp_path / "loras"
    settings = _settings(
        tmp_path, FLUX_MCP_BACKEND="local", FLUX_MCP_MODEL=str(model), FLUX_MCP_LORA_CACHE=str(cache)
    )
    report = diagnose(settings)
    assert _check(report, "model") == (
        "fail",
        f"[fail] model: {model} has no model_index.json -> point FLUX_MCP_MODEL at a pipeline folder",
    )
    assert _check(report, "LoRA cache") == ("ok", f"[ok] LoRA cache: {cache}: 0 LoRA file(s), 0 MiB")
    (model / "model_index.json").write_text("{}")
    (cache / "a.safetensors").write_bytes(b"x" * 2048)
    report = diagnose(settings)
    assert _check(report, "model")[0] == "ok"
    assert _check(report, "LoRA cache") == ("ok", f"[ok] LoRA cache: {cache}: 1 LoRA file(s), 0 MiB")
    missing_repo = diagnose(_settings(tmp_path, FLUX_MCP_BACKEND="local", FLUX_MCP_MODEL="org/not-cached"))
    status, line = _check(missing_repo, "model")
    assert status == "warn" and "not downloaded yet" in line


def test_cli_asks_fal_about_the_key_and_never_prints_it(emulator, tmp_path: Path) -> None:
    """Accepted, rejected and unreachable, as fal (the emulator) answers; the key appears nowhere."""
    env = clean_env(
        **emulator.env(), FLUX_MCP_OUTPUT_DIR=str(tmp_path / "out"), FLUX_MCP_INPUT_ROOTS=str(tmp_path)
    )
    good = run_cli("doctor", env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "[ok] FAL_KEY: set, and fal accepted it" in good.stdout
    assert "[ok] backend: auto picks fal" in good.stdout and "local extra" not in good.stdout

    wrong_key = "wrong-id:wrong-secret-123"
    bad = run_cli("doctor", "--json", env={**env, "FAL_KEY": wrong_key})
    assert bad.returncode == 1
    checks = {c["name"]: c for c in json.loads(bad.stdout)["checks"]}
    assert checks["FAL_KEY"]["status"] == "fail" and "rejected it (HTTP 401)" in checks["FAL_KEY"]["detail"]

    offline = run_cli("doctor", env={**env, "FLUX_MCP_FAL_REST_URL": f"https://127.0.0.1:{free_port()}"})
    assert offline.returncode == 0  # a warning: nothing is known to be wrong
    assert "[warn] FAL_KEY: set; could not check it with fal" in offline.stdout

    not_asked = run_cli("doctor", "--offline", env=env)
    assert "not checked with fal" in not_asked.stdout
    for done in (good, bad, offline, not_asked):
        assert emulator.key not in done.stdout + done.stderr and wrong_key not in done.stdout + done.stderr
    assert sum(1 for entry in emulator.log if "/storage/auth/token" in entry[1]) == 2


async def test_server_logs_the_summary_at_start_and_list_presets_carries_problems(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    env = server_env(tmp_path, FLUX_MCP_BACKEND="fal")  # no key, and tmp_path/inputs does not exist
    async with stdio_client(env, stderr=log) as client:
        result = await client.call_tool("list_presets", {})
    problems = result.structured_content["setup_problems"]
    assert any(p.startswith("[fail] FAL_KEY: not set") for p in problems)
    assert any(f"{tmp_path / 'inputs'} does not exist" in p for p in problems)
    text = result.content[0].text
    assert "Set-up problem: [fail] FAL_KEY: not set -> set FAL_KEY" in text
    stderr = log.read_text()
    assert "flux-mcp doctor: problems found" in stderr and "[fail] FAL_KEY: not set" in stderr

    (tmp_path / "inputs").mkdir()
    async with stdio_client({**env, "FAL_KEY": "some-id:some-secret"}) as client:
        result = await client.call_tool("list_presets", {})
    assert result.structured_content["setup_problems"] == []
    assert "Set-up problem" not in result.content[0].text

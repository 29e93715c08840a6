"""The agent frameworks' own code against the real server (tests/hosts, in .venv-hosts).

LangChain (langchain-mcp-adapters, langchain-openai, langchain-anthropic), the OpenAI Agents SDK and
pydantic-ai pin ``mcp`` 1.x, so ``make test`` builds them their own virtual environment from
``tests/hosts/requirements.txt``; this test starts the loopback fal emulator and runs those tests there
as a subprocess, with the server started from this environment over stdio.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .conftest import REPO, server_env

HOSTS_PYTHON = REPO / os.environ.get("FLUX_HOSTS_VENV", ".venv-hosts") / "bin" / "python"


def _run(env: dict[str, str], selection: str) -> subprocess.CompletedProcess[str]:
    """tests/hosts in .venv-hosts, without this suite's conftest (it imports mcp 2.x)."""
    command = [str(HOSTS_PYTHON), "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--noconftest"]
    return subprocess.run(
        [*command, "--rootdir", ".", "test_frameworks.py", "-k", selection],
        env=env,
        cwd=REPO / "tests" / "hosts",
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_agent_frameworks_with_their_own_code(tmp_path: Path, emulator: Any, input_png: Path) -> None:
    assert HOSTS_PYTHON.exists(), "run `make hosts` (part of `make test`) to build .venv-hosts"
    env = server_env(tmp_path, **emulator.env(), FLUX_HOSTS_SERVER_PYTHON=sys.executable)
    env["FLUX_HOSTS_IMAGE"] = str(input_png)
    done = _run(env, "langchain or agents_sdk")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout
    steps = [s.payload["num_inference_steps"] for s in emulator.submissions]
    assert steps == [8, 50], steps  # langchain's call; the strict call got the preset's 50

    emulator.latency_s = 5  # past the 1 s budget: the call answers with a job
    pending = _run({**env, "FLUX_MCP_CALL_BUDGET_S": "1"}, "pydantic_ai")
    assert pending.returncode == 0, pending.stdout[-4000:] + pending.stderr[-2000:]
    assert "1 passed" in pending.stdout
    print(done.stdout, pending.stdout)

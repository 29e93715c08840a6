"""The result store: atomic pairs of image + sidecar, lookups that cannot escape, crash leftovers swept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flux_mcp.errors import ConfigError, NotFound
from flux_mcp.store import ID_PATTERN, ResultStore

from .conftest import make_png


def test_save_writes_image_then_sidecar_and_lookup_finds_both(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "out")
    store.ensure()
    image_id = store.new_id()
    assert ID_PATTERN.match(image_id)
    stored = store.save(image_id, make_png(), "image/png", {"seed": 7, "request": {"prompt": "p"}})
    assert stored.path == tmp_path / "out" / f"{image_id}.png"
    assert stored.path.read_bytes() == make_png()
    assert oct(stored.path.stat().st_mode & 0o777) == "0o644"
    sidecar = json.loads((tmp_path / "out" / f"{image_id}.json").read_text())
    assert sidecar["seed"] == 7 and sidecar["file"] == f"{image_id}.png"
    data, found = store.read(image_id)
    assert data == make_png() and found.uri == f"flux://images/{image_id}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{image_id}.json", f"{image_id}.png"]


@pytest.mark.parametrize(
    "bad", ["../etc/passwd", "..", "/etc/passwd", "20261125-181500-1a2b3c4d/../x", "x" * 300, ""]
)
def test_ids_that_are_not_ours_never_touch_the_filesystem(tmp_path: Path, bad: str) -> None:
    store = ResultStore(tmp_path)
    with pytest.raises(NotFound):
        store.lookup(bad)


def test_a_sidecar_pointing_outside_the_store_is_refused(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "out")
    store.ensure()
    (tmp_path / "secret.png").write_bytes(make_png())
    image_id = store.new_id()
    (tmp_path / "out" / f"{image_id}.json").write_text(json.dumps({"file": "../secret.png"}))
    with pytest.raises(NotFound):
        store.lookup(image_id)


def test_unwritable_output_dir_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="FLUX_MCP_OUTPUT_DIR"):
        ResultStore(blocker / "sub").ensure()


def test_sweep_removes_leftovers_of_dead_writers_only(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.ensure()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    (tmp_path / f".tmp-{dead_pid}-abc-x.png").write_bytes(b"partial")
    live = tmp_path / f".tmp-{os.getpid()}-def-y.png"
    live.write_bytes(b"in progress")
    orphan_id = store.new_id()
    orphan = tmp_path / f"{orphan_id}.png"
    orphan.write_bytes(make_png())
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    fresh = tmp_path / f"{store.new_id()}.png"
    fresh.write_bytes(make_png())
    kept = store.save(store.new_id(), make_png(), "image/png", {})
    assert store.sweep() == 2
    names = {p.name for p in tmp_path.iterdir()}
    assert live.name in names and fresh.name in names and kept.path.name in names
    assert orphan.name not in names and not any(n.startswith(f".tmp-{dead_pid}") for n in names)

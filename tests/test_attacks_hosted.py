"""Attacks on the inputs, through the real server (stdio subprocess, real MCP client) on the fal emulator.

Each test plays an attacker from issue 12: an agent prompt-injected into sending hostile inputs, or a
local user who can write into an allowed folder. Nothing here leaves loopback.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from .conftest import data_uri, make_png, server_env, stdio_client, text_of

pytestmark = pytest.mark.anyio

EDIT = {"prompt": "make it a watercolour", "seed": 3, "num_inference_steps": 4}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"


def _env(tmp_path: Path, emulator: Any, **extra: str) -> dict[str, str]:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    return server_env(tmp_path, **emulator.env(), **extra)


def _fake_ghostscript(tmp_path: Path) -> tuple[str, Path]:
    """A `gs` first on PATH that records every call; returns (PATH value, record file)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "gs-called"
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {record}\nexit 1\n')
    gs.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", record


async def test_eps_inputs_never_reach_ghostscript(tmp_path: Path, emulator: Any) -> None:
    path, record = _fake_ghostscript(tmp_path)
    eps_file = tmp_path / "inputs" / "drawing.eps"
    (tmp_path / "inputs").mkdir()
    eps_file.write_bytes(EPS)
    hostile = [data_uri(EPS, "application/postscript"), data_uri(EPS, "image/png"), str(eps_file)]
    async with stdio_client(_env(tmp_path, emulator, PATH=path)) as client:
        for item in hostile:
            result = await client.call_tool("edit_image", {**EDIT, "image_urls": [item]})
            assert result.is_error, text_of(result)
            assert "image_urls.0" in text_of(result) and "PNG, JPEG, WEBP" in text_of(result)
        still_serving = await client.call_tool("edit_image", {**EDIT, "image_urls": [data_uri(make_png())]})
    assert not still_serving.is_error
    assert not record.exists(), f"Ghostscript ran: {record.read_text()}"
    assert len(emulator.submissions) == 1


#: Swaps two names forever with Linux's renameat2(RENAME_EXCHANGE), so neither ever goes missing.
_FLIPPER = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = sys.argv[1].encode(), sys.argv[2].encode()
while True:
    libc.renameat2(-100, a, -100, b, 2)
"""


@pytest.fixture
def flipping_folder(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    """``inputs/sub`` swapped, as fast as a process can, between a real folder holding an allowed image
    and a symlink to a folder outside the allowed ones (the local user's race between the server's
    check and its read). Yields (the path a caller gives, the outside image's bytes)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir(exist_ok=True)
    sub = inputs / "sub"
    sub.mkdir()
    (sub / "img.png").write_bytes(make_png(64, 64, (10, 200, 10)))
    private = tmp_path / "private"
    private.mkdir()
    (private / "img.png").write_bytes(make_png(64, 64, (250, 0, 250)))
    link = inputs / ".link"
    link.symlink_to(private, target_is_directory=True)
    flipper = subprocess.Popen([sys.executable, "-c", _FLIPPER, str(sub), str(link)])
    try:
        yield sub / "img.png", (private / "img.png").read_bytes()
    finally:
        flipper.kill()
        flipper.wait(10)


async def test_swapping_a_folder_for_a_symlink_never_reads_outside_the_folders(
    tmp_path: Path, emulator: Any, flipping_folder: tuple[Path, bytes]
) -> None:
    path, secret = flipping_folder
    async with stdio_client(_env(tmp_path, emulator)) as client:
        outcomes = [
            await client.call_tool("edit_image", {**EDIT, "image_urls": [str(path)]}) for _ in range(40)
        ]
    uploaded = [data for _, data in emulator.uploads]
    assert secret not in uploaded, "an image outside the allowed folders was read and uploaded"
    refused = [text_of(r) for r in outcomes if r.is_error]
    assert all("private" not in t for t in refused), "a message echoed where the symlink points"


async def test_fifos_devices_and_symlinks_out_are_refused_at_once(tmp_path: Path, emulator: Any) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    os.mkfifo(inputs / "pipe.png")
    (inputs / "zero.png").symlink_to("/dev/zero")
    (inputs / "passwd.png").symlink_to("/etc/passwd")
    (inputs / "folder.png").mkdir()
    outside_existing = tmp_path / "elsewhere.png"
    outside_existing.write_bytes(make_png())
    cases = {
        str(inputs / "pipe.png"): "not a regular file",
        str(inputs / "folder.png"): "not a regular file",
        str(inputs / "zero.png"): "not a regular file",  # a link to /dev/zero, inside the /dev root
        str(inputs / "passwd.png"): "outside the folders",
        str(outside_existing): "outside the folders",
        str(tmp_path / "missing-outside.png"): "outside the folders",
    }
    # /dev itself allowed, so that /dev/zero is inside a root and only the regular-file check stops it.
    env = _env(tmp_path, emulator, FLUX_MCP_INPUT_ROOTS=f"{inputs}{os.pathsep}/dev")
    async with stdio_client(env) as client:
        texts = {}
        for item, expected in {**cases, "/dev/zero": "not a regular file"}.items():
            result = await client.call_tool("edit_image", {**EDIT, "image_urls": [item]})
            assert result.is_error and expected in text_of(result), (item, text_of(result))
            texts[item] = text_of(result)
    assert (
        "/dev/zero" not in texts[str(inputs / "zero.png")] and "/etc" not in texts[str(inputs / "passwd.png")]
    )
    # An existing and a missing file outside the folders get the same answer: nothing about what exists.
    same = [
        texts[k].replace(k, "PATH") for k in (str(outside_existing), str(tmp_path / "missing-outside.png"))
    ]
    assert same[0] == same[1]
    assert emulator.submissions == []


async def test_the_temp_dir_is_not_an_input_folder_by_default(tmp_path: Path, emulator: Any) -> None:
    import tempfile

    planted = Path(tempfile.mkdtemp()) / "planted.png"
    planted.write_bytes(make_png())
    env = _env(tmp_path, emulator)
    del env["FLUX_MCP_INPUT_ROOTS"]  # the default: the home dir (and the output dir)
    async with stdio_client(env) as client:
        result = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(planted)]})
    assert result.is_error and "outside the folders" in text_of(result)


async def test_a_symlink_planted_in_the_output_folder_is_not_followed(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    secret = tmp_path / "private.png"
    secret.write_bytes(make_png(64, 64, (1, 2, 3)))
    async with stdio_client(_env(tmp_path, emulator)) as client:
        first = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)]})
        image = first.structured_content["images"][0]
        stored = Path(image["path"])
        stored.unlink()
        stored.symlink_to(secret)  # a local user swaps the stored result for a link to a private file
        chained = await client.call_tool("edit_image", {**EDIT, "image_urls": [image["uri"]]})
        with pytest.raises(Exception, match=r"missing|symlink"):
            await client.read_resource(image["uri"])
    assert chained.is_error and "image_urls.0" in text_of(chained)
    assert secret.read_bytes() not in [data for _, data in emulator.uploads]


async def test_url_queries_and_data_uri_headers_are_never_stored_or_returned(
    tmp_path: Path, emulator: Any
) -> None:
    token = "sig-ABCDEF0123456789"
    long_header = "data:image/png;" + ";".join(f"p{i}=v{i}" for i in range(60)) + ";base64,"
    payload = data_uri(make_png()).partition(",")[2]
    args = {
        **EDIT,
        "image_urls": [f"https://images.example/photo.png?X-Amz-Signature={token}", long_header + payload],
        "loras": [{"path": f"https://loras.example/style.safetensors?token={token}", "scale": 1.0}],
    }
    async with stdio_client(_env(tmp_path, emulator, FLUX_MCP_CALL_BUDGET_S="30")) as client:
        result = await client.call_tool("edit_image", args)
    assert not result.is_error, text_of(result)
    sent = emulator.submissions[0].payload
    assert token in sent["image_urls"][0] and token in sent["loras"][0]["path"]  # fal gets what it needs
    files = [p for p in (tmp_path / "out").rglob("*.json")]
    texts = [json.dumps(result.model_dump(mode="json")), *(p.read_text() for p in files)]
    assert any(p.parent.name == "jobs" for p in files)
    for text in texts:
        assert token not in text and "p59=v59" not in text and payload[:40] not in text
    params = result.structured_content["params"]
    assert params["image_urls"][0] == "https://images.example/photo.png"
    assert params["loras"][0]["path"] == "https://loras.example/style.safetensors"
    assert params["image_urls"][1].startswith("data:image/png;base64,<")


def _jpeg_with_gps_and_rotation() -> bytes:
    image = Image.new("RGB", (80, 40), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    exif[0x013B] = "Jane Owner"  # Artist
    exif[0xA431] = "SERIAL-12345"  # BodySerialNumber
    exif.get_ifd(0x8825)[2] = (52.0, 31.0, 12.0)  # GPSLatitude
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes(), quality=95)
    return out.getvalue()


async def test_metadata_is_stripped_before_any_upload(tmp_path: Path, emulator: Any) -> None:
    photo = tmp_path / "inputs" / "photo.jpg"
    (tmp_path / "inputs").mkdir()
    photo.write_bytes(_jpeg_with_gps_and_rotation())
    for mode in ("cdn", "data-uri"):
        async with stdio_client(_env(tmp_path, emulator, FLUX_MCP_FAL_UPLOAD=mode)) as client:
            result = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(photo)]})
        assert not result.is_error, text_of(result)
    sent = [emulator.uploads[0][1], _inline(emulator.submissions[1].payload["image_urls"][0])]
    for data in sent:
        assert b"Jane Owner" not in data and b"SERIAL-12345" not in data
        with Image.open(io.BytesIO(data)) as uploaded:
            assert not uploaded.getexif() and uploaded.size == (40, 80)  # upright, as a viewer shows it


def _inline(url: str) -> bytes:
    import base64

    assert url.startswith("data:image/jpeg;base64,")
    return base64.b64decode(url.partition(",")[2])


async def test_files_follow_the_umask_and_job_files_are_private(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    previous = os.umask(0o077)  # inherited by the server subprocess
    try:
        async with stdio_client(_env(tmp_path, emulator)) as client:
            result = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)]})
    finally:
        os.umask(previous)
    assert not result.is_error
    image = Path(result.structured_content["images"][0]["path"])
    for path in (image, image.with_suffix(".json")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    previous = os.umask(0o022)
    try:
        async with stdio_client(_env(tmp_path, emulator)) as client:
            result = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)]})
    finally:
        os.umask(previous)
    image = Path(result.structured_content["images"][0]["path"])
    assert stat.S_IMODE(image.stat().st_mode) == 0o644
    jobs = list((tmp_path / "out" / "jobs").glob("job-*.json"))
    assert jobs and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in jobs)


async def test_hosted_mode_refuses_local_lora_paths(tmp_path: Path, emulator: Any, input_png: Path) -> None:
    lora = tmp_path / "inputs" / "mine.safetensors"
    lora.write_bytes(b"\x00" * 16)
    async with stdio_client(_env(tmp_path, emulator)) as client:
        for path in (str(lora), f"file://{lora}", "~/loras/x.safetensors", "./x.safetensors"):
            result = await client.call_tool(
                "edit_image", {**EDIT, "image_urls": [str(input_png)], "loras": [{"path": path}]}
            )
            assert result.is_error and "loras.0.path" in text_of(result), text_of(result)
            assert "hosted endpoint cannot read" in text_of(result)
    assert emulator.submissions == []


async def test_a_key_with_a_newline_never_reaches_the_log(
    tmp_path: Path, emulator: Any, input_png: Path
) -> None:
    key_id, secret = "key-id-0042", "line-one-SECRET\nline-two-SECRET"
    log = tmp_path / "server.log"
    env = _env(tmp_path, emulator)
    env["FAL_KEY"] = f"{key_id}:{secret}"
    async with stdio_client(env, "--verbose", stderr=log) as client:
        result = await client.call_tool("edit_image", {**EDIT, "image_urls": [str(input_png)]})
    assert result.is_error  # httpx refuses a header with a newline: the error is logged with its repr
    text = log.read_text() + json.dumps(result.model_dump(mode="json"))
    for piece in ("line-one-SECRET", "line-two-SECRET", "one-SECRE", "two-SECRE"):
        assert piece not in text, piece

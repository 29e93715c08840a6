"""The safetensors header check of LoRA files (``loras.safetensors_problem``), on real file bytes.

A safetensors file starts with its header length as a little-endian u64, so its first byte can be
anything, 0x80 (a pickle's first byte) included. Real pickles and zip archives written by Python
and torch must still be refused.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flux_mcp.backends.loras import safetensors_problem

_TENSOR = {"lora.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}


def safetensors_bytes(header_len: int) -> bytes:
    """A valid safetensors file whose JSON header is exactly ``header_len`` bytes (padded with spaces,
    as safetensors pads its own); it holds one tensor when that fits, else none."""
    header = json.dumps(_TENSOR, separators=(",", ":")).encode()
    data = b"\x00\x00\x80\x3f"  # 1.0 as float32
    if len(header) > header_len:
        header, data = b"{}", b""
    return struct.pack("<Q", header_len) + header.ljust(header_len, b" ") + data


def problem(data: bytes) -> str | None:
    return safetensors_problem(io.BytesIO(data), len(data))


def test_every_padded_header_length_is_accepted(tmp_path: Path) -> None:
    refused = {}
    lengths = range(8, 4097, 8)
    for header_len in lengths:
        data = safetensors_bytes(header_len)
        if (reason := problem(data)) is not None:
            refused[header_len] = reason
    assert refused == {}, (
        f"{len(refused)} of {len(lengths)} valid files refused, e.g. {list(refused.items())[:3]}"
    )
    # The files are real: safetensors' own reader opens them (checked on the first byte 0x80 cases).
    for header_len in (128, 384, 640, 896, 4096 - 128):
        path = tmp_path / f"h{header_len}.safetensors"
        path.write_bytes(safetensors_bytes(header_len))
        assert path.read_bytes()[0] == 0x80
        with safe_open(str(path), framework="pt") as handle:
            assert len(list(handle.keys())) == 1


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_pickles_are_refused(protocol: int) -> None:
    data = pickle.dumps({"lora_A.weight": [0.0] * 4, "lora_B.weight": b"\x00" * 64}, protocol=protocol)
    reason = problem(data)
    assert reason is not None and "pickle" in reason, (protocol, reason)


def test_torch_zip_and_legacy_files_are_refused() -> None:
    weights = {"lora_A.weight": torch.zeros(4, 4)}
    for zipped in (True, False):
        out = io.BytesIO()
        torch.save(weights, out, _use_new_zipfile_serialization=zipped)
        reason = problem(out.getvalue())
        assert reason is not None and ("zip" if zipped else "pickle") in reason, (zipped, reason)


def test_broken_files_are_refused_with_their_reason() -> None:
    assert problem(b"\x10\x00") == "it is too short"
    assert problem(struct.pack("<Q", 1000) + b"{}") == "its header length is invalid"
    assert problem(struct.pack("<Q", 9) + b"{not json") == "its header is not JSON"
    assert problem(struct.pack("<Q", 2) + b"[]") == "its header is not a JSON object"
    outside = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}).encode()
    assert "invalid" in (problem(struct.pack("<Q", len(outside)) + outside + b"\x00" * 4) or "")

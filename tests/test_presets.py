"""Presets and the LoRA library as plain functions (the MCP-level behaviour is in test_e2e_hosted)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flux_mcp.errors import InvalidRequest
from flux_mcp.presets import BUILTIN_PRESETS, PresetLibrary, apply_preset
from flux_mcp.schema import EditRequest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "presets.toml"


def test_every_builtin_preset_is_a_valid_partial_request() -> None:
    for preset in BUILTIN_PRESETS:
        EditRequest.model_validate({"prompt": "p", "image_urls": ["u"], **preset.params})
        assert len(preset.description) > 30, preset.name


def test_balanced_is_exactly_the_endpoint_defaults() -> None:
    (balanced,) = [p for p in BUILTIN_PRESETS if p.name == "balanced"]
    defaults = EditRequest(prompt="p", image_urls=["u"])
    assert all(getattr(defaults, k) == v for k, v in balanced.params.items())


def test_the_example_file_loads_with_every_feature(tmp_path: Path) -> None:
    path = tmp_path / "presets.toml"
    shutil.copy(EXAMPLE, path)
    presets, loras, error = PresetLibrary(path).snapshot()
    assert error is None
    assert {"paint_final", "relight_wide", "paint_and_relight", "cns_texture"} <= set(presets)
    assert presets["paint_final"].source == str(path)
    assert loras["relight"].scale == 0.8 and loras["sketch2paint"].trigger_word == "S2P"


def test_explicit_arguments_win_even_when_equal_to_the_default(tmp_path: Path) -> None:
    library = PresetLibrary(None)
    args, preset, _ = apply_preset({"preset": "quality", "num_inference_steps": 28, "prompt": "p"}, library)
    assert preset is not None and preset.name == "quality"
    assert args["num_inference_steps"] == 28 and args["acceleration"] == "none"


def test_library_names_resolve_with_library_scale_unless_given(tmp_path: Path) -> None:
    path = tmp_path / "presets.toml"
    shutil.copy(EXAMPLE, path)
    library = PresetLibrary(path)
    args, _, used = apply_preset(
        {"loras": [{"path": "relight"}, {"path": "sketch2paint", "scale": 0.3}]}, library
    )
    assert args["loras"][0] == {"scale": 0.8, "path": "your-name/klein-relight-lora"}
    assert args["loras"][1]["scale"] == 0.3 and args["loras"][1]["path"].endswith("sketch2paint.safetensors")
    assert [u["trigger_word"] for u in used] == ["RELIT", "S2P"]


def test_unknown_preset_names_the_field_and_lists_choices() -> None:
    with pytest.raises(InvalidRequest, match=r"preset: unknown preset 'nope'.*draft") as info:
        apply_preset({"preset": "nope"}, PresetLibrary(None))
    assert info.value.field == "preset"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[presets.a]\nnum_inference_steps = "many"\n', "num_inference_steps"),
        ("[presets.a]\nguidance_scale = 99\n", "guidance_scale"),
        ("[presets.a]\nprompt = 'x'\n", "cannot be set by a preset"),
        ("[presets.a\nx = 1\n", "line 1"),
        ("[loras.x]\nscale = 1\n", "needs path"),
        ("[other]\n", "unknown top-level"),
    ],
)
def test_a_broken_file_is_reported_and_builtins_keep_working(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "presets.toml"
    path.write_text(text)
    presets, loras, error = PresetLibrary(path).snapshot()
    assert error is not None and expected in str(error) and str(path) in str(error)
    assert {p.name for p in BUILTIN_PRESETS} <= set(presets) and loras == {}


def test_the_file_is_re_read_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "presets.toml"
    library = PresetLibrary(path)
    assert "mine" not in library.snapshot()[0]
    path.write_text('[presets.mine]\ndescription = "v1"\nnum_inference_steps = 10\n')
    assert library.snapshot()[0]["mine"].params == {"num_inference_steps": 10}
    path.write_text('[presets.mine]\ndescription = "version two"\nnum_inference_steps = 20\n')
    assert library.snapshot()[0]["mine"].params == {"num_inference_steps": 20}
    path.unlink()
    assert "mine" not in library.snapshot()[0]

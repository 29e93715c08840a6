"""The README's generated tables match the code, and the CLI works as a person would use it."""

from __future__ import annotations

import json
from pathlib import Path

from flux_mcp.docs import update_readme

from .conftest import REPO, clean_env, data_uri, make_png, run_cli


def test_readme_tables_are_generated_from_the_code() -> None:
    assert update_readme(REPO / "README.md", check=True), "run: python -m flux_mcp.docs --write"


def test_readme_check_notices_drift(tmp_path: Path) -> None:
    copy = tmp_path / "README.md"
    copy.write_text(
        (REPO / "README.md").read_text().replace("| `FLUX_MCP_BACKEND` |", "| `FLUX_MCP_BACKENDS` |")
    )
    assert not update_readme(copy, check=True)
    update_readme(copy)
    assert update_readme(copy, check=True)


def test_readme_and_ci_use_the_same_test_command() -> None:
    assert "make test" in (REPO / "README.md").read_text()
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_edit_without_any_backend_says_how_to_configure(tmp_path: Path) -> None:
    env = clean_env(FLUX_MCP_BACKEND="fal", FLUX_MCP_OUTPUT_DIR=str(tmp_path / "out"))
    done = run_cli("edit", data_uri(make_png()), "--prompt", "x", env=env)
    assert done.returncode == 1 and "FAL_KEY" in done.stderr and "Traceback" not in done.stderr
    bad = run_cli("edit", "x.png", "--prompt", "x", "--guidance-scale", "25", env=env)
    assert bad.returncode == 1 and "guidance_scale" in bad.stderr


def test_bad_setting_names_the_variable(tmp_path: Path) -> None:
    env = clean_env(FLUX_MCP_FAL_CONCURRENCY="lots")
    done = run_cli("presets", env=env)
    assert done.returncode == 1 and "FLUX_MCP_FAL_CONCURRENCY" in done.stderr


def test_edit_through_the_cli_against_the_emulator(tmp_path: Path, emulator, input_png: Path) -> None:  # type: ignore[no-untyped-def]
    env = clean_env(
        **emulator.env(), FLUX_MCP_OUTPUT_DIR=str(tmp_path / "out"), FLUX_MCP_INPUT_ROOTS=str(tmp_path)
    )
    done = run_cli(
        "edit",
        str(input_png),
        "-p",
        "paint it",
        "--seed",
        "9",
        "--lora",
        "https://x.example/l.safetensors:0.5",
        "--image-size",
        "300x200",
        "--no-enable-safety-checker",
        "--quiet",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    (path,) = done.stdout.split()
    assert Path(path).is_file()
    sent = emulator.submissions[0].payload
    assert sent["loras"] == [{"path": "https://x.example/l.safetensors", "scale": 0.5}]
    assert sent["image_size"] == {"width": 300, "height": 200} and sent["enable_safety_checker"] is False
    compare = run_cli("compare", str(input_png), "-p", "p", "--seeds", "1,2", "--json", "--quiet", env=env)
    assert compare.returncode == 0, compare.stderr
    assert [r["seed"] for r in json.loads(compare.stdout)["runs"]] == [1, 2]


def test_cli_help_shows_defaults_ranges_and_its_own_commands_for_every_option() -> None:
    import argparse

    from flux_mcp.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"flux-mcp {name} {'/'.join(action.option_strings) or action.dest}: no help"
    edit = run_cli("edit", "--help")
    text = " ".join(edit.stdout.split())
    assert "(default 5.0; 0–20)" in text  # guidance_scale, from the request model
    assert "(default 28; 4–50)" in text and "(default 1; 1–4)" in text
    assert "`flux-mcp presets`" in text and "list_presets" not in text

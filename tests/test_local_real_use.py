"""The local backend under conditions of real use that the miniature used to hide (issue 11).

Each test reproduces one defect on the tiny random klein pipeline, through the real backend: LoRA
files diffusers loads only in part, prompt embeddings that kept an autograd graph, seeds past the
maximum, many LoRA changes under a compiled transformer, and cancelling a run.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from flux_mcp.backends.local import LocalBackend
from flux_mcp.backends.tiny import changing_lora_sets, make_lora_state_dict, save_lora
from flux_mcp.schema import MAX_SEED

from .conftest import edit_once
from .test_local_backend import Recorder, edit, max_diff, png_input, request

pytestmark = [pytest.mark.local, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def backend(make_backend: Callable[..., LocalBackend]) -> LocalBackend:
    return make_backend()


@pytest.fixture(scope="module")
def tiny_transformer(tiny_model: Path) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(tiny_model / "transformer")


# -- 7. LoRA modules diffusers drops --------------------------------------------------------------


def _pair(module: str, down: str, up: str, rank: int = 4) -> dict[str, torch.Tensor]:
    return {f"{module}.{down}.weight": torch.ones(rank, 32), f"{module}.{up}.weight": torch.ones(32, rank)}


@pytest.mark.parametrize(
    ("fmt", "extra"),
    [
        (
            "diffusers",
            _pair("text_encoder.model.layers.0.mlp.up_proj", "lora_A", "lora_B")
            | _pair("transformer.transformer_blocks.99.attn.to_q", "lora_A", "lora_B"),
        ),
        (
            "kohya",
            _pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_down", "lora_up")
            | _pair("lora_unet_double_blocks_99_img_attn_proj", "lora_down", "lora_up"),
        ),
    ],
)
@pytest.mark.anyio
async def test_dropped_lora_modules_are_counted_and_named(
    fmt: str, extra: dict[str, torch.Tensor], backend: LocalBackend, tiny_transformer: Any, tmp_path: Path
) -> None:
    full = make_lora_state_dict(tiny_transformer, fmt)  # type: ignore[arg-type]
    whole = save_lora(tmp_path / "whole.safetensors", full)
    partial = save_lora(tmp_path / "partial.safetensors", full | extra)

    complete = await edit(backend, request(loras=[{"path": str(whole)}]))
    (used,) = complete.details["loras"]
    assert used["modules_dropped"] == [] and used["modules_applied"] == used["modules"] > 0
    assert not any("dropped" in note for note in complete.notes)

    result = await edit(backend, request(loras=[{"path": str(partial)}]))
    (used,) = result.details["loras"]
    dropped = sorted({key.rsplit(".", 2)[0] for key in extra})
    assert sorted(used["modules_dropped"]) == dropped
    assert used["modules"] == used["modules_applied"] + 2
    (note,) = [note for note in result.notes if "dropped" in note]
    assert f"{used['modules_applied']} of its {used['modules']} modules were applied" in note
    assert all(name in note for name in dropped)
    # What was applied is exactly the complete file's update.
    assert max_diff(complete.images[0].data, result.images[0].data) <= 1


# -- 3. prompt embeddings without an autograd graph -----------------------------------------------


def _tensors_with_grad_fn() -> list[str]:
    return [
        f"{tuple(obj.shape)} {type(obj.grad_fn).__name__}"
        for obj in gc.get_objects()
        if issubclass(type(obj), torch.Tensor) and obj.grad_fn is not None
    ]


@pytest.mark.anyio
async def test_no_tensor_keeps_an_autograd_graph_during_a_run(backend: LocalBackend) -> None:
    seen: dict[str, list[str]] = {}

    def look(message: str) -> None:
        if message.startswith("step "):  # the run is between two steps, its embeddings alive
            seen[message] = _tensors_with_grad_fn()

    await edit_once(
        backend, request(negative_prompt="blurry", guidance_scale=4.0), [png_input()], Recorder(look)
    )
    assert len(seen) == 4 and all(found == [] for found in seen.values()), seen
    assert _tensors_with_grad_fn() == []


# -- 4. seeds past the maximum wrap around -------------------------------------------------------


@pytest.mark.anyio
async def test_image_seeds_wrap_to_valid_reproducing_seeds(backend: LocalBackend) -> None:
    batch = await edit(backend, request(seed=MAX_SEED - 1, num_images=3))
    assert [image.seed for image in batch.images] == [MAX_SEED - 1, MAX_SEED, 0]
    for image in batch.images:
        single = await edit(backend, request(seed=image.seed))  # accepted: a valid input seed
        assert max_diff(image.data, single.images[0].data) <= 1


# -- 2. acceleration "regular" through many LoRA changes ------------------------------------------


@pytest.mark.anyio
async def test_regular_acceleration_survives_many_lora_configurations(
    make_backend: Callable[..., LocalBackend], tiny_transformer: Any, tmp_path: Path
) -> None:
    """dynamo's eager compile backend keeps its guards and recompile limit (8). Each new adapter set
    recompiles both block types (scale and batch-size changes do not, on torch 2.13), so 12 LoRA
    configurations used to end in FailOnRecompileLimitHit ("internal error") at the 9th request."""
    backend = make_backend(compile_backend="eager")
    files = [
        str(
            save_lora(
                tmp_path / f"{seed}.safetensors", make_lora_state_dict(tiny_transformer, "peft", seed=seed)
            )
        )
        for seed in range(4)
    ]
    configurations = changing_lora_sets(files, 12)
    results = []
    for index in range(20):
        loras = configurations[index % 12]
        fields = {"loras": loras, "num_images": 1 + index % 2, "num_inference_steps": 4}
        results.append(await edit(backend, request(acceleration="regular", **fields)))
        assert len(results[-1].images) == fields["num_images"]
    assert not any("CUDA only" in note for note in results[0].notes)  # it did compile
    eager_later = [i for i, r in enumerate(results) if any("ran this LoRA" in note for note in r.notes)]
    assert eager_later and min(eager_later) >= 3
    # Compiled or not, a configuration gives the image an eager run gives.
    for index in (0, 2, 19):
        loras = configurations[index % 12]
        plain = await edit(backend, request(acceleration="none", loras=loras, num_inference_steps=4))
        assert max_diff(results[index].images[0].data, plain.images[0].data) <= 1


@pytest.mark.anyio
async def test_a_compiler_error_is_a_job_failure_and_the_next_run_compiles_afresh(
    make_backend: Callable[..., LocalBackend],
    tiny_transformer: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With dynamo's recompile limit at 1 the second LoRA set hits it: FailOnRecompileLimitHit (not
    a RuntimeError) must reach the caller as JobFailed, never as an unexpected exception."""
    import torch._dynamo.config

    from flux_mcp.errors import JobFailed

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    backend = make_backend(compile_backend="eager")
    lora = save_lora(tmp_path / "one.safetensors", make_lora_state_dict(tiny_transformer, "peft", seed=1))
    await edit(backend, request(acceleration="regular"))
    with pytest.raises(JobFailed, match=r"torch\.compile failed") as failed:
        await edit(backend, request(acceleration="regular", loras=[{"path": str(lora)}]))
    assert "FailOnRecompileLimitHit" in str(failed.value)
    again = await edit(backend, request(acceleration="regular", loras=[{"path": str(lora)}]))
    assert len(again.images) == 1


# -- 8. cancelling a local job --------------------------------------------------------------------


@pytest.mark.anyio
async def test_cancel_job_answers_at_once_and_the_run_stops_at_the_next_step(
    make_backend: Callable[..., LocalBackend], tmp_path: Path
) -> None:
    from flux_mcp.jobs import JobManager
    from flux_mcp.server import _job_result
    from flux_mcp.service import FluxService

    from .conftest import data_uri, make_png, text_of

    backend = make_backend()
    service = FluxService(backend.settings, backend=backend)
    await service.start()
    arguments = {"prompt": "p", "image_urls": [data_uri(make_png(64, 64))], "num_inference_steps": 30}
    answers: dict[str, str] = {}
    steps: list[str] = []
    async with JobManager(service).running() as jobs:
        job = await jobs.submit(await service.prepare("edit_image", {**arguments, "acceleration": "none"}))

        async def listener(value: float, total: float | None, message: str) -> None:
            if not message.startswith("step "):
                return
            steps.append(message)
            if message == "step 2/30":
                # The worker thread waits for this listener, so a cancel that waited for the run would hang.
                await jobs.cancel(job)
                answers["state"] = job.state
                answers["get_result"] = text_of(await _job_result(jobs, job))

        with anyio.fail_after(120):
            assert await jobs.wait(job, 120, listener)
    assert answers["state"] == "cancelling"
    assert "being cancelled" in answers["get_result"] and "nothing will be saved" in answers["get_result"]
    assert job.state == "cancelled" and steps[-1] in ("step 2/30", "step 3/30")
    assert list((tmp_path / "out").glob("*.png")) == []


# -- 6. a recalibrated CNS matrix is picked up, and checked against the model ---------------------


@pytest.mark.anyio
async def test_a_recalibrated_gamma_matrix_is_used_without_restart_and_checked(
    backend: LocalBackend, tiny_model: Path
) -> None:
    from platformdirs import user_cache_dir

    from flux_mcp.backends import cns
    from flux_mcp.config import APP

    path = cns.gamma_cache_path(user_cache_dir(APP), str(tiny_model))
    matrix, sigmas = torch.linspace(0, 1, 8).unsqueeze(1).repeat(1, 16), torch.linspace(1, 0.1, 8)
    meta = {"model": str(tiny_model), "latent_channels": 16}

    before = await edit(backend, request(enable_cns=True))
    assert before.details["cns"]["gamma"] == "matrix (analytic stand-in)"
    cns.save_gamma_matrix(path, matrix, meta, sigmas)  # `flux-mcp calibrate-cns` while the server runs
    calibrated = await edit(backend, request(enable_cns=True))
    assert calibrated.details["cns"]["gamma"] == f"matrix (calibrated: {path.name})"
    assert max_diff(before.images[0].data, calibrated.images[0].data) > 0

    for wrong in ({"model": "someone/another-model"}, {"latent_channels": 128}):
        cns.save_gamma_matrix(path, matrix, meta | wrong, sigmas)
        refused = await edit(backend, request(enable_cns=True))
        assert refused.details["cns"]["gamma"] == "matrix (analytic stand-in)"
        problem = refused.details["cns"]["gamma_file_problem"]
        assert "calibrated" in problem and str(next(iter(wrong.values()))) in problem


@pytest.mark.anyio
async def test_cancel_job_over_mcp_answers_cancelling_and_saves_nothing(
    tmp_path: Path, tiny_model: Path
) -> None:
    """The same through a real MCP client and server process: the call outlives its 1 s budget,
    cancel_job answers 'cancelling', get_result says so until the job is 'cancelled'."""
    from .conftest import stdio_client, text_of
    from .test_e2e_local import _env, _inputs

    env = _env(tmp_path, tiny_model, FLUX_MCP_CALL_BUDGET_S="1")
    long = {"prompt": "p", "image_urls": _inputs(tmp_path, 1), "num_inference_steps": 50}
    async with stdio_client(env) as client:
        pending = await client.call_tool("edit_image", {**long, "image_size": {"width": 256, "height": 256}})
        job_id = pending.structured_content["job"]["id"]
        cancelled = await client.call_tool("cancel_job", {"job_id": job_id})
        answers = []
        with anyio.fail_after(120):
            while not (
                answer := await client.call_tool("get_result", {"job_id": job_id, "wait_s": 5})
            ).is_error:
                answers.append(answer)
    assert cancelled.structured_content["job"]["state"] == "cancelling"
    assert all("being cancelled" in text_of(answer) for answer in answers)
    assert "was cancelled; nothing was saved" in text_of(answer)
    assert list((tmp_path / "out").glob("*.png")) == []

"""The local backend on the tiny random klein pipeline, loaded from disk by the same code as the real model.

Every test runs real diffusers code on the CPU (64x64 or so, 2-4 steps): batching, CFG, LoRA key
conversion, the CNS scheduler, the GPU queue, cancellation, LoRA downloads from a loopback server.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import anyio
import numpy as np
import pytest
import torch
from PIL import Image
from platformdirs import user_cache_dir

from flux_mcp.backends import BackendResult, InputImage, RunContext, cns
from flux_mcp.backends.local import LocalBackend
from flux_mcp.backends.loras import AdapterCache, LoraFile
from flux_mcp.backends.tiny import (
    build_tiny_pipeline,
    make_example_image,
    make_lora_state_dict,
    save_lora,
)
from flux_mcp.config import APP
from flux_mcp.errors import BackendUnavailable, InputImageError, InvalidRequest
from flux_mcp.schema import EditRequest

from .conftest import edit_once

pytestmark = [pytest.mark.local, pytest.mark.usefixtures("one_torch_thread")]


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_transformer(tiny_model: Path) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(tiny_model / "transformer")


@pytest.fixture
def backend(make_backend: Callable[..., LocalBackend]) -> LocalBackend:
    return make_backend()


def png_input(width: int = 64, height: int = 64, source: str = "house.png") -> InputImage:
    out = io.BytesIO()
    make_example_image(width, height).save(out, format="PNG")
    return InputImage(
        source=source, data=out.getvalue(), content_type="image/png", width=width, height=height
    )


def request(**fields: Any) -> EditRequest:
    base: dict[str, Any] = {
        "prompt": "a red house on a hill",
        "image_urls": ["house.png"],
        "num_inference_steps": 4,
        "seed": 7,
        "guidance_scale": 4.0,
        "acceleration": "none",
        "enable_safety_checker": False,
    }
    return EditRequest(**(base | fields))


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


class Recorder:
    """A progress sink that keeps every message."""

    def __init__(self, on_message: Callable[[str], None] | None = None) -> None:
        self.events: list[tuple[float, float | None, str]] = []
        self._on_message = on_message

    async def __call__(self, progress: float, total: float | None, message: str) -> None:
        self.events.append((progress, total, message))
        if self._on_message is not None:
            self._on_message(message)

    @property
    def messages(self) -> list[str]:
        return [message for _, _, message in self.events]


async def edit(
    backend: LocalBackend, req: EditRequest, inputs: list[InputImage] | None = None
) -> BackendResult:
    return await edit_once(backend, req, inputs or [png_input()], Recorder())


# -- editing -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_edit_with_one_and_four_references(backend: LocalBackend) -> None:
    progress = Recorder()
    one = await edit_once(backend, request(), [png_input(64, 64)], progress)
    (image,) = one.images
    assert (image.width, image.height, image.seed, image.content_type) == (64, 64, 7, "image/png")
    assert pixels(image.data).shape == (64, 64, 3)
    assert one.seed == 7 and one.details["device"] == "cpu"
    steps = [m for m in progress.messages if m.startswith("step ")]
    assert steps == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    done = [p for p, _, _ in progress.events]
    assert done == sorted(done) and done[-1] == 4
    assert any(m.startswith("loading model") for m in progress.messages)

    inputs = [png_input(64, 64), png_input(96, 64), png_input(64, 80), png_input(128, 128)]
    four = await edit_once(backend, request(image_urls=["a", "b", "c", "d"]), inputs, Recorder())
    assert (four.images[0].width, four.images[0].height) == (64, 64)  # the first input's size
    assert max_diff(one.images[0].data, four.images[0].data) > 0  # the extra references reach the model


@pytest.mark.anyio
async def test_negative_prompt_changes_the_output_only_with_cfg(backend: LocalBackend) -> None:
    plain = await edit(backend, request())
    negative = await edit(backend, request(negative_prompt="blurry, dark"))
    assert max_diff(plain.images[0].data, negative.images[0].data) > 0

    no_cfg = await edit(backend, request(guidance_scale=1.0))
    no_cfg_negative = await edit(backend, request(guidance_scale=1.0, negative_prompt="blurry, dark"))
    assert max_diff(no_cfg.images[0].data, no_cfg_negative.images[0].data) == 0
    assert any("negative_prompt had no effect" in note for note in no_cfg_negative.notes)


@pytest.mark.anyio
async def test_custom_size_is_rounded_and_reported(backend: LocalBackend) -> None:
    result = await edit(backend, request(image_size={"width": 70, "height": 90}, output_format="jpeg"))
    (image,) = result.images
    assert (image.width, image.height, image.content_type) == (72, 88, "image/jpeg")
    assert pixels(image.data).shape == (88, 72, 3)
    assert any("70x90 was rounded to 72x88" in note for note in result.notes)

    exact = await edit(backend, request(image_size={"width": 64, "height": 96}, output_format="webp"))
    assert (exact.images[0].width, exact.images[0].height) == (64, 96)
    assert exact.images[0].content_type == "image/webp"
    assert not any("rounded" in note for note in exact.notes)


@pytest.mark.anyio
async def test_num_images_is_one_batch_equal_to_single_runs(backend: LocalBackend) -> None:
    batch = await edit(backend, request(num_images=3, seed=11))
    assert batch.seed == 11 and [image.seed for image in batch.images] == [11, 12, 13]
    for image in batch.images:
        single = await edit(backend, request(seed=image.seed))
        assert max_diff(image.data, single.images[0].data) <= 1
    assert max_diff(batch.images[0].data, batch.images[1].data) > 0


@pytest.mark.anyio
async def test_runs_that_differ_only_in_seed_share_one_pass(backend: LocalBackend) -> None:
    progress = Recorder()
    runs = [request(seed=40), request(seed=3)]
    outcomes = await backend.run(runs, [png_input()], RunContext(progress))
    assert [o.seed for o in outcomes if isinstance(o, BackendResult)] == [40, 3]
    assert not any("pass" in message for message in progress.messages)  # one pass, not two
    single = await edit(backend, request(seed=3))
    assert isinstance(outcomes[1], BackendResult)
    assert max_diff(outcomes[1].images[0].data, single.images[0].data) <= 1


@pytest.mark.anyio
async def test_a_lora_scale_sweep_loads_the_adapter_once_and_keeps_the_seed(
    backend: LocalBackend, tiny_transformer: Any, tmp_path: Path
) -> None:
    path = save_lora(tmp_path / "sweep.safetensors", make_lora_state_dict(tiny_transformer, "peft", seed=7))
    other = save_lora(tmp_path / "other.safetensors", make_lora_state_dict(tiny_transformer, "peft", seed=8))
    # Interleaved on purpose: the backend orders passes so that the same LoRA file stays loaded.
    scales = [(path, 0.0), (other, 1.0), (path, 0.5), (other, 0.5), (path, 1.0)]
    runs = [request(seed=11, loras=[{"path": str(p), "scale": s}]) for p, s in scales]
    progress = Recorder()
    outcomes = await backend.run(runs, [png_input()], RunContext(progress))
    results = [o for o in outcomes if isinstance(o, BackendResult)]
    assert len(results) == 5 and all(r.images[0].seed == 11 for r in results)
    # Each run is its own pass here (the scales differ), so the loads add up over the results.
    assert sum(r.details["lora_loads"] for r in results) == 2, "each file is loaded once, whatever the scales"
    passes = [m for m in progress.messages if m.startswith("pass ")]
    assert {m.split(":")[0] for m in passes} == {f"pass {i}/5" for i in range(1, 6)}
    done = [value for value, _, _ in progress.events]
    assert done == sorted(done) and progress.events[-1][1] == 5 * 4  # one progress over the five passes
    # Scale 0 equals no LoRA; the swept scales differ from each other.
    plain = await edit(backend, request(seed=11))
    assert max_diff(results[0].images[0].data, plain.images[0].data) <= 1
    assert max_diff(results[2].images[0].data, results[4].images[0].data) > 0


@pytest.mark.anyio
async def test_random_seed_is_reported_and_reproducible(backend: LocalBackend) -> None:
    first = await edit(backend, request(seed=None, num_images=2))
    assert [image.seed for image in first.images] == [first.seed, first.seed + 1]
    again = await edit(backend, request(seed=first.seed))
    assert max_diff(first.images[0].data, again.images[0].data) <= 1


@pytest.mark.anyio
async def test_fields_without_local_effect_are_noted(backend: LocalBackend) -> None:
    result = await edit(backend, request(enable_safety_checker=True, sync_mode=True, acceleration="regular"))
    notes = " ".join(result.notes)
    assert "no safety check ran on the local backend" in notes
    assert "sync_mode has no effect" in notes
    assert "torch.compile is used on CUDA only" in notes
    assert result.images[0].nsfw is None


@pytest.mark.anyio
async def test_high_acceleration_uses_an_approximate_cache(backend: LocalBackend) -> None:
    exact = await edit(backend, request(num_inference_steps=10))
    cached = await edit(backend, request(num_inference_steps=10, acceleration="high"))
    assert max_diff(exact.images[0].data, cached.images[0].data) > 0
    assert any("TaylorSeer" in note for note in cached.notes)
    again = await edit(backend, request(num_inference_steps=10))  # the cache is off again
    assert max_diff(exact.images[0].data, again.images[0].data) == 0


@pytest.mark.anyio
async def test_too_small_or_too_narrow_inputs_are_refused(backend: LocalBackend) -> None:
    with pytest.raises(InputImageError, match=r"image_urls\.0: the image is 48x64") as small:
        await edit(backend, request(), [png_input(48, 64)])
    assert small.value.field == "image_urls.0"
    with pytest.raises(InputImageError, match="8:1") as narrow:
        await edit(backend, request(image_urls=["a", "b"]), [png_input(), png_input(64, 600)])
    assert narrow.value.field == "image_urls.1"


@pytest.mark.anyio
async def test_a_model_that_is_not_there_is_a_clear_error(
    make_backend: Callable[..., LocalBackend], tmp_path: Path
) -> None:
    backend = make_backend(model=str(tmp_path / "no-such-model"))
    with pytest.raises(BackendUnavailable, match="FLUX_MCP_MODEL"):
        await edit(backend, request())


# -- LoRAs -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_three_loras_in_three_formats_with_scales(
    backend: LocalBackend, tiny_transformer: Any, tmp_path: Path
) -> None:
    files = {
        fmt: save_lora(
            tmp_path / f"{fmt}.safetensors",
            make_lora_state_dict(tiny_transformer, fmt, seed=seed, strength=0.5),
        )
        for fmt, seed in (("diffusers", 1), ("bfl", 2), ("kohya", 3))
    }

    def with_scales(*scales: float) -> EditRequest:
        return request(
            loras=[{"path": str(path), "scale": s} for path, s in zip(files.values(), scales, strict=True)]
        )

    base = await edit(backend, request())
    half = await edit(backend, with_scales(0.5, 0.5, 0.5))
    more = await edit(backend, with_scales(1.0, 0.5, 0.5))
    zero = await edit(backend, with_scales(0.0, 0.0, 0.0))
    after = await edit(backend, request())

    assert max_diff(base.images[0].data, half.images[0].data) > 0
    assert max_diff(half.images[0].data, more.images[0].data) > 0
    assert max_diff(base.images[0].data, zero.images[0].data) <= 1
    assert max_diff(base.images[0].data, after.images[0].data) == 0  # the last request's LoRAs do not leak
    applied = half.details["loras"]
    assert [entry["path"] for entry in applied] == [p.name for p in files.values()]
    assert len({entry["adapter"] for entry in applied}) == 3


@pytest.mark.anyio
async def test_every_key_format_applies_the_same_update(
    backend: LocalBackend, tiny_transformer: Any, tmp_path: Path
) -> None:
    outputs = []
    for fmt in ("diffusers", "peft", "bfl", "kohya"):
        path = save_lora(tmp_path / f"{fmt}.safetensors", make_lora_state_dict(tiny_transformer, fmt, seed=5))
        outputs.append((await edit(backend, request(loras=[{"path": str(path)}]))).images[0].data)
    bfl_with_alpha = make_lora_state_dict(tiny_transformer, "bfl", seed=5, rank=4)
    for key in [k for k in bfl_with_alpha if k.endswith(".lora_A.weight")]:
        # alpha = rank/2 with lora_A doubled: the same update, exercising the alpha folding.
        bfl_with_alpha[key] = bfl_with_alpha[key] * 2
        bfl_with_alpha[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(2.0)
    path = save_lora(tmp_path / "bfl-alpha.safetensors", bfl_with_alpha)
    outputs.append((await edit(backend, request(loras=[{"path": str(path)}]))).images[0].data)
    assert all(max_diff(outputs[0], other) <= 1 for other in outputs[1:])


@pytest.mark.anyio
async def test_pickle_loras_are_refused(backend: LocalBackend, tmp_path: Path) -> None:
    pickled = tmp_path / "weights.pt"
    torch.save({"lora_A.weight": torch.zeros(2, 2)}, pickled)
    with pytest.raises(InvalidRequest, match="pickle") as by_name:
        await edit(backend, request(loras=[{"path": str(pickled)}]))
    assert by_name.value.field == "loras.0.path"

    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickled.read_bytes())
    with pytest.raises(
        InvalidRequest, match=r"disguised\.safetensors is not a safetensors file"
    ) as by_content:
        await edit(backend, request(loras=[{"path": str(disguised)}]))
    assert by_content.value.field == "loras.0.path"

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(InvalidRequest, match="not a safetensors file"):
        await edit(backend, request(loras=[{"path": str(junk)}]))


@pytest.mark.anyio
async def test_a_lora_matching_nothing_is_refused(
    backend: LocalBackend, tiny_transformer: Any, tmp_path: Path
) -> None:
    foreign = save_lora(
        tmp_path / "sdxl.safetensors",
        {
            "text_encoder.layers.0.q.lora_A.weight": torch.ones(4, 8),
            "text_encoder.layers.0.q.lora_B.weight": torch.ones(8, 4),
        },
    )
    with pytest.raises(
        InvalidRequest, match=r"loras\.0\.path: no LoRA keys in sdxl\.safetensors match this model"
    ):
        await edit(backend, request(loras=[{"path": str(foreign)}]))

    state = make_lora_state_dict(tiny_transformer, "diffusers", rank=4)
    wrong_shape = {
        k: torch.zeros(v.shape[0], v.shape[1] + 1) if "lora_A" in k else v for k, v in state.items()
    }
    misfit = save_lora(tmp_path / "misfit.safetensors", wrong_shape)
    with pytest.raises(InvalidRequest, match="does not fit this model"):
        await edit(backend, request(loras=[{"path": str(misfit)}]))

    good = save_lora(tmp_path / "good.safetensors", state)
    result = await edit(backend, request(loras=[{"path": str(good)}]))  # nothing half-loaded is left behind
    assert [entry["path"] for entry in result.details["loras"]] == ["good.safetensors"]


class _Files(BaseHTTPRequestHandler):
    """Serves ``files`` (path -> bytes) on loopback and counts the requests per path."""

    files: ClassVar[dict[str, bytes]] = {}
    hits: ClassVar[dict[str, int]] = {}

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.hits[path] = self.hits.get(path, 0) + 1
        body = self.files.get(path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def loopback(tiny_transformer: Any, tmp_path: Path) -> Iterator[tuple[str, dict[str, int]]]:
    """A loopback HTTP server with a LoRA at /loras/served.safetensors and a PNG at /house.png."""
    lora = save_lora(tmp_path / "served.safetensors", make_lora_state_dict(tiny_transformer, "kohya", seed=9))
    files = {"/loras/served.safetensors": lora.read_bytes(), "/house.png": png_input(80, 64).data or b""}
    handler = type("Handler", (_Files,), {"files": files, "hits": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.anyio
async def test_lora_url_is_downloaded_once_and_cached(
    make_backend: Callable[..., LocalBackend], loopback: tuple[str, dict[str, int]], tmp_path: Path
) -> None:
    base, hits = loopback
    url = f"{base}/loras/served.safetensors?token=s3cret"
    with pytest.raises(InvalidRequest) as refused:  # loopback is private: refused unless allowed
        await edit(make_backend(), request(loras=[{"path": url}]))
    assert hits == {} and "s3cret" not in str(refused.value)

    first = await edit(make_backend(allow_private_urls=True), request(loras=[{"path": url}]))
    second = await edit(make_backend(allow_private_urls=True), request(loras=[{"path": url}]))
    assert hits == {"/loras/served.safetensors": 1}
    assert max_diff(first.images[0].data, second.images[0].data) == 0
    cached = sorted(p.name for p in (tmp_path / "lora-cache").iterdir())
    assert len(cached) == 2 and cached[0].startswith("sha256-") and cached[0].endswith(".safetensors")
    assert cached[1].startswith("url-") and cached[1].endswith(".ref")  # the URL's hash -> the content
    assert first.details["loras"][0]["path"] == url.split("?")[0]  # the query (a token) is never shown


@pytest.mark.anyio
async def test_input_url_is_fetched_through_the_guard(
    make_backend: Callable[..., LocalBackend], loopback: tuple[str, dict[str, int]]
) -> None:
    base, hits = loopback
    remote = InputImage(source=f"{base}/house.png", url=f"{base}/house.png")
    with pytest.raises(InvalidRequest):
        await edit(make_backend(), request(), [remote])
    result = await edit(make_backend(allow_private_urls=True), request(), [remote])
    assert hits == {"/house.png": 1}
    assert (result.images[0].width, result.images[0].height) == (80, 64)  # the fetched image's size
    local = await edit(make_backend(), request(), [png_input(80, 64)])
    assert max_diff(result.images[0].data, local.images[0].data) == 0


@pytest.mark.anyio
async def test_lora_from_the_hugging_face_cache(
    backend: LocalBackend, tiny_transformer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hf-hub"
    snapshot = cache / "models--someone--klein-lora" / "snapshots" / ("a" * 40)
    save_lora(snapshot / "edit.safetensors", make_lora_state_dict(tiny_transformer, "peft", seed=4))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    named = await edit(backend, request(loras=[{"path": "someone/klein-lora/edit.safetensors"}]))
    only_file = await edit(backend, request(loras=[{"path": "someone/klein-lora"}]))
    assert named.details["loras"][0]["path"] == "someone/klein-lora/edit.safetensors"
    assert max_diff(named.images[0].data, only_file.images[0].data) == 0
    with pytest.raises(InvalidRequest, match="pickle"):
        await edit(backend, request(loras=[{"path": "someone/klein-lora/model.ckpt"}]))
    with pytest.raises(BackendUnavailable, match="not in the local Hugging Face cache"):
        await edit(backend, request(loras=[{"path": "someone/klein-lora/missing.safetensors"}]))


def test_adapters_beyond_capacity_are_evicted_oldest_first(tiny_transformer: Any, tmp_path: Path) -> None:
    pipe = build_tiny_pipeline()
    adapters = AdapterCache(capacity=2)
    files = []
    for seed in range(3):
        path = save_lora(
            tmp_path / f"l{seed}.safetensors", make_lora_state_dict(tiny_transformer, "bfl", seed=seed)
        )
        files.append(LoraFile(path, str(seed) * 64, path.name, f"loras.{seed}.path"))
    adapters.activate(pipe, [(files[0], 1.0)], print)
    adapters.activate(pipe, [(files[1], 1.0)], print)
    adapters.activate(pipe, [(files[0], 0.5)], print)  # used again: now the newest
    adapters.activate(pipe, [(files[2], 1.0)], print)
    assert sorted(pipe.get_list_adapters()["transformer"]) == sorted(
        [files[0].adapter_name, files[2].adapter_name]
    )
    assert pipe.get_active_adapters() == [files[2].adapter_name]
    adapters.activate(pipe, [], print)
    assert not any(module.merged or not module.disable_adapters for module in _lora_layers(pipe))


def _lora_layers(pipe: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [module for module in pipe.transformer.modules() if isinstance(module, LoraLayer)]


# -- scheduling: queue, cancellation, CNS ------------------------------------------------------


@pytest.mark.anyio
async def test_cancelling_stops_within_one_step(backend: LocalBackend) -> None:
    await edit(backend, request(num_inference_steps=4))  # load the model first
    with anyio.CancelScope() as scope:

        def cancel_at_step_two(message: str) -> None:
            if message == "step 2/30":
                scope.cancel()

        progress = Recorder(cancel_at_step_two)
        await edit_once(backend, request(num_inference_steps=30), [png_input()], progress)
    assert scope.cancelled_caught
    steps = [m for m in progress.messages if m.startswith("step ")]
    assert steps[:2] == ["step 1/30", "step 2/30"] and len(steps) <= 3
    result = await edit(backend, request())  # the GPU is free again
    assert len(result.images) == 1


@pytest.mark.anyio
async def test_concurrent_edits_run_one_after_the_other(backend: LocalBackend) -> None:
    order: list[tuple[str, str]] = []
    first_has_the_gpu = anyio.Event()

    def on_first(message: str) -> None:
        order.append(("A", message))
        if message == "encoding the prompt":
            first_has_the_gpu.set()

    first, second = Recorder(on_first), Recorder(lambda m: order.append(("B", m)))
    results: dict[str, BackendResult] = {}

    async def run(name: str, progress: Recorder) -> None:
        results[name] = await edit_once(backend, request(num_inference_steps=8), [png_input()], progress)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "A", first)
        await first_has_the_gpu.wait()
        tg.start_soon(run, "B", second)
    assert "waiting for the GPU: position 1" in second.messages
    steps = [name for name, message in order if message.startswith("step ")]
    assert steps == ["A"] * 8 + ["B"] * 8
    assert max_diff(results["A"].images[0].data, results["B"].images[0].data) == 0


@pytest.mark.anyio
async def test_a_caller_leaving_the_queue_moves_the_others_up(backend: LocalBackend) -> None:
    first_has_the_gpu = anyio.Event()
    second, third = Recorder(), Recorder()
    second_scope = anyio.CancelScope()
    finished: list[str] = []

    async def run(name: str, progress: Recorder, steps: int) -> None:
        await edit_once(backend, request(num_inference_steps=steps), [png_input()], progress)
        finished.append(name)

    async def run_second() -> None:
        with second_scope:
            await run("B", second, 4)

    async def until(recorder: Recorder, message: str) -> None:
        while message not in recorder.messages:
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(
            run, "A", Recorder(lambda m: first_has_the_gpu.set() if m.startswith("step") else None), 30
        )
        await first_has_the_gpu.wait()
        tg.start_soon(run_second)
        await until(second, "waiting for the GPU: position 1")
        tg.start_soon(run, "C", third, 4)
        await until(third, "waiting for the GPU: position 2")
        second_scope.cancel()
    assert finished == ["A", "C"]
    assert [m for m in third.messages if m.startswith("waiting")] == [
        "waiting for the GPU: position 2",
        "waiting for the GPU: position 1",
    ]
    assert not any(m.startswith("step") for m in second.messages)


@pytest.mark.anyio
async def test_cns_runs_and_reports_its_gamma(backend: LocalBackend, tiny_model: Path) -> None:
    plain = await edit(backend, request())
    coloured = await edit(backend, request(enable_cns=True))
    info = coloured.details["cns"]
    assert info["enabled"] is True and info["gamma"] == "matrix (analytic stand-in)"
    assert info["noised_steps"] == 3 and info["grid"] == [16, 16]
    assert max_diff(plain.images[0].data, coloured.images[0].data) > 0
    deterministic = await edit(backend, request(enable_cns=True, cns_s_churn=0.0))
    assert max_diff(plain.images[0].data, deterministic.images[0].data) == 0
    again = await edit(backend, request())  # the plain scheduler is back
    assert max_diff(plain.images[0].data, again.images[0].data) == 0 and "cns" not in again.details


@pytest.mark.anyio
async def test_cns_uses_a_calibrated_matrix_from_the_cache(
    make_backend: Callable[..., LocalBackend], tiny_model: Path
) -> None:
    path = cns.gamma_cache_path(user_cache_dir(APP), str(tiny_model))
    cns.save_gamma_matrix(
        path, torch.linspace(0, 1, 8).unsqueeze(1).repeat(1, 16), {"model": str(tiny_model)}
    )
    result = await edit(make_backend(), request(enable_cns=True))
    assert result.details["cns"]["gamma"] == f"matrix (calibrated: {path.name})"

"""Tests of the tiny offline klein pipeline and of how diffusers loads LoRA files in each key format.

The LoRA tests pin down diffusers' own behaviour (key conversion, what loads nothing, what raises)
so that the local backend can rely on it; a diffusers upgrade that changes it fails here first.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline

from flux_mcp.backends.tiny import (
    LORA_FORMATS,
    LoraFormat,
    build_tiny_pipeline,
    make_example_image,
    make_lora_state_dict,
    save_lora,
    save_tiny_model,
)

pytestmark = [
    pytest.mark.local,
    # peft's note on the second adapter of a model; several adapters per pipeline is what we want.
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
]

PROMPT = "make the house blue"


def latents(pipe: Flux2KleinPipeline, seed: int = 1, **kwargs: object) -> torch.Tensor:
    """64×64, 2 steps, CFG at the default guidance 4.0; latents, not 8-bit pixels, are compared."""
    return pipe(
        prompt=PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    ).images


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model is too small to gain from threads, and on a busy 2-core machine torch's
    spinning worker threads make each run ten times slower; the setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pipe() -> Flux2KleinPipeline:
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def base_latents() -> torch.Tensor:
    return latents(build_tiny_pipeline())


@pytest.fixture(scope="module")
def merged_lora_latents() -> torch.Tensor:
    """The expected effect of the test LoRA, computed without peft or any key conversion.

    Each update B @ A is added straight into the base Linear weights of a fresh pipeline, so a
    converter that maps a key to the wrong module, splits qkv wrongly or mis-scales alpha misses it.
    """
    pipe = build_tiny_pipeline()
    state_dict = make_lora_state_dict(pipe.transformer, "diffusers")
    with torch.no_grad():
        for key, down in state_dict.items():
            if key.endswith(".lora_A.weight"):
                path = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                up = state_dict[key.replace(".lora_A.", ".lora_B.")]
                pipe.transformer.get_submodule(path).weight += up @ down
    return latents(pipe)


@pytest.fixture
def diffusers_warnings() -> Iterator[list[str]]:
    """Messages diffusers logs at WARNING or above (its loggers do not propagate to the root)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    library_logger = logging.getLogger("diffusers")
    library_logger.addHandler(handler)
    try:
        yield messages
    finally:
        library_logger.removeHandler(handler)


# -- the pipeline ----------------------------------------------------------------------------------


def test_build_is_deterministic_and_leaves_global_rng_alone() -> None:
    rng_before = torch.random.get_rng_state()
    first, again, other = build_tiny_pipeline(0), build_tiny_pipeline(0), build_tiny_pipeline(1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    for name in ("transformer", "text_encoder", "vae"):
        weights = getattr(first, name).state_dict()
        assert all(torch.equal(weights[k], v) for k, v in getattr(again, name).state_dict().items())
    assert not torch.equal(first.transformer.x_embedder.weight, other.transformer.x_embedder.weight)


def test_components_and_shapes_agree(pipe: Flux2KleinPipeline) -> None:
    transformer, vae, text_encoder = pipe.transformer.config, pipe.vae.config, pipe.text_encoder.config
    assert pipe.config.is_distilled is False
    assert transformer.guidance_embeds is False
    assert transformer.in_channels == 4 * vae.latent_channels
    assert transformer.joint_attention_dim == 3 * text_encoder.hidden_size
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert text_encoder.num_hidden_layers >= 28
    assert pipe.scheduler.config.use_dynamic_shifting is True
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}


def test_runs_64px_two_steps(pipe: Flux2KleinPipeline, base_latents: torch.Tensor) -> None:
    out = latents(pipe)
    assert out.shape == (1, 4, 32, 32)
    assert torch.isfinite(out).all() and out.std() > 0.1
    assert torch.equal(out, base_latents)
    assert not torch.equal(latents(pipe, seed=2), out)
    image = pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=2).images[0]
    assert image.size == (64, 64) and image.mode == "RGB"


def test_tokenizer_speaks_the_qwen3_chat_format(pipe: Flux2KleinPipeline) -> None:
    tokenizer = pipe.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "héllo"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text == "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    for token in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert ids.count(tokenizer.convert_tokens_to_ids(token)) >= 1
    padded = tokenizer(text, padding="max_length", max_length=512)
    assert len(padded["input_ids"]) == 512 and sum(padded["attention_mask"]) == len(ids)


def test_reference_image_conditions_the_output(pipe: Flux2KleinPipeline, base_latents: torch.Tensor) -> None:
    edited = latents(pipe, image=make_example_image(64, 64))
    assert edited.shape == base_latents.shape
    assert (edited - base_latents).abs().max() > 1e-3


def test_batched_generators_equal_single_runs(pipe: Flux2KleinPipeline) -> None:
    seeds = [11, 12, 13]
    batched = pipe(
        prompt=PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        num_images_per_prompt=3,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    ).images
    singles = torch.cat([latents(pipe, seed=s) for s in seeds])
    assert batched.shape == (3, 4, 32, 32)
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)
    assert not torch.allclose(batched[0], batched[1])


# -- saving and loading ----------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test, and the hub libraries are told to stay offline."""

    def refuse(sock: socket.socket, address: object) -> None:
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.usefixtures("no_network")
def test_saved_model_loads_offline_and_reproduces(tmp_path: Path, base_latents: torch.Tensor) -> None:
    model = save_tiny_model(tmp_path / "model")
    assert json.loads((model / "model_index.json").read_text())["is_distilled"] is False
    loaded = Flux2KleinPipeline.from_pretrained(model)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.is_distilled is False
    built = build_tiny_pipeline()
    for name in ("transformer", "text_encoder", "vae"):
        weights = getattr(built, name).state_dict()
        assert all(torch.equal(weights[k], v) for k, v in getattr(loaded, name).state_dict().items())
    assert loaded.tokenizer.chat_template == built.tokenizer.chat_template
    # Same weights bit for bit, but tensors loaded from safetensors may take other CPU kernel paths:
    # the latents agree to float32 rounding (~1e-6), not exactly.
    torch.testing.assert_close(latents(loaded), base_latents, atol=1e-5, rtol=0)


def test_save_is_idempotent_and_never_clobbers(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "model")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert save_tiny_model(tmp_path / "model") == model
    assert weights.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        save_tiny_model(model, seed=1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_tiny_model(other)
    assert (other / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (save_tiny_model(empty) / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


# -- LoRA formats ----------------------------------------------------------------------------------


def test_lora_state_dicts_have_the_documented_keys(pipe: Flux2KleinPipeline) -> None:
    samples = {
        "diffusers": "transformer.transformer_blocks.1.attn.to_q.lora_A.weight",
        "peft": "base_model.model.double_blocks.1.img_attn.qkv.lora_A.weight",
        "bfl": "diffusion_model.single_blocks.1.linear1.lora_B.weight",
        "kohya": "lora_unet_double_blocks_0_txt_mlp_2.lora_up.weight",
    }
    for fmt, key in samples.items():
        state_dict = make_lora_state_dict(pipe.transformer, fmt)
        assert key in state_dict
        assert all(t.abs().sum() > 0 for k, t in state_dict.items() if not k.endswith(".alpha"))
    kohya = make_lora_state_dict(pipe.transformer, "kohya", rank=6)
    assert kohya["lora_unet_single_blocks_0_linear2.alpha"].item() == 3.0
    assert kohya["lora_unet_single_blocks_0_linear2.lora_down.weight"].shape[0] == 6
    bfl = make_lora_state_dict(pipe.transformer, "bfl")
    assert not any(k.endswith(".alpha") for k in bfl)
    stronger = make_lora_state_dict(pipe.transformer, "bfl", strength=2.0)
    assert all(torch.equal(stronger[k], 2 * bfl[k]) for k in bfl if ".lora_B." in k)
    assert all(torch.equal(stronger[k], bfl[k]) for k in bfl if ".lora_A." in k)
    with pytest.raises(ValueError, match="unknown LoRA format"):
        make_lora_state_dict(pipe.transformer, "comfy")  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_each_lora_format_loads_from_a_file_with_the_right_effect(
    fmt: LoraFormat,
    pipe: Flux2KleinPipeline,
    tmp_path: Path,
    base_latents: torch.Tensor,
    merged_lora_latents: torch.Tensor,
) -> None:
    path = save_lora(tmp_path / f"{fmt}.safetensors", make_lora_state_dict(pipe.transformer, fmt))
    pipe.load_lora_weights(str(path), adapter_name=f"edit-{fmt}")
    assert pipe.get_list_adapters() == {"transformer": [f"edit-{fmt}"]}
    assert pipe.get_active_adapters() == [f"edit-{fmt}"]
    with_lora = latents(pipe)
    assert (with_lora - base_latents).abs().max() > 0.05
    torch.testing.assert_close(with_lora, merged_lora_latents, atol=1e-4, rtol=0)


def test_adapter_weight_zero_equals_no_lora(pipe: Flux2KleinPipeline, base_latents: torch.Tensor) -> None:
    pipe.load_lora_weights(make_lora_state_dict(pipe.transformer, "bfl"), adapter_name="edit")
    pipe.set_adapters(["edit"], adapter_weights=[0.0])
    torch.testing.assert_close(latents(pipe), base_latents, atol=1e-6, rtol=0)
    pipe.set_adapters(["edit"], adapter_weights=[1.0])
    assert (latents(pipe) - base_latents).abs().max() > 0.05
    pipe.disable_lora()
    torch.testing.assert_close(latents(pipe), base_latents, atol=1e-6, rtol=0)


def test_two_adapters_combine_by_their_weights(
    pipe: Flux2KleinPipeline, merged_lora_latents: torch.Tensor
) -> None:
    """The same update loaded twice (two formats) at 0.5 each is the update once at 1.0."""
    pipe.load_lora_weights(make_lora_state_dict(pipe.transformer, "peft"), adapter_name="half-1")
    pipe.load_lora_weights(make_lora_state_dict(pipe.transformer, "kohya"), adapter_name="half-2")
    assert pipe.get_active_adapters() == ["half-2"]  # loading activates only the newest adapter
    pipe.set_adapters(["half-1", "half-2"], adapter_weights=[0.5, 0.5])
    torch.testing.assert_close(latents(pipe), merged_lora_latents, atol=1e-4, rtol=0)


def test_lora_for_another_model_size_raises_and_deactivates_adapters(pipe: Flux2KleinPipeline) -> None:
    """A shape mismatch raises RuntimeError (not ValueError); peft then drops the failed adapter but
    leaves only one of the earlier adapters active, so set_adapters must be called again."""
    pipe.load_lora_weights(make_lora_state_dict(pipe.transformer, "bfl", seed=1), adapter_name="a")
    pipe.load_lora_weights(make_lora_state_dict(pipe.transformer, "bfl", seed=2), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 1.0])
    wrong_width = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 99),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(32, 4),
    }
    with (
        pytest.raises(RuntimeError, match="size mismatch"),
        pytest.warns(UserWarning, match="Setting active adapter to a"),
    ):
        pipe.load_lora_weights(wrong_width, adapter_name="c")
    assert pipe.get_list_adapters() == {"transformer": ["a", "b"]}
    assert pipe.get_active_adapters() == ["a"]
    with pytest.raises(ValueError, match="already in use"):
        pipe.load_lora_weights(make_lora_state_dict(pipe.transformer, "bfl"), adapter_name="a")


def _pair(module: str, down: str = "lora_A", up: str = "lora_B") -> dict[str, torch.Tensor]:
    """One LoRA module's two matrices under ``module`` (shapes fit ``x_embedder``; never applied)."""
    return {f"{module}.{down}.weight": torch.ones(4, 16), f"{module}.{up}.weight": torch.ones(32, 4)}


UNMATCHED = {
    "diffusers_without_prefix": _pair("transformer_blocks.0.attn.to_q"),
    "kohya_text_encoder_only": _pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_down", "lora_up"),
    "diffusers_unknown_module": _pair("transformer.no_such_module"),
    "bfl_unknown_module": _pair("diffusion_model.no_such_module"),
    "peft_diffusers_non_block_module": _pair("base_model.model.x_embedder"),
    "no_lora_keys": {"transformer.x_embedder.weight": torch.ones(32, 16)},
}


@pytest.mark.parametrize("case", ["diffusers_without_prefix", "kohya_text_encoder_only"])
def test_keys_matching_no_component_load_nothing_with_only_a_warning(
    case: str, pipe: Flux2KleinPipeline, base_latents: torch.Tensor, diffusers_warnings: list[str]
) -> None:
    """diffusers keeps only keys under ``transformer.``; when none is left it logs and returns.

    No exception, no adapter: the caller must check ``get_list_adapters()`` after every load.
    """
    pipe.load_lora_weights(UNMATCHED[case], adapter_name="ghost")
    assert pipe.get_list_adapters() == {}
    assert any("No LoRA keys associated to Flux2Transformer2DModel" in m for m in diffusers_warnings)
    assert torch.equal(latents(pipe), base_latents)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("diffusers_unknown_module", "not found in the base model"),
        ("bfl_unknown_module", "should be empty"),
        ("peft_diffusers_non_block_module", "should be empty"),
        ("no_lora_keys", "Invalid adapter checkpoint"),
    ],
)
def test_keys_naming_unknown_modules_raise(case: str, message: str, pipe: Flux2KleinPipeline) -> None:
    pipe.load_lora_weights(make_lora_state_dict(pipe.transformer, "diffusers"), adapter_name="good")
    with pytest.raises(ValueError, match=message):
        pipe.load_lora_weights(UNMATCHED[case], adapter_name="bad")
    assert pipe.get_list_adapters() == {"transformer": ["good"]}
    assert pipe.get_active_adapters() == ["good"]


def test_bfl_file_with_alpha_keys_raises(pipe: Flux2KleinPipeline) -> None:
    state_dict = make_lora_state_dict(pipe.transformer, "bfl")
    state_dict["diffusion_model.double_blocks.0.img_attn.qkv.alpha"] = torch.tensor(4.0)
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.qkv\.alpha"):
        pipe.load_lora_weights(state_dict, adapter_name="alpha")
    assert pipe.get_list_adapters() == {}


@pytest.mark.parametrize(
    ("fmt", "extra", "warning"),
    [
        (
            "kohya",
            _pair("lora_unet_no_such_block", "lora_down", "lora_up"),
            "Unsupported keys for Kohya Flux2",
        ),
        ("diffusers", _pair("transformer.no_such_module"), "unexpected keys found in the model"),
    ],
)
def test_unknown_keys_beside_known_ones_load_partially_with_a_warning(
    fmt: LoraFormat,
    extra: dict[str, torch.Tensor],
    warning: str,
    pipe: Flux2KleinPipeline,
    merged_lora_latents: torch.Tensor,
    diffusers_warnings: list[str],
) -> None:
    """Unlike a file where nothing matches, the known part loads in full and the rest is dropped."""
    pipe.load_lora_weights(make_lora_state_dict(pipe.transformer, fmt) | extra, adapter_name="partial")
    assert pipe.get_list_adapters() == {"transformer": ["partial"]}
    assert any(warning in m for m in diffusers_warnings)
    torch.testing.assert_close(latents(pipe), merged_lora_latents, atol=1e-4, rtol=0)


# -- the example picture ---------------------------------------------------------------------------


def test_example_image_is_deterministic_and_recognisable() -> None:
    image = make_example_image()
    assert image.size == (256, 256) and image.mode == "RGB"
    assert image.tobytes() == make_example_image().tobytes()
    assert len(image.getcolors(maxcolors=100_000) or []) > 50  # gradient, not a flat fill
    red, green, blue = image.getpixel((80, 160))  # the house wall
    assert red > 150 and green < 80 and blue < 80
    assert image.getpixel((200, 50))[:2] >= (240, 200)  # the sun
    assert make_example_image(320, 200).size == (320, 200)

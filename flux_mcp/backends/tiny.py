"""A tiny, offline, randomly initialised FLUX.2 [klein] pipeline, LoRA files for it, and a test picture.

``flux-mcp demo`` runs the local backend on this pipeline where there is no GPU and no network, and
the tests use it to drive the real diffusers code paths (loading with ``from_pretrained``, LoRA key
conversion, batching, CFG) in a fraction of a second on a CPU. Every component is the real class
(``Flux2KleinPipeline``, ``Flux2Transformer2DModel``, ``AutoencoderKLFlux2``, ``Qwen3ForCausalLM``,
``Qwen2TokenizerFast``) built from a config with deterministic random weights; the images it makes
are noise-like, not pictures.

Shapes that must agree (see ``reference/diffusers-klein.md``):

- ``transformer.in_channels`` = 4 × ``vae.latent_channels`` (the pipeline packs 2 × 2 latent patches);
- ``joint_attention_dim`` = len(text_encoder_out_layers) × text hidden size (layers 9, 18, 27 stacked);
- ``sum(axes_dims_rope)`` = ``attention_head_dim``;
- the text encoder has ≥ 28 layers so that hidden state 27 exists.

LoRA key formats (all four are converted by ``Flux2KleinPipeline.load_lora_weights``):

- ``diffusers``: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (fused qkv split in three);
- ``peft`` (PEFT / fal): ``base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight``, i.e. BFL
  module names: diffusers rewrites ``base_model.model.`` to ``diffusion_model.`` and converts it as BFL;
- ``bfl`` (BFL / ai-toolkit): ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``,
  no ``.alpha`` keys (diffusers raises ValueError on them);
- ``kohya``: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``lora_up.weight`` +
  ``.alpha``.

``make_lora_state_dict`` writes the same low-rank update in every format, so the four files change
the pipeline's output identically; that makes the converters themselves testable.

This module is imported only with the ``local`` extra (torch, diffusers, transformers, safetensors).
It knows nothing about MCP, requests, presets or the result store.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen2TokenizerFast

__all__ = [
    "LORA_FORMATS",
    "LoraFormat",
    "build_tiny_pipeline",
    "changing_lora_sets",
    "make_example_image",
    "make_lora_state_dict",
    "save_lora",
    "save_tiny_model",
]

LoraFormat = Literal["diffusers", "peft", "bfl", "kohya"]
LORA_FORMATS: tuple[LoraFormat, ...] = ("diffusers", "peft", "bfl", "kohya")

# -- sizes of the tiny model ------------------------------------------------------------------------

_TEXT_HIDDEN = 8
_TEXT_LAYERS = 28  # hidden states 9, 18 and 27 must exist
_TEXT_OUT_LAYERS = 3  # len((9, 18, 27)), the pipeline's default text_encoder_out_layers
_LATENT_CHANNELS = 4
_HEAD_DIM = 16
_DOUBLE_BLOCKS = 2  # two of each, so the LoRA converters' block indices are exercised beyond 0
_SINGLE_BLOCKS = 2

# Byte-level BPE without merges: every byte is one token. The specials follow Qwen3's order.
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_THINK_TOKENS = ("<think>", "</think>")

# Qwen3's chat template reduced to what the klein pipeline uses: one user turn, the generation
# prompt, and the empty think block that ``enable_thinking=False`` produces.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# FlowMatchEulerDiscreteScheduler settings of FLUX.2: diffusers' conversion script
# (scripts/convert_flux2_to_diffusers.py) takes the scheduler of black-forest-labs/FLUX.1-dev, i.e.
# these values; the klein pipeline passes ``mu`` from ``compute_empirical_mu``, which needs
# dynamic shifting on.
_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# Files ``save_pretrained`` writes; a directory holding all of them (and our marker) is complete.
_MODEL_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
_MARKER = "flux_mcp_tiny.json"


# -- the pipeline -----------------------------------------------------------------------------------


def _build_tokenizer() -> Qwen2TokenizerFast:
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), *_SPECIAL_TOKENS, *_THINK_TOKENS]
    tokenizer = Qwen2TokenizerFast(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(_SPECIAL_TOKENS[1:]),
        chat_template=_CHAT_TEMPLATE,
    )
    # Qwen3 keeps <think>/</think> as ordinary added tokens (not special), matched whole.
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in _THINK_TOKENS])
    return tokenizer


def build_tiny_pipeline(seed: int = 0) -> Flux2KleinPipeline:
    """Build the tiny klein pipeline (Base: true CFG) on the CPU in float32.

    The weights depend only on ``seed``; the global torch RNG is left as it was.
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * _LATENT_CHANNELS,
            num_layers=_DOUBLE_BLOCKS,
            num_single_layers=_SINGLE_BLOCKS,
            attention_head_dim=_HEAD_DIM,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_OUT_LAYERS * _TEXT_HIDDEN,
            timestep_guidance_channels=256,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,  # klein has no guidance embedding
        )
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=_TEXT_HIDDEN,
                intermediate_size=16,
                num_hidden_layers=_TEXT_LAYERS,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=4,
                max_position_embeddings=1024,
                bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae = AutoencoderKLFlux2(
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=_LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        )
    # Modules start in training mode; from_pretrained hands them out in eval mode, and so do we.
    for module in (transformer, text_encoder, vae):
        module.eval()
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline in ``save_pretrained`` layout and return the directory.

    ``Flux2KleinPipeline.from_pretrained(directory)`` then loads it offline with the weights of
    ``build_tiny_pipeline(seed)`` bit for bit (its latents agree to float32 rounding). A directory that already holds the complete tiny model
    of this seed is kept as it is. The model is written into a temporary sibling and renamed into
    place, so a reader never sees half a model. Raises ``FileExistsError`` if the directory holds
    anything else (another seed, another model, other files): it is never overwritten.
    """
    target = Path(directory).expanduser().resolve()
    if _holds_tiny_model(target, seed):
        return target
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty and holds no tiny model of seed {seed}")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_tiny_pipeline(seed).save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps({"seed": seed}) + "\n", encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp makes it private; the model is an ordinary directory
        if target.exists():
            target.rmdir()  # empty (checked above); renaming onto a directory is not portable
        os.replace(staging, target)
    except OSError:
        # Another process may have put the same model in place between our check and the rename.
        if not _holds_tiny_model(target, seed):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _holds_tiny_model(directory: Path, seed: int) -> bool:
    marker = directory / _MARKER
    if not marker.is_file() or not all((directory / name).is_file() for name in _MODEL_FILES):
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("seed") == seed
    except (OSError, ValueError):
        return False


# -- LoRA state dicts ------------------------------------------------------------------------------

# BFL module name inside a block → the diffusers modules it maps to (a fused qkv is three).
_DOUBLE_BLOCK_MODULES = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
_SINGLE_BLOCK_MODULES = {
    "linear1": ("attn.to_qkv_mlp_proj",),
    "linear2": ("attn.to_out",),
}


@dataclass(frozen=True)
class _LowRank:
    """One BFL-named LoRA module: ``delta W = up @ down``, and the diffusers modules it covers."""

    bfl_name: str
    targets: list[tuple[str, int]]  # (diffusers module path, out_features), in fused order
    down: torch.Tensor  # (rank, in_features): PEFT's lora_A, kohya's lora_down
    up: torch.Tensor  # (sum of out_features, rank): PEFT's lora_B, kohya's lora_up


def _low_rank_updates(
    transformer: Flux2Transformer2DModel, rank: int, seed: int, strength: float
) -> list[_LowRank]:
    """Random, non-zero A and B for every attention and MLP projection of every block."""
    generator = torch.Generator().manual_seed(seed)
    updates = []
    layouts = (
        ("double_blocks", "transformer_blocks", _DOUBLE_BLOCK_MODULES),
        ("single_blocks", "single_transformer_blocks", _SINGLE_BLOCK_MODULES),
    )
    for bfl_prefix, diffusers_prefix, modules in layouts:
        for index in range(len(getattr(transformer, diffusers_prefix))):
            for bfl_module, diffusers_modules in modules.items():
                paths = [f"{diffusers_prefix}.{index}.{name}" for name in diffusers_modules]
                # A module that already carries a LoRA is wrapped by peft; its shape is the base layer's.
                layers = [
                    getattr(layer, "base_layer", layer) for layer in map(transformer.get_submodule, paths)
                ]
                in_features = layers[0].in_features
                out_features = [layer.out_features for layer in layers]
                # Scaled so that B @ A is about as large as the layer's own weights at strength 1:
                # trained LoRAs start with B = 0, but here the output must visibly change.
                down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
                up = torch.randn(sum(out_features), rank, generator=generator) * (strength / rank**0.5)
                updates.append(
                    _LowRank(
                        f"{bfl_prefix}.{index}.{bfl_module}",
                        list(zip(paths, out_features, strict=True)),
                        down,
                        up,
                    )
                )
    return updates


def make_lora_state_dict(
    transformer: Flux2Transformer2DModel,
    fmt: LoraFormat,
    rank: int = 4,
    seed: int = 0,
    strength: float = 1.0,
) -> dict[str, torch.Tensor]:
    """A LoRA for ``transformer`` in one key format; every format encodes the same update.

    It covers the attention and MLP projections of all double and single blocks. ``strength``
    scales B (for kohya, ``lora_up``). The kohya file stores ``alpha = rank / 2`` with ``lora_up``
    doubled, so its ``.alpha`` handling is exercised and the effective update stays the same
    (powers of two: bit for bit).
    """
    if fmt not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; use one of {', '.join(LORA_FORMATS)}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    state_dict: dict[str, torch.Tensor] = {}
    for update in _low_rank_updates(transformer, rank, seed, strength):
        if fmt == "diffusers":
            # A fused BFL qkv becomes three modules that share A and split B by rows.
            ups = torch.split(update.up, [out for _, out in update.targets])
            for (path, _), up in zip(update.targets, ups, strict=True):
                state_dict[f"transformer.{path}.lora_A.weight"] = update.down.clone()
                state_dict[f"transformer.{path}.lora_B.weight"] = up.clone()
        elif fmt == "kohya":
            key = "lora_unet_" + update.bfl_name.replace(".", "_")
            state_dict[f"{key}.lora_down.weight"] = update.down
            state_dict[f"{key}.lora_up.weight"] = update.up * 2.0
            state_dict[f"{key}.alpha"] = torch.tensor(rank / 2.0)
        else:
            prefix = "base_model.model." if fmt == "peft" else "diffusion_model."
            state_dict[f"{prefix}{update.bfl_name}.lora_A.weight"] = update.down
            state_dict[f"{prefix}{update.bfl_name}.lora_B.weight"] = update.up
    return state_dict


def save_lora(path: str | Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``state_dict`` as a ``.safetensors`` file (atomically) and return its path."""
    from safetensors.torch import save_file

    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.detach().contiguous() for key, tensor in state_dict.items()}
    descriptor, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(descriptor)
    try:
        save_file(tensors, staging, metadata={"format": "pt"})
        os.replace(staging, target)
    finally:
        Path(staging).unlink(missing_ok=True)
    return target


def changing_lora_sets(paths: list[str], count: int) -> list[list[dict[str, Any]]]:
    """``count`` distinct ``loras`` request values from these files: no LoRA, each file alone, then
    pairs and triples, with varying scales. Each new adapter set makes a compiled transformer
    recompile, so these exercise torch.compile's recompile limit (8)."""
    sets: list[tuple[int, ...]] = [()]
    for size in range(1, min(3, len(paths)) + 1):
        sets += itertools.combinations(range(len(paths)), size)
    if count > len(sets):
        raise ValueError(f"{len(paths)} files give {len(sets)} LoRA sets, fewer than {count}")
    return [
        [
            {"path": paths[index], "scale": 1.0 - 0.25 * (position % 3)}
            for position, index in enumerate(chosen)
        ]
        for chosen in sets[:count]
    ]


# -- an input picture ------------------------------------------------------------------------------


def make_example_image(width: int = 256, height: int = 256) -> Image.Image:
    """A deterministic RGB picture: sky gradient, sun, two hills and a red house with a roof."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    top, bottom = (40, 90, 200), (250, 190, 120)
    for y in range(height):
        t = y / max(height - 1, 1)
        colour = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        draw.line([(0, y), (width, y)], fill=colour)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        return round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)

    draw.ellipse(box(0.68, 0.08, 0.90, 0.30), fill=(255, 220, 60), outline=(255, 160, 0))
    draw.ellipse(box(-0.30, 0.55, 0.70, 1.40), fill=(60, 150, 70))
    draw.ellipse(box(0.35, 0.62, 1.30, 1.45), fill=(40, 120, 55))
    draw.rectangle(box(0.20, 0.52, 0.48, 0.78), fill=(200, 40, 40), outline=(90, 20, 20))
    roof = [(0.16, 0.53), (0.34, 0.38), (0.52, 0.53)]
    draw.polygon([(round(x * width), round(y * height)) for x, y in roof], fill=(110, 60, 40))
    draw.rectangle(box(0.30, 0.64, 0.38, 0.78), fill=(80, 50, 30))
    return image

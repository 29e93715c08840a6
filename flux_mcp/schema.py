"""The request and result models: the ONE place the endpoint's parameters are declared.

``EditRequest`` mirrors every input field of ``fal-ai/flux-2/klein/9b/base/edit/lora`` with its exact
name, default and range (``shared/reference/endpoint.md``). The MCP tools' input schemas, the CLI's
options, both backends and the README's tables are all derived from it, so a parameter is never
restated anywhere else. ``EditResult`` is the endpoint's output.

The tool-facing argument models (``EditImageArgs``, ``CompareSeedsArgs``) are built from
``EditRequest`` by adding or removing fields, never by copying them.

This module knows nothing about MCP, fal-client, torch or the filesystem.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

__all__ = [
    "ENDPOINT_ID",
    "IMAGE_SIZE_PRESETS",
    "MAX_OUTPUT_PIXELS",
    "MAX_SEED",
    "CompareSeedsArgs",
    "EditImageArgs",
    "EditRequest",
    "EditResult",
    "ImageFile",
    "ImageSize",
    "ImageSizePreset",
    "LoraWeight",
    "VaryAxis",
    "image_seeds",
    "output_size",
    "tool_input_schema",
    "wrap_seed",
]

ENDPOINT_ID = "fal-ai/flux-2/klein/9b/base/edit/lora"

ImageSizePreset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]
#: fal's standard image-size presets, as (width, height) in pixels.
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
#: The endpoint gives seeds no range; we keep them to unsigned 32 bits so every client, JSON
#: parser and torch generator agrees on the value (documented tightening, checked by the drift test).
MAX_SEED = 2**32 - 1
#: fal's generic cap for a custom side; FLUX.2 LoRA endpoints document 512-2048 as the useful range.
MAX_SIDE = 14142
#: The most pixels a result image can have (what the server accepts from a backend).
MAX_OUTPUT_PIXELS = MAX_SIDE * MAX_SIDE

_STRICT = ConfigDict(extra="forbid")


class ImageSize(BaseModel):
    """A custom output size in pixels."""

    model_config = _STRICT

    width: int = Field(512, gt=0, le=MAX_SIDE, description="Output width in pixels (512-2048 works best).")
    height: int = Field(512, gt=0, le=MAX_SIDE, description="Output height in pixels (512-2048 works best).")


class LoraWeight(BaseModel):
    """One LoRA to apply."""

    model_config = _STRICT

    path: str = Field(
        min_length=1,
        max_length=2048,
        description=(
            "Where the LoRA weights are: an https URL of a .safetensors file, a Hugging Face repo id "
            "(owner/name), or the name of an entry in the user's LoRA library (see list_presets)."
        ),
    )
    scale: float = Field(
        1.0,
        ge=0,
        le=4,
        allow_inf_nan=False,
        description=(
            "How strongly the LoRA is applied (0-4). Start at 1.0; lower each scale when combining LoRAs."
        ),
    )


def _cns(description: str) -> str:
    return description + " Only used when enable_cns is true."


class EditRequest(BaseModel):
    """Every input of the endpoint, with its exact name, default and range."""

    model_config = _STRICT

    prompt: str = Field(
        min_length=1,
        max_length=10_000,
        description=(
            "What the edit should produce. If a LoRA was trained with a trigger word, include it "
            "(list_presets shows library LoRAs' trigger words); describe the scene around the subject normally."
        ),
    )
    image_urls: list[str] = Field(
        min_length=1,
        max_length=4,
        description=(
            "1-4 input images. Each item is an https URL, a data URI (data:image/png;base64,...), "
            "a local file path inside the allowed input folders, or flux://images/<id> of an earlier "
            "result (to chain edits without re-uploading)."
        ),
    )
    negative_prompt: str = Field(
        "",
        max_length=10_000,
        description="What the model should avoid (negative prompt for classifier-free guidance).",
    )
    guidance_scale: float = Field(
        5.0,
        ge=0,
        le=20,
        allow_inf_nan=False,
        description=(
            "How strictly the result follows the prompt (CFG). Stay near 5 and move in steps of 0.5: "
            "too high looks stiff and oversaturated, too low wanders."
        ),
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description=(
            "Random seed. The same seed with the same inputs gives a nearly identical image; fix it "
            "when comparing LoRA scales or parameters. Omit for a random seed (reported in the result). "
            "With num_images, image i uses seed + i modulo 2^32."
        ),
    )
    num_inference_steps: int = Field(
        28,
        ge=4,
        le=50,
        description="Denoising steps. More steps refine more but take longer; halving them is the quickest speed-up.",
    )
    image_size: ImageSizePreset | ImageSize | None = Field(
        None,
        description=(
            "Output size: a preset name (square_hd 1024x1024, square 512x512, portrait_4_3 768x1024, "
            "portrait_16_9 576x1024, landscape_4_3 1024x768, landscape_16_9 1024x576) or "
            '{"width": W, "height": H}. Omit to keep the size of the first input image.'
        ),
    )
    num_images: int = Field(
        1,
        ge=1,
        le=4,
        description=(
            "How many images to generate in this call (1-4); image i uses seed + i, wrapped modulo 2^32 "
            "(after 4294967295 comes 0), so every reported seed can be passed back."
        ),
    )
    acceleration: Literal["none", "regular", "high"] = Field(
        "regular",
        description="Speed/quality trade of the backend: 'regular' balances; 'high' for drafts and iteration; 'none' for best quality.",
    )
    sync_mode: bool = Field(
        False,
        description="Return the result inline as a data URI and do not store it on fal's CDN (privacy). Results are still saved locally.",
    )
    enable_safety_checker: bool = Field(True, description="Run a safety filter on the outputs.")
    output_format: Literal["jpeg", "png", "webp"] = Field(
        "png", description="File format of the result images."
    )
    enable_cns: bool = Field(
        False,
        description=(
            "Enable Colored Noise Sampling, an experimental stochastic sampler; the cns_* fields only "
            "matter when this is on. Leave off unless deliberately experimenting."
        ),
    )
    cns_s_churn: float = Field(
        0.5,
        ge=0,
        le=2,
        allow_inf_nan=False,
        description=_cns(
            "Strength of the coloured noise injected after each step; 0 = deterministic (identical to "
            "plain sampling). Tune this first."
        ),
    )
    cns_gamma_source: Literal["matrix", "approximation"] = Field(
        "matrix",
        description=_cns(
            "Where per-frequency progress gamma(f,t) comes from: 'matrix' (measured per band; noise goes to "
            "unresolved bands) or 'approximation' (uniform across bands; shaping comes only from the alpha tilt)."
        ),
    )
    cns_power_gamma: float = Field(
        0.75,
        ge=0.1,
        le=3,
        allow_inf_nan=False,
        description=_cns(
            "Exponent on (1 - gamma): higher concentrates noise on unresolved bands, lower is flatter. "
            "No effect under 'approximation'."
        ),
    )
    cns_gamma_divider: float = Field(
        1.73,
        ge=0.1,
        le=50,
        allow_inf_nan=False,
        description=_cns(
            "Divides gamma first, weakening the colouring towards white noise. Paper: 1.73 for "
            "unguided/distilled, 25 for CFG/base models like this one."
        ),
    )
    cns_alpha_tilt_start: float = Field(
        0.15,
        ge=-2,
        le=2,
        allow_inf_nan=False,
        description=_cns(
            "Frequency tilt at the start of sampling: >0 boosts high frequencies (texture, detail), <0 low (structure)."
        ),
    )
    cns_alpha_tilt_end: float = Field(
        -0.5,
        ge=-2,
        le=2,
        allow_inf_nan=False,
        description=_cns(
            "Frequency tilt at the end of sampling: >0 boosts high frequencies, <0 low. The default favours structure."
        ),
    )
    cns_alpha_use_fnorm: bool = Field(
        True,
        description=_cns("Use a smooth frequency-weighted tilt exp(alpha*f) instead of a flat (1 + alpha)."),
    )
    cns_alpha_exp_interp: bool = Field(
        True, description=_cns("Interpolate the tilt start->end exponentially instead of linearly.")
    )
    cns_alpha_exp_sharpness: float = Field(
        0.75,
        ge=0.1,
        le=10,
        allow_inf_nan=False,
        description=_cns("Sharpness of the exponential tilt interpolation (only with cns_alpha_exp_interp)."),
    )
    cns_num_freq_bins: int = Field(
        32,
        ge=8,
        le=128,
        description=_cns("How many radial frequency bands the spectrum is split into."),
    )
    cns_energy_scale: float = Field(
        0.98,
        ge=0.5,
        le=1.5,
        allow_inf_nan=False,
        description=_cns(
            "Multiplier on the injected noise after variance normalisation (paper: 0.98 unguided, 0.998 guided)."
        ),
    )
    loras: list[LoraWeight] = Field(
        [],  # pydantic copies mutable defaults per instance; a literal keeps "default": [] in the schema
        max_length=3,
        description=(
            "Up to 3 LoRAs, each {path, scale}. Order does not matter, scales do; stacking strong LoRAs "
            "degrades them, so lower each scale when combining."
        ),
    )

    def payload(self) -> dict[str, Any]:
        """The JSON body for the endpoint: every field, with None (no seed, no size) left out."""
        return self.model_dump(mode="json", exclude_none=True)


def wrap_seed(seed: int) -> int:
    """A derived seed brought back into 0..MAX_SEED (modulo 2^32), so it is a valid input again."""
    return seed % (MAX_SEED + 1)


def image_seeds(seed: int, count: int) -> list[int]:
    """The seeds of a call's ``count`` images: image i uses (seed + i) mod 2^32."""
    return [wrap_seed(seed + index) for index in range(count)]


def output_size(request: EditRequest, first_input: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (width, height) the request asks for; the first input's size when image_size is unset."""
    size = request.image_size
    if size is None:
        return first_input
    if isinstance(size, str):
        return IMAGE_SIZE_PRESETS[size]
    return (size.width, size.height)


_PRESET_FIELD = (
    str | None,
    Field(
        None,
        max_length=200,
        description=(
            "Name of a preset from list_presets. It fills only the arguments you do not give; "
            "your explicit arguments always win."
        ),
    ),
)


def _derived(name: str, doc: str, *, drop: tuple[str, ...] = (), **extra: Any) -> type[BaseModel]:
    """A model with EditRequest's fields (minus ``drop``) plus ``extra``: derived, never restated."""
    fields: dict[str, Any] = {
        field_name: (info.annotation, info)
        for field_name, info in EditRequest.model_fields.items()
        if field_name not in drop
    }
    fields.update(extra)
    return create_model(name, __config__=_STRICT, __doc__=doc, **fields)


#: Arguments of the edit_image tool: the endpoint's inputs plus ``preset``.
EditImageArgs = _derived(
    "EditImageArgs", "Arguments of edit_image: every endpoint input plus a preset.", preset=_PRESET_FIELD
)


class VaryAxis(BaseModel):
    """One axis of a compare_seeds grid: a request field and the values it takes."""

    model_config = _STRICT

    field: str = Field(max_length=40, description="e.g. guidance_scale, loras.0.scale, prompt")
    values: list[Any] = Field(min_length=2, max_length=8)


_CompareSeedsBase = _derived(
    "CompareSeedsBase",
    "Arguments of compare_seeds: edit_image's minus seed and num_images, plus seeds or count.",
    drop=("seed", "num_images"),
    preset=_PRESET_FIELD,
    seeds=(
        list[int] | None,
        Field(
            None,
            min_length=1,
            max_length=8,
            description="2-8 distinct seeds to compare (1 is enough with vary). Give either seeds or count, not both.",
            json_schema_extra={"items": {"type": "integer", "minimum": 0, "maximum": MAX_SEED}},
        ),
    ),
    count=(
        int | None,
        Field(
            None,
            ge=1,
            le=8,
            description="How many random seeds to compare (2-8, or 1+ with vary; reported). Give either seeds or count.",
        ),
    ),
    vary=(
        list[VaryAxis] | None,
        Field(
            None,
            min_length=1,
            max_length=2,
            description=(
                "Grid: 1-2 axes {field, values (2-8)}, all at one seed unless seeds/count give more (a shared random "
                "seed if neither). field: a numeric/enum/boolean argument (guidance_scale, num_inference_steps, "
                "acceleration, cns_s_churn...), loras.N.scale or prompt. Cells are capped (16 by default)."
            ),
        ),
    ),
)


class CompareSeedsArgs(_CompareSeedsBase):  # type: ignore[misc,valid-type]
    @model_validator(mode="after")
    def _seeds_or_count(self) -> CompareSeedsArgs:
        if self.seeds is not None and self.count is not None:
            raise ValueError("give either 'seeds' or 'count', not both")
        if self.vary is None:
            if self.seeds is None and self.count is None:
                raise ValueError(
                    "give 'seeds' (2-8 distinct integers) or 'count' (2-8), or 'vary' for a grid"
                )
            if len(self.seeds or [0, 0]) < 2 or (self.count or 2) < 2:
                raise ValueError("compare at least 2 seeds, or give 'vary' to compare parameters at one seed")
        if self.seeds is not None:
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError("'seeds' must be distinct integers")
            if any(s < 0 or s > MAX_SEED for s in self.seeds):
                raise ValueError(f"every seed in 'seeds' must be between 0 and {MAX_SEED}")
        return self


def tool_input_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON Schema with every ``$ref`` inlined (several hosts do not follow $defs)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                target = inline(defs[ref.split("/")[-1]])
                return {**target, **{k: inline(v) for k, v in node.items() if k != "$ref"}}
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


# ---------------------------------------------------------------------------------------------
# The endpoint's output


class ImageFile(BaseModel):
    """One image of the endpoint's output."""

    url: str
    width: int | None = None
    height: int | None = None
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = None


class EditResult(BaseModel):
    """The endpoint's output JSON."""

    images: list[ImageFile]
    seed: int
    has_nsfw_concepts: list[bool] = Field(default_factory=list)
    prompt: str = ""
    timings: dict[str, float] = Field(default_factory=dict)

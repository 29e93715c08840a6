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

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

__all__ = [
    "CNS_DESCRIPTION",
    "CNS_GROUP",
    "CNS_PREFIX",
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
    "cns_guide",
    "host_schema",
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
#: The endpoint's CNS knobs are ``cns_<name>``; the tools advertise them as one ``cns`` object.
CNS_PREFIX = "cns_"
CNS_GROUP = "cns"


class ImageSize(BaseModel):
    """A custom output size in pixels."""

    model_config = _STRICT

    width: int = Field(512, gt=0, le=MAX_SIDE, description="Pixels.")
    height: int = Field(512, gt=0, le=MAX_SIDE, description="Pixels.")


class LoraWeight(BaseModel):
    """One LoRA to apply."""

    model_config = _STRICT

    path: str = Field(
        min_length=1,
        max_length=2048,
        description=(
            "https URL of a .safetensors file, Hugging Face repo id (owner/name), or a LoRA library name "
            "(list_presets)."
        ),
    )
    scale: float = Field(
        1.0,
        ge=0,
        le=4,
        allow_inf_nan=False,
        description=("Strength; start at 1, lower each when combining LoRAs."),
    )


class EditRequest(BaseModel):
    """Every input of the endpoint, with its exact name, default and range."""

    model_config = _STRICT

    prompt: str = Field(
        min_length=1,
        max_length=10_000,
        description=(
            "What the edit should produce. Include the LoRA's trigger word, if it has one (list_presets)."
        ),
    )
    image_urls: list[str] = Field(
        min_length=1,
        max_length=4,
        description=(
            "Input images: https URL, data URI, local file path (images attached in a chat do not reach "
            "the server), or flux://images/<id> of an earlier result."
        ),
    )
    negative_prompt: str = Field(
        "",
        max_length=10_000,
        description="What to avoid.",
    )
    guidance_scale: float = Field(
        5.0,
        ge=0,
        le=20,
        allow_inf_nan=False,
        description=(
            "How strictly to follow the prompt (CFG); stay near 5, steps of 0.5: higher looks stiff, lower wanders."
        ),
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Same seed + inputs = nearly the same image; omit for a random one (reported).",
    )
    num_inference_steps: int = Field(
        28,
        ge=4,
        le=50,
        description="Denoising steps: more refine more, fewer are faster.",
    )
    image_size: ImageSizePreset | ImageSize | None = Field(
        None,
        description=(
            "A size name (list_presets) or {width, height} (512-2048 px work best); omit to keep the first "
            "input's size."
        ),
    )
    num_images: int = Field(1, ge=1, le=4, description="Image i uses seed + i (mod 2^32).")
    acceleration: Literal["none", "regular", "high"] = Field(
        "regular",
        description="'high' for drafts, 'none' for best quality.",
    )
    sync_mode: bool = Field(
        False,
        description="Don't store results on fal's CDN (privacy); still saved locally.",
    )
    enable_safety_checker: bool = Field(True, description="Filter unsafe outputs.")
    output_format: Literal["jpeg", "png", "webp"] = Field("png", description="Result file format.")
    enable_cns: bool = Field(
        False,
        description=(
            "Colored Noise Sampling, an experimental sampler (settings: cns). Leave off unless experimenting."
        ),
    )
    cns_s_churn: float = Field(
        0.5,
        ge=0,
        le=2,
        allow_inf_nan=False,
        description=(
            "Noise strength; tune first. The coloured noise injected after each step; 0 = deterministic "
            "(identical to plain sampling)."
        ),
    )
    cns_gamma_source: Literal["matrix", "approximation"] = Field(
        "matrix",
        description=(
            "Source of per-band progress gamma. 'matrix': measured per band, noise goes to unresolved "
            "bands; 'approximation': uniform across bands, shaping comes only from the alpha tilt."
        ),
    )
    cns_power_gamma: float = Field(
        0.75,
        ge=0.1,
        le=3,
        allow_inf_nan=False,
        description=(
            "Exponent on (1 - gamma). Higher concentrates noise on unresolved bands, lower is flatter; "
            "no effect under 'approximation'."
        ),
    )
    cns_gamma_divider: float = Field(
        1.73,
        ge=0.1,
        le=50,
        allow_inf_nan=False,
        description=(
            "Divides gamma; 25 suits this CFG model. Larger weakens the colouring towards white noise; the "
            "paper uses 1.73 for unguided/distilled models."
        ),
    )
    cns_alpha_tilt_start: float = Field(
        0.15,
        ge=-2,
        le=2,
        allow_inf_nan=False,
        description=(
            "Start tilt: >0 detail, <0 structure. The frequency tilt at the start of sampling: >0 boosts high "
            "frequencies (texture, detail), <0 low ones (structure)."
        ),
    )
    cns_alpha_tilt_end: float = Field(
        -0.5,
        ge=-2,
        le=2,
        allow_inf_nan=False,
        description=(
            "End tilt: >0 detail, <0 structure. The frequency tilt at the end of sampling; the default favours "
            "structure."
        ),
    )
    cns_alpha_use_fnorm: bool = Field(
        True,
        description="Smooth tilt exp(alpha*f). Instead of a flat (1 + alpha).",
    )
    cns_alpha_exp_interp: bool = Field(True, description="Exponential tilt start->end. Linear when false.")
    cns_alpha_exp_sharpness: float = Field(
        0.75,
        ge=0.1,
        le=10,
        allow_inf_nan=False,
        description="Sharpness of the exponential tilt. Only with alpha_exp_interp.",
    )
    cns_num_freq_bins: int = Field(
        32,
        ge=8,
        le=128,
        description="Radial frequency bands. How many the spectrum is split into.",
    )
    cns_energy_scale: float = Field(
        0.98,
        ge=0.5,
        le=1.5,
        allow_inf_nan=False,
        description=(
            "Noise multiplier; 0.998 when guided. Applied after variance normalisation (paper: 0.98 "
            "unguided, 0.998 guided)."
        ),
    )
    loras: list[LoraWeight] = Field(
        [],  # pydantic copies mutable defaults per instance; a literal keeps "default": [] in the schema
        max_length=3,
        description=("Edit LoRAs to apply; stacking strong ones degrades them."),
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
            "A preset (list_presets). It fills the arguments you omit or send at their default; other "
            "values you give win."
        ),
    ),
)


def _derived(
    name: str,
    doc: str,
    *,
    drop: tuple[str, ...] = (),
    **extra: Any,
) -> type[BaseModel]:
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

    field: str = Field(max_length=40, description="e.g. guidance_scale, cns.s_churn, loras.0.scale, prompt")
    values: list[Any] = Field(min_length=2, max_length=8)


_CompareSeedsBase = _derived(
    "CompareSeedsBase",
    "Arguments of compare_seeds: edit_image's minus seed and num_images, plus seeds or count.",
    drop=("seed", "num_images"),
    preset=_PRESET_FIELD,
    seeds=(
        list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None,
        Field(
            None,
            min_length=1,
            max_length=8,
            description="2-8 distinct seeds (1 with vary). Give seeds or count.",
        ),
    ),
    count=(
        int | None,
        Field(
            None,
            ge=1,
            le=8,
            description="How many random seeds (2-8, 1 with vary).",
        ),
    ),
    vary=(
        list[VaryAxis] | None,
        Field(
            None,
            min_length=1,
            max_length=2,
            description=(
                "Grid axes: a numeric/enum/boolean argument, loras.N.scale or prompt, each with 2-8 values; "
                "one seed unless seeds/count give more. At most 16 cells by default."
            ),
        ),
    ),
)


class CompareSeedsArgs(_CompareSeedsBase):  # type: ignore[misc,valid-type]
    #: Hosts send every tool each turn: the arguments shared with edit_image are described there only.
    described_in: ClassVar[type[BaseModel]] = EditImageArgs

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
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError("'seeds' must be distinct integers")
        return self


def tool_input_schema(model: type[BaseModel], *, group: bool = True) -> dict[str, Any]:
    """A model's JSON Schema as hosts are given it: every ``$ref`` inlined (several hosts do not follow
    $defs), pydantic's ``title`` keys dropped (hosts send them to the model on every turn for nothing),
    and, with ``group``, the ``cns_*`` fields as one ``cns`` object (``cns.s_churn`` is ``cns_s_churn``)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                # The nested model's docstring is for readers of the code; the field says what it is for.
                target = {k: v for k, v in inline(defs[ref.split("/")[-1]]).items() if k != "description"}
                return {**target, **{k: inline(v) for k, v in node.items() if k != "$ref"}}
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    schema = host_schema(inline(schema))
    if group and "properties" in schema:
        schema["properties"] = _group_cns(schema["properties"])
    elsewhere = getattr(model, "described_in", None)
    if elsewhere is not None:
        shared = set(tool_input_schema(elsewhere, group=group)["properties"])
        for name in shared & set(schema["properties"]):
            schema["properties"][name] = _without(schema["properties"][name], "description")
    return schema


def host_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An input schema as hosts should get it: no ``title`` keys, no model docstring (the tool has its
    own description), and closed to unknown keys (strict function calling needs
    ``additionalProperties: false``, even on a tool without arguments)."""
    schema = _without(schema, "title")
    schema.pop("description", None)
    schema.setdefault("additionalProperties", False)
    return schema


def _without(node: Any, key: str, properties: bool = False) -> Any:
    """``node`` without ``key`` in any schema it holds (a *property* of that name, inside
    ``properties``, is kept)."""
    if isinstance(node, list):
        return [_without(v, key) for v in node]
    if not isinstance(node, dict):
        return node
    if properties:
        return {k: _without(v, key) for k, v in node.items()}
    return {k: _without(v, key, k == "properties") for k, v in node.items() if k != key}


def _briefly(prop: dict[str, Any]) -> dict[str, Any]:
    """A CNS knob with the first sentence of its description (the rest: list_presets' cns_guide)."""
    if "description" not in prop:
        return prop
    return {**prop, "description": prop["description"].split(". ")[0].rstrip(".") + "."}


def cns_guide() -> dict[str, str]:
    """Each CNS knob's full explanation, as the tools name it (``cns.s_churn``)."""
    return {
        CNS_GROUP + "." + name[len(CNS_PREFIX) :]: info.description or ""
        for name, info in EditRequest.model_fields.items()
        if name.startswith(CNS_PREFIX)
    }


#: The ``cns`` object's description: the condition the knobs share is said once.
CNS_DESCRIPTION = (
    "Colored Noise Sampling settings (endpoint: cns_<name>), used only when enable_cns is true; give the "
    "ones you change. Presets cns_guided/cns_detail set good values; list_presets explains each."
)


def _group_cns(properties: dict[str, Any]) -> dict[str, Any]:
    """The ``cns_*`` properties moved into one ``cns`` object, where the first of them stood."""
    knobs = {n[len(CNS_PREFIX) :]: _briefly(p) for n, p in properties.items() if n.startswith(CNS_PREFIX)}
    grouped: dict[str, Any] = {}
    for name, prop in properties.items():
        if not name.startswith(CNS_PREFIX):
            grouped[name] = prop
        elif CNS_GROUP not in grouped:
            grouped[CNS_GROUP] = {
                "type": "object",
                "description": CNS_DESCRIPTION,
                "properties": knobs,
                "additionalProperties": False,
            }
    return grouped


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

"""The local backend: FLUX.2 [klein] 9B Base on this machine's GPU through diffusers' Flux2KleinPipeline.

The model (FLUX_MCP_MODEL: a Hugging Face id or a local directory) is loaded once, lazily, on the first
edit, in a worker thread while progress messages say so, and kept. One GPU job runs at a time; waiting
callers hear their place in the queue. An edit, step by step (``LocalBackend._run``):

1. check the request: refuse what cannot be honoured (naming the field), note what has no effect here;
2. fetch and decode the inputs and fetch the LoRA files, before taking the GPU, so that no download
   holds up another job;
3. wait for the GPU; load the model (first edit only);
4. LoRA adapters: load what is new, activate exactly this request's (``loras.AdapterCache``);
5. encode the prompt and the negative prompt once, for one image (the pipeline repeats embeddings);
6. denoise: one batched pass with one CPU ``torch.Generator`` per image (image i = a single run with
   its seed), a progress message per step;
7. encode the outputs (png/jpeg/webp) off the event loop.

Steps 4-6 run in one worker thread (``_Engine.run``) that reports progress to the loop. When the
awaiting task is cancelled, a flag is set that the pipeline's step callback turns into an exception,
so the run ends after the current step; the task waits for the thread (the next job needs the GPU
free) and re-raises. The queue and thread plumbing is in ``_worker``.

Fields that are not plain pipeline arguments:

- ``negative_prompt``: ``pipe.encode_prompt`` → ``negative_prompt_embeds``; it only acts with true CFG
  (``guidance_scale > 1``), and a note says so otherwise.
- ``image_size``: rounded to multiples of 2 x the VAE scale factor (16 for the real model); unset = the
  first input's size fitted to 1 MP, as the pipeline fits inputs. A note gives any change.
- ``acceleration`` (checked against diffusers 0.42.1):
  ``none`` = eager PyTorch;
  ``regular`` = ``transformer.compile_repeated_blocks(fullgraph=True)`` once, on the first such run
  (exact), with FLUX_MCP_COMPILE_BACKEND (auto = inductor on CUDA; on the CPU, and with sequential
  offload, it runs eager and a note says so). Past dynamo's recompile limit new LoRA sets would
  fail, so only the first few configurations compile and later ones run eager (``compiling``); a
  compiler error fails that run only (``JobFailed``) and resets the compiled code;
  ``high`` = diffusers' TaylorSeer cache (attention outputs computed every few steps and extrapolated
  in between: approximate, for drafts) on eager blocks. Not FirstBlockCache: in 0.42.1 it fails on
  FLUX.2 (its tail hook subtracts the double block's tuple output from the single block's tensor).
  Eager, because diffusers' cache hooks are ``torch.compiler.disable``d and break a fullgraph compile.
  The cache decides per batch, so under ``high`` a batched image can differ slightly from a single run.
- ``enable_safety_checker``: with FLUX_MCP_SAFETY_MODEL set, ``safety.SafetyClassifier`` (loaded with
  the model) scores the decoded outputs; like fal's checker, a flagged image is replaced by a black one,
  ``nsfw`` is True and a note says so (``nsfw`` False otherwise). Unset: no check, a note says so and
  ``nsfw`` stays None. With the flag off nothing is checked and ``nsfw`` is None.
- ``sync_mode``: nothing is uploaded anywhere locally; a note says the flag has no effect.
- ``enable_cns`` + ``cns_*``: ``cns.ColoredNoiseScheduler`` is swapped in and configured for the run
  (the plain scheduler otherwise) with this model's calibrated gamma matrix from the user cache dir
  (re-read when ``flux-mcp calibrate-cns`` replaced it; refused when its metadata names another
  model), or the analytic stand-in; ``details["cns"]`` says which, and why a file was not used.

torch is imported here; diffusers, transformers and ``cns`` only when the model loads. This
module knows nothing about MCP, presets or the result store.
"""

from __future__ import annotations

import contextlib
import gc
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
import torch
from PIL import Image

from .. import media, netguard
from ..config import Settings
from ..errors import BackendUnavailable, InputImageError, InvalidRequest, JobFailed
from ..imagecheck import check_image_bytes, max_input_pixels
from ..limits import check_local_work
from ..schema import MAX_SEED, EditRequest, image_seeds, output_size
from ._worker import GpuQueue, finish_in_thread, notifier, quiet, with_heartbeat
from .compiling import COMPILER_ERRORS, CompiledBlocks, compile_backend
from .loras import AdapterCache, LoraFile, LoraFiles
from .protocol import (
    BackendResult,
    CostEstimate,
    GeneratedImage,
    InputImage,
    Progress,
    RunContext,
    RunOutcome,
    hosted_price,
)
from .safety import SafetyClassifier, blacked_out

__all__ = ["ACCELERATION", "LORA_FORMATS", "LocalBackend"]

#: What each ``acceleration`` value does here (also shown by list_presets).
ACCELERATION = {
    "none": "eager PyTorch",
    "regular": "regional torch.compile of the transformer blocks (fullgraph; CUDA only, eager on CPU)",
    "high": "TaylorSeer cache (approximate; eager blocks)",
}
LORA_FORMATS = ["diffusers", "peft (fal)", "bfl (ai-toolkit)", "kohya"]

_MIB = 1024 * 1024
_MIN_SIDE = 64
_MAX_ASPECT = 8.0
#: The pipeline fits each input to this area; an unset image_size follows the first input, fitted alike.
_INPUT_AREA = 1024 * 1024
#: Above this output area the VAE decodes in tiles (its memory grows with the area).
_TILING_AREA = 1.5e6
#: TaylorSeer for ``high``: full steps first, then one full step every _TAYLOR_INTERVAL.
_TAYLOR_INTERVAL = 4
_HEARTBEAT_S = 10.0
_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_SAVE_AS: dict[str, tuple[str, dict[str, Any]]] = {
    "png": ("PNG", {}),
    "jpeg": ("JPEG", {"quality": 95}),
    "webp": ("WEBP", {"quality": 95}),
}


class LocalBackend:
    """Runs requests on this machine's GPU (or CPU) with diffusers; one job at a time."""

    name = "local"
    resumable = False
    cancels_promptly = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.endpoint = settings.model
        self._engine: _Engine | None = None
        self._gpu = GpuQueue(settings.max_queued_jobs)
        self._lora_files = LoraFiles(settings)

    def capabilities(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.settings.model,
            "device": _device_name(self.settings),
            "loaded": self._engine is not None,
            "offload": self.settings.offload,
            "max_concurrency": 1,
            "cns": True,
            "lora_formats": LORA_FORMATS,
            "lora_sources": "local .safetensors file, http(s) URL of one, or Hugging Face repo id",
            "acceleration": ACCELERATION,
            "safety_checker": self.settings.safety_model or False,
        }

    def estimate_cost(self, runs: list[EditRequest], inputs: list[InputImage]) -> CostEstimate:
        return CostEstimate(hosted_price(runs, inputs), billed=False)

    async def run(
        self, runs: list[EditRequest], inputs: list[InputImage], ctx: RunContext
    ) -> list[RunOutcome]:
        """Runs that differ only in their seed share one batched pass (``_batches``), and the passes
        are ordered so that runs with the same LoRAs and acceleration follow each other: a LoRA scale
        sweep loads its adapter once, and the compile stance changes as rarely as possible.

        A pass that fails fails its runs only; a refused request (a LoRA that does not fit, a bad
        input) refuses the call.
        """
        batches = _batches(runs)
        grand_total = sum(batch.request.num_inference_steps for batch in batches)
        outcomes: list[RunOutcome | None] = [None] * len(runs)
        done = 0
        for number, batch in enumerate(batches, 1):
            label = f"pass {number}/{len(batches)}: " if len(batches) > 1 else ""
            progress = _shifted(ctx.progress, done, grand_total, label)
            try:
                result = await self._run(batch.request, inputs, batch.seeds, progress)
            except JobFailed as exc:
                for index in batch.indices:
                    outcomes[index] = exc
            else:
                for index, images in zip(batch.indices, batch.split(result.images), strict=True):
                    outcomes[index] = BackendResult(
                        images, images[0].seed, dict(result.timings), list(result.notes), dict(result.details)
                    )
            done += batch.request.num_inference_steps
        return [outcome for outcome in outcomes if outcome is not None]

    async def collect(
        self, remote: dict[int, str], runs: list[EditRequest], ctx: RunContext
    ) -> list[RunOutcome]:
        raise BackendUnavailable("the local backend cannot resume runs after a restart; run the call again")

    async def aclose(self) -> None:
        async with self._gpu.turn(quiet, 0, limited=False):
            engine, self._engine = self._engine, None
            if engine is not None:
                await anyio.to_thread.run_sync(engine.close)

    # -- one run --------------------------------------------------------------------------------

    async def _run(
        self, request: EditRequest, inputs: list[InputImage], seeds: list[int], progress: Progress
    ) -> BackendResult:
        """One batched pass: image i has seed ``seeds[i]``; the result's seed is ``seeds[0]``."""
        started = time.perf_counter()
        total = request.num_inference_steps
        timings: dict[str, float] = {}

        # 1. Check the request, the work it asks for and the room in the GPU queue
        notes = self._check(request, inputs)
        check_local_work(request, inputs[0].size, len(seeds), self.settings)
        self._gpu.check_room()

        # 2. Inputs and LoRA files (network and disk; the GPU is not held yet). Inputs stay encoded
        # while the job waits: decoded, a 64 MP input would hold ~200 MB per queued job.
        await progress(0, total, "reading the input images")
        encoded_inputs = await self._fetch_inputs(inputs)
        loras = [
            (await self._lora_files.resolve(i, lora.path), lora.scale) for i, lora in enumerate(request.loras)
        ]
        timings["prepare"] = time.perf_counter() - started

        # 3. The GPU, and the model (loaded on the first edit)
        waited = time.perf_counter()
        async with self._gpu.turn(progress, total):
            timings["queue"] = time.perf_counter() - waited
            references = await anyio.to_thread.run_sync(_decode_all, encoded_inputs, self.settings)
            engine = await self._loaded_engine(progress, total, timings)
            width, height, size_note = _output_size(request, references[0].size, engine.multiple)
            notes += [size_note] if size_note else []
            job = _Job(request, seeds, references, width, height, loras, notifier(progress, total))
            # 4.-6. LoRA adapters, prompt embeddings, denoising (and the safety check): one worker thread
            ran = time.perf_counter()
            images, nsfw, details = await finish_in_thread(engine.run, job, cancelled=job.cancelled)
            timings["inference"] = time.perf_counter() - ran

        # 7. Encode the outputs
        await progress(total, total, "encoding the output images")
        encoded = await anyio.to_thread.run_sync(_encode_all, images, request.output_format)
        content_type = _CONTENT_TYPES[request.output_format]
        generated = [
            GeneratedImage(data, content_type, image.width, image.height, seed, flagged)
            for data, image, seed, flagged in zip(encoded, images, seeds, nsfw, strict=True)
        ]
        timings["total"] = time.perf_counter() - started
        return BackendResult(generated, seeds[0], timings, notes + details.pop("notes"), details)

    def _check(self, request: EditRequest, inputs: list[InputImage]) -> list[str]:
        """Refuse what cannot run; return notes for fields that have no effect here."""
        if not 1 <= len(inputs) <= 4:
            raise InvalidRequest("image_urls: give 1 to 4 input images.", field="image_urls")
        cuda = _device_name(self.settings).startswith("cuda")
        compiles = compile_backend(self.settings, cuda) is not None
        regular = request.acceleration == "regular"
        candidates = [
            (request.negative_prompt and request.guidance_scale <= 1,
             "negative_prompt had no effect: it only acts with guidance_scale above 1 (true CFG)."),
            (request.enable_safety_checker and not self.settings.safety_model,
             "no safety check ran on the local backend (no classifier is configured: set "
             "FLUX_MCP_SAFETY_MODEL); nsfw is unknown."),
            (request.sync_mode, "sync_mode has no effect on the local backend: nothing is uploaded anywhere."),
            (regular and not compiles,
             "acceleration 'regular' ran eager: torch.compile is used on CUDA only (FLUX_MCP_COMPILE_BACKEND)."),
            (regular and compiles and self.settings.offload == "sequential",
             "acceleration 'regular' ran eager: torch.compile is not used with sequential offload."),
            (request.acceleration == "high",
             "acceleration 'high' used diffusers' TaylorSeer cache (approximate, for drafts); "
             "use 'regular' or 'none' for final images."),
        ]  # fmt: skip
        return [note for applies, note in candidates if applies]

    async def _fetch_inputs(self, inputs: list[InputImage]) -> list[bytes]:
        """Each input's checked, still encoded bytes (URLs fetched through netguard)."""
        images = []
        for index, item in enumerate(inputs):
            field_name = f"image_urls.{index}"
            data = item.data
            if data is None:
                if not item.url:
                    raise InputImageError(
                        f"{field_name}: the input holds neither bytes nor a URL.", field=field_name
                    )
                data, _ = await netguard.fetch_url(
                    item.url,
                    allow_private=self.settings.allow_private_urls,
                    max_bytes=int(self.settings.max_input_mb * _MIB),
                    timeout_s=self.settings.download_timeout_s,
                    what="input image",
                    size_setting="FLUX_MCP_MAX_INPUT_MB",
                    field=field_name,
                )
                data, _, width, height = await anyio.to_thread.run_sync(
                    check_image_bytes, data, "the downloaded image", field_name, self.settings
                )
                item = InputImage(source=item.source, data=data, width=width, height=height)
            if item.size is not None:
                _check_reference_size(*item.size, field_name)
            images.append(data)
        return images

    async def _loaded_engine(self, progress: Progress, total: int, timings: dict[str, float]) -> _Engine:
        """The engine, loading the model first if needed (the caller holds the GPU turn)."""
        if self._engine is not None:
            return self._engine
        started = time.perf_counter()
        message = f"loading model {self.settings.model} (first edit only; this can take minutes)"
        self._engine = await with_heartbeat(
            _Engine.load, self.settings, progress=progress, total=total, message=message, every_s=_HEARTBEAT_S
        )
        timings["load_model"] = time.perf_counter() - started
        return self._engine


# ---------------------------------------------------------------------------------------------
# The GPU side: everything here runs in a worker thread


@dataclass
class _Job:
    """What one GPU run needs, prepared on the event loop."""

    request: EditRequest
    seeds: list[int]
    references: list[Image.Image]
    width: int
    height: int
    loras: list[tuple[LoraFile, float]]
    notify: Callable[[float, str], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Interrupted(Exception):
    """Raised by the step callback when the awaiting task was cancelled."""


class _Engine:
    """The loaded pipeline and the state that lives with it; one worker thread at a time."""

    def __init__(
        self, pipe: Any, device: torch.device, settings: Settings, safety: SafetyClassifier | None
    ) -> None:
        self.pipe = pipe
        self.device = device
        self.settings = settings
        #: The safety classifier (FLUX_MCP_SAFETY_MODEL), None when none is configured.
        self.safety = safety
        #: Output sides must be multiples of this (VAE downsampling x 2x2 latent patches).
        self.multiple = pipe.vae_scale_factor * 2
        self.plain_scheduler = pipe.scheduler
        self.cns_scheduler: Any = None
        #: The calibrated CNS gamma matrix of this model, re-read when its file changes (``cns.GammaCache``).
        self.gamma_cache: Any = None
        self.adapters = AdapterCache(max_bytes=int(settings.max_adapter_mb * _MIB))
        sequential = settings.offload == "sequential"
        self.compiler = CompiledBlocks(
            None if sequential else compile_backend(settings, device.type == "cuda")
        )

    @classmethod
    def load(cls, settings: Settings) -> _Engine:
        device = _device(settings)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if settings.offload != "none" and device.type != "cuda":
            raise BackendUnavailable(
                f"FLUX_MCP_OFFLOAD={settings.offload} needs a CUDA device, and this backend runs on {device}; unset it."
            )
        # The small classifier first: a broken one fails before minutes of loading the pipeline.
        safety = SafetyClassifier.load(settings, device) if settings.safety_model else None
        from diffusers import Flux2KleinPipeline

        source = Path(settings.model).expanduser()
        try:
            pipe = Flux2KleinPipeline.from_pretrained(
                str(source) if source.is_dir() else settings.model, dtype=dtype
            )
            pipe.set_progress_bar_config(disable=True)
            if settings.offload == "model":
                pipe.enable_model_cpu_offload(device=device)
            elif settings.offload == "sequential":
                pipe.enable_sequential_cpu_offload(device=device)
            else:
                pipe.to(device)
        except torch.OutOfMemoryError as exc:
            raise BackendUnavailable(
                f"the model does not fit into {device}'s memory; set FLUX_MCP_OFFLOAD=model "
                "(or sequential, slowest) to keep parts of it in CPU memory."
            ) from exc
        except (OSError, ValueError, RuntimeError, TypeError, KeyError, ImportError) as exc:
            raise BackendUnavailable(_load_advice(settings.model, exc)) from exc
        return cls(pipe, device, settings, safety)

    def run(self, job: _Job) -> tuple[list[Image.Image], list[bool | None], dict[str, Any]]:
        """Steps 4-6 of an edit; returns the images, their NSFW flags and the details for the result."""
        request = job.request
        pipe = self.pipe
        notes: list[str] = []
        try:
            # 4. LoRA adapters
            loads_before = self.adapters.loads
            applied = self.adapters.activate(pipe, job.loras, lambda message: job.notify(0, message))
            notes += self.adapters.notes(job.loras)
            # 5. Prompt embeddings, for one image: the pipeline repeats them per image
            job.notify(0, "encoding the prompt")
            prompt_embeds, negative_embeds = self._encode_prompts(request)
            if request.guidance_scale > 1 and pipe.config.is_distilled:
                notes.append("this model is step-distilled: guidance_scale and negative_prompt were ignored.")
            # 6. Denoise
            cns_info = self._set_sampler(job)
            if job.width * job.height > _TILING_AREA:
                pipe.vae.enable_tiling()
            else:
                pipe.vae.disable_tiling()
            config = (
                tuple((a["adapter"], a["scale"]) for a in applied),
                len(job.seeds),
                job.width,
                job.height,
            )
            with self._acceleration(job, (*config, negative_embeds is not None), notes):
                images = pipe(
                    image=job.references,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_embeds,
                    height=job.height,
                    width=job.width,
                    num_inference_steps=request.num_inference_steps,
                    guidance_scale=request.guidance_scale,
                    num_images_per_prompt=len(job.seeds),
                    generator=[torch.Generator("cpu").manual_seed(seed) for seed in job.seeds],
                    callback_on_step_end=_step_callback(job),
                ).images
            if cns_info is not None:
                cns_info.update(self.cns_scheduler.cns_info())
            images, nsfw = self._safety_check(job, images, notes)
        except _Interrupted:
            pipe.maybe_free_model_hooks()  # offload hooks and cache state as after a finished call
            # Seen only if the flag was set yet no cancellation reached the awaiting task (else that wins).
            raise JobFailed("the local run was interrupted") from None
        except COMPILER_ERRORS as exc:
            self.compiler.reset()
            raise JobFailed(
                f"torch.compile failed in acceleration {request.acceleration!r} ({type(exc).__name__}); the "
                "compiled code was reset, so the next run compiles afresh. Use acceleration 'none' if it recurs."
            ) from exc
        except torch.OutOfMemoryError as exc:
            self._free_memory()
            raise JobFailed(
                f"out of GPU memory at {job.width}x{job.height} with {len(job.seeds)} image(s); lower image_size "
                "or num_images, or set FLUX_MCP_OFFLOAD=model."
            ) from exc
        except RuntimeError as exc:
            raise JobFailed(f"the local pipeline failed: {exc}") from exc
        finally:
            pipe.scheduler = self.plain_scheduler
        details: dict[str, Any] = {
            "device": str(self.device),
            "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
            "width": job.width,
            "height": job.height,
            "acceleration": request.acceleration,
            "loras": applied,
            "lora_loads": self.adapters.loads - loads_before,
            "notes": notes,
        }
        if cns_info is not None:
            details["cns"] = cns_info
        if nsfw[0] is not None:
            details["safety_model"] = self.settings.safety_model
        return images, nsfw, details

    @torch.no_grad()
    def _encode_prompts(self, request: EditRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's embeddings and, with true CFG, the negative prompt's; for one image each.

        Without grad: ``encode_prompt`` is not decorated, and embeddings that kept the text encoder's
        autograd graph would hold it (gigabytes for Qwen3-8B) for the whole run.
        """
        pipe = self.pipe
        prompt_embeds, _ = pipe.encode_prompt(prompt=request.prompt, num_images_per_prompt=1)
        if request.guidance_scale <= 1 or pipe.config.is_distilled:
            return prompt_embeds, None
        return prompt_embeds, pipe.encode_prompt(request.negative_prompt, num_images_per_prompt=1)[0]

    def _safety_check(
        self, job: _Job, images: list[Image.Image], notes: list[str]
    ) -> tuple[list[Image.Image], list[bool | None]]:
        """Classify the outputs when asked and a classifier is set up; flagged images become black."""
        if not job.request.enable_safety_checker or self.safety is None:
            return images, [None] * len(images)
        job.notify(job.request.num_inference_steps, "running the safety checker")
        verdicts = self.safety.check(images)
        for index, (seed, verdict) in enumerate(zip(job.seeds, verdicts, strict=True)):
            if verdict.nsfw:
                notes.append(
                    f"image {index + 1} (seed {seed}) was flagged by the safety checker ({verdict.label}: "
                    f"{verdict.score:.2f} >= {self.safety.threshold:g}) and replaced by a black image, as "
                    "fal's checker does; set enable_safety_checker=false to keep such images."
                )
        checked = [blacked_out(image) if v.nsfw else image for image, v in zip(images, verdicts, strict=True)]
        flags: list[bool | None] = [verdict.nsfw for verdict in verdicts]
        return checked, flags

    def _set_sampler(self, job: _Job) -> dict[str, Any] | None:
        """Swap in the CNS scheduler configured for this run; returns a dict to fill with its info."""
        if not job.request.enable_cns:
            return None
        from . import cns

        if self.cns_scheduler is None:
            self.cns_scheduler = cns.ColoredNoiseScheduler.from_config(self.plain_scheduler.config)
        if self.gamma_cache is None:
            channels = self.pipe.transformer.config.in_channels
            self.gamma_cache = cns.GammaCache(self.settings.cache_dir, self.settings.model, channels)
        gamma, problem = self.gamma_cache.current()
        self.cns_scheduler.configure_cns(
            cns.CNSParams.from_request(job.request),
            cns.noise_generators(job.seeds, "cpu"),
            cns.token_grid(self.pipe, job.height, job.width),
            gamma.matrix if gamma else None,
            gamma.label if gamma else "analytic stand-in",
            gamma.sigmas if gamma else None,
        )
        self.pipe.scheduler = self.cns_scheduler
        return {"gamma_file_problem": f"{problem}; the analytic stand-in was used"} if problem else {}

    @contextlib.contextmanager
    def _acceleration(self, job: _Job, config: tuple[Any, ...], notes: list[str]) -> Iterator[None]:
        """The run's acceleration; ``config`` = what dynamo's guards see change between runs."""
        level = job.request.acceleration
        transformer = self.pipe.transformer
        with contextlib.ExitStack() as stack:
            message = "compiling the transformer blocks (first accelerated run only)"
            stack.enter_context(
                self.compiler.running(transformer, level, config, notes, lambda: job.notify(0, message))
            )
            if level == "high":
                from diffusers.hooks import TaylorSeerCacheConfig

                transformer.enable_cache(
                    TaylorSeerCacheConfig(
                        cache_interval=_TAYLOR_INTERVAL,
                        disable_cache_before_step=max(3, job.request.num_inference_steps // 5),
                        taylor_factors_dtype=transformer.dtype,
                    )
                )
                stack.callback(transformer.disable_cache)
            yield

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        self.adapters.clear()
        self.pipe = self.plain_scheduler = self.cns_scheduler = self.safety = None
        self._free_memory()


def _step_callback(job: _Job) -> Callable[..., dict[str, Any]]:
    total = job.request.num_inference_steps

    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        # Raising (rather than pipe._interrupt = True) also skips decoding the unfinished latents.
        if job.cancelled.is_set():
            raise _Interrupted
        job.notify(step + 1, f"step {step + 1}/{total}")
        return {}

    return on_step_end


# ---------------------------------------------------------------------------------------------
# Batching the runs of one call

#: Most images in one batched pass (compare_seeds' 8 seeds; a 16-cell seed grid makes two passes).
MAX_BATCH = 8


@dataclass
class _Batch:
    """Runs that differ only in their seed, run as one pass: ``request`` with ``seeds``."""

    request: EditRequest
    indices: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def add(self, index: int, run: EditRequest) -> None:
        first = run.seed if run.seed is not None else secrets.randbelow(MAX_SEED + 1)
        self.indices.append(index)
        self.counts.append(run.num_images)
        self.seeds += image_seeds(first, run.num_images)

    def split(self, images: list[GeneratedImage]) -> list[list[GeneratedImage]]:
        """The pass's images, back per run."""
        parts, start = [], 0
        for count in self.counts:
            parts.append(images[start : start + count])
            start += count
        return parts


def _batches(runs: list[EditRequest]) -> list[_Batch]:
    """Group runs that differ only in seed (at most ``MAX_BATCH`` images a pass), ordered to keep the
    same LoRA files and acceleration together: only scales change between neighbouring passes."""
    groups: dict[str, list[_Batch]] = {}
    for index, run in enumerate(runs):
        key = run.model_dump_json(exclude={"seed", "num_images"})
        batches = groups.setdefault(key, [])
        if not batches or len(batches[-1].seeds) + run.num_images > MAX_BATCH:
            batches.append(_Batch(run.model_copy(update={"seed": None, "num_images": 1})))
        batches[-1].add(index, run)

    def churn_order(batch: _Batch) -> tuple[Any, ...]:
        request = batch.request
        files = tuple(sorted(lora.path for lora in request.loras))
        return (files, request.acceleration, request.enable_cns, batch.indices[0])

    return sorted((b for batches in groups.values() for b in batches), key=churn_order)


def _shifted(progress: Progress, offset: float, total: float, label: str) -> Progress:
    """One pass's progress as part of the whole call's: shifted by the steps of the passes before."""

    async def report(done: float, _total: float | None, message: str) -> None:
        await progress(offset + done, total, label + message)

    return report


# ---------------------------------------------------------------------------------------------
# Small helpers


def load_pipeline(settings: Settings) -> Any:
    """The configured pipeline, loaded exactly as the backend loads it (for ``flux-mcp calibrate-cns``)."""
    return _Engine.load(settings).pipe


def _device_name(settings: Settings) -> str:
    return settings.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _device(settings: Settings) -> torch.device:
    try:
        device = torch.device(_device_name(settings))
    except RuntimeError as exc:
        raise BackendUnavailable(
            f"FLUX_MCP_DEVICE={settings.device!r} is not a torch device ({exc})."
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"FLUX_MCP_DEVICE={settings.device} but torch {torch.__version__} sees no CUDA device; "
            "install a CUDA build of torch or set FLUX_MCP_DEVICE=cpu (very slow for the real model)."
        )
    return device


def _load_advice(model: str, exc: BaseException) -> str:
    reason = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
    return (
        f"cannot load the model {model!r}: {reason}. FLUX_MCP_MODEL must be a local directory holding the "
        "Flux2KleinPipeline (model_index.json and its folders) or a Hugging Face id that is downloaded: "
        "accept the license on huggingface.co, then run `hf download black-forest-labs/FLUX.2-klein-base-9B` "
        "(about 35 GB), or point FLUX_MCP_MODEL at a local copy."
    )


def _output_size(request: EditRequest, first: tuple[int, int], multiple: int) -> tuple[int, int, str | None]:
    """(width, height) to generate, and a note when that is not what was asked."""
    width, height = output_size(request, first) or first
    if request.image_size is None and width * height > _INPUT_AREA:
        scale = math.sqrt(_INPUT_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    out_w, out_h = (max(multiple, round(side / multiple) * multiple) for side in (width, height))
    if request.image_size is None and (out_w, out_h) != first:
        note = f"the output follows the first input ({first[0]}x{first[1]}), fitted to at most 1 MP and to "
        note += f"multiples of {multiple} px: {out_w}x{out_h}."
    elif request.image_size is not None and (out_w, out_h) != (width, height):
        note = f"image_size {width}x{height} was rounded to {out_w}x{out_h} (multiples of {multiple} px)."
    else:
        note = None
    return out_w, out_h, note


def _decode_all(encoded: list[bytes], settings: Settings) -> list[Image.Image]:
    return [_decode_reference(data, f"image_urls.{i}", settings) for i, data in enumerate(encoded)]


def _decode_reference(data: bytes, field_name: str, settings: Settings) -> Image.Image:
    """An RGB image the pipeline accepts (each side >= 64 px, aspect at most 8:1)."""
    try:
        image = media.decode_rgb(data, max_input_pixels(settings))  # transparent areas become white
    except media.MediaError as exc:
        raise InputImageError(
            f"{field_name}: the image cannot be decoded ({exc}).", field=field_name
        ) from None
    _check_reference_size(*image.size, field_name)
    return image


def _check_reference_size(width: int, height: int, field_name: str) -> None:
    if min(width, height) < _MIN_SIDE or max(width, height) / min(width, height) > _MAX_ASPECT:
        raise InputImageError(
            f"{field_name}: the image is {width}x{height}; FLUX.2 [klein] needs each side to be at least "
            f"{_MIN_SIDE} px and an aspect ratio of at most 8:1.",
            field=field_name,
        )


def _encode_all(images: list[Image.Image], output_format: str) -> list[bytes]:
    pil_format, options = _SAVE_AS[output_format]
    return [media.encode(image, pil_format, **options) for image in images]

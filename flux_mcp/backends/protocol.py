"""The Backend protocol and the data that crosses it: input images, generated images, results, the run
context and the cost estimate.

Everything a backend module needs from its package lives here, so that backend modules import this
module and never the package (whose factory imports them): no import runs in a circle. It knows
nothing about MCP, presets or the result store, and nothing about any particular backend.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import FluxMCPError

if TYPE_CHECKING:
    from ..schema import EditRequest

__all__ = [
    "PRICE_PER_MEGAPIXEL_USD",
    "Backend",
    "BackendResult",
    "CostEstimate",
    "GeneratedImage",
    "InputImage",
    "Progress",
    "RunContext",
    "RunOutcome",
    "hosted_price",
    "run_one",
]


@dataclass(frozen=True)
class InputImage:
    """One resolved item of ``image_urls``.

    Either ``url`` is set (an http(s) URL the caller gave, passed to the backend unchanged), or
    ``data`` holds the bytes of an image the server read and checked itself (local file, data URI,
    earlier result), with its MIME type and pixel size.
    """

    source: str
    url: str | None = None
    data: bytes | None = None
    content_type: str | None = None
    width: int | None = None
    height: int | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        return (self.width, self.height) if self.width and self.height else None


@dataclass
class GeneratedImage:
    """One output image as bytes, with what is known about it."""

    data: bytes
    content_type: str
    width: int
    height: int
    seed: int
    nsfw: bool | None = None
    source_url: str | None = None


@dataclass
class BackendResult:
    """What one backend run produced."""

    images: list[GeneratedImage]
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    #: Caveats the agent should read, e.g. "sync_mode has no effect on the local backend".
    notes: list[str] = field(default_factory=list)
    #: Backend facts for the structured result and the sidecars (request id, CNS gamma used, ...).
    details: dict[str, Any] = field(default_factory=dict)


#: One entry of ``Backend.run``'s answer: that run's result, or why it failed.
RunOutcome = BackendResult | FluxMCPError


async def _never_submitted(index: int, remote_id: str) -> None:
    """The default ``RunContext.submitted``: nobody records remote jobs (the CLI, tests)."""


@dataclass(frozen=True)
class RunContext:
    """What a backend may tell, and ask, whoever runs a call (the job runner, the CLI).

    ``progress`` takes monotonic progress. ``submitted(index, remote_id)`` is awaited once per run
    right after a remote service accepted it (resumable backends only), so a restarted server can
    ``collect`` it. ``detached()`` is true while the server shuts down: remote work must then be left
    running (to be collected later) rather than cancelled.
    """

    progress: Progress
    submitted: Callable[[int, str], Awaitable[None]] = _never_submitted
    detached: Callable[[], bool] = field(default=lambda: False)


@dataclass(frozen=True)
class CostEstimate:
    """What a list of runs costs before anything is sent.

    ``usd`` is the hosted endpoint's price for the same work (shown to the agent either way);
    ``billed`` says whether this backend actually charges it (and so whether the cost ceiling applies).
    """

    usd: float
    billed: bool


class Progress(Protocol):
    """Progress callback: ``await progress(done, total, message)``; monotonic in ``done``."""

    async def __call__(self, progress: float, total: float | None, message: str) -> None: ...


class Backend(Protocol):
    """Something that runs edits. Small on purpose: the service does everything else.

    A call is a list of runs (one ``EditRequest`` each, with its seed set): edit_image is a list of
    one, compare_seeds and grids one per cell. The backend decides how to run the list (concurrently
    on fal, batched on a GPU) and answers one outcome per run, in order; a failed run does not fail
    the others. A third backend is one module implementing this, plus one line in ``create_backend``.
    """

    #: The backend's setting value (``FLUX_MCP_BACKEND``), e.g. "fal" or "local".
    name: str
    #: What ran the job: the fal endpoint id, or the local model id/directory.
    endpoint: str
    #: True when ``collect`` can finish runs submitted before a restart (``RunContext.submitted``).
    resumable: bool
    #: True when a cancelled run stops within a request's time (a hosted job: one cancel request); False
    #: when it stops only at its next step boundary (a GPU run): cancel_job then answers "cancelling".
    cancels_promptly: bool

    def capabilities(self) -> dict[str, Any]:
        """What this backend supports, for list_presets (e.g. {"cns": True, "max_concurrency": 4})."""
        ...

    def estimate_cost(self, runs: list[EditRequest], inputs: list[InputImage]) -> CostEstimate:
        """The price of ``runs`` on the hosted endpoint, and whether this backend charges it."""
        ...

    async def run(
        self, runs: list[EditRequest], inputs: list[InputImage], ctx: RunContext
    ) -> list[RunOutcome]:
        """Run every request (``num_images`` images each; image i has seed ``seed + i`` mod 2**32).

        Raises only for what refuses the whole call (a bad input, a LoRA that does not fit); one
        run's failure is that run's outcome.
        """
        ...

    async def collect(
        self, remote: dict[int, str], runs: list[EditRequest], ctx: RunContext
    ) -> list[RunOutcome]:
        """Finish runs a remote service accepted before a restart: ``remote`` maps run index to the id
        ``ctx.submitted`` recorded. Runs without an id fail. Only called when ``resumable``."""
        ...

    async def aclose(self) -> None:
        """Release connections, GPU memory and worker threads."""
        ...


async def run_one(
    backend: Backend, request: EditRequest, inputs: list[InputImage], ctx: RunContext
) -> BackendResult:
    """One request on ``backend``: its result, or its error raised."""
    (outcome,) = await backend.run([request], inputs, ctx)
    if isinstance(outcome, FluxMCPError):
        raise outcome
    return outcome


#: Published price of the hosted endpoint: inputs (counted at ~1 MP each) plus outputs.
PRICE_PER_MEGAPIXEL_USD = 0.02


def hosted_price(runs: list[EditRequest], inputs: list[InputImage]) -> float:
    """The hosted endpoint's price for ``runs``: $0.02 per megapixel of input (each input counted at
    ~1 MP, as the endpoint resizes them, once per run) plus every output image."""
    from ..schema import output_size

    first = inputs[0].size if inputs else None
    total_mp = 0.0
    for request in runs:
        size = output_size(request, first)
        out_mp = (size[0] * size[1] / 1e6) if size else 1.0
        total_mp += len(inputs) * 1.0 + request.num_images * out_mp
    return round(total_mp * PRICE_PER_MEGAPIXEL_USD, 4)

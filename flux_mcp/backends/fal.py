"""The hosted backend: runs an ``EditRequest`` on fal's ``fal-ai/flux-2/klein/9b/base/edit/lora``.

One ``fal_client.AsyncClient`` per backend (never fal-client's module-level functions): local inputs
are uploaded to fal's CDN (or inlined as data URIs), the job is submitted to the queue, its status
is polled (queue position and log lines become progress), the result JSON is fetched and every
output image is downloaded with a size limit. Every foreign failure (fal-client, httpx, PIL) is
converted here, once, into the error tree of ``flux_mcp.errors``; no message ever carries the key.

Each run of a call is its own fal job; a call's runs go concurrently. Jobs are bounded by
``job_timeout_s`` and cancelled on fal when they time out or when the awaiting task is cancelled,
unless the ``RunContext`` says the caller is detaching (server shutdown): then they are left running,
and their request ids (reported through ``RunContext.submitted``) let ``collect`` finish them after a
restart. A semaphore shared by the whole backend keeps at most ``fal_concurrency`` jobs in flight at
fal, across concurrent calls and runs alike (downloads from the CDN do not hold a slot).

This module knows nothing about MCP, presets or the result store, and never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any, TypeVar, cast

import anyio
import fal_client
import fal_client.client
import httpx
from pydantic import ValidationError

from .. import media
from ..config import Settings
from ..errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    FluxMCPError,
    InvalidRequest,
    JobFailed,
)
from ..redact import Redactor, public_url
from ..schema import ENDPOINT_ID, MAX_OUTPUT_PIXELS, EditRequest, EditResult, ImageFile, wrap_seed
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

__all__ = ["FalBackend"]

logger = logging.getLogger(__name__)

#: Status polling starts fast (short jobs finish quickly) and backs off to a gentle rate for long ones.
POLL_FIRST_S = 0.05
POLL_MAX_S = 0.5
#: Our own retries, on top of fal-client's (which only retries 408/409/429, transport errors and
#: nginx-looking 502-504): 4 attempts, sleeping 0.25, 0.5, 1 s (±25 %), so under 10 s in all
#: (15 s when every answer asks, by Retry-After, for the longest wait we grant).
ATTEMPTS = 4
BACKOFF_S = 0.25
#: A Retry-After header on an answer we retry replaces that schedule, up to this many seconds (a
#: server asking for an hour must not hold a tool call that long: we retry after 5 s instead).
MAX_RETRY_AFTER_S = 5.0
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
#: What fal-client already retries (10 times, up to ~30 s) inside its own calls: not again on top.
FAL_CLIENT_RETRIES = frozenset({408, 409, 429})
CANCEL_TIMEOUT_S = 5.0
#: Uploaded inputs remembered by content (see ``_UploadCache``).
UPLOAD_CACHE_SIZE = 256
UPLOAD_TTL_S = 3600.0
#: The status stream sends a keep-alive comment every 15 s; a silence of a minute means it is gone.
STREAM_TIMEOUT = httpx.Timeout(30.0, read=60.0)
RESULT_TIMEOUT = httpx.Timeout(120.0, connect=30.0)
MAX_DETAIL_CHARS = 500
_STEP = re.compile(r"(\d+)\s*/\s*(\d+)")

_T = TypeVar("_T")
#: A per-run progress report: (fraction of this run done, or None when unknown; message).
_Report = Callable[[float | None, str], Awaitable[None]]


class FalBackend:
    """Runs edits on fal's hosted endpoint through one ``fal_client.AsyncClient``."""

    name = "fal"
    endpoint = ENDPOINT_ID
    resumable = True
    cancels_promptly = True

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # fal-client's REST/CDN hosts are module globals, set at start by ``process.process_effects``.
        self._fal = fal_client.AsyncClient(key=settings.fal_key or None)
        # Trusts the environment like fal-client does (SSL_CERT_FILE), so both see the same CAs.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.download_timeout_s), follow_redirects=True
        )
        self._slots = anyio.Semaphore(settings.fal_concurrency)
        self._uploads = _UploadCache()
        self._redact = Redactor([settings.fal_key])
        self._input_pixels = int(settings.max_input_megapixels * 1_000_000)

    def capabilities(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "endpoint": self.endpoint,
            "cns": True,
            "max_images_per_call": 4,
            "max_concurrency": self._settings.fal_concurrency,
            "upload": self._settings.fal_upload,
        }

    async def aclose(self) -> None:
        await self._http.aclose()
        # fal-client has no close(); its lazily made httpx client lives in the instance dict.
        if "_client" in vars(self._fal):
            client = await self._fal._client
            await client.aclose()

    # ------------------------------------------------------------------------------ public runs

    def estimate_cost(self, runs: list[EditRequest], inputs: list[InputImage]) -> CostEstimate:
        return CostEstimate(hosted_price(runs, inputs), billed=True)

    async def run(
        self, runs: list[EditRequest], inputs: list[InputImage], ctx: RunContext
    ) -> list[RunOutcome]:
        """Every run as its own fal job, all at once within the backend's slots; inputs uploaded once."""
        self._require_key()
        for request in runs:
            _refuse_local_loras(request)
        started = time.monotonic()
        image_urls = await self._input_urls(inputs)
        upload_s = round(time.monotonic() - started, 3)
        outcomes = await self._each(
            runs,
            ctx,
            lambda index, report: self._run(runs[index], report, ctx, index=index, image_urls=image_urls),
        )
        for outcome in outcomes:
            if isinstance(outcome, BackendResult):
                outcome.timings["upload_s"] = upload_s
        return outcomes

    async def collect(
        self, remote: dict[int, str], runs: list[EditRequest], ctx: RunContext
    ) -> list[RunOutcome]:
        """Finish jobs fal already accepted (``runs`` are what was sent), e.g. after a restart."""
        self._require_key()

        async def one(index: int, report: _Report) -> BackendResult:
            if index not in remote:
                raise BackendError(
                    "this run was not submitted to fal before the server restarted; run it again"
                )
            return await self._run(runs[index], report, ctx, index=index, request_id=remote[index])

        return await self._each(runs, ctx, one)

    async def _each(
        self,
        runs: list[EditRequest],
        ctx: RunContext,
        one: Callable[[int, _Report], Awaitable[BackendResult]],
    ) -> list[RunOutcome]:
        """``one(index, report)`` for every run concurrently; each run's error is its outcome."""
        unit = runs[0].num_inference_steps if len(runs) == 1 else 1
        tracker = _ProgressTracker(ctx.progress, runs=len(runs), unit=unit)
        outcomes: list[RunOutcome | None] = [None] * len(runs)

        async def guarded(index: int) -> None:
            label = f"run {index + 1}/{len(runs)} (seed {runs[index].seed}): " if len(runs) > 1 else ""

            async def report(fraction: float | None, message: str) -> None:
                await tracker.report(index, fraction, label + message)

            try:
                outcomes[index] = await one(index, report)
            except FluxMCPError as exc:
                outcomes[index] = exc
                await tracker.report(index, 1.0, f"{label}failed")

        async with anyio.create_task_group() as group:
            for index in range(len(runs)):
                group.start_soon(guarded, index)
        return [outcome for outcome in outcomes if outcome is not None]

    # ------------------------------------------------------------------------------ one fal job

    async def _run(
        self,
        request: EditRequest,
        report: _Report,
        ctx: RunContext,
        *,
        index: int,
        image_urls: list[str] | None = None,
        request_id: str = "",
    ) -> BackendResult:
        """Submit (or, given ``request_id``, pick up) run ``index``, wait, fetch and download it.

        Unless it finished, the job is cancelled on fal when this fails, times out or is cancelled,
        except while the caller is detaching (server shutdown): then it is left to be collected.
        """
        started = time.monotonic()
        handle: fal_client.AsyncRequestHandle | None = None
        finished = False
        # One of fal's slots, from before the submit until fal says the job completed: a completed job
        # no longer runs at fal, so fetching its result and downloading its images do not hold a slot.
        await self._slots.acquire()
        held = True
        try:
            with anyio.fail_after(self._settings.job_timeout_s):
                if request_id:
                    handle = await self._fal.get_handle(ENDPOINT_ID, request_id)
                else:
                    arguments = {**request.payload(), "image_urls": image_urls}
                    handle = await self._retrying("submit", lambda: self._fal.submit(ENDPOINT_ID, arguments))
                    with anyio.CancelScope(shield=True):  # a job fal accepted is always recorded
                        await ctx.submitted(index, handle.request_id)
                completed, queue_s = await self._wait(handle, report)
                finished = True  # fal holds nothing more for us: no cancel from here on
                self._slots.release()
                held = False
                if completed.error:
                    raise JobFailed(
                        f"fal ran the job and it failed ({completed.error_type or 'error'}): "
                        f"{self._scrub(completed.error)}. Try again; if it keeps failing, change the "
                        "inputs or parameters."
                    )
                output = await self._retrying("result", lambda: self._fetch_result(handle), own=True)
                if not output.images:
                    raise JobFailed("fal finished the job but returned no images. Try again.")
        except TimeoutError:
            raise BackendTimeout(
                f"The fal job did not finish within {self._settings.job_timeout_s:g} s and was cancelled. "
                "Try again later, or raise FLUX_MCP_JOB_TIMEOUT_S."
            ) from None
        finally:
            if handle is not None and not finished and not ctx.detached():
                await self._cancel_remote(handle)
            if held:
                self._slots.release()
        fetched = time.monotonic()
        await report(1.0, f"finished; downloading {len(output.images)} image(s)")
        images = await self._download_all(output)
        return BackendResult(
            images=images,
            seed=output.seed,
            timings={
                "queue_s": round(queue_s, 3),
                "inference_s": round(output.timings.get("inference", fetched - started - queue_s), 3),
                "download_s": round(time.monotonic() - fetched, 3),
                "total_s": round(time.monotonic() - started, 3),
            },
            details={"request_id": handle.request_id},
        )

    async def _wait(
        self, handle: fal_client.AsyncRequestHandle, report: _Report
    ) -> tuple[fal_client.Completed, float]:
        """Until COMPLETED: fal's status stream, which tells the moment a job finishes; polling when the
        stream cannot be had or breaks off. Returns the final status and the seconds spent queued."""
        watcher = _StatusWatcher(report)
        try:
            completed = await self._stream_status(handle, watcher)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            logger.debug("status stream of %s failed (%s); polling", handle.request_id, type(exc).__name__)
            completed = None
        if completed is None:
            completed = await self._poll(handle, watcher)
        return completed, watcher.queue_s

    async def _stream_status(
        self, handle: fal_client.AsyncRequestHandle, watcher: _StatusWatcher
    ) -> fal_client.Completed | None:
        """Follow ``GET {status_url}/stream`` (server-sent events); None when it is refused or ends early."""
        url = handle.status_url + "/stream"
        async with handle.client.stream("GET", url, params={"logs": 1}, timeout=STREAM_TIMEOUT) as response:
            if response.status_code != 200 or "text/event-stream" not in response.headers.get(
                "content-type", ""
            ):
                return None
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # comments (keep-alives) and blank separators
                status = _parse_status(json.loads(line.removeprefix("data:")))
                await watcher.see(status)
                if isinstance(status, fal_client.Completed):
                    return status
        return None

    async def _poll(
        self, handle: fal_client.AsyncRequestHandle, watcher: _StatusWatcher
    ) -> fal_client.Completed:
        """Poll the status until COMPLETED, fast at first, backing off to a gentle rate for long jobs."""
        interval = POLL_FIRST_S
        while True:
            status = await self._retrying("status", lambda: handle.status(with_logs=True))
            await watcher.see(status)
            if isinstance(status, fal_client.Completed):
                return status
            await anyio.sleep(interval)
            interval = min(interval * 1.5, POLL_MAX_S)

    async def _fetch_result(self, handle: fal_client.AsyncRequestHandle) -> EditResult:
        # handle.get() would poll the status once more first; the response URL is all we need.
        response = await handle.client.get(handle.response_url, timeout=RESULT_TIMEOUT)
        response.raise_for_status()
        try:
            return EditResult.model_validate(response.json())
        except ValidationError as exc:
            raise BackendError(
                f"fal's result for request {handle.request_id} does not look like this endpoint's output "
                f"({exc.error_count()} problem(s), first: {exc.errors()[0]['msg']})."
            ) from None

    async def _cancel_remote(self, handle: fal_client.AsyncRequestHandle) -> None:
        """Best effort: tell fal to drop the job, shielded from the cancellation that got us here."""
        with anyio.move_on_after(CANCEL_TIMEOUT_S, shield=True):
            try:
                await handle.cancel()
            except (fal_client.FalClientHTTPError, httpx.HTTPError) as exc:
                logger.info("Could not cancel fal request %s: %s", handle.request_id, type(exc).__name__)

    # ------------------------------------------------------------------------------ inputs

    async def _input_urls(self, inputs: list[InputImage]) -> list[str]:
        """Each input as a URL fal can read: URLs unchanged, bytes uploaded (concurrently) or inlined."""

        async def convert(item: InputImage) -> str:
            if item.url is not None:
                return item.url
            if item.data is None:
                raise InvalidRequest(
                    f"Input {item.source!r} has neither a URL nor image data.", field="image_urls"
                )
            # fal's CDN is public: EXIF (GPS, owner, serial numbers), XMP and comments stay here.
            data, content_type = await anyio.to_thread.run_sync(
                media.strip_metadata, item.data, item.content_type or "image/png", self._input_pixels
            )
            if self._settings.fal_upload == "data-uri":
                return await anyio.to_thread.run_sync(media.data_uri, data, content_type)
            return await self._uploads.url(
                data,
                content_type,
                lambda: self._retrying("upload", lambda: self._fal.upload(data, content_type)),
            )

        return await _gather([partial(convert, item) for item in inputs])

    # ------------------------------------------------------------------------------ outputs

    async def _download_all(self, output: EditResult) -> list[GeneratedImage]:
        count = len(output.images)

        async def fetch(index: int, image: ImageFile) -> GeneratedImage:
            data = await self._download(index, count, image.url)
            try:
                content_type, width, height = await anyio.to_thread.run_sync(
                    media.probe, data, MAX_OUTPUT_PIXELS
                )
            except media.MediaError as exc:
                raise BackendError(
                    f"Output image {index + 1} of {count} from fal is not a readable image "
                    f"({type(exc).__name__})."
                ) from None
            nsfw = output.has_nsfw_concepts[index] if index < len(output.has_nsfw_concepts) else None
            return GeneratedImage(
                data=data,
                content_type=content_type,
                width=width,
                height=height,
                seed=wrap_seed(output.seed + index),
                nsfw=nsfw,
                source_url=None if image.url.startswith("data:") else public_url(image.url),
            )

        return await _gather([partial(fetch, index, image) for index, image in enumerate(output.images)])

    async def _download(self, index: int, count: int, url: str) -> bytes:
        """The bytes of one output image, within ``max_download_mb`` and ``download_timeout_s``."""
        which = f"Output image {index + 1} of {count}"
        limit = int(self._settings.max_download_mb * 1024 * 1024)
        if url.startswith("data:"):
            return await anyio.to_thread.run_sync(_output_data_uri, url, limit, which)
        if not url.startswith(("https://", "http://")):
            raise BackendError(f"{which} has an unsupported URL scheme: {url[:80]!r}.")
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with anyio.fail_after(self._settings.download_timeout_s):
                    return await self._stream(url, limit, which)
            except TimeoutError:
                raise BackendTimeout(
                    f"{which} did not download within {self._settings.download_timeout_s:g} s ({url}). "
                    "Raise FLUX_MCP_DOWNLOAD_TIMEOUT_S on slow connections."
                ) from None
            except (httpx.RequestError, _RetryableStatus) as exc:
                if attempt == ATTEMPTS:
                    reason = str(exc) or type(exc).__name__
                    raise BackendError(f"{which} could not be downloaded from {url}: {reason}.") from None
                await anyio.sleep(_backoff(attempt, getattr(exc, "retry_after", None)))
        raise AssertionError("unreachable")

    async def _stream(self, url: str, limit: int, which: str) -> bytes:
        async with self._http.stream("GET", url) as response:
            if response.status_code in RETRY_STATUSES:
                raise _RetryableStatus(f"HTTP {response.status_code}", response.headers.get("retry-after"))
            if response.status_code != 200:
                raise BackendError(
                    f"{which} could not be downloaded from {url}: HTTP {response.status_code}."
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise _too_big(which, int(declared), limit)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:  # the header may be missing or wrong: count what arrives
                    raise _too_big(which, len(body), limit)
            return bytes(body)

    # ------------------------------------------------------------------------------ errors

    def _require_key(self) -> None:
        if not self._settings.fal_key:
            raise BackendUnavailable(
                "The hosted backend needs an API key: set FAL_KEY (https://fal.ai/dashboard/keys), "
                "or use FLUX_MCP_BACKEND=local on a machine with a CUDA GPU."
            )

    async def _retrying(self, what: str, call: Callable[[], Awaitable[Any]], own: bool = False) -> Any:
        """``call()`` with bounded retries on overload and transport errors; errors mapped to ours.

        ``own``: the call is our own request, not a fal-client call that already retried
        429s and transport errors by itself (those are then not retried again on top).
        """
        retry_statuses = RETRY_STATUSES if own else RETRY_STATUSES - FAL_CLIENT_RETRIES
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await call()
            except (fal_client.FalClientHTTPError, httpx.HTTPStatusError) as exc:
                response = exc.response
                if response.status_code in retry_statuses and attempt < ATTEMPTS:
                    await anyio.sleep(_backoff(attempt, response.headers.get("retry-after")))
                    continue
                raise self._http_error(what, response) from None
            except httpx.RequestError as exc:
                if own and attempt < ATTEMPTS:
                    await anyio.sleep(_backoff(attempt))
                    continue
                raise BackendUnavailable(
                    f"Could not reach fal for the {what} request ({type(exc).__name__}) after several "
                    "attempts. Check the network connection and try again."
                ) from None
            except (ValueError, KeyError, TypeError) as exc:  # JSON that is not what the protocol says
                raise BackendError(
                    f"fal sent a malformed answer to the {what} request ({type(exc).__name__}); try again."
                ) from None
        raise AssertionError("unreachable")

    def _http_error(self, what: str, response: httpx.Response) -> FluxMCPError:
        """One fal HTTP error answer as our error: what went wrong and what to change."""
        code = response.status_code
        body = _json_or_none(response)
        detail = body.get("detail") if isinstance(body, dict) else None
        error_type = (body.get("error_type") if isinstance(body, dict) else None) or response.headers.get(
            "x-fal-error-type"
        )
        if code == 422 and isinstance(detail, list):
            return self._validation_error(detail)
        text = self._scrub(str(detail if detail is not None else response.text or response.reason_phrase))
        if code in (401, 403):
            return BackendUnavailable(
                f"fal rejected FAL_KEY (HTTP {code}). Check the key at https://fal.ai/dashboard/keys "
                "and set FAL_KEY to a valid one."
            )
        if code in RETRY_STATUSES:
            return BackendUnavailable(
                f"fal is overloaded or unavailable (HTTP {code} to the {what} request, after retries). "
                "Try again in a minute."
            )
        if code == 422:
            return InvalidRequest(f"fal rejected the request: {text}")
        if what == "result" and error_type:
            return JobFailed(f"fal ran the job and it failed ({error_type}, HTTP {code}): {text}")
        return BackendError(f"fal answered HTTP {code} to the {what} request: {text}")

    def _validation_error(self, detail: list[Any]) -> InvalidRequest:
        """fal's 422 ``detail[]`` as one message naming every field (``loc`` minus "body")."""
        problems, fields = [], []
        for item in detail:
            entry = item if isinstance(item, dict) else {"msg": item}
            name = ".".join(str(part) for part in entry.get("loc", []) if part != "body") or "request"
            fields.append(name)
            problems.append(f"{name}: {self._scrub(str(entry.get('msg', 'invalid value')))} — change {name}")
        message = "fal rejected the request: " + "; ".join(problems)
        return InvalidRequest(message, field=fields[0] if fields else None)

    def _scrub(self, text: str) -> str:
        """Server text, shortened, with any piece of the key blanked out."""
        text = self._redact(text)
        return text if len(text) <= MAX_DETAIL_CHARS else text[:MAX_DETAIL_CHARS] + "…"


# ---------------------------------------------------------------------------------- helpers


async def _gather(calls: list[Callable[[], Awaitable[_T]]]) -> list[_T]:
    """Run ``calls`` concurrently, results in order; the first of our errors cancels the rest and is
    raised as itself (not wrapped in an ExceptionGroup), so callers see one clear error."""
    results: list[_T | None] = [None] * len(calls)
    failures: list[FluxMCPError] = []

    async def run(index: int, call: Callable[[], Awaitable[_T]]) -> None:
        try:
            results[index] = await call()
        except FluxMCPError as exc:
            failures.append(exc)
            group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        for index, call in enumerate(calls):
            group.start_soon(run, index, call)
    if failures:
        raise failures[0]
    return cast("list[_T]", results)


class _RetryableStatus(Exception):
    """A download answered with a status worth retrying (429, 502-504), maybe with a Retry-After."""

    def __init__(self, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _UploadCache:
    """CDN URLs of the inputs this server uploaded, by content: an agent that edits the same image again
    (a compare, a grid, the next step of a chain) does not upload it again. Concurrent calls with the
    same bytes wait for one upload. Bounded (LRU) and kept for ``UPLOAD_TTL_S``, well inside the CDN's
    retention."""

    def __init__(self, capacity: int = UPLOAD_CACHE_SIZE) -> None:
        self._capacity = capacity
        self._urls: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._locks: dict[str, anyio.Lock] = {}

    async def url(self, data: bytes, content_type: str, upload: Callable[[], Awaitable[str]]) -> str:
        digest = await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())  # MBs: off the loop
        key = f"{content_type}:{digest}"
        lock = self._locks.setdefault(key, anyio.Lock())
        try:
            async with lock:
                cached = self._urls.get(key)
                if cached is not None and time.monotonic() - cached[1] < UPLOAD_TTL_S:
                    self._urls.move_to_end(key)
                    return cached[0]
                url = await upload()
                self._urls[key] = (url, time.monotonic())
                self._urls.move_to_end(key)
                while len(self._urls) > self._capacity:
                    self._urls.popitem(last=False)
                return url
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(key, None)


class _StatusWatcher:
    """Turns the statuses of one job into progress: queue position changes and new log lines only,
    and remembers how long the job was queued."""

    def __init__(self, report: _Report) -> None:
        self._report = report
        self._submitted = time.monotonic()
        self._queued_for: float | None = None
        self._logs_seen, self._position = -1, -1

    @property
    def queue_s(self) -> float:
        return self._queued_for or 0.0

    async def see(self, status: fal_client.Status) -> None:
        if isinstance(status, fal_client.Queued):
            if status.position != self._position:
                self._position = status.position
                await self._report(None, f"queued at position {status.position}")
            return
        if self._queued_for is None:
            self._queued_for = time.monotonic() - self._submitted
        if isinstance(status, fal_client.InProgress):
            logs = status.logs or []
            if len(logs) > self._logs_seen:  # a new log line (or the first IN_PROGRESS): report it
                self._logs_seen = len(logs)
                last = logs[-1] if logs else {"message": "running on fal"}
                await self._report(_log_fraction(last), _log_message(last))


class _ProgressTracker:
    """Folds per-run fractions into one monotonic progress stream: done = sum(fractions) * unit."""

    def __init__(self, progress: Progress, runs: int, unit: float) -> None:
        self._progress = progress
        self._fractions = [0.0] * runs
        self._unit = unit

    async def report(self, run: int, fraction: float | None, message: str) -> None:
        if fraction is not None:
            self._fractions[run] = max(self._fractions[run], min(fraction, 1.0))
        done = round(sum(self._fractions) * self._unit, 3)
        total = len(self._fractions) * self._unit
        # Before anything has happened (queued) the total is not meaningful yet.
        await self._progress(done, total if done or fraction is not None else None, message)


def _parse_status(data: dict[str, Any]) -> fal_client.Status:
    """One status object of the queue (as ``GET {status_url}`` answers it) as fal-client's types."""
    state = data["status"]
    if state == "IN_QUEUE":
        return fal_client.Queued(position=int(data.get("queue_position") or 0))
    if state == "IN_PROGRESS":
        return fal_client.InProgress(logs=data.get("logs"))
    if state == "COMPLETED":
        return fal_client.Completed(
            logs=data.get("logs"),
            metrics=data.get("metrics") or {},
            error=data.get("error"),
            error_type=data.get("error_type"),
        )
    raise ValueError(f"unknown queue status {state!r}")


def _log_message(log: Any) -> str:
    message = log.get("message", "") if isinstance(log, dict) else str(log)
    return str(message).strip()[:200] or "running"


def _log_fraction(log: Any) -> float | None:
    """The fraction of steps done from a log line like 'Step 7/28' or a tqdm bar, if it has one."""
    match = _STEP.search(_log_message(log))
    if match is None or int(match[2]) == 0:
        return None
    return int(match[1]) / int(match[2])


def _backoff(attempt: int, retry_after: str | None = None) -> float:
    """Seconds to wait before retry ``attempt + 1``: what the server asked for, else our own schedule."""
    asked = _retry_after_s(retry_after)
    if asked is not None:
        return asked
    return BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.75, 1.25)


def _retry_after_s(header: str | None) -> float | None:
    """A ``Retry-After`` header (delta-seconds or an HTTP date) in seconds, capped at
    ``MAX_RETRY_AFTER_S`` so that a huge value cannot hold a call; None when absent or unreadable."""
    if not header:
        return None
    try:
        seconds = float(header)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(header) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):  # not a date, or one without a time zone
            return None
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        return None


def _too_big(which: str, size: int, limit: int) -> BackendError:
    """``size`` is what was declared or what had arrived when the download was stopped."""
    return BackendError(
        f"{which} is larger than the {limit / 2**20:.1f} MiB limit (FLUX_MCP_MAX_DOWNLOAD_MB; at least "
        f"{size / 2**20:.1f} MiB); raise the limit or ask for a smaller image_size."
    )


def _refuse_local_loras(request: EditRequest) -> None:
    """fal cannot read this machine's files: a local path or file:// would reach it as a string."""
    for index, lora in enumerate(request.loras):
        path = lora.path.strip()
        if path.lower().startswith(("/", "~", ".", "\\", "file:")) or re.match(r"^[a-z]:[\\/]", path, re.I):
            field = f"loras.{index}.path"
            raise InvalidRequest(
                f"{field}: {path[:120]!r} is a file on this machine, which the hosted endpoint cannot read. "
                "Give an https URL of the .safetensors file (e.g. its Hugging Face 'resolve' URL), or run "
                "locally with FLUX_MCP_BACKEND=local.",
                field=field,
            )


def _output_data_uri(url: str, limit: int, which: str) -> bytes:
    try:
        return media.decode_data_uri(url, limit)[1]
    except media.DataTooLarge as exc:
        raise _too_big(which, exc.size, limit) from None
    except media.MediaError as exc:
        raise BackendError(f"{which} is {exc}.") from None

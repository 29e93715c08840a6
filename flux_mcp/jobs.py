"""Jobs: edits that outlive the host's tool-call timeout.

Every edit_image / compare_seeds call runs as a job in the server's own task group, not in the
request's task. The tool waits for it up to ``FLUX_MCP_CALL_BUDGET_S`` while forwarding progress; a
call that finishes in time returns its result as if there were no job. One that does not returns a
normal "still running" result with the job id, and the work goes on: ``get_result`` collects it
(or its progress), ``cancel_job`` stops it.

Job state is kept on disk beside the results (``<output dir>/jobs/<id>.json``, written atomically):
a finished job can be collected after a server restart, and a hosted job that was still running
when the server stopped is resumed by its remote ids (``RunContext.submitted`` records them the
moment the backend's service accepts a run) when the backend declares itself ``resumable``. Other
jobs cannot be resumed; a restart marks them failed, saying so. A job record holds the prepared
call as data (``CallSpec``), never a copy of its fields.

Cancellation: a host's ``notifications/cancelled`` for a call still inside its budget cancels the
job (that is what the host asked for); once the call has returned a job id, nothing but cancel_job
stops it.

This module knows nothing about MCP; the server renders what it returns.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from pydantic import BaseModel, ValidationError

from .backends import RunContext
from .errors import FluxMCPError, NotFound
from .results import JobInfo
from .service import CallSpec, FluxService, Outcome, PreparedCall, ProgressFn
from .store import sweep_partial, write_atomic

__all__ = ["Job", "JobManager", "JobRecord"]

logger = logging.getLogger(__name__)

JOB_ID = re.compile(r"^job-\d{8}-\d{6}-[0-9a-f]{8}$")
FINAL_STATES = frozenset({"done", "failed", "cancelled"})
#: Finished jobs kept in memory with their rendered outcome; older ones are reloaded from disk.
KEEP_FINISHED_IN_MEMORY = 8
#: While a call waits, its progress is repeated at least this often (seconds).
HEARTBEAT_S = 10.0


class JobRecord(BaseModel):
    """What is kept on disk for one job."""

    info: JobInfo
    #: The backend that runs it (``Backend.name``): only that backend can resume it.
    backend: str
    call: CallSpec
    #: Run index -> the remote id the backend reported as soon as its service accepted the run.
    remote: dict[int, str] = {}
    #: The structured result once done (EditOutput / CompareOutput as JSON).
    output: dict[str, Any] | None = None


@dataclass
class Job:
    """A job in memory: its record, how to wait for it, how to stop it, who wants its progress."""

    record: JobRecord
    call: PreparedCall | None = None
    finished: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope | None = None
    listeners: list[ProgressFn] = field(default_factory=list)
    outcome: Outcome | None = None
    save_lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def id(self) -> str:
        return self.record.info.id

    @property
    def state(self) -> str:
        return self.record.info.state


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobManager:
    """Runs calls as jobs; use as ``async with JobManager(service) as jobs:`` for the server's life."""

    def __init__(self, service: FluxService, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.service = service
        self.heartbeat_s = heartbeat_s
        self.root = service.settings.output_dir / "jobs"
        self._jobs: dict[str, Job] = {}
        self._group: anyio.abc.TaskGroup | None = None
        self._shutting_down = False

    @asynccontextmanager
    async def running(self) -> AsyncIterator[JobManager]:
        def prepare() -> None:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            sweep_partial(self.root)

        await anyio.to_thread.run_sync(prepare)
        async with anyio.create_task_group() as group:
            self._group = group
            await self._resume_unfinished()
            try:
                yield self
            finally:
                # Hosted jobs are left running on fal (and resumed at the next start); local ones stop.
                self._shutting_down = True
                group.cancel_scope.cancel()

    # -- starting, waiting, cancelling -------------------------------------------------------------

    async def submit(self, call: PreparedCall) -> Job:
        """Start ``call`` as a job; returns at once."""
        now = _now()
        job_id = f"job-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"
        record = JobRecord(
            info=JobInfo(id=job_id, state="queued", created=now, updated=now, message="queued"),
            backend=call.backend.name,
            call=call.spec(),
        )
        job = Job(record, call)
        self._jobs[job_id] = job
        await self._save(job)
        assert self._group is not None, "JobManager.running() is not active"
        self._group.start_soon(self._run, job, None)
        return job

    async def wait(self, job: Job, timeout: float, progress: ProgressFn | None = None) -> bool:
        """Wait up to ``timeout`` s for the job, forwarding its progress; True when it is finished."""
        if progress is not None:
            job.listeners.append(progress)
            if job.record.info.progress or job.record.info.message:
                info = job.record.info
                await _safe(progress, info.progress, info.total, info.message)
        try:
            with anyio.move_on_after(timeout):
                if progress is None:
                    await job.finished.wait()
                else:
                    async with anyio.create_task_group() as group:
                        group.start_soon(self._heartbeat, job, progress)
                        await job.finished.wait()
                        group.cancel_scope.cancel()
        finally:
            if progress is not None and progress in job.listeners:
                job.listeners.remove(progress)
        return job.finished.is_set()

    async def _heartbeat(self, job: Job, progress: ProgressFn) -> None:
        """Repeat the job's state while a caller waits and nothing new happens (a long queue, a model
        load), so hosts that reset their timeout on progress keep waiting."""
        while True:
            await anyio.sleep(self.heartbeat_s)
            info = job.record.info
            await _safe(progress, info.progress, info.total, info.message or info.state)

    async def cancel(self, job: Job) -> None:
        """Stop a running job: it is "cancelling" at once and "cancelled" once its run has stopped.

        A job whose backend ``cancels_promptly`` (a hosted job: one cancel request) is waited for. Others
        are not: a local run stops at its next step boundary (after a model load that is under way), and
        its caller should not wait for that.
        """
        if job.state in FINAL_STATES:
            return
        if job.scope is not None:
            job.scope.cancel()
        info = job.record.info
        info.state, info.updated = "cancelling", _now()
        info.message = "cancelling: the run stops at its next step and nothing will be saved"
        if job.call is not None and not job.call.backend.cancels_promptly:
            with anyio.CancelScope(shield=True):
                await self._save(job)
            return
        with anyio.move_on_after(15, shield=True):
            await job.finished.wait()

    async def get(self, job_id: str) -> Job:
        """A job by id, from memory or (after a restart) from disk."""
        job = self._jobs.get(job_id)
        if job is not None:
            return job
        if not JOB_ID.match(job_id):
            raise NotFound(f"{job_id!r} is not a job id (job ids look like job-20261125-181500-1a2b3c4d).")
        path = self.root / f"{job_id}.json"
        try:
            text = await anyio.to_thread.run_sync(path.read_text)
            record = JobRecord.model_validate_json(text)
        except FileNotFoundError:
            raise NotFound(f"No job {job_id} in {self.root}.") from None
        except (OSError, ValidationError) as exc:
            raise NotFound(f"The state of job {job_id} cannot be read: {exc}") from None
        job = Job(record)
        if record.info.state in FINAL_STATES:
            job.finished.set()
        self._jobs[job_id] = job
        return job

    async def outcome(self, job: Job) -> Outcome:
        """The finished job's result, rebuilt from disk when it ran before a restart."""
        if job.outcome is None:
            assert job.record.output is not None
            job.outcome = await self.service.reload(job.record.call.kind, job.record.output)
        return job.outcome

    async def pending_view(self, job: Job) -> Any:
        """The structured "still running" result for a job's call."""
        if job.call is None:
            job.call = await anyio.to_thread.run_sync(self._rebuild_call, job.record)
        return job.call.pending(job.record.info)

    # -- running ----------------------------------------------------------------------------------

    async def _run(self, job: Job, remote: dict[int, str] | None) -> None:
        assert job.call is not None
        info = job.record.info

        async def progress(value: float, total: float | None, message: str) -> None:
            if info.state == "queued":
                info.state = "running"
            info.progress, info.total, info.message, info.updated = value, total, message, _now()
            for listener in list(job.listeners):
                await _safe(listener, value, total, message)

        async def submitted(index: int, remote_id: str) -> None:
            # Written in the background: the backend calls this while it holds one of fal's slots.
            job.record.remote[index] = remote_id
            assert self._group is not None
            self._group.start_soon(self._save_in_background, job)

        ctx = RunContext(progress, submitted, detached=lambda: self._shutting_down)
        try:
            with anyio.CancelScope() as scope:
                job.scope = scope
                if info.state == "cancelling":  # cancel_job came before the run began
                    scope.cancel()
                else:
                    info.state = "running"
                await self._save(job)
                try:
                    outcome = await self.service.run(job.call, ctx, remote)
                except FluxMCPError as exc:
                    self._finish(job, "failed", error=str(exc))
                except Exception:
                    logger.exception("Job %s failed unexpectedly", job.id)
                    self._finish(job, "failed", error="internal error in flux-mcp (see the server log)")
                else:
                    job.outcome = outcome
                    job.record.output = outcome.output.model_dump(mode="json")
                    self._finish(job, "done", message="done")
        finally:
            if info.state not in FINAL_STATES:
                if not self._shutting_down:
                    self._finish(job, "cancelled", message="cancelled")
                elif not job.record.remote:
                    self._finish(job, "failed", error="interrupted: the server shut down before it finished")
                # else: left "running" on disk, resumed by its remote ids at the next start
            job.call = None  # its input images are not needed any more
            job.finished.set()
            with anyio.CancelScope(shield=True):
                await self._save(job)
            self._forget_old()

    def _forget_old(self) -> None:
        """Keep only the newest finished jobs in memory (results stay on disk; get_result reloads them)."""
        finished = [job_id for job_id, job in self._jobs.items() if job.finished.is_set()]
        for job_id in finished[:-KEEP_FINISHED_IN_MEMORY]:
            del self._jobs[job_id]

    def _finish(self, job: Job, state: str, *, message: str = "", error: str | None = None) -> None:
        info = job.record.info
        info.state = state  # type: ignore[assignment]
        info.message = message or (error or "")
        info.error = error
        info.updated = _now()

    async def _resume_unfinished(self) -> None:
        """At start: resume hosted jobs that were running; mark the others as interrupted."""

        def scan() -> list[JobRecord]:
            records = []
            for path in sorted(self.root.glob("job-*.json")):
                try:
                    record = JobRecord.model_validate_json(path.read_text("utf-8"))
                except (OSError, ValidationError):
                    continue
                if record.info.state not in FINAL_STATES:
                    records.append(record)
            return records

        for record in await anyio.to_thread.run_sync(scan):
            job = Job(record)
            self._jobs[record.info.id] = job
            if not record.remote or not await anyio.to_thread.run_sync(self._can_resume, record):
                self._finish(
                    job,
                    "failed",
                    error="interrupted by a server restart before it finished; run the call again",
                )
                job.finished.set()
                await self._save(job)
                continue
            job.call = await anyio.to_thread.run_sync(self._rebuild_call, record)
            assert self._group is not None
            self._group.start_soon(self._run, job, dict(record.remote))

    def _can_resume(self, record: JobRecord) -> bool:
        """Blocking (may create the backend): whether the current backend can collect this job's runs."""
        try:
            backend = self.service.backend
        except FluxMCPError:
            return False
        return backend.resumable and backend.name == record.backend

    def _rebuild_call(self, record: JobRecord) -> PreparedCall:
        """Blocking (may create the backend): called from a worker thread."""
        return PreparedCall.from_spec(record.call, self.service.backend)

    async def _save_in_background(self, job: Job) -> None:
        """``_save`` from a task of the manager's group: a disk error is logged, never raised into the
        group (which would stop every job); the job's final save still happens, and reports it."""
        try:
            await self._save(job)
        except OSError as exc:
            logger.warning("Could not record job %s's progress: %s", job.id, exc.strerror or exc)

    async def _save(self, job: Job) -> None:
        """Write the job's record; one write at a time per job, each of the state it has then, so the
        file never goes back to an older state."""
        async with job.save_lock:
            data = job.record.model_dump_json(indent=2).encode()
            await anyio.to_thread.run_sync(
                write_atomic, self.root / f"{job.id}.json", data, 0o600
            )  # this user alone


async def _safe(listener: ProgressFn, value: float, total: float | None, message: str) -> None:
    """A listener that fails (a closed connection) must not fail the job."""
    try:
        await listener(value, total, message)
    except Exception as exc:  # whatever a closed or broken transport raises
        logger.debug("progress listener failed: %s", type(exc).__name__)

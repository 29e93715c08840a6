"""torch.compile for the local backend's acceleration 'regular', kept working through LoRA changes.

``regular`` compiles the transformer's repeated blocks once (``compile_repeated_blocks(fullgraph=True)``)
with FLUX_MCP_COMPILE_BACKEND: auto = inductor on CUDA and no compiling elsewhere; ``eager`` and
``aot_eager`` trace with dynamo on any device (same guards and limits, plain kernels), which is how
the CPU tests reproduce what happens on a GPU.

Every new LoRA adapter set (or image size) makes dynamo recompile both block types, and past its
recompile limit (8 entries per block) a fullgraph compile raises ``FailOnRecompileLimitHit`` - seen
at the 9th request with changing LoRAs. [ours] So ``CompiledBlocks`` lets only the first
``COMPILED_CONFIGS`` configurations compile; later new ones run with the stance
``eager_on_recompile`` (compiled code is still used wherever its guards pass, nothing is compiled
again) and a note says so. Known configurations stay compiled, the cache never reaches the limit.
A compiler error anyway is one of ``COMPILER_ERRORS``; the backend turns it into ``JobFailed`` and
calls ``reset``.

This module knows nothing about requests, pipelines or the result store: a transformer, a level
name, a hashable configuration and a list of notes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["COMPILED_CONFIGS", "COMPILER_ERRORS", "CompiledBlocks", "compile_backend"]

#: [ours] How many configurations (LoRA weights, batch, size, CFG) are compiled before new ones run
#: eager: each adds one or two entries to dynamo's per-block cache, which holds 8.
COMPILED_CONFIGS = 3
#: What torch.compile raises: FailOnRecompileLimitHit is not even a RuntimeError.
COMPILER_ERRORS = (FailOnRecompileLimitHit, TorchDynamoException)


def compile_backend(settings: Settings, cuda: bool) -> str | None:
    """The torch.compile backend of acceleration 'regular'; None = run eager."""
    if settings.compile_backend == "auto":
        return "inductor" if cuda else None
    return settings.compile_backend


class CompiledBlocks:
    """The compiled state of one transformer; used from the GPU worker thread, one run at a time."""

    def __init__(self, backend: str | None) -> None:
        #: The torch.compile backend, None when this engine never compiles.
        self.backend = backend
        self.compiled = False
        self._configs: set[Hashable] = set()

    @contextlib.contextmanager
    def running(
        self, transformer: Any, level: str, config: Hashable, notes: list[str], announce: Callable[[], None]
    ) -> Iterator[None]:
        """One run at ``level``: compiles on the first 'regular' run, then sets the stance for this run."""
        if level == "regular" and self.backend and not self.compiled:
            announce()
            transformer.compile_repeated_blocks(fullgraph=True, backend=self.backend)
            self.compiled = True
        if not self.compiled:
            yield
            return
        with torch.compiler.set_stance(self._stance(level, config, notes)):
            yield

    def reset(self) -> None:
        """After a compiler error: drop all compiled code (the next 'regular' run compiles afresh)."""
        torch.compiler.reset()
        self._configs.clear()

    def _stance(self, level: str, config: Hashable, notes: list[str]) -> str:
        if level != "regular":
            return "force_eager"
        if config in self._configs:
            return "eager_on_recompile"  # its compiled code serves it; never compile again for it
        if len(self._configs) < COMPILED_CONFIGS:
            self._configs.add(config)
            return "default"
        notes.append(
            f"acceleration 'regular' ran this LoRA/size/batch configuration eager: the first {COMPILED_CONFIGS} "
            "configurations are compiled, later ones are not (torch.compile's recompile limit)."
        )
        return "eager_on_recompile"

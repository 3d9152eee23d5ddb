"""How long compilation took: the first training steps' wall time next to a steady step's."""

from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger(__name__)


def dynamo_compiles() -> tuple[int, float]:
    """(frames compiled by torch.compile so far, seconds torch recorded for them) in this process."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # the metrics moved: the wall times below still tell the story
        return 0, 0.0
    frames = compilation_time_metrics.get("_compile.compile_inner", [])
    return len(frames), float(sum(frames))


class CompileTimeLogger(L.Callback):
    """With ``compile`` on, regions compile lazily inside the first training steps (forward at the
    first call, backward at the first backward, again for a new shape). Logs, once ``steps`` steps
    have run, each of their wall times and the step after them (steady), and the difference as the
    compile time; also ``perf/compile_s`` in the metrics.

    Args:
        steps: how many first steps may include compilation (2: the first, plus one for a shape
            that only appears at step 2, e.g. after the first optimizer step).
    """

    def __init__(self, steps: int = 2):
        self.steps = steps
        self._times: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if len(self._times) <= self.steps:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None or len(self._times) > self.steps:
            return
        self._times.append(time.perf_counter() - self._start)
        self._start = None
        if len(self._times) <= self.steps:
            return
        *first, steady = self._times
        compile_s = max(0.0, sum(first) - steady * len(first))
        frames, dynamo_s = dynamo_compiles()
        log.info(
            "compile: first %d steps took %s s, a steady step %.3f s: about %.1f s of compilation "
            "(torch.compile: %d frames compiled, %.1f s recorded by dynamo)",
            len(first),
            " + ".join(f"{t:.2f}" for t in first),
            steady,
            compile_s,
            frames,
            dynamo_s,
        )
        pl_module.log("perf/compile_s", compile_s, on_step=True, rank_zero_only=True)

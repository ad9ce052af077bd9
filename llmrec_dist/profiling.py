"""Where a training step's time goes (``train.profile_steps``).

The training loop marks its phases with ``torch.profiler.record_function`` regions (``llmrec.data``,
``llmrec.forward``, ``llmrec.loss`` inside the forward, ``llmrec.backward``, ``llmrec.optimizer``); they
cost nothing while no profiler runs. :class:`StepProfiler` runs ``torch.profiler`` over a window of
steps after a short warm-up and sums each region's time per step. DDP's gradient all-reduce runs on a
communication thread while backward goes on, so it is timed separately, by a DDP communication hook,
from the moment a gradient bucket is ready until its all-reduce is done; the part of it that backward
waits for is inside ``backward``.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

PHASES = ("data", "forward", "loss", "backward", "optimizer")
REGION = "llmrec."


def region(name: str):
    """A named phase of the training step (``record_function``; free when no profiler runs)."""
    return record_function(REGION + name)


class StepProfiler:
    """Profile steps ``[warmup, warmup + steps)`` of one epoch; call :meth:`step` after every step."""

    def __init__(self, model: torch.nn.Module, steps: int, warmup: int = 2):
        self.steps, self.warmup = steps, warmup
        self.seen = 0
        self.step_seconds: list[float] = []
        self.allreduce_seconds = 0.0
        self._last = None
        self._averages = None
        self._prof = profile(activities=[ProfilerActivity.CPU],
                             schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1))
        if hasattr(model, "register_comm_hook"):  # DDP (more than one worker)
            model.register_comm_hook(None, self._timed_allreduce)

    @property
    def active(self) -> bool:
        return self.warmup <= self.seen < self.warmup + self.steps

    def _timed_allreduce(self, _state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        started, counted = time.perf_counter(), self.active

        def done(fut):
            if counted:
                self.allreduce_seconds += time.perf_counter() - started
            return fut.value()

        return allreduce_hook(None, bucket).then(done)

    def __enter__(self):
        self._prof.__enter__()
        self._last = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        return False

    def step(self) -> None:
        now = time.perf_counter()
        if self.active:
            self.step_seconds.append(now - self._last)
        self._last = now
        self.seen += 1
        self._prof.step()

    def summary(self) -> dict[str, float]:
        """Milliseconds per profiled step: ``profile_<phase>_ms`` (``forward`` includes ``loss``),
        ``profile_allreduce_ms`` (overlaps backward), ``profile_step_ms`` and ``profile_steps``."""
        n = len(self.step_seconds)
        if not n:
            return {}
        totals = {p: 0.0 for p in PHASES}
        for event in self._events():
            if event.key.startswith(REGION) and event.key[len(REGION):] in totals:
                totals[event.key[len(REGION):]] += event.cpu_time_total / 1e3  # µs → ms
        out = {f"profile_{p}_ms": totals[p] / n for p in PHASES}
        out["profile_allreduce_ms"] = self.allreduce_seconds * 1e3 / n
        out["profile_step_ms"] = sum(self.step_seconds) * 1e3 / n
        out["profile_steps"] = n
        return out

    def table(self, rows: int = 30) -> str:
        """torch.profiler's own table of the busiest operators (for the run's artifacts)."""
        return self._events().table(sort_by="cpu_time_total", row_limit=rows)

    def _events(self):
        """The profiled operators averaged by name, aggregated once (summary and table share them)."""
        if self._averages is None:
            self._averages = self._prof.key_averages()
        return self._averages

"""One console line per finished sweep trial, in place of Ray Tune's own status tables.

A Tune callback runs in the driver process, where Tune's controller loop runs, so it can print::

    trial 1/4 5ac1e_00002  completed      valid_ndcg_at_10 0.0521  {'train.lr': 0.001}
"""

from __future__ import annotations

import math

from ray.tune import Callback

from llmrec_dist.metrics import higher_is_better
from llmrec_dist.sweep.trial import flatten


def trial_line(trial_id: str, status: str, params: dict, metric: str, best: float | None,
               done: int | None = None, total: int | None = None) -> str:
    count = f"{done}/{total} " if done and total else ""
    value = "-" if best is None or math.isnan(best) else f"{best:.4f}"
    return f"trial {count}{trial_id}  {status:<13} {metric} {value}  {params}"


class TrialLines(Callback):
    """``echo`` gets one line per trial that ends: completed (its last epoch and test ran), early_stopped
    (by the scheduler), or failed, with its parameters and its best ``metric`` so far."""

    def __init__(self, echo, metric: str, space_keys: list[str], total: int):
        self.echo, self.metric, self.space_keys, self.total = echo, metric, list(space_keys), total
        self.done = 0

    def _line(self, trial, status: str) -> None:
        self.done += 1
        params = {k: v for k, v in flatten(trial.config or {}).items() if k in self.space_keys}
        best = (trial.metric_analysis or {}).get(self.metric, {}).get("max" if higher_is_better(self.metric) else "min")
        self.echo(trial_line(trial.trial_id, status, params, self.metric, best, self.done, self.total))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "completed" if (trial.last_result or {}).get("final") else "early_stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        from llmrec_dist.console import one_line_cause

        try:
            error = trial.get_pickled_error() or trial.get_error()
        except Exception:  # the line matters more than its cause
            error = None
        self._line(trial, "failed" + (f" ({one_line_cause(error)})" if error else ""))

"""A worker killed for lack of memory stops the run: no blind retry of the same step.

Ray's memory monitor kills a worker when its node runs low on memory. Ray Train would then restart the
worker group from the latest checkpoint (``train.max_failures``) and run the very step that did not fit
again, minutes later, into the same wall. :class:`StopOnOutOfMemory` is a Ray Train callback on the
controller: when a worker's failure is a memory kill it raises :class:`WorkerOutOfMemory`, which Ray
Train does not retry, so ``fit()`` ends at once and the driver can say what happened in one line
(:func:`out_of_memory_line`). Other failures (a crashed process, a lost node) are retried as before.
"""

from __future__ import annotations

import re

from ray.train import UserCallback

_OOM = re.compile(r"low on memory|OutOfMemoryError|memory monitor|killed due to memory|out of memory", re.I)
_NODE = re.compile(r"was ([\d.]+)\s*GB\s*/\s*([\d.]+)\s*GB")


def is_memory_kill(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error it wraps) is Ray killing a process for lack of memory."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ == "OutOfMemoryError" or _OOM.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


class WorkerOutOfMemory(RuntimeError):
    """A training worker was killed for lack of memory; the run stopped without a retry."""

    def __init__(self, rank: int, detail: str):
        self.rank, self.detail = rank, detail
        super().__init__(f"worker {rank} was killed for lack of memory: {detail}")

    def __reduce__(self):
        # Raised on Ray Train's controller and pickled to the driver inside a ControllerError: the
        # default (the class called with self.args, the message alone) cannot rebuild it there.
        return (type(self), (self.rank, self.detail))


def memory_kill_detail(error: BaseException) -> str:
    """The node's memory use at the kill when Ray's message gives it, else the message's first line."""
    text = str(error)
    if match := _NODE.search(text):
        return f"the node used {match.group(1)} of {match.group(2)} GB"
    return next((line.strip() for line in text.splitlines() if _OOM.search(line)), text.splitlines()[0] if text else "")


class StopOnOutOfMemory(UserCallback):
    """Raise :class:`WorkerOutOfMemory` (which ends ``fit()`` without a retry) when a worker's failure is a
    memory kill; leave every other failure to ``train.max_failures``."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            if is_memory_kill(error):
                raise WorkerOutOfMemory(rank, memory_kill_detail(error))


def find_worker_oom(error: BaseException | None) -> WorkerOutOfMemory | None:
    """The :class:`WorkerOutOfMemory` inside what ``fit()`` raised (Ray wraps it), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, WorkerOutOfMemory):
            return error
        error = getattr(error, "controller_failure", None) or error.__cause__ or error.__context__
    return None


def out_of_memory_line(oom: WorkerOutOfMemory, peak_mb: float | None, estimate_mb: float | None) -> str:
    """One line for the console: what was killed, the peak measured, the estimate and what to change."""
    peak = f"; its last reported peak was {peak_mb / 1024:.1f} GiB" if peak_mb else ""
    est = (f"; the pre-flight estimate was {estimate_mb / 1024:.1f} GiB per worker" if estimate_mb
           else "")
    return (f"stopped: {oom}{peak}{est}. Nothing was retried: lower train.lm_items_per_step, "
            f"train.batch_size or model.text_max_len (see the estimate with `llmrec-dist train --estimate-memory`)")

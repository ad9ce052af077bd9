"""One line per epoch on the driver's console, read from the MLflow run that rank 0 logs into.

Rank 0 already logs every epoch's figures to MLflow (:mod:`llmrec_dist.worker.recipe`), so the driver
reads them from there while ``fit()`` runs instead of opening a second channel from the workers:
a background thread polls the run's ``train_loss`` history every couple of seconds and prints each
new epoch once::

    epoch 3/8  loss 7.412  valid NDCG@10 0.0521  31.2 s  412 seq/s

A plain line per epoch reads the same in a terminal and in a log file.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

STEP_KEY = "train_loss"  # logged every epoch, validated or refit alike
FIGURES = ("train_loss", "epoch_seconds", "sequences_per_s", "privacy_epsilon")
RANKING_NAMES = {"hr": "HR", "ndcg": "NDCG", "mrr": "MRR"}


def metric_label(key: str) -> str:
    """``valid_ndcg_at_10`` → ``valid NDCG@10``; ``valid_coverage_at_10`` → ``valid coverage@10``."""
    split, _, rest = key.partition("_")
    name, _, k = rest.rpartition("_at_")
    if not name or not k:
        return key.replace("_", " ")
    return f"{split} {RANKING_NAMES.get(name, name)}@{k}"


def epoch_line(epoch: int, epochs: int, figures: dict, metric: str | None = None) -> str:
    """The console line of 0-based ``epoch`` of at most ``epochs``: loss, ``metric`` (when the epoch
    has it), its seconds and training throughput; a figure that is missing is left out."""
    parts = [f"epoch {epoch + 1:>{len(str(epochs))}}/{epochs}"]
    if (loss := figures.get("train_loss")) is not None:
        parts.append(f"loss {loss:.3f}")
    if metric and (value := figures.get(metric)) is not None:
        parts.append(f"{metric_label(metric)} {value:.4f}")
    if (seconds := figures.get("epoch_seconds")) is not None:
        parts.append(f"{seconds:.1f} s")
    if (rate := figures.get("sequences_per_s")) is not None:
        parts.append(f"{rate:,.0f} seq/s")
    if (epsilon := figures.get("privacy_epsilon")) is not None:  # a DP-SGD run: the privacy spent so far
        parts.append(f"epsilon {epsilon:.2f}")
    return "  ".join(parts)


class EpochLines:
    """``with EpochLines(uri, run_id, epochs, metric, echo): trainer.fit()`` — ``echo`` gets one line per
    epoch as rank 0 logs it (epochs logged before, by a run being resumed, are not repeated). ``metric``:
    the validation metric shown (None for a refit, which has none)."""

    def __init__(self, tracking_uri: str, run_id: str, epochs: int, metric: str | None, echo,
                 interval: float = 2.0):
        self.tracking_uri, self.run_id, self.epochs, self.metric = tracking_uri, run_id, epochs, metric
        self.echo, self.interval = echo, interval
        self.printed: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None

    def _history(self, key: str) -> dict[int, float]:
        if self._client is None:
            from llmrec_dist.tracking import client

            self._client = client(self.tracking_uri)
        return {m.step: m.value for m in self._client.get_metric_history(self.run_id, key)}

    def poll(self, final: bool = False) -> None:
        """Print the epochs logged since the last poll. An epoch's figures are logged in one batch; an
        epoch whose validation metric is not there yet waits for the next poll (``final``: printed as is)."""
        new = sorted(set(self._history(STEP_KEY)) - self.printed)
        if not new:
            return
        keys = [*FIGURES, *([self.metric] if self.metric else [])]
        values = {key: self._history(key) for key in keys}
        for step in new:
            figures = {key: values[key].get(step) for key in keys}
            if self.metric and figures[self.metric] is None and not final:
                break
            self.printed.add(step)
            self.echo(epoch_line(step, self.epochs, figures, self.metric))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as err:  # a busy store or a network blip: the next poll catches up
                log.debug("polling MLflow for epochs: %s", err)

    def __enter__(self) -> EpochLines:
        try:
            self.printed = set(self._history(STEP_KEY))  # a resumed run's earlier epochs
        except Exception as err:
            log.debug("reading the epochs already logged: %s", err)
        self._thread = threading.Thread(target=self._run, name="epoch-lines", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.poll(final=True)  # the last epochs, logged after the last poll
        except Exception as err:
            log.debug("last poll of MLflow for epochs: %s", err)
        return False

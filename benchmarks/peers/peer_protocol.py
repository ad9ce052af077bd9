"""What the peer runners share: the exchange folder, our evaluation protocol and the files a run writes.

This module runs inside a peer's own virtual environment (RecBole's, RecTools'), next to the runner that
imports it, so it needs only the standard library, numpy and torch, and never imports llmrec_dist.
The exchange folder is written by ``llmrec_dist.bench.peer_export``: ``sequences.tsv`` holds every user's
whole chronological sequence (``user_idx<TAB>items space-separated``), whose last item is the test target,
the one before it the validation target and the rest the training items, exactly as our split.

Our protocol (docs/reference.md, DESIGN.md "Evaluation protocol"): every catalogue item 1..N is ranked,
the items of the user's whole history are left out except the target itself, padding 0 is never
ranked, and ties count against the target. Ranks here are 1-based: rank 1 is the top.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SEQUENCES_FILE = "sequences.tsv"
META_FILE = "exchange.json"
EPOCHS_FILE = "epochs.jsonl"  # one JSON line per epoch, written as the run goes (kept if it times out)


@dataclass
class Exchange:
    """The users' sequences: ``train(u) + [valid target] + [test target]`` in time order."""

    folder: Path
    users: list[int]
    sequences: list[list[int]]
    n_items: int

    def train(self, i: int) -> list[int]:
        return self.sequences[i][:-2]

    def valid_target(self, i: int) -> int:
        return self.sequences[i][-2]

    def test_target(self, i: int) -> int:
        return self.sequences[i][-1]


def read_exchange(folder: str | Path) -> Exchange:
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    users, sequences = [], []
    with open(folder / SEQUENCES_FILE, encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            user, items = line.rstrip("\n").split("\t")
            users.append(int(user))
            sequences.append([int(v) for v in items.split()])
    return Exchange(folder, users, sequences, int(meta["n_items"]))


def target_ranks(scores: torch.Tensor, targets: list[int], histories: list[list[int]] | None) -> list[int]:
    """1-based pessimistic rank of each row's target among items 1..N.

    ``scores`` [B, N+1] indexed by our item_idx (column 0 is padding; items the peer does not know are
    -inf). ``histories``: the items to leave out of each row's ranking (the target always stays), or None
    to rank the history too (the peer's own protocol where it does not mask)."""
    scores = scores.detach().to(torch.float32).clone()
    target_index = torch.as_tensor(targets, dtype=torch.long)[:, None]
    target_scores = scores.gather(1, target_index)
    if histories is not None:
        for row, history in enumerate(histories):
            if history:
                scores[row, torch.as_tensor(history, dtype=torch.long)] = float("-inf")
        scores.scatter_(1, target_index, target_scores)
    scores[:, 0] = float("-inf")
    higher = (scores > target_scores).sum(1)
    ties = (scores == target_scores).sum(1) - 1
    return (higher + ties + 1).tolist()


def ndcg_at_10(ranks: list[int]) -> float:
    return sum(1.0 / math.log2(r + 1) for r in ranks if r <= 10) / max(len(ranks), 1)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunLog:
    """Epoch records (appended to ``epochs.jsonl`` at once) and the final result file of one run."""

    def __init__(self, out: str | Path, started: float):
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.started = started
        self.epochs: list[dict] = []
        self.epochs_file = self.out.parent / EPOCHS_FILE
        self.epochs_file.write_text("", encoding="utf-8")

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def epoch(self, record: dict) -> None:
        record = {"seconds_since_start": round(self.seconds(), 3), **record}
        self.epochs.append(record)
        with open(self.epochs_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print("epoch " + json.dumps(record), flush=True)

    def write(self, result: dict) -> None:
        result = {**result, "epochs": self.epochs, "seconds_total": round(self.seconds(), 3),
                  "peak_rss_mb": round(peak_rss_mb(), 1)}
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result) + "\n", encoding="utf-8")
        tmp.replace(self.out)


class EarlyStopping:
    """Our early stopping: the best validation NDCG@10 (our protocol) so far; stop once ``patience`` epochs
    passed without beating it, or once the run's time budget (``budget_s`` seconds since the runner
    started, 0 = none) is spent, after the epoch that spent it."""

    def __init__(self, patience: int, budget_s: float = 0.0):
        self.patience = patience
        self.budget_s = budget_s
        self.best = -1.0
        self.best_epoch = -1
        self.stopped_by = "max epochs"

    def update(self, epoch: int, value: float) -> bool:
        """True when ``value`` is a new best."""
        if value > self.best:
            self.best, self.best_epoch = value, epoch
            return True
        return False

    def should_stop(self, epoch: int, seconds: float = 0.0) -> bool:
        if epoch - self.best_epoch >= self.patience:
            self.stopped_by = "patience"
        elif self.budget_s and seconds >= self.budget_s:
            self.stopped_by = "time budget"
        else:
            return False
        return True


def package_versions(*names: str) -> dict:
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def common_arguments(parser) -> None:
    """The arguments every runner takes (the driver, llmrec_dist.bench.peers, passes them)."""
    parser.add_argument("--exchange", required=True, help="exchange folder written by the driver")
    parser.add_argument("--model", required=True, choices=("SASRec", "BERT4Rec"))
    parser.add_argument("--settings", required=True, choices=("defaults", "matched"))
    parser.add_argument("--matched", default="{}", help="JSON: max_len, hidden, blocks, heads, dropout, "
                                                        "batch_size, lr (used with --settings matched)")
    parser.add_argument("--max-epochs", type=int, required=True)
    parser.add_argument("--patience", type=int, required=True)
    parser.add_argument("--budget-min", type=float, default=0.0,
                        help="stop after the epoch that passes this many minutes since the start (0: none)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="result JSON to write")


def start_run(description: str, started: float):
    """A runner's start: its arguments (:func:`common_arguments`), torch's threads set, the run's log
    (times counted from ``started``, the runner's first line) and the exchange folder read."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    common_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args, RunLog(args.out, started), read_exchange(args.exchange)

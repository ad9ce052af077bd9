"""The explanation benchmark: are leave-one-out explanations faithful, and what do they cost per request?

Faithfulness, per user of the split: the model's top recommendation r (served as ``recommend`` serves it:
history excluded) and its top explaining history item e (``because[0]``). The history is then scored
again, in a pass of its own, without e, and without a random other item of the model's input (any of
its last ``max_len`` known items, not only the 20 positions explanations try), and without the most
recent other item (the "because you just watched" heuristic). Explanation faithful when removing e
lowers r's score more than removing the other item, and separately when it pushes r further down the
ranking (the set of rankable items kept as in the request); the top item often keeps its rank either
way, so the rank rate is also given over the users where the two ranks differ. Users whose history holds no other item,
or whose r no history item raises (no explanation), are counted apart.

Latency: one request (one user, top 10) with and without ``explain``, one thread, CPU, after a warm-up.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from llmrec_dist.batching import left_pad
from llmrec_dist.evaluation import EvalRows

COLUMNS = [("baseline", "removed instead of e", ""), ("score_rate", "score drops more without e", ".1%"),
           ("rank_rate", "rank drops more without e", ".1%"), ("rank_tie_rate", "rank ties", ".1%"),
           ("rank_rate_untied", "rank, users without a tie", ".1%"),
           ("users", "users", "")]
LATENCY_COLUMNS = [("mode", "request", ""), ("p50_ms", "p50 ms", ".1f"), ("p95_ms", "p95 ms", ".1f")]


def _ids(rec, history: np.ndarray) -> list[str]:
    return [rec.item_ids[i - 1] for i in history]


@torch.no_grad()
def faithfulness(rec, rows: EvalRows, seed: int = 0, batch_size: int = 128) -> dict:
    """Rates over users (see the module docstring) for the random and the most-recent baselines."""
    rng = np.random.default_rng(seed)
    table = rec._table()
    counts = {name: {"score": 0, "rank": 0, "tie": 0} for name in ("random", "most_recent")}
    users = skipped_short = unexplained = 0
    for start in range(0, len(rows), batch_size):
        histories = [np.asarray(h, dtype=np.int64) for h in rows.histories[start:start + batch_size]]
        served = rec.recommend([_ids(rec, h) for h in histories], 1, explain=True)
        sequences, meta = [], []
        for history, result in zip(histories, served):
            window = history[-rec.max_len:].tolist()
            if not result["because"] or not result["because"][0]:
                unexplained += 1
                continue
            e = rec.index[result["because"][0][0]]
            e_pos = max(i for i, item in enumerate(window[-20:]) if item == e) + max(len(window) - 20, 0)
            others = [i for i, item in enumerate(window) if item != e]
            if not others:
                skipped_short += 1
                continue
            random_pos, recent_pos = int(rng.choice(others)), others[-1]
            drop = [window[:p] + window[p + 1:] for p in (e_pos, random_pos, recent_pos)]
            sequences += [window, *drop]
            meta.append((rec.index[result["item_ids"][0]], history))
        if not meta:
            continue
        scores = rec.model.score_next(torch.from_numpy(left_pad(sequences, rec.max_len)), table).float()
        scores = scores.view(len(meta), 4, -1)
        for u, (r, history) in enumerate(meta):
            s = scores[u].clone()
            if rec.exclude_seen:  # what the request ranks among: the same whatever was left out
                s[:, torch.from_numpy(np.unique(history))] = float("-inf")
            s[:, 0] = float("-inf")
            value = s[:, r]
            rank = (s > value[:, None]).sum(1)  # 0-based rank of r in each of the four scorings
            users += 1
            for j, name in ((2, "random"), (3, "most_recent")):
                drop_e, drop_other = value[0] - value[1], value[0] - value[j]
                counts[name]["score"] += bool(drop_e > drop_other)
                counts[name]["rank"] += bool(rank[1] > rank[j])
                counts[name]["tie"] += bool(rank[1] == rank[j])
    def rate(count: int, total: int) -> float:
        return count / total if total else float("nan")

    rows_out = [{"baseline": name, "score_rate": rate(c["score"], users), "rank_rate": rate(c["rank"], users),
                 "rank_tie_rate": rate(c["tie"], users), "rank_rate_untied": rate(c["rank"], users - c["tie"]),
                 "users": users} for name, c in counts.items()]
    return {"rows": rows_out, "users_compared": users, "users_unexplained": unexplained,
            "users_single_item": skipped_short}


def explain_latency(rec, rows: EvalRows, requests: int = 100, k: int = 10) -> list[dict]:
    """Milliseconds per request, plain and with ``explain`` (median and 95th percentile)."""
    histories = [_ids(rec, np.asarray(h)) for h in rows.histories[:requests]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for mode, explain in (("plain", False), ("explain", True)):
            rec.recommend(histories[:1], k, explain=explain)  # warm-up
            times = []
            for history in histories:
                started = time.perf_counter()
                rec.recommend([history], k, explain=explain)
                times.append((time.perf_counter() - started) * 1000)
            out.append({"mode": mode, "p50_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)),
                        "requests": len(histories)})
        out[1]["added_p50_ms"] = out[1]["p50_ms"] - out[0]["p50_ms"]
        out[1]["added_p95_ms"] = out[1]["p95_ms"] - out[0]["p95_ms"]
        return out
    finally:
        torch.set_num_threads(threads)

"""Quality: one full training run of a config (``configs/bench_movielens.yaml``), selected on validation,
reported on test with full ranking, next to the published anchors of that dataset (ML-1M, Amazon Beauty;
recognised by its counts); optionally followed by a refit
(``train.refit_epochs``): the same config trained through each user's validation item for the number of
epochs validation chose, then tested."""

from __future__ import annotations

import time

from llmrec_dist.bench.common import freq_ndcg_at_10
from llmrec_dist.config import TASK_METRICS, Config

# Published test NDCG@10 / HR@10 (leave-one-out, full ranking, history excluded) of the datasets the
# literature shares, recognised by their (users, items, interactions) after `prepare`.
ANCHOR_SETS = {
    "ml-1m": {  # as SASRec/BERT4Rec prepared it
        "counts": (6040, 3416, 999611),
        "target_ndcg_at_10": 0.20,
        "anchors": [
            ("SASRec (BCE)", 0.134, 0.250),
            ("BERT4Rec", 0.154, 0.284),
            ("gSASRec", 0.173, 0.300),
            ("SASRec (full CE, len 200, hidden 64, 2 blocks)", 0.182, 0.315),
            ("SASRec (3000 sampled negatives)", 0.186, 0.316),
            ("HSTU-large (mixture of logits)", 0.198, 0.341),
        ],
    },
    "amazon-beauty": {  # the 5-core of SASRec/S3-Rec (../shared/data/amazon-beauty-2014)
        "counts": (22363, 12101, 198502),
        "target_ndcg_at_10": 0.060,
        "anchors": [
            ("SASRec (BCE)", 0.0318, 0.0605),
            ("ICLRec", 0.0403, None),
            ("DuoRec", 0.0443, None),
            ("FuXi-alpha (re-run)", 0.0451, None),
            ("eSASRec", 0.0523, None),
            ("SASRec (sampled softmax)", 0.0531, 0.0921),
        ],
    },
}


def anchor_set(counts: dict) -> tuple[str, dict] | tuple[None, None]:
    """The published figures of the dataset with these manifest counts, or (None, None)."""
    key = (counts.get("users"), counts.get("items"), counts.get("interactions"))
    for name, anchors in ANCHOR_SETS.items():
        if anchors["counts"] == key:
            return name, anchors
    return None, None


def _test_figures(cfg: Config, m: dict) -> dict:
    """The test figures a result keeps: HR/NDCG/MRR@K and NDCG@10 by training frequency (next item), or
    the task's metrics and pair count (rating, click)."""
    if cfg.task.type != "next_item":
        return {"task": cfg.task.type, "test_pairs": m.get("test_pairs"),
                **{f"test_{name}": m.get(f"test_{name}") for name in TASK_METRICS[cfg.task.type]}}
    return {**{f"test_{name}_at_{k}": m.get(f"test_{name}_at_{k}") for name in ("hr", "ndcg", "mrr")
               for k in cfg.eval.ks},
            **{key: m.get(key) for key in freq_ndcg_at_10(cfg.eval.freq_buckets)}}


def run_quality(cfg: Config, refit: bool = False, counts: dict | None = None) -> dict:
    """Figures of one run of ``cfg``; with ``refit`` (or ``train.refit`` in the config), figures["refit"]
    holds those of the refit after it (with ``refit``, the validated run registers if the config says so and
    the refit does not; with ``train.refit``, the refit does, gated on the validated run's metric).
    ``counts``: the dataset manifest's counts, which name the published target (if any) it is held to."""
    from llmrec_dist.train.launcher import refit_after, train

    started, started_at = time.perf_counter(), time.time()
    outcome = train(cfg)  # train.refit: the validated run, then its refit (returned, .validated set)
    if refit and outcome.validated is None:
        outcome = refit_after(outcome)
    if outcome.validated is None:
        return _run_figures(outcome, started_at, time.perf_counter() - started, counts)
    figures = _run_figures(outcome.validated, started_at, outcome.validated.seconds, counts)
    figures["refit"] = _run_figures(outcome, started_at, outcome.seconds, counts)
    return figures


def _run_figures(outcome, started_at: float, wall: float, counts: dict | None) -> dict:
    """What a result keeps of one finished run (``started_at``: when the command began; ``wall``: the
    run's seconds)."""
    from llmrec_dist.tracking import client

    cfg, m = outcome.config, outcome.metrics
    c = client(outcome.tracking_uri)
    seconds = [v.value for v in c.get_metric_history(outcome.run_id, "epoch_seconds")]
    if m.get("refit_epochs"):  # nothing was validated
        chosen = {"refit_epochs": m["refit_epochs"]}
    else:
        valid = sorted(c.get_metric_history(outcome.run_id, cfg.selection_metric()), key=lambda v: v.step)
        chosen = {f"best_{cfg.selection_metric()}": m.get(cfg.selection_metric()),
                  "valid_curve": [round(v.value, 5) for v in valid],
                  # wall seconds from the command's start (Ray start-up included) to each validation logged:
                  # the time to reach any validation figure (bench peers' time-to-quality)
                  "valid_curve_seconds": [round(v.timestamp / 1000 - started_at, 1) for v in valid]}
    figures = {
        "run_id": outcome.run_id,
        "model_uri": outcome.model_uri,
        **_test_figures(cfg, m),
        "best_epoch": m.get("best_epoch"),
        "epochs_run": m.get("epochs_run"),
        "wall_seconds": wall,
        "mean_epoch_seconds": sum(seconds) / len(seconds) if seconds else None,
        **chosen,
    }
    name, anchors = anchor_set(counts or {}) if cfg.task.type == "next_item" else (None, None)
    if anchors:
        figures.update(anchor_dataset=name, target_ndcg_at_10=anchors["target_ndcg_at_10"],
                       reached_target=(m.get("test_ndcg_at_10") or 0) >= anchors["target_ndcg_at_10"])
    return figures


def anchor_rows(figures: dict, label: str, counts: dict | None = None) -> list[dict]:
    """The run next to the published figures of its dataset (just the run when there are none)."""
    _, anchors = anchor_set(counts or {})
    rows = [{"model": name, "ndcg": ndcg, "hr": hr} for name, ndcg, hr in (anchors or {}).get("anchors", [])]
    rows.append({"model": label, "ndcg": figures.get("test_ndcg_at_10"), "hr": figures.get("test_hr_at_10")})
    if refit := figures.get("refit"):  # trained on the validation interactions too, which the anchors are not
        rows.append({"model": f"{label}, refit through the validation item", "ndcg": refit.get("test_ndcg_at_10"),
                     "hr": refit.get("test_hr_at_10")})
    return sorted(rows, key=lambda r: r["ndcg"] or 0)


ANCHOR_COLUMNS = [("model", "model", ""), ("ndcg", "test NDCG@10", ".4f"), ("hr", "test HR@10", ".4f")]

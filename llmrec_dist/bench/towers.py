"""The item-tower × freezing-strategy matrix.

``llmrec-dist bench towers --config configs/mlsmall_towers.yaml data.path=DIR`` trains one
model per (item_repr, freeze) cell with the same budget and prints test NDCG@10 overall, on cold items and
by the target's training frequency (one column per ``eval.freq_buckets`` bucket), seconds per epoch,
sequences/s and trainable/total parameters, one row per cell.
"""

from __future__ import annotations

import json
import logging
import time

from llmrec_dist.bench.common import freq_ndcg_at_10, freq_ndcg_keys
from llmrec_dist.config import load_config

log = logging.getLogger(__name__)

CELLS = [("id", "-")] + [(repr_, freeze) for repr_ in ("text", "id+text")
                         for freeze in ("frozen", "top_k", "full", "lora")]


def _cell_overrides(item_repr: str, freeze: str) -> list[str]:
    out = [f"model.item_repr={item_repr}"]
    return out + ([f"model.freeze={freeze}"] if freeze != "-" else [])


def run_matrix(config: str, overrides: list[str], cells: list[tuple[str, str]]) -> list[dict]:
    from llmrec_dist.tracking import client as tracking_client
    from llmrec_dist.train.launcher import train

    rows = []
    for item_repr, freeze in cells:
        cfg = load_config(config, [*overrides, *_cell_overrides(item_repr, freeze),
                                   f"mlflow.run_name=towers-{item_repr}-{freeze}"])
        started = time.perf_counter()
        outcome = train(cfg)
        client = tracking_client(outcome.tracking_uri)
        run = client.get_run(outcome.run_id)
        history = client.get_metric_history(outcome.run_id, "epoch_seconds")
        speed = client.get_metric_history(outcome.run_id, "sequences_per_s")
        m = outcome.metrics
        row = {"item_repr": item_repr, "freeze": freeze,
               "test_ndcg_at_10": m["test_ndcg_at_10"], "test_cold_ndcg_at_10": m.get("test_cold_ndcg_at_10"),
               **{key: m.get(key) for key in freq_ndcg_at_10(cfg.eval.freq_buckets)},
               "test_hr_at_10": m["test_hr_at_10"], "epochs": m["epochs_run"],
               "s_per_epoch": sum(h.value for h in history) / max(len(history), 1),
               "seq_per_s": sum(h.value for h in speed) / max(len(speed), 1),
               "params_trainable": int(run.data.params["params_trainable"]),
               "params_total": int(run.data.params["params_total"]),
               "wall_s": time.perf_counter() - started, "run_id": outcome.run_id}
        rows.append(row)
        log.info("towers: %s", json.dumps(row))
    return rows


COLUMNS = [("item_repr", "item_repr", ""), ("freeze", "freeze", ""), ("test_ndcg_at_10", "NDCG@10", ".4f"),
           ("test_cold_ndcg_at_10", "cold", ".4f"), ("test_hr_at_10", "HR@10", ".4f"), ("epochs", "ep", "d"),
           ("s_per_epoch", "s/ep", ".1f"), ("seq_per_s", "seq/s", ".1f"), ("params_trainable", "trainable", ","),
           ("params_total", "total", ",")]


def table_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """:data:`COLUMNS` with a ``freq <bucket>`` NDCG@10 column after ``cold`` for each bucket in ``rows``."""
    at = next(i for i, (key, _, _) in enumerate(COLUMNS) if key == "test_cold_ndcg_at_10") + 1
    return COLUMNS[:at] + [(key, f"freq {label}", ".4f") for key, label in freq_ndcg_keys(rows)] + COLUMNS[at:]


def parse_cells(text: str) -> list[tuple[str, str]]:
    """``all`` or ``id:-,text:frozen`` → cells; an unknown cell raises ValueError naming the valid ones."""
    if text == "all":
        return list(CELLS)
    cells = [tuple(c.split(":", 1)) if ":" in c else (c, "") for c in text.split(",")]
    for cell in cells:
        if cell not in CELLS:
            raise ValueError(f"--cells: unknown cell {':'.join(cell)}; valid: "
                             + ", ".join(f"{a}:{b}" for a, b in CELLS))
    return cells

"""Benchmarks that print figures (never timed assertions): the item-tower matrix of issue 3.

``python jobs/bench_item_towers.py --config configs/mlsmall_towers.yaml data.path=DIR`` trains one
model per (item_repr, freeze) cell with the same budget and prints test NDCG@10 overall and on cold
items, seconds per epoch, sequences/s and trainable/total parameters, one row per cell.
"""

from __future__ import annotations

import argparse
import json
import time

from llmrec_dist.config import load_config

CELLS = [("id", "-")] + [(repr_, freeze) for repr_ in ("text", "id+text")
                         for freeze in ("frozen", "top_k", "full", "lora")]


def _cell_overrides(item_repr: str, freeze: str) -> list[str]:
    out = [f"model.item_repr={item_repr}"]
    return out + ([f"model.freeze={freeze}"] if freeze != "-" else [])


def run_matrix(config: str, overrides: list[str], cells: list[tuple[str, str]], echo=print) -> list[dict]:
    from mlflow.tracking import MlflowClient

    from llmrec_dist.train.launcher import train

    rows = []
    for item_repr, freeze in cells:
        cfg = load_config(config, [*overrides, *_cell_overrides(item_repr, freeze),
                                   f"mlflow.run_name=towers-{item_repr}-{freeze}"])
        started = time.perf_counter()
        outcome = train(cfg)
        client = MlflowClient(outcome.tracking_uri)
        run = client.get_run(outcome.run_id)
        history = client.get_metric_history(outcome.run_id, "epoch_seconds")
        speed = client.get_metric_history(outcome.run_id, "sequences_per_s")
        m = outcome.metrics
        row = {"item_repr": item_repr, "freeze": freeze,
               "test_ndcg_at_10": m["test_ndcg_at_10"], "test_cold_ndcg_at_10": m.get("test_cold_ndcg_at_10"),
               "test_hr_at_10": m["test_hr_at_10"], "epochs": m["epochs_run"],
               "s_per_epoch": sum(h.value for h in history) / max(len(history), 1),
               "seq_per_s": sum(h.value for h in speed) / max(len(speed), 1),
               "params_trainable": int(run.data.params["params_trainable"]),
               "params_total": int(run.data.params["params_total"]),
               "wall_s": time.perf_counter() - started, "run_id": outcome.run_id}
        rows.append(row)
        echo(json.dumps(row))
    echo(format_rows(rows))
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'item_repr':<8} {'freeze':<7} {'NDCG@10':>8} {'cold':>7} {'HR@10':>7} {'ep':>3} {'s/ep':>7} " \
           f"{'seq/s':>7} {'trainable':>10} {'total':>11}"
    lines = [head]
    for r in rows:
        cold = "-" if r["test_cold_ndcg_at_10"] is None else f"{r['test_cold_ndcg_at_10']:.4f}"
        lines.append(f"{r['item_repr']:<8} {r['freeze']:<7} {r['test_ndcg_at_10']:>8.4f} {cold:>7} "
                     f"{r['test_hr_at_10']:>7.4f} {r['epochs']:>3} {r['s_per_epoch']:>7.1f} {r['seq_per_s']:>7.1f} "
                     f"{r['params_trainable']:>10,} {r['params_total']:>11,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_item_towers", description="Train one model per item tower x freezing strategy with the "
        "same budget and print test NDCG@10 (overall and cold), s/epoch, sequences/s and parameters.")
    parser.add_argument("--config", required=True, help="base training config (YAML)")
    parser.add_argument("--cells", default="all",
                        help="comma-separated item_repr:freeze cells, e.g. 'id:-,text:frozen' (default: all 9)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.path=DIR")
    args = parser.parse_args(argv)
    cells = CELLS if args.cells == "all" else [tuple(c.split(":", 1)) for c in args.cells.split(",")]
    for item_repr, freeze in cells:
        if (item_repr, freeze) not in CELLS:
            parser.error(f"--cells: unknown cell {item_repr}:{freeze}; valid: "
                         + ", ".join(f"{a}:{b}" for a, b in CELLS))
    run_matrix(args.config, args.overrides, cells)
    return 0

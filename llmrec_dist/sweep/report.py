"""What a sweep leaves on its parent MLflow run: a results table sorted by the metric, and two plots
(the metric per trial over epochs; the metric against the first numeric searched key — usually the
learning rate — coloured by the first categorical one — usually the freezing strategy)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path


def _columns(sweep) -> list[str]:
    return list(sweep.search.space)


TEST_KEYS = {"next_item": ("test_ndcg_at_10", "test_hr_at_10"), "rating": ("test_rmse", "test_mae"),
             "click": ("test_auc", "test_logloss")}


def _test_keys(sweep) -> tuple[str, str]:
    """The two test metrics a trial's row shows: those of the swept task."""
    return TEST_KEYS[sweep.base.task.type]


def results_csv(rows, sweep) -> str:
    """One line per trial, best first: id, status, searched params, best metric, epochs, test metrics."""
    metric, tests = sweep.search.metric, _test_keys(sweep)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["rank", "trial_id", "status", *_columns(sweep), f"best_{metric}", "epochs",
                     *tests, "seconds", "run_id"])
    for rank, row in enumerate(rows, 1):
        writer.writerow([rank, row.trial_id, row.status, *(row.params.get(k, "") for k in _columns(sweep)),
                         "" if math.isnan(row.best_value) else f"{row.best_value:.6f}", row.epochs,
                         *(f"{row.metrics[k]:.6f}" if k in row.metrics else "" for k in tests),
                         "" if math.isnan(row.seconds) else f"{row.seconds:.1f}", row.run_id or ""])
    return out.getvalue()


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def results_markdown(rows, sweep) -> str:
    metric, keys, shown = sweep.search.metric, _columns(sweep), _test_keys(sweep)[0]
    title = "test NDCG@10" if shown == "test_ndcg_at_10" else shown.replace("_", " ")
    lines = [f"| # | trial | status | {' | '.join(keys)} | {metric} | epochs | {title} | seconds |",
             "|" + "---|" * (len(keys) + 7)]
    for rank, row in enumerate(rows, 1):
        value = "" if math.isnan(row.best_value) else f"{row.best_value:.4f}"
        test = row.metrics.get(shown)
        lines.append(f"| {rank} | {row.trial_id} | {row.status} | "
                     + " | ".join(_fmt(row.params.get(k, "")) for k in keys)
                     + f" | {value} | {row.epochs} | {'' if test is None else f'{test:.4f}'} | "
                     + ("" if math.isnan(row.seconds) else f"{row.seconds:.0f}") + " |")
    return "\n".join(lines) + "\n"


def _label(row, keys) -> str:
    return ", ".join(f"{k.split('.')[-1]}={_fmt(row.params[k])}" for k in keys if k in row.params)


def write_plots(rows, sweep, folder: Path) -> list[Path]:
    """PNG plots into ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, keys = sweep.search.metric, _columns(sweep)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row.history:
            epochs, values = zip(*row.history)
            style = "-" if row.status == "completed" else "--"
            ax.plot(epochs, values, style, marker="o", label=f"{row.trial_id} ({_label(row, keys)})"[:70])
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (dashed: stopped early or unfinished)")
    if any(r.history for r in rows):
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "metric_per_trial.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    numeric = [k for k in keys if next(iter(sweep.search.space[k])) in ("loguniform", "uniform", "randint")
               or all(isinstance(r.params.get(k), (int, float)) and not isinstance(r.params.get(k), bool)
                      for r in rows if k in r.params)]
    categorical = [k for k in keys if k not in numeric]
    scored = [r for r in rows if not math.isnan(r.best_value)]
    if numeric and scored:
        x_key = "train.lr" if "train.lr" in numeric else numeric[0]
        group_key = "model.freeze" if "model.freeze" in categorical else (categorical[0] if categorical else None)
        fig, ax = plt.subplots(figsize=(6, 4.5))
        groups = sorted({str(r.params.get(group_key)) for r in scored}) if group_key else ["all"]
        for group in groups:
            members = [r for r in scored if not group_key or str(r.params.get(group_key)) == group]
            ax.scatter([r.params[x_key] for r in members], [r.best_value for r in members], s=40,
                       label=f"{group_key}={group}" if group_key else None)
        spec = next(iter(sweep.search.space[x_key]))
        if spec == "loguniform" or (x_key == "train.lr" and min(r.params[x_key] for r in scored) > 0):
            ax.set_xscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel(f"best {metric}")
        ax.set_title(f"{metric} by {x_key}" + (f" and {group_key}" if group_key else ""))
        if group_key:
            ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{x_key.split('.')[-1]}_by_{group_key.split('.')[-1]}.png" if group_key else f"{x_key.split('.')[-1]}.png"
        paths.append(folder / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths

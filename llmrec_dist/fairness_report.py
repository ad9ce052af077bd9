"""The fairness and bias report of ``llmrec-dist evaluate --report``: gather per-user results, compute the
figures (:mod:`llmrec_dist.fairness`), write ``report.json``, ``report.md`` and ``report.png``, and log them
to an MLflow run named ``fairness-<split>``.

Groupings: the users' number of training interactions (``history_length``, buckets of
:data:`llmrec_dist.fairness.HISTORY_EDGES`) always, and each column of the dataset's ``users.parquet``
when it has one (``prepare`` writes it for ml-1m, ml-100k and ``--user-attrs``). Users without a value
fall in the group ``(unknown)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmrec_dist import fairness
from llmrec_dist.data import dataset_format
from llmrec_dist.data.user_attributes import AGE_BANDS

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
ARTIFACT_DIR = "fairness"
HISTORY_GROUPING = "history_length"
AGE_ORDER = list(AGE_BANDS.values())  # MovieLens age bands youngest first; other groupings: largest first


# ---------------------------------------------------------------------------------------------
# Inputs from the dataset
# ---------------------------------------------------------------------------------------------


def _split_users(data_path: str, split: str) -> pa.Table:
    """``user_idx`` and ``user_key`` of ``split``, sorted by user_idx (the order of ``load_eval_rows``)."""
    tables = [dataset_format.read_parquet_file(f, columns=["user_idx", "user_key"])
              for f in dataset_format.split_files(data_path, split)]
    return pa.concat_tables(tables).sort_by("user_idx")


def train_lengths(data_path: str, user_idx: np.ndarray) -> np.ndarray:
    """Each user's number of training interactions (train split; 0 for a user without a train row)."""
    tables = [dataset_format.read_parquet_file(f, columns=["user_idx", "items"])
              for f in dataset_format.split_files(data_path, "train")]
    train = pa.concat_tables(tables)
    lengths = np.zeros(int(max(user_idx.max(initial=0), 0)) + 1, dtype=np.int64)
    index = train.column("user_idx").to_numpy()
    keep = index < len(lengths)
    lengths[index[keep]] = pc.list_value_length(train.column("items")).to_numpy()[keep]
    return lengths[user_idx]


def user_groupings(data_path: str, split: str, edges: Sequence[int] = fairness.HISTORY_EDGES
                   ) -> tuple[dict[str, np.ndarray], list[str]]:
    """``({grouping: label per row of the split}, attribute names)``: ``history_length`` first, then one
    per column of ``users.parquet`` (a user missing from it, or a null value: ``(unknown)``)."""
    users = _split_users(data_path, split)
    user_idx = users.column("user_idx").to_numpy()
    groupings = {HISTORY_GROUPING: fairness.length_buckets(train_lengths(data_path, user_idx), edges)}
    table = dataset_format.read_users(data_path)
    if table is None:
        return groupings, []
    keys = users.column("user_key").to_pylist()
    by_key = {k: i for i, k in enumerate(table.column("user_key").to_pylist())}
    position = np.array([by_key.get(k, -1) for k in keys], dtype=np.int64)
    attributes = [c for c in table.column_names if c != "user_key"]
    for name in attributes:
        values = np.asarray(table.column(name).to_pylist() + [None], dtype=object)[position]
        groupings[name] = np.array([fairness.UNKNOWN if v is None else str(v) for v in values], dtype=object)
    return groupings, attributes


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def build_report(ranks: np.ndarray, top: np.ndarray, histories: Sequence[np.ndarray], popularity: np.ndarray,
                 groupings: dict[str, np.ndarray], k: int = 10, min_users: int = fairness.MIN_GROUP_USERS,
                 edges: Sequence[int] = fairness.HISTORY_EDGES) -> dict:
    """The report's figures from per-user results (rows in one order throughout): ``overall``,
    ``groupings`` (per grouping its groups and the gap/ratio of NDCG@k and HR@k) and ``popularity``."""
    values = {f"ndcg_at_{k}": fairness.ndcg_at_k(ranks, k), f"hr_at_{k}": fairness.hr_at_k(ranks, k)}
    report = {
        "k": k,
        "users": int(len(ranks)),
        "min_group_users": min_users,
        "overall": {name: float(v.mean()) for name, v in values.items()},
        "groupings": {},
        "popularity": fairness.popularity_bias(top[:, :k], histories, popularity),
    }
    for name, labels in groupings.items():
        order = fairness.bucket_labels(edges) if name == HISTORY_GROUPING else AGE_ORDER if name == "age" else None
        rows = fairness.group_table(labels, values, min_users, order)
        report["groupings"][name] = {
            "groups": rows,
            **{metric: fairness.gap_and_ratio(rows, metric) for metric in values},
        }
    return report


def metric_label(text: str) -> str:
    """A group or grouping name as MLflow accepts it in a metric key: ``<18`` → ``lt18``, ``56+`` →
    ``56plus``, ``academic/educator`` → ``academic_educator``."""
    text = text.replace("<", "lt").replace(">", "gt").replace("+", "plus")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "_"


def report_metrics(report: dict) -> dict[str, float]:
    """The report's MLflow metrics: ``fair_gap_<grouping>`` / ``fair_ratio_<grouping>`` (NDCG@k),
    ``fair_hr_gap_<grouping>`` / ``fair_hr_ratio_<grouping>``, ``fair_ndcg_at_<k>_<grouping>_<group>``
    per group, and the popularity figures (``fair_popularity_ratio``, ``fair_long_tail_share_top<k>``,
    ``fair_long_tail_share_history``, ``fair_coverage_at_<k>``, ``fair_gini_exposure_at_<k>``). None is
    left out (a gap over fewer than two large groups)."""
    k = report["k"]
    out: dict[str, float | None] = {}
    for name, grouping in report["groupings"].items():
        label = metric_label(name)
        out[f"fair_gap_{label}"] = grouping[f"ndcg_at_{k}"]["gap"]
        out[f"fair_ratio_{label}"] = grouping[f"ndcg_at_{k}"]["ratio"]
        out[f"fair_hr_gap_{label}"] = grouping[f"hr_at_{k}"]["gap"]
        out[f"fair_hr_ratio_{label}"] = grouping[f"hr_at_{k}"]["ratio"]
        for row in grouping["groups"]:
            out[f"fair_ndcg_at_{k}_{label}_{metric_label(row['group'])}"] = row[f"ndcg_at_{k}"]
    pop = report["popularity"]
    out.update({
        "fair_popularity_ratio": pop["popularity_ratio"],
        f"fair_long_tail_share_top{k}": pop["long_tail_share_recommended"],
        "fair_long_tail_share_history": pop["long_tail_share_history"],
        f"fair_coverage_at_{k}": pop["coverage"],
        f"fair_gini_exposure_at_{k}": pop["gini_exposure"],
    })
    return {key: float(value) for key, value in out.items() if value is not None}


def _number(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict) -> str:
    """``report.md``: the overall figures, one table per grouping, the popularity-bias table."""
    k = report["k"]
    ndcg, hr = f"ndcg_at_{k}", f"hr_at_{k}"
    head = report.get("header", {})
    lines = ["# Fairness and bias report", ""]
    if head:
        lines += [f"- {key}: `{value}`" for key, value in head.items()] + [""]
    lines += [f"{report['users']:,} users; NDCG@{k} {_number(report['overall'][ndcg])}, HR@{k} "
              f"{_number(report['overall'][hr])}. Gaps (max − min) and ratios (max / min) are over the groups "
              f"with at least {report['min_group_users']} users; smaller groups are shown and marked *small*.", ""]
    for name, grouping in report["groupings"].items():
        lines += [f"## By {name.replace('_', ' ')}", "", f"| group | users | NDCG@{k} | HR@{k} | |",
                  "| --- | ---: | ---: | ---: | --- |"]
        lines += [f"| {row['group']} | {row['users']:,} | {_number(row[ndcg])} | {_number(row[hr])} | "
                  f"{'small' if row['small'] else ''} |" for row in grouping["groups"]]
        lines.append("")
        for metric, label in ((ndcg, f"NDCG@{k}"), (hr, f"HR@{k}")):
            gap = grouping[metric]
            if gap["gap"] is None:
                lines.append(f"{label}: fewer than two groups with at least {report['min_group_users']} users, "
                             "no gap.")
            else:
                lines.append(f"{label}: gap {_number(gap['gap'])}, ratio {_number(gap['ratio'], 2)} "
                             f"(best {gap['best']}, worst {gap['worst']}, {gap['groups_compared']} groups).")
        lines.append("")
    pop = report["popularity"]
    lines += [
        "## Popularity bias", "",
        "| figure | top-%d lists | histories |" % k, "| --- | ---: | ---: |",
        f"| mean training popularity of an item | {_number(pop['mean_popularity_recommended'], 1)} | "
        f"{_number(pop['mean_popularity_history'], 1)} |",
        f"| share of long-tail items | {_number(pop['long_tail_share_recommended'])} | "
        f"{_number(pop['long_tail_share_history'])} |",
        "",
        f"- popularity ratio (recommended / history): {_number(pop['popularity_ratio'], 2)}",
        f"- short head: the {pop['short_head_items']:,} most popular items, holding "
        f"{pop['short_head_share']:.0%} of the training interactions; every other item is long tail",
        f"- catalogue coverage@{k}: {_number(pop['coverage'])}",
        f"- Gini coefficient of exposure over the catalogue (top-{k} appearances per item): "
        f"{_number(pop['gini_exposure'])}",
        "",
    ]
    return "\n".join(lines)


def render_png(report: dict, path: Path) -> Path:
    """``report.png``: one bar chart of NDCG@k by group per grouping (small groups hatched and pale),
    the overall NDCG@k as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report["k"]
    groupings = list(report["groupings"].items())
    fig, axes = plt.subplots(len(groupings), 1, figsize=(9, 2.8 * len(groupings)), squeeze=False)
    for ax, (name, grouping) in zip(axes[:, 0], groupings):
        rows = grouping["groups"]
        heights = [row[f"ndcg_at_{k}"] for row in rows]
        bars = ax.bar(range(len(rows)), heights, color=["#b0b0b0" if r["small"] else "#3b75af" for r in rows])
        for bar, row in zip(bars, rows):
            if row["small"]:
                bar.set_hatch("//")
        ax.axhline(report["overall"][f"ndcg_at_{k}"], color="#c44e52", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r['group']}\n({r['users']})" for r in rows], fontsize=7,
                           rotation=45 if len(rows) > 8 else 0, ha="right" if len(rows) > 8 else "center",
                           rotation_mode="anchor")
        ax.set_ylabel(f"NDCG@{k}")
        ax.set_title(f"by {name.replace('_', ' ')}", fontsize=10)
    fig.suptitle(f"NDCG@{k} by group (dashed: all users; hatched: < {report['min_group_users']} users)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, folder: str | Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``folder`` (created), each through a
    temporary file renamed into place, so a reader never sees half a file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, write in ((REPORT_JSON, lambda p: p.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")),
                        (REPORT_MD, lambda p: p.write_text(render_markdown(report), encoding="utf-8")),
                        (REPORT_PNG, lambda p: render_png(report, p))):
        final = folder / name
        temp = folder / f".{name}.tmp{final.suffix}"  # the suffix tells matplotlib the format
        write(temp)
        temp.replace(final)
        paths.append(final)
    return paths


def log_report(report: dict, paths: Sequence[Path], metrics: dict[str, float], params: dict, tracking_uri: str,
               experiment: str, split: str) -> str:
    """Log params, the usual and the report's metrics, and the report files (under ``fairness/``) to a new
    MLflow run ``fairness-<split>`` of ``experiment``; returns its run id."""
    from llmrec_dist.tracking import RunLogger, end_run, start_run

    run_id = start_run(tracking_uri, experiment, run_name=f"fairness-{split}", tags={"llmrec.kind": "fairness"})
    status = "FAILED"
    try:
        logger = RunLogger(tracking_uri, run_id)
        logger.params(params)
        numbers = {key: float(v) for key, v in metrics.items() if isinstance(v, (int, float))}
        logger.metrics({**numbers, **report_metrics(report)}, step=0)
        for path in paths:
            logger.file(path, ARTIFACT_DIR)
        status = "FINISHED"
    finally:
        end_run(tracking_uri, run_id, status)
    return run_id


def fairness_report(folder: Path, data_path: str, split: str, cfg, report_dir: str | Path, tracking_uri: str,
                    experiment: str, model: str = "", k: int = 10, min_users: int = fairness.MIN_GROUP_USERS,
                    verify: bool = True, trust_remote_code: bool = False) -> tuple[dict, dict, list[Path], str]:
    """Evaluate the saved next-item model in ``folder`` on ``split`` in this process, build the report,
    write it to ``report_dir`` and log it; returns ``(usual metrics, report, files, MLflow run id)``."""
    from llmrec_dist.offline_eval import evaluate_per_user

    metrics, manifest, rows, results = evaluate_per_user(folder, data_path, split, cfg, k, verify,
                                                         trust_remote_code)
    groupings, attributes = user_groupings(data_path, split)
    report = build_report(results.ranks, results.top, rows.histories, dataset_format.item_popularity(data_path),
                          groupings, k, min_users)
    report = {"header": {"model": model or str(folder), "dataset": str(data_path), "split": split,
                         "content_hash": manifest["content_hash"], "exclude_seen": cfg.exclude_seen},
              **report, "metrics": metrics}
    paths = write_report(report, report_dir)
    params = {**report["header"], "k": k, "min_group_users": min_users,
              "history_edges": list(fairness.HISTORY_EDGES), "attributes": attributes or "none",
              "short_head_share": fairness.HEAD_SHARE}
    run_id = log_report(report, paths, metrics, params, tracking_uri, experiment, split)
    return metrics, report, paths, run_id

"""End to end: `llmrec-dist evaluate --report` on a tiny prepared dataset with user attributes and a tiny random
model: the usual metrics, the report files, the MLflow run ``fairness-test``; and what it refuses."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from llmrec_dist.cli import main
from llmrec_dist.data.prepare import prepare_dataset
from llmrec_dist.model import build_model
from llmrec_dist.tracking import client
from llmrec_dist.worker.checkpoint import cpu_state_dict, write_checkpoint
from registry_fixtures import TINY_MODEL, click_record, write_tiny_checkpoint
from mlflow_db import sqlite_uri

USERS = 60  # user u has 5 + u % 30 interactions: train histories of 3..32 items


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("fair")
    events = "".join(f"u{u},i{(u * 7 + t * 3) % 40},{t}\n" for u in range(USERS) for t in range(5 + u % 30))
    (root / "events.csv").write_text("user_id,item_id,timestamp\n" + events)
    (root / "items.csv").write_text("item_id,text\n" + "".join(f"i{i},Item {i}\n" for i in range(40)))
    # u0..u29 gold, u30..u57 silver, u58 and u59 without attributes: "(unknown)", a small group.
    (root / "users.csv").write_text("user_id,segment\n" + "".join(
        f"u{u},{'gold' if u < 30 else 'silver'}\n" for u in range(USERS - 2)))
    manifest = prepare_dataset("generic", root / "ds", min_interactions=3,
                               generic={"interactions": str(root / "events.csv"), "items": str(root / "items.csv")},
                               user_attributes={"file": str(root / "users.csv"), "columns": ["segment"]})
    items = manifest["counts"]["items"]
    ckpt = write_tiny_checkpoint(root / "ckpt", manifest["content_hash"], num_items=items)
    return root, manifest, ckpt


def test_evaluate_report_end_to_end(prepared, capsys):
    root, manifest, ckpt = prepared
    uri = sqlite_uri(root / 'mlflow.db')
    out = root / "report"
    code = main(["evaluate", "--model", str(ckpt), "--data", str(root / "ds"), "--split", "test", "--report",
                 "--report-dir", str(out), "--experiment", "fair", "--tracking-uri", uri, "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    metrics, report = printed["metrics"], printed["report"]
    # The per-user figures are those of the usual metrics, from the same pass.
    assert report["overall"]["ndcg_at_10"] == pytest.approx(metrics["test_ndcg_at_10"])
    assert report["overall"]["hr_at_10"] == pytest.approx(metrics["test_hr_at_10"])
    assert report["popularity"]["coverage"] == pytest.approx(metrics["test_coverage_at_10"])
    assert report["users"] == USERS
    segment = {r["group"]: (r["users"], r["small"]) for r in report["groupings"]["segment"]["groups"]}
    assert segment == {"gold": (30, False), "silver": (28, False), "(unknown)": (2, True)}
    history = report["groupings"]["history_length"]["groups"]
    assert [(r["group"], r["users"]) for r in history] == [("<10", 14), ("10-19", 20), ("20-49", 26)]
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]
    assert "## By segment" in (out / "report.md").read_text()

    mlflow = client(uri)
    [run] = mlflow.search_runs([mlflow.get_experiment_by_name("fair").experiment_id])
    assert run.info.run_name == "fairness-test" and run.info.run_id == printed["run_id"]
    assert run.data.metrics["fair_gap_segment"] == pytest.approx(report["groupings"]["segment"]["ndcg_at_10"]["gap"])
    assert run.data.metrics["test_ndcg_at_10"] == pytest.approx(metrics["test_ndcg_at_10"])
    assert {"fair_gini_exposure_at_10", "fair_ndcg_at_10_segment_unknown", "fair_ratio_history_length"} <= set(
        run.data.metrics)
    assert run.data.params["split"] == "test" and run.data.params["content_hash"] == manifest["content_hash"]
    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id, "fairness")}
    assert artifacts == {"fairness/report.json", "fairness/report.md", "fairness/report.png"}


def _click_model(root, manifest):
    torch.manual_seed(0)
    from llmrec_dist.pointwise import wrap_model

    items = manifest["counts"]["items"]
    weights = cpu_state_dict(wrap_model(build_model(TINY_MODEL, items), click_record()))
    meta = {"model": dataclasses.asdict(TINY_MODEL), "num_items": items, "dataset_hash": manifest["content_hash"],
            "task": click_record()}
    return write_checkpoint(root / "click", weights=weights, best_weights=weights, meta=meta, state={})


@pytest.mark.parametrize("extra, message", [
    (["--workers", "2"], "--report runs in this process on the model alone; drop --workers > 1"),
    (["--rerank", "x"], "drop --rerank"),
    ("click", "a click model scores pairs and ranks no catalogue"),
])
def test_report_refusals_are_one_line(prepared, capsys, extra, message):
    root, manifest, ckpt = prepared
    model = _click_model(root, manifest) if extra == "click" else ckpt
    argv = ["evaluate", "--model", str(model), "--data", str(root / "ds"), "--report", "--report-dir",
            str(root / "refused"), "--tracking-uri", f"sqlite:///{root / 'refused.db'}"]
    assert main(argv + ([] if extra == "click" else extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (root / "refused").exists()


def test_report_flags_need_report(prepared, capsys):
    root, _, ckpt = prepared
    assert main(["evaluate", "--model", str(ckpt), "--data", str(root / "ds"), "--report-dir", "x"]) == 2
    assert "only used with --report" in capsys.readouterr().err

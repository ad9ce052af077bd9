"""Benchmarks: the figures' arithmetic (hand-computed), the JSON files and the results table they make,
the catalogue-scaling benchmark in real subprocesses, and the ingest benchmark on the session's Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmrec_dist.bench import ceiling, common, memory, report, speed
from llmrec_dist.bench.ingest import summarise
from llmrec_dist.bench.speed import STARTUP_MILESTONES, startup_table
from llmrec_dist.cli import main as cli_main
from llmrec_dist.config import load_config
from mlflow_db import sqlite_uri


# ------------------------------------------------------------------------------------ arithmetic
def test_scaling_efficiency_is_throughput_2_over_twice_throughput_1():
    rows = [{"workers": 1, "sequences_per_s": 40.0}, {"workers": 2, "sequences_per_s": 72.0}]
    assert speed.scaling(rows) == {"scaling_efficiency_1_to_2": 0.9, "speedup_1_to_2": 1.8}
    assert speed.scaling(rows[:1]) == {}


def test_ceiling_splits_into_batch_effect_and_contention():
    figures = ceiling.ceiling_figures(solo_full=100.0, solo_half=80.0, pair_half=144.0)
    assert figures["ceiling_1_to_2"] == pytest.approx(0.72)  # 144 / (2 x 100)
    assert figures["batch_effect"] == pytest.approx(0.8)  # 80 / 100
    assert figures["contention"] == pytest.approx(0.9)  # 144 / (2 x 80)
    assert figures["ceiling_1_to_2"] == pytest.approx(figures["batch_effect"] * figures["contention"])
    measured = {"scaling_efficiency_1_to_2": 0.648, "machine_ceiling": figures}
    assert speed.against_ceiling(measured) == {"scaling_share_of_ceiling": pytest.approx(0.9)}
    assert speed.against_ceiling({"scaling_efficiency_1_to_2": 0.648}) == {}


def test_half_batches_give_each_part_every_other_row_of_the_same_full_batches():
    rows = [[1] * n for n in range(2, 42)]  # 40 rows of lengths 2 .. 41
    full = list(ceiling.half_batches(rows, batch_size=8, max_len=50, length_buckets=2, seed=3, part=0, parts=1))
    halves = [list(ceiling.half_batches(rows, 8, 50, 2, 3, part=p, parts=2)) for p in (0, 1)]
    assert len(full) == 5 and all(len(b) == 8 for b in full)  # 40 rows: no short batch to drop
    for batch, even, odd in zip(full, *halves):
        assert even == batch[0::2] and odd == batch[1::2]
        # a full batch is sorted by length, so the halves interleave: each pads to nearly the same length
        lengths = [len(r) for pair in zip(even, odd) for r in pair]
        assert lengths == sorted(lengths)
    short = list(ceiling.half_batches(rows[:36], 8, 50, 2, 3, part=0, parts=1))
    assert all(len(b) == 8 for b in short) and len(short) == 4  # the chunks' short batches are dropped


def test_startup_table_gives_each_milestone_its_time_since_the_previous_one():
    rows = startup_table([{"workers": 2, "startup_milestones_s": {"ray_ready": 7.0, "loop_start": 30.5,
                                                                   "first_step": 34.0}}])
    assert [(r["milestone"], r["at_s"], r["took_s"]) for r in rows] == [
        ("ray_ready", 7.0, 7.0), ("loop_start", 30.5, 23.5), ("first_step", 34.0, 3.5)]


def test_full_softmax_estimate_counts_logits_softmax_and_gradient():
    # 64 x 200 positions, 10,000 items + padding, fp32, three tensors
    assert memory.full_softmax_bytes(12_800, 10_000) == 3 * 12_800 * 10_001 * 4


def test_crossover_finds_first_faster_sampled_size_and_first_size_that_does_not_fit():
    rows = [
        {"num_items": 10, "loss": "full", "seconds_per_step": 0.1},
        {"num_items": 10, "loss": "sampled", "seconds_per_step": 0.2},
        {"num_items": 100, "loss": "full", "seconds_per_step": 0.3},
        {"num_items": 100, "loss": "sampled", "seconds_per_step": 0.25},
        {"num_items": 1000, "loss": "full", "skipped": "does not fit", "logits_gib_estimate": 40.0},
        {"num_items": 1000, "loss": "sampled", "seconds_per_step": 0.3},
    ]
    assert memory.crossover(rows) == {"sampled_faster_from": 100, "full_does_not_fit_from": 1000}


def test_ingest_summary_uses_the_slowest_worker_and_reports_epoch_zero_apart():
    workers = [
        {"rank": 1, "peak_rss_mb": 300.0, "epochs": [{"seconds": 4.0, "sequences": 100, "sequences_per_s": 25.0},
                                                     {"seconds": 1.0, "sequences": 100, "sequences_per_s": 100.0}]},
        {"rank": 0, "peak_rss_mb": 200.0, "epochs": [{"seconds": 2.0, "sequences": 100, "sequences_per_s": 50.0},
                                                     {"seconds": 2.0, "sequences": 100, "sequences_per_s": 50.0}]},
    ]
    cfg = load_config(None, ["data.path=/x"])
    out = summarise(workers, 1.5, cfg)
    assert [e["sequences_per_s"] for e in out["per_epoch"]] == [50.0, 100.0]  # 200 rows / slowest worker
    assert out["sequences_per_s"] == 100.0  # epoch 1 only
    assert out["sequences_per_s_per_worker"] == [50.0, 100.0]  # rank order
    assert out["peak_rss_mb_per_worker"] == [200.0, 300.0]


def test_parse_outcome_takes_the_json_after_ray_log_lines():
    stdout = "(RayTrainWorker pid=1) {not json}\nsome log\n{\n  \"run_id\": \"abc\",\n  \"metrics\": {}\n}\n"
    assert speed.parse_outcome(stdout)["run_id"] == "abc"
    with pytest.raises(ValueError, match="no JSON outcome"):
        speed.parse_outcome("only logs\n")


def test_table_aligns_columns_and_prints_missing_values_as_dash():
    text = common.table([{"a": "x", "b": 1.23456}, {"a": "longer"}], [("a", "name", ""), ("b", "value", ".2f")])
    assert text.splitlines() == ["name    value", "x        1.23", "longer      -"]


# ----------------------------------------------------------------------------- JSON + results table
def _result(tmp_path, kind, figures, label="", config=None):
    return common.write_result(tmp_path, kind, label=label, config=config or {"file": "c.yaml"}, figures=figures,
                               dataset={"path": "/d"}, command="llmrec-dist bench " + kind)


def test_write_result_records_provenance_atomically(tmp_path):
    path = _result(tmp_path, "quality", {"test_ndcg_at_10": 0.1}, label="ml-1m/id")
    assert path.name == "quality-ml-1m-id.json"
    data = json.loads(path.read_text())
    assert data["benchmark"] == "quality" and data["label"] == "ml-1m/id"
    assert data["figures"] == {"test_ndcg_at_10": 0.1} and data["dataset"] == {"path": "/d"}
    assert data["machine"]["cores"] and data["machine"]["versions"]["torch"]
    assert data["git_revision"] == common.git_revision()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_readme_table_is_generated_between_markers_and_idempotent(tmp_path):
    _result(tmp_path, "quality", {"test_ndcg_at_10": 0.1234, "test_hr_at_10": 0.25, "test_mrr_at_10": 0.09,
                                  "best_epoch": 9, "epochs_run": 12, "wall_seconds": 600}, label="id")
    _result(tmp_path, "quality", {"test_ndcg_at_10": 0.2, "best_epoch": 3, "epochs_run": 4, "wall_seconds": 60},
            label="b32", config={"file": "c.yaml", "resolved": {"train": {"batch_size": 32, "lr": 0.003,
                                                                         "schedule": "constant",
                                                                         "exclude_seen": True},
                                                               "model": {"hidden_size": 128, "num_layers": 3,
                                                                         "dropout": 0.2},
                                                               "data": {"windows": True}}})
    _result(tmp_path, "quality", {"test_ndcg_at_10": 0.21, "best_epoch": 3, "epochs_run": 4, "wall_seconds": 60},
            label="llama", config={"file": "c.yaml", "resolved": {"model": {"hidden_size": 128, "num_layers": 3,
                                                                            "dropout": 0.2, "block": "llama"}}})
    _result(tmp_path, "speed", {"rows": [{"workers": 1, "sequences_per_s": 40.0, "epoch_seconds": 150.0,
                                          "startup_seconds": 30.0, "ray_init_to_first_step_seconds": 20.0,
                                          "peak_rss_mb": 2000.0},
                                         {"workers": 2, "sequences_per_s": 72.0, "epoch_seconds": 90.0}],
                                "scaling_efficiency_1_to_2": 0.9, "speedup_1_to_2": 1.8}, label="ml-1m")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\nbefore\n{report.START}\nold table\n{report.END}\nafter\n")
    assert report.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert text.startswith("# Title\nbefore\n") and text.endswith(f"{report.END}\nafter\n")
    assert "old table" not in text
    assert "| quality: id | NDCG@10 0.1234 · HR@10 0.2500 · MRR@10 0.0900 | best epoch 9 of 12, 10 min |" in text
    assert "| quality: b32 | NDCG@10 0.2000 · HR@10 – · MRR@10 – | best epoch 3 of 4, 1 min; batch 32, lr 0.003, " \
           "constant; hidden 128, 3 blocks, dropout 0.2; windows; history left out of the training softmax |" \
           in text
    assert "| best epoch 3 of 4, 1 min; hidden 128, 3 Llama blocks, dropout 0.2 |" in text
    assert "| speed: 1 worker(s) (ml-1m) | 40.0 seq/s · 150.0 s/epoch |" in text
    assert "| speed: scaling 1 → 2 workers (ml-1m) | 90% efficiency | speed-up 1.80× |" in text
    _result(tmp_path, "speed", {"rows": [], "scaling_efficiency_1_to_2": 0.81, "speedup_1_to_2": 1.62,
                                "machine_ceiling": ceiling.ceiling_figures(100.0, 95.0, 171.0),
                                "scaling_share_of_ceiling": 0.9}, label="other")
    report.update_readme(readme, tmp_path)
    assert ("| speed: scaling 1 → 2 workers (other) | 81% efficiency | speed-up 1.62×; machine ceiling 86% "
            "(training step without Ray or DDP: batch effect 95% × contention 90%), so Ray + DDP keep 90% of it |"
            in readme.read_text())
    assert "Measured on " in text
    assert not report.update_readme(readme, tmp_path)  # a second run changes nothing


def test_a_hand_written_report_detail_ends_the_row(tmp_path):
    path = _result(tmp_path, "quality", {"test_ndcg_at_10": 0.2, "best_epoch": 3, "epochs_run": 4,
                                         "wall_seconds": 60},
                   label="old", config={"file": "c.yaml", "resolved": {"train": {"batch_size": 32, "lr": 0.003,
                                                                                "exclude_seen": True}}})
    data = json.loads(path.read_text())
    data["report_detail"] = "the training row's items only"
    path.write_text(json.dumps(data))
    text = report.render(common.read_results(tmp_path))
    assert ("| best epoch 3 of 4, 1 min; batch 32, lr 0.003, cosine; history left out of the training softmax; "
            "the training row's items only |") in text


def test_quality_is_shown_next_to_its_own_datasets_published_figures():
    from llmrec_dist.bench.quality import anchor_rows, anchor_set

    beauty = {"users": 22363, "items": 12101, "interactions": 198502}
    rows = anchor_rows({"test_ndcg_at_10": 0.05, "test_hr_at_10": 0.09}, "ours", beauty)
    assert [r["model"] for r in rows][:2] == ["SASRec (BCE)", "ICLRec"] and rows[-1]["ndcg"] == 0.0531
    assert {"model": "ours", "ndcg": 0.05, "hr": 0.09} in rows
    assert anchor_set({"users": 6040, "items": 3416, "interactions": 999611})[0] == "ml-1m"
    assert anchor_set({"users": 610, "items": 9724, "interactions": 100836}) == (None, None)
    assert anchor_rows({"test_ndcg_at_10": 0.1}, "ours", {"users": 1}) == [{"model": "ours", "ndcg": 0.1, "hr": None}]


def test_lm_memory_and_startup_results_get_rows(tmp_path):
    case = {"freeze": "full", "batch_per_worker": 32, "lm_items_per_step": 0, "lm_items": 1451,
            "peak_rss_mb": 3000.0, "estimate_mb": 2700.0, "estimate_error": -0.1, "seconds_per_step": 12.345,
            "num_items": 9724, "max_distinct_items": 1195}
    _result(tmp_path, "lm-memory", {"rows": [case, {**case, "freeze": "frozen", "lm_items": None,
                                                    "peak_rss_mb": 900.0, "estimate_mb": 990.0,
                                                    "estimate_error": 0.1},
                                             {"overrides": [], "error": "boom", "returncode": 1}],
                                    "slopes": {"full": {"mb_per_lm_item": 1.234, "intercept_mb": 1500.0,
                                                        "points": 3}}}, label="small")
    _result(tmp_path, "startup", {"rows": [{"run": "quiet", "seconds": 100.0, "lines": 20},
                                           {"run": "loaded", "seconds": 150.0, "lines": 21}],
                                  "busy": 2, "cores": 2, "ratio": 1.5, "startup_ratio": 1.25})
    text = report.render(common.read_results(tmp_path))
    assert ("| LM memory: full, batch 32, 1,451 LM items (every distinct item) (small) | peak 3,000 MB · "
            "estimate 2,700 MB (-10%) | 12.35 s/step; 9,724 items, 1,195 distinct in the largest step |") in text
    assert "| LM memory: frozen, batch 32 (small) | peak 900 MB · estimate 990 MB (+10%) |" in text
    assert "| LM memory: full slope (small) | 1.23 MB per LM item per step | +1,500 MB; 3 points |" in text
    assert ("| quickstart under load | 100 s quiet · 150 s beside 2 busy processes (1.50×; start-up 1.25×) | "
            "20 and 21 lines printed; 2 cores |") in text


def test_a_refit_gets_its_own_row_after_the_validated_run(tmp_path):
    _result(tmp_path, "quality", {"test_ndcg_at_10": 0.19, "test_hr_at_10": 0.33, "test_mrr_at_10": 0.15,
                                  "best_epoch": 18, "epochs_run": 20, "wall_seconds": 1800,
                                  "refit": {"test_ndcg_at_10": 0.2, "test_hr_at_10": 0.34, "test_mrr_at_10": 0.16,
                                            "refit_epochs": 19, "best_epoch": 18, "epochs_run": 19,
                                            "wall_seconds": 1740}}, label="id")
    _result(tmp_path, "quality", {"test_ndcg_at_10": 0.21, "refit_epochs": 7, "best_epoch": 6, "epochs_run": 7,
                                  "wall_seconds": 600}, label="alone")
    text = report.render(common.read_results(tmp_path))
    assert "| quality: id | NDCG@10 0.1900 · HR@10 0.3300 · MRR@10 0.1500 | best epoch 18 of 20, 30 min |" in text
    assert ("| quality: id, refit | NDCG@10 0.2000 · HR@10 0.3400 · MRR@10 0.1600 | refit through the validation "
            "item: 19 epochs (as validation chose), 29 min |") in text
    assert ("| quality: alone | NDCG@10 0.2100 · HR@10 – · MRR@10 – | refit through the validation item: 7 epochs "
            "(as validation chose), 10 min |") in text


def test_rating_and_click_runs_show_their_own_metrics(tmp_path):
    config = {"file": "c.yaml", "resolved": {"task": {"type": "rating"}, "train": {"exclude_seen": True,
              "batch_size": 64, "lr": 0.001}}}
    _result(tmp_path, "quality", {"task": "rating", "test_rmse": 0.9429, "test_mae": 0.7288, "test_pairs": 610,
                                  "best_epoch": 3, "epochs_run": 8, "wall_seconds": 73}, label="r", config=config)
    _result(tmp_path, "quality", {"task": "click", "test_auc": 0.85, "test_gauc": float("nan"), "test_logloss": 0.39,
                                  "best_epoch": 4, "epochs_run": 5, "wall_seconds": 60}, label="c")
    text = report.render(common.read_results(tmp_path))
    assert ("| quality: r | RMSE 0.9429 · MAE 0.7288 | best epoch 3 of 8, 1 min; batch 64, lr 0.001, cosine; "
            "rating task, 610 test pairs |") in text
    # one pair per user (click labels from ratings): no user has both classes, GAUC is undefined
    assert "| quality: c | AUC 0.8500 · GAUC – · log loss 0.3900 | best epoch 4 of 5, 1 min |" in text


def test_results_from_two_machines_name_their_machine_on_each_row(tmp_path):
    _result(tmp_path, "quality", {"test_ndcg_at_10": 0.1, "best_epoch": 1, "epochs_run": 2, "wall_seconds": 60},
            label="here")
    path = _result(tmp_path, "quality", {"test_ndcg_at_10": 0.2, "best_epoch": 1, "epochs_run": 2,
                                         "wall_seconds": 60}, label="there")
    data = json.loads(path.read_text())
    data["machine"] = {**data["machine"], "cpu": "Other CPU", "cores": 4}
    path.write_text(json.dumps(data))
    text = report.render(common.read_results(tmp_path))
    here = common.describe_machine(common.machine())
    first, second = sorted([here, common.describe_machine(data["machine"])])
    assert text.startswith(f"Measured on (A) {first}; (B) {second}.\n")
    there_letter = "A" if first.startswith("4-core Other CPU") else "B"
    assert f"`quality-there.json` @ {data['git_revision'][:8]} · machine {there_letter} |" in text
    assert f"`quality-here.json` @ {data['git_revision'][:8]} · machine {'AB'.replace(there_letter, '')} |" in text


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="no results markers"):
        report.update_readme(readme, tmp_path)
    assert readme.read_text() == "# no markers\n"


def test_shipped_benchmarks_table_matches_the_shipped_results():
    """docs/benchmarks.md's table is exactly what `bench report` makes from benchmarks/results, and the
    documented regeneration command names that file."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    table = text.split(report.START, 1)[1].split(report.END, 1)[0].strip()
    assert table == report.render(common.read_results(root / common.DEFAULT_OUT)).strip()
    assert "llmrec-dist bench report --readme docs/benchmarks.md" in text
    assert report.START not in (root / "README.md").read_text(encoding="utf-8"), "one generated table, in docs/"


# -------------------------------------------------------------------------- real runs, tiny sizes
def test_head_scaling_runs_each_case_in_its_own_process_and_skips_what_cannot_fit(monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2 * memory.full_softmax_bytes(8 * 12, 1000))
    out = memory.head_scaling([200, 5000], batch=8, length=12, steps=1, num_negatives=8)
    rows = {(r["num_items"], r["loss"]): r for r in out["rows"]}
    assert rows[(5000, "full")]["skipped"] == "does not fit"  # over the (patched) budget
    for key in [(200, "full"), (200, "sampled"), (5000, "sampled")]:
        r = rows[key]
        assert r["seconds_per_step"] > 0 and r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
        assert r["positions"] == 96 and r["final_loss"] > 0
    assert rows[(5000, "sampled")]["params"] > rows[(200, "sampled")]["params"]
    assert out["full_does_not_fit_from"] == 5000 and out["sampled_faster_from"] in (200, 5000)


@pytest.mark.integration
def test_ingest_benchmark_streams_every_training_row_on_every_worker(ray_cluster, synthetic_dataset):
    from llmrec_dist.bench.ingest import run_ingest
    from llmrec_dist.data.dataset_format import num_train_rows, read_manifest

    cfg = load_config(None, [f"data.path={synthetic_dataset}", "scaling.num_workers=2", "train.batch_size=32"])
    out = run_ingest(cfg, epochs=2)
    rows = num_train_rows(read_manifest(synthetic_dataset))
    assert out["workers"] == 2 and len(out["per_epoch"]) == 2
    for epoch in out["per_epoch"]:
        assert epoch["sequences"] == rows // 2 * 2  # Ray Data's equal split drops the remainder
        assert epoch["sequences_per_s"] > 0
    assert len(out["peak_rss_mb_per_worker"]) == 2 and min(out["peak_rss_mb_per_worker"]) > 50


# ------------------------------------------------------------------------------------------- CLI
def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for kind in ("quality", "speed", "ingest", "memory", "towers", "report"):
        assert kind in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "speed", "--config", "c.yaml", "--workers", "0"], "expected positive integers"),
    (["bench", "memory", "--sizes", "ten"], "expected comma-separated integers"),
    (["bench", "speed", "--config", "c.yaml", "--ceiling-steps", "-1"], "expected a non-negative integer"),
    (["bench", "fast"], "invalid choice"),
])
def test_bench_bad_flags_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_quality_refit_refuses_a_config_that_is_already_a_refit(synthetic_dataset, capsys):
    config = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    argv = ["bench", "quality", "--config", config, "--refit", f"data.path={synthetic_dataset}",
            "train.refit_epochs=1", "mlflow.registered_model="]
    assert cli_main(argv) == 2
    assert "--refit runs the validated run first" in capsys.readouterr().err


def test_bench_report_errors_name_the_problem(tmp_path, capsys):
    assert cli_main(["bench", "report", "--results", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert cli_main(["bench", "report", "--results", str(tmp_path), "--readme", str(readme)]) == 2
    assert "no results markers" in capsys.readouterr().err


def test_bench_towers_unknown_cell_exits_2(tmp_path, synthetic_dataset, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {item_repr: id}\n")
    code = cli_main(["bench", "towers", "--config", str(config), f"data.path={synthetic_dataset}",
                     "--cells", "id:frozen", "--out", str(tmp_path)])
    assert code == 2
    assert "unknown cell id:frozen" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_bench_speed_command_measures_one_worker_end_to_end(tmp_path, synthetic_dataset):
    """`bench speed` runs a real `llmrec-dist train` process; its JSON has throughput, start-up,
    the per-step profile and per-worker memory."""
    config = tmp_path / "c.yaml"
    config.write_text("model: {max_len: 20, hidden_size: 16, num_heads: 1, num_layers: 1}\n"
                      "train: {batch_size: 16}\neval: {batch_size: 64}\n")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from llmrec_dist.cli import main; sys.exit(main())", "bench",
         "speed", "--config", str(config), f"data.path={synthetic_dataset}",
         f"train.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={sqlite_uri(tmp_path / 'mlflow.db')}",
         "--workers", "1", "--epochs", "1", "--profile-steps", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "speed.json").read_text())
    (row,) = data["figures"]["rows"]
    assert row["workers"] == 1 and row["sequences_per_s"] > 0 and row["epoch_seconds"] > 0
    assert 0 < row["ray_init_to_first_step_seconds"] < row["startup_seconds"] < row["command_seconds"]
    assert len(row["peak_rss_mb_per_worker"]) == 1 and row["peak_rss_mb_per_worker"][0] > 100
    profile = row["profile_ms_per_step"]
    assert set(profile) == {"data", "forward", "loss", "backward", "allreduce", "optimizer"}
    assert 0 < profile["loss"] <= profile["forward"] < row["profile_step_ms"]
    assert profile["allreduce"] == 0  # one worker: no DDP, nothing to all-reduce
    assert "scaling_efficiency_1_to_2" not in data["figures"]
    milestones = row["startup_milestones_s"]
    assert list(milestones) == list(STARTUP_MILESTONES)
    assert milestones["first_step"] == pytest.approx(row["ray_init_to_first_step_seconds"])
    assert "loop_start" in proc.stdout and "took s" in proc.stdout  # the start-up table is printed
    assert data["dataset"]["content_hash"] and data["config"]["overrides"]


@pytest.mark.integration
@pytest.mark.slow
def test_machine_ceiling_times_the_three_cases_in_real_processes(tmp_path, synthetic_dataset):
    """The bare training step: one process at the full batch, one at half, two at half together
    (started by the barrier, each timed while the other runs)."""
    config = tmp_path / "c.yaml"
    config.write_text("model: {max_len: 20, hidden_size: 16, num_heads: 1, num_layers: 1, item_repr: id}\n"
                      "train: {batch_size: 16}\n")
    figures = ceiling.run_ceiling(str(config), [f"data.path={synthetic_dataset}"], steps=3, warmup=1)
    cases = figures["cases"]
    assert [len(cases[c]) for c in ("solo_full", "solo_half", "pair_half")] == [1, 1, 2]
    assert cases["solo_full"][0]["rows_per_step"] == 16 and cases["solo_half"][0]["rows_per_step"] == 8
    assert sorted(r["part"] for r in cases["pair_half"]) == [0, 1]
    assert all(r["steps"] == 3 and r["sequences_per_s"] > 0 for rs in cases.values() for r in rs)
    pair = sum(r["sequences_per_s"] for r in cases["pair_half"])
    assert figures["ceiling_1_to_2"] == pytest.approx(pair / (2 * cases["solo_full"][0]["sequences_per_s"]))
    table = ceiling.case_table(figures)
    assert [row["processes"] for row in table] == [1, 1, 2]
    assert table[2]["sequences_per_s"] == pytest.approx(pair)
    with pytest.raises(RuntimeError, match="ceiling case"):
        ceiling.run_case(str(config), [f"data.path={tmp_path / 'missing'}"], steps=1, parts=1, processes=1)


# ------------------------------------------------------------------------------ single-process probe
ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def load_probe():
    """benchmarks/probe.py is a script, not part of the package: import it from its folder."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import probe
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return probe


def test_probe_trains_and_reports_validation_per_epoch(synthetic_dataset, capsys):
    """The probe script (no Ray): one JSON line per epoch; on the synthetic catalogue (whose sequences
    follow item chains) the loss falls and validation NDCG@10 rises well above chance."""
    rows = load_probe().main(["--config", str(QUICKSTART), f"data.path={synthetic_dataset}", "model.item_repr=id",
                              "train.batch_size=32", "train.lr=3e-3", "--epochs", "3", "--eval-users", "200"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == rows and [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["steps"] for r in rows] == [10, 20, 30]  # 300 users, batch 32
    assert rows[2]["train_loss"] < rows[0]["train_loss"]
    # untrained models score 0.07-0.10 here (seeds 0-2); 3 epochs reach about 0.58
    assert rows[2]["valid_ndcg_at_10"] > 0.3


def test_probe_refuses_what_it_cannot_train(synthetic_dataset):
    with pytest.raises(SystemExit, match="only the causal backbone"):
        load_probe().main(["--config", str(QUICKSTART), f"data.path={synthetic_dataset}",
                           "model.backbone=bidirectional"])


def test_probe_takes_options_before_overrides_and_honours_the_sampled_loss(synthetic_dataset, capsys):
    """Options may come before the overrides, and train.loss=sampled trains as the recipe would (same
    seed, data and batches: a probe that ignored the key would print the full-softmax loss exactly)."""
    probe = load_probe()
    common_args = ["--epochs", "1", "--eval-users", "50", "--config", str(QUICKSTART),
                   f"data.path={synthetic_dataset}", "model.item_repr=id"]
    full = probe.main(common_args + ["train.loss=full"])[0]["train_loss"]
    sampled = probe.main(common_args + ["train.loss=sampled", "train.num_negatives=5"])[0]["train_loss"]
    assert abs(sampled - full) > 0.1  # 4.63 vs 4.22 (logQ-corrected, 5 negatives)


def test_growth_summary_and_rows_compare_the_smallest_and_largest_sizes(tmp_path):
    from llmrec_dist.bench.growth import growth_summary
    from llmrec_dist.bench.report import render

    def row(n, seconds, peak, trained, train_seconds=None, worker=None):
        r = {"interactions": n, "users": n // 10, "items": 1000, "prepare_seconds": seconds, "prepare_peak_mb": peak,
             "prepare_rows_per_s": n / seconds, "parts_per_split": 2,
             "prepared": {"items": 900, "train_interactions": n * 8 // 10}, "trained": trained}
        if trained:
            r.update(train_seconds=train_seconds, worker_peak_mb=worker,
                     train_interactions_per_s=r["prepared"]["train_interactions"] / train_seconds,
                     eval_users_per_s=50.0)
        return r

    rows = [row(10**6, 10, 300, True, 100, 1500), row(10**7, 110, 330, True, 1000, 1530), row(10**8, 1000, 345, False)]
    rows[-1].update(eval_users_per_s=20.0, worker_peak_mb=2000.0, eval_only_trained_sequences=10000)
    summary = growth_summary(rows)
    assert summary["prepare_time_ratio_per_interaction"] == pytest.approx(1.0)  # 100x rows, 100x time: linear
    assert summary["prepare_peak_ratio"] == pytest.approx(1.15) and summary["prepare_peak_goal_met"]
    assert summary["train_time_ratio_per_interaction"] == pytest.approx(1.0)
    assert summary["extrapolated_epoch_seconds"] == {"100000000": pytest.approx(8 * 10**7 / 8000)}
    _result(tmp_path, "growth", {"rows": rows, "summary": summary})
    text = render(common.read_results(tmp_path))
    assert ("| growth: 100,000,000 interactions | prepare --stream 1000 s (100,000 rows/s, peak 345 MB) · epoch not "
            "run: ~2.8 h extrapolated |") in text
    assert "full-ranking validation 50 users/s over 900 items" in text
    assert "full-ranking validation 20 users/s over 900 items (worker peak 2,000 MB, in a run that trained 10,000 users" \
        in text

"""`bench peers` without installing a peer: the exported exchange folder reproduces our split exactly, the
metrics come out of ranks as by hand, the runners' shared protocol ranks as llmrec_dist does, and a peer
that fails to install, crashes or hangs becomes a row that says so (fake venv pythons, no network)."""

from __future__ import annotations

import importlib.util
import json
import math
import stat
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from llmrec_dist.bench import peer_export, peers
from llmrec_dist.bench.peer_envs import PeerEnv, PeerSetupError, ensure_env
from llmrec_dist.cli import main as cli_main
from llmrec_dist.data.dataset_format import read_split

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from llmrec_dist.data.prepare import prepare_dataset

    folder = tmp_path_factory.mktemp("peers") / "synthetic"
    prepare_dataset("synthetic", folder, synthetic={"n_users": 60, "n_items": 80}, seed=1)
    return folder


@pytest.fixture(scope="module")
def exchange(dataset, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exchange") / "ex"
    peer_export.export_exchange(dataset, folder)
    return folder


def _split(dataset, name) -> dict[int, tuple[list[int], int | None]]:
    table = read_split(dataset, name)
    targets = table.column("target").to_pylist() if name != "train" else [None] * table.num_rows
    return dict(zip(table.column("user_idx").to_pylist(), zip(table.column("items").to_pylist(), targets)))


def test_the_recbole_file_orders_every_user_into_our_split(dataset, exchange):
    per_user = defaultdict(list)
    lines = (exchange / "recbole" / "llmrec" / "llmrec.inter").read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    for line in lines[1:]:
        user, item, stamp = line.split("\t")
        per_user[int(user)].append((float(stamp), int(item)))
    train, valid, test = _split(dataset, "train"), _split(dataset, "valid"), _split(dataset, "test")
    assert set(per_user) == set(test) and len(per_user) == 60
    for user, events in per_user.items():
        items = [item for _, item in sorted(events)]  # RecBole's time order (order: TO)
        assert items[-1] == test[user][1]
        assert items[-2] == valid[user][1]
        assert items[:-2] == train[user][0] == valid[user][0]
        assert items[:-1] == test[user][0]


def test_the_other_exchange_files_say_the_same(dataset, exchange):
    test = _split(dataset, "test")
    rows = (exchange / "sequences.tsv").read_text().splitlines()
    sequences = {int(u): [int(v) for v in s.split()] for u, s in (r.split("\t") for r in rows[1:])}
    assert sequences == {u: h + [t] for u, (h, t) in test.items()}
    meta = json.loads((exchange / "exchange.json").read_text())
    assert meta["users"] == 60 and meta["n_items"] == 80
    assert meta["interactions"] == sum(len(s) for s in sequences.values())
    by_user = defaultdict(list)
    for line in (exchange / "rectools" / "interactions.csv").read_text().splitlines()[1:]:
        user, item, weight, stamp, split = line.split(",")
        by_user[int(user)].append((stamp, int(item), split))
    for user, events in by_user.items():
        events.sort()
        assert [i for _, i, _ in events] == sequences[user]
        assert [s for _, _, s in events] == ["train"] * (len(events) - 2) + ["valid", "test"]


def test_a_dataset_whose_splits_disagree_is_refused_naming_the_user(dataset, monkeypatch, tmp_path):
    real = peer_export._rows

    def tampered(path, split):
        rows = real(path, split)
        if split == "test":
            user = sorted(rows)[3]
            history, target = rows[user]
            rows[user] = (history[:-1] + [history[-1] % 80 + 1], target)
        return rows

    monkeypatch.setattr(peer_export, "_rows", tampered)
    user = sorted(real(dataset, "test"))[3]
    with pytest.raises(peer_export.ExportError, match=f"user_idx {user}: the test history"):
        peer_export.export_exchange(dataset, tmp_path / "ex")


def test_metrics_from_ranks_as_by_hand():
    m = peers.metrics_from_ranks([1, 2, 11, None], prefix="test_")
    assert m["test_hr_at_10"] == pytest.approx(2 / 4)
    assert m["test_ndcg_at_10"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert m["test_mrr_at_10"] == pytest.approx((1 + 1 / 2) / 4)
    assert m["test_hr_at_20"] == pytest.approx(3 / 4)
    assert m["test_ndcg_at_20"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(12)) / 4)
    assert m["test_users"] == 4


def _peer_protocol(monkeypatch):
    spec = importlib.util.spec_from_file_location("peer_protocol", ROOT / "benchmarks" / "peers" / "peer_protocol.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "peer_protocol", module)  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_runners_rank_as_our_metrics_do(monkeypatch):
    protocol = _peer_protocol(monkeypatch)
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.9, 0.5, 0.2],
                           [9.0, 0.3, 0.3, 0.3, 0.3, 0.3]])
    # row 0: target 2 (0.5) behind item 3 (0.9) and tied with item 4: pessimistic rank 3; item 3 is
    # history, so masked it is rank 2; padding (column 0) never counts. Row 1: all tied, rank 5 (last).
    assert protocol.target_ranks(scores, [2, 1], None) == [3, 5]
    assert protocol.target_ranks(scores, [2, 1], [[3, 2], [1, 2]]) == [2, 4]
    assert protocol.ndcg_at_10([1, 3, 11]) == pytest.approx((1 + 0.5) / 3)
    from llmrec_dist.metrics import rankable_scores, target_ranks

    history = torch.tensor([[3, 2], [1, 2]])
    ours = target_ranks(rankable_scores(scores, torch.tensor([2, 1]), history), torch.tensor([2, 1])) + 1
    assert ours.tolist() == [2, 4]



def test_runner_early_stopping_by_patience_or_time_budget(monkeypatch):
    protocol = _peer_protocol(monkeypatch)
    stopper = protocol.EarlyStopping(patience=2)
    for epoch, value in enumerate([0.1, 0.2, 0.15]):
        stopper.update(epoch, value)
        assert not stopper.should_stop(epoch, seconds=1e9)  # no budget: time never stops it
    stopper.update(3, 0.19)
    assert stopper.should_stop(3) and stopper.stopped_by == "patience" and stopper.best_epoch == 1

    stopper = protocol.EarlyStopping(patience=5, budget_s=60)
    stopper.update(0, 0.1)
    assert not stopper.should_stop(0, seconds=59.9) and stopper.stopped_by == "max epochs"
    assert stopper.should_stop(0, seconds=60.0) and stopper.stopped_by == "time budget"

# --- fake venv pythons: the driver runs them exactly as it runs a peer's python -------------------------

FAKE_RUNNER = '''
import json, sys, time
args = sys.argv[1:]
out = args[args.index("--out") + 1]
mode = "{mode}"
epochs = open(out.rsplit("/", 1)[0] + "/epochs.jsonl", "w")
epochs.write(json.dumps({{"epoch": 0, "seconds_since_start": 1.5, "valid_ndcg_at_10": 0.2,
                          "train_seconds": 1.0, "own_valid_seconds": 0.2}}) + "\\n")
epochs.flush()
if mode == "crash":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("ValueError: cannot read the data", file=sys.stderr)
    sys.exit(1)
if mode == "hang":
    time.sleep(60)
rows = open(args[args.index("--exchange") + 1] + "/sequences.tsv").read().splitlines()[1:]
users = [int(row.split("\\t")[0]) for row in rows]
ranks = [1 + i % 20 for i in range(len(users))]
result = {{"best_epoch": 0, "best_valid_ndcg_at_10": 0.2, "stopped_early": False, "peak_rss_mb": 100.0,
          "epochs": [{{"epoch": 0, "seconds_since_start": 1.5, "valid_ndcg_at_10": 0.2, "train_seconds": 1.0,
                      "own_valid_seconds": 0.2}}],
          "test": {{"users": users, "ranks": ranks, "own_ranks": [r + 1 for r in ranks]}}}}
json.dump(result, open(out, "w"))
'''


def fake_python(folder: Path, mode: str) -> Path:
    """A venv python that runs a fake runner (it ignores the real runner path it is given)."""
    runner = folder / f"fake_runner_{mode}.py"
    runner.write_text(FAKE_RUNNER.format(mode=mode))
    python = folder / "python"  # one path whatever the mode, as a real venv's python
    python.write_text(f'#!/bin/sh\nshift\nexec "{sys.executable}" "{runner}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


def _run(dataset, tmp_path, monkeypatch, mode, timeout_s=120.0, settings=("matched",), reuse=False, patience=1):
    monkeypatch.setattr(peers, "ensure_env", lambda env, work, logs: (fake_python(tmp_path, mode), {"x": "1"}, True))
    options = peers.RunOptions(max_epochs=2, patience=patience, threads=1, timeout_s=timeout_s)
    return peers.run_peers(str(dataset), "t", ["recbole-sasrec"], list(settings), options, work=tmp_path / "work",
                           reuse=reuse)


def test_a_peer_run_gives_our_metrics_and_its_own(dataset, tmp_path, monkeypatch):
    figures = _run(dataset, tmp_path, monkeypatch, "ok")
    (row,) = figures["rows"]
    ranks = [1 + i % 20 for i in range(60)]
    assert row["status"] == "ok" and row["same_users"]
    assert row["test_ndcg_at_10"] == pytest.approx(peers.metrics_from_ranks(ranks)["ndcg_at_10"])
    assert row["own_test_hr_at_10"] == pytest.approx(sum(r + 1 <= 10 for r in ranks) / 60)
    assert row["seconds_to_best"] == 1.5 and row["mean_epoch_seconds"] == pytest.approx(1.2)
    assert row["peak_rss_mb"] >= 100.0 and row["versions"] == {"x": "1"}
    assert figures["exchange"]["users"] == 60
    assert "test NDCG@10" in peers.row_line(row)


def test_reuse_takes_a_finished_run_of_the_same_request_only(dataset, tmp_path, monkeypatch):
    (first,) = _run(dataset, tmp_path, monkeypatch, "ok")["rows"]
    (again,) = _run(dataset, tmp_path, monkeypatch, "crash", reuse=True)["rows"]  # would crash if it ran
    assert again["status"] == "ok" and again["reused"] and "reused" in peers.row_line(again)
    assert again["test_ndcg_at_10"] == first["test_ndcg_at_10"]
    assert again["wall_seconds"] == first["wall_seconds"] and again["peak_rss_mb"] == first["peak_rss_mb"]
    (changed,) = _run(dataset, tmp_path, monkeypatch, "crash", reuse=True, patience=3)["rows"]  # another request
    assert changed["status"] == "failed"
    (failed_before,) = _run(dataset, tmp_path, monkeypatch, "crash", reuse=True, patience=3)["rows"]
    assert failed_before["status"] == "failed"  # a failed run is never reused: it runs again
    (no_reuse,) = _run(dataset, tmp_path, monkeypatch, "crash")["rows"]
    assert no_reuse["status"] == "failed"  # without --reuse it runs again


def test_a_runner_that_crashes_is_a_row(dataset, tmp_path, monkeypatch):
    (row,) = _run(dataset, tmp_path, monkeypatch, "crash")["rows"]
    assert row["status"] == "failed"
    assert "exit code 1" in row["reason"] and "ValueError: cannot read the data" in row["reason"]
    assert len(row["epochs"]) == 1 and Path(row["log"]).is_file()


def test_a_runner_past_its_time_is_stopped_and_is_a_row(dataset, tmp_path, monkeypatch):
    (row,) = _run(dataset, tmp_path, monkeypatch, "hang", timeout_s=1.5)["rows"]
    assert row["status"] == "timeout" and row["wall_seconds"] < 30
    assert row["epochs"][0]["valid_ndcg_at_10"] == 0.2  # what it recorded before it was stopped
    (again,) = _run(dataset, tmp_path, monkeypatch, "ok", timeout_s=1.5, reuse=True)["rows"]
    assert again["status"] == "timeout" and again["reused"]  # the same request would time out again
    (longer,) = _run(dataset, tmp_path, monkeypatch, "ok", timeout_s=60.0, reuse=True)["rows"]
    assert longer["status"] == "ok"  # a longer timeout is another request: it runs


def test_a_peer_that_does_not_install_is_a_row_per_setting(dataset, tmp_path, monkeypatch):
    calls = []

    def broken(env, work, logs):
        calls.append(env.name)
        raise PeerSetupError("`pip install recbole==9.9.9` exited 1: ERROR: No matching distribution")

    monkeypatch.setattr(peers, "ensure_env", broken)
    options = peers.RunOptions(max_epochs=1, patience=1, threads=1)
    figures = peers.run_peers(str(dataset), "t", ["recbole-sasrec", "recbole-bert4rec"], ["defaults", "matched"],
                              options, work=tmp_path / "work")
    assert [r["status"] for r in figures["rows"]] == ["install_failed"] * 4
    assert "No matching distribution" in figures["rows"][0]["reason"]
    assert calls == ["recbole-1.2.1"]  # one environment for both RecBole models, tried once


def test_a_venv_that_cannot_be_made_raises_setup_error(tmp_path):
    failing = tmp_path / "python-broken"
    failing.write_text("#!/bin/sh\necho 'Error: no venv module' >&2\nexit 1\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    env = PeerEnv("nopeer", "0.0.1", ("nopeer==0.0.1",), "nopeer")
    with pytest.raises(PeerSetupError, match="exited 1: Error: no venv module"):
        ensure_env(env, tmp_path / "work", tmp_path / "logs", base_python=str(failing))


def test_the_cli_writes_failures_into_the_result_file(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "ensure_env", lambda env, work, logs: (fake_python(tmp_path, "crash"), {}, True))
    code = cli_main(["bench", "peers", "--data", str(dataset), "--label", "syn", "--peers", "rectools-sasrec",
                     "--settings", "defaults", "--max-epochs", "1", "--work", str(tmp_path / "work"),
                     "--out", str(tmp_path / "results")])
    assert code == 0
    result = json.loads((tmp_path / "results" / "peers-syn.json").read_text())
    assert result["figures"]["rows"][0]["status"] == "failed"
    assert result["dataset"]["counts"]["users"] == 60 and result["machine"]["cores"]
    assert cli_main(["bench", "peers", "--data", str(dataset), "--peers", "lightfm"]) == 2


def test_parsing_choices_and_matched_settings():
    assert peers.parse_choices("recbole-sasrec, rectools-bert4rec", peers.PEERS, "--peers") == \
        ["recbole-sasrec", "rectools-bert4rec"]
    with pytest.raises(ValueError, match="unknown lightfm; valid: recbole-sasrec"):
        peers.parse_choices("lightfm", peers.PEERS, "--peers")
    assert peers.parse_matched("dropout=0.2,max_len=200") == {**peers.MATCHED, "dropout": 0.2, "max_len": 200}
    with pytest.raises(ValueError, match="key in max_len"):
        peers.parse_matched("depth=3")


def test_time_to_quality_reads_each_systems_epochs():
    def row(system, curve, seconds):
        return {"system": system, "settings": "matched", "status": "ok", "best_valid_ndcg_at_10": max(curve),
                "epochs": [{"epoch": i, "valid_ndcg_at_10": v, "seconds_since_start": s}
                           for i, (v, s) in enumerate(zip(curve, seconds))]}

    result = {"figures": {"rows": [row("recbole-sasrec", [0.05, 0.08, 0.07], [10, 20, 30]),
                                   row("rectools-sasrec", [0.06, 0.07], [5, 9]),
                                   {"system": "x", "settings": "defaults", "status": "failed"}]}}
    ours = {"figures": {"valid_curve": [0.04, 0.09], "mean_epoch_seconds": 10.0, "wall_seconds": 35.0,
                        "epochs_run": 2}}
    t = peers.time_to_quality(result, {"llmrec_dist (id)": ours})
    assert t["threshold"] == 0.08 and t["set_by"] == "recbole-sasrec (matched)"
    assert [s["seconds"] for s in t["systems"]] == [20, None, 35.0]  # ours: 15 s start-up + 2 epochs
    assert [s["estimated"] for s in t["systems"]] == [False, False, True]
    ours["figures"]["valid_curve_seconds"] = [12.5, 21.0]  # measured: preferred over the estimate
    t = peers.time_to_quality(result, {"llmrec_dist (id)": ours})
    assert [(s["seconds"], s["estimated"]) for s in t["systems"]][-1] == (21.0, False)


def test_the_side_by_side_table_puts_our_runs_of_the_same_data_beside_the_peers(tmp_path):
    from llmrec_dist.bench import common, report

    dataset = {"path": "/d", "variant": "ml-latest-small", "content_hash": "sha256:abc",
               "counts": {"users": 610, "items": 9724}}

    def peer(system, settings, curve, seconds, test, **extra):
        return {**peers.base_row(system, settings), "status": "ok", "best_valid_ndcg_at_10": max(curve),
                "best_epoch": curve.index(max(curve)), "epochs_run": len(curve), "test_ndcg_at_10": test,
                "test_hr_at_10": 2 * test, "test_mrr_at_10": test / 2, "own_test_ndcg_at_10": test + 0.01,
                "seconds_to_best": seconds[curve.index(max(curve))], "mean_epoch_seconds": 10.0,
                "peak_rss_mb": 1500.0, "epochs": [{"epoch": i, "valid_ndcg_at_10": v, "seconds_since_start": s}
                                                   for i, (v, s) in enumerate(zip(curve, seconds))], **extra}

    rows = [peer("recbole-sasrec", "matched", [0.05, 0.08, 0.07], [100, 200, 300], 0.070),
            peer("rectools-sasrec", "defaults", [0.06], [40], 0.060, stopped_by="time budget"),
            peers.failure_row("recbole-bert4rec", "defaults", "timeout", "stopped after 25 min")]
    common.write_result(tmp_path, "peers", label="ml-small", config={}, figures={"rows": rows}, dataset=dataset)
    ours = {"test_ndcg_at_10": 0.091, "test_hr_at_10": 0.15, "test_mrr_at_10": 0.07, "best_epoch": 2,
            "epochs_run": 3, "best_valid_ndcg_at_10": 0.1, "mean_epoch_seconds": 12.0,
            "valid_curve": [0.07, 0.09, 0.1], "valid_curve_seconds": [20.0, 32.0, 44.0]}
    common.write_result(tmp_path, "quality", label="ml-small-id", config={}, figures=ours, dataset=dataset)
    refit = {**ours, "test_ndcg_at_10": 0.2, "refit_epochs": 3}  # trained on validation: no peer does
    common.write_result(tmp_path, "quality", label="ml-small-id-refit", config={}, figures=refit, dataset=dataset)
    other = {**dataset, "content_hash": "sha256:other"}  # another dataset: not in this table
    common.write_result(tmp_path, "quality", label="ml-1m-id", config={}, figures=ours, dataset=other)

    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{report.PEERS_START}\nold\n{report.PEERS_END}\nbottom\n"
                      f"{report.PEERS_SUMMARY_START}\nold\n{report.PEERS_SUMMARY_END}\n")
    assert report.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert text.startswith("top\n") and text.endswith(f"{report.PEERS_SUMMARY_END}\n") and "old" not in text
    assert ("| **ml-small** (ml-latest-small: 610 users, 9,724 items) | 0.0910 (`ml-small-id`) | 0.0700 "
            "(recbole-sasrec, matched) | +30.0% | 32 s / 200 s = 0.16× (recbole-sasrec, matched) |") in text
    assert "≥ 0.0800, the best peer run's best (recbole-sasrec, matched: 200 s)" in text
    # ours reaches 0.08 at its second validation (32 s): 0.16× the peer's 200 s
    assert "| llmrec_dist | ml-small-id | 0.0910 | 0.1500 | 0.0700 | – | 2 / 3 | 44 | 12.0 | 32 (0.16×) | – |" in text
    assert "| recbole-sasrec | matched | 0.0700 | 0.1400 | 0.0350 | 0.0800 | 1 / 3 | 200 | 10.0 | 200 (1.00×) |" in text
    assert "| rectools-sasrec | defaults | 0.0600 |" in text and "0 / 1 (time budget) |" in text
    assert "| not reached | 1,500 |" in text
    assert "| recbole-bert4rec | defaults | timeout: stopped after 25 min |" in text
    assert "ml-1m-id" not in text and "ml-small-id-refit" not in text
    assert "against the best peer's test NDCG@10: +30.0%." in text
    assert not report.update_readme(readme, tmp_path)  # a second run changes nothing

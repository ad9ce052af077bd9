"""Rating baselines by hand: the bias model's updates, and the baselines' selection on validation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from llmrec_dist.bench.rating_baselines import Ratings, fit_biases, run_baselines, training_ratings

TINY = Ratings(users=np.array([1, 1, 2]), items=np.array([1, 2, 1]), ratings=np.array([5.0, 3.0, 4.0]))


def test_one_alternating_step_by_hand():
    # mu = 4; item step (b_u = 0): item 1 residuals 1, 0 -> 1 / (1 + 2); item 2: -1 / (1 + 1)
    # user step: user 1: (1 - 1/3) + (-1 + 1/2) = 1/6 -> / (1 + 2); user 2: (0 - 1/3) / (1 + 1)
    model = fit_biases(TINY, regularisation=1.0, iterations=1)
    assert model.mean == 4.0
    assert model.item == pytest.approx({1: 1 / 3, 2: -1 / 2})
    assert model.user == pytest.approx({1: 1 / 18, 2: -1 / 6})
    assert model.predict(np.array([1, 3]), np.array([2, 9])).tolist() == pytest.approx([4 + 1 / 18 - 1 / 2, 4.0])


def test_without_regularisation_the_biases_fit_exactly_and_with_much_they_vanish():
    exact = fit_biases(TINY, regularisation=0.0, iterations=200)
    assert exact.predict(TINY.users, TINY.items) == pytest.approx(TINY.ratings, abs=1e-6)
    shrunk = fit_biases(TINY, regularisation=1e6)
    assert shrunk.predict(TINY.users, TINY.items) == pytest.approx([4.0] * 3, abs=1e-4)


def split_tables(seed: int = 0):
    """40 users x 6 events; rating = 3 + user effect + item effect + noise, clipped to 1..5."""
    rng = np.random.default_rng(seed)
    user_effect, item_effect = rng.normal(0, 0.8, 41), rng.normal(0, 0.8, 31)
    rows = {"train": [], "valid": [], "test": []}
    for user in range(1, 41):
        items = rng.choice(np.arange(1, 31), size=6, replace=False)
        ratings = np.clip(np.round(3 + user_effect[user] + item_effect[items] + rng.normal(0, 0.3, 6)), 1, 5)
        rows["train"].append((user, items[:4].tolist(), ratings[:4].tolist(), None, None))
        rows["valid"].append((user, items[:4].tolist(), ratings[:4].tolist(), int(items[4]), float(ratings[4])))
        rows["test"].append((user, items[:5].tolist(), ratings[:5].tolist(), int(items[5]), float(ratings[5])))
    out = {}
    for split, values in rows.items():
        table = {"user_idx": [r[0] for r in values], "items": [r[1] for r in values],
                 "feedback": pa.array([r[2] for r in values], pa.list_(pa.float32()))}
        if split != "train":
            table["target"] = [r[3] for r in values]
            table["target_feedback"] = pa.array([r[4] for r in values], pa.float32())
        out[split] = pa.table(table)
    return out


def test_baselines_choose_on_validation_and_biases_beat_the_mean():
    tables = split_tables()
    assert len(training_ratings(tables["train"])) == 160
    rows = {row["model"]: row for row in run_baselines(tables["train"], tables["valid"], tables["test"])}
    mean, biases = rows["global mean"], rows["user + item biases"]
    assert biases["setting"].startswith("reg=") and biases["test_rmse"] < 0.8 * mean["test_rmse"]
    assert all(row["test_mae"] <= row["test_rmse"] for row in rows.values())


def test_bench_rating_baselines_cli(tmp_path):
    import json
    import subprocess
    import sys

    from llmrec_dist.data.prepare import prepare_dataset

    rng = np.random.default_rng(1)
    lines = ["user_id,item_id,timestamp,stars"]
    for user in range(30):
        for t, item in enumerate(rng.choice(20, size=6, replace=False)):
            lines.append(f"{user},{item},{t},{1 + (user + item) % 5}")
    (tmp_path / "events.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "items.csv").write_text("item_id,text\n" + "".join(f"{i},item {i}\n" for i in range(20)))
    files = {"interactions": str(tmp_path / "events.csv"), "items": str(tmp_path / "items.csv")}
    prepare_dataset("generic", tmp_path / "rated", generic={**files, "rating_col": "stars"})
    prepare_dataset("generic", tmp_path / "plain", generic=files)
    bench = [sys.executable, "-m", "llmrec_dist.cli", "bench", "rating-baselines", "--out", str(tmp_path / "out")]
    done = subprocess.run(bench + ["--data", str(tmp_path / "rated"), "--label", "tiny"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "user + item biases" in done.stdout and "global mean" in done.stdout
    rows = json.loads((tmp_path / "out" / "rating-baselines-tiny.json").read_text())["figures"]["rows"]
    assert {r["model"] for r in rows} >= {"global mean", "user + item biases"}
    refused = subprocess.run(bench + ["--data", str(tmp_path / "plain")], capture_output=True, text=True)
    assert refused.returncode == 2 and "has no ratings" in refused.stderr and len(refused.stderr.splitlines()) == 1

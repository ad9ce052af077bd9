"""The rating/click bi-encoder: training pairs by hand, labels, negatives, losses, train/eval agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmrec_dist.config import ModelConfig
from llmrec_dist.metrics import auc, gauc, log_loss, rmse
from llmrec_dist.model import build_model
from llmrec_dist.pairs import Pairs
from llmrec_dist.pointwise import PointwiseRecommender, evaluate_pairs, label_rule, task_record, training_batch

RATINGS = {"kind": "rating", "column": "rating", "min": 1.0, "max": 5.0}


def tiny(num_items=12, task="rating", loss="mse", feedback_input=True, offset=3.0, seed=0):
    torch.manual_seed(seed)
    base = build_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, max_len=6, dropout=0.0), num_items)
    return PointwiseRecommender(base, task, loss, feedback_input=feedback_input, item_bias=True,
                                offset=offset, dropout=0.0, clip=(1.0, 5.0))


def test_rating_pairs_are_every_next_event_with_its_rating():
    rule = label_rule("rating", RATINGS, 4.0, 0)
    seq, fb, cand, labels = training_batch([[3, 1, 2], [2, 6]], [[5, 1, 3], [4, 2]], 6, rule,
                                           np.random.default_rng(0))
    assert seq.tolist() == [[3, 1], [0, 2]]
    assert fb.tolist() == [[1.0, 0.0], [0.0, 0.75]]  # (rating - 1) / 4 of the events read
    assert cand[..., 0].tolist() == [[1, 2], [0, 6]] and labels[..., 0].tolist() == [[1.0, 3.0], [0.0, 2.0]]


def test_long_rows_keep_their_last_events():
    rule = label_rule("rating", RATINGS, 4.0, 0)
    seq, fb, cand, labels = training_batch([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5]], 2, rule, np.random.default_rng(0))
    assert seq.tolist() == [[3, 4]] and cand[..., 0].tolist() == [[4, 5]] and labels[..., 0].tolist() == [[4, 5]]
    assert fb.tolist() == [[0.5, 0.75]]


def test_click_labels_come_from_the_rating_threshold():
    rule = label_rule("click", RATINGS, 4.0, 3)
    assert rule.threshold == 4.0 and rule.negatives == 0
    _, _, cand, labels = training_batch([[3, 1, 2]], [[5, 4, 3.5]], 6, rule, np.random.default_rng(0))
    assert cand[..., 0].tolist() == [[1, 2]] and labels[..., 0].tolist() == [[1.0, 0.0]]


def test_implicit_click_draws_negatives_outside_the_row():
    rule = label_rule("click", None, 4.0, 3)
    assert rule.negatives == 3 and rule.threshold == 0
    rows = [[3, 1, 2, 7], [2, 6]]
    seq, fb, cand, labels = training_batch(rows, None, 6, rule, np.random.default_rng(1), pool=np.arange(1, 13))
    assert cand.shape == (2, 3, 4)
    assert cand[0, :, 0].tolist() == [1, 2, 7] and cand[1, :, 0].tolist() == [0, 0, 6]
    assert (labels[..., 1:] == 0).all() and (labels[0, :, 0] == 1).all()
    for b, row in enumerate(rows):
        negatives = cand[b, :, 1:][cand[b, :, 0] != 0]
        assert not np.isin(negatives.numpy(), row).any()
    assert (cand[1, :2] == 0).all()  # padded positions hold no pair
    again = training_batch(rows, None, 6, rule, np.random.default_rng(1), pool=np.arange(1, 13))[2]
    assert torch.equal(again, cand)  # seeded


def test_label_rules_refuse_what_the_data_cannot_give():
    with pytest.raises(ValueError, match="needs a dataset with ratings"):
        label_rule("rating", None, 4.0, 1)
    with pytest.raises(ValueError, match="task.negatives"):
        label_rule("click", None, 4.0, 0)
    assert label_rule("click", RATINGS, 0.0, 2).negatives == 2  # threshold 0: ratings ignored
    labels = {"kind": "label", "column": "clicked", "min": 0.0, "max": 1.0}
    assert label_rule("click", labels, 4.0, 1).threshold == 0.5


def test_the_loss_is_the_mean_over_real_pairs():
    model = tiny()
    rule = label_rule("rating", RATINGS, 4.0, 0)
    batch = training_batch([[3, 1, 2], [2, 6]], [[5, 1, 3], [4, 2]], 6, rule, np.random.default_rng(0))
    out = model(*batch)
    predictions = model.score(batch[0], batch[1], batch[2])
    keep = batch[2] != 0
    assert out["positions"].item() == 3
    expected = ((predictions[keep] - batch[3][keep]) ** 2).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    huber = tiny(loss="huber")
    huber.load_state_dict(model.state_dict())
    diff = (predictions[keep] - batch[3][keep]).abs()
    by_hand = torch.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean()
    assert huber(*batch)["loss"].item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_evaluation_scores_the_state_training_reads():
    """The prediction for a history's next item equals the training score of that pair at the row's
    last position (positions count back from the end of the row, in training as at evaluation)."""
    model = tiny().eval()
    rule = label_rule("rating", RATINGS, 4.0, 0)
    row, ratings = [3, 1, 2, 5], [5, 1, 3, 4]
    for t in range(1, 4):
        seq, fb, cand, _ = training_batch([row[:t + 1]], [ratings[:t + 1]], 6, rule, np.random.default_rng(0))
        trained = model.score(seq, fb, cand)[0, -1, 0].item()
        predicted = model.predict([row[:t]], [ratings[:t]], torch.tensor([row[t]]), rule).item()
        assert predicted == pytest.approx(min(max(trained, 1.0), 5.0), abs=1e-5)


def test_training_learns_item_ratings_and_past_ratings():
    """Each item has a fixed rating: the bi-encoder's RMSE falls far below the global mean's."""
    rng = np.random.default_rng(0)
    true = {i: 1.0 + (i % 5) for i in range(1, 13)}
    rows = [list(rng.choice(np.arange(1, 13), size=6, replace=False)) for _ in range(64)]
    ratings = [[true[i] for i in r] for r in rows]
    rule = label_rule("rating", RATINGS, 4.0, 0)
    model = tiny(offset=float(np.mean([v for r in ratings for v in r])))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        batch = training_batch(rows, ratings, 6, rule, rng)
        optimizer.zero_grad()
        model(*batch)["loss"].backward()
        optimizer.step()
    held_out = [list(rng.choice(np.arange(1, 13), size=5, replace=False)) for _ in range(40)]
    pairs = Pairs(user_idx=np.arange(40), history_offsets=np.arange(0, 41 * 4, 4),
                  history_items=np.concatenate([h[:4] for h in held_out]).astype(np.int64),
                  candidate=np.array([h[4] for h in held_out], dtype=np.int64),
                  label=np.array([true[h[4]] for h in held_out], dtype=np.float32),
                  history_feedback=np.array([true[i] for h in held_out for i in h[:4]], dtype=np.float32))
    figures = evaluate_pairs(model, pairs, rule, batch_size=16, prefix="valid_")
    assert set(figures) == {"valid_rmse", "valid_mae", "valid_pairs"} and figures["valid_pairs"] == 40
    mean_rmse = rmse(torch.full((40,), 3.0), torch.from_numpy(pairs.label))
    assert figures["valid_rmse"] < 0.35 * mean_rmse


def test_click_evaluation_reports_auc_gauc_and_logloss_of_the_predictions():
    model = tiny(task="click", loss="bce", offset=0.0, feedback_input=False)
    rule = label_rule("click", None, 0.0, 1)
    pairs = Pairs(user_idx=np.array([1, 1, 2, 2, 3, 3]), history_offsets=np.array([0, 2, 4, 5, 6, 8, 10]),
                  history_items=np.array([3, 1, 3, 1, 2, 2, 4, 5, 4, 5]), candidate=np.array([2, 9, 6, 7, 8, 1]),
                  label=np.array([1, 0, 1, 0, 0, 1], dtype=np.float32))
    figures = evaluate_pairs(model, pairs, rule, batch_size=4)
    logits = torch.cat([model.predict([pairs.history(r)], None, torch.tensor([pairs.candidate[r]]), rule)
                        for r in range(6)])
    labels, users = torch.from_numpy(pairs.label), torch.from_numpy(pairs.user_idx)
    assert figures["auc"] == pytest.approx(auc(logits, labels))
    assert figures["gauc"] == pytest.approx(gauc(logits, labels, users))
    assert figures["logloss"] == pytest.approx(log_loss(logits, labels), rel=1e-6)


def test_pairs_shard_by_rank_and_keep_their_histories():
    pairs = Pairs(user_idx=np.array([1, 2, 3]), history_offsets=np.array([0, 2, 3, 6]),
                  history_items=np.array([4, 5, 6, 7, 8, 9]), candidate=np.array([1, 2, 3]),
                  label=np.array([1, 0, 1], dtype=np.float32),
                  history_feedback=np.array([1, 2, 3, 4, 5, 6], dtype=np.float32))
    first, second = pairs.shard(0, 2), pairs.shard(1, 2)
    assert first.candidate.tolist() == [1, 3] and second.candidate.tolist() == [2]
    assert first.history(1).tolist() == [7, 8, 9] and first.feedback(1).tolist() == [4, 5, 6]
    assert second.history(0).tolist() == [6] and second.feedback(0).tolist() == [3]


def test_windows_cut_the_ratings_with_their_events():
    import pyarrow as pa

    from llmrec_dist.config import config_from_dict
    from llmrec_dist.train.training_rows import windowed_table

    cfg = config_from_dict({"data": {"path": "x", "windows": True}, "eval": {"metric": "rmse"},
                            "model": {"hidden_size": 16, "num_heads": 2, "max_len": 6},
                            "task": {"type": "rating"}, "train": {"exclude_seen": True}})
    items = list(range(1, 17))
    table = pa.table({"items": pa.array([items], type=pa.list_(pa.int32())),
                      "feedback": pa.array([[i / 2 for i in items]], type=pa.list_(pa.float32()))})
    out = windowed_table(table, cfg)
    assert out.column("items").to_pylist() == [list(range(10, 17)), list(range(4, 11)), list(range(1, 5))]
    assert out.column("feedback").to_pylist() == [[i / 2 for i in w] for w in out.column("items").to_pylist()]
    # every event but the first is a rating target exactly once over the windows
    rule = label_rule("rating", RATINGS, 4.0, 0)
    _, _, cand, _ = training_batch(out.column("items").to_pylist(), out.column("feedback").to_pylist(), 6, rule,
                                   np.random.default_rng(0))
    targets = sorted(cand[cand != 0].tolist())
    assert targets == list(range(2, 17))


def test_a_saved_rating_model_loads_back_with_its_task(tmp_path):
    import dataclasses
    import json

    from llmrec_dist.config import TaskConfig
    from llmrec_dist.saved_model import MODEL_META_FILE, WEIGHTS_FILE, load_model
    from llmrec_dist.worker.checkpoint import cpu_state_dict, save_weights

    model = tiny(offset=3.25).eval()
    torch.nn.init.normal_(model.item_bias.weight)  # something the load must restore
    manifest = {"feedback": {"kind": "rating", "column": "rating", "min": 1.0, "max": 5.0}}
    record = task_record(dataclasses.asdict(TaskConfig(type="rating")), manifest, seed=7)
    assert record["range"] == [1.0, 5.0] and record["eval_seed"] == 7 and record["feedback_input"] is True
    save_weights(cpu_state_dict(model), tmp_path / WEIGHTS_FILE)
    model_cfg = dataclasses.asdict(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, max_len=6, dropout=0.0))
    (tmp_path / MODEL_META_FILE).write_text(json.dumps({"model": model_cfg, "num_items": 12, "task": record}))
    loaded, meta = load_model(tmp_path)
    assert isinstance(loaded, PointwiseRecommender) and meta["task"]["type"] == "rating"
    assert loaded.offset.item() == 3.25
    rule = label_rule("rating", RATINGS, 4.0, 0)
    args = ([[3, 1, 2], [4]], [[5, 1, 3], [2]], torch.tensor([7, 9]), rule)
    assert torch.allclose(loaded.predict(*args), model.predict(*args))
    (tmp_path / MODEL_META_FILE).write_text(json.dumps({"model": model_cfg, "num_items": 12, "task": "rating"}))
    with pytest.raises(ValueError, match="task must be an object"):
        load_model(tmp_path)

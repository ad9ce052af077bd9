"""Classical rating baselines on the shared leave-one-out split, for the rating task's benchmark.

- ``global mean``: every prediction is the mean training rating;
- ``biases``: ``mu + b_user + b_item``, fitted by alternating regularised least squares (Koren's
  baseline predictors), the regularisation chosen on validation RMSE;
- ``SVD`` and ``SVD++`` of scikit-surprise when it is installed (a benchmark-only dependency).

They fit on the ratings of the train split's events (the histories), are selected on the validation
targets and report RMSE/MAE on the test targets, the pairs every rating model is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from llmrec_dist.metrics import mae, rmse

BIAS_REGULARISATION = (0.0, 1.0, 3.0, 10.0, 30.0)
COLUMNS = [("model", "model", ""), ("setting", "chosen on validation", ""), ("valid_rmse", "valid RMSE", ".4f"),
           ("test_rmse", "test RMSE", ".4f"), ("test_mae", "test MAE", ".4f")]


@dataclass(frozen=True)
class Ratings:
    """Flat (user, item, rating) events."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray

    def __len__(self) -> int:
        return len(self.ratings)


def training_ratings(train: pa.Table) -> Ratings:
    """Every event of the train split's histories with its rating (needs the ``feedback`` column)."""
    items = train.column("items").combine_chunks()
    lengths = pc.list_value_length(items).to_numpy(zero_copy_only=False)
    return Ratings(users=np.repeat(train.column("user_idx").to_numpy().astype(np.int64), lengths),
                   items=items.flatten().to_numpy(zero_copy_only=False).astype(np.int64),
                   ratings=train.column("feedback").combine_chunks().flatten().to_numpy(
                       zero_copy_only=False).astype(np.float64))


def target_ratings(split: pa.Table) -> Ratings:
    """The valid or test targets with their ratings (``target_feedback``)."""
    return Ratings(users=split.column("user_idx").to_numpy().astype(np.int64),
                   items=split.column("target").to_numpy().astype(np.int64),
                   ratings=split.column("target_feedback").to_numpy().astype(np.float64))


@dataclass(frozen=True)
class Biases:
    mean: float
    user: dict[int, float]
    item: dict[int, float]

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``mean + b_user + b_item``; an unknown user or item has bias 0."""
        return (self.mean + np.array([self.user.get(int(u), 0.0) for u in users])
                + np.array([self.item.get(int(i), 0.0) for i in items]))


def fit_biases(data: Ratings, regularisation: float, iterations: int = 10) -> Biases:
    """Alternating least squares of ``r - mu ~ b_u + b_i`` with L2 weight ``regularisation`` on each
    bias: ``b_i = sum(r - mu - b_u) / (reg + n_i)``, then ``b_u = sum(r - mu - b_i) / (reg + n_u)``."""
    mean = float(data.ratings.mean())
    user_codes, users = _codes(data.users)
    item_codes, items = _codes(data.items)
    user_bias = np.zeros(len(users))
    item_bias = np.zeros(len(items))
    residual = data.ratings - mean
    for _ in range(iterations):
        item_bias = _solve(residual - user_bias[user_codes], item_codes, len(items), regularisation)
        user_bias = _solve(residual - item_bias[item_codes], user_codes, len(users), regularisation)
    return Biases(mean, dict(zip(users.tolist(), user_bias.tolist())), dict(zip(items.tolist(), item_bias.tolist())))


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniques, codes = np.unique(values, return_inverse=True)
    return codes, uniques


def _solve(residual: np.ndarray, codes: np.ndarray, size: int, regularisation: float) -> np.ndarray:
    sums = np.bincount(codes, weights=residual, minlength=size)
    counts = np.bincount(codes, minlength=size)
    return sums / (regularisation + counts)


def scores(predictions: np.ndarray, truth: Ratings) -> dict[str, float]:
    p, t = torch.from_numpy(np.asarray(predictions, dtype=np.float64)), torch.from_numpy(truth.ratings)
    return {"rmse": rmse(p, t), "mae": mae(p, t)}


def run_baselines(train: pa.Table, valid: pa.Table, test: pa.Table, *, seed: int = 0) -> list[dict]:
    """One row per baseline: its validation and test RMSE/MAE and the setting chosen on validation."""
    data, valid_t, test_t = training_ratings(train), target_ratings(valid), target_ratings(test)
    rows = []
    mean = float(data.ratings.mean())
    rows.append({"model": "global mean", "setting": f"mu={mean:.4f}",
                 **_prefixed(scores(np.full(len(valid_t), mean), valid_t), "valid"),
                 **_prefixed(scores(np.full(len(test_t), mean), test_t), "test")})
    fitted = {reg: fit_biases(data, reg) for reg in BIAS_REGULARISATION}
    best = min(fitted, key=lambda reg: scores(fitted[reg].predict(valid_t.users, valid_t.items), valid_t)["rmse"])
    model = fitted[best]
    rows.append({"model": "user + item biases", "setting": f"reg={best:g}",
                 **_prefixed(scores(model.predict(valid_t.users, valid_t.items), valid_t), "valid"),
                 **_prefixed(scores(model.predict(test_t.users, test_t.items), test_t), "test")})
    rows += _surprise_rows(data, valid_t, test_t, seed)
    return rows


def _prefixed(values: dict, prefix: str) -> dict:
    return {f"{prefix}_{key}": value for key, value in values.items()}


def _surprise_rows(data: Ratings, valid: Ratings, test: Ratings, seed: int) -> list[dict]:
    """SVD and SVD++ of scikit-surprise (its default hyper-parameters and a few factor sizes, chosen on
    validation), or nothing when it is not installed."""
    try:
        import surprise
    except ImportError:
        return []
    import pandas as pd

    low, high = float(min(data.ratings.min(), 0.5)), float(max(data.ratings.max(), 5.0))
    frame = pd.DataFrame({"user": data.users, "item": data.items, "rating": data.ratings})
    trainset = surprise.Dataset.load_from_df(frame, surprise.Reader(rating_scale=(low, high))).build_full_trainset()
    rows = []
    for name, algorithm, grid in (("SVD (surprise)", surprise.SVD, (50, 100)),
                                  ("SVD++ (surprise)", surprise.SVDpp, (10, 20))):
        best = None
        for factors in grid:
            model = algorithm(n_factors=factors, random_state=seed)
            model.fit(trainset)
            valid_scores = scores(_surprise_predict(model, valid), valid)
            if best is None or valid_scores["rmse"] < best[1]["rmse"]:
                best = (factors, valid_scores, model)
        factors, valid_scores, model = best
        rows.append({"model": name, "setting": f"n_factors={factors}", **_prefixed(valid_scores, "valid"),
                     **_prefixed(scores(_surprise_predict(model, test), test), "test")})
    return rows


def _surprise_predict(model, data: Ratings) -> np.ndarray:
    return np.array([model.predict(int(u), int(i)).est for u, i in zip(data.users, data.items)])

"""A rating or click model package in plain Python: scores for candidate items after a history, and the
two-stage chain of a retriever and such a re-ranker.

Contract of a re-ranker (``Reranker.predict_frame``): input ``history`` (original item ids, most recent
last), ``candidates`` (the item ids to score) and, for a model that reads the history's ratings
(``task.feedback_input``), ``feedback`` (one rating per history id); output ``item_ids``, the candidates
best first, and ``scores`` (predicted ratings, or click probabilities). Unknown history ids are skipped
with one warning per call (their ratings with them); an unknown candidate is an error naming the row.

Contract of a chain (``Chain.predict_frame``): the retriever's (``history``, optional ``k`` and
``exclude``), plus ``feedback`` when its re-ranker reads ratings. ``diversity`` and ``explain`` are
refused: MMR would re-order what the re-ranker ordered, and leave-one-out explains the retriever's
scores, not the chain's. The retriever's top ``top_n`` are re-ordered by
:func:`llmrec_dist.rerank.chain_scores` (re-ranker's score + ``blend`` x the retriever's, standardised
per user); the rest keeps the retriever's order; a history with no known item gets the retriever's
popularity fallback unchanged. Scores are the chain's within the top N and the retriever's after it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from llmrec_dist.registry.recommender import (
    Recommender,
    UnknownItemWarning,
    _as_history,
    frame_options,
    load_package,
    raise_problems,
    result_frame,
)
from llmrec_dist.saved_model import read_json, short_repr

CHAIN_FILE = "chain.json"
CHAIN_FORMAT_VERSION = 1
RETRIEVER_DIR, RERANKER_DIR = "retriever", "reranker"
_BATCH = 256


class Reranker:
    """A loaded rating/click package: :meth:`score` candidates after histories."""

    def __init__(self, package):
        from llmrec_dist.pointwise import LabelRule

        record = package.meta["task"]
        self.model, self.record, self.folder = package.model, record, package.folder
        self.task = record["type"]
        self.reads_feedback = bool(record["feedback_input"])
        low, high = record["range"]
        self.rule = LabelRule(self.task, low=float(low), high=float(high))
        self.item_ids = [str(i) for i in package.items.column("item_id").to_pylist()]
        self.index = {item_id: idx for idx, item_id in enumerate(self.item_ids, start=1)}
        self.dataset_hash = str(package.meta.get("dataset_hash", ""))

    @classmethod
    def from_folder(cls, path: str | Path, trust_remote_code: bool = False) -> Reranker:
        package = load_package(path, trust_remote_code)
        if package.meta.get("task") is None:
            raise ValueError(f"{package.folder}: a next-item model ranks the catalogue; a re-ranker is a rating "
                             "or click model (task.type)")
        return cls(package)

    def score(self, histories: list[list[str]], candidates: list[list[str]],
              feedback: list[list[float]] | None = None) -> list[np.ndarray]:
        """One array per row: the candidates' predicted ratings (clipped to the range) or click
        probabilities. ``feedback``: the histories' ratings, one per id (needed when the model reads them)."""
        if self.reads_feedback and feedback is None:
            raise ValueError(f"this {self.task} model reads the ratings of the history (task.feedback_input): "
                             "give a feedback column, one rating per history id")
        rows, ratings, wanted, unknown = [], [], [], []
        for r, (history, items) in enumerate(zip(histories, candidates)):
            known = [self.index.get(i) for i in history]
            unknown += [i for i, idx in zip(history, known) if idx is None]
            rows.append(np.array([idx for idx in known if idx is not None], dtype=np.int64))
            if feedback is not None and self.reads_feedback:
                values = np.asarray(feedback[r], dtype=np.float32)
                ratings.append(values[[idx is not None for idx in known]] if len(values) else values)
            missing = [i for i in items if i not in self.index]
            if missing:
                raise ValueError(f"row {r}: candidate {short_repr(missing[0])} is not in the model's catalogue")
            wanted.append(np.array([self.index[i] for i in items], dtype=np.int64))
        if unknown:
            warnings.warn(f"skipped {len(unknown)} unknown history item id(s) not in the model's catalogue",
                          UnknownItemWarning, stacklevel=3)
        out = []
        for start in range(0, len(rows), _BATCH):
            part = range(start, min(start + _BATCH, len(rows)))
            width = max([len(wanted[i]) for i in part] + [1])
            grid = np.zeros((len(part), width), dtype=np.int64)
            for j, i in enumerate(part):
                grid[j, :len(wanted[i])] = wanted[i]
            with torch.inference_mode():
                scores = self.model.predict([rows[i] for i in part], [ratings[i] for i in part] if ratings else None,
                                            torch.from_numpy(grid), self.rule)
            if self.task == "click":
                scores = torch.sigmoid(scores)
            out += [scores[j, :len(wanted[i])].numpy().astype(np.float64) for j, i in enumerate(part)]
        return out

    def predict_frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """The re-ranker's DataFrame contract (module docstring)."""
        if not isinstance(df, pd.DataFrame) or not {"history", "candidates"} <= set(df.columns):
            raise ValueError("input must be a DataFrame with 'history' and 'candidates' columns (lists of item id "
                             f"strings){'' if not self.reads_feedback else ' and a feedback column'}")
        problems = []
        histories = _checked(df["history"].tolist(), "history", problems)
        candidates = _checked(df["candidates"].tolist(), "candidates", problems)
        feedback = frame_feedback(df, histories, problems) if self.reads_feedback else None
        raise_problems(problems)
        results = []
        for items, scores in zip(candidates, self.score(histories, candidates, feedback)):
            order = np.argsort(-scores, kind="stable")
            results.append({"item_ids": [items[i] for i in order], "scores": [float(scores[i]) for i in order]})
        return result_frame(results, df)


class Chain:
    """A retriever (:class:`Recommender`) and a :class:`Reranker` of the same dataset, served as one."""

    def __init__(self, retriever: Recommender, reranker: Reranker, top_n: int = 100, blend: float = 0.0):
        if retriever.dataset_hash != reranker.dataset_hash:
            raise ValueError(f"the retriever was trained on dataset {retriever.dataset_hash}, the re-ranker on "
                             f"{reranker.dataset_hash}: a chain needs both from the same dataset")
        self.retriever, self.reranker = retriever, reranker
        self.top_n, self.blend = check_top_n(top_n), check_blend(blend)
        self.text_of = retriever.text_of

    @classmethod
    def from_folder(cls, path: str | Path, trust_remote_code: bool = False) -> Chain:
        folder = Path(path)
        settings = read_json(folder / CHAIN_FILE, "the chain package is damaged: build it again")
        if settings.get("format_version") != CHAIN_FORMAT_VERSION:
            raise ValueError(f"{folder / CHAIN_FILE}: unsupported format_version "
                             f"{short_repr(settings.get('format_version'))}; this llmrec_dist reads "
                             f"{CHAIN_FORMAT_VERSION}")
        try:
            top_n, blend = check_top_n(settings.get("top_n")), check_blend(settings.get("blend"))
        except ValueError as err:
            raise ValueError(f"{folder / CHAIN_FILE}: {err}") from None
        return cls(Recommender.from_folder(folder / RETRIEVER_DIR, trust_remote_code),
                   Reranker.from_folder(folder / RERANKER_DIR, trust_remote_code), top_n, blend)

    def recommend(self, histories: list[list[str]], k: int | list[int] | None = None,
                  feedback: list[list[float]] | None = None, *, exclude: list[list[str]] | None = None) -> list[dict]:
        """Top-K of the chain per history (see the module docstring); ``Recommender.recommend``'s rules.
        ``exclude``: per history, item ids the retriever never returns (so the re-ranker never sees them)."""
        from llmrec_dist.rerank import chain_scores

        ks = self.retriever._per_user_k(k, len(histories))
        wide = [max(k_, min(self.top_n, self.retriever.num_items)) for k_ in ks]
        retrieved = self.retriever._recommend(histories, wide, warn_stacklevel=4, exclude=exclude)
        rows = [i for i, h in enumerate(histories) if any(item in self.retriever.index for item in h)]
        heads = [retrieved[i]["item_ids"][:self.top_n] for i in rows]
        rescored = self.reranker.score([histories[i] for i in rows], heads,
                                       None if feedback is None else [feedback[i] for i in rows]) if rows else []
        for i, head, rerank in zip(rows, heads, rescored):
            if not head:
                continue
            result = retrieved[i]
            retrieval = torch.tensor([result["scores"][:len(head)]], dtype=torch.float64)
            chained = chain_scores(retrieval, torch.from_numpy(rerank)[None], self.blend)[0].numpy()
            order = np.argsort(-chained, kind="stable")
            for key in ("item_ids", "scores", "texts"):
                tail = result[key][len(head):]
                values = [float(chained[j]) for j in order] if key == "scores" else [result[key][j] for j in order]
                result[key] = values + tail
        for result, k_ in zip(retrieved, ks):
            for key in ("item_ids", "scores", "texts"):
                result[key] = result[key][:k_]
        return retrieved

    def predict_frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """The retriever's contract (``history``, ``k``, ``exclude``) plus ``feedback`` for a re-ranker that
        reads ratings; a row asking for ``diversity`` or ``explain`` is refused (module docstring)."""
        problems: list[str] = []
        feedback = None
        if self.reranker.reads_feedback and isinstance(df, pd.DataFrame) and "history" in df.columns:
            feedback = frame_feedback(df, _checked(df["history"].tolist(), "history", []), problems)
        options = frame_options(df, problems)
        for name in ("diversity", "explain"):
            if any(options.get(name, [])):
                problems.append(f"a chain does not support {name} (it applies to a next-item model alone)")
        histories, ks = self.retriever.frame_requests(df, problems)
        return result_frame(self.recommend(histories, ks, feedback, exclude=options.get("exclude")), df)


def check_top_n(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"top_n must be a positive integer, got {short_repr(value)}")
    return int(value)


def check_blend(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"blend must be a non-negative number, got {short_repr(value)}")
    return float(value)


def _checked(values: list, column: str, problems: list[str]) -> list[list[str]]:
    out = []
    for row, value in enumerate(values):
        items, problem = _as_history(value)
        if problem:
            problems.append(f"row {row}: {problem.replace('history', column)}")
        out.append(items)
    return out


def frame_feedback(df: pd.DataFrame, histories: list[list[str]], problems: list[str]) -> list[np.ndarray]:
    """The ``feedback`` column: per row one finite rating per history id, else a problem naming the row."""
    if "feedback" not in df.columns:
        problems.append("the model reads the ratings of the history (task.feedback_input): add a 'feedback' "
                        "column, one rating per history id")
        return []
    out = []
    for row, (value, history) in enumerate(zip(df["feedback"].tolist(), histories)):
        try:
            values = np.asarray(value, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            values = None
        if values is None or len(values) != len(history) or not np.isfinite(values).all():
            problems.append(f"row {row}: feedback must hold one finite rating per history id "
                            f"({len(history)}), got {short_repr(value)}")
            values = np.zeros(len(history))
        out.append(values.astype(np.float32))
    return out


def build_chain_package(retriever: str | Path, reranker: str | Path, out_dir: str | Path, top_n: int,
                        blend: float) -> Path:
    """A chain package: ``chain.json`` + the two packages as ``retriever/`` and ``reranker/``; both are
    loaded first (a damaged one, a wrong kind, or two datasets are refused). ``out_dir`` must not exist
    or be empty; it appears only when complete."""
    chain = Chain(Recommender.from_folder(retriever), Reranker.from_folder(reranker), top_n, blend)
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"chain output {str(out_dir)!r} already exists and is not an empty folder")
    temp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(6)}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(retriever, temp / RETRIEVER_DIR)
        shutil.copytree(reranker, temp / RERANKER_DIR)
        (temp / CHAIN_FILE).write_text(json.dumps(
            {"format_version": CHAIN_FORMAT_VERSION, "top_n": chain.top_n, "blend": chain.blend,
             "task": chain.reranker.task, "dataset_hash": chain.retriever.dataset_hash}, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out_dir


def load_serving(folder: str | Path, trust_remote_code: bool = False):
    """The servable in a package folder: a :class:`Chain`, a :class:`Reranker` or a :class:`Recommender`."""
    folder = Path(folder)
    if (folder / CHAIN_FILE).is_file():
        return Chain.from_folder(folder, trust_remote_code)
    package = load_package(folder, trust_remote_code)
    return Reranker(package) if package.meta.get("task") is not None else Recommender.from_package(package)

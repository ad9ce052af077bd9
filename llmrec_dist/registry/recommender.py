"""Top-K recommendations from a model package, in plain Python (no MLflow needed).

A *model package* is the folder written by :func:`llmrec_dist.registry.package.build_model_package`;
its files are listed in :mod:`llmrec_dist.saved_model`, which reads them.

The registry contract (README.md, "recommend, and the registry contract"): a history is a list of
ORIGINAL item ids, most recent last. Unknown ids are skipped with one warning per call; a history with no known item gets the
popularity fallback; items already in the history are never recommended when ``exclude_seen``; only
the last ``max_len`` known items feed the model, but every seen item is excluded.

Hostile input, decided:

- Ids must be strings. A history holding ints, floats, None, dicts or nested lists is refused with an
  error naming the row and position: the catalogue's ids are strings, and guessing that ``7`` means
  ``"7"`` (or ``7.0`` means ``"7"``) would silently mis-match ids such as ``"007"``.
- Any length is accepted: a history of 10^6 ids costs well under a second and memory linear in its
  length (the model reads only the last ``max_len`` known items; exclusion uses the distinct items
  of the whole history).
- ``k`` must be an integer in 1..catalogue size (``check_k``); -1, 0, ``'ten'``, 2.5 and a k larger
  than the catalogue are errors, not clipped.
- ``exclude`` (one list of ids per history, never recommended; unknown ids ignored), ``diversity`` (λ in
  [0, 1], one or one per history: MMR re-ranking, :mod:`llmrec_dist.diversity`, on the model's item
  vectors or the items' text embeddings, :meth:`Recommender.use_diversity_space`) and ``explain`` (a bool,
  or one per history: leave-one-out explanations, :mod:`llmrec_dist.explain`) are checked the same way:
  anything else is a ValueError naming the argument (and the history).
- A package is data, not code: weights load only from safetensors; JSON and Parquet files that are
  damaged or not shaped as written give an error naming the file; a package whose model asks for
  ``trust_remote_code`` is refused unless the caller allows it explicitly.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from llmrec_dist.batching import left_pad
from llmrec_dist.data.dataset_format import ITEMS_SCHEMA, conform_table, read_parquet_file
from llmrec_dist.diversity import mmr_select, pool_size
from llmrec_dist.explain import because, leave_one_out
from llmrec_dist.model import SequenceRecommender
from llmrec_dist.saved_model import (
    ITEMS_FILE,
    MODEL_META_FILE,
    NOT_A_PACKAGE,
    PACKAGE_FILES,
    PACKAGE_FORMAT_VERSION,
    RECOMMENDER_FILE,
    TEXT_CACHE_DIR,
    build_for_weights,
    read_json,
    read_model_meta,
    restore_model,
    saved_model_config,
    short_repr,
)

_MAX_NAMED_UNKNOWN = 5
_MAX_REPORTED_PROBLEMS = 10
_SCORE_BUDGET = 1 << 26  # float32 scores held at once (256 MB)
DIVERSITY_SPACES = ("model", "text")
TEXT_TOKENS = 64  # tokens of an item's text read for its text embedding (diversity_space text)


class UnknownItemWarning(UserWarning):
    """Some history item ids are not in the model's catalogue and were skipped."""


class Recommender:
    """A loaded model package: ``recommend(histories, k)`` → top-K original item ids with scores."""

    def __init__(self, model: SequenceRecommender, item_ids: Sequence[str], texts: Sequence[str],
                 popularity: np.ndarray, *, exclude_seen: bool = True, default_k: int = 10,
                 dataset_hash: str = "", batch_size: int | None = None):
        """``item_ids[i]``, ``texts[i]``, ``popularity[i]`` describe item_idx ``i + 1`` (0 is padding).

        ``batch_size``: users per forward pass; default keeps the [users, catalogue] score matrix
        near 256 MB (256 users for catalogues up to ~260k items).
        """
        if len(item_ids) != len(texts) or len(item_ids) != len(popularity):
            raise ValueError("item_ids, texts and popularity must have one entry per item")
        self.model = model.eval().to("cpu")
        self.item_ids = [str(i) for i in item_ids]
        self.texts = [str(t) for t in texts]
        self.index = {item_id: idx for idx, item_id in enumerate(self.item_ids, start=1)}
        if len(self.index) != len(self.item_ids):
            raise ValueError("item ids in the catalogue are not unique")
        self.popularity = np.asarray(popularity, dtype=np.int64)
        # Most popular first; ties broken by item_idx so the fallback is deterministic.
        self._popular_order = np.lexsort((np.arange(len(self.popularity)), -self.popularity)) + 1
        self.exclude_seen = bool(exclude_seen)
        self.default_k = int(default_k)
        self.dataset_hash = dataset_hash
        self.batch_size = batch_size or max(1, min(256, _SCORE_BUDGET // (len(self.item_ids) + 1)))
        self.max_len = model.max_len
        self.retired = np.zeros(len(self.item_ids), dtype=bool)  # never recommended (see with_catalogue)
        self.model_cfg, self.folder, self.num_trained_items = None, None, len(self.item_ids)
        self._item_table: torch.Tensor | None = None
        self.diversity_space, self.diversity_encoder = "model", ""
        self._text_vectors: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, path: str | Path, trust_remote_code: bool = False) -> Recommender:
        """Load a model package folder (weights via safetensors, on CPU, model in eval mode).

        Every file is checked as it is read, and a problem is a ``ValueError`` (``FileNotFoundError`` for
        a missing file) naming the file. ``trust_remote_code``: allow a package whose text encoder needs
        its own Python code (``model.trust_remote_code`` true in ``model.json``); refused by default,
        because loading such a package runs code shipped inside it.
        """
        return cls.from_package(load_package(path, trust_remote_code))

    @classmethod
    def from_package(cls, package: LoadedPackage) -> Recommender:
        """The recommender of a next-item package read by :func:`load_package`."""
        if package.meta.get("task") is not None:
            raise ValueError(f"{package.folder}: a {package.meta['task'].get('type')} model scores candidate items; "
                             "load it with llmrec_dist.registry.reranker.Reranker (or chain it after a retriever)")
        items = package.items
        rec = cls(package.model, items.column("item_id").to_pylist(), package.texts,
                  items.column("popularity").to_numpy(), exclude_seen=package.exclude_seen,
                  default_k=package.default_k, dataset_hash=str(package.meta.get("dataset_hash", "")))
        rec.model_cfg, rec.folder, rec.num_trained_items = package.model_cfg, package.folder, package.num_items
        return rec

    def with_catalogue(self, items: pd.DataFrame) -> Recommender:
        """A recommender over an updated catalogue, without retraining (text models only).

        ``items``: a DataFrame with ``item_id`` and ``text`` (and optionally ``popularity``) columns,
        the catalogue as it is now. Items the model knows keep their learned vectors (their text is
        updated if it changed); new items are represented by their text alone and can be recommended
        at once; known items missing from ``items`` are retired: still understood in histories, never
        recommended. Only an LM item tower can do this; an ``id`` model is refused.

        Ids are taken as strings (an integer column's ``42`` becomes ``"42"``); a missing id or text, a
        repeated id, or a popularity that is not a non-negative integer is an error naming its row.
        """
        cfg = getattr(self, "model_cfg", None)
        if cfg is None or cfg.item_repr == "id":
            raise ValueError("only a model with a text item tower (model.item_repr text or id+text) can take "
                             "new items without retraining; this model represents items by ID only")
        ids, new_text, pop_in = _catalogue_columns(items)
        old = self.item_ids[:self.num_trained_items]
        all_ids = old + [i for i in ids if i not in self.index or self.index[i] > self.num_trained_items]
        texts = [new_text.get(i, self.texts[self.index[i] - 1] if i in self.index else "") for i in all_ids]
        popularity = [int(pop_in.get(i, self.popularity[self.index[i] - 1] if i in self.index else 0))
                      for i in all_ids]
        model = build_for_weights(cfg, self.num_trained_items, texts, self.folder / TEXT_CACHE_DIR)
        model.load_state_dict(self.model.state_dict(), strict=True)
        rec = Recommender(model, all_ids, texts, np.asarray(popularity), exclude_seen=self.exclude_seen,
                          default_k=self.default_k, dataset_hash=self.dataset_hash)
        rec.model_cfg, rec.folder, rec.num_trained_items = cfg, self.folder, self.num_trained_items
        listed = set(ids)
        rec.retired = np.array([i not in listed for i in all_ids])
        rec._popular_order = np.array([j for j in rec._popular_order if not rec.retired[j - 1]], dtype=np.int64)
        return rec.use_diversity_space(self.diversity_space, self.diversity_encoder)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def item_vectors(self) -> np.ndarray:
        """The vectors the model scores against, [num_items, H] float32, row ``i`` for ``item_ids[i]``: the
        ID embeddings of an ``id`` model, the fused item representation of a text tower. Diversity (MMR
        and the ILD metric) measures cosine similarity on them by default (:meth:`use_diversity_space`)."""
        return self._table()[1:].numpy().copy()

    def _table(self) -> torch.Tensor:
        """The model's item table [N + 1, H], computed once (the model is frozen in serving)."""
        if self._item_table is None:
            with torch.inference_mode():
                self._item_table = self.model.items.all_items().detach().float().clone()
        return self._item_table

    def use_diversity_space(self, space: str, text_encoder: str = "") -> Recommender:
        """Where MMR (``diversity`` > 0) measures how alike two items are (returns ``self``):

        - ``model`` (the default): the vectors the model scores against (:meth:`item_vectors`), i.e. items
          are alike when the model treats them alike;
        - ``text``: the language-model embeddings of the items' texts (:meth:`text_vectors`), i.e. items
          are alike when their titles and descriptions are: a list of one genre or one product line is
          spread out even when the model's own vectors (learned from co-occurrence) do not tell them apart.

        ``text_encoder``: the encoder of ``text`` (a Hugging Face name or local folder); empty = the
        model's own LM for a text tower, else all-MiniLM-L6-v2 (the ``text`` extra). The embeddings are
        computed here, once, so a bad encoder fails now and no request pays for it.
        """
        if space not in DIVERSITY_SPACES:
            raise ValueError(f"diversity_space must be one of {', '.join(DIVERSITY_SPACES)}, got {short_repr(space)}")
        if not isinstance(text_encoder, str):
            raise ValueError(f"text_encoder must be a string (a Hugging Face name or a local folder), "
                             f"got {short_repr(text_encoder)}")
        if text_encoder and space != "text":
            raise ValueError("text_encoder is the encoder of diversity_space text; it has no use with "
                             f"diversity_space {space}")
        vectors = self.text_vectors(text_encoder) if space == "text" else None
        self.diversity_space, self.diversity_encoder, self._text_vectors = space, text_encoder, vectors
        return self

    @torch.inference_mode()
    def text_vectors(self, text_encoder: str = "") -> torch.Tensor:
        """The text embedding of every item [N + 1, H] (row 0, padding, unused): the pooled output of the
        model's own LM when it has a text tower and ``text_encoder`` is empty, else of ``text_encoder``
        (default all-MiniLM-L6-v2), mean-pooled over the item's text (as sentence-transformers does)."""
        from llmrec_dist.text_tower import (
            DEFAULT_TEXT_ENCODER,
            compute_pooled,
            load_text_encoder,
            tokenize_items,
        )

        if not text_encoder and hasattr(self.model.items, "text_table"):
            return self.model.items.text_table()
        lm, tokenizer = load_text_encoder(text_encoder or DEFAULT_TEXT_ENCODER)
        ids, mask = tokenize_items(tokenizer, self.texts, TEXT_TOKENS)
        return compute_pooled(lm, ids, mask, "mean")

    def diversity_vectors(self) -> torch.Tensor:
        """The item vectors [N + 1, H] MMR measures similarity on (see :meth:`use_diversity_space`)."""
        return self._text_vectors if self._text_vectors is not None else self._table()

    def text_of(self, item_id: str) -> str:
        """The text of an item id of the catalogue ('' for an unknown id)."""
        idx = self.index.get(item_id)
        return self.texts[idx - 1] if idx else ""

    # ---------------------------------------------------------------------------------- recommend
    def check_k(self, k: Any, where: str = "k") -> int:
        """``k`` as an int in 1..num_items, else ValueError naming ``where``."""
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
            if isinstance(k, numbers.Real) and not isinstance(k, (bool, np.bool_)) and float(k).is_integer():
                k = int(k)  # pandas turns an int column holding a missing value into floats
            else:
                raise ValueError(f"{where} must be a positive integer, got {type(k).__name__} ({k!r})")
        k = int(k)
        if not 1 <= k <= self.num_items:
            raise ValueError(f"{where} must be between 1 and the catalogue size ({self.num_items}), got {k}")
        return k

    def recommend(self, histories: list[list[str]], k: int | list[int] | None = None, *,
                  exclude: list[list[str]] | None = None, diversity: float | list[float] = 0.0,
                  explain: bool | list[bool] = False) -> list[dict]:
        """Top-K recommendations for each history (original item ids, most recent last).

        ``k``: one int for all users, a list with one int per user, or None for the package's
        ``default_k``. Returns one dict per history: ``item_ids`` (list[str]), ``scores``
        (list[float], descending), ``texts`` (list[str]). With ``exclude_seen`` a user may get fewer
        than k items when the history covers nearly the whole catalogue.

        ``exclude``: one list of item ids per history that are never recommended to it (unknown ids are
        ignored). ``diversity``: λ in [0, 1], one for all or one per history: the top k are then picked
        from the ``max(5k, 50)`` best by maximal marginal relevance (:mod:`llmrec_dist.diversity`), and
        ``scores`` stay the model's, in pick order (no longer descending); 0 is the plain ranking.
        ``explain``: True (or one bool per history) adds ``because`` (per item, up to 3 history item ids
        that raised its score most, by leave-one-out over the last 20 history positions) and
        ``because_scores`` (the score the item loses without each of them).
        """
        return self._recommend(histories, k, warn_stacklevel=3, exclude=exclude, diversity=diversity,
                               explain=explain)

    def _recommend(self, histories, k, warn_stacklevel: int, exclude=None, diversity: Any = 0.0,
                   explain: Any = False) -> list[dict]:
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
            raise ValueError("histories must be a list of histories (each a list of item id strings)")
        ks = self._per_user_k(k, len(histories))
        lams = per_history(diversity, len(histories), "diversity", check_diversity)
        explains = per_history(explain, len(histories), "explain", check_explain)
        excluded = self._excluded(exclude, len(histories))
        checked = []
        for i, history in enumerate(histories):
            items, problem = _as_history(history)
            if problem:
                raise ValueError(f"histories[{i}]: {problem}")
            checked.append(items)
        recent, seen, unknown = self._to_indices(checked)
        if unknown:
            first = _first_distinct(unknown, _MAX_NAMED_UNKNOWN)
            named = ", ".join(short_repr(u) for u in first)
            more = len(set(unknown)) - len(first)
            warnings.warn(f"skipped {len(unknown)} unknown item id(s) not in the model's catalogue: "
                          f"{named}{f' and {more} more' if more else ''}", UnknownItemWarning,
                          stacklevel=warn_stacklevel)

        # never recommended: every seen item (not only the last max_len) when exclude_seen, the exclude lists
        masked = [(np.union1d(s, e) if len(e) else s) if self.exclude_seen else e for s, e in zip(seen, excluded)]
        results: list[dict | None] = [None] * len(histories)
        to_score = [i for i, rows in enumerate(recent) if rows]
        for i, rows in enumerate(recent):
            if not rows:
                results[i] = self._popular(ks[i], excluded[i], lams[i], explains[i])
        for start in range(0, len(to_score), self.batch_size):
            chunk = to_score[start:start + self.batch_size]
            scored = self._score([recent[i] for i in chunk], [masked[i] for i in chunk], [ks[i] for i in chunk],
                                 [lams[i] for i in chunk], [explains[i] for i in chunk])
            for i, result in zip(chunk, scored):
                results[i] = result
        return results  # type: ignore[return-value]

    def _excluded(self, exclude: Any, n: int) -> list[np.ndarray]:
        """Per history, the known item_idx of its ``exclude`` list (unknown ids are ignored)."""
        if exclude is None:
            return [np.zeros(0, dtype=np.int64)] * n
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, (Sequence, np.ndarray)):
            raise ValueError("exclude must be a list with one list of item id strings per history, "
                             f"got {type(exclude).__name__}")
        if len(exclude) != n:
            raise ValueError(f"exclude has {len(exclude)} lists for {n} histories; give one per history")
        out = []
        for i, ids in enumerate(exclude):
            items, problem = _as_history([] if ids is None else ids)
            if problem:
                raise ValueError(f"exclude[{i}]: {problem.replace('history', 'exclude list')}")
            known = [idx for idx in map(self.index.get, items) if idx is not None]
            out.append(np.unique(np.asarray(known, dtype=np.int64)))
        return out

    def _per_user_k(self, k: Any, n: int) -> list[int]:
        if k is None:
            return [self.default_k] * n
        if isinstance(k, (list, tuple, np.ndarray)):
            if len(k) != n:
                raise ValueError(f"k has {len(k)} values for {n} histories; give one k or one per history")
            return [self.check_k(v, f"k[{i}]") for i, v in enumerate(k)]
        return [self.check_k(k)] * n

    def _to_indices(self, histories: list[list[str]]) -> tuple[list[list[int]], list[np.ndarray], list[str]]:
        """``(recent, seen, unknown)``: per history its last ``max_len`` known item_idx in order (what the
        model reads) and its distinct known item_idx (what is excluded), plus every unknown id occurrence.

        A history may hold millions of ids, so the lookups run through ``map`` (C speed) and the
        distinct items come from a bincount, not a Python set.
        """
        recent, seen, unknown = [], [], []
        for history in histories:
            rows = list(map(self.index.get, history))
            if None in rows:
                unknown.extend(item_id for item_id, idx in zip(history, rows) if idx is None)
                rows = [idx for idx in rows if idx is not None]
            recent.append(rows[-self.max_len:])
            counts = np.bincount(np.asarray(rows, dtype=np.int64), minlength=len(self.item_ids) + 1)
            seen.append(np.flatnonzero(counts))
        return recent, seen, unknown

    def _popular(self, k: int, excluded: np.ndarray | None = None, lam: float = 0.0, explain: bool = False) -> dict:
        """The popularity fallback of an empty history (nothing to explain: ``because`` lists are empty)."""
        order = self._popular_order
        if excluded is not None and len(excluded):
            order = order[~np.isin(order, excluded)]
        if lam > 0 and len(order):
            pool = order[:pool_size(k)]
            relevance = torch.from_numpy(self.popularity[pool - 1].astype(np.float64))[None]
            picks = mmr_select(relevance, self.diversity_vectors()[torch.from_numpy(pool)][None], k, lam)[0]
            top = pool[picks[picks >= 0].numpy()]
        else:
            top = order[:k]
        result = self._result(top, self.popularity[top - 1].astype(np.float64))
        if explain:
            result.update(because=[[] for _ in top], because_scores=[[] for _ in top])
        return result

    def _result(self, idx: np.ndarray, scores: np.ndarray) -> dict:
        return {"item_ids": [self.item_ids[i - 1] for i in idx],
                "scores": [float(s) for s in scores],
                "texts": [self.texts[i - 1] for i in idx]}

    def _score(self, rows: list[list[int]], masked: list[np.ndarray], ks: list[int],
               lams: list[float] | None = None, explains: list[bool] | None = None) -> list[dict]:
        """One forward pass for a batch of non-empty histories: ``rows`` (item_idx lists, at most
        ``max_len`` each) feed the model, ``masked`` (per history the item_idx never to recommend: its seen
        items and its exclude list) are excluded. ``lams``: MMR's λ per history (0: the plain top k);
        ``explains``: whether to explain each history's items (one more forward pass, of the ablated
        histories of all of them)."""
        lams = lams or [0.0] * len(rows)
        explains = explains or [False] * len(rows)
        seq = torch.from_numpy(left_pad(rows, self.max_len))
        with torch.inference_mode():
            # the options score against the cached item table (the same values score_next computes)
            table = self._table() if any(explains) or any(lams) else None
            scores = self.model.score_next(seq, table).float()
            if self.retired.any():
                scores[:, 1:][:, torch.from_numpy(self.retired)] = float("-inf")
            user = np.repeat(np.arange(len(rows)), [len(s) for s in masked])
            if len(user):
                scores[torch.from_numpy(user), torch.from_numpy(np.concatenate(masked))] = float("-inf")
            top_scores, top_idx = scores.topk(max(ks), dim=1)
            diverse = [u for u, lam in enumerate(lams) if lam > 0]
            picked = self._diversified(scores, diverse, [ks[u] for u in diverse], [lams[u] for u in diverse])
        out = []
        for u, k in enumerate(ks):
            if u in picked:
                i = picked[u]
                s = scores[u, torch.from_numpy(i)].numpy()
            else:
                s, i = top_scores[u, :k].numpy(), top_idx[u, :k].numpy()
            finite = np.isfinite(s)  # excluded items and padding score -inf
            out.append(self._result(i[finite], s[finite]))
        self._explain([u for u, e in enumerate(explains) if e], rows, scores, out)
        return out

    def _diversified(self, scores: torch.Tensor, users: list[int], ks: list[int], lams: list[float]) -> dict:
        """``{user: item_idx array}`` picked by MMR from each user's pool of ``pool_size(k)`` best items."""
        if not users:
            return {}
        size = min(pool_size(max(ks)), scores.shape[1])
        pool_scores, pool_idx = scores[users].topk(size, dim=1)
        picks = mmr_select(pool_scores, self.diversity_vectors()[pool_idx], max(ks),
                           torch.tensor(lams, dtype=torch.float64))
        out = {}
        for row, (u, k) in enumerate(zip(users, ks)):
            chosen = picks[row, :k]
            out[u] = pool_idx[row, chosen[chosen >= 0]].numpy()
        return out

    def _explain(self, users: list[int], rows: list[list[int]], scores: torch.Tensor, out: list[dict]) -> None:
        """Add ``because`` / ``because_scores`` to the results of ``users`` (leave-one-out, one batch)."""
        if not users:
            return
        items = [np.asarray([self.index[i] for i in out[u]["item_ids"]], dtype=np.int64) for u in users]
        with torch.inference_mode():
            found = leave_one_out(self.model, [rows[u] for u in users], items, scores[users], self.max_len,
                                  self._table())
        for u, (dropped, contribution) in zip(users, found):
            reasons = because(rows[u], dropped, contribution)
            out[u]["because"] = [[self.item_ids[i - 1] for i in ids] for ids, _ in reasons]
            out[u]["because_scores"] = [values for _, values in reasons]

    # ------------------------------------------------------------------------- DataFrame contract
    def predict_frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """The registry's DataFrame contract.

        Input: a ``history`` column (each value a list/array of item id strings, most recent last)
        and an optional ``k`` column (positive ints; missing = the package's default); optional
        ``exclude`` (lists of item ids never to return), ``diversity`` (λ in [0, 1]) and ``explain``
        (bool) columns, a missing value meaning none, 0 and false. Output: one row per input row (same
        index) with ``item_ids`` (list[str]) and ``scores`` (list[float]), plus ``because`` and
        ``because_scores`` (per item a list; None on rows that did not ask) when some row asks to explain.
        Invalid rows raise one ValueError listing the problems, each naming its row (0-based position).
        """
        problems: list[str] = []
        options = frame_options(df, problems)
        histories, ks = self.frame_requests(df, problems)
        return result_frame(self._recommend(histories, ks, warn_stacklevel=3, **options), df)

    def frame_requests(self, df: pd.DataFrame, problems: list[str] | None = None) -> tuple[list[list[str]], list[int]]:
        """``(histories, ks)`` of a :meth:`predict_frame` input, checked; the problems of every row are
        raised together (``problems``: the caller's own, raised with them)."""
        if not isinstance(df, pd.DataFrame):
            raise ValueError(f"expected a pandas DataFrame with a 'history' column, got {type(df).__name__}")
        if "history" not in df.columns:
            raise ValueError(f"input must have a 'history' column (lists of item id strings); "
                             f"got columns {list(map(str, df.columns))}")
        histories, ks, problems = [], [], list(problems or [])
        k_values = df["k"].tolist() if "k" in df.columns else [None] * len(df)
        for row, (history, k) in enumerate(zip(df["history"].tolist(), k_values)):
            items, problem = _as_history(history)
            if problem:
                problems.append(f"row {row}: {problem}")
            histories.append(items)
            if k is None or (isinstance(k, float) and math.isnan(k)):
                ks.append(self.default_k)
                continue
            try:
                ks.append(self.check_k(k))
            except ValueError as err:
                problems.append(f"row {row}: {err}")
        raise_problems(problems)
        return histories, ks


def raise_problems(problems: list[str]) -> None:
    """One ValueError listing the first problems of an input (each naming its row), if there are any."""
    if problems:
        shown = problems[:_MAX_REPORTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more problems")
        raise ValueError("invalid input: " + "; ".join(shown))


def result_frame(results: list[dict], df: pd.DataFrame) -> pd.DataFrame:
    """The registry's output: ``item_ids`` and ``scores`` per input row, on the input's index, plus
    ``because`` and ``because_scores`` when some result explains its items."""
    columns = {"item_ids": [r["item_ids"] for r in results], "scores": [r["scores"] for r in results]}
    if any("because" in r for r in results):
        columns.update(because=[r.get("because") for r in results],
                       because_scores=[r.get("because_scores") for r in results])
    return pd.DataFrame(columns, index=df.index)


OPTION_COLUMNS = ("exclude", "diversity", "explain")


def frame_options(df: Any, problems: list[str]) -> dict:
    """``exclude``, ``diversity`` and ``explain`` of a :meth:`Recommender.predict_frame` input, one value per
    row (a missing column or value: none, 0, false), as :meth:`Recommender.recommend` takes them; the
    problems of each row are appended to ``problems``."""
    if not isinstance(df, pd.DataFrame):
        return {}
    options: dict[str, Any] = {}
    if "exclude" in df.columns:
        lists = []
        for row, value in enumerate(df["exclude"].tolist()):
            items, problem = ([], None) if _is_missing(value) else _as_history(value)
            if problem:
                problems.append(f"row {row}: {problem.replace('history', 'exclude')}")
            lists.append(items)
        options["exclude"] = lists
    for name, check, default in (("diversity", check_diversity, 0.0), ("explain", check_explain, False)):
        if name not in df.columns:
            continue
        values = []
        for row, value in enumerate(df[name].tolist()):
            try:
                values.append(default if _is_missing(value) else check(value, name))
            except ValueError as err:
                problems.append(f"row {row}: {err}")
                values.append(default)
        options[name] = values
    return options


def check_diversity(value: Any, where: str = "diversity") -> float:
    """λ of MMR as a float in [0, 1], else ValueError naming ``where``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 0 <= value <= 1:
        raise ValueError(f"{where} must be a number between 0 and 1, got {short_repr(value)}")
    return float(value)


def check_explain(value: Any, where: str = "explain") -> bool:
    """``explain`` as a bool (true/false only: 1 or 'yes' are refused), else ValueError naming ``where``."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where} must be true or false, got {short_repr(value)}")
    return bool(value)


def per_history(value: Any, n: int, name: str, check) -> list:
    """One checked value for each of ``n`` histories: ``value`` itself for all, or a list of one per history."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} histories; give one {name} or one per history")
        return [check(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [check(value, name)] * n


@dataclass
class LoadedPackage:
    """What every model package holds, read and checked: the model (CPU, eval mode), its items table
    (sorted by item_idx), texts, ``model.json`` and serving settings."""

    folder: Path
    model: torch.nn.Module
    items: Any  # pyarrow Table: item_idx, item_id, text, popularity
    texts: list[str]
    meta: dict
    model_cfg: Any
    exclude_seen: bool
    default_k: int

    @property
    def num_items(self) -> int:
        return int(self.meta["num_items"])


def load_package(path: str | Path, trust_remote_code: bool = False) -> LoadedPackage:
    """Read a model package folder (weights via safetensors, on CPU, model in eval mode).

    Every file is checked as it is read, and a problem is a ``ValueError`` (``FileNotFoundError`` for a
    missing file) naming the file. A package whose text encoder needs its own Python code is refused
    unless ``trust_remote_code``. A rating/click package's model is its bi-encoder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model package {str(folder)!r} does not exist or is not a folder")
    missing = [name for name in PACKAGE_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} is not a model package: it lacks {', '.join(missing)}")
    settings = read_json(folder / RECOMMENDER_FILE, NOT_A_PACKAGE)
    version = settings.get("format_version")
    if version != PACKAGE_FORMAT_VERSION:
        raise ValueError(f"{folder / RECOMMENDER_FILE}: unsupported format_version {version!r}; "
                         f"this llmrec_dist reads format_version {PACKAGE_FORMAT_VERSION}")
    exclude_seen, default_k = _serving_settings(settings, folder / RECOMMENDER_FILE)
    meta = read_model_meta(folder, NOT_A_PACKAGE)
    num_items = meta["num_items"]
    model_cfg = saved_model_config(folder, meta, trust_remote_code)
    task = meta.get("task")
    if task is not None and not isinstance(task, dict):
        raise ValueError(f"{folder / MODEL_META_FILE}: task must be an object, got {short_repr(task)}; {NOT_A_PACKAGE}")

    items_file = folder / ITEMS_FILE
    items = conform_table(read_parquet_file(items_file, remedy=NOT_A_PACKAGE), ITEMS_SCHEMA, items_file,
                          "items", remedy=NOT_A_PACKAGE).sort_by("item_idx")
    idx = items.column("item_idx").to_numpy()
    if len(idx) != num_items or not np.array_equal(idx, np.arange(1, num_items + 1)):
        raise ValueError(f"{items_file}: item_idx must run 1..{num_items} "
                         f"(model.json num_items), got {len(idx)} rows")
    texts = [str(t) for t in items.column("text").to_pylist()]
    model = restore_model(folder, model_cfg, num_items, texts, folder / TEXT_CACHE_DIR, task)
    return LoadedPackage(folder, model, items, texts, meta, model_cfg, exclude_seen, default_k)


def _as_history(value: Any) -> tuple[list[str], str | None]:
    """A history value as a list of strings, or a description of what is wrong with it.

    Only strings are ids (see the module docstring); the check runs at C speed for long histories and
    looks for the offending position only when there is one.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return [], f"history must be a list of item id strings, got {type(value).__name__}"
    if all(issubclass(t, str) for t in set(map(type, value))):
        return list(value), None
    pos, item = next((pos, item) for pos, item in enumerate(value) if not isinstance(item, str))
    return [], f"history[{pos}] must be an item id string, got {type(item).__name__} ({short_repr(item)})"


def _first_distinct(values: list[str], n: int) -> list[str]:
    """The first ``n`` distinct values, in order, without building a set of all of them."""
    found: dict[str, None] = {}
    for value in values:
        found.setdefault(value, None)
        if len(found) == n:
            break
    return list(found)


# ------------------------------------------------------------------------------------ package files
def _serving_settings(settings: dict, path: Path) -> tuple[bool, int]:
    """``(exclude_seen, default_k)`` from recommender.json, checked."""
    exclude_seen, default_k = settings.get("exclude_seen", True), settings.get("default_k", 10)
    if not isinstance(exclude_seen, bool):
        raise ValueError(f"{path}: exclude_seen must be true or false, got {short_repr(exclude_seen)}")
    if isinstance(default_k, bool) or not isinstance(default_k, int) or default_k < 1:
        raise ValueError(f"{path}: default_k must be a positive integer, got {short_repr(default_k)}")
    return exclude_seen, default_k


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _catalogue_columns(items: Any) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """``(ids, text by id, popularity by id)`` of a catalogue DataFrame, with errors naming the row."""
    if not isinstance(items, pd.DataFrame) or not {"item_id", "text"} <= set(items.columns):
        raise ValueError("items must be a DataFrame with 'item_id' and 'text' columns")
    if len(items) == 0:
        raise ValueError("items: the catalogue is empty; it must list at least one item")
    ids, texts = items["item_id"].tolist(), items["text"].tolist()
    for row, (item_id, text) in enumerate(zip(ids, texts)):
        if _is_missing(item_id) or str(item_id).strip() == "":
            raise ValueError(f"items: row {row}: missing item_id")
        if isinstance(item_id, (list, tuple, dict, np.ndarray)):
            raise ValueError(f"items: row {row}: item_id must be a string or integer, got {type(item_id).__name__}")
        if _is_missing(text):
            raise ValueError(f"items: row {row}: missing text (an item with no text cannot be represented)")
        if not isinstance(text, str):
            raise ValueError(f"items: row {row}: text must be a string, got {type(text).__name__} ({short_repr(text)})")
    ids = [str(i) for i in ids]
    seen: dict[str, int] = {}
    for row, item_id in enumerate(ids):
        if item_id in seen:
            raise ValueError(f"items: row {row}: item_id {short_repr(item_id)} repeats row {seen[item_id]}; "
                             "item_id values must be unique")
        seen[item_id] = row
    popularity: dict[str, int] = {}
    if "popularity" in items.columns:
        for row, (item_id, value) in enumerate(zip(ids, items["popularity"].tolist())):
            number = value if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
            if number is None or not math.isfinite(number) or number < 0 or not float(number).is_integer():
                raise ValueError(f"items: row {row}: popularity must be a non-negative integer, got {short_repr(value)}")
            popularity[item_id] = int(number)
    return ids, dict(zip(ids, texts)), popularity

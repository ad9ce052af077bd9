"""The diversity benchmark: what MMR re-ranking (``recommend(..., diversity=λ)``) costs in accuracy and
buys in diversity, per λ, on a split of a prepared dataset.

Same protocol as ``evaluate``: every item ranked (full ranking), the user's history left out of the
ranking (the target always stays rankable), the test row's history fed to the model. MMR measures
similarity where the recommender's ``diversity_space`` says (the model's item vectors, or the items' text
embeddings). Per λ: NDCG@10 and HR@10 of the target within the served top 10, intra-list diversity (mean
pairwise cosine distance of the top 10) measured twice, on the model's output item vectors (``ild_at_10``)
and on the text embeddings (``ild_text_at_10``, when given), and catalogue coverage@10; then the largest
λ whose NDCG@10 is within 2 % of λ = 0's, and its ILD gains in both spaces.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from llmrec_dist.batching import left_pad
from llmrec_dist.bench.common import save_figure, summary_run
from llmrec_dist.diversity import mmr_select, pool_size
from llmrec_dist.evaluation import EvalRows, load_eval_rows
from llmrec_dist.metrics import catalogue_coverage, intra_list_diversity, mask_seen

K = 10
MAX_NDCG_LOSS = 0.02
COLUMNS = [("lambda", "λ", "g"), ("ndcg_at_10", "NDCG@10", ".4f"), ("hr_at_10", "HR@10", ".4f"),
           ("ild_at_10", "ILD@10 model", ".4f"), ("ild_text_at_10", "ILD@10 text", ".4f"),
           ("coverage_at_10", "coverage@10", ".4f"),
           ("ndcg_change", "NDCG change", "+.1%")]


def load_served(model: str, tracking_uri: str = ""):
    """The :class:`Recommender` of a model package folder or an MLflow model URI (a checkpoint folder is
    refused: the benchmark measures what serving returns)."""
    from llmrec_dist.saved_model import resolve_model_folder
    from llmrec_dist.registry.recommender import Recommender
    from llmrec_dist.saved_model import RECOMMENDER_FILE

    folder = resolve_model_folder(model, tracking_uri)
    if not (folder / RECOMMENDER_FILE).is_file():
        raise ValueError(f"{model}: not a model package (no {RECOMMENDER_FILE}); pass the run's MLflow model "
                         "(runs:/RUN_ID/model, models:/NAME@ALIAS) or its package folder, not a checkpoint")
    return Recommender.from_folder(folder)


def eval_rows(rec, data: str, split: str, users: int = 0) -> EvalRows:
    """The split's rows (the first ``users`` in user order; 0 = all), after checking the dataset is the
    model's."""
    from llmrec_dist.data.dataset_format import read_manifest

    if split not in ("valid", "test"):
        raise ValueError(f"--split must be valid or test, got {split!r}")
    content_hash = read_manifest(data)["content_hash"]
    if rec.dataset_hash and rec.dataset_hash != content_hash:
        raise ValueError(f"the model was trained on dataset {rec.dataset_hash} but {data} is {content_hash}: "
                         "item indices would not match")
    rows = load_eval_rows(data, split)
    if users and users < len(rows):
        rows = EvalRows(rows.histories[:users], rows.targets[:users], rows.cold[:users],
                        None if rows.freq is None else rows.freq[:users])
    return rows


@torch.no_grad()
def diversity_curve(rec, rows: EvalRows, lambdas: list[float], k: int = K, batch_size: int = 256,
                    text_vectors: torch.Tensor | None = None) -> list[dict]:
    """One row of figures per λ (see the module docstring); ``text_vectors`` [N + 1, H]: the items' text
    embeddings the text ILD is measured on (None: NaN)."""
    table, similar = rec._table(), rec.diversity_vectors()
    lists: dict[float, list[np.ndarray]] = {lam: [] for lam in lambdas}
    ndcg = {lam: 0.0 for lam in lambdas}
    hits = {lam: 0 for lam in lambdas}
    for start in range(0, len(rows), batch_size):
        part = range(start, min(start + batch_size, len(rows)))
        histories = [np.asarray(rows.histories[i], dtype=np.int64) for i in part]
        targets = torch.from_numpy(rows.targets[start:start + len(part)])
        seq = torch.from_numpy(left_pad([h[-rec.max_len:].tolist() for h in histories], rec.max_len))
        seen = torch.from_numpy(left_pad([h.tolist() for h in histories], max(len(h) for h in histories)))
        scores = mask_seen(rec.model.score_next(seq, table).float(), seen, targets)
        if rec.retired.any():
            scores[:, 1:][:, torch.from_numpy(rec.retired)] = float("-inf")
        pool_scores, pool_idx = scores.topk(min(pool_size(k), scores.shape[1]), dim=1)
        plain_scores, plain = scores.topk(k, dim=1)
        plain = plain.masked_fill(~torch.isfinite(plain_scores), 0)  # fewer than k rankable items
        for lam in lambdas:
            if lam == 0:
                top = plain
            else:
                picks = mmr_select(pool_scores, similar[pool_idx], k, lam)
                top = pool_idx.gather(1, picks.clamp(min=0)).masked_fill(picks < 0, 0)
            where = (top == targets[:, None]).nonzero()
            hits[lam] += len(where)
            ndcg[lam] += float((1.0 / torch.log2(where[:, 1].double() + 2)).sum())
            lists[lam] += [t[t > 0].numpy() for t in top]
    base = ndcg[lambdas[0]] if lambdas[0] == 0 else None
    out = []
    for lam in lambdas:
        row = {"lambda": lam, "ndcg_at_10": ndcg[lam] / len(rows), "hr_at_10": hits[lam] / len(rows),
               "ild_at_10": intra_list_diversity(lists[lam], table),
               "ild_text_at_10": float("nan") if text_vectors is None else intra_list_diversity(lists[lam],
                                                                                               text_vectors),
               "coverage_at_10": catalogue_coverage(lists[lam], rec.num_items), "users": len(rows)}
        row["ndcg_change"] = ndcg[lam] / base - 1 if base else float("nan")
        out.append(row)
    return out


def chosen_lambda(rows: list[dict], max_loss: float = MAX_NDCG_LOSS) -> dict:
    """The largest λ whose NDCG@10 is at most ``max_loss`` (relative) below λ = 0's, and its ILD gains
    (``ild_*`` on the model's vectors, ``ild_text_*`` on the text embeddings: NaN where not measured)."""
    base = next(r for r in rows if r["lambda"] == 0)
    ok = [r for r in rows if r["ndcg_at_10"] >= (1 - max_loss) * base["ndcg_at_10"]]
    best = max(ok, key=lambda r: r["lambda"])
    out = {"lambda": best["lambda"], "max_ndcg_loss": max_loss, "ndcg_at_10": best["ndcg_at_10"],
           "ndcg_change": best["ndcg_at_10"] / base["ndcg_at_10"] - 1 if base["ndcg_at_10"] else float("nan"),
           "coverage_at_10": best["coverage_at_10"]}
    for space in ("", "_text"):
        key = f"ild{space}_at_10"
        gain = best.get(key, float("nan")) - base.get(key, float("nan"))
        out.update({key: best.get(key, float("nan")), f"ild{space}_gain": gain,
                    f"ild{space}_gain_relative": gain / base[key] if base.get(key) else float("nan")})
    return out


def plot(rows: list[dict], chosen: dict, path: Path, title: str = "", space: str = "model") -> Path:
    """NDCG@10 against ILD@10 in ``space`` (``model`` or ``text``: where MMR measured similarity), one point
    per λ (annotated), the chosen λ circled; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    key = "ild_text_at_10" if space == "text" else "ild_at_10"
    x, y = [r[key] for r in rows], [r["ndcg_at_10"] for r in rows]
    ax.plot(x, y, "o-", color="tab:blue")
    for r in rows:
        ax.annotate(f"λ={r['lambda']:g}", (r[key], r["ndcg_at_10"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.scatter([chosen[key]], [chosen["ndcg_at_10"]], s=160, facecolors="none", edgecolors="tab:red",
               label=f"largest λ within {chosen['max_ndcg_loss']:.0%} NDCG loss")
    ax.set_xlabel(f"intra-list diversity @10 (mean pairwise cosine distance of the {space} vectors)")
    ax.set_ylabel("NDCG@10")
    ax.set_title(title or "MMR: accuracy against diversity", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def log_to_mlflow(tracking_uri: str, experiment: str, settings: dict, rows: list[dict], chosen: dict,
                  files: list[Path]) -> str:
    """One run in ``experiment``: the settings as params, the curve as metrics stepped by λ x 100, the
    chosen λ and its gain, and ``files`` (the PNG, the JSON) as artifacts. Returns the run id."""
    def fill(c, run_id: str) -> None:
        for r in rows:
            for key in ("ndcg_at_10", "hr_at_10", "ild_at_10", "ild_text_at_10", "coverage_at_10"):
                if r[key] == r[key]:  # not NaN
                    c.log_metric(run_id, key, r[key], step=int(round(r["lambda"] * 100)))
        for key in ("lambda", "ild_gain", "ild_gain_relative", "ild_text_gain", "ild_text_gain_relative",
                    "ndcg_change"):
            if not math.isnan(chosen[key]):
                c.log_metric(run_id, f"chosen_{key}", chosen[key])

    return summary_run(tracking_uri, experiment, "bench-diversity", settings, fill, files)

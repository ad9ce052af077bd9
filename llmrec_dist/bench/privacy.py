"""The privacy benchmark: the privacy–utility curve of DP-SGD and a membership-inference audit.

One config, trained once without differential privacy and once per target ε (``privacy.epsilon``), all
else equal. Every run leaves the same users out of training (``data.holdout_users``, by a keyed hash of
their ``user_key``): the audit's non-members. Per run: test NDCG@10 and HR@10 (every user's test row,
full ranking), the share of the non-private NDCG@10 kept, the ε spent, seconds per epoch, and the AUC of
a loss-threshold membership-inference attack (Yeom et al., 2018): the attacker scores each user by the
model's loss on that user's training history — a lower loss says "trained on" — and the AUC is the
probability that a random member scores as more likely a member than a random non-member (0.5 = the
attacker learns nothing). The figures, a two-panel plot and the table are logged to one MLflow run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from llmrec_dist.bench.common import save_figure, summary_run

K_METRIC = "test_ndcg_at_10"
KEEP_GOAL = 0.70   # at the largest epsilon: share of the non-private NDCG@10 kept
AUC_GOAL = 0.55    # at the largest epsilon: attack AUC at most this
COLUMNS = [("setting", "setting", ""), ("epsilon_spent", "ε spent", ".2f"), ("noise_multiplier", "σ", ".3f"),
           ("test_ndcg_at_10", "NDCG@10", ".4f"), ("test_hr_at_10", "HR@10", ".4f"),
           ("ndcg_kept", "kept", ".1%"), ("attack_auc", "attack AUC", ".3f"),
           ("attack_advantage", "advantage", ".3f"), ("best_epoch", "best ep", "d"), ("epochs", "ep", "d"),
           ("s_per_epoch", "s/epoch", ".1f")]


def attack_auc(member_scores: np.ndarray, other_scores: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counting one half (Mann-Whitney)."""
    from scipy.stats import rankdata

    n1, n0 = len(member_scores), len(other_scores)
    if not n1 or not n0:
        return float("nan")
    ranks = rankdata(np.concatenate([member_scores, other_scores]))
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def attack_advantage(member_scores: np.ndarray, other_scores: np.ndarray) -> float:
    """max over thresholds of TPR - FPR (the membership advantage; 0 = no better than guessing)."""
    scores = np.concatenate([member_scores, other_scores])
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(other_scores))])
    if not len(scores):
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tpr = np.cumsum(labels[order]) / max(1, len(member_scores))
    fpr = np.cumsum(1 - labels[order]) / max(1, len(other_scores))
    ends = np.flatnonzero(np.r_[np.diff(scores[order]) != 0, True])  # a threshold never splits tied scores
    return float(max(0.0, np.max(tpr[ends] - fpr[ends])))


def user_losses(model, cfg, histories: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """The model's training loss on each history's training window (eval mode: no dropout), one user at
    a time — what the attacker reads off the model."""
    import torch

    from llmrec_dist.worker.recipe import TrainingPairs

    pairs = TrainingPairs(cfg, model.mask_id, seed)
    model.eval()
    out = np.full(len(histories), np.nan)
    with torch.no_grad():
        for i, items in enumerate(histories):
            result = model(*pairs([items]))
            if result["positions"].item():
                out[i] = result["loss"].item()
    return out


def audit(checkpoint: str, cfg) -> dict:
    """The attack on one trained model: members = trained users, non-members = ``data.holdout_users``."""
    from llmrec_dist.data.dataset_format import read_split
    from llmrec_dist.privacy import held_out
    from llmrec_dist.saved_model import load_model

    model, _ = load_model(checkpoint, cfg.data.path)
    table = read_split(cfg.data.path, cfg.training_split())
    out = held_out(table.column("user_key").to_pylist(), cfg.data.holdout_users)
    histories = [np.asarray(h, dtype=np.int64) for h in table.column("items").to_pylist()]
    losses = user_losses(model, cfg, histories, cfg.train.seed)
    keep = ~np.isnan(losses)
    members, others = -losses[keep & ~out], -losses[keep & out]  # a lower loss scores as "member"
    return {"attack_auc": attack_auc(members, others), "attack_advantage": attack_advantage(members, others),
            "members": int(len(members)), "non_members": int(len(others)),
            "member_loss": float(-members.mean()) if len(members) else float("nan"),
            "non_member_loss": float(-others.mean()) if len(others) else float("nan")}


def run_curve(config: str, overrides: list[str], epsilons: list[float], holdout: float, echo=print) -> list[dict]:
    """Train without DP, then at each target epsilon; test figures, cost and the attack per run."""
    from llmrec_dist.config import load_config
    from llmrec_dist.tracking import client as tracking_client
    from llmrec_dist.train.launcher import train

    rows = []
    for epsilon in [None, *epsilons]:
        setting = "no DP" if epsilon is None else f"ε={epsilon:g}"
        cfg = load_config(config, [*overrides, f"data.holdout_users={holdout}",
                                   f"privacy.epsilon={'null' if epsilon is None else epsilon}",
                                   f"mlflow.run_name=privacy-{'none' if epsilon is None else f'eps{epsilon:g}'}"])
        started = time.perf_counter()
        outcome = train(cfg, echo=echo)
        client = tracking_client(outcome.tracking_uri)
        params = client.get_run(outcome.run_id).data.params
        seconds = [h.value for h in client.get_metric_history(outcome.run_id, "train_seconds")]
        m = outcome.metrics
        row = {"setting": setting, "target_epsilon": epsilon,
               "epsilon_spent": m.get("privacy_epsilon", float("inf")),
               "delta": m.get("privacy_delta"),
               "noise_multiplier": float(params.get("privacy.noise_multiplier_used", 0.0)),
               "test_ndcg_at_10": m[K_METRIC], "test_hr_at_10": m["test_hr_at_10"],
               "valid_ndcg_at_10": m.get("valid_ndcg_at_10"),
               "best_epoch": int(m["best_epoch"]), "epochs": int(m["epochs_run"]),
               "s_per_epoch": sum(seconds) / max(len(seconds), 1), "wall_s": time.perf_counter() - started,
               "run_id": outcome.run_id, **audit(outcome.checkpoint_path, cfg)}
        echo(f"{setting}: test NDCG@10 {row['test_ndcg_at_10']:.4f}, attack AUC {row['attack_auc']:.3f}, "
             f"{row['s_per_epoch']:.1f} s/epoch")
        rows.append(row)
    base = rows[0]["test_ndcg_at_10"]
    for row in rows:
        row["ndcg_kept"] = row["test_ndcg_at_10"] / base if base else float("nan")
    return rows


def goals(rows: list[dict]) -> dict:
    """The issue's goals, read at the largest target epsilon."""
    private = [r for r in rows if r["target_epsilon"] is not None]
    if not private:
        return {}
    top = max(private, key=lambda r: r["target_epsilon"])
    return {"epsilon": top["target_epsilon"], "ndcg_kept": top["ndcg_kept"], "keep_goal": KEEP_GOAL,
            "keep_met": bool(top["ndcg_kept"] >= KEEP_GOAL), "attack_auc": top["attack_auc"],
            "non_private_attack_auc": rows[0]["attack_auc"], "auc_goal": AUC_GOAL,
            "auc_met": bool(top["attack_auc"] <= AUC_GOAL),
            "cost_ratio": top["s_per_epoch"] / rows[0]["s_per_epoch"] if rows[0]["s_per_epoch"] else float("nan")}


def plot(rows: list[dict], path: Path, title: str = "") -> Path:
    """Left: test NDCG@10 against epsilon spent (the non-private model as a dashed line); right: the
    attack AUC per setting (0.5 = chance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [r for r in rows if r["target_epsilon"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120)
    left.plot([r["epsilon_spent"] for r in private], [r["test_ndcg_at_10"] for r in private], "o-",
              color="tab:blue", label="DP-SGD")
    left.axhline(rows[0]["test_ndcg_at_10"], color="tab:gray", ls="--", label="no DP")
    left.axhline(rows[0]["test_ndcg_at_10"] * KEEP_GOAL, color="tab:red", ls=":", label=f"{KEEP_GOAL:.0%} of no DP")
    left.set_xscale("log")
    left.minorticks_off()
    left.set_xticks([r["epsilon_spent"] for r in private], [f"{r['epsilon_spent']:.3g}" for r in private])
    left.set_xlabel("epsilon spent (user level)")
    left.set_ylabel("test NDCG@10")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.bar([r["setting"] for r in rows], [r["attack_auc"] for r in rows], color="tab:orange")
    right.axhline(0.5, color="tab:gray", ls="--", label="chance")
    right.axhline(AUC_GOAL, color="tab:red", ls=":", label=f"goal ≤ {AUC_GOAL}")
    right.set_ylim(0.4, max(0.7, max(r["attack_auc"] for r in rows) + 0.02))
    right.set_ylabel("membership-inference AUC")
    right.legend(fontsize=8)
    fig.suptitle(title or "Privacy against utility", fontsize=10)
    return save_figure(fig, path)


def log_to_mlflow(tracking_uri: str, experiment: str, settings: dict, rows: list[dict], table_text: str,
                  files: list[Path]) -> str:
    """One run: the settings as params, each setting's figures as metrics stepped by its index (0 = no
    DP), the table as ``privacy_curve.md`` and ``files`` (PNG, JSON) as artifacts. Returns the run id."""
    def fill(c, run_id: str) -> None:
        for step, r in enumerate(rows):
            for key in ("test_ndcg_at_10", "test_hr_at_10", "ndcg_kept", "attack_auc", "attack_advantage",
                        "s_per_epoch", "epsilon_spent"):
                if isinstance(r.get(key), float) and math.isfinite(r[key]):
                    c.log_metric(run_id, key, r[key], step=step)
        c.log_text(run_id, table_text + "\n", "privacy_curve.md")

    return summary_run(tracking_uri, experiment, "bench-privacy", settings, fill, files)

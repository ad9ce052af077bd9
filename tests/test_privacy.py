"""User-level DP-SGD (llmrec_dist.privacy): the config's refusals, the noise calibration, the per-user
clipped step by hand, Poisson sampling, the keyed user split, the audit's AUC, and the registry's
private-champion gate. The end-to-end runs on a real local Ray are in test_privacy_integration.py."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmrec_dist.bench.privacy import attack_advantage, attack_auc
from llmrec_dist.config import ConfigError, ModelConfig, load_config
from llmrec_dist.model import build_model
from llmrec_dist.privacy import (PrivacyError, PrivacyPlan, PrivateStep, epsilon_after, held_out, plan,
                                 poisson_batches, shard_of, unit_hash)
from llmrec_dist.registry.promotion import TAG_DATASET, TAG_EPSILON, TAG_METRIC_KEY, TAG_METRIC_VALUE, _decide
from mlflow_db import sqlite_uri

DP = ["data.path=/data", "privacy.epsilon=8", "train.negatives_from=catalogue"]


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, key", [
    ("privacy.epsilon=0", "privacy.epsilon"),
    ("privacy.epsilon=-2", "privacy.epsilon"),
    ("privacy.delta=1", "privacy.delta"),
    ("privacy.delta=0", "privacy.delta"),
    ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
    ("privacy.noise_multiplier=-1", "privacy.noise_multiplier"),
    ("privacy.noise_multiplier=1.1", "privacy.noise_multiplier"),   # both set
    ("data.windows=true", "data.windows"),
    ("train.negatives_from=trained", "train.negatives_from"),
    ("train.grad_accum=2", "train.grad_accum"),
    ("task.type=rating", "privacy.epsilon"),
])
def test_bad_privacy_settings_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*DP, override])
    problems = [p for p in err.value.problems if p.startswith(key)]
    assert problems and all("\n" not in p for p in problems), err.value.problems


def test_id_min_count_is_refused_only_where_it_reads_private_counts():
    with pytest.raises(ConfigError, match="model.id_min_count"):
        load_config(None, [*DP, "model.item_repr=id+text", "model.id_min_count=3"])
    assert load_config(None, [*DP, "model.item_repr=id+text"]).private()


def test_privacy_is_off_unless_epsilon_or_noise_is_set():
    assert not load_config(None, ["data.path=/d"]).private()
    assert load_config(None, ["data.path=/d", "privacy.noise_multiplier=1.0",
                              "train.negatives_from=catalogue"]).private()
    assert not load_config(None, [*DP, "privacy.epsilon=null"]).private()


# ------------------------------------------------------------------------------------------ the plan
def _cfg(*extra):
    return load_config(None, [*DP, "train.batch_size=100", "train.epochs=3", *extra])


def test_the_noise_is_calibrated_to_the_target_epsilon():
    p = plan(_cfg(), users=2000)
    assert p.sample_rate == pytest.approx(0.05) and p.steps_per_epoch == 20 and p.delta == pytest.approx(1 / 2000)
    spent = epsilon_after(p.noise_multiplier, p.sample_rate, 60, p.delta, "prv")
    assert 8 - 0.02 <= spent <= 8.0 + 1e-6 and p.planned_epsilon == pytest.approx(spent)
    # a smaller budget needs more noise; RDP (looser) needs more than PRV for the same target
    assert plan(_cfg("privacy.epsilon=1"), 2000).noise_multiplier > p.noise_multiplier
    assert plan(_cfg("privacy.accountant=rdp"), 2000).noise_multiplier > p.noise_multiplier
    assert plan(_cfg("privacy.delta=1e-6"), 2000).delta == 1e-6


def test_a_given_noise_multiplier_reports_its_epsilon():
    cfg = load_config(None, ["data.path=/d", "privacy.noise_multiplier=1.0", "train.negatives_from=catalogue",
                             "train.batch_size=100", "train.epochs=3"])
    p = plan(cfg, users=2000)
    assert p.noise_multiplier == 1.0 and p.target_epsilon is None
    assert p.planned_epsilon == pytest.approx(epsilon_after(1.0, 0.05, 60, 1 / 2000, "prv"))
    assert "e^" in p.sentence() and f"{p.planned_epsilon:.2f}" in p.sentence()


def test_an_unreachable_budget_or_batch_names_its_key():
    with pytest.raises(PrivacyError, match=r"^privacy\.epsilon: 1e-05 cannot be reached"):
        plan(_cfg("privacy.epsilon=1e-5", "train.epochs=200"), users=2000)
    with pytest.raises(PrivacyError, match=r"^train\.batch_size"):
        plan(_cfg(), users=80)


# ------------------------------------------------------------------------------------------ sampling and split
def test_a_users_holdout_and_worker_depend_on_its_key_alone():
    keys = [f"user-{i}" for i in range(4000)]
    flags, shards = held_out(keys, 0.2), shard_of(keys, 3)
    assert 0.17 < flags.mean() < 0.23 and set(shards) == {0, 1, 2}
    # the same user, among other users or alone, gets the same answer
    assert held_out(keys[7:8], 0.2)[0] == flags[7] and shard_of(keys[7:8], 3)[0] == shards[7]
    assert not held_out(keys, 0.0).any()
    assert unit_hash("a", b"salt-1") != unit_hash("a", b"salt-2")


def test_poisson_batches_include_each_row_independently():
    rng = np.random.default_rng(0)
    batches = list(poisson_batches(1000, 0.1, 400, rng))
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - 100) < 3 and sizes.std() > 5  # the size varies (Binomial(1000, 0.1): std 9.5)
    counts = np.bincount(np.concatenate(batches), minlength=1000)
    assert abs(counts.mean() - 40) < 1 and counts.min() > 15


# ------------------------------------------------------------------------------------------ the step by hand
class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))


def _step(plan_: PrivacyPlan, examples, chunk=32, model=None):
    model = model or Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = PrivateStep(model, optimizer, plan_, world=1, user_chunk=chunk)

    def loss_of(x):  # loss = w . x: the user's gradient is x itself
        return (model.w * torch.tensor(x)).sum(), 1

    dp.step(examples, loss_of)
    return -model.w.detach(), dp   # SGD at lr 1: the applied gradient


def _plan(sigma=0.0, users=40, rate=0.1, clip=1.0):
    return PrivacyPlan(users=users, sample_rate=rate, steps_per_epoch=10, epochs=1, noise_multiplier=sigma,
                       max_grad_norm=clip, delta=1e-5, accountant="rdp", target_epsilon=None, planned_epsilon=1.0)


def test_each_users_gradient_is_clipped_then_averaged_over_the_expected_batch():
    # three users with gradients of norm 0.5, 5 and 2: the last two are clipped to norm 1
    users = [[0.3, 0.4, 0.0], [3.0, 0.0, 4.0], [0.0, 2.0, 0.0]]
    applied, _ = _step(_plan(), users)
    expected = (np.array([0.3, 0.4, 0.0]) + np.array([0.6, 0.0, 0.8]) + np.array([0.0, 1.0, 0.0])) / 4  # E[B] = 40 x 0.1
    assert np.allclose(applied.numpy(), expected, atol=1e-5)
    # computing the users' gradients in chunks of 2 adds up to the same step
    assert np.allclose(_step(_plan(), users, chunk=2)[0].numpy(), expected, atol=1e-5)


def test_an_empty_batch_still_takes_a_noisy_step_and_is_counted():
    applied, dp = _step(_plan(sigma=0.0), [])
    assert torch.all(applied == 0) and dp.accountant.history == [(0.0, 0.1, 1)]


def test_the_noise_has_std_sigma_times_clip_over_the_expected_batch():
    class Wide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(20000))

    model = Wide()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = PrivateStep(model, optimizer, _plan(sigma=2.0, clip=0.5, users=100, rate=0.1), world=1, user_chunk=8)
    dp.step([0], lambda _: ((model.w * 0).sum(), 1))  # a zero gradient: the step is the noise alone
    std = model.w.detach().std().item()
    assert std == pytest.approx(2.0 * 0.5 / 10, rel=0.05)


def test_the_noise_is_not_reproducible_from_the_seed():
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Linear()
        dp = PrivateStep(model, torch.optim.SGD(model.parameters(), lr=1.0), _plan(sigma=1.0), world=1, user_chunk=4)
        dp.step([[1.0, 0.0, 0.0]], lambda x: ((model.w * torch.tensor(x)).sum(), 1))
        draws.append(model.w.detach().clone())
    assert not torch.equal(draws[0], draws[1])


def _assert_step_is_the_mean_user_gradient(model, cfg, rows) -> list[str]:
    """With a clipping norm no gradient reaches and no noise, one DP step (users in chunks of 2) applies
    exactly the mean over ``rows`` of each user's own gradient, computed here on that user alone (in a
    batch of 1, the same cloze mask each time). Returns the names of the weights that moved."""
    from llmrec_dist.worker.recipe import TrainingPairs

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    def loss_of(row):
        out = model(*TrainingPairs(cfg, model.mask_id, 0)([row]))
        return out["loss"], out["positions"].item()

    expected = [torch.zeros_like(p) for p in params]
    for row in rows:
        for e, g in zip(expected, torch.autograd.grad(loss_of(row)[0], params, allow_unused=True)):
            if g is not None:
                e += g / len(rows)
    before = [p.detach().clone() for p in params]
    dp = PrivateStep(model, torch.optim.SGD(params, lr=1.0), _plan(clip=1e6, users=10 * len(rows), rate=0.1),
                     world=1, user_chunk=2)
    dp.step(rows, loss_of)
    for (name, p), b, e in zip(named, before, expected):
        assert torch.allclose(b - p.detach(), e, atol=1e-6), name
    return [name for (name, _), e in zip(named, expected) if e.abs().sum() > 0]


@pytest.mark.parametrize("backbone", ["causal", "bidirectional"])
def test_on_the_recommender_each_users_gradient_is_that_users_alone(backbone):
    """Without noise and with a clipping norm no gradient reaches, a DP step applies the mean over the
    batch's users of each user's own gradient (computed here on that user alone, in one batch of 1)."""
    cfg = load_config(None, [*DP, f"model.backbone={backbone}", "model.hidden_size=8", "model.num_heads=2",
                             "model.max_len=6", "model.dropout=0", "model.mask_ratio=0.5"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 20)
    _assert_step_is_the_mean_user_gradient(model, cfg, [np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8, 9, 10, 11, 12]),
                                                        np.array([3, 9])])


# ------------------------------------------------------------------------------------------ the audit
def test_attack_auc_and_advantage_by_hand():
    # pairs (member, other): 3>1, 3>2, 2>1, 2=2 (a half): 3.5 of 4
    assert attack_auc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    assert attack_auc(np.array([1.0, 1.0]), np.array([1.0])) == pytest.approx(0.5)
    # threshold above 2: TPR 1/2, FPR 0; at 2: TPR 1, FPR 1/2 -> the best is 1/2
    assert attack_advantage(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.5)
    assert math.isnan(attack_auc(np.array([]), np.array([1.0])))


# ------------------------------------------------------------------------------------------ the registry gate
def _holder(**tags):
    base = {TAG_DATASET: "h", TAG_METRIC_KEY: "valid_ndcg_at_10", TAG_METRIC_VALUE: "0.1"}
    return SimpleNamespace(version="3", tags={**base, **tags})


def test_a_model_without_dp_never_replaces_a_private_champion_unless_allowed():
    private = _holder(**{TAG_EPSILON: "8"})
    promoted, reason = _decide(private, "champion", "valid_ndcg_at_10", 0.5, "h")
    assert not promoted and "differential privacy" in reason and "mlflow.replace_private" in reason
    assert _decide(private, "champion", "valid_ndcg_at_10", 0.5, "h", replace_private=True)[0]
    assert _decide(private, "champion", "valid_ndcg_at_10", 0.5, "h", private=True)[0]
    assert not _decide(private, "champion", "valid_ndcg_at_10", 0.05, "h", private=True)[0]  # still must beat it
    assert _decide(_holder(), "champion", "valid_ndcg_at_10", 0.5, "h")[0]


def test_the_default_model_config_is_untouched_by_privacy():
    # privacy adds a section; the model section stays what it was
    assert dataclasses.asdict(load_config(None, DP).model) == dataclasses.asdict(ModelConfig())


@pytest.mark.parametrize("item_repr, freeze", [("text", "frozen"), ("id+text", "lora"), ("text", "top_k")])
def test_lm_towers_give_each_user_its_own_gradient(tmp_path, item_repr, freeze):
    """The LM towers under the per-user step: with a clipping norm no gradient reaches and no noise, the
    step applies the mean of the users' own gradients, the LM's trainable weights included."""
    from llmrec_dist.text_tower import prepare_text_features
    from text_fixtures import make_tiny_encoder

    texts = [f"item {i} about {'space robots' if i % 2 else 'old castles'}" for i in range(1, 21)]
    encoder = make_tiny_encoder(tmp_path / "bert", texts, hidden=16, layers=2, dropout=0.0)
    cfg = load_config(None, [*DP, f"model.item_repr={item_repr}", f"model.freeze={freeze}",
                             f"model.text_encoder={encoder}", "model.hidden_size=8", "model.num_heads=2",
                             "model.max_len=6", "model.dropout=0", "model.lora_dropout=0", "model.lora_r=2",
                             "model.text_max_len=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 20, text=prepare_text_features(cfg.model, texts, cache_dir=tmp_path / "c"))
    model.train()
    moved = _assert_step_is_the_mean_user_gradient(model, cfg, [np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8, 9]),
                                                                np.array([11, 12])])
    assert any(("lora" in n or "top_layers" in n or "text_proj" in n) for n in moved)  # the text side trained


def test_the_curve_is_plotted_and_logged_to_one_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from llmrec_dist.bench.privacy import goals, log_to_mlflow, plot

    rows = [{"setting": "no DP", "target_epsilon": None, "epsilon_spent": float("inf"), "test_ndcg_at_10": 0.10,
             "test_hr_at_10": 0.2, "ndcg_kept": 1.0, "attack_auc": 0.6, "attack_advantage": 0.2, "s_per_epoch": 2.0},
            {"setting": "ε=8", "target_epsilon": 8.0, "epsilon_spent": 7.99, "test_ndcg_at_10": 0.08,
             "test_hr_at_10": 0.15, "ndcg_kept": 0.8, "attack_auc": 0.52, "attack_advantage": 0.05, "s_per_epoch": 6.0}]
    reached = goals(rows)
    assert reached["keep_met"] and reached["auc_met"] and reached["cost_ratio"] == pytest.approx(3.0)
    png = plot(rows, tmp_path / "out" / "privacy.png")
    assert png.stat().st_size > 1000
    uri = sqlite_uri(tmp_path / 'mlflow.db')
    run_id = log_to_mlflow(uri, "bench-privacy", {"epsilons": [8.0]}, rows, "| table |", [png])
    c = MlflowClient(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["epsilons"] == "[8.0]"
    assert [m.value for m in c.get_metric_history(run_id, "test_ndcg_at_10")] == [0.10, 0.08]
    assert len(c.get_metric_history(run_id, "epsilon_spent")) == 1  # the infinite one is left out
    assert {a.path for a in c.list_artifacts(run_id)} == {"privacy.png", "privacy_curve.md"}


def test_the_memory_estimate_of_a_private_run_is_one_user_plus_the_per_user_gradients(synthetic_dataset):
    from llmrec_dist.data.dataset_format import read_manifest
    from llmrec_dist.train.memory import estimate_for_dataset

    base = [f"data.path={synthetic_dataset}", "train.batch_size=128", "train.negatives_from=catalogue"]
    plain = estimate_for_dataset(load_config(None, base), read_manifest(synthetic_dataset))
    private = estimate_for_dataset(load_config(None, [*base, "privacy.epsilon=8", "privacy.user_chunk=16"]),
                                   read_manifest(synthetic_dataset))
    assert private.phases["training step"]["softmax"] < plain.phases["training step"]["softmax"] / 10  # 1 row, not 64
    held = [k for k in private.held if k.startswith("per-user gradients")]
    assert held and private.held[held[0]] == pytest.approx(16 * private.held["gradients + AdamW state"] / 3)

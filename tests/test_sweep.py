"""Sweep files (the `search` section) and resource planning: no Ray needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmrec_dist.config import ConfigError
from llmrec_dist.sweep.driver import SweepError, plan_resources
from llmrec_dist.sweep.search import sweep_from_dict
from llmrec_dist.sweep.trial import flatten

BASE = {"data": {"path": "/data"}, "model": {"item_repr": "id+text"}, "train": {"epochs": 3},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1}}


def sweep(search: dict, **sections):
    return sweep_from_dict({**BASE, **sections, "search": search}, "test.yaml")


def problems(search: dict, **sections) -> list[str]:
    with pytest.raises(ConfigError) as err:
        sweep(search, **sections)
    return err.value.problems


def test_space_becomes_trials_and_trial_configs():
    s = sweep({"space": {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.freeze": {"grid": ["frozen", "lora"]},
                         "model.lora_r": {"choice": [4, 8]}}, "num_samples": 3})
    assert s.search.num_trials() == 6 and s.search.metric == "valid_ndcg_at_10"
    cfg = s.trial_config({"train.lr": 0.003, "model.freeze": "lora", "model.lora_r": 4})
    assert (cfg.train.lr, cfg.model.freeze, cfg.model.lora_r, cfg.train.epochs) == (0.003, "lora", 4, 3)
    assert flatten({"train": {"lr": 0.1}, "model": {"freeze": "lora"}}) == {"train.lr": 0.1, "model.freeze": "lora"}


def test_sweep_metric_drives_the_trials_checkpoint_selection():
    s = sweep({"space": {"train.lr": {"grid": [0.1, 0.2]}}, "metric": "valid_hr_at_20"})
    assert s.base.eval.metric == "hr_at_20" and s.base.selection_metric() == "valid_hr_at_20"


def test_every_search_problem_is_named_by_its_dotted_key():
    found = problems({"space": {"train.lr": {"loguniform": [0, 1e-2]},
                                "train.epochz": {"choice": [1, 2]},
                                "model.freeze": {"choice": ["frozen", "half"]},
                                "train.batch_size": {"randint": [1, "x"]},
                                "model.dropout": {"normal": [0.1, 0.2]},
                                "scaling.num_workers": {"grid": [1, 2]},
                                "train.weight_decay": {"uniform": [0.5, 0.1]}},
                      "num_samples": 0, "scheduler": "hyperband", "metrik": "x", "metric": "test_ndcg_at_10"})
    expected = [
        "search.space.train.lr.loguniform: low must be > 0",
        "search.space.train.epochz: unknown key (did you mean search.space.train.epochs?)",
        "search.space.model.freeze: value 'half': expected one of",
        "search.space.train.batch_size.randint: low and high must be numbers",
        "search.space.model.dropout: unknown distribution 'normal'",
        "search.space.scaling.num_workers: cannot be searched",
        "search.space.train.weight_decay.uniform: low must be < high",
        "search.num_samples: must be >= 1",
        "search.scheduler: expected 'asha' or 'none'",
        "search.metrik: unknown key (did you mean search.metric?)",
        "search.metric: expected one of",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in found), (start, found)


def test_values_are_checked_against_the_training_config():
    found = problems({"space": {"train.lr": {"choice": [1e-3, -1.0]}, "model.num_heads": {"grid": [2, 3]}}},
                     model={"item_repr": "id+text", "hidden_size": 64})
    assert any(p.startswith("search.space.train.lr: value -1.0: must be > 0") for p in found), found
    assert any(p.startswith("search.space.model.num_heads: value 3: must divide model.hidden_size") for p in found)


def test_searching_freeze_on_an_id_model_is_refused():
    found = problems({"space": {"model.freeze": {"grid": ["frozen", "lora"]}}}, model={"item_repr": "id"})
    assert any(p.startswith("search.space.model.freeze: has no effect with model.item_repr=id") for p in found)


def test_a_refit_is_neither_swept_nor_searched():
    for found in (problems({"space": {"train.lr": {"grid": [0.1, 0.2]}}}, train={"epochs": 3, "refit_epochs": 2}),
                  problems({"space": {"train.refit_epochs": {"grid": [0, 2]}}})):
        assert any(p.startswith("train.refit_epochs: a sweep selects on validation") for p in found), found
    for found in (problems({"space": {"train.lr": {"grid": [0.1, 0.2]}}}, train={"epochs": 3, "refit": True}),
                  problems({"space": {"train.refit": {"grid": [False, True]}}})):
        assert any(p.startswith("train.refit: a sweep selects on validation") for p in found), found


def test_asha_needs_a_rung_before_the_last_epoch():
    found = problems({"space": {"train.lr": {"grid": [0.1, 0.2]}}, "grace_period": 3})
    assert any(p.startswith("search.grace_period: must be < train.epochs (3)") for p in found), found
    sweep({"space": {"train.lr": {"grid": [0.1, 0.2]}}, "grace_period": 3, "scheduler": "none"})  # fine


def test_base_config_errors_keep_their_keys_and_search_is_required():
    found = problems({"space": {"train.lr": {"grid": [0.1]}}}, train={"lr": "fast"})
    assert "train.lr: expected a number; got 'fast'" in found
    with pytest.raises(ConfigError, match="search: required in a sweep file"):
        sweep_from_dict(BASE, "x.yaml")


# ------------------------------------------------------------------------------------------- resources
def _sweep(workers=1, cpus=1.0, concurrent=0, trials=4, use_gpu=False):
    return sweep({"space": {"train.lr": {"grid": [0.1 * (i + 1) for i in range(trials)]}},
                  "max_concurrent_trials": concurrent},
                 scaling={"num_workers": workers, "cpus_per_worker": cpus, "use_gpu": use_gpu})


def test_two_core_machine_runs_two_one_worker_trials_at_once():
    plan = plan_resources(_sweep(), {"CPU": 2.0, "GPU": 0.0, "local": True})
    assert plan.concurrency == 2 and plan.trial_cpus == pytest.approx(1.1)
    assert plan.local_cpus == 4  # 2 x 1.1 trial CPUs, rounded up, + 1 for Ray Data


def test_concurrency_is_capped_by_the_cluster_and_the_number_of_trials():
    cluster = {"CPU": 8.0, "GPU": 0.0, "node_CPU": 4.0, "node_GPU": 0.0, "local": False}
    plan = plan_resources(_sweep(workers=2, concurrent=10), cluster)
    assert plan.concurrency == 3 and plan.local_cpus is None  # (8 - 1 for Ray Data) // 2.1
    assert any("does not fit" in n for n in plan.notes)
    assert plan_resources(_sweep(trials=1), cluster).concurrency == 1
    gpus = {"CPU": 32.0, "GPU": 4.0, "node_CPU": 16.0, "node_GPU": 2.0, "local": False}
    assert plan_resources(_sweep(workers=2, use_gpu=True), gpus).concurrency == 2


def test_a_trial_larger_than_the_cluster_is_refused():
    with pytest.raises(SweepError, match=r"a trial asks for 4 worker\(s\) x 1 CPU .* this machine has 2 CPUs"):
        plan_resources(_sweep(workers=4), {"CPU": 2.0, "GPU": 0.0, "local": True})
    with pytest.raises(SweepError, match="the cluster has 4 CPUs"):
        plan_resources(_sweep(workers=4), {"CPU": 4.0, "GPU": 0.0, "node_CPU": 4.0, "local": False})
    with pytest.raises(SweepError, match="no node has more than 2 CPUs"):
        plan_resources(_sweep(workers=1, cpus=3), {"CPU": 8.0, "GPU": 0.0, "node_CPU": 2.0, "local": False})
    with pytest.raises(SweepError, match="the cluster has 0 GPUs"):
        plan_resources(_sweep(use_gpu=True), {"CPU": 8.0, "GPU": 0.0, "node_CPU": 8.0, "local": False})


def test_a_sweep_checks_its_start_model_before_ray_starts(tmp_path):
    """train.init_from in a sweep: every trial starts from it; a missing one is refused before Ray starts."""
    from llmrec_dist.data.prepare import prepare_dataset
    from llmrec_dist.sweep.driver import _absolute_paths, run_sweep

    data = tmp_path / "data"
    prepare_dataset("synthetic", data, synthetic={"n_users": 60, "n_items": 80}, seed=1)
    s = sweep({"space": {"train.lr": {"grid": [0.1, 0.2]}}, "storage_path": str(tmp_path / "sweeps")},
              data={"path": str(data)}, train={"epochs": 2, "init_from": "stage1/model"})
    assert _absolute_paths(s.to_dict())["train"]["init_from"] == str(Path("stage1/model").resolve())
    with pytest.raises(SweepError, match=r"train\.init_from: .*stage1/model: not a folder"):
        run_sweep(s)
    assert problems({"space": {"train.init_from": {"grid": ["a", "b"]}}}) == [
        "search.space.train.init_from: cannot be searched (resources, tracking, data and the start model are "
        "fixed for a sweep; set it in the config instead)"]

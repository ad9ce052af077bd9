"""Config validation, overrides, and every shipped config."""

from pathlib import Path

import pytest

from llmrec_dist.config import ConfigError, config_from_dict, describe, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    text = path.read_text()
    assert text.startswith("#") and "llmrec-dist" in text.splitlines()[0] + text.splitlines()[1], \
        "each config starts with a comment showing the command that runs it"
    if "\nsearch:" in text:  # a sweep file: a training config plus a `search` section
        from llmrec_dist.sweep.search import load_sweep

        sweep = load_sweep(str(path), ["data.path=/some/dataset"])
        assert sweep.base.data.path == "/some/dataset" and sweep.search.num_trials() >= 4
        return
    if "\nserve:" in text:  # a serve file: the serve section only
        from llmrec_dist.serving.settings import load_serve_config

        serve = load_serve_config(path, flags={"model": "models:/some-model@champion"})
        assert serve.model == "models:/some-model@champion"
        return
    cfg = load_config(path, ["data.path=/some/dataset"])
    assert cfg.data.path == "/some/dataset"


def test_shipped_configs_exist():
    assert any(p.name == "quickstart.yaml" for p in SHIPPED)


def test_all_problems_reported_at_once_with_dotted_keys():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"lr": "fast", "epochz": 3}, "model": {"backbone": "rnn"},
                          "scaling": {"num_workers": 0}, "evaluation": {}})
    problems = err.value.problems
    assert "train.lr: expected a number; got 'fast'" in problems
    assert any(p.startswith("train.epochz: unknown key (did you mean train.epochs?)") for p in problems)
    assert any(p.startswith("model.backbone: expected one of 'causal', 'bidirectional'; got 'rnn'") for p in problems)
    assert "scaling.num_workers: must be > 0; got 0" in problems
    assert any(p.startswith("evaluation: unknown key (did you mean eval?)") for p in problems)
    assert "data.path: required (a folder written by `llmrec-dist prepare`)" in problems


def test_cross_field_checks():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"path": "x"}, "model": {"hidden_size": 10, "num_heads": 3},
                          "train": {"batch_size": 5}, "eval": {"metric": "ndcg_at_50"}})
    text = str(err.value)
    assert "model.num_heads: must divide model.hidden_size (10); got 3" in text
    assert "train.batch_size: must be a multiple of scaling.num_workers x train.grad_accum (2); got 5" in text
    assert "eval.metric: expected one of" in text and "got 'ndcg_at_50'" in text
    with pytest.raises(ConfigError, match="model.block: llama blocks are causal; "
                                          "model.backbone=bidirectional needs block standard"):
        config_from_dict({"data": {"path": "x"}, "model": {"backbone": "bidirectional", "block": "llama"}})
    assert config_from_dict({"data": {"path": "x"}, "model": {"block": "llama"}}).model.block == "llama"


def test_a_refit_runs_at_most_train_epochs_and_registers_nothing():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"path": "x"}, "train": {"epochs": 4, "refit_epochs": 5},
                          "mlflow": {"registered_model": "rec"}})
    text = str(err.value)
    assert "train.refit_epochs: must not exceed train.epochs (4); got 5" in text
    assert "mlflow.registered_model: a refit run (train.refit_epochs > 0) has no validation metric" in text
    cfg = config_from_dict({"data": {"path": "x"}, "train": {"epochs": 4, "refit_epochs": 3}})
    assert (cfg.training_split(), cfg.epochs_to_run()) == ("test", 3)
    plain = config_from_dict({"data": {"path": "x"}, "train": {"epochs": 4}})
    assert (plain.training_split(), plain.epochs_to_run()) == ("train", 4)


def test_train_refit_chooses_its_own_epochs_and_serves_no_other_task():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"path": "x"}, "train": {"epochs": 4, "refit": True, "refit_epochs": 3},
                          "mlflow": {"registered_model": "rec"}})
    text = str(err.value)
    assert "train.refit: chooses train.refit_epochs from the validated run; leave train.refit_epochs at 0 (got 3)" in text
    assert "train.refit makes" not in text  # train.refit registers its refit (gated on the validated run)
    with pytest.raises(ConfigError, match=r"train.refit: not available with task.type=rating yet; set it to false"):
        config_from_dict({"data": {"path": "x"}, "train": {"refit": True}, "task": {"type": "rating"}})
    cfg = config_from_dict({"data": {"path": "x"}, "train": {"epochs": 4, "refit": True}})
    # the validated run comes first: it trains on the train split and validates
    assert (cfg.training_split(), cfg.epochs_to_run()) == ("train", 4)


def test_init_from_is_for_next_item_runs_without_privacy_and_keeps_uris():
    from llmrec_dist.train.launcher import with_absolute_paths

    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"path": "x"}, "train": {"init_from": "runs:/abc/model"}, "task": {"type": "click"}})
    assert 'train.init_from: not available with task.type=click yet; set it to ""' in str(err.value)
    with pytest.raises(ConfigError, match=r"train.init_from: a private model starts from a fresh init"):
        config_from_dict({"data": {"path": "x", "windows": False}, "privacy": {"epsilon": 8.0},
                          "train": {"init_from": "m", "negatives_from": "catalogue"}})
    for uri in ("models:/rec@champion", "runs:/abc/model", "s3://bucket/model"):
        cfg = config_from_dict({"data": {"path": "x"}, "train": {"init_from": uri}})
        assert with_absolute_paths(cfg).train.init_from == uri
    local = with_absolute_paths(config_from_dict({"data": {"path": "x"}, "train": {"init_from": "runs/m"}}))
    assert local.train.init_from == str(Path("runs/m").resolve())


def test_types_are_strict():
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer; got 2.5"):
        config_from_dict({"data": {"path": "x"}, "train": {"epochs": 2.5}})
    with pytest.raises(ConfigError, match=r"eval.exclude_seen: expected true/false; got 'yes please'"):
        config_from_dict({"data": {"path": "x"}, "eval": {"exclude_seen": "yes please"}})
    with pytest.raises(ConfigError, match=r"train: expected a mapping"):
        config_from_dict({"data": {"path": "x"}, "train": [1, 2]})


@pytest.mark.parametrize("text,expected", [
    ("train.lr=3e-4", (["train", "lr"], 3e-4)),
    ("scaling.num_workers=2", (["scaling", "num_workers"], 2)),
    ("eval.ks=[1,5]", (["eval", "ks"], [1, 5])),
    ("eval.exclude_seen=false", (["eval", "exclude_seen"], False)),
    ("mlflow.registered_model=", (["mlflow", "registered_model"], "")),
    ("data.path=/a=b", (["data", "path"], "/a=b")),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["train.lr", "lr=3", "a.b.c=1"])
def test_bad_overrides(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_overrides_win_and_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# llmrec-dist train --config c.yaml\ndata:\n  path: d\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["train.lr=5e-4", "scaling.num_workers=1", "train.batch_size=3"])
    assert (cfg.train.lr, cfg.scaling.num_workers, cfg.per_worker_batch_size()) == (5e-4, 1, 3)
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        load_config(path, ["train.lrr=1"])


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {path: d}\ntrain: {lr: 3e-4}\n")
    assert load_config(path).train.lr == 3e-4


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    for text, kind in (("garbage\n", "str"), ("[1, 2]\n", "list")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=f"expected a mapping of sections .*; got a {kind}"):
            load_config(bad, ["data.path=d"])


def test_flat_params_and_describe():
    cfg = config_from_dict({"data": {"path": "d"}})
    flat = cfg.flat()
    assert flat["train.lr"] == cfg.train.lr and flat["eval.ks"] == [5, 10, 20]
    text = describe()
    for key in ("data.path", "model.max_len", "train.lr", "scaling.num_workers", "mlflow.registered_model"):
        assert key in text

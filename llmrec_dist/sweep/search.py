"""The ``search`` section of a sweep file: what to vary, how to schedule, where to keep the sweep.

A sweep file is a training config (see :mod:`llmrec_dist.config`) plus a ``search`` section::

    search:
      space:                      # dotted config key -> one distribution
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        model.freeze: {grid: [frozen, lora]}
        model.lora_r: {choice: [4, 8, 16]}
      num_samples: 2              # samples of the random keys per grid point
      metric: valid_ndcg_at_10    # its best wins (the lowest for rmse/mae/logloss); the champion gate's metric
      scheduler: asha             # or none
      grace_period: 1
      max_concurrent_trials: 2

Distributions: ``loguniform: [lo, hi]`` and ``uniform: [lo, hi]`` (floats), ``randint: [lo, hi]``
(integers lo..hi-1), ``choice: [v, ...]`` (sampled) and ``grid: [v, ...]`` (every value, times
num_samples). Every value a distribution can produce is checked against the training config's types
and ranges before anything starts, and errors name the dotted key (``search.space.train.lr: ...``).
Each trial's resources are the config's ``scaling`` section, so ``scaling.*`` cannot be searched.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from llmrec_dist.config import (
    TASK_METRICS,
    Config,
    ConfigError,
    apply_overrides,
    build_section,
    config_from_dict,
    load_raw_yaml,
    metric_names,
    plain_name_problem,
    setting,
    unknown_key,
)

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
# Fixed for a whole sweep: resources are sized once, every trial must log to the sweep's experiment, and
# the start model (train.init_from) is checked once, before Ray starts.
NOT_SEARCHABLE = ("scaling.", "mlflow.", "data.path", "train.storage_path", "train.init_from")


def _sweep_folder_name(v: str) -> str | None:
    """The name is a folder under storage_path: it must not climb out of it or hide itself."""
    if not v:
        return None
    return plain_name_problem(v) or ("must not start with '.'" if v.startswith(".") else None)


@dataclass
class SearchConfig:
    """The ``search`` section, validated like the training config's sections (``build_section``); the
    space is checked against the training config it extends (:func:`parse_search`)."""

    space: dict[str, dict[str, list]] = setting(
        factory=dict, doc="dotted config key -> {loguniform|uniform|randint: [lo, hi]} or {choice|grid: [values]}")
    num_samples: int = setting(1, "samples of the random distributions per grid point (trials = grid points x "
                                  "num_samples)", check=lambda v: None if v >= 1 else "must be >= 1")
    metric: str = setting("", "validation metric the sweep and the champion gate select on, the highest value "
                              "or, for valid_rmse, valid_mae and valid_logloss, the lowest (default "
                              "valid_<eval.metric>)")
    scheduler: str = setting("asha", "'asha' (stop weak trials early) or 'none'",
                             check=lambda v: None if v in ("asha", "none") else "expected 'asha' or 'none'")
    grace_period: int = setting(1, "ASHA: epochs a trial runs before it can be stopped",
                                check=lambda v: None if v >= 1 else "must be >= 1")
    reduction_factor: float = setting(2.0, "ASHA: at each rung only the top 1/reduction_factor continue",
                                      check=lambda v: None if v > 1 else "must be > 1")
    max_concurrent_trials: int = setting(0, "trials at once (0 = as many as the cluster fits)",
                                         check=lambda v: None if v >= 0 else "must be >= 0 (0 = as many as fit)")
    trial_driver_cpus: float = setting(0.1, "CPUs held by each trial's driver process (> 0; workers hold "
                                            "scaling.cpus_per_worker)",
                                       check=lambda v: None if v > 0 else "must be > 0 (Ray refuses 0 for a trial)")
    storage_path: str = setting("llmrec_sweeps", "folder or URI under which the sweep keeps its state, trials and "
                                            "checkpoints")
    name: str = setting("", "the sweep's folder name under storage_path ('' = sweep-<date>-<time>)",
                        check=_sweep_folder_name)
    seed: int = setting(0, "seed of the random sampling")

    def grid_size(self) -> int:
        return math.prod(len(spec["grid"]) for spec in self.space.values() if "grid" in spec) or 1

    def num_trials(self) -> int:
        return self.grid_size() * self.num_samples


def describe_search() -> str:
    return "\n".join(f"  search.{f.name}: {f.metadata['doc']}" for f in dataclasses.fields(SearchConfig))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _check_spec(key: str, spec: Any, problems: list[str]) -> dict[str, list] | None:
    where = f"search.space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        problems.append(f"{where}: expected one distribution, e.g. {{loguniform: [1.0e-4, 1.0e-2]}} or "
                        f"{{choice: [a, b]}}; got {spec!r}")
        return None
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        problems.append(f"{where}: unknown distribution {kind!r}; valid: {', '.join(DISTRIBUTIONS)}")
        return None
    if not isinstance(args, list) or not args:
        problems.append(f"{where}.{kind}: expected a non-empty list; got {args!r}")
        return None
    if kind in ("choice", "grid"):
        return {kind: list(args)}
    if len(args) != 2:
        problems.append(f"{where}.{kind}: expected [low, high]; got {args!r}")
        return None
    lo, hi = (_number(a) for a in args)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        problems.append(f"{where}.{kind}: low and high must be numbers; got {args!r}")
        return None
    if not lo < hi:
        problems.append(f"{where}.{kind}: low must be < high; got {args!r}")
        return None
    if kind == "loguniform" and lo <= 0:
        problems.append(f"{where}.loguniform: low must be > 0; got {args!r}")
        return None
    if kind == "randint":
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            problems.append(f"{where}.randint: low and high must be integers; got {args!r}")
            return None
        return {kind: [int(lo), int(hi)]}
    return {kind: [lo, hi]}


def candidate_values(spec: dict[str, list]) -> list:
    """Values to check a distribution with: every listed value, or both ends of a range."""
    (kind, args), = spec.items()
    if kind == "randint":
        return [args[0], args[1] - 1]
    return list(args)


def _set(raw: dict, dotted: str, value: Any) -> dict:
    out = copy.deepcopy(raw)
    section, key = dotted.split(".", 1)
    out.setdefault(section, {})[key] = value
    return out


def parse_search(raw: Any, train_raw: dict, source: str = "") -> SearchConfig:
    """Validate the ``search`` mapping against the training config it extends (all problems at once)."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"search: expected a mapping (space, num_samples, metric, ...); got {raw!r}"], source)
    # Every key but the space through the typed section (types, ranges, unknown keys); the space below.
    search = build_section(SearchConfig, {k: v for k, v in raw.items() if k != "space"}, "search", problems)

    # The base config must be valid by itself (its errors keep their own dotted keys).
    try:
        base = config_from_dict(train_raw, source)
    except ConfigError as err:
        problems.extend(err.problems)
        raise ConfigError(problems, source) from None
    if search.scheduler == "asha" and search.grace_period >= base.train.epochs:
        problems.append(f"search.grace_period: must be < train.epochs ({base.train.epochs}) for ASHA to stop a "
                        f"trial before its last epoch; got {search.grace_period} (or set search.scheduler=none)")
    for key, off in (("refit_epochs", "0"), ("refit", "false")):
        if getattr(base.train, key) or f"train.{key}" in (raw.get("space") or {}):
            problems.append(f"train.{key}: a sweep selects on validation, which a refit trains on; keep it "
                            f"{off} and unsearched (refit the chosen trial's config afterwards)")
    if "task.type" in (raw.get("space") or {}):
        problems.append("search.space.task.type: trials of different tasks have no common metric to rank "
                        "them by; set task.type in the config")
    if not search.metric:
        search.metric = base.selection_metric()
    names = {f"valid_{name}" for name in (TASK_METRICS[base.task.type] if base.task.type != "next_item"
                                           else metric_names(base.eval.ks))}
    if search.metric not in names:
        problems.append(f"search.metric: expected one of {', '.join(sorted(names))}; got {search.metric!r}")

    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        problems.append("search.space: expected a mapping of dotted config keys to distributions, "
                        "e.g. {train.lr: {loguniform: [1.0e-4, 1.0e-2]}}")
        space = {}
    valid_keys = [f"{s}.{k}" for s, values in base.to_dict().items() for k in values]
    for key, spec in space.items():
        key = str(key)
        if key not in valid_keys:
            problems.append(unknown_key(key, valid_keys, "search.space."))
            continue
        if key.startswith(NOT_SEARCHABLE):
            problems.append(f"search.space.{key}: cannot be searched (resources, tracking, data and the start "
                            f"model are fixed for a sweep; set it in the config instead)")
            continue
        checked = _check_spec(key, spec, problems)
        if checked is None:
            continue
        for value in candidate_values(checked):
            try:
                config_from_dict(_set(train_raw, key, value), source)
            except ConfigError as err:
                for p in err.problems:
                    problems.append(f"search.space.{key}: value {value!r}: {p.split(': ', 1)[-1]}")
                break
        search.space[key] = checked
    if "model.freeze" in search.space and base.model.item_repr == "id" and "model.item_repr" not in search.space \
            and base.task.architecture != "cross_encoder":
        problems.append("search.space.model.freeze: has no effect with model.item_repr=id (set model.item_repr "
                        "to text or id+text)")
    if problems:
        raise ConfigError(problems, source)
    return search


def apply_params(train_raw: dict, params: dict[str, Any], source: str = "") -> Config:
    """The training config of one trial: ``train_raw`` with the sampled ``{dotted key: value}`` applied."""
    for key, value in params.items():
        train_raw = _set(train_raw, key, value)
    return config_from_dict(train_raw, f"{source} (trial {params})")


@dataclass
class SweepConfig:
    """A validated sweep: the base training config (raw + typed) and its search section."""

    train_raw: dict
    base: Config
    search: SearchConfig
    source: str = ""

    def trial_config(self, params: dict[str, Any]) -> Config:
        return apply_params(self.train_raw, params, self.source)

    def to_dict(self) -> dict:
        return {**copy.deepcopy(self.train_raw), "search": dataclasses.asdict(self.search)}


def sweep_from_dict(raw: Any, source: str = "") -> SweepConfig:
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: expected a mapping of sections; got {type(raw).__name__}"], source)
    if "search" not in raw:
        raise ConfigError(["search: required in a sweep file (space, num_samples, metric, scheduler, ...)"],
                          source)
    train_raw = {k: v for k, v in raw.items() if k != "search"}
    search = parse_search(raw["search"], train_raw, source)
    # Trials select their best epoch by the sweep's metric, so the two cannot disagree.
    train_raw = _set(train_raw, "eval.metric", search.metric[len("valid_"):])
    return SweepConfig(train_raw, config_from_dict(train_raw, source), search, source)


def load_sweep(path: str, overrides: list[str] | None = None) -> SweepConfig:
    """Read a sweep file and apply dotted overrides (``search.num_samples=4`` reaches the search section)."""
    return sweep_from_dict(apply_overrides(load_raw_yaml(path), overrides or []), str(path))

"""The ``serve:`` config section: what `llmrec-dist serve` serves, where, and how it scales.

A serve config is a YAML file with one section, ``serve:``; ``serve.KEY=VALUE`` arguments override it
and the command's flags (``--model``, ``--host`` ...) override both. Problems are reported all at once,
each named by its dotted key, as for training configs (:mod:`llmrec_dist.config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmrec_dist.config import (
    ConfigError,
    _alias,
    _non_negative,
    _positive,
    apply_overrides,
    build_section,
    load_raw_yaml,
    plain_name_problem,
    setting,
    unknown_key,
)

SECTION = "serve"


def _port(v: int) -> str | None:
    return None if 0 < v < 65536 else "must be a TCP port in 1..65535"


def _unit(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _app_name(v: str) -> str | None:
    return plain_name_problem(v)


@dataclass
class ServeConfig:
    model: str = setting("", "What to serve: models:/NAME@ALIAS (follows the alias as it moves), "
                             "models:/NAME/VERSION, runs:/RUN_ID/model, or a local model-package folder. "
                             "Required (here or with --model).")
    tracking_uri: str = setting("", "MLflow tracking URI of the registry; empty = $MLFLOW_TRACKING_URI, else "
                                    "sqlite:///mlflow.db in the working directory.")
    host: str = setting("127.0.0.1", "Address the HTTP proxy listens on (0.0.0.0: every interface).")
    port: int = setting(8000, "HTTP port.", check=_port)
    app_name: str = setting("llmrec", "Ray Serve application name (one per served model).", check=_app_name)
    num_replicas: int = setting(1, "Replicas when serve.autoscaling is false.", check=_positive)
    autoscaling: bool = setting(False, "Let Ray Serve scale replicas between serve.min_replicas and "
                                       "serve.max_replicas on load.")
    min_replicas: int = setting(1, "Fewest replicas with serve.autoscaling.", check=_positive)
    max_replicas: int = setting(2, "Most replicas with serve.autoscaling.", check=_positive)
    target_ongoing_requests: float = setting(2.0, "Ongoing requests per replica the autoscaler aims at.",
                                             check=_positive)
    cpus_per_replica: float = setting(0.5, "CPUs Ray reserves per replica (a fraction lets replicas share a "
                                           "core; the model runs on the replica's threads).", check=_positive)
    max_ongoing_requests: int = setting(32, "Requests a replica takes at once before Serve queues them "
                                            "(must allow serve.max_batch_size).", check=_positive)
    max_batch_size: int = setting(16, "Requests answered by one model call (dynamic batching).", check=_positive)
    batch_wait_timeout_s: float = setting(0.005, "Seconds a batch waits to fill before it runs.",
                                          check=_non_negative)
    poll_seconds: float = setting(10.0, "Seconds between registry checks of the alias (models:/NAME@ALIAS "
                                        "only); a new version is loaded, then swapped in.", check=_positive)
    max_body_bytes: int = setting(1_000_000, "Largest request body; a larger one gets 413.", check=_positive)
    max_history: int = setting(10_000, "Most item ids in a request's history (and in its exclude list).",
                               check=_positive)
    max_k: int = setting(100, "Largest k a request may ask for.", check=_positive)
    default_diversity: float = setting(0.0, "Diversity of a request that does not set it, in [0, 1].",
                                       check=_unit)
    diversity_space: Literal["model", "text"] = setting(
        "model", "Where a request's diversity (MMR) measures how alike two items are: model (the model's item "
                 "vectors) or text (the items' text embeddings).")
    text_encoder: str = setting("", "Encoder of serve.diversity_space=text (a Hugging Face name or local "
                                    "folder); empty = the model's own LM, else all-MiniLM-L6-v2.")
    trust_remote_code: bool = setting(False, "Allow a model whose text encoder runs its own Python code.")
    access_log: bool = setting(False, "Log one line per request in the proxy and the replicas (off: at 50 "
                                      "requests/s on 2 cores the lines cost more CPU than the model).")

    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _cross_checks(cfg: ServeConfig, require_model: bool) -> list[str]:
    problems = []
    if require_model and not cfg.model.strip():
        problems.append("serve.model: required: models:/NAME@ALIAS, models:/NAME/VERSION or a model folder "
                        "(here or --model)")
    if cfg.autoscaling and cfg.min_replicas > cfg.max_replicas:
        problems.append(f"serve.min_replicas: must not exceed serve.max_replicas ({cfg.max_replicas}); "
                        f"got {cfg.min_replicas}")
    if cfg.max_ongoing_requests < cfg.max_batch_size:
        problems.append(f"serve.max_ongoing_requests: must be at least serve.max_batch_size "
                        f"({cfg.max_batch_size}), or batches never fill; got {cfg.max_ongoing_requests}")
    if "@" in cfg.model and cfg.model.startswith("models:/"):
        alias = cfg.model.rsplit("@", 1)[1]
        if problem := _alias(alias):
            problems.append(f"serve.model: the alias {alias!r} {problem}")
    return problems


def serve_config_from_dict(raw: Any, source: str = "", require_model: bool = True) -> ServeConfig:
    """Validate ``{"serve": {...}}`` into a :class:`ServeConfig`, reporting all problems at once."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: expected a mapping with a serve: section; got {type(raw).__name__}"], source)
    problems = [unknown_key(str(key), [SECTION], "") for key in raw if key != SECTION]
    cfg = build_section(ServeConfig, raw.get(SECTION), SECTION, problems)
    if not problems:
        problems.extend(_cross_checks(cfg, require_model))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      flags: dict[str, Any] | None = None, require_model: bool = True) -> ServeConfig:
    """The YAML file at ``path`` (or the defaults), then ``serve.KEY=VALUE`` overrides, then ``flags``
    (``{"model": ..., "port": ...}``; None values are not set)."""
    raw = load_raw_yaml(path) if path else {}
    bad = [text for text in overrides or [] if not text.partition("=")[0].strip().startswith(f"{SECTION}.")]
    if bad:
        raise ConfigError([f"{text}: a serve override must look like serve.key=value" for text in bad])
    raw = apply_overrides(raw, overrides or [])
    section = raw.setdefault(SECTION, {})
    if isinstance(section, dict):
        section.update({key: value for key, value in (flags or {}).items() if value is not None})
    return serve_config_from_dict(raw, str(path or "<defaults>"), require_model=require_model)


def describe() -> str:
    """Every serve key with its default and docstring (for `--help`)."""
    lines = []
    for f in dataclasses.fields(ServeConfig):
        lines.append(f"  serve.{f.name} (default {f.default!r}): {f.metadata['doc']}")
    return "\n".join(lines)

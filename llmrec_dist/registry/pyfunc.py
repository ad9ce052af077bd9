"""The MLflow pyfunc wrapper of a model package, and logging it into an existing run.

The logged model holds the package folder as the artifact ``package`` and, instead of a pickle, a
three-line "models from code" script that builds a :class:`RecommenderPyfunc` (no state of its own:
weights and items are loaded in ``load_context``). Nothing is unpickled at load time, and no torch
model can end up pickled. Whoever loads the model needs ``llmrec_dist`` importable
(``pip install llmrec_dist``; it brings torch, safetensors, pandas and pyarrow), exactly like any
library-backed MLflow flavour.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema

import llmrec_dist

log = logging.getLogger(__name__)


def model_signature(kind: str = "retriever") -> ModelSignature:
    """Input of a ``retriever``: ``history`` (list of item id strings) + optional ``k``, ``exclude`` (item ids
    never to return), ``diversity`` (MMR's λ) and ``explain``; a ``chain`` takes ``history``, ``k``,
    ``exclude`` and an optional ``feedback`` (the history's ratings); a ``reranker`` ``history``,
    ``candidates`` and optional ``feedback``. Output: ``item_ids``, ``scores``, and for a retriever the
    optional ``because`` / ``because_scores`` (present when a row asks to explain).

    Every column added since the first signature is optional, so the frames of older clients still
    conform. A model logged before them has the older signature, and MLflow drops the columns it does
    not list: log it again to serve the options through ``mlflow.pyfunc``."""
    history, feedback = ColSpec(Array("string"), "history"), ColSpec(Array("double"), "feedback", required=False)
    k, exclude = ColSpec("long", "k", required=False), ColSpec(Array("string"), "exclude", required=False)
    options = [ColSpec("double", "diversity", required=False), ColSpec("boolean", "explain", required=False)]
    inputs = {"retriever": [history, k, exclude, *options],
              "chain": [history, k, feedback, exclude],
              "reranker": [history, ColSpec(Array("string"), "candidates"), feedback]}[kind]
    outputs = [ColSpec(Array("string"), "item_ids"), ColSpec(Array("double"), "scores")]
    if kind == "retriever":
        outputs += [ColSpec(Array(Array("string")), "because", required=False),
                    ColSpec(Array(Array("double")), "because_scores", required=False)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def package_kind(folder: str | Path) -> str:
    """``chain`` (a chain package), ``reranker`` (a rating/click package) or ``retriever`` (next-item)."""
    from llmrec_dist.registry.reranker import CHAIN_FILE
    from llmrec_dist.saved_model import read_model_meta

    folder = Path(folder)
    if (folder / CHAIN_FILE).is_file():
        return "chain"
    return "reranker" if read_model_meta(folder).get("task") is not None else "retriever"


def pip_requirements() -> list[str]:
    """What a consumer environment needs: llmrec_dist pulls torch, safetensors, pandas, pyarrow."""
    import torch

    return [
        f"mlflow=={mlflow.__version__}",
        f"llmrec_dist=={llmrec_dist.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        "safetensors",
        "pandas",
        "pyarrow",
    ]


# What mlflow.pyfunc.load_model(uri, model_config={...}) may set: MLflow passes on only the keys the model was
# logged with, so every model is logged with these defaults.
MODEL_CONFIG = {"trust_remote_code": False, "diversity_space": "model", "text_encoder": ""}


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """``predict(DataFrame[history, k?]) -> DataFrame[item_ids, scores]`` over a model package (a chain's
    also takes ``feedback``; a re-ranker's ``history``, ``candidates``, ``feedback``: registry/reranker.py).

    Holds nothing until ``load_context`` (and pickles to nothing even after it), so logging it can
    never store a torch model.
    """

    def __init__(self):
        self.recommender = None

    def __getstate__(self):
        return {}  # never pickle a loaded model, even if someone logs a loaded instance

    def __setstate__(self, state):
        self.recommender = None

    def load_context(self, context) -> None:
        """Load the package artifact. ``model_config`` of ``mlflow.pyfunc.load_model(uri, model_config=...)``:
        ``trust_remote_code`` (a package whose text encoder needs its own Python code is refused unless
        it is ``True``); ``diversity_space`` (``model`` or ``text``) and ``text_encoder``: where the
        ``diversity`` column's MMR measures similarity (:meth:`Recommender.use_diversity_space`)."""
        from llmrec_dist.registry.recommender import Recommender
        from llmrec_dist.registry.reranker import load_serving

        options = getattr(context, "model_config", None) or {}
        self.recommender = load_serving(context.artifacts["package"],
                                        trust_remote_code=options.get("trust_remote_code") is True)
        if options.get("diversity_space", "model") != "model" or options.get("text_encoder"):
            if not isinstance(self.recommender, Recommender):
                raise ValueError("model_config: diversity_space and text_encoder apply to a next-item model; "
                                 "this one takes no diversity")
            self.recommender.use_diversity_space(options.get("diversity_space", "model"),
                                                 options.get("text_encoder", ""))

    # pd.DataFrame is a hint MLflow infers no schema from (the explicit signature stays in charge);
    # as_frame still accepts the list-of-dicts / dict conveniences when called directly.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if self.recommender is None:
            raise RuntimeError("RecommenderPyfunc.predict called before load_context")
        return self.recommender.predict_frame(as_frame(model_input))


def as_frame(model_input) -> pd.DataFrame:
    """Accept a DataFrame, a list of ``{"history": [...], "k": ...}`` dicts (any input column), or one such dict."""
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        model_input = [model_input]
    if isinstance(model_input, list) and all(isinstance(row, dict) for row in model_input):
        return pd.DataFrame.from_records(model_input) if model_input else pd.DataFrame({"history": []})
    raise ValueError("input must be a DataFrame with a 'history' column, a list of "
                     f"{{'history': [...], 'k': ...}} dicts, or one such dict; got {type(model_input).__name__}")


# MLflow "models from code": this file is stored with the model and executed at load time, so
# nothing is unpickled (the PythonModel is built by importing llmrec_dist, which must be installed).
_MODEL_CODE = """\
# Entry point of an llmrec_dist recommender logged with MLflow "models from code".
# Needs `pip install llmrec_dist`; the weights and items are in the artifact "package".
import mlflow

from llmrec_dist.registry.pyfunc import RecommenderPyfunc

mlflow.models.set_model(RecommenderPyfunc())
"""
MODEL_CODE_FILE = "llmrec_recommender.py"


@contextmanager
def _existing_cwd(fallback: str):
    """Run in ``fallback`` while the working directory no longer exists, as in a Ray job submitted with
    ``--working-dir`` once Ray has reclaimed the job's copy after its training workers ended (MLflow's
    pyfunc save reads the working directory and would fail with FileNotFoundError)."""
    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(fallback)
        log.warning("the working directory was removed (a Ray job's --working-dir is reclaimed when its "
                    "workers end); logging the model from %s", fallback)
    yield


def log_model_package(package_dir: str | Path, tracking_uri: str, run_id: str, name: str = "model") -> str:
    """Log ``package_dir`` as a pyfunc model into the EXISTING run ``run_id``; returns the model URI.

    The logged model belongs to the run's experiment and is linked to the run (``runs:/<run_id>/<name>``
    resolves to it); it carries the run's params. The run's status is left alone (no fluent
    ``start_run``/``end_run``): the driver that created the run ends it. The returned URI is the
    logged model's ``models:/<model_id>``, which :func:`llmrec_dist.registry.promotion.register_and_promote`
    and ``mlflow.pyfunc.load_model`` accept.
    """
    from llmrec_dist.registry.reranker import CHAIN_FILE
    from llmrec_dist.saved_model import PACKAGE_FILES
    from llmrec_dist.tracking import client, use_tracking_uri

    package_dir = Path(package_dir)
    missing = [f for f in ((CHAIN_FILE,) if (package_dir / CHAIN_FILE).is_file() else PACKAGE_FILES)
               if not (package_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(package_dir)!r} is not a model package: it lacks {', '.join(missing)}")
    c = client(tracking_uri)
    run = c.get_run(run_id)
    # Created here because MLflow would otherwise file it under the *active* (default) experiment
    # rather than the run's, and `runs:/<run_id>/<name>` would not find it.
    logged = c.create_logged_model(experiment_id=run.info.experiment_id, name=name, source_run_id=run_id,
                                   params={k: str(v) for k, v in run.data.params.items()})
    with tempfile.TemporaryDirectory() as tmp, use_tracking_uri(tracking_uri), warnings.catch_warnings(), \
            _existing_cwd(tempfile.gettempdir()):
        code = Path(tmp) / MODEL_CODE_FILE
        code.write_text(_MODEL_CODE)
        # The signature is explicit; an input example would make MLflow load and run the model.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        # mlflow.pyfunc.log_model(name=...) is a thin wrapper over Model.log(flavor=mlflow.pyfunc);
        # only Model.log takes an explicit run_id, which logs into an existing run without
        # start_run/end_run (end_run would mark the driver's still-running run FINISHED).
        info = mlflow.models.Model.log(
            artifact_path=None,  # deprecated in favour of name, but still positional in Model.log
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=str(code),
            artifacts={"package": str(package_dir)},
            signature=model_signature(package_kind(package_dir)),  # explicit: else MLflow runs predict to infer one
            pip_requirements=pip_requirements(),
            model_config=dict(MODEL_CONFIG),
            flavor_name="pyfunc.ModelFromCode",  # what mlflow.pyfunc.log_model records
        )
    return info.model_uri

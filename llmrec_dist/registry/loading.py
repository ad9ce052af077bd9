"""Loading what a model URI or folder names: the llmrec_dist servable behind it and its predict function.

Shared by `llmrec-dist recommend` and `llmrec-dist serve`.
"""

from __future__ import annotations

from pathlib import Path


def load_servable(model: str, tracking_uri: str, trust_remote_code: bool = False, flag: str = "--model"):
    """``(servable, predict)``: the llmrec_dist object behind ``model`` (a ``Recommender``, ``Reranker`` or
    ``Chain``; None for another pyfunc model) and the function that answers a DataFrame (the pyfunc's
    predict for a URI).

    ``model`` is a model-package (or chain) folder, loaded directly, or an MLflow model URI
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``, a local MLflow model folder)
    loaded through ``mlflow.pyfunc.load_model`` with ``tracking_uri``. ``flag`` names the option in errors.
    """
    from llmrec_dist.registry.reranker import CHAIN_FILE, load_serving
    from llmrec_dist.saved_model import RECOMMENDER_FILE

    folder = Path(model)
    is_uri = "://" in model or ":/" in model
    if not is_uri and not folder.exists():
        raise FileNotFoundError(f"{flag} {model}: no such folder, and not an MLflow model URI "
                                "(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model)")
    if not is_uri and folder.is_dir() and ((folder / RECOMMENDER_FILE).is_file() or (folder / CHAIN_FILE).is_file()):
        servable = load_serving(folder, trust_remote_code)
        return servable, servable.predict_frame

    import mlflow

    from llmrec_dist.registry.pyfunc import RecommenderPyfunc
    from llmrec_dist.tracking import use_tracking_uri

    with use_tracking_uri(tracking_uri):
        # model_config reaches RecommenderPyfunc.load_context; it is passed only when the user opted in.
        options = {"model_config": {"trust_remote_code": trust_remote_code}} if trust_remote_code else {}
        loaded = mlflow.pyfunc.load_model(model, **options)
    inner = loaded.unwrap_python_model() if hasattr(loaded, "unwrap_python_model") else None
    return (inner.recommender if isinstance(inner, RecommenderPyfunc) else None), loaded.predict

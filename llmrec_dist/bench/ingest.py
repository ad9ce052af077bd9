"""Ingest: Parquet → Ray Data → each worker's (inputs, targets) batches, with the model removed.

The same pipeline as training (``build_trainer``'s Ray Data dataset, materialised or streamed as the
config says, the same shard split, shuffle buffer, length bucketing and collate), timed per epoch on
every worker, with each worker's peak RSS. Compared with training throughput it says whether data can
starve the model: the target is ingest ≥ 10 × training sequences/s.
"""

from __future__ import annotations

import json
import logging
import resource
import time

from llmrec_dist.config import Config, config_from_dict

log = logging.getLogger(__name__)


def ingest_loop_per_worker(loop_config: dict) -> dict:
    """Iterate this worker's batches for ``epochs`` epochs; no model. Returns every rank's figures."""
    import ray.train
    import torch.distributed as dist

    from llmrec_dist.data.dataset_format import num_items
    from llmrec_dist.worker.recipe import epoch_batches, epoch_seeds

    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mask_id = num_items(loop_config["manifest"]) + 1
    shard = ray.train.get_dataset_shard("train")
    epochs = []
    for epoch in range(loop_config["epochs"]):
        started = time.perf_counter()
        sequences = positions = batches = 0
        for seq, targets in epoch_batches(shard, cfg, *epoch_seeds(cfg.train.seed, epoch, world, rank),
                                          mask_id=mask_id):
            sequences += len(seq)
            positions += int((targets != 0).sum())
            batches += 1
        seconds = time.perf_counter() - started
        epochs.append({"epoch": epoch, "seconds": seconds, "sequences": sequences, "positions": positions,
                       "batches": batches, "sequences_per_s": sequences / seconds})
    mine = {"rank": rank, "epochs": epochs,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    everyone = [mine]
    if dist.is_initialized() and world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    ray.train.report({"epochs_done": len(epochs)})
    return {"workers": everyone}


def run_ingest(cfg: Config, epochs: int = 3) -> dict:
    """Run the ingest-only loop with ``cfg``'s workers and data settings; returns the figures."""
    from llmrec_dist.data.dataset_format import read_manifest
    from llmrec_dist.ray_setup import init_ray
    from llmrec_dist.train.launcher import build_trainer, with_absolute_paths

    cfg = with_absolute_paths(cfg)
    init_ray(cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu)
    started = time.perf_counter()
    trainer = build_trainer(cfg, read_manifest(cfg.data.path), run_id="", tracking_uri="", run_name=f"bench-ingest-{int(time.time())}",
                            loop=ingest_loop_per_worker, extra_loop_config={"epochs": epochs})
    setup_seconds = time.perf_counter() - started  # read_parquet (+ materialize when data.materialize)
    result = trainer.fit()
    if result.error:
        raise result.error
    workers = result.return_value["workers"]
    for w in workers:
        log.info("ingest worker: %s", json.dumps(w))
    return summarise(workers, setup_seconds, cfg)


def summarise(workers: list[dict], setup_seconds: float, cfg: Config) -> dict:
    """Throughput of the whole group per epoch (sequences / slowest worker's time), and per worker.
    Epoch 0 is reported apart: it may include reading the Parquet files when not materialised."""
    n_epochs = len(workers[0]["epochs"])
    per_epoch = []
    for e in range(n_epochs):
        seconds = max(w["epochs"][e]["seconds"] for w in workers)
        sequences = sum(w["epochs"][e]["sequences"] for w in workers)
        per_epoch.append({"epoch": e, "seconds": seconds, "sequences": sequences,
                          "sequences_per_s": sequences / seconds})
    steady = per_epoch[1:] or per_epoch
    return {
        "workers": len(workers),
        "setup_seconds": setup_seconds,
        "materialize": cfg.data.materialize,
        "per_epoch": per_epoch,
        "sequences_per_s": sum(e["sequences_per_s"] for e in steady) / len(steady),
        "sequences_per_s_per_worker": [
            sum(ep["sequences_per_s"] for ep in w["epochs"][1:] or w["epochs"]) / len(w["epochs"][1:] or w["epochs"])
            for w in sorted(workers, key=lambda w: w["rank"])],
        "peak_rss_mb_per_worker": [w["peak_rss_mb"] for w in sorted(workers, key=lambda w: w["rank"])],
    }


COLUMNS = [("epoch", "epoch", "d"), ("seconds", "seconds", ".2f"), ("sequences", "sequences", ","),
           ("sequences_per_s", "seq/s", ",.0f")]

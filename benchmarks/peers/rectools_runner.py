"""RecTools 0.19 SASRecModel or BERT4RecModel on an exchange folder, in RecTools' own virtual environment.

    python rectools_runner.py --exchange DIR --model SASRec --settings matched --matched '{...}' \
        --max-epochs 200 --patience 10 --out run/result.json

RecTools fits on ``<exchange>/rectools/interactions.csv`` without the test rows (train + validation
interactions, datetime = position in the sequence); its own leave-one-out validation
(``get_val_mask_func=leave_one_out_mask``, the last interaction of every user) holds out exactly our
validation targets, and it reports a validation loss. A Lightning callback scores validation after every
epoch under our protocol (full ranking over our catalogue, the training history left out) and stops
early on it, keeping the best epoch's weights in memory. Test: our protocol on the history train +
validation, and RecTools' own way, ``recommend(k=10, filter_viewed=True)``.

RecTools knows only the items of the (truncated) training sessions it was fitted on: the last
``session_max_len`` (+1 for SASRec) training items of each user. Other catalogue items get no score (-inf)
in our ranking; their count is reported as ``items_unknown_to_peer``.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import copy  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

from peer_protocol import (EarlyStopping, RunLog, ndcg_at_10, package_versions, start_run,  # noqa: E402
                           target_ranks)

EVAL_BATCH = 512
OWN_K = 10


def settings_kwargs(settings: str, matched: dict) -> dict:
    """Model arguments of the settings: none for RecTools' defaults, ours for ``matched``."""
    if settings == "defaults":
        return {}
    return {"session_max_len": matched["max_len"], "n_factors": matched["hidden"], "n_blocks": matched["blocks"],
            "n_heads": matched["heads"], "dropout_rate": matched["dropout"], "loss": "softmax",
            "batch_size": matched["batch_size"], "lr": matched["lr"]}


# The Lightning trainer RecTools builds (get_trainer_func): it holds our epoch callback, set in main().
CALLBACKS: list = []


def make_trainer(max_epochs: int):
    from pytorch_lightning import Trainer

    return Trainer(max_epochs=max_epochs, min_epochs=1, accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=CALLBACKS)


class OurScorer:
    """Ranks targets with a RecTools transformer's user and item embeddings on our item_idx columns."""

    def __init__(self, lightning_model, n_items: int):
        self.lightning, self.n_items = lightning_model, n_items

    @torch.no_grad()
    def ranks(self, dataset, users: list[int], histories, targets, masked: bool) -> list[int]:
        dp = self.lightning.data_preparator
        with warnings.catch_warnings():  # "N target users were considered cold": they rank last, below
            warnings.simplefilter("ignore")
            u2i = dp.transform_dataset_u2i(dataset, users)
        loader = dp.get_dataloader_recommend(u2i, EVAL_BATCH)
        user_embs, item_embs = self.lightning._get_user_item_embeddings(loader, "cpu")
        row_of = {int(u): r for r, u in enumerate(u2i.user_id_map.external_ids)}
        to_internal = torch.as_tensor(dp.item_id_map.to_internal.reindex(range(self.n_items + 1))
                                      .fillna(-1).astype("int64").to_numpy())
        unknown = to_internal < 0
        ranks = []
        for start in range(0, len(users), EVAL_BATCH):
            chunk = users[start:start + EVAL_BATCH]
            scores = torch.full((len(chunk), self.n_items + 1), float("-inf"))
            rows = [row_of.get(u, -1) for u in chunk]
            known = [i for i, r in enumerate(rows) if r >= 0]
            internal = user_embs[[rows[i] for i in known]] @ item_embs.T
            part = internal[:, to_internal.clamp(min=0)]
            part[:, unknown] = float("-inf")
            scores[known] = part
            h = histories[start:start + EVAL_BATCH]
            ranks += target_ranks(scores, targets[start:start + EVAL_BATCH], h if masked else None)
        return ranks

    def item_count_unknown(self) -> int:
        known = self.lightning.data_preparator.get_known_item_ids()
        return self.n_items - len(set(int(i) for i in known) & set(range(1, self.n_items + 1)))


def make_callback(log: RunLog, stopper: EarlyStopping, score_valid):
    from pytorch_lightning import Callback

    class OurValidation(Callback):
        """After every epoch (after RecTools' own validation loss): our validation NDCG@10, early stopping
        on it, the best weights kept."""

        best_state = None

        def __deepcopy__(self, memo):  # RecTools deep-copies its trainer before fitting: keep this instance
            return self

        def on_train_epoch_start(self, trainer, pl_module):
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            t1 = time.perf_counter()
            ndcg = ndcg_at_10(score_valid(pl_module))
            pl_module.torch_model.train()
            t2 = time.perf_counter()
            epoch = trainer.current_epoch
            if stopper.update(epoch, ndcg):
                self.best_state = copy.deepcopy(pl_module.torch_model.state_dict())
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            log.epoch({"epoch": epoch, "train_loss": metrics.get("train_loss"), "valid_ndcg_at_10": ndcg,
                       "own_valid": {"val_loss": metrics.get("val_loss")},
                       "train_seconds": round(t1 - self.started, 3), "our_valid_seconds": round(t2 - t1, 3)})
            if stopper.should_stop(epoch, log.seconds()):
                trainer.should_stop = True

    return OurValidation()


def main() -> None:
    args, log, ex = start_run(__doc__.split("\n")[0], STARTED)

    import pandas as pd
    from pytorch_lightning import seed_everything
    from rectools import Columns
    from rectools.dataset import Dataset
    from rectools.models import BERT4RecModel, SASRecModel
    from rectools.models.nn.transformers.utils import leave_one_out_mask

    seed_everything(args.seed, workers=True)
    frame = pd.read_csv(f"{args.exchange}/rectools/interactions.csv", parse_dates=[Columns.Datetime])
    columns = [Columns.User, Columns.Item, Columns.Weight, Columns.Datetime]
    fit_dataset = Dataset.construct(frame.loc[frame["split"] != "test", columns])
    train_dataset = Dataset.construct(frame.loc[frame["split"] == "train", columns])

    users = ex.users
    valid_histories = [ex.train(i) for i in range(len(users))]
    valid_targets = [ex.valid_target(i) for i in range(len(users))]
    stopper = EarlyStopping(args.patience, args.budget_min * 60)

    def score_valid(lightning_model):
        return OurScorer(lightning_model, ex.n_items).ranks(train_dataset, users, valid_histories, valid_targets,
                                                           masked=True)

    callback = make_callback(log, stopper, score_valid)
    CALLBACKS.append(callback)
    model_class = {"SASRec": SASRecModel, "BERT4Rec": BERT4RecModel}[args.model]
    model = model_class(epochs=args.max_epochs, verbose=0, recommend_torch_device="cpu",
                        get_val_mask_func=leave_one_out_mask, get_trainer_func=make_trainer,
                        get_trainer_func_kwargs={"max_epochs": args.max_epochs},
                        **settings_kwargs(args.settings, json.loads(args.matched)))
    setup_seconds = log.seconds()
    model.fit(fit_dataset)

    model.torch_model.load_state_dict(callback.best_state)
    scorer = OurScorer(model.lightning_model, ex.n_items)
    test_histories = [ex.train(i) + [ex.valid_target(i)] for i in range(len(users))]
    test_targets = [ex.test_target(i) for i in range(len(users))]
    ranks = scorer.ranks(fit_dataset, users, test_histories, test_targets, masked=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reco = model.recommend(users=users, dataset=fit_dataset, k=OWN_K, filter_viewed=True)
    own_rank = {(int(u), int(i)): int(r) for u, i, r in
                reco[[Columns.User, Columns.Item, Columns.Rank]].itertuples(index=False)}
    config = model.get_config(simple_types=True)
    hyper = {k: config.get(k) for k in ("session_max_len", "n_factors", "n_blocks", "n_heads", "dropout_rate",
                                        "loss", "batch_size", "lr", "use_causal_attn", "mask_prob",
                                        "train_min_user_interactions") if k in config}
    log.write({
        "library": "rectools", "model": args.model, "settings": args.settings, "hyperparameters": hyper,
        "versions": package_versions("rectools", "torch", "pytorch-lightning", "numpy", "pandas", "scipy"),
        "setup_seconds": round(setup_seconds, 3), "best_epoch": stopper.best_epoch,
        "best_valid_ndcg_at_10": stopper.best, "stopped_early": len(log.epochs) < args.max_epochs, "stopped_by": stopper.stopped_by,
        "items_unknown_to_peer": scorer.item_count_unknown(),
        "test": {"users": users, "ranks": ranks,
                 "own_ranks": [own_rank.get((u, t)) for u, t in zip(users, test_targets)], "own_top_k": OWN_K},
        "own_protocol": f"RecTools recommend(k={OWN_K}, filter_viewed=True): the history left out, known items only",
    })


if __name__ == "__main__":
    main()

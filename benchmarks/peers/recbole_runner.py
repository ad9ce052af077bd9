"""RecBole 1.2.1 SASRec or BERT4Rec on an exchange folder, in RecBole's own virtual environment.

    python recbole_runner.py --exchange DIR --model SASRec --settings matched --matched '{...}' \
        --max-epochs 200 --patience 10 --out run/result.json

RecBole reads the atomic file ``<exchange>/recbole/llmrec/llmrec.inter`` (timestamp = position in the
user's sequence), so its time-ordered leave-one-out (``LS: valid_and_test``) is exactly our split. It trains
as it does by itself (every prefix of the training sequence is a sample); this script runs the epochs
instead of ``Trainer.fit`` so that after each epoch it can score validation twice: RecBole's own full-sort
evaluation (which does not leave the history out for sequential models) and ours (history left out), and
stop early on ours. At the end, the best epoch's weights (kept in memory) are tested: RecBole's own test
result as it reports it, and every user's test target rank with and without the history left out.

Patches: RecBole 1.2.1's MRR uses ``np.float``, gone since numpy 1.24, so the removed aliases are put
back before RecBole is imported. RecBole writes ``log/`` and ``log_tensorboard/`` under the working folder:
the driver runs this in the run's own folder.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from peer_protocol import EarlyStopping, ndcg_at_10, package_versions, start_run, target_ranks  # noqa: E402

DATASET_NAME = "llmrec"
EVAL_BATCH = 512

with warnings.catch_warnings():  # numpy warns when asked about the aliases it removed
    warnings.simplefilter("ignore", FutureWarning)
    for _alias, _type in (("float", float), ("int", int), ("bool", bool), ("long", int)):
        if not hasattr(np, _alias):  # numpy >= 1.24 removed them; RecBole 1.2.1 still uses np.float
            setattr(np, _alias, _type)


def settings_config(settings: str, matched: dict) -> dict:
    """RecBole keys of the settings: none for its defaults (properties/model/<MODEL>.yaml and
    overall.yaml); ours for ``matched``."""
    if settings == "defaults":
        return {}
    hidden = matched["hidden"]
    return {"MAX_ITEM_LIST_LENGTH": matched["max_len"], "hidden_size": hidden, "inner_size": 4 * hidden,
            "n_layers": matched["blocks"], "n_heads": matched["heads"],
            "hidden_dropout_prob": matched["dropout"], "attn_dropout_prob": matched["dropout"],
            "loss_type": "CE", "train_batch_size": matched["batch_size"], "learning_rate": matched["lr"]}


def protocol_config(args, exchange_folder: str) -> dict:
    """What every run sets, whatever the settings: the data, our split, CPU, no progress bars."""
    return {
        "data_path": os.path.join(exchange_folder, "recbole"), "dataset": DATASET_NAME,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "train_neg_sample_args": None,  # full-softmax cross-entropy (RecBole refuses negatives with CE)
        "use_gpu": False, "gpu_id": "", "show_progress": False, "save_dataset": False,
        "save_dataloaders": False, "log_wandb": False, "checkpoint_dir": "saved",
        "seed": args.seed, "reproducibility": True, "epochs": args.max_epochs,
        "stopping_step": args.patience, "metrics": ["Hit", "NDCG", "MRR"], "topk": [10],
        "valid_metric": "NDCG@10",
    }


class OurScorer:
    """Scores users with the RecBole model on our item_idx columns and ranks their targets."""

    def __init__(self, model, dataset, n_items: int, max_len: int):
        self.model, self.max_len = model, max_len
        self.to_internal = torch.full((n_items + 1,), -1, dtype=torch.long)
        for token, internal in dataset.field2token_id[dataset.iid_field].items():
            if token != "[PAD]":
                self.to_internal[int(token)] = internal
        self.unknown = self.to_internal < 0
        self.unknown[0] = False

    @torch.no_grad()
    def scores(self, histories: list[list[int]]) -> torch.Tensor:
        """[B, N+1] scores of our items after each history (its last MAX_ITEM_LIST_LENGTH items)."""
        from recbole.data.interaction import Interaction

        seq = torch.zeros(len(histories), self.max_len, dtype=torch.long)
        lengths = torch.zeros(len(histories), dtype=torch.long)
        for row, history in enumerate(histories):
            known = [i for i in (self.to_internal[h].item() for h in history) if i > 0][-self.max_len:]
            seq[row, :len(known)] = torch.as_tensor(known, dtype=torch.long)  # RecBole pads on the right
            lengths[row] = max(len(known), 1)
        self.model.eval()
        internal = self.model.full_sort_predict(Interaction({self.model.ITEM_SEQ: seq,
                                                             self.model.ITEM_SEQ_LEN: lengths}))
        ours = internal[:, self.to_internal.clamp(min=0)]
        ours[:, self.unknown] = float("-inf")
        return ours

    def ranks(self, histories, targets, masked: bool) -> list[int]:
        out = []
        for start in range(0, len(histories), EVAL_BATCH):
            h, t = histories[start:start + EVAL_BATCH], targets[start:start + EVAL_BATCH]
            out += target_ranks(self.scores(h), t, h if masked else None)
        return out


def main() -> None:
    args, log, ex = start_run(__doc__.split("\n")[0], STARTED)

    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    overrides = settings_config(args.settings, json.loads(args.matched))
    config = Config(model=args.model, dataset=DATASET_NAME,
                    config_dict={**protocol_config(args, os.path.abspath(args.exchange)), **overrides})
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.eval_collector.data_collect(train_data)  # as Trainer.fit does before its first epoch

    max_len = config["MAX_ITEM_LIST_LENGTH"]
    scorer = OurScorer(model, dataset, ex.n_items, max_len)
    valid_histories = [ex.train(i) for i in range(len(ex.users))]
    valid_targets = [ex.valid_target(i) for i in range(len(ex.users))]
    setup_seconds = log.seconds()
    stopper, best_state = EarlyStopping(args.patience, args.budget_min * 60), None
    for epoch in range(args.max_epochs):
        t0 = time.perf_counter()
        total_loss = trainer._train_epoch(train_data, epoch)
        t1 = time.perf_counter()
        own_score, own_valid = trainer._valid_epoch(valid_data)  # RecBole's own protocol, as fit() runs it
        t2 = time.perf_counter()
        ndcg = ndcg_at_10(scorer.ranks(valid_histories, valid_targets, masked=True))
        t3 = time.perf_counter()
        if stopper.update(epoch, ndcg):
            best_state = copy.deepcopy(model.state_dict())
        total = sum(total_loss) if isinstance(total_loss, tuple) else total_loss
        log.epoch({"epoch": epoch, "train_loss": total / max(len(train_data), 1), "valid_ndcg_at_10": ndcg,
                   "own_valid": {k: float(v) for k, v in own_valid.items()}, "train_seconds": round(t1 - t0, 3),
                   "own_valid_seconds": round(t2 - t1, 3), "our_valid_seconds": round(t3 - t2, 3)})
        if stopper.should_stop(epoch, log.seconds()):
            break

    model.load_state_dict(best_state)  # in memory: no checkpoint file, no torch.load
    own_test = trainer.evaluate(test_data, load_best_model=False)
    test_histories = [ex.train(i) + [ex.valid_target(i)] for i in range(len(ex.users))]
    test_targets = [ex.test_target(i) for i in range(len(ex.users))]
    hyper = {k: config[k] for k in ("MAX_ITEM_LIST_LENGTH", "hidden_size", "inner_size", "n_layers", "n_heads",
                                    "hidden_dropout_prob", "attn_dropout_prob", "hidden_act", "loss_type",
                                    "train_batch_size", "learning_rate", "learner", "weight_decay",
                                    "mask_ratio") if k in config}
    log.write({
        "library": "recbole", "model": args.model, "settings": args.settings, "hyperparameters": hyper,
        "versions": package_versions("recbole", "torch", "numpy", "pandas", "scipy"),
        "setup_seconds": round(setup_seconds, 3), "best_epoch": stopper.best_epoch,
        "best_valid_ndcg_at_10": stopper.best, "stopped_early": len(log.epochs) < args.max_epochs, "stopped_by": stopper.stopped_by,
        "items_unknown_to_peer": int(scorer.unknown.sum()),
        "test": {"users": ex.users,
                 "ranks": scorer.ranks(test_histories, test_targets, masked=True),
                 "own_ranks": scorer.ranks(test_histories, test_targets, masked=False),
                 "own_reported": {k: float(v) for k, v in own_test.items()}},
        "own_protocol": "RecBole full-sort: the history is not left out of the ranking",
    })


if __name__ == "__main__":
    main()

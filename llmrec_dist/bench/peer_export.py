"""Export a prepared dataset to the neutral exchange folder that the peer libraries read (`bench peers`).

Every system must train and be tested on exactly our users, items and leave-one-out targets, so the
export writes each user's whole chronological sequence (train items, then the validation target, then
the test target) and each peer's reader recovers our split from it by position:

    <exchange>/
      exchange.json                    counts, the dataset's content hash, the file list
      sequences.tsv                    user_idx<TAB>item_idx item_idx ... (oldest first; last = test target)
      recbole/llmrec/llmrec.inter      RecBole atomic file: user_id:token item_id:token timestamp:float,
                                       timestamp = position in the user's sequence, so RecBole's time-ordered
                                       leave-one-out ({'LS': 'valid_and_test'}, order TO) is our split
      rectools/interactions.csv        user_id,item_id,weight,datetime,split (datetime = position in seconds
                                       after 1970-01-01; split = train | valid | test)

Ids are our integers: ``user_idx`` and ``item_idx`` (1..N; 0 is padding and never appears).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

from llmrec_dist.data.dataset_format import read_items, read_manifest, read_split

RECBOLE_NAME = "llmrec"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class ExportError(ValueError):
    """The prepared dataset cannot be exported as one sequence per user (the message names the user)."""


def _rows(path, split: str) -> dict[int, tuple[list[int], int | None]]:
    table = read_split(path, split)
    users = table.column("user_idx").to_pylist()
    items = table.column("items").to_pylist()
    targets = table.column("target").to_pylist() if split != "train" else [None] * len(users)
    return {u: (h, t) for u, h, t in zip(users, items, targets)}


def user_sequences(path: str | os.PathLike) -> dict[int, list[int]]:
    """``{user_idx: train items + [valid target] + [test target]}`` for every user, after checking that
    the three splits tell one story: valid history == train items, test history == train items + valid
    target (a dataset prepared with ``--cold-items`` does not: its cold targets are in no history)."""
    train, valid, test = _rows(path, "train"), _rows(path, "valid"), _rows(path, "test")
    if set(valid) != set(test):
        odd = sorted(set(valid) ^ set(test))
        raise ExportError(f"{path}: the valid and test splits hold different users (e.g. user_idx {odd[0]})")
    sequences = {}
    for user in sorted(test):
        items = train.get(user, ([], None))[0]
        valid_history, valid_target = valid[user]
        test_history, test_target = test[user]
        if valid_history != items:
            raise ExportError(f"{path}: user_idx {user}: the validation history is not the training sequence "
                              f"({len(valid_history)} items against {len(items)})")
        if test_history != items + [valid_target]:
            raise ExportError(f"{path}: user_idx {user}: the test history is not the training sequence followed "
                              f"by the validation target (a dataset prepared with --cold-items cannot be "
                              f"exported: its cold targets are left out of every history)")
        sequences[user] = items + [valid_target, test_target]
    return sequences


def _split_of(position: int, length: int) -> str:
    return "test" if position == length - 1 else "valid" if position == length - 2 else "train"


def export_exchange(path: str | os.PathLike, folder: str | os.PathLike) -> dict:
    """Write the exchange folder of the prepared dataset ``path`` (replacing ``folder``); return its summary
    (the content of exchange.json)."""
    manifest = read_manifest(path)
    n_items = read_items(path).num_rows
    sequences = user_sequences(path)
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "recbole" / RECBOLE_NAME).mkdir(parents=True)
    (tmp / "rectools").mkdir()
    with open(tmp / "sequences.tsv", "w", encoding="utf-8") as seq_file, \
            open(tmp / "recbole" / RECBOLE_NAME / f"{RECBOLE_NAME}.inter", "w", encoding="utf-8") as inter, \
            open(tmp / "rectools" / "interactions.csv", "w", encoding="utf-8") as csv:
        seq_file.write("user_idx\titem_seq\n")
        inter.write("user_id:token\titem_id:token\ttimestamp:float\n")
        csv.write("user_id,item_id,weight,datetime,split\n")
        for user, items in sequences.items():
            seq_file.write(f"{user}\t{' '.join(map(str, items))}\n")
            for position, item in enumerate(items):
                inter.write(f"{user}\t{item}\t{position}\n")
                stamp = (EPOCH + timedelta(seconds=position)).strftime("%Y-%m-%d %H:%M:%S")
                csv.write(f"{user},{item},1,{stamp},{_split_of(position, len(items))}\n")
    seen = {i for items in sequences.values() for i in items}
    summary = {
        "format": 1,
        "dataset": {"path": str(path), "content_hash": manifest.get("content_hash"),
                    "variant": manifest.get("source", {}).get("variant", "")},
        "n_items": n_items,
        "users": len(sequences),
        "interactions": sum(len(s) for s in sequences.values()),
        "items_in_sequences": len(seen),
        "files": {"sequences": "sequences.tsv", "recbole": f"recbole/{RECBOLE_NAME}/{RECBOLE_NAME}.inter",
                  "rectools": "rectools/interactions.csv"},
    }
    (tmp / "exchange.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return summary

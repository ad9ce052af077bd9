"""The cold-item split (``prepare --cold-items FRACTION``): items only text can represent.

A seeded random ``round(FRACTION · N)`` of all ``N`` items become *cold*: they are removed from
every input sequence (train sequences, and the histories of valid and test rows), so a model never
sees their ids in training or as context. A cold item that is some user's valid or test target stays
only as that target; one that is not appears nowhere in the splits (only in ``items.parquet``). The
valid/test rows whose target is cold form the cold-start subset that evaluation reports separately;
it must not be empty. Train rows left empty are dropped; valid and test keep one row per user. The
choice is nested: with the same seed and data, a larger fraction holds a superset.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmrec_dist.data import dataset_format
from llmrec_dist.data.errors import PrepareError


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float if ``0 <= fraction < 1``; ``ValueError`` otherwise (NaN included)."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"cold_items must be a number in [0, 1), got {fraction!r}") from None
    if not 0.0 <= value < 1.0:  # also false for NaN
        raise ValueError(f"cold_items must be a fraction in [0, 1) (0 = no cold items), got {fraction!r}")
    return value


def choose_cold_items(targets: np.ndarray, num_items: int, fraction: float, seed: int,
                      source: str = "input") -> np.ndarray:
    """Bool mask over item_idx ``0..num_items``: ``round(fraction · num_items)`` cold items (half up).

    They are drawn uniformly without replacement from all items ``1..num_items``: the first ones of
    ``np.random.default_rng(seed).permutation`` of them, so a larger fraction with the same seed
    gives a superset. ``targets`` (the valid and test targets) only serve to check that the
    cold-start subset is not empty.

    Raises:
        PrepareError: the fraction rounds to 0 items, or none of the cold items is a valid or test
            target (an empty cold-start subset).
    """
    mask = np.zeros(num_items + 1, dtype=bool)
    if fraction == 0:
        return mask
    wanted = math.floor(fraction * num_items + 0.5)
    if wanted == 0:
        raise PrepareError(
            source, None,
            f"cold_items={fraction} of {num_items} items rounds to 0 cold items; use at least "
            f"{0.5 / num_items:.3g} (or 0 for no cold items)")
    chosen = np.random.default_rng(seed).permutation(np.arange(1, num_items + 1))[:wanted]
    mask[chosen] = True
    if not mask[np.asarray(targets, dtype=np.int64)].any():
        raise PrepareError(
            source, None,
            f"cold_items={fraction} with seed {seed}: none of the {wanted} cold items (of {num_items}) "
            f"is a valid or test target, so the cold-start subset would be empty; use a larger "
            f"fraction or another --seed")
    return mask


def drop_items(lists: pa.Array | pa.ChunkedArray, drop: np.ndarray) -> tuple[pa.ListArray, np.ndarray, np.ndarray]:
    """``lists`` (list<int32>) without the items where ``drop[item]``; also the new list lengths and
    the keep mask over the flattened values (to cut lists parallel to these the same way)."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    values = lists.flatten().to_numpy(zero_copy_only=False)
    keep = ~drop[values]
    row_of_value = np.repeat(np.arange(len(lengths)), lengths)
    new_lengths = np.bincount(row_of_value[keep], minlength=len(lengths))
    offsets = np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.int32)
    kept = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values[keep], pa.int32()))
    return kept, new_lengths, keep


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, values)


def _without_cold(table: pa.Table, cold: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """``table`` with the cold items removed from ``items`` (and the same events from ``feedback``,
    when the dataset has explicit feedback); also the new history lengths."""
    items, lengths, keep = drop_items(table.column("items"), cold)
    table = _set_column(table, "items", items)
    name = dataset_format.FEEDBACK_FIELD.name
    if name in table.column_names:
        values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        table = _set_column(table, name, pa.ListArray.from_arrays(
            pa.array(offsets, pa.int32()), pa.array(values[keep], pa.float32())))
    return table, lengths


def _with_cold_targets(table: pa.Table, cold: np.ndarray) -> pa.Table:
    flags = cold[table.column("target").to_numpy()]
    return table.append_column(dataset_format.COLD_FIELD, pa.array(flags, pa.bool_()))


def apply_cold_items(splits: dict[str, pa.Table], num_items: int, fraction: float, seed: int,
                     source: str = "input") -> tuple[dict[str, pa.Table], np.ndarray, dict]:
    """Choose the cold items and remove them from every ``items`` list of the leave-one-out splits.

    ``splits`` are the tables of ``leave_one_out`` (one row per user, sorted by ``user_idx``).
    Returns ``(splits, cold, manifest_section)``: the new tables, with a ``cold`` column on valid
    and test and the train rows that became empty dropped; the bool mask over item_idx
    ``0..num_items``; and the manifest's ``cold_items`` record. With ``fraction == 0`` the
    tables are unchanged apart from an all-false ``cold`` column.

    Raises:
        PrepareError: see ``choose_cold_items``; or no train interaction is left.
    """
    targets = np.concatenate([splits[s].column("target").to_numpy() for s in ("valid", "test")])
    cold = choose_cold_items(targets, num_items, fraction, seed, source)
    out = dict(splits)
    dropped_rows = removed = 0
    if cold.any():
        train, lengths = _without_cold(splits["train"], cold)
        removed = int(pc.sum(pc.list_value_length(splits["train"].column("items"))).as_py() - lengths.sum())
        kept_rows = lengths > 0
        dropped_rows = int((~kept_rows).sum())
        if not kept_rows.any():
            raise PrepareError(
                source, None,
                f"cold_items={fraction}: every train interaction is of a cold item; nothing left to train on")
        out["train"] = train.filter(pa.array(kept_rows))
        for name in ("valid", "test"):
            out[name] = _without_cold(splits[name], cold)[0]
    for name in ("valid", "test"):
        out[name] = _with_cold_targets(out[name], cold)
    section = {
        "fraction": fraction,
        "seed": seed if fraction > 0 else None,
        "chosen_from": "all items",
        "items": int(cold.sum()),
        "valid_targets": int(pc.sum(out["valid"].column("cold")).as_py() or 0),
        "test_targets": int(pc.sum(out["test"].column("cold")).as_py() or 0),
        "train_interactions_removed": removed,
        "train_rows_dropped": dropped_rows,
    }
    return out, cold, section

"""`bench peers`: RecBole and RecTools SASRec/BERT4Rec beside us, on exactly our split.

The driver (this module, in the project's environment) exports the prepared dataset to an exchange folder
(:mod:`llmrec_dist.bench.peer_export`), makes each peer library's own virtual environment
(:mod:`llmrec_dist.bench.peer_envs`), and runs that library's runner script from ``benchmarks/peers/`` with
the environment's python, in a subprocess with a timeout, its output in a log file. A runner trains with
the library's own training loop, scores validation after every epoch under our protocol (full ranking,
history left out) and stops early on it, and writes each user's test target rank under our protocol and
under the library's own. Here those ranks become HR/NDCG/MRR@K, next to best epoch, seconds to the best
validation epoch, seconds per epoch and peak RSS: one row per (peer, settings). A peer that does not
install, crashes, times out or cannot read the data gets a row that says so: the failure is a result.

Every epoch record keeps ``seconds_since_start`` (from the runner's start) with our validation NDCG@10,
so the time any system takes to reach a validation NDCG@10 can be read afterwards (:func:`time_to_quality`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmrec_dist.bench.peer_envs import PeerEnv, PeerSetupError, ensure_env, last_error_line

RUNNERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"
DEFAULT_WORK = "~/.cache/llmrec_dist/peers"
KS = (5, 10, 20)

# RecBole 1.2.1 installs the newest numpy and pandas, but uses numpy aliases removed in 1.24 (patched by its
# runner) and predates numpy 2 and pandas 3: pinned below those inside its own environment only.
RECBOLE = PeerEnv("recbole", "1.2.1", ("recbole==1.2.1", "numpy<2", "pandas<3"), "recbole")
RECTOOLS = PeerEnv("rectools", "0.19.0", ("rectools[torch]==0.19.0",), "rectools",
                   report=("torch", "pytorch-lightning", "numpy", "pandas", "scipy"))


@dataclass(frozen=True)
class Peer:
    env: PeerEnv
    runner: str  # file in benchmarks/peers/
    model: str  # SASRec | BERT4Rec


PEERS = {
    "recbole-sasrec": Peer(RECBOLE, "recbole_runner.py", "SASRec"),
    "recbole-bert4rec": Peer(RECBOLE, "recbole_runner.py", "BERT4Rec"),
    "rectools-sasrec": Peer(RECTOOLS, "rectools_runner.py", "SASRec"),
    "rectools-bert4rec": Peer(RECTOOLS, "rectools_runner.py", "BERT4Rec"),
}
SETTINGS = ("defaults", "matched")
# "matched": the shape of our recipe for sparse catalogues (configs/bench_beauty.yaml), full-softmax CE.
MATCHED = {"max_len": 50, "hidden": 64, "blocks": 2, "heads": 2, "dropout": 0.5, "batch_size": 128, "lr": 1e-3}


@dataclass
class RunOptions:
    max_epochs: int = 200
    patience: int = 10
    budget_min: float = 0.0  # per run: stop after the epoch that passes it, then test the best epoch (0: none)
    seed: int = 42
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    timeout_s: float = 6 * 3600
    matched: dict = field(default_factory=lambda: dict(MATCHED))


def parse_choices(text: str, valid, what: str) -> list[str]:
    """Comma-separated names, each one of ``valid``; a ValueError names the valid ones."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in valid]
    if bad or not names:
        raise ValueError(f"{what}: unknown {', '.join(bad) or 'empty list'}; valid: {', '.join(valid)}")
    return names


def parse_matched(text: str) -> dict:
    """``key=value,...`` over :data:`MATCHED` (e.g. ``dropout=0.2,max_len=200``)."""
    matched = dict(MATCHED)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in MATCHED or not value:
            raise ValueError(f"--matched: expected key=value with key in {', '.join(MATCHED)}, got {part!r}")
        try:
            matched[key] = int(value) if isinstance(MATCHED[key], int) else float(value)
        except ValueError:
            raise ValueError(f"--matched: {key} expects a number, got {value!r}") from None
    return matched


# ---------------------------------------------------------------------------------------------------------
# Metrics from ranks
# ---------------------------------------------------------------------------------------------------------


def metrics_from_ranks(ranks: list, prefix: str = "", ks=KS) -> dict:
    """HR/NDCG/MRR@K (our llmrec_dist.metrics formulas) of 1-based target ranks; None = not in the list
    the system returned (a miss at every K it can tell)."""
    import torch

    from llmrec_dist.metrics import RankingAccumulator

    zero_based = torch.tensor([r - 1 if r is not None else 10**9 for r in ranks], dtype=torch.float64)
    acc = RankingAccumulator(list(ks), num_items=0, coverage_k=None)
    acc.add_ranks(zero_based)
    return acc.result(prefix=prefix)


# ---------------------------------------------------------------------------------------------------------
# One run of one peer
# ---------------------------------------------------------------------------------------------------------


def _tree_rss_mb(process) -> float:
    import psutil

    try:
        procs = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def run_child(cmd: list[str], cwd: Path, log: Path, timeout_s: float, env: dict) -> dict:
    """Run ``cmd`` in its own session with its output in ``log``; sample the peak RSS of its process tree
    every half second. Returns ``{returncode, timed_out, wall_seconds, peak_tree_rss_mb}``."""
    import psutil

    started = time.perf_counter()
    peak = 0.0
    with open(log, "w", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        child = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        try:
            watched = psutil.Process(child.pid)
        except psutil.Error:  # gone already
            watched = None
        timed_out = False
        while child.poll() is None:
            if watched is not None:
                peak = max(peak, _tree_rss_mb(watched))
            if time.perf_counter() - started > timeout_s:
                timed_out = True
                os.killpg(child.pid, signal.SIGKILL)  # the runner's whole session, nothing else
                child.wait()
                break
            time.sleep(0.5)
    return {"returncode": child.returncode, "timed_out": timed_out,
            "wall_seconds": time.perf_counter() - started, "peak_tree_rss_mb": peak}


def _child_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               PYTHONNOUSERSITE="1",
               TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")  # torch >= 2.6 vs libraries that torch.load pickles
    return env


def _read_epochs(run_dir: Path) -> list[dict]:
    path = run_dir / "epochs.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def base_row(name: str, settings: str) -> dict:
    peer = PEERS[name]
    return {"system": name, "library": peer.env.package, "library_version": peer.env.version,
            "model": peer.model, "settings": settings}


def failure_row(name: str, settings: str, status: str, reason: str, log: Path | None = None,
                **extra) -> dict:
    """A row for a run that did not produce results: ``status`` install_failed | failed | timeout."""
    return {**base_row(name, settings), "status": status, "reason": reason, "log": str(log) if log else None,
            **extra}


def result_row(name: str, settings: str, result: dict, users: list[int]) -> dict:
    """The row of a finished run from its runner's result file."""
    epochs = result["epochs"]
    best = next((e for e in epochs if e["epoch"] == result["best_epoch"]), None)
    epoch_seconds = [e.get("train_seconds", 0) + e.get("own_valid_seconds", 0) for e in epochs]
    test = result["test"]
    same_users = sorted(test["users"]) == sorted(users)
    row = {
        **base_row(name, settings), "status": "ok",
        "versions": result.get("versions"), "hyperparameters": result.get("hyperparameters"),
        "best_epoch": result["best_epoch"], "epochs_run": len(epochs), "stopped_early": result["stopped_early"],
        "stopped_by": result.get("stopped_by"),
        "best_valid_ndcg_at_10": result["best_valid_ndcg_at_10"],
        "seconds_to_best": best["seconds_since_start"] if best else None,
        "setup_seconds": result.get("setup_seconds"),
        "mean_epoch_seconds": sum(epoch_seconds) / len(epoch_seconds) if epochs else None,
        "mean_our_valid_seconds": (sum(e.get("our_valid_seconds", 0) for e in epochs) / len(epochs)
                                   if epochs else None),
        "peak_rss_mb": result.get("peak_rss_mb"),
        "items_unknown_to_peer": result.get("items_unknown_to_peer"),
        **metrics_from_ranks(test["ranks"], prefix="test_"),
        **metrics_from_ranks(test["own_ranks"], prefix="own_test_",
                             ks=[k for k in KS if k <= test.get("own_top_k", max(KS))]),
        "own_protocol": result.get("own_protocol"),
        "own_reported": test.get("own_reported"),
        "same_users": same_users,
        "epochs": epochs,
    }
    if not same_users:
        row["note"] = f"tested {len(test['users'])} users, the dataset has {len(users)}"
    return row


REQUEST_FILE = "request.json"  # what a run was asked to do: a later --reuse takes its result only if equal


def _reused_row(name: str, settings: str, run_dir: Path, request: dict, users: list[int]) -> dict | None:
    """The row of an earlier run with exactly this request (same runner command, same data, same timeout),
    or None: a finished run, or one stopped at its timeout (the same request would time out again); a
    crash is never reused."""
    try:
        asked = json.loads((run_dir / REQUEST_FILE).read_text(encoding="utf-8"))
        measured, timed_out = asked.pop("measured", None) or {}, asked.pop("timeout_row", None)
        if asked != request:
            return None
        if timed_out:
            return {**timed_out, "reused": True}
        row = result_row(name, settings, json.loads((run_dir / "result.json").read_text(encoding="utf-8")), users)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    row.update(log=str(run_dir / "run.log"), reused=True, **measured)
    row["peak_rss_mb"] = max(row.get("peak_rss_mb") or 0.0, measured.get("peak_tree_rss_mb") or 0.0)
    return row


def run_one(name: str, settings: str, python: Path, exchange: Path, run_dir: Path, options: RunOptions,
            users: list[int], content_hash: str | None = None, reuse: bool = False) -> dict:
    """Run one peer with one setting; a row whatever happens. With ``reuse``, a finished earlier run of
    the same request (runner command and dataset content hash) in ``run_dir`` is taken instead."""
    peer = PEERS[name]
    run_dir.mkdir(parents=True, exist_ok=True)
    out, log = run_dir / "result.json", run_dir / "run.log"
    cmd = [str(python), str(RUNNERS / peer.runner), "--exchange", str(exchange), "--model", peer.model,
           "--settings", settings, "--matched", json.dumps(options.matched), "--max-epochs",
           str(options.max_epochs), "--patience", str(options.patience), "--budget-min", str(options.budget_min),
           "--seed", str(options.seed), "--threads", str(options.threads), "--out", str(out)]
    request = {"cmd": cmd, "content_hash": content_hash, "timeout_s": options.timeout_s}
    if reuse:
        row = _reused_row(name, settings, run_dir, request, users)
        if row is not None:
            return row
    out.unlink(missing_ok=True)
    (run_dir / REQUEST_FILE).unlink(missing_ok=True)
    try:
        child = run_child(cmd, run_dir, log, options.timeout_s, _child_env(options.threads))
    except OSError as err:
        return failure_row(name, settings, "failed", f"could not start {python}: {err}", log)
    measured = {"wall_seconds": child["wall_seconds"], "peak_tree_rss_mb": child["peak_tree_rss_mb"]}
    if child["timed_out"]:
        row = failure_row(name, settings, "timeout", f"stopped after {options.timeout_s / 60:.0f} min", log,
                          epochs=_read_epochs(run_dir), **measured)
        _write_json(run_dir / REQUEST_FILE, {**request, "timeout_row": row})
        return row
    if child["returncode"] != 0 or not out.is_file():
        return failure_row(name, settings, "failed", f"exit code {child['returncode']}: {last_error_line(log)}",
                           log, epochs=_read_epochs(run_dir), **measured)
    try:
        row = result_row(name, settings, json.loads(out.read_text(encoding="utf-8")), users)
    except (ValueError, KeyError, TypeError) as err:
        return failure_row(name, settings, "failed", f"unreadable result {out}: {err!r}", log, **measured)
    row.update(log=str(log), **measured)
    row["peak_rss_mb"] = max(row.get("peak_rss_mb") or 0.0, child["peak_tree_rss_mb"])
    _write_json(run_dir / REQUEST_FILE, {**request, "measured": measured})
    return row


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
    tmp.replace(path)


def run_peers(data: str, label: str, names: list[str], settings: list[str], options: RunOptions,
              work: str | Path = DEFAULT_WORK, on_row=None, reuse: bool = False) -> dict:
    """Export ``data``, make each needed environment, run every (peer, settings); the figures of
    ``peers-<label>.json``. ``on_row(row)`` is called as each row is done. ``reuse``: take a finished
    earlier run of the same request instead of running it again (:func:`run_one`)."""
    from llmrec_dist.bench.peer_export import export_exchange

    work = Path(work).expanduser().resolve()
    exchange = work / "exchange" / (label or "dataset")
    summary = export_exchange(data, exchange)
    users = [int(line.split("\t", 1)[0]) for line in
             (exchange / "sequences.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    runs = work / "runs" / (label or "dataset")
    rows, envs = [], {}
    for name in names:
        peer = PEERS[name]
        if peer.env.name not in envs:
            try:
                python, versions, reused = ensure_env(peer.env, work, runs / "logs")
                envs[peer.env.name] = {"python": python, "versions": versions, "reused": reused}
            except PeerSetupError as err:
                envs[peer.env.name] = {"error": str(err)}
        env = envs[peer.env.name]
        for setting in settings:
            if "error" in env:
                row = failure_row(name, setting, "install_failed", env["error"],
                                  runs / "logs" / f"{peer.env.name}-install.log")
            else:
                row = run_one(name, setting, env["python"], exchange, runs / f"{name}-{setting}", options, users,
                              summary["dataset"].get("content_hash"), reuse)
                row["versions"] = row.get("versions") or env["versions"]
            rows.append(row)
            if on_row:
                on_row(row)
    return {"rows": rows, "exchange": {**summary, "folder": str(exchange)},
            "environments": {k: {kk: str(vv) if kk == "python" else vv for kk, vv in v.items()}
                             for k, v in envs.items()},
            "protocol": "ours: full ranking over items 1..N, the user's history left out (target kept), ties "
                        "against the target; early stopping on our validation NDCG@10 for every run"}


def row_line(row: dict) -> str:
    """One line per system for the console."""
    head = f"{row['system']} ({row['settings']}): {row['status']}"
    if row["status"] != "ok":
        done = f"; {len(row['epochs'])} epochs recorded" if row.get("epochs") else ""
        return f"{head}: {row['reason']}{done}"
    if row.get("reused"):
        head += " (reused: an earlier run of the same request)"
    own = row.get("own_test_ndcg_at_10")
    if row.get("stopped_by") == "time budget":
        head += " (stopped by its time budget)"
    return (f"{head}, best epoch {row['best_epoch']} of {row['epochs_run']} (valid NDCG@10 "
            f"{row['best_valid_ndcg_at_10']:.4f}, at {row['seconds_to_best']:.0f} s), test NDCG@10 "
            f"{row['test_ndcg_at_10']:.4f} HR@10 {row['test_hr_at_10']:.4f} (own protocol "
            f"{'-' if own is None else f'{own:.4f}'}), {row['mean_epoch_seconds']:.1f} s/epoch, "
            f"peak {row['peak_rss_mb']:.0f} MB")


COLUMNS = [("system", "system", ""), ("settings", "settings", ""), ("status", "status", ""),
           ("best_epoch", "best ep", ""), ("epochs_run", "epochs", ""), ("stopped_by", "stopped by", ""), ("best_valid_ndcg_at_10", "valid NDCG@10", ".4f"),
           ("test_ndcg_at_10", "NDCG@10", ".4f"), ("test_hr_at_10", "HR@10", ".4f"),
           ("test_mrr_at_10", "MRR@10", ".4f"), ("own_test_ndcg_at_10", "own NDCG@10", ".4f"),
           ("mean_epoch_seconds", "s/epoch", ".1f"), ("seconds_to_best", "s to best", ".0f"),
           ("peak_rss_mb", "peak MB", ".0f")]


# ---------------------------------------------------------------------------------------------------------
# Time to quality
# ---------------------------------------------------------------------------------------------------------


def seconds_to_reach(epochs: list[dict], threshold: float) -> float | None:
    """Seconds since the start at the first epoch whose validation NDCG@10 reaches ``threshold``."""
    for e in epochs:
        if e.get("valid_ndcg_at_10") is not None and e["valid_ndcg_at_10"] >= threshold:
            return e["seconds_since_start"]
    return None


def quality_epochs(figures: dict) -> list[dict]:
    """Per-epoch records of a `bench quality` result: the validation curve with the wall seconds from the
    command's start to each validation (``valid_curve_seconds``). Older result files without them get
    estimated times, start-up + (epoch + 1) mean epochs, start-up being the wall time less the epochs (it
    includes the final test): those records say ``estimated``."""
    curve = figures.get("valid_curve") or []
    measured = figures.get("valid_curve_seconds") or []
    if curve and len(measured) == len(curve):
        return [{"epoch": i, "valid_ndcg_at_10": v, "seconds_since_start": s, "estimated": False}
                for i, (v, s) in enumerate(zip(curve, measured))]
    if not curve or not figures.get("mean_epoch_seconds"):
        return []
    mean = figures["mean_epoch_seconds"]
    startup = max(figures.get("wall_seconds", 0) - (figures.get("epochs_run") or len(curve)) * mean, 0.0)
    return [{"epoch": i, "valid_ndcg_at_10": v, "seconds_since_start": startup + (i + 1) * mean,
             "estimated": True} for i, v in enumerate(curve)]


def time_to_quality(peers_result: dict, quality_results: dict[str, dict]) -> dict:
    """Seconds each system took to reach the best validation NDCG@10 of the best peer run.

    ``peers_result``: a peers-<label>.json; ``quality_results``: ``{name: quality-<label>.json}`` of our
    runs on the same dataset. None where a system never reached it."""
    ok = [r for r in peers_result["figures"]["rows"] if r["status"] == "ok"]
    if not ok:
        return {"threshold": None, "systems": []}
    best = max(ok, key=lambda r: r["best_valid_ndcg_at_10"])
    threshold = best["best_valid_ndcg_at_10"]
    systems = [{"system": f"{r['system']} ({r['settings']})", "seconds": seconds_to_reach(r["epochs"], threshold),
                "estimated": False} for r in ok]
    for name, result in quality_results.items():
        epochs = quality_epochs(result["figures"])
        systems.append({"system": name, "seconds": seconds_to_reach(epochs, threshold),
                        "estimated": any(e["estimated"] for e in epochs)})
    return {"threshold": threshold, "set_by": f"{best['system']} ({best['settings']})", "systems": systems}


# ---------------------------------------------------------------------------------------------------------
# The side-by-side table (README), from peers-<label>.json and our quality-*.json of the same dataset
# ---------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def our_row(name: str, result: dict) -> dict:
    """A `bench quality` result as a side-by-side row (the fields a peer row has)."""
    f = result["figures"]
    epochs = quality_epochs(f)
    best = f.get("best_epoch")
    at_best = next((e for e in epochs if e["epoch"] == best), None)
    return {"system": "llmrec_dist", "settings": result.get("label") or name, "status": "ok",
            "test_ndcg_at_10": f.get("test_ndcg_at_10"), "test_hr_at_10": f.get("test_hr_at_10"),
            "test_mrr_at_10": f.get("test_mrr_at_10"), "best_epoch": best, "epochs_run": f.get("epochs_run"),
            "best_valid_ndcg_at_10": f.get("best_valid_ndcg_at_10"),
            "seconds_to_best": at_best["seconds_since_start"] if at_best else None,
            "mean_epoch_seconds": f.get("mean_epoch_seconds"), "epochs": epochs,
            "estimated": any(e["estimated"] for e in epochs), "file": name}


def _comparison(peers_result: dict, results: dict[str, dict]) -> dict:
    """The peer rows of a peers result, our `bench quality` rows on the same prepared data (same manifest
    content hash), the best peer run (on validation) and the seconds it took to reach its best. A refit on
    its own (``train.refit_epochs``) is left out: it trained on the validation interactions, which no
    peer does; a validated run that a refit followed counts by its own, validated, figures."""
    rows = peers_result["figures"]["rows"]
    content = (peers_result.get("dataset") or {}).get("content_hash")
    ours = [our_row(name, r) for name, r in sorted(results.items())
            if r.get("benchmark") == "quality" and content and (r.get("dataset") or {}).get("content_hash") == content
            and r["figures"].get("test_ndcg_at_10") is not None and not r["figures"].get("refit_epochs")]
    ok = [r for r in rows if r["status"] == "ok"]
    best_peer = max(ok, key=lambda r: r["best_valid_ndcg_at_10"]) if ok else None
    threshold = best_peer["best_valid_ndcg_at_10"] if best_peer else None
    return {"rows": rows, "ours": ours, "ok": ok, "best_peer": best_peer, "threshold": threshold,
            "peer_seconds": seconds_to_reach(best_peer["epochs"], threshold) if best_peer else None,
            "our_best": max(ours, key=lambda r: r["best_valid_ndcg_at_10"] or 0, default=None),
            "peer_best_test": max(ok, key=lambda r: r["test_ndcg_at_10"], default=None)}


def _dataset_words(peers_name: str, peers_result: dict) -> str:
    d = peers_result.get("dataset") or {}
    counts = d.get("counts") or {}
    return (f"**{peers_result.get('label') or peers_name}** ({d.get('variant') or d.get('source') or 'dataset'}: "
            f"{counts.get('users', 0):,} users, {counts.get('items', 0):,} items)")


def side_by_side(peers_name: str, peers_result: dict, results: dict[str, dict]) -> list[str]:
    """Markdown lines: one dataset's table of every peer run and every `bench quality` run of ours on the
    same prepared data, with the time each took to reach the best peer's best validation NDCG@10."""
    c = _comparison(peers_result, results)
    best_peer, threshold, peer_seconds = c["best_peer"], c["threshold"], c["peer_seconds"]
    lines = [f"{_dataset_words(peers_name, peers_result)}, "
             f"`{peers_name}.json` @ {peers_result.get('git_revision', '')[:8]}", ""]
    if threshold is not None:
        lines += [f"Time to quality: seconds from the start to the first validation NDCG@10 ≥ {threshold:.4f}, "
                  f"the best peer run's best ({best_peer['system']}, {best_peer['settings']}: "
                  f"{_fmt(peer_seconds, '.0f')} s).", ""]
    lines += ["| system | settings | test NDCG@10 | HR@10 | MRR@10 | own protocol NDCG@10 | best epoch / run | "
              "s to best | s/epoch | s to best peer's quality | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [*c["ours"], *c["rows"]]:
        if r["status"] != "ok":
            lines.append(f"| {r['system']} | {r['settings']} | {r['status']}: {r['reason']} |  |  |  |  |  |  |  |  |")
            continue
        reach = seconds_to_reach(r["epochs"], threshold) if threshold is not None else None
        ratio = f" ({reach / peer_seconds:.2f}×)" if reach is not None and peer_seconds else ""
        stop = " (time budget)" if r.get("stopped_by") == "time budget" else ""
        est = " (est.)" if r.get("estimated") else ""
        lines.append(
            f"| {r['system']} | {r['settings']} | {_fmt(r.get('test_ndcg_at_10'), '.4f')} | "
            f"{_fmt(r.get('test_hr_at_10'), '.4f')} | {_fmt(r.get('test_mrr_at_10'), '.4f')} | "
            f"{_fmt(r.get('own_test_ndcg_at_10'), '.4f')} | {_fmt(r.get('best_epoch'), '')} / "
            f"{_fmt(r.get('epochs_run'), '')}{stop} | {_fmt(r.get('seconds_to_best'), '.0f')}{est} | "
            f"{_fmt(r.get('mean_epoch_seconds'), '.1f')} | "
            f"{'not reached' if reach is None else f'{reach:.0f}{est}{ratio}'} | "
            f"{_fmt(r.get('peak_rss_mb'), ',.0f')} |")
    ours, peer = c["our_best"], c["peer_best_test"]
    if ours and peer:
        lines += ["", f"Ours (`{ours['settings']}`, chosen on validation) against the best peer's test "
                      f"NDCG@10: {ours['test_ndcg_at_10'] / peer['test_ndcg_at_10'] - 1:+.1%}."]
    return lines


SUMMARY_HEAD = ["| dataset | llmrec_dist test NDCG@10 | best peer test NDCG@10 | lead | "
                "to the best peer's best validation: ours / the peer |", "|---|---|---|---|---|"]


def summary_line(peers_name: str, peers_result: dict, results: dict[str, dict]) -> str:
    """One Markdown row per dataset: our run chosen on validation against the best peer on test, and the
    seconds each took to reach the best peer run's best validation NDCG@10."""
    c = _comparison(peers_result, results)
    ours, peer, best_peer = c["our_best"], c["peer_best_test"], c["best_peer"]
    name = _dataset_words(peers_name, peers_result)
    if not peer:
        return f"| {name} | – | no peer ran | – | – |"
    peer_cell = f"{peer['test_ndcg_at_10']:.4f} ({peer['system']}, {peer['settings']})"
    if not ours:
        return f"| {name} | not run | {peer_cell} | – | – |"
    reach = seconds_to_reach(ours["epochs"], c["threshold"])
    est = " (est.)" if ours.get("estimated") else ""
    time_cell = ("not reached" if reach is None else
                 f"{reach:.0f} s{est} / {c['peer_seconds']:.0f} s = {reach / c['peer_seconds']:.2f}×"
                 if c["peer_seconds"] else f"{reach:.0f} s")
    return (f"| {name} | {ours['test_ndcg_at_10']:.4f} (`{ours['settings']}`) | {peer_cell} | "
            f"{ours['test_ndcg_at_10'] / peer['test_ndcg_at_10'] - 1:+.1%} | {time_cell} "
            f"({best_peer['system']}, {best_peer['settings']}) |")

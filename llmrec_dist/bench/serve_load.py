"""Open-loop HTTP load on a served model (`llmrec-dist bench serve`).

    llmrec-dist bench serve --url http://127.0.0.1:8000 --histories data/ml-1m --rate 50 --duration 30
    llmrec-dist bench serve --model models:/NAME@champion --histories data/ml-1m --switch-alias 7

Open loop: request ``i`` is sent at ``start + i / rate`` whether or not earlier ones have been answered,
so a server that falls behind shows it in its latencies (a closed loop would slow down with it and
hide that). Each scenario (``plain``; ``explain`` and ``diversity`` when the model supports them, else
skipped with a note) runs ``duration`` seconds with histories sampled from a prepared dataset's test
split or from a file. Reported per scenario: p50/p95/p99 latency, achieved answers per second,
failures (non-200 or no answer) and the model versions that answered. ``--switch-alias VERSION`` moves
the alias being served to VERSION half-way through the first scenario.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np

SCENARIOS = ("plain", "explain", "diversity")
COLUMNS = [("scenario", "scenario", ""), ("sent", "requests", "d"), ("rate", "target req/s", ".0f"),
           ("achieved_rps", "answered req/s", ".1f"), ("p50_ms", "p50 ms", ".1f"), ("p95_ms", "p95 ms", ".1f"),
           ("p99_ms", "p99 ms", ".1f"), ("failures", "failures", "d"), ("versions_text", "versions", "")]
REQUEST_TIMEOUT_S = 30.0


def read_histories(path: str, limit: int = 10_000, seed: int = 0) -> list[list[str]]:
    """Histories of original item ids, most recent last: a prepared dataset's test split (its input
    histories, sampled down to ``limit``), or a file with one history per line (a JSON list, a JSON object
    with ``history``, or comma-separated ids)."""
    source = Path(path)
    if (source / "manifest.json").is_file():
        from llmrec_dist.data.dataset_format import read_items, read_split

        ids = read_items(source).column("item_id").to_pylist()  # sorted by item_idx, which starts at 1
        rows = read_split(source, "test").column("items").to_pylist()
        histories = [[ids[idx - 1] for idx in row] for row in rows]
    elif source.is_file():
        histories = []
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            if line[0] in "[{":
                value = json.loads(line)
                value = value.get("history") if isinstance(value, dict) else value
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{path}:{number}: expected a list of item id strings")
                histories.append(value)
            else:
                histories.append([part.strip() for part in line.split(",") if part.strip()])
    else:
        raise FileNotFoundError(f"--histories {path}: neither a prepared dataset folder nor a file")
    if not histories:
        raise ValueError(f"--histories {path}: no histories in it")
    if len(histories) > limit:
        histories = random.Random(seed).sample(histories, limit)
    return histories


def payload(scenario: str, history: list[str], k: int) -> dict:
    body = {"history": history, "k": k}
    if scenario == "explain":
        body["explain"] = True
    elif scenario == "diversity":
        body["diversity"] = 0.5
    return body


def percentiles(latencies_s: list[float]) -> dict:
    if not latencies_s:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(np.asarray(latencies_s) * 1000, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


async def _get_json(session, url: str) -> dict:
    async with session.get(url) as response:
        return await response.json(content_type=None)


async def _one(session, url: str, body: dict, out: list) -> None:
    started = time.perf_counter()
    try:
        async with session.post(f"{url}/recommend", json=body) as response:
            data = await response.json(content_type=None)
            status = response.status
    except Exception as err:  # no answer at all: timeout, refused, reset
        status, data = -1, {"error": f"{type(err).__name__}: {err}"}
    version = (data.get("model") or {}).get("version") if status == 200 and isinstance(data, dict) else None
    error = data.get("error") if isinstance(data, dict) and status != 200 else None
    out.append({"latency_s": time.perf_counter() - started, "status": status, "version": version, "error": error})


async def open_loop(session, url: str, bodies: list[dict], rate: float, duration: float,
                    midway=None) -> dict:
    """Send ``rate * duration`` requests on schedule (cycling through ``bodies``); ``midway`` (a plain
    function) runs in a thread half-way through. Returns the scenario's figures."""
    total = max(1, int(rate * duration))
    results: list[dict] = []
    tasks = []
    midway_task = None
    start = time.perf_counter()
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if midway is not None and midway_task is None and i >= total // 2:
            midway_task = asyncio.create_task(asyncio.to_thread(midway))
        tasks.append(asyncio.create_task(_one(session, url, bodies[i % len(bodies)], results)))
    sending = time.perf_counter() - start
    await asyncio.gather(*tasks)
    if midway_task is not None:
        await midway_task
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    versions = Counter(r["version"] for r in ok)
    errors = Counter(r["error"] or f"status {r['status']}" for r in results if r["status"] != 200)
    return {"sent": total, "rate": rate, "send_seconds": sending, "wall_seconds": wall,
            "achieved_rps": len(ok) / wall, "answered": len(ok), "failures": total - len(ok),
            **percentiles([r["latency_s"] for r in ok]),
            "versions": dict(versions), "errors": dict(errors.most_common(5))}


async def run_load(url: str, histories: list[list[str]], *, rate: float, duration: float, k: int,
                   scenarios: list[str], switch_alias=None, seed: int = 0, warmup: float = 0.0,
                   rates: dict[str, float] | None = None) -> dict:
    """Every scenario the model supports, one after the other; ``switch_alias`` (a plain function) runs
    half-way through the first. Each scenario first runs ``warmup`` seconds at its rate, untimed (first
    calls of a fresh replica, thread pools, connections). ``rates`` sets a scenario's own rate (else
    ``rate``). Returns ``{"model": /version, "rows": [...], "skipped": {...}}``."""
    import aiohttp

    url = url.rstrip("/")
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=512)) as session:
        model = await _get_json(session, f"{url}/version")
        options = model.get("options", {})
        k = min(k, model.get("max_k", k))
        rows, skipped = [], {}
        for scenario in scenarios:
            if scenario != "plain" and not options.get(scenario):
                skipped[scenario] = f"the model does not support {scenario} (GET /version options)"
                continue
            scenario_rate = (rates or {}).get(scenario, rate)
            bodies = [payload(scenario, rng.choice(histories), k)
                      for _ in range(min(1000, int(scenario_rate * duration) + 1))]
            if warmup > 0:
                await open_loop(session, url, bodies, scenario_rate, warmup)
            row = await open_loop(session, url, bodies, scenario_rate, duration,
                                  midway=switch_alias if not rows else None)
            row["scenario"], row["warmup_seconds"] = scenario, warmup
            row["versions_text"] = ", ".join(f"{f'v{v}' if v else 'unversioned'}: {n}"
                                             for v, n in sorted(row["versions"].items(), key=str))
            rows.append(row)
        after = await _get_json(session, f"{url}/version")
    return {"model": model, "model_after": after, "rows": rows, "skipped": skipped}


def alias_mover(tracking_uri: str, name: str, alias: str, version: str):
    """A function that points ``alias`` of ``name`` at ``version`` (for ``--switch-alias``)."""
    def move() -> None:
        from llmrec_dist.tracking import client

        client(tracking_uri).set_registered_model_alias(name, alias, str(version))
    return move

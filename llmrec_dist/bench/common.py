"""What every benchmark writes: one JSON file per benchmark with the dataset, config, git revision,
machine and figures, and a plain-text table on stdout. Benchmarks print figures; none asserts a time."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DEFAULT_OUT = "benchmarks/results"


def git_revision(cwd: str | os.PathLike | None = None) -> str:
    """``<commit>`` (``+dirty`` when the working tree has changes), or ``unknown`` outside git."""
    cwd = cwd or Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> dict[str, Any]:
    """The machine and software the figures were measured on."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("ray", "transformers", "mlflow", "pyarrow"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    memory = _memory_gib()
    return {"hostname": platform.node(), "os": platform.platform(), "cpu": _cpu_model(),
            "cores": os.cpu_count(), "memory_gib": round(memory, 1) if memory else None, "gpus": gpus,
            "versions": versions}


def describe_machine(info: dict) -> str:
    """One line: ``2-core Intel Xeon ..., 24 GiB, no GPU``."""
    gpu = ", ".join(info.get("gpus") or []) or "no GPU"
    memory = f", {info['memory_gib']:.0f} GiB" if info.get("memory_gib") else ""
    return f"{info.get('cores')}-core {info.get('cpu')}{memory}, {gpu}"


def dataset_info(path: str) -> dict[str, Any]:
    """The prepared dataset a benchmark ran on, as its manifest describes it (no raw data)."""
    from llmrec_dist.data.dataset_format import read_manifest

    manifest = read_manifest(path)
    source = manifest.get("source", {})
    return {"path": str(path), "source": source.get("type", ""), "variant": source.get("variant", ""),
            "content_hash": manifest.get("content_hash"), "counts": manifest.get("counts", {})}


def result_name(kind: str, label: str = "") -> str:
    """``speed`` or ``quality-ml1m-id``: the benchmark kind, then a label made safe for a file name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-.")
    return f"{kind}-{safe}" if safe else kind


def write_result(out_dir: str | os.PathLike, kind: str, *, config: Any, figures: dict, label: str = "",
                 dataset: dict | None = None, command: str = "", notes: list[str] | None = None) -> Path:
    """Write ``<out_dir>/<kind>[-<label>].json`` atomically and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = result_name(kind, label)
    payload = {
        "benchmark": kind,
        "label": label,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "machine": machine(),
        "command": command,
        "dataset": dataset,
        "config": config,
        "figures": figures,
        "notes": notes or [],
    }
    target = out / f"{name}.json"
    tmp = out / f".{name}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def read_results(out_dir: str | os.PathLike) -> dict[str, dict]:
    """Every ``<name>.json`` benchmark file in ``out_dir`` by name."""
    results = {}
    for path in sorted(Path(out_dir).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "benchmark" in data and "figures" in data:
            results[path.stem] = data
    return results


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Fixed-width text table: ``columns`` = (key, heading, format spec); missing values print ``-``."""
    cells = [[heading for _, heading, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def freq_ndcg_at_10(freq_buckets: list[int]) -> list[str]:
    """The test NDCG@10 keys of the training-frequency buckets ``eval.freq_buckets`` gives
    (``test_freq_0_ndcg_at_10``, ``test_freq_1_4_ndcg_at_10``, ...)."""
    from llmrec_dist.evaluation import freq_bucket_names

    return [f"test_freq_{name}_ndcg_at_10" for name in freq_bucket_names(freq_buckets)]


_FREQ_NDCG_AT_10 = re.compile(r"test_freq_(\w+?)_ndcg_at_10")


def freq_ndcg_keys(rows: list[dict]) -> list[tuple[str, str]]:
    """``(key, bucket label)`` of every per-training-frequency test NDCG@10 in ``rows``, in the order
    first seen: ``test_freq_1_4_ndcg_at_10`` → ``1-4``, ``test_freq_20_plus_ndcg_at_10`` → ``20+``."""
    keys = {}
    for row in rows:
        for key in row:
            if match := _FREQ_NDCG_AT_10.fullmatch(key):
                keys.setdefault(key, match.group(1).replace("_plus", "+").replace("_", "-"))
    return list(keys.items())


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def save_figure(fig, path: Path) -> Path:
    """Lay out, write to ``path`` (its folder made) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_run(tracking_uri: str, experiment: str, run_name: str, settings: dict, fill, files: list[Path]) -> str:
    """One MLflow run of a benchmark's summary: ``settings`` as params, ``fill(client, run_id)`` logs the
    figures, ``files`` (plot, JSON) as artifacts; marked FAILED if anything raises. Returns the run id."""
    from llmrec_dist.tracking import client, end_run, start_run

    run_id = start_run(tracking_uri, experiment, run_name=run_name)
    c = client(tracking_uri)
    try:
        for key, value in settings.items():
            c.log_param(run_id, key, str(value)[:500])
        fill(c, run_id)
        for file in files:
            c.log_artifact(run_id, str(file))
    except BaseException:
        end_run(tracking_uri, run_id, "FAILED")
        raise
    end_run(tracking_uri, run_id)
    return run_id

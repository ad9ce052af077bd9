"""Start-up under load: `llmrec-dist quickstart` on a quiet machine, then beside busy processes.

    llmrec-dist bench startup [--busy N] [section.key=value ...]

Each run is the quickstart in a fresh process and a fresh temporary folder (its own local Ray, dataset,
text-feature cache and MLflow store), so the second run reuses nothing of the first. The loaded run
first starts ``N`` busy-loop processes (default: one per core) at the niceness of this command (0 for a
normal shell) and stops them when the quickstart ends. Reported: each run's wall time, its start-up
(process start → first training step, as rank 0 logged it to MLflow), the loaded/quiet ratio of both,
and the lines each run printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLUMNS = [("run", "run", ""), ("busy", "busy processes", "d"), ("seconds", "wall s", ".0f"),
           ("startup_seconds", "start-up s", ".0f"), ("lines", "lines printed", "d"),
           ("returncode", "exit", "d")]
BUSY_LOOP = "while True:\n    pass\n"


def start_busy(n: int) -> list[subprocess.Popen]:
    """``n`` processes that each keep one core busy (plain Python loops)."""
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def quickstart_env() -> dict:
    """This environment without RAY_ADDRESS: every run starts (and stops) its own local Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def run_quickstart(folder: Path, overrides: list[str], timeout: float) -> dict:
    """One `llmrec-dist quickstart` in ``folder``: wall time, exit code, what it printed, its start-up."""
    cmd = [sys.executable, "-m", "llmrec_dist.cli", "quickstart", "--workdir", str(folder / "qs"), *overrides]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=folder, env=quickstart_env(), capture_output=True, text=True,
                              timeout=timeout)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = -1
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
    seconds = time.perf_counter() - started
    printed = [line for line in (out + err).splitlines()]
    row = {"seconds": seconds, "returncode": code, "lines": len(printed), "output": printed}
    row.update(startup_figures(folder / "qs", out))
    return row


def startup_figures(workdir: Path, stdout: str) -> dict:
    """Start-up figures rank 0 logged to the quickstart's MLflow store (empty when the run did not get
    that far)."""
    found = re.search(r"\(run ([0-9a-f]{32})\)", stdout)
    db = workdir / "mlflow.db"
    if not found or not db.is_file():
        return {}
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(f"sqlite:///{db}").get_run(found.group(1)).data.metrics
    keys = ("startup_seconds", "ray_init_to_first_step_seconds", "startup_ray_ready_at_s", "startup_loop_start_at_s")
    return {k: metrics[k] for k in keys if k in metrics}


def run_startup(busy: int | None = None, overrides: list[str] | None = None, timeout: float = 1800,
                echo=print) -> dict:
    """The quickstart quiet, then beside ``busy`` busy processes (default: one per core)."""
    busy = (os.cpu_count() or 1) if busy is None else busy
    overrides = list(overrides or [])
    rows = []
    for name, n in (("quiet", 0), ("loaded", busy)):
        echo(f"quickstart, {name}" + (f" ({n} busy processes at niceness {os.nice(0)})" if n else "") + " ...")
        with tempfile.TemporaryDirectory(prefix=f"llmrec-startup-{name}-") as tmp:
            procs = start_busy(n)
            try:
                row = run_quickstart(Path(tmp), overrides, timeout)
            finally:
                stop_busy(procs)
        rows.append({"run": name, "busy": n, **row})
        echo(f"  {row['seconds']:.0f} s, exit {row['returncode']}, {row['lines']} lines printed")
    quiet, loaded = rows
    figures = {"rows": rows, "busy": busy, "cores": os.cpu_count(), "niceness": os.nice(0),
               "overrides": overrides, "ratio": loaded["seconds"] / quiet["seconds"]}
    if quiet.get("startup_seconds") and loaded.get("startup_seconds"):
        figures["startup_ratio"] = loaded["startup_seconds"] / quiet["startup_seconds"]
    return figures

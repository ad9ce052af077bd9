"""`llmrec-dist bench startup`: its pieces (busy processes, the figures, the CLI) without running the
quickstart twice; one real, small run is behind the integration marker."""

from __future__ import annotations

import json
import os

import psutil
import pytest

from llmrec_dist.bench import startup
from llmrec_dist.cli import main as cli_main


def test_busy_processes_run_at_our_niceness_and_stop():
    procs = startup.start_busy(2)
    try:
        assert all(psutil.Process(p.pid).nice() == os.nice(0) for p in procs)
        assert all(p.poll() is None for p in procs)
    finally:
        startup.stop_busy(procs)
    assert all(p.poll() is not None for p in procs)


def test_run_startup_times_quiet_then_loaded(monkeypatch):
    seen = []

    def fake_run(folder, overrides, timeout):
        busy = [p for p in psutil.Process().children() if "while True" in " ".join(p.cmdline())]
        seen.append((len(busy), overrides))
        seconds = 100.0 if not busy else 150.0
        return {"seconds": seconds, "returncode": 0, "lines": 20, "output": ["line"] * 20,
                "startup_seconds": seconds / 2}

    monkeypatch.setattr(startup, "run_quickstart", fake_run)
    figures = startup.run_startup(busy=2, overrides=["train.epochs=1"], echo=lambda _: None)
    assert seen == [(0, ["train.epochs=1"]), (2, ["train.epochs=1"])]
    assert [r["run"] for r in figures["rows"]] == ["quiet", "loaded"]
    assert figures["ratio"] == pytest.approx(1.5) and figures["startup_ratio"] == pytest.approx(1.5)
    assert not [p for p in psutil.Process().children() if "while True" in " ".join(p.cmdline())]


def test_startup_figures_need_a_run(tmp_path):
    assert startup.startup_figures(tmp_path, "no run id here") == {}


def test_cli_prints_the_table_the_ratio_and_the_lines_and_writes_json(monkeypatch, tmp_path, capsys):
    rows = [{"run": "quiet", "busy": 0, "seconds": 80.0, "returncode": 0, "lines": 2, "output": ["a", "b"]},
            {"run": "loaded", "busy": 2, "seconds": 120.0, "returncode": 0, "lines": 2, "output": ["c", "d"]}]
    monkeypatch.setattr(startup, "run_startup", lambda busy, overrides, timeout: {
        "rows": rows, "busy": 2, "cores": 2, "niceness": 0, "overrides": overrides, "ratio": 1.5})
    assert cli_main(["bench", "startup", "--out", str(tmp_path), "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "loaded / quiet: wall time 1.50x (2 busy processes, 2 cores)" in out
    assert "--- loaded: 2 lines printed\nc\nd" in out
    data = json.loads((tmp_path / "startup.json").read_text())
    assert data["benchmark"] == "startup" and data["figures"]["ratio"] == 1.5
    assert data["config"] == {"overrides": ["train.epochs=1"]}


@pytest.mark.integration
@pytest.mark.slow
def test_a_real_startup_benchmark_runs(tmp_path):
    figures = startup.run_startup(busy=1, overrides=["model.item_repr=id", "train.epochs=1"], timeout=1200,
                                  echo=lambda _: None)
    for row in figures["rows"]:
        assert row["returncode"] == 0, "\n".join(row["output"][-20:])
        assert row["lines"] <= 40 and row["startup_seconds"] > 0
    assert figures["ratio"] > 0

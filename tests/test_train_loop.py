"""The per-worker training loop without Ray: gradient accumulation, clipping, precision, DDP options.
GPU-only checks (bf16 autocast on CUDA, pinned host memory) are marked ``gpu`` and skip without one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmrec_dist.batching import next_item_batch
from llmrec_dist.config import Config, ModelConfig, ScalingConfig, TrainConfig
from llmrec_dist.model import build_model
from llmrec_dist.worker.recipe import autocast_for, ddp_kwargs, train_one_epoch

MODEL = ModelConfig(hidden_size=16, num_heads=2, num_layers=1, max_len=8, dropout=0.0)
SEQS = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [2, 4, 6, 8, 1], [3, 5, 7, 9, 2]]  # equal lengths


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that records the global gradient norm it steps with."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.norms = []

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return super().step(closure)


def _run(batches, grad_accum=1, grad_clip=0.0, lr=0.1):
    torch.manual_seed(0)
    model = build_model(MODEL, 10)
    cfg = Config(model=MODEL, train=TrainConfig(grad_accum=grad_accum, grad_clip=grad_clip))
    opt = RecordingSGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    stats = train_one_epoch(model, batches, opt, sched, cfg, torch.device("cpu"),
                            autocast_for(cfg, torch.device("cpu")))
    return model, opt, stats


def test_accumulated_micro_batches_equal_one_big_batch():
    big, big_opt, big_stats = _run([next_item_batch(SEQS, MODEL.max_len)])
    halves = [next_item_batch(SEQS[:2], MODEL.max_len), next_item_batch(SEQS[2:], MODEL.max_len)]
    acc, acc_opt, acc_stats = _run(halves, grad_accum=2)
    assert len(big_opt.norms) == len(acc_opt.norms) == 1  # one optimiser step either way
    assert acc_opt.norms[0] == pytest.approx(big_opt.norms[0], rel=1e-5)
    for (name, a), (_, b) in zip(big.named_parameters(), acc.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert acc_stats["sequences"] == big_stats["sequences"] == 4
    assert acc_stats["loss_sum"] == pytest.approx(big_stats["loss_sum"], rel=1e-5)


def test_a_last_partial_accumulation_still_steps():
    thirds = [next_item_batch([s], MODEL.max_len) for s in SEQS[:3]]
    _, opt, _ = _run(thirds, grad_accum=2)
    assert len(opt.norms) == 2  # micro-batches 1+2, then the lone third


def test_gradient_clipping_caps_the_global_norm():
    batches = [next_item_batch(SEQS, MODEL.max_len)]
    _, free, _ = _run(batches, lr=0.0)
    _, clipped, _ = _run(batches, grad_clip=0.01, lr=0.0)
    assert free.norms[0] > 0.05
    assert clipped.norms[0] == pytest.approx(0.01, rel=1e-4)


def test_fp32_on_cpu_no_unused_parameter_search_no_buffer_broadcast():
    cfg = Config(scaling=ScalingConfig(use_gpu=True))  # even when asked for, autocast needs CUDA
    with autocast_for(cfg, torch.device("cpu"))():
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.float32
    assert ddp_kwargs(cfg) == {"find_unused_parameters": False, "broadcast_buffers": False}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_autocast_and_pinned_batches_on_gpu():
    device = torch.device("cuda")
    cfg = Config(model=MODEL, scaling=ScalingConfig(use_gpu=True))
    torch.manual_seed(0)
    model = build_model(MODEL, 10).to(device)
    seq, targets = next_item_batch(SEQS, MODEL.max_len)
    with autocast_for(cfg, device)():
        hidden = model.encode(seq.to(device))
        out = model(seq.to(device), targets.to(device))
    assert torch.isfinite(out["loss"])
    assert hidden.dtype == torch.bfloat16
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    stats = train_one_epoch(model, [(seq, targets)], opt, sched, dataclasses.replace(cfg), device,
                            autocast_for(cfg, device))
    assert stats["sequences"] == 4 and stats["loss_sum"] > 0

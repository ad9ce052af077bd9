"""Learning-rate schedules and the optimiser's parameter groups, by hand."""

import math

import pytest
import torch

from llmrec_dist.config import ConfigError, TrainConfig, config_from_dict
from llmrec_dist.worker.optim import build_optimizer, build_scheduler, warmup_then


def test_cosine_warms_up_then_decays_to_the_floor():
    f = warmup_then(total_steps=100, warmup_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    # halfway through the decay: 0.1 + 0.9 x 0.5 x (1 + cos(pi/2))
    assert f(55) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_constant_stays_at_the_peak_after_warm_up():
    f = warmup_then(total_steps=100, warmup_ratio=0.1, schedule="constant")
    assert [f(s) for s in (0, 9, 10, 55, 100, 10_000)] == pytest.approx([0.1, 1, 1, 1, 1, 1])


def test_unknown_schedule_names_the_key():
    with pytest.raises(ValueError, match="train.schedule"):
        warmup_then(10, 0.1, "linear")
    with pytest.raises(ConfigError, match="train.schedule"):
        config_from_dict({"train": {"schedule": "linear"}})


# warm-up is at least one step, so after 10 of 20 steps the decay is 9/19 of the way through
@pytest.mark.parametrize("schedule, expected", [("cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 19))),
                                                ("constant", 1.0)])
def test_scheduler_counts_steps_over_all_epochs(schedule, expected):
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(lr=1e-2, epochs=4, warmup_ratio=0.0, schedule=schedule)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=5)  # 20 steps in all
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * expected)

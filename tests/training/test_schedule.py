"""The learning-rate schedule: the first warm-up step already learns; hand-worked factors."""

from __future__ import annotations

import math

import pytest
import torch

from epsdpo.training.schedule import lr_factor, make_scheduler, warmup_steps


def test_warmup_length():
    assert warmup_steps(12, 0, 0.1) == 2 and warmup_steps(12, 3, 0.1) == 3 and warmup_steps(12, 0, 0.0) == 0


def test_factors_by_hand():
    # 10 steps, 2 of warm-up: 1/3, 2/3, then cosine over 8 steps from 1
    got = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    want = [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert got == pytest.approx(want)
    assert got[-1] > 0  # the last step still learns
    assert [lr_factor(s, 6, 2, "linear") for s in range(2, 6)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lr_factor(5, 6, 2, "constant") == 1.0 and lr_factor(0, 6, 2, "constant_with_warmup") == pytest.approx(1 / 3)
    assert lr_factor(0, 6, 0, "cosine") == 1.0
    with pytest.raises(ValueError, match="unknown lr_scheduler_type"):
        make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "poly", 6, 1)


def test_the_first_optimizer_step_changes_the_model():
    """With Hugging Face's warm-up the first step has learning rate 0; here it moves the parameter."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.3)
    sched = make_scheduler(opt, "cosine", 12, warmup_steps(12, 0, 0.1))  # 2 warm-up steps
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    p.grad = torch.ones(1)
    opt.step()
    sched.step()
    assert float(p.detach()) == pytest.approx(-0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    state = sched.state_dict()
    again = make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3), "cosine", 12, 2)
    again.load_state_dict(state)
    assert again.last_epoch == sched.last_epoch

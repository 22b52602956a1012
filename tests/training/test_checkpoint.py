"""Checkpoint I/O (training/checkpoint.py) on a two-layer module: atomic writes, round trips, rotation, resume."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from epsdpo.training.checkpoint import (
    STATE_FILE,
    checkpoint_dirs,
    load_checkpoint,
    read_local_weights,
    resolve_resume,
    save_checkpoint,
    trainable_state,
    write_local_weights,
)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many causal LMs
        self.norm = nn.LayerNorm(3)
        self.register_buffer("scale", torch.tensor(2.0))


def pieces(seed: int = 0):
    torch.manual_seed(seed)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    return model, optimizer, scheduler


def one_update(model: nn.Module, optimizer, scheduler) -> None:
    model.head(model.embed(torch.tensor([1, 2]))).sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def save(tmp_path, step, model, optimizer, scheduler, limit=None, **state):
    return save_checkpoint(
        tmp_path,
        step,
        rank=0,
        barrier=lambda: None,
        write_weights=lambda d: write_local_weights(d, model, True, optimizer),
        scheduler=scheduler,
        trainer_state={"global_step": step, **state},
        save_total_limit=limit,
    )


def test_trainable_state_lists_a_tied_tensor_once_and_lora_style_only_trainable():
    model, _, _ = pieces()
    full = trainable_state(model, full=True)
    assert "embed.weight" in full and "head.weight" not in full and "scale" in full
    model.norm.requires_grad_(False)
    partial = trainable_state(model, full=False)
    assert set(partial) == {"embed.weight"}


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = pieces()
    one_update(model, optimizer, scheduler)
    random.seed(7)
    torch.manual_seed(7)
    path = save(tmp_path, 1, model, optimizer, scheduler, beta=0.09)
    expected_draw, expected_py = torch.rand(3), random.random()
    one_update(model, optimizer, scheduler)  # what the resumed run must reproduce
    after = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fresh_opt, fresh_sched = pieces(seed=1)
    state = load_checkpoint(
        path, rank=0, read_weights=lambda d: read_local_weights(d, fresh, fresh_opt), scheduler=fresh_sched
    )
    assert state == {"global_step": 1, "beta": 0.09}
    assert torch.equal(torch.rand(3), expected_draw) and random.random() == expected_py
    one_update(fresh, fresh_opt, fresh_sched)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, after[k]), k
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()


def test_rotation_keeps_the_newest_and_an_unfinished_checkpoint_does_not_count(tmp_path):
    model, optimizer, scheduler = pieces()
    for step in (1, 2, 3):
        save(tmp_path, step, model, optimizer, scheduler, limit=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    (tmp_path / "checkpoint-9").mkdir()  # no trainer_state.json: a copy that never finished
    assert resolve_resume("auto", tmp_path).name == "checkpoint-3"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)
    assert resolve_resume(None, tmp_path) is None and resolve_resume("auto", tmp_path / "none") is None
    assert not list(tmp_path.glob(".checkpoint-*.partial"))
    assert json.loads((tmp_path / "checkpoint-3" / STATE_FILE).read_text())["global_step"] == 3


def test_a_checkpoint_of_more_processes_names_the_missing_rng_file(tmp_path):
    model, optimizer, scheduler = pieces()
    path = save(tmp_path, 1, model, optimizer, scheduler, world_size=1)
    with pytest.raises(FileNotFoundError, match="rng_state_1.pt is missing"):
        load_checkpoint(path, rank=1, read_weights=lambda d: None, scheduler=scheduler)

"""Checkpoint I/O (training/checkpoint.py) on a two-layer module: atomic writes, round trips, rotation, resume."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from epsdpo.control import BetaController
from epsdpo.training.checkpoint import (
    STATE_FILE,
    CheckpointError,
    check_checkpoint,
    checkpoint_dirs,
    checkpoint_problem,
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


def test_a_checkpoint_of_fewer_processes_says_so(tmp_path):
    model, optimizer, scheduler = pieces()
    path = save(tmp_path, 1, model, optimizer, scheduler, world_size=1)
    with pytest.raises(CheckpointError, match="written by 1 process.*has no rng_state_1.pt.*same number of processes"):
        load_checkpoint(path, rank=1, read_weights=lambda d: None, scheduler=scheduler)


def whole_state(step: int) -> dict:
    """A trainer state as the loop writes it."""
    controller = BetaController(0.1, 0.01).state_dict()
    return {"epoch": 0, "window": step, "world_size": 1, "global_batch": 4, "beta_controller": controller}


def cut(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_state(name: str, value):
    def apply(checkpoint):
        state = json.loads((checkpoint / STATE_FILE).read_text())
        if name == "controller-without-beta":
            del state["beta_controller"]["beta"]
        else:
            state["beta_controller"][name] = value
        (checkpoint / STATE_FILE).write_text(json.dumps(state))

    return apply


#: each damage the probe of issue #35 made, and the words that name it
DAMAGE = {
    "truncated optimizer": (lambda c: cut(c / "optimizer.pt"), "optimizer.pt is cut short"),
    "truncated weights": (lambda c: cut(c / "model.safetensors"), "model.safetensors is"),
    "truncated trainer state": (lambda c: cut(c / STATE_FILE), f"{STATE_FILE} is not valid JSON"),
    "truncated scheduler": (lambda c: cut(c / "scheduler.pt", 0.9), "scheduler.pt is cut short"),
    "deleted rng file": (lambda c: (c / "rng_state_0.pt").unlink(), "rng_state_0.pt is missing"),
    "missing controller key": (edit_state("controller-without-beta", None), "the β controller's state lacks ['beta']"),
    "negative beta": (edit_state("beta", -0.5), "β is -0.5; β must be a finite number > 0"),
    "nan beta": (edit_state("beta", float("nan")), "β is nan"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_named_with_the_newest_intact_one(tmp_path, damage):
    model, optimizer, scheduler = pieces()
    for step in (1, 2, 3):
        one_update(model, optimizer, scheduler)
        save(tmp_path, step, model, optimizer, scheduler, **whole_state(step))
    assert [checkpoint_problem(p) for p in checkpoint_dirs(tmp_path)] == [None, None, None]
    damage_it, words = DAMAGE[damage]
    damage_it(tmp_path / "checkpoint-3")
    assert words in checkpoint_problem(tmp_path / "checkpoint-3")
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(tmp_path / "checkpoint-3", world_size=1)
    message = str(err.value)
    assert words in message and f"resume_from_checkpoint={tmp_path / 'checkpoint-2'}" in message, message
    assert check_checkpoint(tmp_path / "checkpoint-2", world_size=1)["global_step"] == 2


def test_a_checkpoint_that_fails_to_load_is_named_with_the_newest_intact_one(tmp_path):
    """A file whose framing is whole but whose content is not (here: the weights of another model)."""
    model, optimizer, scheduler = pieces()
    for step in (1, 2):
        save(tmp_path, step, model, optimizer, scheduler, **whole_state(step))
    other = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="loading it failed.*newest intact checkpoint is .*checkpoint-1"):
        load_checkpoint(
            tmp_path / "checkpoint-2",
            rank=0,
            read_weights=lambda d: read_local_weights(d, other, torch.optim.AdamW(other.parameters())),
            scheduler=scheduler,
        )


def test_with_no_intact_checkpoint_left_the_message_says_to_start_again(tmp_path):
    model, optimizer, scheduler = pieces()
    save(tmp_path, 1, model, optimizer, scheduler, **whole_state(1))
    cut(tmp_path / "checkpoint-1" / "optimizer.pt")
    with pytest.raises(CheckpointError, match="No intact checkpoint is left"):
        check_checkpoint(tmp_path / "checkpoint-1", world_size=1)


def test_a_checkpoint_of_another_process_count_is_refused_before_loading(tmp_path):
    model, optimizer, scheduler = pieces()
    save(tmp_path, 1, model, optimizer, scheduler, **whole_state(1))
    with pytest.raises(CheckpointError, match="written by 1 process.*now 2"):
        check_checkpoint(tmp_path / "checkpoint-1", world_size=2)

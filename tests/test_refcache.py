"""The reference hidden-state cache reproduces the live reference, trains like it, and is never used stale."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from epsdpo.logps import perturbed_logps
from epsdpo.logps.heads import reference_side
from epsdpo.recipes.train import prepare_run, train
from epsdpo.training import load_run_config
from epsdpo.training.loop import Trainer
from epsdpo.training.metrics import read_metrics
from epsdpo.training.refcache import compute_reference_hidden, load_cache, save_cache

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"


def tiny(tmp_path: Path, name: str, *overrides: str):
    return load_run_config(
        TINY,
        [
            f"output_dir={tmp_path / name}",
            f"dataset={DATA}",
            "disable_tqdm=true",
            "plot_after_training=false",
            f"ref_cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    return prepare_run(tiny(tmp_path_factory.mktemp("refcache"), "run", "max_steps=1")).trainer


def _live_and_cached(trainer: Trainer, pairs: list, cache_batch: int):
    reference = trainer.models.reference
    cache = compute_reference_hidden(reference, trainer.train_pairs[:8], trainer.collate, cache_batch)
    batch = trainer.collate(pairs)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    mask = batch["completion_mask"][:, 1:]
    live = reference_side(reference, ids, attention, fused=True)
    cached = cache.side(pairs, mask, live.weight, live.bias)
    return live, cached, ids[:, 1:], mask


def test_cached_hidden_states_are_the_live_ones_on_the_same_batches(trainer: Trainer) -> None:
    pairs = trainer.train_pairs[:4]
    live, cached, labels, mask = _live_and_cached(trainer, pairs, cache_batch=4)
    where = mask.bool()
    assert torch.equal(cached.hidden[where], live.hidden[where])  # bit for bit
    assert not cached.hidden[~where].any()  # nothing is stored for prompt and padding positions
    policy = torch.randn(*labels.shape, live.weight.shape[0])
    a = perturbed_logps(policy, live, labels, mask, 0.01)
    b = perturbed_logps(policy, cached, labels, mask, 0.01)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_other_batching_differs_only_by_rounding(trainer: Trainer) -> None:
    pairs = trainer.train_pairs[2:6]
    live, cached, labels, mask = _live_and_cached(trainer, pairs, cache_batch=3)
    where = mask.bool()
    torch.testing.assert_close(cached.hidden[where], live.hidden[where], rtol=1e-5, atol=1e-5)


def test_round_trip_on_disk_and_stale_use_is_refused(trainer: Trainer, tmp_path: Path) -> None:
    pairs = trainer.train_pairs[:4]
    cache = compute_reference_hidden(trainer.models.reference, pairs, trainer.collate, 2)
    save_cache(cache, tmp_path / "c.safetensors", "tiny")
    again = load_cache(tmp_path / "c.safetensors")
    assert torch.equal(again.hidden, cache.hidden) and again.table == cache.table
    assert again.hidden.shape[0] == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    batch = trainer.collate(pairs)
    mask = batch["completion_mask"][:, 1:]
    weight = torch.zeros(3, again.hidden.shape[1])
    with pytest.raises(KeyError, match="no pair for source row"):
        again.side(
            trainer.train_pairs[4:6], trainer.collate(trainer.train_pairs[4:6])["completion_mask"][:, 1:], weight, None
        )
    longer = replace(pairs[0], chosen_ids=[*pairs[0].chosen_ids, 5])
    batch = trainer.collate([longer, *pairs[1:]])
    with pytest.raises(ValueError, match="stale cache"):
        again.side([longer, *pairs[1:]], batch["completion_mask"][:, 1:], weight, None)
    del mask


def test_training_with_the_cache_matches_the_live_reference(tmp_path: Path) -> None:
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(DATA.read_text().splitlines(keepends=True)[:10]))
    steps = ["max_steps=4", "save_steps=0", "eval_steps=2", "per_device_eval_batch_size=4", f"eval_dataset={held_out}"]
    live = train(tiny(tmp_path, "live", *steps))
    cached = train(tiny(tmp_path, "cached", *steps, "precompute_ref_hidden_states=true"))
    files = sorted((tmp_path / "cache").glob("ref_hidden-*.safetensors"))
    assert len(files) == 2  # train and eval pairs (different data, so different files)
    a, b = read_metrics(live.output_dir / "metrics.jsonl"), read_metrics(cached.output_dir / "metrics.jsonl")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if key.startswith("kl/steps") or key == "step":
                assert x[key] == y[key], key  # the same decisions
            elif key != "tokens_per_second":
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
    # a second run reads the cache instead of computing it (its file is not rewritten)
    stamps = [f.stat().st_mtime_ns for f in files]
    trainer = prepare_run(tiny(tmp_path, "again", *steps, "precompute_ref_hidden_states=true")).trainer
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert trainer.models.reference is None  # the frozen copy is released


def test_cache_is_refused_where_the_reference_moves(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be used with sync_ref_model"):
        tiny(tmp_path, "x", "precompute_ref_hidden_states=true", "sync_ref_model=true")

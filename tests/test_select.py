"""Alignment-potential selection: hand-computed scores, deterministic ties, the margin cache, the verb, training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from epsdpo.cli import main as cli_main
from epsdpo.data import PreferenceCollator, TokenizedPair, load_preference_dataset
from epsdpo.data.config import DataConfig
from epsdpo.recipes.train import train
from epsdpo.stages.select import (
    implicit_margins,
    mean_token_logps,
    select_pairs,
    selection_scores,
    top_fraction,
    zscore,
)
from epsdpo.training import load_run_config
from epsdpo.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"


def pair(index: int, score_chosen: float | None = None, score_rejected: float | None = None) -> TokenizedPair:
    return TokenizedPair([1, 2], [3 + index % 5, 9], [4 + index % 3, 9], score_chosen, score_rejected, index)


def test_zscore_hand_values():
    assert zscore([1.0, 2.0, 3.0]) == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert zscore([2.0, 2.0]) == [0.0, 0.0]


def test_alignment_potential_matches_a_hand_computation():
    explicit = [3.0, 1.0, 2.0, 2.0, 0.0]
    implicit = [0.5, 0.1, 0.5, 0.3, 0.2]
    # z(m_ex): mean 1.6, population std sqrt(1.04)
    s_ex = math.sqrt(((3 - 1.6) ** 2 + (1 - 1.6) ** 2 + 2 * (2 - 1.6) ** 2 + 1.6**2) / 5)
    z_ex = [(e - 1.6) / s_ex for e in explicit]
    s_im = math.sqrt(sum((i - 0.32) ** 2 for i in implicit) / 5)
    z_im = [(i - 0.32) / s_im for i in implicit]
    expected = [e - 1.0 * i for e, i in zip(z_ex, z_im, strict=True)]
    scores = selection_scores("alignment_potential", explicit, implicit)
    assert scores == pytest.approx(expected)
    # ranking: pair 0 (3.0, 0.5) → 1.373 − 1.091 = 0.28; pair 3 (2.0, 0.3) → 0.392 + 0.121 = 0.51 → best
    assert top_fraction(scores, 5, 0.4) == sorted(sorted(range(5), key=lambda i: -expected[i])[:2])
    assert selection_scores("explicit", explicit, implicit) == pytest.approx(z_ex)
    assert selection_scores("implicit", explicit, implicit) == pytest.approx([-z for z in z_im])
    assert selection_scores("alignment_potential", explicit, implicit, implicit_weight=0.0) == pytest.approx(z_ex)


def test_top_k_ties_are_deterministic_and_random_is_seeded():
    assert top_fraction([1.0, 2.0, 2.0, 2.0, 0.0], 5, 0.4) == [1, 2]  # ⌈0.4·5⌉ = 2; ties: lower position first
    assert top_fraction([5.0] * 7, 7, 0.3) == [0, 1, 2]
    a, b = top_fraction(None, 100, 0.4, seed=3), top_fraction(None, 100, 0.4, seed=3)
    assert a == b and len(a) == 40 and a != top_fraction(None, 100, 0.4, seed=4)
    with pytest.raises(ValueError, match="select_ratio"):
        top_fraction([1.0], 1, 0.0)


def test_explicit_margins_come_from_score_columns_and_missing_scores_are_errors():
    sel = select_pairs("explicit", [pair(0, 1.0, 0.0), pair(1, 5.0, 1.0), pair(2, 0.5, 0.4)], 0.3)
    assert sel.explicit == pytest.approx([1.0, 4.0, 0.1]) and sel.kept == [1]
    with pytest.raises(ValueError, match="row 1 has no scores"):
        select_pairs("explicit", [pair(0, 1.0, 0.0), pair(1)], 0.5)
    with pytest.raises(ValueError, match="needs explicit margins"):
        select_pairs("alignment_potential", [pair(0), pair(1)], 0.5, implicit=[0.1, 0.2])


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config)


def test_implicit_margins_by_hand_and_from_the_cache(tmp_path):
    model = tiny_model()
    pairs = [pair(i) for i in range(5)]
    collate = PreferenceCollator(pad_token_id=0)
    margins, cached = implicit_margins(model, "tiny", pairs, collate, tmp_path, batch_size=2)
    assert not cached
    with torch.no_grad():  # one pair by hand: mean-token log-probs of each completion
        p = pairs[3]
        hand = []
        for completion in (p.chosen_ids, p.rejected_ids):
            ids = torch.tensor([p.prompt_ids + completion])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            token = logp[torch.arange(len(targets)), targets][len(p.prompt_ids) - 1 :]
            hand.append(token.mean().item())
    assert margins[3] == pytest.approx(abs(hand[0] - hand[1]), rel=1e-5)

    class Exploding(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the cache should have answered")

    again, cached = implicit_margins(Exploding(), "tiny", pairs, collate, tmp_path)
    assert cached and again == margins
    _, cached = implicit_margins(model, "another-model", pairs, collate, tmp_path)  # the key includes the model
    assert not cached
    chosen, rejected = mean_token_logps(model, pairs[:2], collate)
    assert len(chosen) == len(rejected) == 2


@pytest.mark.slow
def test_select_verb_writes_the_selected_dataset_scores_and_histogram(tmp_path, capsys):
    out = tmp_path / "sel"
    code = cli_main(
        ["select", str(TINY), f"dataset={DATA}", f"select_cache_dir={tmp_path / 'cache'}", "--out", str(out)]
    )
    assert code == 0, capsys.readouterr()
    rows = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert len(rows) == math.ceil(0.4 * 64)
    scores = [json.loads(line) for line in (out / "selection_scores.jsonl").read_text().splitlines()]
    assert len(scores) == 64 and sum(r["selected"] for r in scores) == 26
    # the tiny data has equal explicit margins (1 − 0), so alignment potential ranks by the implicit margin alone
    kept = [r["implicit_margin"] for r in scores if r["selected"]]
    dropped = [r["implicit_margin"] for r in scores if not r["selected"]]
    assert max(kept) <= min(dropped)
    assert (out / "selection_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pairs, _ = load_preference_dataset(DataConfig(dataset=str(out / "selected.jsonl")), _tokenizer())
    assert len(pairs) == 26


def _tokenizer():
    from epsdpo.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.mark.slow
def test_selection_as_a_training_data_option(tmp_path):
    cfg = load_run_config(
        TINY,
        [
            f"output_dir={tmp_path / 'run'}",
            f"dataset={DATA}",
            "disable_tqdm=true",
            "selection=random",
            "select_ratio=0.5",
            "max_steps=2",
            "save_steps=0",
        ],
    )
    result = train(cfg)
    scores = [json.loads(line) for line in (result.output_dir / "selection_scores.jsonl").read_text().splitlines()]
    assert sum(r["selected"] for r in scores) == 32
    # 32 pairs in batches of 4: 8 steps per epoch
    assert read_metrics(result.output_dir / "metrics.jsonl")[0]["epoch"] == pytest.approx(1 / 8)


def test_reference_identity_follows_ref_model_even_for_a_random_policy():
    from epsdpo.models import model_identity, reference_identity
    from epsdpo.training.config import ModelConfig

    arch = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2}  # a model transformers can build
    assert reference_identity(ModelConfig(model="x", model_config=arch), 3) == model_identity("x", arch, 3)
    with_ref = ModelConfig(model="x", model_config=arch, ref_model="some/hub-id")
    assert reference_identity(with_ref, 3) == model_identity("some/hub-id") != model_identity("x", arch, 3)


# ---- explicit margins from several scores -------------------------------------------------------------------------
def test_several_scores_give_a_max_minus_min_explicit_margin(smollm2_tokenizer):
    from epsdpo.data import DataError

    rows = [
        {"prompt": "q0", "chosen": "good", "rejected": "bad", "all": [0.1, 0.9, -0.3, 0.4]},  # k = 4: 0.9 − (−0.3)
        {"prompt": "q1", "chosen": "fine", "rejected": "poor", "all": [0.5, 0.2]},  # k = 2: [chosen, rejected]
        {"prompt": "q2", "chosen": "nice", "rejected": "awful", "all": {"chosen": 2.0, "rejected": -1.0}},
        {"prompt": "q3", "chosen": "yes", "rejected": "no", "all": [1, 1, 1]},  # equal scores: margin 0
    ]
    pairs, _ = load_preference_dataset(rows, smollm2_tokenizer, config=DataConfig(scores_column="all"))
    assert [p.explicit_margin for p in pairs] == pytest.approx([1.2, 0.3, 3.0, 0.0])
    assert pairs[0].score_chosen is None and pairs[0].score_margin == pytest.approx(
        1.2
    )  # which one was chosen: unknown
    assert (pairs[1].score_chosen, pairs[1].score_rejected, pairs[1].score_margin) == (0.5, 0.2, None)
    selection = select_pairs("explicit", pairs, 0.5)
    assert selection.explicit == pytest.approx([1.2, 0.3, 3.0, 0.0]) and selection.kept == [0, 2]
    for bad, column in (([0.3], "all"), ([0.1, "x", 0.2], "all[1]"), ([0.1, float("inf"), 0.0], "all[1]")):
        with pytest.raises(DataError) as caught:
            load_preference_dataset(
                [{**rows[0], "all": bad}], smollm2_tokenizer, config=DataConfig(scores_column="all")
            )
        assert caught.value.reason == "bad_score" and caught.value.column == column


def test_generated_rows_chosen_minus_rejected_is_the_spread_of_all_scores(smollm2_tokenizer):
    """``epsdpo generate`` keeps best vs worst: its score columns already give max − min of the k scores."""
    row = {
        "prompt": "q",
        "chosen": "best",
        "rejected": "worst",
        "score_chosen": 0.8,
        "score_rejected": -0.4,
        "scores": [0.1, 0.8, -0.4, 0.0],
    }
    (by_columns,), _ = load_preference_dataset([row], smollm2_tokenizer)
    (by_list,), _ = load_preference_dataset(
        [{k: v for k, v in row.items() if not k.startswith("score_")}],
        smollm2_tokenizer,
        config=DataConfig(scores_column="scores"),
    )
    assert by_columns.explicit_margin == pytest.approx(by_list.explicit_margin) == pytest.approx(1.2)


# ---- implicit margins under π₀, not under a separate reference ----------------------------------------------------
@pytest.mark.slow
def test_implicit_margins_are_the_initial_policys_even_with_a_separate_ref_model(tmp_path, smollm2_tokenizer):
    from epsdpo.models import build_from_config
    from epsdpo.recipes.train import prepare_run

    cfg = load_run_config(TINY, [f"dataset={DATA}"])
    arch, vocab = cfg.models.model_config, len(smollm2_tokenizer)
    other = build_from_config(arch, vocab, seed=123)  # a different model as the training reference
    other.save_pretrained(tmp_path / "ref")
    smollm2_tokenizer.save_pretrained(tmp_path / "ref")
    cfg = load_run_config(
        TINY,
        [
            f"dataset={DATA}",
            f"output_dir={tmp_path / 'run'}",
            f"ref_model={tmp_path / 'ref'}",
            "selection=implicit",
            f"select_cache_dir={tmp_path / 'cache'}",
            "disable_tqdm=true",
            "max_steps=1",
        ],
    )
    prepare_run(cfg)
    recorded = [json.loads(line)["implicit_margin"] for line in (tmp_path / "run" / "selection_scores.jsonl").open()]
    pairs, _ = load_preference_dataset(DATA, smollm2_tokenizer, config=cfg.data)
    collate = PreferenceCollator(smollm2_tokenizer.pad_token_id)
    initial = build_from_config(arch, vocab, seed=cfg.train.seed)
    under_initial, _ = implicit_margins(initial, "π0", pairs, collate, None)
    under_reference, _ = implicit_margins(other, "ref", pairs, collate, None)
    assert recorded == pytest.approx(under_initial, rel=1e-5, abs=1e-7)
    assert recorded != pytest.approx(under_reference, rel=1e-3)


# ---- the margins cache under concurrent writers --------------------------------------------------------------------
def _write_many(path: str, tag: int, times: int) -> None:
    from epsdpo.files import write_text_atomically  # how implicit_margins writes the cache

    for i in range(times):
        write_text_atomically(Path(path), json.dumps({"writer": tag, "i": i, "margins": [float(tag)] * 200}))


def test_two_processes_writing_the_same_margins_cache_never_clash(tmp_path):
    import multiprocessing

    path = tmp_path / "implicit_margins-key.json"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_write_many, args=(str(path), tag, 400)) for tag in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]  # a shared temporary name fails here: one renames the other's
    record = json.loads(path.read_text())
    assert record["i"] == 399 and record["margins"] == [float(record["writer"])] * 200
    assert not list(tmp_path.glob("*.partial"))


# ---- selection's memory: chunked like training, never the (2B, T, V) logits ----------------------------------------
class PeakTensorMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensor storage alive at once (peak) while active: every op's outputs are counted until freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: list[Any] = []
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.live or storage.nbytes() == 0:
                    continue
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                self.refs.append(weakref.ref(storage, lambda _, k=key: self._free(k)))
        return out


def test_selection_memory_is_bounded_like_trainings_chunked_path(monkeypatch):
    from epsdpo.logps import chunked, vocab
    from epsdpo.logps.heads import completion_logps

    monkeypatch.setattr(chunked, "DEFAULT_CHUNK_ELEMENTS", 1 << 20)  # 32 tokens per (chunk, V) block at V = 32768
    # the eager vocabulary pass for both: torch.compile traces nothing under the dispatch mode that counts memory
    monkeypatch.setattr(vocab, "COMPILE_MIN_VOCAB", 1 << 30)
    vocab = 32768
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    pairs = [
        TokenizedPair(
            torch.randint(1, vocab, (16,), generator=gen).tolist(),
            torch.randint(1, vocab, (60,), generator=gen).tolist(),
            torch.randint(1, vocab, (56,), generator=gen).tolist(),
            None,
            None,
            i,
        )
        for i in range(8)
    ]
    collate = PreferenceCollator(pad_token_id=0)
    full_logits = 2 * 8 * (16 + 60) * vocab * 4  # bytes of the (2B, T, V) float32 logits: 156 MiB
    with PeakTensorMemory() as selection:
        mean_token_logps(model, pairs, collate, batch_size=8)
    batch = collate(pairs)
    with PeakTensorMemory() as training, torch.no_grad():  # training's reference side on the same batch
        ids, attention = batch["input_ids"], batch["attention_mask"]
        completion_logps(model, ids, attention, ids[:, 1:], batch["completion_mask"][:, 1:], fused=True)
    block = 32 * vocab * 4  # one (chunk, V) float32 buffer: 4 MiB
    assert training.peak < 8 * block < full_logits / 4
    assert selection.peak <= 1.1 * training.peak + (1 << 20), (selection.peak, training.peak)

"""`epsdpo generate`: per-row sampling streams, valid loadable rows with the real VADER reward, exact resume."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from epsdpo.cli import main as cli_main
from epsdpo.config import ConfigError
from epsdpo.data import load_preference_dataset
from epsdpo.files import read_jsonl_resumable
from epsdpo.sampling import encode_prompt, sample_next_tokens, sample_seed
from epsdpo.stages.generate import generate, make_row

HOOKS = """
CRASH_AT_CALL = None
calls = 0


def length(prompts, responses):
    global calls
    calls += 1
    if CRASH_AT_CALL is not None and calls >= CRASH_AT_CALL:
        raise RuntimeError("simulated crash")
    return [float(len(r)) for r in responses]


def constant(prompts, responses):
    return [0.0 for _ in responses]
"""


@pytest.fixture
def hooks(tmp_path, monkeypatch):
    """A throwaway reward-hook module on sys.path (``gen_hooks:length`` crashes on call CRASH_AT_CALL)."""
    (tmp_path / "gen_hooks.py").write_text(textwrap.dedent(HOOKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gen_hooks", raising=False)
    import gen_hooks

    yield gen_hooks
    sys.modules.pop("gen_hooks", None)


def settings(model_dir: Path, output: Path, *extra: str) -> list[str]:
    return [
        f"model={model_dir}",
        f"output={output}",
        "prompts=bundled",
        "prompt_split=train",
        "num_samples=3",
        "max_new_tokens=8",
        "batch_size=2",
        "max_prompts=6",
        "disable_tqdm=true",
        *extra,
    ]


# ---- sampling -----------------------------------------------------------------------------------------------------
def test_each_row_draws_from_its_own_stream_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    seeds = [sample_seed(0, f"p{i}", 0) for i in range(5)]
    together = sample_next_tokens(logits, [torch.Generator().manual_seed(s) for s in seeds])
    alone = [int(sample_next_tokens(logits[i : i + 1], [torch.Generator().manual_seed(seeds[i])])) for i in range(5)]
    assert together.tolist() == alone
    reordered = sample_next_tokens(logits.flip(0), [torch.Generator().manual_seed(s) for s in reversed(seeds)])
    assert reordered.flip(0).tolist() == alone


def test_sampling_follows_the_distribution_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    many = logits.expand(4000, 4)
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    draws = sample_next_tokens(many, generators)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    # top_p = 0.7: the nucleus is {0, 1} (0.5 < 0.7 ≤ 0.8), renormalised to 5/8, 3/8
    nucleus = sample_next_tokens(many, generators, top_p=0.7)
    g = generators[0]
    assert set(nucleus.tolist()) == {0, 1}
    assert (nucleus == 0).float().mean() == pytest.approx(0.625, abs=0.03)
    # a tiny top_p is greedy, and so is a tiny temperature
    assert sample_next_tokens(logits, [g], top_p=1e-6).item() == 0
    assert sample_next_tokens(logits, [g], temperature=1e-4).item() == 0


def test_the_samplers_log_probs_are_the_scoring_pass_s():
    """log π of a sample kept by the sampler (temperature 1, no top-p) equals a separate scoring pass of the same
    (prompt, completion) within float32 rounding: the end token counted when it was drawn, nothing after it, left
    padding and rows that ran to max_new_tokens included; tempered sampling refuses to keep them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from epsdpo.logps.scoring import row_logps
    from epsdpo.sampling import sample_completions

    torch.manual_seed(0)
    vocab = 50
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    prompts = [[5, 9, 11], [7], [3, 4, 5, 6, 8, 9, 10], [12, 13]] * 3  # uneven: left padding in the batch
    ends = [1, 2, 3, 4, 5]  # a tenth of the vocabulary: some rows end early, some run to the limit
    done = sample_completions(
        model, prompts, list(range(len(prompts))), max_new_tokens=9, end_ids=ends, pad_id=0, with_logps=True
    )
    assert {c.finished for c in done} == {True, False} and any(len(c.ids) < 9 for c in done)
    scored = row_logps(model, [(p, c.ids) for p, c in zip(prompts, done, strict=True)], 0, kernel="eager")
    sampled = torch.tensor([c.logp for c in done])
    torch.testing.assert_close(sampled, scored, rtol=1e-5, atol=2e-5)
    again = sample_completions(model, prompts, list(range(len(prompts))), max_new_tokens=9, end_ids=ends, pad_id=0)
    assert again == done and all(c.logp is None for c in again)  # the same draws; nothing kept unless asked
    with pytest.raises(ValueError, match="temperature=1 and top_p=1"):
        sample_completions(
            model, prompts, [0] * 12, max_new_tokens=2, end_ids=ends, pad_id=0, top_p=0.9, with_logps=True
        )


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "review-001", 0) == sample_seed(0, "review-001", 0)
    values = {sample_seed(s, p, j) for s in (0, 1) for p in ("a", "b") for j in range(3)}
    assert len(values) == 12 and all(0 <= v < 2**63 for v in values)


def test_prompt_encoding_matches_the_data_pipeline(smollm2_tokenizer, bos_tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "Hello there"}],
        "chosen": [{"role": "assistant", "content": "Hi"}],
        "rejected": [{"role": "assistant", "content": "Go"}],
    }
    for tokenizer in (smollm2_tokenizer, bos_tokenizer):
        (pair,), _ = load_preference_dataset([row], tokenizer, warn=False)
        assert encode_prompt(tokenizer, "Hello there", True) == pair.prompt_ids
        standard = {"prompt": "Hello there", "chosen": "Hi", "rejected": "Go"}
        (plain,), _ = load_preference_dataset([standard], tokenizer, warn=False)
        assert encode_prompt(tokenizer, "Hello there", False) == plain.prompt_ids


def test_make_row_picks_best_and_worst_and_skips_what_cannot_be_trained_on():
    row, reason = make_row("p", "x", ["a", "", "c", "d"], [0.1, 0.9, 0.5, 0.1], [True] * 4, conversational=False)
    assert reason is None and row is not None
    assert (row["chosen"], row["rejected"], row["score_chosen"], row["score_rejected"]) == ("c", "a", 0.5, 0.1)
    assert make_row("p", "x", ["a", "b"], [0.2, 0.2], [True] * 2, False) == (None, "tied_scores")
    assert make_row("p", "x", ["a", ""], [0.2, 0.3], [True] * 2, False) == (None, "fewer_than_two_nonempty")
    assert make_row("p", "x", ["a", "a"], [0.2, 0.3], [True] * 2, False) == (None, "identical_texts")
    chat, _ = make_row("p", "x", ["a", "b"], [0.0, 1.0], [True, False], conversational=True)
    assert chat is not None and chat["prompt"] == [{"role": "user", "content": "x"}]
    assert chat["chosen"] == [{"role": "assistant", "content": "b"}] and chat["finished"] == [True, False]
    assert (chat["chosen_finished"], chat["rejected_finished"]) == (False, True)


# ---- the verb on a tiny model ---------------------------------------------------------------------------------------
def test_cli_writes_valid_pairs_scored_by_vader(tiny_model_dir, smollm2_tokenizer, tmp_path, capsys):
    from epsdpo.rewards import load_reward

    output = tmp_path / "pairs.jsonl"
    args = settings(tiny_model_dir, output, "num_samples=4", "max_new_tokens=16", "max_prompts=4", "batch_size=4")
    assert cli_main(["generate", *args]) == 0
    printed = capsys.readouterr().out
    assert "4 prompts selected" in printed and "pairs written" in printed
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    skipped_file = output.with_name("pairs.skipped.jsonl")
    skipped = [json.loads(line) for line in skipped_file.read_text().splitlines()] if skipped_file.exists() else []
    assert len(rows) + len(skipped) == 4
    assert rows, "a random model should give at least one untied VADER pair in 4 prompts"
    vader = load_reward("sentiment")
    for row in rows:
        assert set(row) == {
            "prompt_id",
            "prompt",
            "chosen",
            "rejected",
            "score_chosen",
            "score_rejected",
            "chosen_finished",
            "rejected_finished",
            "responses",
            "scores",
            "finished",
        }
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected and row["score_chosen"] > row["score_rejected"]
        assert row["scores"] == vader([""] * 4, row["responses"])  # the real reward, recomputable
        assert row["score_chosen"] == max(row["scores"]) and row["score_rejected"] == min(row["scores"])
        assert chosen in row["responses"] and rejected in row["responses"]
    assert all(s["reason"] in {"tied_scores", "fewer_than_two_nonempty", "identical_texts"} for s in skipped)
    pairs, report = load_preference_dataset(str(output), smollm2_tokenizer, warn=False)
    assert report.kept == len(rows) and report.formats == {"conversational": len(rows)}
    assert [p.score_chosen for p in pairs] == [r["score_chosen"] for r in rows]
    assert json.loads(output.with_name("pairs.settings.json").read_text())["num_samples"] == 4


@pytest.mark.slow
def test_resume_after_a_crash_and_a_torn_line_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, hooks, capsys):
    reward = "reward=gen_hooks:length"
    full = tmp_path / "full.jsonl"
    summary = generate(None, settings(tiny_model_dir, full, reward))
    assert summary.pairs_written == 6 and summary.skipped == {}
    expected = full.read_text()

    resumed = tmp_path / "resumed.jsonl"
    hooks.CRASH_AT_CALL, hooks.calls = 2, 0  # the reward fails on the second batch: only batch 1 is written
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(None, settings(tiny_model_dir, resumed, reward))
    assert resumed.read_text() == "".join(expected.splitlines(keepends=True)[:2])
    # then a kill in the middle of writing batch 2: its first row complete, the second torn
    lines = expected.splitlines(keepends=True)
    with resumed.open("a") as f:
        f.write(lines[2] + lines[3][: len(lines[3]) // 2])
    assert read_jsonl_resumable(resumed)[1] is True and resumed.read_text().endswith("\n")  # torn line removed
    with resumed.open("a") as f:
        f.write(lines[3][:10])
    hooks.CRASH_AT_CALL = None
    capsys.readouterr()
    summary = generate(None, settings(tiny_model_dir, resumed, reward))
    assert "dropped a truncated last line" in capsys.readouterr().out
    assert summary.done_before == 3 and summary.done_now == 3 and summary.truncated_line_dropped
    assert resumed.read_text() == expected
    ids = [json.loads(line)["prompt_id"] for line in expected.splitlines()]
    assert len(ids) == len(set(ids)) == 6
    # a third run finds everything done and samples nothing
    again = generate(None, settings(tiny_model_dir, resumed, reward))
    assert (again.done_before, again.done_now, again.pairs_total) == (6, 0, 6)


@pytest.mark.slow
def test_a_short_run_then_the_full_run_equals_one_full_run(tiny_model_dir, tmp_path, hooks):
    reward = "reward=gen_hooks:length"
    full, staged = tmp_path / "full.jsonl", tmp_path / "staged.jsonl"
    generate(None, settings(tiny_model_dir, full, reward))
    first = generate(None, settings(tiny_model_dir, staged, reward, "max_prompts=3"))  # ends mid-batch
    assert first.pairs_written == 3
    second = generate(None, settings(tiny_model_dir, staged, reward))
    assert (second.done_before, second.pairs_written) == (3, 3)
    assert staged.read_text() == full.read_text()


@pytest.mark.slow
def test_skipped_prompts_are_recorded_and_never_redone(tiny_model_dir, tmp_path, hooks):
    output = tmp_path / "ties.jsonl"
    args = settings(tiny_model_dir, output, "reward=gen_hooks:constant", "max_prompts=3")
    summary = generate(None, args)
    assert summary.skipped == {"tied_scores": 3} and summary.pairs_written == 0
    assert not output.exists() or output.read_text() == ""
    records = [json.loads(line) for line in output.with_name("ties.skipped.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in records] == ["tied_scores"] * 3 and all(len(r["responses"]) == 3 for r in records)
    assert generate(None, args).done_before == 3


def test_other_settings_cannot_continue_an_output(tiny_model_dir, tmp_path, hooks):
    output = tmp_path / "pairs.jsonl"
    generate(None, settings(tiny_model_dir, output, "reward=gen_hooks:length", "max_prompts=2"))
    with pytest.raises(ConfigError, match=r"num_samples: 3 → 5"):
        generate(None, settings(tiny_model_dir, output, "reward=gen_hooks:length", "num_samples=5"))


def test_prompts_from_a_file_and_errors(tiny_model_dir, tmp_path, hooks):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("text,split\nSay something nice,train\nDescribe a rainy day,test\nName a fruit,train\n")
    output = tmp_path / "out.jsonl"
    generate(
        None,
        [
            f"model={tiny_model_dir}",
            f"prompts={prompts}",
            "prompt_column=text",
            "prompt_split=train",
            f"output={output}",
            "reward=gen_hooks:length",
            "num_samples=2",
            "max_new_tokens=4",
            "disable_tqdm=true",
            "use_chat_template=false",
        ],
    )
    skipped = output.with_name("out.skipped.jsonl")
    rows = [json.loads(line) for f in (output, skipped) if f.exists() for line in f.read_text().splitlines()]
    assert sorted(r["prompt_id"] for r in rows) == ["0", "2"]  # row numbers in the file
    assert {r["prompt"] for r in rows} == {"Say something nice", "Name a fruit"}  # standard (string) rows
    with pytest.raises(ConfigError, match="num_samples must be >= 2"):
        generate(None, ["num_samples=1"])
    with pytest.raises(ValueError, match="no prompt text in column 'prompt'"):
        generate(None, [f"model={tiny_model_dir}", f"prompts={prompts}", f"output={output}.x"])


def test_the_sampler_sees_the_raw_logits_whatever_the_generation_config(monkeypatch):
    """A model whose generation_config would process the scores (repetition penalty, no-repeat n-grams, suppressed
    tokens, a minimum length): every step's scores handed to the sampler are the model's own logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import epsdpo.sampling as gen

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    gc = model.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens = 5.0, 2, 6
    gc.suppress_tokens, gc.bad_words_ids = [3, 4], [[5]]
    seen: list[torch.Tensor] = []
    real = gen.sample_next_tokens

    def spy(logits, generators, temperature=1.0, top_p=1.0):
        seen.append(logits.detach().clone())
        return real(logits, generators, temperature, top_p)

    monkeypatch.setattr(gen, "sample_next_tokens", spy)
    prompts = [[1, 7, 9, 11], [1, 8]]  # unequal lengths: left padding and positions are exercised
    done = gen.sample_completions(model, prompts, [3, 4], max_new_tokens=6, end_ids=[2], pad_id=0)
    assert len(seen) == max(len(c.ids) for c in done)
    for row, (prompt, completion) in enumerate(zip(prompts, done, strict=True)):
        with torch.no_grad():
            full = model(torch.tensor([prompt + completion.ids])).logits[0]  # (T, V), unpadded, no cache
        for step in range(len(completion.ids)):
            raw = full[len(prompt) - 1 + step]
            assert (seen[step][row] - raw).abs().max() < 1e-4, (row, step)


def test_a_second_generate_into_one_output_is_refused(tmp_path, lock_holder, monkeypatch, capsys):
    """Two runs into one output would each write every pair (each skips only what it read at its start)."""
    import epsdpo.stages.generate as stage

    output = tmp_path / "pairs.jsonl"
    proc = lock_holder(output, "file")

    def refuse(*args, **kwargs):
        raise AssertionError("the second run started sampling")

    monkeypatch.setattr(stage, "load_model_for_sampling", refuse)
    assert cli_main(["generate", *settings(tmp_path, output)]) == 1
    printed = capsys.readouterr().out
    assert f"epsdpo generate: error: {output} is in use by another run: pid {proc.pid}" in printed, printed
    assert not output.exists() and not (tmp_path / "pairs.settings.json").exists()

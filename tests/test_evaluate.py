"""`epsdpo eval` on constructed models with known answers, and end to end on a tiny training run."""

from __future__ import annotations

import copy
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from epsdpo.cli import main as cli_main
from epsdpo.data import load_preference_dataset
from epsdpo.rewards import load_reward
from epsdpo.rundir import headline_decision
from epsdpo.sampling import encode_prompt, load_prompts
from epsdpo.stages.evaluate import EvalConfig, evaluate, evaluate_models, format_table

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TINY_DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"
REQUIRED = {
    "policy/gold_reward",
    "reference/gold_reward",
    "kl",
    "win_rate",
    "preference_accuracy",
    "policy/gold_reward_std",
    "reference/gold_reward_std",
    "kl/forward",
    "kl/std",
    "reward_margin",
    "num_prompts",
    "num_samples",
    "settings",
}


def tiny_llama(vocab_size: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def constant_logits(model: nn.Module, bias: torch.Tensor) -> nn.Module:
    """The model's logits become ``bias`` at every position: a zero-weight head with that bias."""
    head = nn.Linear(model.config.hidden_size, bias.numel(), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(bias)
    model.lm_head = head
    return model


@pytest.fixture(scope="module")
def prompts():
    return load_prompts("bundled", "test", limit=3)


@pytest.fixture
def length_reward(tmp_path, monkeypatch):
    (tmp_path / "eval_hooks.py").write_text(
        textwrap.dedent("""
        def length(prompts, responses):
            return [float(len(r)) for r in responses]
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield load_reward("eval_hooks:length")
    sys.modules.pop("eval_hooks", None)


def test_a_model_against_itself_has_zero_kl_and_independent_draws(smollm2_tokenizer, prompts):
    policy = tiny_llama(len(smollm2_tokenizer))
    reference = copy.deepcopy(policy)  # the same weights, another object
    cfg = EvalConfig(samples_per_prompt=2, max_new_tokens=6, batch_size=2, disable_tqdm=True)
    metrics, records = evaluate_models(policy, reference, smollm2_tokenizer, prompts, load_reward("sentiment"), cfg)
    # the same weights: every log-ratio is exactly 0, on either model's samples
    assert metrics["kl"] == 0.0 and metrics["kl/forward"] == 0.0 and metrics["kl/std"] == 0.0
    assert metrics["kl_se"] == 0.0
    assert metrics["preference_accuracy"] is None and metrics["reward_margin"] is None
    assert (metrics["num_prompts"], metrics["num_samples"]) == (3, 6) and len(records) == 6
    # the two models draw from independent streams: their responses differ (with a random model, always)
    assert all(r["policy"] != r["reference"] for r in records)
    assert 0.0 <= metrics["win_rate"] <= 1.0 and metrics["win_rate_se"] >= 0.0


def three_token_model(tokenizer: Any, tokens: list[int], probs: list[float], seed: int) -> nn.Module:
    """Samples one of ``tokens`` with ``probs`` at every position (everything else, the end included, ~never)."""
    bias = torch.full((len(tokenizer),), -60.0)
    bias[tokens] = torch.tensor(probs).log()
    return constant_logits(tiny_llama(len(tokenizer), seed=seed), bias)


def test_win_rate_compares_independent_draws(smollm2_tokenizer, length_reward):
    """The issue's toy: three responses of rewards 1 < 2 < 3 (their lengths), π = (0.2, 0.3, 0.5) and π_ref =
    (0.5, 0.3, 0.2). Independent draws: P(Y > Y′) + ½ P(Y = Y′) = 0.55 + 0.145 = 0.695. Draws sharing one uniform
    (the coupled streams of the earlier evaluation) would give 0.8."""
    words = {}
    for word in ("a", "an", "the", "of", "is", "to", "and", "in", "it"):
        ids = smollm2_tokenizer.encode(word, add_special_tokens=False)
        if len(ids) == 1:
            words.setdefault(len(word), ids[0])
    tokens = [words[1], words[2], words[3]]  # rewards 1, 2, 3 under the length reward
    policy = three_token_model(smollm2_tokenizer, tokens, [0.2, 0.3, 0.5], seed=1)
    reference = three_token_model(smollm2_tokenizer, tokens, [0.5, 0.3, 0.2], seed=2)
    cfg = EvalConfig(samples_per_prompt=8, max_new_tokens=1, batch_size=32, disable_tqdm=True)
    prompts = load_prompts("bundled", "test")  # 110 prompts × 8 samples × 8 comparisons each
    metrics, records = evaluate_models(policy, reference, smollm2_tokenizer, prompts, length_reward, cfg)
    assert {r["policy_reward"] for r in records} == {1.0, 2.0, 3.0}
    est, se = metrics["win_rate"], metrics["win_rate_se"]
    assert 0.0 < se < 0.02
    assert abs(est - 0.695) < 3 * se  # deterministic seeds: not flaky
    assert abs(est - 0.8) > 3 * se  # and far from the coupled value
    lo, hi = metrics["win_rate_ci95"]
    assert lo < est < hi
    # the paired gain of mean rewards: E_π = 2.3, E_π_ref = 1.7
    assert abs(metrics["gold_reward_gain"] - 0.6) < 3 * metrics["gold_reward_gain_se"]


def test_known_win_rate_and_kl_for_constructed_models(smollm2_tokenizer, prompts, length_reward):
    """Policy: always the token "good" (never ends); reference: always ends at once. Both KLs have closed forms."""
    vocab = len(smollm2_tokenizer)
    good = smollm2_tokenizer.encode("good", add_special_tokens=False)[0]
    end = smollm2_tokenizer.eos_token_id  # SmolLM2: <|im_end|> is both EOS and the end of an assistant turn
    pol_bias, ref_bias = torch.zeros(vocab), torch.zeros(vocab)
    pol_bias[good], pol_bias[end] = 40.0, -40.0
    ref_bias[end] = 40.0
    policy = constant_logits(tiny_llama(vocab, seed=1), pol_bias)
    reference = constant_logits(tiny_llama(vocab, seed=2), ref_bias)
    n = 6
    cfg = EvalConfig(max_new_tokens=n, batch_size=3, disable_tqdm=True)
    metrics, records = evaluate_models(policy, reference, smollm2_tokenizer, prompts, length_reward, cfg)
    assert all(r["policy"] == "good" * n and r["reference"] == "" for r in records)
    assert metrics["win_rate"] == 1.0  # longer responses win under the length reward
    assert metrics["policy/gold_reward"] == 4.0 * n and metrics["reference/gold_reward"] == 0.0
    lp_pol, lp_ref = pol_bias.log_softmax(-1), ref_bias.log_softmax(-1)
    # y ~ π is "good" n times: KL = n (log π(good) − log π_ref(good)); y ~ π_ref is the end token alone
    assert metrics["kl"] == pytest.approx(n * float(lp_pol[good] - lp_ref[good]), rel=1e-5)
    assert metrics["kl/forward"] == pytest.approx(float(lp_ref[end] - lp_pol[end]), rel=1e-5)
    assert metrics["policy/finished"] == 0.0 and metrics["reference/finished"] == 1.0
    assert metrics["policy/response_tokens"] == n and metrics["reference/response_tokens"] == 1
    # forward_kl=false: the same evaluation without KL(π_ref‖π) (and without the pass it takes)
    lean = EvalConfig(max_new_tokens=n, batch_size=3, disable_tqdm=True, forward_kl=False)
    without, records = evaluate_models(policy, reference, smollm2_tokenizer, prompts, length_reward, lean)
    assert "kl/forward" not in without and all(r["reference_policy_logp"] is None for r in records)
    assert {k: v for k, v in metrics.items() if not k.startswith("kl/forward")} == without


def test_preference_accuracy_and_margin_are_exact(smollm2_tokenizer, prompts):
    rows = [
        {"prompt": f"Question {i}?", "chosen": c, "rejected": r}
        for i, (c, r) in enumerate([("good day", "bad day"), ("very good", "awful"), ("fine", "not fine at all")])
    ]
    pairs, _ = load_preference_dataset(rows, smollm2_tokenizer, warn=False)
    vocab = len(smollm2_tokenizer)
    favoured = {t for p in pairs for t in p.chosen_ids} - {t for p in pairs for t in p.rejected_ids}
    bias = torch.zeros(vocab)
    bias[sorted(favoured)] = 2.0
    policy = constant_logits(tiny_llama(vocab), bias)
    reference = constant_logits(tiny_llama(vocab), torch.zeros(vocab))
    beta = 0.25
    cfg = EvalConfig(max_new_tokens=1, disable_tqdm=True)
    metrics, _ = evaluate_models(
        policy, reference, smollm2_tokenizer, prompts[:1], load_reward("sentiment"), cfg, pairs=pairs, beta=beta
    )
    ratio = bias.log_softmax(-1) - torch.zeros(vocab).log_softmax(-1)  # log π(t) − log π_ref(t), per token
    margins = [beta * float(ratio[p.chosen_ids].sum() - ratio[p.rejected_ids].sum()) for p in pairs]
    assert all(m > 0 for m in margins)
    assert metrics["preference_accuracy"] == 1.0 and metrics["num_pairs"] == 3
    assert metrics["reward_margin"] == pytest.approx(sum(margins) / 3, rel=1e-4)
    # the reverse preference: a policy that favours the rejected tokens gets every pair wrong
    swapped = [type(p)(p.prompt_ids, p.rejected_ids, p.chosen_ids, None, None, p.index) for p in pairs]
    metrics, _ = evaluate_models(
        policy, reference, smollm2_tokenizer, prompts[:1], load_reward("sentiment"), cfg, pairs=swapped, beta=beta
    )
    assert metrics["preference_accuracy"] == 0.0
    assert metrics["reward_margin"] == pytest.approx(-sum(margins) / 3, rel=1e-4)


def test_samples_are_scored_where_generation_sampled_them(smollm2_tokenizer, prompts):
    """The log-prob of a sampled response equals the sum of the per-step log-probs of the tokens drawn."""
    from epsdpo.data import TokenizedPair
    from epsdpo.logps.scoring import sequence_logps
    from epsdpo.sampling import end_token_ids, sample_completions

    model = tiny_llama(len(smollm2_tokenizer), seed=3)
    ids = encode_prompt(smollm2_tokenizer, prompts[0][1], True)
    (done,) = sample_completions(
        model,
        [ids],
        [7],
        max_new_tokens=5,
        end_ids=end_token_ids(smollm2_tokenizer),
        pad_id=smollm2_tokenizer.pad_token_id,
    )
    with torch.no_grad():
        logits = model(torch.tensor([ids + done.ids])).logits[0, len(ids) - 1 : -1]  # scores each completion token
    expected = float(logits.log_softmax(-1).gather(-1, torch.tensor(done.ids)[:, None]).sum())
    lp_pol, lp_ref = sequence_logps(
        model, model, [TokenizedPair(ids, done.ids, done.ids, None, None, 0)], smollm2_tokenizer.pad_token_id
    )
    assert float(lp_pol[0]) == pytest.approx(expected, abs=1e-4) and torch.equal(lp_pol, lp_ref)


@pytest.mark.slow
def test_eval_and_plot_a_tiny_training_run_through_the_cli(tmp_path, model_cache_dir, capsys):
    from epsdpo.recipes.train import train

    run = tmp_path / "tiny-run"
    train(TINY, [f"output_dir={run}", f"dataset={TINY_DATA}", "max_steps=3", "save_steps=0", "disable_tqdm=true"])
    assert (
        cli_main(
            [
                "eval",
                str(run),
                "num_prompts=3",
                "samples_per_prompt=2",
                "max_new_tokens=8",
                f"eval_dataset={TINY_DATA}",
                "disable_tqdm=true",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "win rate" in printed and "preference accuracy" in printed
    result = json.loads((run / "eval.json").read_text())
    assert REQUIRED <= set(result)
    assert result["num_prompts"] == 3 and result["num_samples"] == 6 and result["num_pairs"] == 64
    assert 0.0 <= result["preference_accuracy"] <= 1.0 and 0.0 <= result["win_rate"] <= 1.0
    # the policy moved away from the reference (a 6-sample estimate of a small KL may still be below 0)
    assert result["kl"] != 0.0 and result["kl/forward"] != 0.0
    final_beta = json.loads((run / "final" / "final_metrics.json").read_text())["beta"]
    assert result["beta"] == final_beta  # ε-DPO's implicit reward uses the final β
    # every evaluation is kept under evals/NAME (named by the settings that differ from the run's own evaluation);
    # eval.json is a copy of the headline one (here the first: the run had none), naming it
    first_dir = run / "evals" / result["name"]
    assert result["name"] == "eval_dataset=tiny_preferences.jsonl,num_prompts=3,samples_per_prompt=2,max_new_tokens=8"
    assert len((first_dir / "samples.jsonl").read_text().splitlines()) == 6
    assert json.loads((first_dir / "eval.json").read_text())["kl"] == result["kl"]
    assert all(
        k in result
        for k in (
            "gold_reward_gain",
            "gold_reward_gain_se",
            "gold_reward_gain_ci95",
            "kl_se",
            "win_rate_se",
            "win_rate_ci95",
            "preference_accuracy_se",
            "policy/distinct_2",
        )
    )
    plot = run / "plots" / "reward_vs_kl.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # redrawn by the eval verb
    common = ["num_prompts=2", "max_new_tokens=4", "disable_tqdm=true"]
    # another name leaves the headline (and its plot) as it is, and says so
    plot_bytes = plot.read_bytes()
    capsys.readouterr()
    assert cli_main(["eval", str(run), *common, "name=second"]) == 0
    assert "headline evaluation (eval.json, its plot) is unchanged" in capsys.readouterr().out
    assert json.loads((run / "eval.json").read_text()) == result
    assert plot.read_bytes() == plot_bytes
    assert (first_dir / "eval.json").is_file() and (run / "evals" / "second" / "samples.jsonl").is_file()
    # headline=true makes it the headline
    assert cli_main(["eval", str(run), *common, "name=second", "headline=true"]) == 0
    latest = json.loads((run / "eval.json").read_text())
    assert latest["name"] == "second" and latest["num_prompts"] == 2
    # an evaluation of a checkpoint never becomes the headline unasked
    assert headline_decision(run, "after-training", 2, None)[0] is False
    assert headline_decision(run, "second", None, None)[0] is True  # the headline's own name again
    assert headline_decision(run, "third", None, None)[0] is False
    # the same name with other settings is refused (nothing written), unless overwrite=true
    capsys.readouterr()
    assert cli_main(["eval", str(run), *common, "seed=5", "name=second"]) == 2
    assert "other settings" in capsys.readouterr().out
    assert json.loads((run / "evals" / "second" / "eval.json").read_text())["settings"]["seed"] == 0
    assert cli_main(["eval", str(run), *common, "seed=5", "name=second", "overwrite=true"]) == 0
    assert json.loads((run / "evals" / "second" / "eval.json").read_text())["settings"]["seed"] == 5
    assert cli_main(["plot", str(run)]) == 0
    for name in ("training_curves.png", "beta.png", "reward_vs_kl.png"):
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_eval_of_a_lora_run_loads_base_plus_adapter(tmp_path, model_cache_dir):
    from epsdpo.recipes.train import train
    from epsdpo.stages.evaluate import evaluate

    run = tmp_path / "lora-run"
    train(
        TINY,
        [
            f"output_dir={run}",
            f"dataset={TINY_DATA}",
            "max_steps=2",
            "save_steps=0",
            "disable_tqdm=true",
            "use_lora=true",
            "lora_r=4",
            "learning_rate=0.05",
            "loss_type=dpo",
        ],
    )
    assert (run / "final" / "adapter_config.json").is_file()
    result = evaluate(run, ["num_prompts=2", "max_new_tokens=6", "disable_tqdm=true", "output=" + str(run / "e.json")])
    assert json.loads((run / "e.json").read_text())["kl"] == result["kl"]
    assert result["beta"] == 0.1 and "LoRA adapter" in result["policy"]
    assert result["kl"] != 0.0  # the merged adapter changed the model
    assert result["preference_accuracy"] is None  # the run had no held-out pairs and none were given


def test_config_errors(tmp_path):
    from epsdpo.config import ConfigError
    from epsdpo.stages.evaluate import evaluate

    with pytest.raises(ConfigError, match="model=… and ref_model=…"):
        evaluate(None, ["model=x"])
    with pytest.raises(ConfigError, match="not a run directory"):
        evaluate(tmp_path)
    with pytest.raises(ConfigError, match="temperature"):
        evaluate(None, ["temperature=0"])
    assert "—" in format_table({"settings": {}, "beta": 0.1})


@pytest.mark.slow
def test_reference_cache_gives_the_same_evaluation_without_touching_the_reference(
    tmp_path, model_cache_dir, monkeypatch
):
    import epsdpo.stages.evaluate.measure as ev
    from epsdpo.recipes.train import train

    runs = []
    for name, lr in (("a", "0.01"), ("b", "0.02")):  # two policies, one reference
        runs.append(tmp_path / name)
        train(
            TINY,
            [
                f"output_dir={runs[-1]}",
                f"dataset={TINY_DATA}",
                "max_steps=2",
                "save_steps=0",
                "disable_tqdm=true",
                f"learning_rate={lr}",
            ],
        )
    common = ["num_prompts=3", "max_new_tokens=6", "disable_tqdm=true", f"eval_dataset={TINY_DATA}", "max_pairs=8"]
    plain = ev.evaluate(runs[0], [*common, f"output={tmp_path / 'plain.json'}"])
    cache = f"reference_cache_dir={tmp_path / 'cache'}"
    first = ev.evaluate(runs[0], [*common, cache, f"output={tmp_path / 'first.json'}"])
    files = list((tmp_path / "cache").glob("eval_reference-*.json"))
    assert len(files) == 1 and first["reference_cache"] == str(files[0])

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference was sampled again")

    monkeypatch.setattr(ev, "compute_reference_part", no_reference)
    again = ev.evaluate(runs[0], [*common, cache, f"output={tmp_path / 'again.json'}"])
    other = ev.evaluate(runs[1], [*common, cache, f"output={tmp_path / 'other.json'}"])  # another policy, a hit
    keys = (
        "policy/gold_reward",
        "reference/gold_reward",
        "kl",
        "kl/forward",
        "win_rate",
        "preference_accuracy",
        "reward_margin",
    )
    assert all(plain[k] == first[k] == again[k] for k in keys)
    assert other["reference/gold_reward"] == first["reference/gold_reward"] and other["kl"] != first["kl"]
    with pytest.raises(AssertionError, match="sampled again"):  # another seed is another key
        ev.evaluate(runs[0], [*common, cache, "seed=1", f"output={tmp_path / 'seed1.json'}"])


def test_a_reference_part_from_other_settings_is_refused(smollm2_tokenizer, prompts):
    from epsdpo.stages.evaluate import compute_reference_part

    model = tiny_llama(len(smollm2_tokenizer))
    reward = load_reward("sentiment")
    cfg = EvalConfig(max_new_tokens=4, batch_size=3, disable_tqdm=True)
    part = compute_reference_part(model, smollm2_tokenizer, prompts[:2], reward, cfg)
    with pytest.raises(ValueError, match="holds 2 samples and None pair rows, this evaluation needs 3"):
        evaluate_models(model, model, smollm2_tokenizer, prompts, reward, cfg, reference_part=part)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_a_checkpoint_evaluates_as_the_model_it_saved(tmp_path, model_cache_dir, lora):
    """checkpoint=N rebuilds the policy after N steps (LoRA adapters merged): at the last step it is the final model,
    at 0 the initial model, whose KL to the reference is exactly 0."""
    from epsdpo.recipes.train import train

    run = tmp_path / "run"
    extra = ["use_lora=true", "lora_r=4"] if lora else []
    train(
        TINY, [f"output_dir={run}", f"dataset={TINY_DATA}", "max_steps=4", "save_steps=2", "disable_tqdm=true", *extra]
    )
    common = dict(run_dir=str(run), num_prompts=3, samples_per_prompt=2, max_new_tokens=8, disable_tqdm=True)
    final = evaluate(common)
    last = evaluate({**common, "checkpoint": 4})
    assert last["name"] == "checkpoint=4,num_prompts=3,samples_per_prompt=2,max_new_tokens=8"
    for key in ("policy/gold_reward", "kl", "kl/forward", "win_rate", "preference_accuracy", "reward_margin"):
        assert last[key] == pytest.approx(final[key], abs=1e-5), key
    assert last["beta"] == final["beta"]
    start = evaluate({**common, "checkpoint": 0})
    assert start["kl"] == 0.0 and start["beta"] == 0.1
    middle = evaluate({**common, "checkpoint": 2})
    assert middle["kl"] != 0.0
    with pytest.raises(FileNotFoundError, match="checkpoint-3"):
        evaluate({**common, "checkpoint": 3})


# ---- where an evaluation writes -------------------------------------------------------------------------------------
def _run_dir_without_training(path: Path) -> Path:
    """A run directory as far as `epsdpo eval` reads it before sampling: its config.yaml."""
    from epsdpo.config import dump_config
    from epsdpo.training import load_run_config

    cfg = load_run_config(TINY, [f"output_dir={path}", f"dataset={TINY_DATA}"])
    path.mkdir()
    dump_config({"models": cfg.models, "data": cfg.data, "loss": cfg.loss, "train": cfg.train}, path / "config.yaml")
    return path


@pytest.fixture
def no_sampling(monkeypatch):
    """Loading the models (the first step before sampling) fails the test: what is checked must fail before it."""
    import epsdpo.stages.evaluate.measure as measure

    def refuse(cfg):
        raise AssertionError("the evaluation started loading models and sampling")

    monkeypatch.setattr(measure, "_load_models", refuse)


def test_eval_into_a_read_only_run_dir_fails_before_sampling(tmp_path, read_only_dir, no_sampling, capsys):
    run = read_only_dir(_run_dir_without_training(tmp_path / "run"))
    assert cli_main(["eval", str(run), "num_prompts=1", "disable_tqdm=true"]) == 1
    printed = capsys.readouterr().out
    assert f"epsdpo eval: error: run_dir='{run}' is not writable" in printed, printed


def test_eval_into_a_run_dir_in_use_is_refused_before_sampling(tmp_path, lock_holder, no_sampling, capsys):
    run = _run_dir_without_training(tmp_path / "run")
    proc = lock_holder(run)
    assert cli_main(["eval", str(run), "num_prompts=1", "disable_tqdm=true"]) == 1
    assert f"{run} is in use by another run: pid {proc.pid}" in capsys.readouterr().out

    # an evaluation into its own file may run beside the run's other writers; one into the same file may not
    output = run / "mine.json"
    other = lock_holder(output, "file")
    with pytest.raises(Exception, match=rf"{output} is in use by another run: pid {other.pid}"):
        evaluate(run, ["num_prompts=1", f"output={output}"])
    with pytest.raises(AssertionError, match="started loading models"):  # not locked: it gets as far as loading
        evaluate(run, ["num_prompts=1", f"output={run / 'another.json'}"])


#: what an evaluation measured (not where it went or how long it took)
def _figures(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("seconds", "output", "samples_file", "name", "plot")}


def test_reference_cache_is_on_by_default_cold_equals_warm_and_a_bad_entry_is_recomputed(
    tmp_path, tiny_model_dir, monkeypatch, caplog
):
    import logging

    import epsdpo.stages.evaluate.measure as ev

    computed = []
    real = ev.compute_reference_part
    monkeypatch.setattr(ev, "compute_reference_part", lambda *a, **k: computed.append(1) or real(*a, **k))
    common = [
        f"model={tiny_model_dir}",
        f"ref_model={tiny_model_dir}",
        "num_prompts=3",
        "samples_per_prompt=2",
        "max_new_tokens=6",
        "disable_tqdm=true",
        f"eval_dataset={TINY_DATA}",
        "max_pairs=6",
    ]

    def run(name: str, *extra: str) -> dict[str, Any]:
        result = ev.evaluate(None, [*common, *extra, f"output={tmp_path / name}.json"])
        result["records"] = (tmp_path / f"{name}_samples.jsonl").read_text(encoding="utf-8")
        return result

    cold = run("cold")
    entry = Path(cold["reference_cache"])
    assert entry.parent == ev.default_reference_cache_dir() and entry.is_file() and len(computed) == 1
    warm = run("warm")
    assert len(computed) == 1 and _figures(warm) == _figures(cold)  # every figure and every sample's record
    good = entry.read_text(encoding="utf-8")
    entry.write_text(good[: len(good) // 2], encoding="utf-8")  # cut short (a full disk, a kill before rename)
    with caplog.at_level(logging.WARNING, logger="epsdpo.stages.evaluate.measure"):
        again = run("again")
    assert "is unusable" in caplog.text
    assert len(computed) == 2 and _figures(again) == _figures(cold)  # recomputed, not used
    assert entry.read_text(encoding="utf-8") == good  # and written back whole
    off = run("off", "reference_cache=false")
    assert off["reference_cache"] is None and len(computed) == 3
    assert {k: v for k, v in _figures(off).items() if k != "reference_cache"} == {
        k: v for k, v in _figures(cold).items() if k != "reference_cache"
    }
    # every other kind of unusable entry is refused by the reader, naming what is wrong
    d, cfg = json.loads(good), EvalConfig(disable_tqdm=True)
    key, expected = d["key"], (len(d["samples"]), len(d["pair_logps"]))
    assert ev._read_reference_part(entry, key, expected, cfg) is not None
    broken = {
        "not a mapping": ("[1, 2]", "not a format-3 entry"),
        "another format": (json.dumps({**d, "format": 1}), "not a format-3 entry"),
        "another key": (json.dumps({**d, "key": "0" * 24}), "not a format-3 entry"),
        "a field missing": (json.dumps({k: v for k, v in d.items() if k != "rewards"}), "missing rewards"),
        "a reward missing": (json.dumps({**d, "rewards": d["rewards"][:-1]}), "rewards: not 6 finite numbers"),
        "pair rows missing": (json.dumps({**d, "pair_logps": d["pair_logps"][:-2]}), "10 pair rows where 6 and 12"),
        "ids not ints": (json.dumps({**d, "samples": [[["a"], True], *d["samples"][1:]]}), "samples: not a list"),
        "a NaN log-prob": (json.dumps({**d, "self_logps": [float("nan"), *d["self_logps"][1:]]}), "self_logps: not"),
    }
    for what, (text, message) in broken.items():
        entry.write_text(text, encoding="utf-8")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="epsdpo.stages.evaluate.measure"):
            assert ev._read_reference_part(entry, key, expected, cfg) is None, what
        assert message in caplog.text, what


def test_the_reference_cache_key_follows_the_weights_not_the_name(tmp_path, tiny_model_dir):
    """Weights saved again under the same directory (another round's reference, a retrained model) make another
    key; the same weights read again make the same one."""
    import shutil

    import epsdpo.stages.evaluate.measure as ev

    model_dir = tmp_path / "reference"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = EvalConfig(model=str(model_dir), ref_model=str(model_dir), num_prompts=2, disable_tqdm=True)
    prompts = load_prompts("bundled", "test", limit=2)

    def key() -> str:
        loaded = ev._load_models(cfg)
        return ev._reference_cache_file(cfg, loaded.reference, loaded.reference_id, loaded.tokenizer, prompts, None)[1]

    first = key()
    assert key() == first
    weights = next(model_dir.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    assert key() != first


@pytest.mark.slow
def test_a_run_scores_its_held_out_pairs_once_and_reports_one_figure(tmp_path, model_cache_dir, monkeypatch):
    """The trainer's held-out pass is the evaluation's: the pairs go through the model once, and final_metrics.json,
    the model card and eval.json report the same accuracy and margin (ε-DPO's margin at β after training in all
    three), equal to what a separate scoring of the same pairs gives."""
    import epsdpo.stages.evaluate.measure as ev
    from epsdpo.recipes.train import train
    from epsdpo.training.loop import Trainer

    scored: list[str | None] = []
    real_rows = ev.row_logps
    monkeypatch.setattr(ev, "row_logps", lambda *a, **k: scored.append(k.get("desc")) or real_rows(*a, **k))
    forwards: list[tuple[str, int]] = []
    real_forward = Trainer._forward
    monkeypatch.setattr(
        Trainer,
        "_forward",
        lambda self, m, pairs, split: forwards.append((split, len(pairs))) or real_forward(self, m, pairs, split),
    )
    run = tmp_path / "run"
    options = "eval_options={num_prompts: 2, max_new_tokens: 4, batch_size: 4, disable_tqdm: true}"
    result = train(
        TINY,
        [
            f"output_dir={run}",
            f"dataset={TINY_DATA}",
            f"eval_dataset={TINY_DATA}",
            "max_steps=2",
            "save_steps=0",
            "disable_tqdm=true",
            "eval_after_training=true",
            "plot_after_training=false",
            options,
        ],
    )
    final = json.loads((run / "final" / "final_metrics.json").read_text(encoding="utf-8"))
    evaluation = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    pairs = evaluation["num_pairs"]
    assert pairs == final["eval/pairs"] > 0
    assert sum(n for split, n in forwards if split == "eval") == pairs  # through the model once, by the trainer
    assert not [d for d in scored if d and "held-out pairs" in d]  # and never by the evaluation
    assert evaluation["preference_accuracy"] == final["eval/rewards/accuracies"]
    assert evaluation["reward_margin"] == pytest.approx(final["eval/rewards/margins"], rel=1e-5, abs=1e-7)
    assert evaluation["beta"] == final["beta"] == result.beta
    # and the same standard errors (over pairs; the accuracy's binomial), given in the card with the figures
    assert evaluation["preference_accuracy_se"] == pytest.approx(final["eval/rewards/accuracies_se"], rel=1e-6)
    assert evaluation["reward_margin_se"] == pytest.approx(final["eval/rewards/margins_se"], rel=1e-4, abs=1e-7)
    card = (run / "final" / "README.md").read_text(encoding="utf-8")
    margin = f"{final['eval/rewards/margins']:.4g} ± {final['eval/rewards/margins_se']:.2g}"
    assert f"(`eval/rewards/margins`) | {margin} |" in card
    assert f"(`preference_accuracy`) | {evaluation['preference_accuracy']:.4g} ± " in card
    assert f"| {pairs} pairs |" in card and "one scoring of the same pairs" in card
    assert "| evaluation |" in card and "| held-out pass |" in card
    # scored again, apart, by the evaluation itself: the same figures (to float32 rounding)
    apart = ev.evaluate(run, ["num_prompts=2", "max_new_tokens=4", "batch_size=4", "disable_tqdm=true", "name=apart"])
    assert [d for d in scored if d and "held-out pairs (policy)" in d]
    assert apart["preference_accuracy"] == evaluation["preference_accuracy"]
    assert apart["reward_margin"] == pytest.approx(evaluation["reward_margin"], rel=1e-4, abs=1e-6)

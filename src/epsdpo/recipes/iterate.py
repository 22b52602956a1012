"""``epsdpo iterate``: rounds of on-policy alignment (SPEC §3, the self-play setting of Huang et al. 2025).

Round r = 1 … R starts from the policy π_{r−1} (π₀ is the configured model) and runs five stages::

    generate   k responses to each of the round's prompts, sampled from π_{r−1} and scored by the gold reward;
               pairs best vs worst, all k scores kept                          → round-r/pairs.jsonl
    select     the configured rule (``selection``: alignment potential by default; explicit, implicit, random,
               none) over those pairs; implicit margins under π_{r−1}, the round's initial policy
                                                                               → round-r/selection/
    train      ``epsdpo train`` from π_{r−1} on the kept pairs, any loss (ε-DPO by default); the reference is
               π_{r−1} (``reference=round_start``) or the original model (``reference=original``)
                                                                               → round-r/train/
    policy     π_r, the trained model (LoRA: merged into its base)            → round-r/train/final[/merged]
    evaluate   π_r against the *original* model on the held-out prompts (gold reward, KL from the original, win
               rate against its samples, held-out preference accuracy; every figure with its standard error)
                                                                               → round-r/eval.json

and the whole run keeps ``summary.json`` (per round: the data statistics, the share selected, the training metrics,
the evaluation), ``summary.md`` and ``plots/iterate.png`` (gold reward and KL per round).

**Resumable, stage by stage.** A stage that finishes is recorded in ``round-r/state.json``; a rerun of the same
command skips every recorded stage, so a killed ``iterate`` never redoes a finished generation, selection, training
or evaluation. Within a stage the stage's own resumption applies: generation appends and skips the prompts already
written, training continues from its last checkpoint (``save_steps``). The settings are kept in ``iterate.yaml``;
a rerun with other settings is refused, naming the keys that differ. One run writes an output_dir at a time (its
``.epsdpo.lock``, :mod:`epsdpo.runlock`); ``overwrite_output_dir=true`` moves an earlier run aside into
``OUTPUT_DIR/.replaced-<time>/`` and starts afresh.

**Prompts per round.** ``round_prompts=split`` (the default) deals the prompts out to the rounds like cards (prompt
i to round i mod R + 1), so every round sees new prompts from every category; ``all`` gives every round all of them
(each round draws its own samples: the sampling seed is derived from the run's seed and the round).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from epsdpo.config import ConfigError, config_to_dict, dump_config, load_config, read_config_source
from epsdpo.data import load_preference_dataset
from epsdpo.data.loading import load_rows
from epsdpo.errors import UserError
from epsdpo.eval_config import EvalConfig
from epsdpo.files import read_jsonl_resumable
from epsdpo.models import initial_model, load_model_for_sampling, load_tokenizer, model_identity
from epsdpo.recipes.train import train
from epsdpo.rundir import ITERATE_STAGES, read_iterate_summary, read_round_state, write_json
from epsdpo.runlock import claim_run_dir, run_dir_lock
from epsdpo.sampling import load_prompts, sample_seed
from epsdpo.stages.evaluate import SUMMARY_KEYS, evaluate, load_eval_config
from epsdpo.stages.generate import GenerateConfig, generate
from epsdpo.stages.plots import plot_iterate
from epsdpo.stages.select import select_for_config
from epsdpo.training.config import SECTIONS, RunConfig, tokenizer_name

__all__ = ["IterateConfig", "IterateError", "iterate", "load_iterate_config", "round_prompt_ids"]

#: the stages of a round, in order (``round-r/state.json`` records the finished ones)
STAGES = ITERATE_STAGES
#: keys of the training config whose default differs under ``iterate`` (applied when the config does not set them)
ITERATE_DEFAULTS = {"selection": "alignment_potential", "select_implicit_weight": 2.5}
#: settings that may change between a run and its continuation
FREE_KEYS = ("disable_tqdm", "overwrite_output_dir")


class IterateError(UserError, RuntimeError):
    """An iterate run that cannot go on; the message says why and what to do."""


@dataclass
class IterateConfig:
    """Settings of ``epsdpo iterate`` (section ``iterate``); the model, data, loss and training keys are
    ``epsdpo train``'s and apply to every round (``output_dir`` is the iterate run's directory).

    Attributes:
        rounds: R, rounds of generate → select → train → evaluate.
        prompts: where the training prompts come from: ``bundled`` (the package's sentiment prompts) or a data
            source with a prompt column (as ``epsdpo generate``'s ``prompts``).
        prompts_column: the column holding the prompt text (``generate``'s ``prompt_column``).
        prompt_split: the prompts' split (``train`` for the bundled ones; ``None``: all).
        max_prompts: use only the first this many prompts; ``None``: all.
        round_prompts: ``split``: prompt i goes to round i mod R + 1 (new prompts each round); ``all``: every round
            samples every prompt again.
        num_samples: k, responses sampled per prompt from the round's starting policy (≥ 2).
        max_new_tokens: longest sampled response in tokens.
        temperature: sampling temperature (1: the model itself).
        top_p: nucleus sampling (1: no truncation).
        reward: the gold reward that scores the samples (``sentiment``, ``module:function`` or a reward model).
        generate_batch_size: prompts per sampling batch.
        use_chat_template: render prompts through the tokenizer's chat template; ``None``: when it has one.
        reference: ``round_start`` (DPO's reference in each round is the policy the round started from, as in
            iterative DPO and the self-play setting) or ``original`` (always the original model).
        evaluate_rounds: evaluate every round's policy against the original model.
        round_eval: ``epsdpo eval`` keys for those evaluations. Defaults: ``prompt_split: test`` of the same prompt
            source (for the bundled prompts: 110 prompts on subjects the training prompts never mention), every
            prompt, 2 samples per prompt and model, the sampling settings above, the held-out pairs of
            ``eval_dataset`` (``bundled`` for the bundled prompts), the original model as the reference (its part
            computed once for all rounds, kept in ``OUTPUT_DIR/reference_cache`` unless ``reference_cache_dir`` says
            otherwise: runs that share the original and the settings can share it).
    """

    rounds: int = 3
    prompts: str = "bundled"
    prompts_column: str = "prompt"
    prompt_split: str | None = "train"
    max_prompts: int | None = None
    round_prompts: Literal["split", "all"] = "split"
    num_samples: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    reward: str = "sentiment"
    generate_batch_size: int = 8
    use_chat_template: bool | None = None
    reference: Literal["round_start", "original"] = "round_start"
    evaluate_rounds: bool = True
    round_eval: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (a pair needs two responses), got {self.num_samples}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 or null (all prompts), got {self.max_prompts}")


ITERATE_SECTIONS: dict[str, type] = {**SECTIONS, "iterate": IterateConfig}


@dataclass
class IterateSetup:
    """A resolved iterate config: the settings of the rounds and the training config every round starts from."""

    iterate: IterateConfig
    run: RunConfig
    round_eval: EvalConfig = field(init=False)

    def __post_init__(self) -> None:
        try:  # the rounds' evaluation settings, resolved and checked once, when the config is loaded
            self.round_eval = load_eval_config(_round_eval_options(self))
        except ConfigError as err:
            raise ConfigError(f"iterate.round_eval: {err}") from err

    @property
    def output_dir(self) -> Path:
        return self.run.output_dir

    def sections(self) -> dict[str, Any]:
        r = self.run
        return {"models": r.models, "data": r.data, "loss": r.loss, "train": r.train, "iterate": self.iterate}


def load_iterate_config(
    source: str | Path | dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()
) -> IterateSetup:
    """Read an iterate config (YAML file, mapping or None) plus ``key=value`` overrides.

    ``selection`` and ``select_implicit_weight`` default to ``alignment_potential`` and 2.5 here (the self-play
    weighting of Huang et al.) unless the config or an override sets them.
    """
    raw = read_config_source(source)
    given = set(raw) | set(raw.get("data", {}) or {}) | {o.partition("=")[0].rpartition(".")[2] for o in overrides}
    for key, value in ITERATE_DEFAULTS.items():
        if key not in given:
            raw[key] = value
    sections = load_config(raw, overrides, ITERATE_SECTIONS)
    iterate_cfg = sections.pop("iterate")
    run = RunConfig(**sections)
    if run.models.ref_model is not None:
        raise ConfigError(
            "ref_model is decided per round by iterate's `reference` (round_start: the round's starting policy; "
            "original: the original model); remove ref_model"
        )
    if run.models.sync_ref_model:
        raise ConfigError("sync_ref_model (TR-DPO) moves the reference inside a round; iterate does not support it")
    if run.data.dataset is not None:
        raise ConfigError(
            f"dataset={run.data.dataset!r}: iterate generates each round's pairs itself from `prompts`; remove "
            "dataset (eval_dataset, for held-out accuracy, is kept)"
        )
    return IterateSetup(iterate_cfg, run)


def round_prompt_ids(prompt_ids: list[str], rounds: int, mode: str) -> list[list[str]]:
    """The prompt ids of each round: dealt out (``split``: prompt i to round i mod R) or all of them (``all``)."""
    if mode == "all":
        return [list(prompt_ids) for _ in range(rounds)]
    parts = [prompt_ids[r::rounds] for r in range(rounds)]
    if any(not part for part in parts):
        raise IterateError(f"{len(prompt_ids)} prompts cannot be split over {rounds} rounds; give more prompts")
    return parts


# ---- bookkeeping --------------------------------------------------------------------------------------------------
def _finish_stage(round_dir: Path, stage: str, record: dict[str, Any]) -> None:
    state = read_round_state(round_dir)
    state["stages"][stage] = record
    write_json(round_dir / "state.json", state)


def _check_settings(setup: IterateSetup) -> None:
    """The first run writes ``iterate.yaml``; a continuation must have the same settings (but ``FREE_KEYS``)."""
    path = setup.output_dir / "iterate.yaml"
    now = config_to_dict(setup.sections())
    if not path.is_file():
        setup.output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(setup.sections(), path)
        return
    before = config_to_dict(load_iterate_config(path).sections())
    changed = [
        f"{key}: {before[s][key]!r} → {now[s][key]!r}"
        for s in now
        for key in now[s]
        if key not in FREE_KEYS and before[s].get(key) != now[s][key]
    ]
    if changed:
        raise IterateError(
            f"{setup.output_dir} holds an iterate run with other settings ({'; '.join(changed)}); continue it "
            "with the settings in its iterate.yaml, or give another output_dir"
        )


class _Progress:
    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def __call__(self, r: int, message: str) -> None:
        print(f"[iterate] round {r}/{self.rounds}: {message}", file=sys.stderr, flush=True)


# ---- the stages ---------------------------------------------------------------------------------------------------
def _original_model(setup: IterateSetup, tokenizer: Any) -> str:
    """The original model as a name or path every stage can load: a random ``model_config`` is built once (seeded)
    and saved to ``initial/``."""
    m = setup.run.models
    if m.model_config is None:
        return m.model
    initial = setup.output_dir / "initial"
    if not (initial / "config.json").is_file():
        partial = initial.with_name("initial.partial")
        model = initial_model(m.model, m.model_config, len(tokenizer), setup.run.train.seed)
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        partial.replace(initial)
    return str(initial)


def _generate(setup: IterateSetup, r: int, start: str, prompts: list[tuple[str, str]], round_dir: Path) -> dict:
    it = setup.iterate
    prompts_file = round_dir / "prompts.jsonl"
    prompts_file.write_text(
        "".join(json.dumps({"prompt_id": pid, "prompt": text}, ensure_ascii=False) + "\n" for pid, text in prompts),
        encoding="utf-8",
    )
    cfg = GenerateConfig(
        model=start,
        tokenizer=tokenizer_name(setup.run),
        trust_remote_code=setup.run.models.trust_remote_code,
        prompts=str(prompts_file),
        prompt_split=None,
        num_samples=it.num_samples,
        max_new_tokens=it.max_new_tokens,
        temperature=it.temperature,
        top_p=it.top_p,
        batch_size=it.generate_batch_size,
        reward=it.reward,
        seed=sample_seed(setup.run.train.seed, "iterate", r, stream="generate"),
        use_chat_template=it.use_chat_template,
        disable_tqdm=setup.run.train.disable_tqdm,
        output=str(round_dir / "pairs.jsonl"),
    )
    summary = generate(cfg)
    if summary.pairs_total == 0:
        raise IterateError(
            f"round {r}: none of the {len(prompts)} prompts gave a pair (skipped: {summary.skipped}); sample more "
            "responses per prompt (num_samples) or check the reward"
        )
    rows, _ = read_jsonl_resumable(Path(cfg.output))
    spreads = [max(row["scores"]) - min(row["scores"]) for row in rows]
    return {
        "prompts": len(prompts),
        "pairs": len(rows),
        "skipped": summary.skipped,
        "mean_score_chosen": summary.mean_score_chosen,
        "mean_score_rejected": summary.mean_score_rejected,
        "mean_score": sum(sum(row["scores"]) for row in rows) / sum(len(row["scores"]) for row in rows),
        "mean_explicit_margin": sum(spreads) / len(spreads),
        "unfinished_responses": sum(row.get("finished", []).count(False) for row in rows),
        "seed": cfg.seed,
    }


def _select(setup: IterateSetup, r: int, start: str, tokenizer: Any, round_dir: Path, say: _Progress) -> dict:
    d, m = setup.run.data, setup.run.models
    pairs_file = round_dir / "pairs.jsonl"
    data_cfg = dataclasses.replace(d, dataset=str(pairs_file), eval_dataset=None, eval_split=None)
    pairs, report = load_preference_dataset(data_cfg, tokenizer, warn=False)
    if d.selection == "none":
        return {"method": "none", "pairs": len(pairs), "kept": len(pairs), "share": 1.0, "file": str(pairs_file)}
    initial = None
    if d.selection in ("alignment_potential", "implicit"):
        say(r, f"selection: implicit margins of {len(pairs)} pairs under the round's initial policy")
        initial = load_model_for_sampling(start, m.trust_remote_code, "cpu" if setup.run.train.use_cpu else None)
    out = round_dir / "selection"
    raw = load_rows(str(pairs_file))
    selection = select_for_config(
        data_cfg,
        pairs,
        tokenizer,
        initial,
        model_identity(start),
        seed=setup.run.train.seed + r,
        out_dir=out,
        raw_rows=raw.rows,
        batch_size=setup.run.train.per_device_eval_batch_size,
    )

    def mean(values: list[float] | None, kept: bool) -> float | None:
        if not values:
            return None
        chosen = [values[i] for i in selection.kept] if kept else values
        return sum(chosen) / len(chosen)

    return {
        "method": selection.method,
        "pairs": len(pairs),
        "kept": len(selection.kept),
        "share": len(selection.kept) / len(pairs),
        "mean_explicit_margin_kept": mean(selection.explicit, True),
        "mean_explicit_margin_all": mean(selection.explicit, False),
        "mean_implicit_margin_kept": mean(selection.implicit, True),
        "mean_implicit_margin_all": mean(selection.implicit, False),
        "dropped_rows": dict(report.dropped),
        "truncated_rows": dict(report.truncated),
        "file": str(out / "selected.jsonl"),
    }


def _round_run_config(setup: IterateSetup, r: int, start: str, original: str, train_file: str, out: Path) -> RunConfig:
    run, m = setup.run, setup.run.models
    ref = original if setup.iterate.reference == "original" and start != original else None
    return RunConfig(
        models=dataclasses.replace(m, model=start, model_config=None, ref_model=ref, save_merged_model=m.use_lora),
        data=dataclasses.replace(run.data, dataset=train_file, selection="none"),
        loss=run.loss,
        train=dataclasses.replace(  # overwrite_output_dir is the iterate run's: a round's training continues
            run.train,
            output_dir=str(out),
            resume_from_checkpoint="auto",
            eval_after_training=False,
            overwrite_output_dir=False,
        ),
    )


def _policy_dir(final: Path) -> Path:
    """The trained policy as a whole model: ``final/merged`` (LoRA) or ``final`` (full fine-tuning; TR-DPO)."""
    return final / "merged" if (final / "merged" / "config.json").is_file() else final


def _train(setup: IterateSetup, r: int, cfg: RunConfig) -> dict | None:
    """Train the round (continuing from its last checkpoint); None when interrupted (a checkpoint was saved)."""
    final = cfg.output_dir / "final"
    if not (final / "final_metrics.json").is_file():  # a kill after the final save but before the record: done
        result = train(cfg)
        if result.interrupted:
            return None
    metrics = json.loads((final / "final_metrics.json").read_text(encoding="utf-8"))
    return {
        "output_dir": str(cfg.output_dir),
        "policy": str(_policy_dir(final)),
        "reference": cfg.models.ref_model or cfg.models.model,
        "steps": metrics.get("step"),
        "beta_final": metrics.get("beta"),
        "metrics": {k: v for k, v in metrics.items() if k not in ("step", "beta", "train_seconds")},
        "train_seconds": metrics.get("train_seconds"),  # the loop's wall time (all its invocations, if resumed)
    }


def _round_eval_options(setup: IterateSetup) -> dict[str, Any]:
    """The round evaluation's ``epsdpo eval`` keys: the defaults below, then the user's ``round_eval``."""
    it, d = setup.iterate, setup.run.data
    held_out = d.eval_dataset or ("bundled" if it.prompts == "bundled" else None)
    return {
        "prompts": it.prompts,
        "prompt_column": it.prompts_column,
        "prompt_split": "test",
        "num_prompts": None,
        "samples_per_prompt": 2,
        "max_pairs": None,
        "max_new_tokens": it.max_new_tokens,
        "temperature": it.temperature,
        "top_p": it.top_p,
        "reward": it.reward,
        "use_chat_template": it.use_chat_template,
        "batch_size": max(it.generate_batch_size, 8),
        "seed": setup.run.train.seed,
        "eval_dataset": held_out,
        "reference_cache_dir": str(setup.output_dir / "reference_cache"),
        **it.round_eval,
    }


def _evaluate(setup: IterateSetup, r: int, train_dir: Path, original: str, round_dir: Path) -> dict:
    options = dataclasses.replace(
        setup.round_eval,
        run_dir=str(train_dir),
        ref_model=original,
        output=str(round_dir / "eval.json"),
        overwrite=True,
        disable_tqdm=setup.run.train.disable_tqdm,
        trust_remote_code=setup.run.models.trust_remote_code,
    )
    result = evaluate(options)
    return {k: result[k] for k in (*SUMMARY_KEYS, "seconds") if k in result}


# ---- the loop -----------------------------------------------------------------------------------------------------
@dataclass
class IterateResult:
    """Where an iterate run left things: the summary (one record per finished round) and whether it stopped early."""

    output_dir: Path
    summary: dict[str, Any]
    interrupted: bool = False
    plot: Path | None = None


def iterate(
    config: IterateSetup | str | Path | dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> IterateResult:
    """Run (or continue) every round; see the module docstring."""
    setup = config if isinstance(config, IterateSetup) else load_iterate_config(config, overrides)
    with run_dir_lock(setup.output_dir):  # one writer: a second iterate into the same output_dir is refused
        claim_run_dir(
            setup.output_dir,
            overwrite=setup.run.train.overwrite_output_dir,
            is_run=_is_iterate_run,
            what="run of `epsdpo iterate` (no iterate.yaml or round-N/)",
        )
        return _iterate(setup)


def _is_iterate_run(directory: Path) -> bool:
    return (directory / "iterate.yaml").is_file() or any(p.is_dir() for p in directory.glob("round-*"))


def _iterate(setup: IterateSetup) -> IterateResult:
    it, out = setup.iterate, setup.output_dir
    _check_settings(setup)
    say = _Progress(it.rounds)
    prompts = load_prompts(it.prompts, it.prompt_split, it.prompts_column, it.max_prompts)
    by_id = dict(prompts)
    parts = round_prompt_ids([pid for pid, _ in prompts], it.rounds, it.round_prompts)
    tokenizer = load_tokenizer(tokenizer_name(setup.run), setup.run.models.trust_remote_code)
    original = _original_model(setup, tokenizer)
    start = original
    for r in range(1, it.rounds + 1):
        round_dir = out / f"round-{r}"
        round_dir.mkdir(parents=True, exist_ok=True)
        stages = read_round_state(round_dir)["stages"]
        done = [s for s in STAGES if s in stages]
        if done:
            say(r, f"already done: {', '.join(done)}")

        if "generate" not in stages:
            say(r, f"generate: {len(parts[r - 1])} prompts × {it.num_samples} samples from {start}")
            began = time.perf_counter()
            record = _generate(setup, r, start, [(pid, by_id[pid]) for pid in parts[r - 1]], round_dir)
            _finish_stage(round_dir, "generate", {**record, "start_policy": start, "seconds": _since(began)})
            stages = read_round_state(round_dir)["stages"]
        g = stages["generate"]
        say(r, f"generated {g['pairs']} pairs from {g['prompts']} prompts (mean score {g['mean_score']:.4f})")

        if "select" not in stages:
            say(r, f"select: {setup.run.data.selection} (select_ratio {setup.run.data.select_ratio:g})")
            began = time.perf_counter()
            record = _select(setup, r, start, tokenizer, round_dir, say)
            _finish_stage(round_dir, "select", {**record, "seconds": _since(began)})
            stages = read_round_state(round_dir)["stages"]
        s = stages["select"]
        say(r, f"selected {s['kept']} of {s['pairs']} pairs ({s['method']})")

        cfg = _round_run_config(setup, r, start, original, s["file"], round_dir / "train")
        if "train" not in stages:
            say(r, f"train: {cfg.loss.loss_type} from {start}, reference {cfg.models.ref_model or 'the same model'}")
            began = time.perf_counter()
            record = _train(setup, r, cfg)
            if record is None:
                say(r, "training interrupted; its checkpoint is saved: rerun the same command to continue")
                return _finish(setup, interrupted=True)
            _finish_stage(round_dir, "train", {**record, "seconds": _since(began)})
            stages = read_round_state(round_dir)["stages"]
        t = stages["train"]
        say(r, f"trained {t['steps']} steps; policy {t['policy']}")

        if it.evaluate_rounds and "evaluate" not in stages:
            say(r, "evaluate against the original model on the held-out prompts")
            began = time.perf_counter()
            record = _evaluate(setup, r, round_dir / "train", original, round_dir)
            _finish_stage(round_dir, "evaluate", {**record, "seconds": _since(began)})
            stages = read_round_state(round_dir)["stages"]
        if "evaluate" in stages:
            e = stages["evaluate"]
            say(
                r,
                f"gold reward {e['policy/gold_reward']:.4f} (gain {e['gold_reward_gain']:+.4f} ± "
                f"{e['gold_reward_gain_se']:.4f} over the original), KL {e['kl']:.3f} ± {e['kl_se']:.3f}",
            )
        _write_summary(setup)
        start = t["policy"]
    return _finish(setup, interrupted=False)


def _since(began: float) -> float:
    return round(time.perf_counter() - began, 2)


def _finish(setup: IterateSetup, interrupted: bool) -> IterateResult:
    summary = _write_summary(setup)
    plot = plot_iterate(setup.output_dir) if summary["rounds"] else None
    return IterateResult(setup.output_dir, summary, interrupted, plot)


def _write_summary(setup: IterateSetup) -> dict[str, Any]:
    summary = read_iterate_summary(setup.output_dir)
    write_json(setup.output_dir / "summary.json", summary)
    (setup.output_dir / "summary.md").write_text(summary_table(summary), encoding="utf-8")
    return summary


def _pm(value: Any, se: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def summary_table(summary: dict[str, Any]) -> str:
    """A Markdown table of the rounds: data, selection, training and evaluation (mean ± standard error)."""
    lines = [
        f"# iterate: {summary['output_dir']}",
        "",
        f"Machine: {summary['machine']}. Every round is evaluated against the original model: gold reward of "
        "sampled responses, its paired gain over the original's, KL(π‖original), win rate against the original's "
        "samples (independent draws, ties ½) and held-out preference accuracy, each ± one standard error.",
        "",
        "| round | pairs | mean score of the samples | selected | steps | β after | gold reward | gain | KL | "
        "win rate | held-out accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in summary["rounds"]:
        g, s, t, e = (rec.get(k, {}) for k in STAGES)
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                rec["round"],
                g.get("pairs", "–"),
                _pm(g.get("mean_score"), None, 4),
                f"{s['kept']} ({s['method']})" if s else "–",
                t.get("steps", "–"),
                "–" if t.get("beta_final") is None else f"{t['beta_final']:.4g}",
                _pm(e.get("policy/gold_reward"), None, 4),
                _pm(e.get("gold_reward_gain"), e.get("gold_reward_gain_se"), 4),
                _pm(e.get("kl"), e.get("kl_se")),
                _pm(e.get("win_rate"), e.get("win_rate_se")),
                _pm(e.get("preference_accuracy"), e.get("preference_accuracy_se")),
            )
        )
    return "\n".join(lines) + "\n"

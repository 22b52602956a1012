"""Gold rewards: VADER sentiment by hand, user hooks and every error they can raise, a tiny offline reward model."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from epsdpo.rewards import CallableReward, HFRewardModel, Reward, SentimentReward, _encode, load_reward

# ---------------------------------------------------------------------------------------------------- sentiment


@pytest.fixture(scope="module")
def sentiment() -> SentimentReward:
    return SentimentReward()


def test_sentiment_orders_positive_neutral_negative(sentiment):
    positive, neutral, negative = sentiment(
        ["p"] * 3,
        [
            "The room was clean and the staff were lovely.",
            "The train left at nine.",
            "The soup was cold and the waiter was rude.",
        ],
    )
    assert positive > 0.0 and neutral == 0.0 and negative < 0.0
    assert all(-1.0 <= s <= 1.0 for s in (positive, neutral, negative))


def test_sentiment_exact_compound_for_one_word_of_valence(sentiment):
    # Only "good" carries valence (1.9 in the VADER lexicon); compound = x / sqrt(x² + 15), rounded to 4 places.
    assert sentiment._analyzer.lexicon["good"] == 1.9 and sentiment._analyzer.lexicon["bad"] == -2.5
    expected = round(1.9 / math.sqrt(1.9**2 + 15), 4)
    assert expected == 0.4404
    assert sentiment(["anything"], ["The food was good."]) == [expected]
    assert sentiment(["anything"], ["The food was bad."]) == [round(-2.5 / math.sqrt(2.5**2 + 15), 4)]


def test_sentiment_ignores_the_prompt_and_is_deterministic(sentiment):
    responses = ["I liked the ending.", "Nothing happened."]
    first = sentiment(["Write a review.", "Tell a story."], responses)
    assert sentiment(["Something else entirely, said with joy!", "Awful prompt."], responses) == first
    assert SentimentReward()(["x", "y"], responses) == first
    assert sentiment([], []) == []


def test_load_reward_sentiment(sentiment):
    reward = load_reward(" sentiment ")
    assert isinstance(reward, SentimentReward) and isinstance(reward, Reward)
    assert reward.name == "sentiment"
    with pytest.raises(TypeError, match=r"'sentiment' takes no options, got \['batch_size'\]"):
        load_reward("sentiment", batch_size=4)


@pytest.mark.parametrize("bad", ["", "   "])
def test_load_reward_rejects_an_empty_spec(bad):
    with pytest.raises(ValueError, match="non-empty string"):
        load_reward(bad)


def test_mismatched_batch_is_rejected(sentiment):
    with pytest.raises(ValueError, match="got 1 prompts but 2 responses"):
        sentiment(["p"], ["a", "b"])


# ---------------------------------------------------------------------------------------------------- hooks

HOOKS = """
    import math
    import numpy as np

    NOT_CALLABLE = 3.0

    def length(prompts, responses):
        return [float(len(r)) for r in responses]

    def as_array(prompts, responses):
        return np.arange(len(responses), dtype=np.float32)

    def one_short(prompts, responses):
        return [0.0] * (len(responses) - 1)

    def nan_at_one(prompts, responses):
        return [0.0, math.nan, 0.0][: len(responses)]

    def inf_at_two(prompts, responses):
        return [0.0, 1.0, -math.inf][: len(responses)]

    def word_at_one(prompts, responses):
        return [0.0, "high", 0.0][: len(responses)]

    def scalar(prompts, responses):
        return 1.0

    def text(prompts, responses):
        return "123"

    class Scorer:
        @staticmethod
        def score(prompts, responses):
            return [1.0 for _ in responses]
"""


@pytest.fixture
def hooks(tmp_path, monkeypatch) -> str:
    """A throwaway module ``epsdpo_test_hooks`` on sys.path; removed from sys.modules afterwards."""
    name = "epsdpo_test_hooks"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(HOOKS))
    (tmp_path / "epsdpo_test_broken.py").write_text("import epsdpo_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in (name, "epsdpo_test_broken"):
        sys.modules.pop(module, None)


def test_hook_scores_are_returned_as_floats(hooks):
    reward = load_reward(f"{hooks}:length")
    assert isinstance(reward, CallableReward) and isinstance(reward, Reward)
    assert reward.name == f"{hooks}:length"
    assert reward(["a", "b"], ["xyz", ""]) == [3.0, 0.0]
    scores = load_reward(f"{hooks}:as_array")(["a", "b", "c"], ["", "", ""])
    assert scores == [0.0, 1.0, 2.0] and all(type(s) is float for s in scores)
    assert load_reward(f"{hooks}:Scorer.score")(["a"], ["b"]) == [1.0]


@pytest.mark.parametrize(
    ("function", "error", "message"),
    [
        ("one_short", ValueError, r"returned 2 scores for 3 responses; return exactly one per response"),
        ("nan_at_one", ValueError, r"returned nan for prompt index 1; scores must be finite"),
        ("inf_at_two", ValueError, r"returned -inf for prompt index 2; scores must be finite"),
        ("word_at_one", TypeError, r"returned 'high' \(str\) for prompt index 1; scores must be numbers"),
        ("scalar", TypeError, r"returned a float; it must return a sequence with one float per response \(3 here\)"),
        ("text", TypeError, r"returned a str; it must return a sequence"),
    ],
)
def test_hook_output_errors_name_what_was_wrong(hooks, function, error, message):
    reward = load_reward(f"{hooks}:{function}")
    with pytest.raises(error, match=rf"reward '{hooks}:{function}' {message}"):
        reward(["p0", "p1", "p2"], ["r0", "r1", "r2"])


def test_hook_module_not_found():
    with pytest.raises(ModuleNotFoundError, match=r"module 'epsdpo_nowhere\.deep' not found; make it importable"):
        load_reward("epsdpo_nowhere.deep:score")


def test_hook_module_whose_own_import_fails(hooks):
    with pytest.raises(ImportError, match=r"importing module 'epsdpo_test_broken' failed: .*epsdpo_no_such_dependency"):
        load_reward("epsdpo_test_broken:score")


def test_hook_attribute_missing_suggests_a_close_name(hooks):
    with pytest.raises(
        AttributeError, match=rf"'{hooks}' \(file .*\) has no attribute 'lenght'\. Did you mean 'length'"
    ):
        load_reward(f"{hooks}:lenght")
    with pytest.raises(AttributeError, match=rf"'{hooks}:Scorer' \(file .*\) has no attribute 'scor'"):
        load_reward(f"{hooks}:Scorer.scor")


def test_hook_not_callable(hooks):
    with pytest.raises(TypeError, match=r"'NOT_CALLABLE' is a float, not a function"):
        load_reward(f"{hooks}:NOT_CALLABLE")


@pytest.mark.parametrize("spec", ["mod:", ":fn", "my-mod:fn", "mod:fn()", "mod:a b", "os:path:join"])
def test_hook_spec_must_be_module_colon_function(spec):
    with pytest.raises(ValueError, match=r"is not of the form 'module:function'"):
        load_reward(spec)


def test_hook_takes_no_options(hooks):
    with pytest.raises(TypeError, match=r"takes no options, got \['device'\]"):
        load_reward(f"{hooks}:length", device="cpu")


def test_hook_spec_is_imported_never_evaluated(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="module:function"):
        load_reward(f"__import__('pathlib').Path('{marker}').touch():x")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- HF model

WORDS = "<pad> <unk> <s> </s> user assistant : the food was good bad hotel room quiet".split()
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"


def save_tiny_reward_model(path: Path, num_labels: int = 2, chat: bool = True, pad: bool = True) -> Path:
    """A random 1-layer Llama classifier and a word-level tokenizer, built offline and saved to ``path``."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        **({"pad_token": "<pad>"} if pad else {}),
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0 if pad else None,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a larger head so that rewards differ visibly between inputs
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PROMPTS = ["the food", "hotel room", "the hotel", "food"]
RESPONSES = ["was good", "was quiet the room was bad", "good", "bad bad food was the good food"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward-models")
    return {
        "chat2": save_tiny_reward_model(root / "chat2", num_labels=2, chat=True),
        "chat1": save_tiny_reward_model(root / "chat1", num_labels=1, chat=True),
        "pair2": save_tiny_reward_model(root / "pair2", num_labels=2, chat=False),
    }


def render_chat(prompt: str, response: str) -> str:
    """CHAT_TEMPLATE applied by hand."""
    return f"user : {prompt} </s> assistant : {response} </s> "


def manual_logits(path: Path, texts_or_pairs: list) -> torch.Tensor:
    """The classifier's logits, one input at a time (no padding), straight from transformers."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    rows = []
    for item in texts_or_pairs:
        if isinstance(item, tuple):  # a (prompt, response) text pair
            ids = tokenizer(*item, return_tensors="pt")
        else:  # an already rendered chat
            ids = tokenizer(item, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            rows.append(model(**ids).logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["chat2", "chat1", "pair2"])
def test_hf_reward_shape_determinism_and_batch_invariance(tiny_models, kind):
    reward = load_reward(str(tiny_models[kind]), batch_size=3, device="cpu")
    assert isinstance(reward, HFRewardModel) and isinstance(reward, Reward)
    scores = reward(PROMPTS, RESPONSES)
    assert len(scores) == len(PROMPTS) and all(type(s) is float and math.isfinite(s) for s in scores)
    assert reward(PROMPTS, RESPONSES) == scores
    assert len(set(scores)) == len(scores)  # the inputs really reach the model
    # Padding (here to the longest of 3 rows, then a batch of 1) must not change any score.
    torch.testing.assert_close(
        torch.tensor(load_reward(str(tiny_models[kind]), batch_size=1)(PROMPTS, RESPONSES)),
        torch.tensor(scores),
        atol=1e-5,
        rtol=1e-5,
    )
    assert reward([], []) == []


def test_two_labels_give_the_logit_difference_and_one_label_the_logit(tiny_models):
    texts = [render_chat(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    two = manual_logits(tiny_models["chat2"], texts)
    torch.testing.assert_close(
        torch.tensor(load_reward(str(tiny_models["chat2"]))(PROMPTS, RESPONSES)),
        two[:, 1] - two[:, 0],
        atol=1e-5,
        rtol=1e-5,
    )
    one = manual_logits(tiny_models["chat1"], texts)
    torch.testing.assert_close(
        torch.tensor(load_reward(str(tiny_models["chat1"]))(PROMPTS, RESPONSES)), one[:, 0], atol=1e-5, rtol=1e-5
    )
    pairs = manual_logits(tiny_models["pair2"], list(zip(PROMPTS, RESPONSES, strict=True)))
    torch.testing.assert_close(
        torch.tensor(load_reward(str(tiny_models["pair2"]))(PROMPTS, RESPONSES)),
        pairs[:, 1] - pairs[:, 0],
        atol=1e-5,
        rtol=1e-5,
    )


def test_chat_template_branch_versus_text_pair_branch(tiny_models):
    chat = HFRewardModel(str(tiny_models["chat2"]))
    pair = HFRewardModel(str(tiny_models["pair2"]))
    assert chat.chat and not pair.chat
    chat_ids, _ = _encode(chat.tokenizer, ["the food"], ["was good"], True, 64)
    pair_ids, _ = _encode(pair.tokenizer, ["the food"], ["was good"], False, 64)
    # chat: the template's text, with no <s> added on top; pair: the tokenizer's pair template "<s> A </s> B </s>".
    assert chat.tokenizer.decode(chat_ids["input_ids"][0]) == "user : the food </s> assistant : was good </s>"
    assert pair.tokenizer.decode(pair_ids["input_ids"][0]) == "<s> the food </s> was good </s>"
    # Same weights (same seed), different inputs, so the two branches score differently.
    assert chat(["the food"], ["was good"]) != pair(["the food"], ["was good"])


def test_truncation_is_counted_and_warned(tiny_models):
    reward = HFRewardModel(str(tiny_models["chat2"]), max_length=12)
    with pytest.warns(UserWarning, match=r"2 of 4 inputs were longer than max_length=12 tokens"):
        scores = reward(PROMPTS, RESPONSES)
    assert len(scores) == 4 and reward.truncated == 2


def test_model_without_pad_token_scores_one_pair_at_a_time(tmp_path):
    path = save_tiny_reward_model(tmp_path / "nopad", pad=False)
    with pytest.warns(UserWarning, match="defines no pad token; scoring one pair at a time"):
        reward = HFRewardModel(str(path), batch_size=4)
    assert reward.batch_size == 1 and len(reward(PROMPTS, RESPONSES)) == 4


def test_pad_token_taken_from_the_model_config_when_the_tokenizer_has_none(tmp_path):
    path = save_tiny_reward_model(tmp_path / "cfgpad", pad=False)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "pad_token_id": 0}))
    reward = HFRewardModel(str(path), batch_size=4)
    assert reward.tokenizer.pad_token == "<pad>" and reward.batch_size == 4
    one_at_a_time = HFRewardModel(str(path), batch_size=1)(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(reward(PROMPTS, RESPONSES)), torch.tensor(one_at_a_time))


def test_three_label_model_is_rejected(tmp_path):
    path = save_tiny_reward_model(tmp_path / "three", num_labels=3)
    with pytest.raises(ValueError, match=r"has 3 labels; only 1 .* or 2 .* are supported"):
        load_reward(str(path))


def test_path_with_a_colon_is_a_model_not_a_hook(tmp_path):
    path = save_tiny_reward_model(tmp_path / "rm:v1")
    assert isinstance(load_reward(str(path)), HFRewardModel)


def test_unloadable_model_says_what_was_tried(tmp_path, monkeypatch):
    calls = []

    def refuse(name, **kwargs):
        calls.append(kwargs)
        raise OSError(f"no files for {name}")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", refuse)
    with pytest.raises(OSError, match=r"neither 'sentiment' nor a 'module:function' hook.*no files for org/rm"):
        load_reward("org/rm")
    assert calls == [{"trust_remote_code": False}]  # remote code only when the caller asks for it
    with pytest.raises(OSError):
        load_reward("org/rm", trust_remote_code=True)
    assert calls[-1] == {"trust_remote_code": True}


def test_options_are_validated(tiny_models):
    with pytest.raises(ValueError, match="batch_size and max_length must be ≥ 1"):
        HFRewardModel(str(tiny_models["chat2"]), batch_size=0)
    with pytest.raises(TypeError):
        load_reward(str(tiny_models["chat2"]), batchsize=2)


WRONG_SIGNATURES = """
    def one_argument(responses):
        return [0.0 for _ in responses]

    def three_arguments(prompts, responses, tokenizer):
        return [0.0 for _ in responses]

    def keyword_only(*, prompts, responses):
        return [0.0 for _ in responses]

    def with_default_third(prompts, responses, scale=1.0):
        return [scale for _ in responses]

    def variadic(*args):
        return [0.0 for _ in args[1]]
"""


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("one_argument", r"has the signature \(responses\), which cannot be called as fn\(prompts, responses\)"),
        ("three_arguments", r"has the signature \(prompts, responses, tokenizer\), which .* \(missing a required"),
        ("keyword_only", r"has the signature \(\*, prompts, responses\), which .* \(too many positional"),
    ],
)
def test_a_hook_with_the_wrong_signature_is_refused_when_loaded(tmp_path, monkeypatch, function, message):
    from epsdpo.errors import UserError
    from epsdpo.rewards import RewardHookError

    (tmp_path / "epsdpo_test_signatures.py").write_text(textwrap.dedent(WRONG_SIGNATURES))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "epsdpo_test_signatures", raising=False)
    with pytest.raises(RewardHookError, match=rf"reward hook 'epsdpo_test_signatures:{function}' {message}") as err:
        load_reward(f"epsdpo_test_signatures:{function}")
    assert isinstance(err.value, UserError) and isinstance(err.value, TypeError)


@pytest.mark.parametrize("function", ["with_default_third", "variadic"])
def test_a_hook_that_accepts_two_arguments_is_loaded(tmp_path, monkeypatch, function):
    (tmp_path / "epsdpo_test_signatures.py").write_text(textwrap.dedent(WRONG_SIGNATURES))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "epsdpo_test_signatures", raising=False)
    assert len(load_reward(f"epsdpo_test_signatures:{function}")(["p"], ["r"])) == 1

"""Fixtures shared across the test suite: the offline SmolLM2 checkpoint/tokenizer and a tiny BOS-adding tokenizer."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "data" / "fixtures"

# Triton decides when it is first imported (torch.compile imports it too) whether kernels run compiled or in its
# interpreter; without a GPU the Triton kernel's tests (tests/logps/test_vocab_kernels.py) need the interpreter, so
# it is switched on before anything imports Triton. EPSDPO_TEST_DEVICE=cuda (scripts/gpu_check.sh) leaves it off.
if os.environ.get("EPSDPO_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The trackers' tests (tests/training/test_trackers.py) write real trackio, wandb and MLflow runs: all of them stay in
# temporary directories and offline. trackio reads TRACKIO_DIR once, when it is first imported, so it is set here,
# before any test can import it.
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="epsdpo-tests-trackio-")
atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], True)
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def model_cache_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The epsdpo model cache for this session, exported as ``EPSDPO_CACHE_DIR`` (subprocesses inherit it).

    ``$EPSDPO_CACHE_DIR`` when set; else pytest's cache directory (``.pytest_cache``), so the one-off GGUF
    conversion (~1 min) happens once per checkout rather than once per run.
    """
    configured = os.environ.get("EPSDPO_CACHE_DIR")
    if configured:
        path = Path(configured)
    elif getattr(request.config, "cache", None) is not None:  # absent under -p no:cacheprovider
        path = Path(request.config.cache.mkdir("epsdpo-models"))
    else:
        path = tmp_path_factory.mktemp("epsdpo-models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EPSDPO_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def smollm2_path(model_cache_dir: Path) -> str:
    """Directory of the converted SmolLM2-135M-Instruct checkpoint (model + tokenizer)."""
    from epsdpo.models import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path: str) -> Any:
    """The real SmolLM2 tokenizer, with its chat template; no BOS added to plain text."""
    from epsdpo.models import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A random tiny Llama with SmolLM2's tokenizer (and chat template), saved like any local checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


#: a Llama-2-like template that writes ``bos_token`` itself: with a BOS-adding tokenizer this is where double BOS
#: comes from when the rendered text is tokenized with special tokens
BOS_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]: {% endif %}"
)


@pytest.fixture(scope="session")
def bos_tokenizer() -> Any:
    """A tiny byte-level BPE tokenizer built offline that puts ``<s>`` in front of every encode (like Llama).

    Byte-level, so any unicode string decodes back exactly; ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [line for path in sorted(FIXTURES.glob("*.jsonl")) for line in path.read_text("utf-8").splitlines()]
    backend.train_from_iterator(corpus * 5, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = BOS_CHAT_TEMPLATE
    return tokenizer


#: a second process that takes a lock (a run directory's, or an output file's), says so, and holds it until its
#: stdin closes or a signal ends it
# SIGINT is restored to Python's KeyboardInterrupt first: a test suite started in the background (`cmd &` in a
# non-interactive shell) hands its children SIGINT ignored, and the holder would then never see a Ctrl-C.
LOCK_HOLDER = """
import signal
import sys
from pathlib import Path
from epsdpo.runlock import output_file_lock, run_dir_lock
signal.signal(signal.SIGINT, signal.default_int_handler)
target, kind = Path(sys.argv[1]), sys.argv[2]
with (run_dir_lock(target) if kind == "dir" else output_file_lock(target)):
    print("held", flush=True)
    sys.stdin.read()
print("released", flush=True)
"""


@pytest.fixture
def lock_holder() -> Iterator[Any]:
    """``lock_holder(path, kind="dir"|"file")``: start a second process holding that lock (ended after the test);
    returns its ``Popen`` once the lock is held. Close its stdin to release the lock."""
    import subprocess
    import sys

    import epsdpo

    src = str(Path(epsdpo.__file__).resolve().parents[1])
    started: list[subprocess.Popen] = []

    def start(target: Path, kind: str = "dir") -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, str(target), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": src, "RANK": "0"},
        )
        started.append(proc)
        line = proc.stdout.readline() if proc.stdout else ""
        assert line == "held\n", (line, proc.stderr.read() if proc.stderr and proc.poll() is not None else "")
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _can_write(directory: Path) -> bool:
    try:
        (directory / ".probe").write_text("")
    except OSError:
        return False
    (directory / ".probe").unlink()
    return True


@pytest.fixture
def read_only_dir() -> Iterator[Any]:
    """``read_only_dir(path)``: make an existing directory unwritable: chmod 555, or, as root (whom permissions do not
    stop), the immutable attribute (``chattr +i``); skips the test where neither works. Undone after the test."""
    import subprocess

    made: list[tuple[Path, bool]] = []

    def make(directory: Path) -> Path:
        directory.chmod(0o555)
        immutable = False
        if _can_write(directory):
            immutable = subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0
            if immutable and _can_write(directory):
                subprocess.run(["chattr", "-i", str(directory)], check=True)
                immutable = False
            if not immutable:
                directory.chmod(0o755)
                pytest.skip("cannot make a directory read-only here (root, and chattr +i is not allowed)")
        made.append((directory, immutable))
        return directory

    yield make
    for directory, immutable in made:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)


@pytest.fixture(autouse=True)
def _own_eval_reference_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's evaluations keep their reference parts in a directory of their own (the default is the user's
    cache directory, where an entry from another test or another version of the code would be read back)."""
    import epsdpo.stages.evaluate.measure as measure

    directory = tmp_path_factory.mktemp("eval_reference")
    monkeypatch.setattr(measure, "default_reference_cache_dir", lambda: directory)

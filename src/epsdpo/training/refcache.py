"""Reference hidden-state cache: run the frozen reference over the data once, train without its forward pass.

ε-DPO needs more from the reference than DPO does: not just log π_ref(y|x) but the reference's full logits at every
completion position, to build the perturbed policies softmax((1 ± ε) f_θ ∓ ε f_ref). Caching log-probs (TRL's
``precompute_ref_log_probs``) is therefore not enough, and caching logits costs V floats per token (152k for Qwen).
The reference's *final hidden states* carry the same information in H floats per token: its logits are
``lm_head(h)`` with a frozen head, so the cached h and the head reproduce them, and the chunked log-prob path never
materialises them anyway.

What is stored, per pair: the hidden states at the positions that score completion tokens (position t scores token
t + 1), chosen then rejected, in one (positions, H) tensor, plus a table mapping each pair's source row to its
slices. Nothing is stored for prompt positions or padding. The file is safetensors, named by a key over the
reference's identity, the compute precision and every token id of the data, so a change to any of them is a
different file, never a stale hit.

Exactness: the values are those of a live reference forward. They are bit-identical to the live reference when the
cache was computed on the same micro-batches (same pairs, same padding); otherwise they differ only by float
rounding of a different batch shape (measured and tested: see ``tests/test_refcache.py``).

Not usable when the reference moves during training (TR-DPO's ``sync_ref_model``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from epsdpo.data.collate import PreferenceCollator, shift_for_logps
from epsdpo.data.tokenize import TokenizedPair
from epsdpo.files import cache_key
from epsdpo.logps import LMHeadInput

__all__ = ["ReferenceHiddenCache", "compute_reference_hidden", "load_or_compute_reference_hidden"]

CACHE_FORMAT = 1


@dataclass
class ReferenceHiddenCache:
    """Cached final hidden states of the reference.

    Attributes:
        hidden: (positions, H) every cached position; each pair's chosen slice, then its rejected slice.
        table: source row index -> (chosen start, chosen length, rejected start, rejected length) into ``hidden``.
    """

    hidden: Tensor
    table: dict[int, tuple[int, int, int, int]]

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()

    def side(self, pairs: Sequence[TokenizedPair], mask: Tensor, weight: Tensor, bias: Tensor | None) -> LMHeadInput:
        """The reference input for a micro-batch collated from ``pairs``: hidden (2B, T−1, H) zero off ``mask``.

        ``mask`` is the shifted completion mask (2B, T−1) of that micro-batch (rows 0..B−1 chosen, B..2B−1
        rejected). Raises KeyError for a pair the cache does not hold and ValueError when its length differs.
        """
        b = len(pairs)
        hidden = torch.zeros((*mask.shape, self.hidden.shape[1]), dtype=self.hidden.dtype, device=mask.device)
        where = mask.bool()
        for i, pair in enumerate(pairs):
            if pair.index not in self.table:
                raise KeyError(f"the reference cache holds no pair for source row {pair.index}")
            c0, cn, r0, rn = self.table[pair.index]
            for row, start, n in ((i, c0, cn), (b + i, r0, rn)):
                if int(where[row].sum()) != n:
                    raise ValueError(
                        f"the reference cache has {n} completion positions for source row "
                        f"{pair.index}, the batch has {int(where[row].sum())}: a stale cache"
                    )
                hidden[row, where[row]] = self.hidden[start : start + n].to(mask.device)
        return LMHeadInput(hidden, weight, bias)


@torch.no_grad()
def compute_reference_hidden(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    collate: PreferenceCollator,
    batch_size: int = 8,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    progress: Callable[[int], None] | None = None,
) -> ReferenceHiddenCache:
    """Run ``model`` (the frozen reference) over ``pairs`` in batches of ``batch_size`` and keep what is cached.

    ``autocast`` is entered around each forward (pass the training run's, so the cache has its precision).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pieces: list[Tensor] = []
    table: dict[int, tuple[int, int, int, int]] = {}
    offset = 0
    for start in range(0, len(pairs), batch_size):
        chunk = list(pairs[start : start + batch_size])
        batch = collate(chunk)
        ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        _, where = shift_for_logps(ids, batch["completion_mask"].to(device).bool())  # (2B, T−1) completion labels
        with autocast():
            out = model(
                input_ids=ids, attention_mask=attention, output_hidden_states=True, logits_to_keep=1, use_cache=False
            )
        hidden = out.hidden_states[-1][:, :-1]
        b = len(chunk)
        for i, pair in enumerate(chunk):
            chosen, rejected = hidden[i][where[i]], hidden[b + i][where[b + i]]
            table[pair.index] = (offset, chosen.shape[0], offset + chosen.shape[0], rejected.shape[0])
            offset += chosen.shape[0] + rejected.shape[0]
            pieces += [chosen.cpu(), rejected.cpu()]
        if progress is not None:
            progress(len(chunk))
    model.train(was_training)
    return ReferenceHiddenCache(torch.cat(pieces), table)


def save_cache(cache: ReferenceHiddenCache, path: Path, model_id: str) -> None:
    """Write atomically (``.partial`` then rename) as safetensors with the row table and identity in metadata."""
    from safetensors.torch import save_file

    rows = sorted(cache.table)
    table = torch.tensor([[r, *cache.table[r]] for r in rows], dtype=torch.long).reshape(-1, 5)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # runs filling the same key: their own files
    save_file(
        {"hidden": cache.hidden.contiguous(), "table": table},
        str(partial),
        metadata={"format": str(CACHE_FORMAT), "model": json.dumps(model_id)},
    )
    partial.replace(path)


def load_cache(path: Path) -> ReferenceHiddenCache:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    table = {int(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in tensors["table"].tolist()}
    return ReferenceHiddenCache(tensors["hidden"], table)


def cache_path(cache_dir: Path, model_id: str, precision: str, pairs: Sequence[TokenizedPair]) -> Path:
    """The file for this reference, precision and data (see the module docstring)."""
    return Path(cache_dir) / f"ref_hidden-{cache_key(f'{model_id}|{precision}|v{CACHE_FORMAT}', pairs)}.safetensors"


def load_or_compute_reference_hidden(
    model: nn.Module,
    model_id: str,
    precision: str,
    pairs: Sequence[TokenizedPair],
    collate: PreferenceCollator,
    cache_dir: Path,
    batch_size: int = 8,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[ReferenceHiddenCache, Path, bool]:
    """The cache for these pairs from ``cache_dir``, computed and written first when absent.

    Returns (cache, its file, whether it was read from disk).
    """
    path = cache_path(cache_dir, model_id, precision, pairs)
    if path.is_file():
        return load_cache(path), path, True
    cache = compute_reference_hidden(model, pairs, collate, batch_size, autocast)
    save_cache(cache, path, model_id)
    return cache, path, False

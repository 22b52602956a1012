"""Run with torchrun (2 CPU processes, gloo): the fused log-prob path under FSDP2-sharded parameters.

Outside its own forward a sharded head's weight is a DTensor shard; the trainer therefore computes the fused log-probs
inside the head's forward (see epsdpo/logps/heads.py). This script checks values and every parameter's gradient
against the same model unsharded. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import copy
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from epsdpo.logps import DecisionSpec, LogpsOptions
from epsdpo.logps.heads import policy_logps, reference_side


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    sharded = LlamaForCausalLM(config)
    reference = copy.deepcopy(sharded).requires_grad_(False)
    with torch.no_grad():
        for p in sharded.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain = copy.deepcopy(sharded)
    ids = torch.randint(0, 97, (4, 10), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    labels, mask = ids[:, 1:], attention[:, 1:].clone()
    mask[1, :4] = 0
    ref = reference_side(reference, ids, attention, fused=True)

    spec, options = DecisionSpec(0.01), LogpsOptions(chunk_size=7)
    expected = policy_logps(plain, ids, attention, ref, labels, mask, spec, options, fused=True)
    (expected.policy * torch.arange(1.0, 5.0)).sum().backward()

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded.lm_head, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    assert isinstance(sharded.lm_head.weight, DTensor)  # only a shard outside the forward
    got = policy_logps(sharded, ids, attention, ref, labels, mask, spec, options, fused=True)
    (got.policy * torch.arange(1.0, 5.0)).sum().backward()

    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(sharded.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, atol=1e-5, rtol=1e-4, msg=name)
    print(f"rank {dist.get_rank()}: FSDP2 fused log-probs and gradients match the unsharded model", flush=True)


def shut_down() -> None:
    """End the process without a teardown race (the test failed in 1 of 6 suite runs with SIGABRT, "terminate called
    without an active exception", after both ranks had printed their result).

    Gloo's C++ worker threads can still hold finished collectives' work objects, with tensors that reference Python
    objects, when the interpreter finalizes; destroying them then aborts. So: wait until both ranks are done with
    every collective, release the FSDP2 modules (their state holds the last collectives' buffers) while the
    interpreter is fully alive, destroy the process group, and leave with ``os._exit`` so that no finalizer runs
    after it.
    """
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()  # its modules and tensors are released on return, before the shutdown below
    shut_down()

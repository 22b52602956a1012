"""The Triton kernel of :mod:`epsdpo.logps.vocab`: four log-sum-exps per row from one read of f and g.

Imported only when ``logps_kernel`` resolves to ``triton`` (CUDA with Triton installed, or Triton's interpreter with
``TRITON_INTERPRET=1`` on CPU tensors, as the tests run it).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _fold(m, s, x):
    """One block of a row folded into its running (max, Σ exp(x − max)): an online log-sum-exp."""
    new = tl.maximum(m, tl.max(x, axis=0))
    return new, s * tl.exp(m - new) + tl.sum(tl.exp(x - new), axis=0)


@triton.jit
def _four_lse_kernel(f_ptr, g_ptr, out_ptr, stride, vocab, rows, epsilon, MIX: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``program_id``: out[0] = lse(f), out[1] = lse(g) and, with MIX, out[2] = lse(f + ε(f − g)),
    out[3] = lse(f − ε(f − g)); each element of f and g is loaded once."""
    row = tl.program_id(0)
    f_row = f_ptr + row * stride
    g_row = g_ptr + row * stride
    m_f = tl.full((), float("-inf"), tl.float32)
    m_g = tl.full((), float("-inf"), tl.float32)
    m_w = tl.full((), float("-inf"), tl.float32)
    m_s = tl.full((), float("-inf"), tl.float32)
    s_f = tl.zeros((), tl.float32)
    s_g = tl.zeros((), tl.float32)
    s_w = tl.zeros((), tl.float32)
    s_s = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        f = tl.load(f_row + cols, mask=inside, other=0.0)
        g = tl.load(g_row + cols, mask=inside, other=0.0)
        m_f, s_f = _fold(m_f, s_f, tl.where(inside, f, float("-inf")))
        m_g, s_g = _fold(m_g, s_g, tl.where(inside, g, float("-inf")))
        if MIX:
            step = epsilon * (f - g)
            m_w, s_w = _fold(m_w, s_w, tl.where(inside, f + step, float("-inf")))
            m_s, s_s = _fold(m_s, s_s, tl.where(inside, f - step, float("-inf")))
    tl.store(out_ptr + row, m_f + tl.log(s_f))
    tl.store(out_ptr + rows + row, m_g + tl.log(s_g))
    if MIX:
        tl.store(out_ptr + 2 * rows + row, m_w + tl.log(s_w))
        tl.store(out_ptr + 3 * rows + row, m_s + tl.log(s_s))


#: the launch: columns a program loads per iteration, and warps per program (Triton's default); on a GPU
#: ``benchmarks/vocab_passes.py --device cuda --triton-sweep`` times the alternatives
BLOCK = 4096
NUM_WARPS = 4


def four_lse(f: Tensor, g: Tensor, epsilon: float, out: Tensor, block: int = BLOCK, num_warps: int = NUM_WARPS) -> None:
    """Write the rows' log-sum-exps into ``out`` ((4, c) float32, or (2, c) when ε = 0)."""
    rows, vocab = f.shape
    if rows:
        _four_lse_kernel[(rows,)](
            f, g, out, f.stride(0), vocab, rows, float(epsilon), MIX=epsilon != 0.0, BLOCK=block, num_warps=num_warps
        )

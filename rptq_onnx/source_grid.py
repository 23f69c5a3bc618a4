"""Float weights that already sit on a low-bit grid, found and carried exactly.

A GGUF Q4_0 / Q4_1 / Q8_0 file dequantized on load, or a GPTQ / AWQ checkpoint saved in float,
holds weights that are already block-quantized: every block of B consecutive inputs of an output
row is ``m + d·q`` for integer ``q`` in 0 … 2ⁿ − 1. Requantizing them onto another n-bit grid
(RTN or GPTQ) rounds each value a second time — on SmolLM2's Q4_1 weights that cost more than all
of the activation quantization. Found here, such a weight is stored with its own codes:

    W = (codes − zero_point) · scale + offset          (per block; ``QuantizedWeight.offset``)

``zero_point`` is the kernel's default (2ⁿ⁻¹ for MatMulNBits), ``offset = m + zero_point · d``,
and passes/quantize_weights.py adds the offset term as one small MatMul over the input's block
sums. Where every block's grid passes through 0 (Q4_0, Q8_0, integer zero points) the zero point
is an integer and there is no offset.

``fold_offset`` carries the offset inside the kernel instead (``--grid-offset blocks``): the offsets
[out, blocks] become extra input columns of the same kernel, multiplying the input's block means M(x)
(= block sums / B),

    W·x = (codes − zero_point)·scale·x + B·offset·M(x),   x_ext = [x, M(x), M(x), …]

quantized on the kernel's own symmetric 4-bit grid in two levels (the second holds what the first
rounded off), so one MatMulNBits with no zero-point input (its fast integer path) runs the whole
linear; the codes are untouched and the error is the rounding of the second level (SmolLM2: 0.26 %
of the weights' norm; one level: 4 %; integer zero points instead, 8 %). Each level starts on a
whole block of x_ext and codes each mean once; repeating M(x) (``quant.offset_copies``) instead of
padding it makes x_ext two nodes per input: an AveragePool and a Concat.
"""

from __future__ import annotations

import numpy as np

from rptq_onnx.quant import OFFSET_LEVELS, QuantizedWeight, offset_columns, offset_levels, symmetric_grid

GRID_BLOCKS = (128, 64, 32, 16)  # tried largest first: a grid of 128-blocks is also one of 32-blocks
STEP_TOLERANCE = 1e-3  # of one step
SAMPLE_BLOCKS = 1024
MOSTLY_ON_GRID = 0.5  # below this share of blocks on the widest grid, the weight is float: stop looking


def _fit(blocks: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step, codes, exact) per block of ``blocks`` [R, B] on a grid from each block's min with codes ≤ ``top``.

    Steps tried per block: span / top (a block using the whole grid, as llama.cpp's Q4_1 does), then g,
    g/2, g/3 with g the smallest gap between distinct values (a block using part of the grid)."""
    lo = blocks.min(axis=1)
    slack = 8 * np.finfo(np.float32).eps * np.abs(blocks).max(axis=1)
    gaps = np.diff(np.sort(blocks, axis=1), axis=1)
    gap = np.where(gaps > slack[:, None], gaps, np.inf).min(axis=1)
    step, codes = np.ones(len(blocks)), np.zeros_like(blocks)
    exact = np.zeros(len(blocks), bool)
    span = blocks.max(axis=1) - lo
    for cand in (span / top, gap, gap / 2, gap / 3):
        cand = np.where(np.isfinite(cand) & (cand > 0), cand, 1.0)  # a constant block: any step
        c = np.rint((blocks - lo[:, None]) / cand[:, None])
        cand = np.where(c.max(axis=1) > 0, span / np.maximum(c.max(axis=1), 1), cand)  # the step from the span
        c = np.rint((blocks - lo[:, None]) / cand[:, None])
        err = np.abs(c * cand[:, None] + lo[:, None] - blocks).max(axis=1)
        take = (err <= STEP_TOLERANCE * cand + slack) & (c.max(axis=1) <= top) & ~exact
        step[take], codes[take], exact[take] = cand[take], c[take], True
    return step, codes, exact


def find_grid(w: np.ndarray, bits: int, block: int) -> QuantizedWeight | None:
    """``w`` [out, in] as exact ``bits``-bit codes in blocks of ``block`` inputs, or None if any block is off grid."""
    out, cols = w.shape
    if cols % block:
        return None
    top = (1 << bits) - 1
    flat = w.reshape(-1, block)
    if _fit(np.asarray(flat[:SAMPLE_BLOCKS], np.float64), top)[2].mean() < MOSTLY_ON_GRID:
        return None  # a float weight: rejected on its first blocks
    flat = np.asarray(flat, np.float64)
    step, codes, exact = _fit(flat, top)
    if not exact.all():
        return None
    lo = flat.min(axis=1)
    shape = (out, cols // block)
    codes, scale = codes.reshape(out, cols).astype(np.uint8), step.reshape(shape).astype(np.float32)
    # a grid through 0 on every block (Q4_0, Q8_0, integer zero points): an integer zero point, no offset
    zp = -lo / np.where(step > 0, step, 1.0)
    if np.all((np.abs(zp - np.rint(zp)) <= STEP_TOLERANCE) & (np.rint(zp) >= 0) & (np.rint(zp) <= top)):
        return QuantizedWeight(codes=codes, scale=scale, zero_point=np.rint(zp).reshape(shape).astype(np.uint8),
                               bits=bits, group_size=block)
    mid = 1 << (bits - 1)  # MatMulNBits' default zero point
    return QuantizedWeight(codes=codes, scale=scale, zero_point=np.full(shape, mid, np.uint8), bits=bits,
                           group_size=block, offset=(lo + mid * step).reshape(shape).astype(np.float32))


def weight_on_grid(w: np.ndarray, bits: int) -> QuantizedWeight | None:
    """``w`` [out, in] with the widest block (128, 64, 32, 16) on which it sits on a ``bits``-bit grid, or None."""
    for block in GRID_BLOCKS:
        found = find_grid(w, bits, block)
        if found is not None:
            return found
    return None


def fold_offset(qw: QuantizedWeight, levels: int = OFFSET_LEVELS) -> QuantizedWeight:
    """``qw`` (codes with a float ``offset`` per block, the kernel's default zero point) with the offsets as
    extra blocks of codes over the input extended by its block means (module docstring): [out, k + extra,
    rounded up to whole blocks] columns, every zero point the default. Each level codes every block's mean
    once, at its first column in the level; the level's other columns (repeated means) get code zero."""
    n, k = qw.codes.shape
    bs, mid = qw.group_size, 1 << (qw.bits - 1)
    means = k // bs
    padded = -(-offset_columns(k, bs, levels) // bs) * bs
    codes = np.full((n, padded), mid, np.float64)
    scale = np.ones((n, padded // bs))
    rest = qw.offset.astype(np.float64) * bs  # the coefficient of each block's mean: offset × block sum
    for columns in offset_levels(k, bs, levels):
        seen: set[int] = set()
        for first in range(columns.start, columns.stop, bs):
            cols = []
            for c in range(first, min(columns.stop, first + bs)):
                if c % means not in seen:
                    seen.add(c % means)
                    cols.append(c)
            if not cols:
                continue
            which = np.array(cols) % means
            part = rest[:, which]
            q, step = symmetric_grid(part, qw.bits)
            codes[:, cols] = q + mid
            scale[:, first // bs] = step
            rest[:, which] = part - q * step[:, None]
    return QuantizedWeight(codes=np.concatenate([qw.codes, codes], axis=1).astype(np.uint8),
                           scale=np.concatenate([qw.scale, scale], axis=1).astype(np.float32),
                           zero_point=np.full((n, (k + padded) // bs), mid, np.uint8), bits=qw.bits, group_size=bs)


def integer_zero_points(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) [out, blocks] of ``qw``'s grid (codes with a float ``offset`` per block) with each block's
    zero point rounded to a whole code (the attention linears under ``--source-grid keep-mlp``): the grid keeps its
    step and moves by less than half a step, so a MatMulNBits with an integer zero-point input carries it, with no
    offset; a block whose values all have one sign (its zero point off the codes) takes the step that reaches its
    far end from 0 instead."""
    top, mid = (1 << qw.bits) - 1, 1 << (qw.bits - 1)
    scale = qw.scale.astype(np.float64)
    lo = qw.offset.astype(np.float64) - mid * scale  # the block's value at code 0
    hi = lo + top * scale
    zp = np.rint(-lo / scale)
    scale = np.where(zp < 0, hi / top, np.where(zp > top, -lo / top, scale))
    return scale.astype(np.float32), np.clip(zp, 0, top).astype(np.uint8)

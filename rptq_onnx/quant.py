"""Quantization math: activation qparams per cluster, weight quantizers (RTN, GPTQ), 4-bit packing.

Activations (asymmetric, per cluster, the reference's scale): for a cluster with range
[lo, hi], widened to include 0 (``lo ≤ 0 ≤ hi``),

    scale = (hi − lo) / 2ⁿ,   zero_point = clip(round(−(hi + lo) / (2·scale)) + 2ⁿ⁻¹, 0, 2ⁿ − 1)

on the unsigned grid [0, 2ⁿ − 1] (= the reference's signed grid shifted by 2ⁿ⁻¹; like the
reference, the top value clips by one step). The widening is the ONNX-representable rule: a
uint Q/DQ zero point must lie on the grid, which a range excluding 0 cannot give. It only
changes clusters whose range excludes 0 (e.g. a positive-only LayerNorm channel group).

Weights (asymmetric, per output channel or per group along the input, GPTQ's quantizer):
``scale = (hi − lo) / (2ⁿ − 1)``, ``zero_point = round(−lo / scale)`` with lo ≤ 0 ≤ hi.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-8


@dataclass(frozen=True)
class QParams:
    """Per-channel scale and zero point (float32 / int64), plus the grid size."""

    scale: np.ndarray
    zero_point: np.ndarray
    bits: int

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def activation_qparams(ch_max: np.ndarray, ch_min: np.ndarray, labels: np.ndarray, bits: int) -> QParams:
    """One scale/zero point per cluster (``labels`` per channel), repeated over its channels."""
    ch_max = np.asarray(ch_max, np.float64)
    ch_min = np.asarray(ch_min, np.float64)
    k = int(labels.max()) + 1
    hi = np.full(k, -np.inf)
    lo = np.full(k, np.inf)
    np.maximum.at(hi, labels, ch_max)
    np.minimum.at(lo, labels, ch_min)
    hi, lo = np.maximum(hi, 0.0), np.minimum(lo, 0.0)
    scale = np.maximum((hi - lo) / (1 << bits), EPS)
    zp = np.clip(np.round(-(hi + lo) / (2 * scale)) + (1 << (bits - 1)), 0, (1 << bits) - 1)
    return QParams(scale=scale[labels].astype(np.float32), zero_point=zp[labels].astype(np.int64), bits=bits)


def symmetric_activation_qparams(ch_max: np.ndarray, ch_min: np.ndarray, labels: np.ndarray, bits: int) -> QParams:
    """As ``activation_qparams`` with each cluster's range made symmetric, [−a, a] with a = max(|hi|, |lo|):
    the zero point is the middle of the grid, 2ⁿ⁻¹ (GroupQueryAttention's signed cache grid)."""
    a = np.maximum(np.abs(np.asarray(ch_max, np.float64)), np.abs(np.asarray(ch_min, np.float64)))
    return activation_qparams(a, -a, labels, bits)


def fake_quant(x: np.ndarray, qp: QParams) -> tuple[np.ndarray, np.ndarray]:
    """(integer codes, dequantized) of ``x`` [..., C], exactly as ONNX Q/DQ on axis −1 compute them."""
    x = np.asarray(x, np.float32)
    q = np.clip(np.round(x / qp.scale) + qp.zero_point, 0, qp.qmax)  # np.round: half to even, as ONNX
    return q.astype(np.int64), ((q - qp.zero_point) * qp.scale).astype(np.float32)


# ----------------------------------------------------------------------------------- weights


def weight_grid(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (scale, zero point) of ``w`` [rows, cols] on [0, 2ⁿ − 1], range widened to include 0."""
    hi = np.maximum(w.max(axis=1), 0.0)
    lo = np.minimum(w.min(axis=1), 0.0)
    qmax = (1 << bits) - 1
    scale = (hi - lo) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    zp = np.clip(np.round(-lo / scale), 0, qmax)
    return scale, zp


def _quantize_cols(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(w / scale[:, None]) + zp[:, None], 0, (1 << bits) - 1)


@dataclass(frozen=True)
class QuantizedWeight:
    """``codes`` [out, in] uint, ``scale``/``zero_point`` [out, groups]; group = in // groups columns.

    ``offset`` [out, groups] (float, or None for 0): added to every dequantized value of its group,
    for codes kept from a source already on a grid with a float minimum (rptq_onnx/source_grid.py)."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    group_size: int | None
    offset: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        g = self.codes.shape[1] if self.group_size is None else self.group_size
        s = np.repeat(self.scale, g, axis=1)
        z = np.repeat(self.zero_point, g, axis=1)
        w = (self.codes.astype(np.float32) - z) * s
        if self.offset is not None:
            w = w + np.repeat(self.offset, g, axis=1)
        return w.astype(np.float32)


def _groups(cols: int, group_size: int | None) -> int:
    if group_size is None:
        return 1
    if cols % group_size:
        raise ValueError(f"input size {cols} is not a multiple of group size {group_size}")
    return cols // group_size


def quantize_rtn(w: np.ndarray, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """Round-to-nearest of ``w`` [out, in] per output channel (and per input group)."""
    w = np.asarray(w, np.float64)
    out, cols = w.shape
    ng = _groups(cols, group_size)
    g = cols // ng
    codes = np.empty_like(w)
    scales, zps = np.empty((out, ng)), np.empty((out, ng))
    for j in range(ng):
        part = w[:, j * g:(j + 1) * g]
        s, z = weight_grid(part, bits)
        codes[:, j * g:(j + 1) * g] = _quantize_cols(part, s, z, bits)
        scales[:, j], zps[:, j] = s, z
    return QuantizedWeight(codes.astype(np.uint8), scales.astype(np.float32), zps.astype(np.uint8), bits, group_size)


def quantize_on_grid(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int,
                     group_size: int | None) -> QuantizedWeight:
    """Round-to-nearest of ``w`` [out, in] on a given grid: ``scale``/``zero_point`` [out, groups]."""
    g = w.shape[1] if group_size is None else group_size
    s, z = np.repeat(scale, g, axis=1).astype(np.float64), np.repeat(zero_point, g, axis=1).astype(np.float64)
    codes = np.clip(np.rint(np.asarray(w, np.float64) / s) + z, 0, (1 << bits) - 1)
    return QuantizedWeight(codes.astype(np.uint8), scale.astype(np.float32), zero_point.astype(np.uint8), bits,
                           group_size)


def symmetric_grid(blocks: np.ndarray, bits: int, shrinks=(1.0,)) -> tuple[np.ndarray, np.ndarray]:
    """(signed codes −2^(bits−1) … 2^(bits−1) − 1 like ``blocks`` [..., block], step [...]) on a symmetric grid
    per block: the smallest step that clips nothing, shrunk by the factor of ``shrinks`` with the least squared
    error."""
    mid = 1 << (bits - 1)
    full = np.maximum(blocks.max(axis=-1) / (mid - 1), -blocks.min(axis=-1) / mid)
    full = np.where(full > 0, full, 1.0)
    best, step = np.full(full.shape, np.inf), full
    for shrink in shrinks:
        s = full * shrink
        err = ((np.clip(np.rint(blocks / s[..., None]), -mid, mid - 1) * s[..., None] - blocks) ** 2).sum(axis=-1)
        better = err < best
        best, step = np.where(better, err, best), np.where(better, s, step)
    return np.clip(np.rint(blocks / step[..., None]), -mid, mid - 1), step


def quantize_symmetric(w: np.ndarray, bits: int, group_size: int, shrinks=(1.0,)) -> QuantizedWeight:
    """Round-to-nearest of ``w`` [out, in] on a symmetric grid per block of ``group_size`` inputs (every zero point
    2^(bits−1), as MatMulNBits assumes without a zero-point input; each block's step from ``symmetric_grid``)."""
    w = np.asarray(w, np.float64)
    out, cols = w.shape
    mid = 1 << (bits - 1)
    codes, step = symmetric_grid(w.reshape(out, _groups(cols, group_size), group_size), bits, shrinks)
    return QuantizedWeight((codes + mid).reshape(out, cols).astype(np.uint8), step.astype(np.float32),
                           np.full(step.shape, mid, np.uint8), bits, group_size)


def _weight_grid_t(w, bits: int):
    """``weight_grid`` on a torch tensor."""
    import torch

    hi, lo = w.amax(dim=1).clamp(min=0.0), w.amin(dim=1).clamp(max=0.0)
    qmax = (1 << bits) - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.clamp(torch.round(-lo / scale), 0, qmax)


def quantize_gptq(w: np.ndarray, hessian: np.ndarray, bits: int, group_size: int | None = None,
                  damp: float = 0.01, block: int = 128, overwrite_hessian: bool = False,
                  grid: tuple[np.ndarray, np.ndarray] | None = None) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): quantize columns in order, compensating each column's error
    on the not-yet-quantized columns through the inverse Hessian (H = 2·XᵀX of the input).

    In float32 with torch, as the reference: H⁻¹'s upper Cholesky factor from LAPACK (Cholesky,
    ``cholesky_inverse``, Cholesky), columns one by one inside blocks of ``block``, and each
    block's error applied to the remaining columns as one GEMM (``tools/bench_gptq.py``: 2048 ×
    8192 in ≈ 11 s on 2 busy cores, 4.6× the float64 NumPy version it replaced).
    Dampening: ``damp × mean(diag H)`` is added to the diagonal. Columns whose input was never
    active (diag H = 0) are zeroed, as in the reference. ``overwrite_hessian``: a float32 ``hessian``
    is used as scratch (it ends holding H⁻¹'s factor) instead of copied (268 MB saved for 8,192 inputs).
    ``grid``: (scale, zero point) [out, groups] fixed in advance (a 4-bit head's symmetric steps,
    passes/quantize_head.py); GPTQ then only chooses the codes.
    """
    import torch

    qmax = (1 << bits) - 1
    w_t = torch.tensor(np.asarray(w), dtype=torch.float32)
    out, cols = w_t.shape
    scratch = overwrite_hessian and isinstance(hessian, np.ndarray) and hessian.dtype == np.float32 \
        and hessian.flags.c_contiguous and hessian.flags.writeable
    h = torch.from_numpy(hessian) if scratch else torch.tensor(np.asarray(hessian), dtype=torch.float32)
    del hessian
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w_t[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    # H⁻¹'s upper Cholesky factor, each step in place: one [C, C] float32 in all (1 GiB for C = 16,384)
    torch.linalg.cholesky(h, out=h)
    torch.cholesky_inverse(h, out=h)
    u = torch.linalg.cholesky(h, upper=True, out=h)

    ng = _groups(cols, group_size)
    g = cols // ng
    scales, zps = torch.empty((out, ng)), torch.empty((out, ng))
    fixed = grid is not None
    if fixed:
        scales, zps = (torch.tensor(np.asarray(a, np.float32).reshape(out, ng)) for a in grid)
    elif group_size is None:
        scales[:, 0], zps[:, 0] = _weight_grid_t(w_t, bits)
    codes = torch.empty_like(w_t)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb = w_t[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if group_size is not None and col % g == 0 and not fixed:  # the group's grid from its columns as updated so far
                ahead = torch.cat([wb[:, i:], w_t[:, b1:b1 + max(0, g - (b1 - b0 - i))]], 1)[:, :g]
                scales[:, col // g], zps[:, col // g] = _weight_grid_t(ahead, bits)
            s, z = scales[:, col // g], zps[:, col // g]
            q = torch.clamp(torch.round(wb[:, i] / s) + z, 0, qmax)
            codes[:, col] = q
            e = (wb[:, i] - (q - z) * s) / ub[i, i]
            wb[:, i + 1:] -= torch.outer(e, ub[i, i + 1:])
            err[:, i] = e
        w_t[:, b1:] -= err @ u[b0:b1, b1:]
    return QuantizedWeight(codes.to(torch.uint8).numpy(), scales.numpy().astype(np.float32),
                           zps.to(torch.uint8).numpy(), bits, group_size)


def pack_uint4(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, low nibble first (MatMulNBits / ONNX uint4)."""
    codes = np.asarray(codes, np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_uint4(packed: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` 4-bit values along the last axis of ``packed`` (the inverse of ``pack_uint4``)."""
    packed = np.asarray(packed, np.uint8)
    both = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :count]


# ``source_grid.fold_offset`` (``--grid-offset blocks``): a kept grid's per-block offsets as extra blocks of codes
# over the input's block means, in this many levels (the second holds what the first rounded off)
OFFSET_LEVELS = 2


def _level_width(k: int, block: int) -> int:
    """The extra columns of each level but the last: the whole blocks that hold the k / block means once."""
    return -(-(k // block) // block) * block


def offset_copies(k: int, block: int, levels: int = OFFSET_LEVELS) -> int:
    """How many copies of x's k / block block means follow x in the extended input ``fold_offset``'s codes read:
    enough that each level starts on a whole block and the last one still sees every mean once."""
    means = k // block
    return -(-((levels - 1) * _level_width(k, block) + means) // means)


def offset_columns(k: int, block: int, levels: int = OFFSET_LEVELS) -> int:
    """The extra input columns ``fold_offset`` adds to a linear with ``k`` inputs (the kernel's K grows by it;
    its last block may be a partial one)."""
    return offset_copies(k, block, levels) * (k // block)


def offset_levels(k: int, block: int, levels: int = OFFSET_LEVELS) -> list[range]:
    """The extra columns of each level: whole blocks, the last level to the end."""
    width, per_level = offset_columns(k, block, levels), _level_width(k, block)
    return [range(i * per_level, width if i == levels - 1 else (i + 1) * per_level) for i in range(levels)]


def block_mean_columns(k: int, block: int, levels: int = OFFSET_LEVELS) -> np.ndarray:
    """[k, extra columns]: x · it = the extended input's columns after x (each block mean, copy after copy)."""
    width, means = offset_columns(k, block, levels), k // block
    return (np.arange(k)[:, None] // block == np.arange(width)[None, :] % means).astype(np.float32) / block


def unfold_offset(extended: np.ndarray, k: int, block: int) -> np.ndarray:
    """The weight [out, k] that ``extended`` [out, k + extra columns (or more)] applies to x through its
    extended input."""
    member = block_mean_columns(k, block)
    return extended[:, :k] + extended[:, k:k + member.shape[1]] @ member.T


def dequantize_matmulnbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int,
                           bits: int, block_size: int) -> np.ndarray:
    """The float weight [N, K] that a ``com.microsoft:MatMulNBits`` node multiplies by."""
    blocks = -(-k // block_size)
    codes = b.reshape(n, blocks, -1)
    if bits == 4:
        codes = unpack_uint4(codes, block_size)
    if zero_points is None:
        zp = np.full((n, blocks), 1 << (bits - 1), np.float32)
    else:
        zp = zero_points.reshape(n, -1)
        zp = unpack_uint4(zp, blocks) if bits == 4 else zp[:, :blocks]
    w = (codes.astype(np.float32) - zp[..., None].astype(np.float32)) * scales.reshape(n, blocks, 1)
    return w.reshape(n, -1)[:, :k].astype(np.float32)


def dequantized_weight(index, lin) -> np.ndarray:
    """A linear's weight as [in, out] float32, as the graph computes with it (``index``: a GraphIndex;
    ``lin``: an anatomy Linear): float, DequantizeLinear codes (per channel or blocked) or MatMulNBits."""
    import onnx

    node = index.node_by_name[lin.node]

    def const(name):
        return np.asarray(index.constant_value(name))

    if node.op_type == "MatMulNBits":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        zp = const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        w = dequantize_matmulnbits(const(node.input[1]), const(node.input[2]), zp, attrs["K"], attrs["N"],
                                   attrs["bits"], attrs["block_size"])
        offset = f"{node.name.removesuffix('.matmulnbits')}.offset"  # [K/bs, N], codes kept from a source grid
        if offset in index.initializers:
            w = w + np.repeat(const(offset).T, attrs["block_size"], axis=1)
        from rptq_onnx.graph import extended_input

        extended = extended_input(index, node.input[0], attrs["K"])
        if extended is not None:  # the offsets as extra blocks over the input's block means
            w = unfold_offset(w, extended[1], extended[2])
        return w.T
    producer = index.producer.get(node.input[1])
    if producer is not None and producer.op_type == "DequantizeLinear":
        codes = const(producer.input[0]).astype(np.float32)
        scale = const(producer.input[1]).astype(np.float32)
        zp = const(producer.input[2]).astype(np.float32)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in producer.attribute}
        axis = attrs.get("axis", 1)
        if "block_size" in attrs and scale.ndim == 2:
            scale = np.repeat(scale, attrs["block_size"], axis=axis)
            zp = np.repeat(zp, attrs["block_size"], axis=axis)
        else:
            shape = [1, 1]
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        w = (codes - zp) * scale
    else:
        w = const(node.input[1]).astype(np.float32)
    return w.T if lin.weight_layout == "out_in" else w

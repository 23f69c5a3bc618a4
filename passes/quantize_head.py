"""Pass: the token embedding and the LM head in low bits (``compile --head-bits 8|4``).

Both read the vocabulary table W [vocab, hidden] (one initializer when tied, as OPT and
SmolLM2 export it: ``Gather(W, input_ids)`` and ``MatMul(x, Transpose(W))``). The table is
quantized once in blocks of ``block_size`` along the hidden axis (8 bits: RTN, asymmetric; 4 bits:
symmetric, as GenAI's builder does, each block's step the one of a few shrinks with the least squared
error), and the same codes feed two ONNX Runtime contrib kernels that keep them packed in memory:

- the head: ``com.microsoft:MatMulNBits`` (N = vocab, K = hidden); a 4-bit head has no zero-point
  input, which keeps the kernel on its symmetric path: at accuracy level 4 a zero-point input costs
  about a quarter more per call (SmolLM2: the head decodes 0.2–0.3 ms/token faster; perplexity
  26.86 → 27.20 against the asymmetric codes, docs/genai.md);
- the embedding: ``com.microsoft:GatherBlockQuantized`` (gather_axis 0, quantize_axis 1), which
  gathers the rows and dequantizes only those.

Each kernel gets its own initializer (the two kernels want different shapes of the same bytes),
so the file holds the codes twice; in memory MatMulNBits repacks its copy at session creation.
That replaces the float table, and in an FP graph the transposed float copy ONNX Runtime folds
``Transpose(W)`` into at session creation: 2 × 113 MB on SmolLM2.

8-bit heads set MatMulNBits' ``accuracy_level`` 4 (the input is quantized to int8 per block on
the fly, then an integer GEMM): level 0 of the 8-bit kernel dequantizes the whole table every
call, ≈ 10× slower than a float MatMul. 4-bit heads take the level of the 4-bit linears
(``--accuracy-level``). The README's *Low-bit weights in memory* gives the
measured cost of each choice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rptq_onnx.config import HEAD_BITS
from rptq_onnx.errors import RptqError
from rptq_onnx.graph import GraphIndex, node_attr, prune_dead_nodes
from rptq_onnx.passes.base import Pass, PassResult
from rptq_onnx.passes.quantize_weights import INT8_ACCURACY_LEVEL
from rptq_onnx.observers import SHRINKS
from rptq_onnx.quant import pack_uint4, quantize_gptq, quantize_rtn, quantize_symmetric
from rptq_onnx.vocabulary import EMBEDDING_PREFIX, HEAD_PREFIX

DEFAULT_BLOCK = 32


@dataclass(frozen=True)
class VocabTables:
    """Where the graph reads its vocabulary tables (the same initializer when tied)."""

    head: onnx.NodeProto  # the MatMul producing the logits
    head_weight: str  # initializer [vocab, hidden] (behind a Transpose) or [hidden, vocab]
    head_transposed: bool  # head_weight is [vocab, hidden], read through a Transpose
    embedding: onnx.NodeProto | None  # Gather(table, input_ids)
    embedding_weight: str | None

    @property
    def tied(self) -> bool:
        return self.embedding_weight == self.head_weight and self.head_transposed


def find_vocab_tables(model: onnx.ModelProto, logits: str = "logits") -> VocabTables:
    index = GraphIndex(model)
    head = index.producer.get(logits)
    if head is None or head.op_type != "MatMul":
        raise RptqError(f"--head-bits: the graph's '{logits}' output does not come from a MatMul; "
                        "use --head-bits 16 for this graph")
    weight, transposed = index.constant_source(head.input[1]), False
    feeder = index.producer.get(head.input[1])
    if weight is None and feeder is not None and feeder.op_type == "Transpose" and \
            node_attr(feeder, "perm", [1, 0]) == [1, 0]:
        weight, transposed = index.constant_source(feeder.input[0]), True
    if weight not in index.initializers:
        raise RptqError("--head-bits: the LM head's weight is not a constant of the graph; use --head-bits 16")
    embedding = embedding_gather(index)
    return VocabTables(head=head, head_weight=weight, head_transposed=transposed, embedding=embedding,
                       embedding_weight=index.constant_source(embedding.input[0]) if embedding is not None else None)


_ID_MOVES = ("Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten")


def embedding_gather(index: GraphIndex) -> onnx.NodeProto | None:
    """The Gather of a constant table by the token ids (OPT's export reshapes the ids first)."""
    frontier = ["input_ids"]
    while frontier:
        tensor = frontier.pop()
        for node in index.value_readers(tensor):
            if node.op_type == "Gather" and node.input[1] == tensor and index.constant_source(node.input[0]) \
                    in index.initializers and node_attr(node, "axis", 0) == 0:
                return node
            if node.op_type in _ID_MOVES and node.input[0] == tensor:
                frontier.extend(node.output)
    return None


def _codes(table: np.ndarray, bits: int, block: int, rows: int = 4096, hessian: np.ndarray | None = None):
    """(codes as the kernels store them [vocab, hidden·bits/8], scales [vocab, blocks], zero points), made
    ``rows`` rows at a time (rows are independent; the float temporaries stay small for a 50k vocabulary).
    4 bits: symmetric, each block's step the best of ``observers.SHRINKS``, and with ``hessian`` (the head
    input's 2·XᵀX / tokens) the codes on those steps chosen by GPTQ; 8 bits: asymmetric RTN."""
    parts = []
    for r in range(0, len(table), rows):
        part = table[r:r + rows]
        qw = quantize_symmetric(part, bits, block, SHRINKS) if bits == 4 else quantize_rtn(part, bits, block)
        if bits == 4 and hessian is not None:
            qw = quantize_gptq(part, hessian, bits, block, grid=(qw.scale, qw.zero_point))
        codes, zp = qw.codes.astype(np.uint8), qw.zero_point.astype(np.uint8)
        if bits == 4:
            codes, zp = pack_uint4(codes), pack_uint4(zp)  # two per byte, low nibble first, per row
        parts.append((codes, qw.scale.astype(np.float32), zp))
    return tuple(np.concatenate(column) for column in zip(*parts))


def check_block(hidden: int, block: int) -> None:
    if block < 16 or block & (block - 1) or hidden % block:
        raise RptqError(f"--head-bits: block {block} must be a power of two ≥ 16 dividing the hidden size {hidden}")


@dataclass
class HeadReport:
    bits: int
    block_size: int | None = None
    vocab: int | None = None
    hidden: int | None = None
    tied: bool | None = None  # the embedding and the head read one table
    codes: str | None = None  # how the 4-bit codes were chosen: "gptq" (on the head input's Hessian) or "rtn"
    head: str | None = None  # the head's kernel
    embedding: str | None = None  # the embedding's kernel; None: no embedding Gather found

    def as_dict(self) -> dict:
        return {"bits": 16} if self.bits == 16 else dataclasses.asdict(self)


class QuantizeHead(Pass[HeadReport]):
    """The LM head (and token embedding) as ``bits``-bit codes, edited in place; 16: unchanged."""

    name = "quantize_head"

    def __init__(self, bits: int, block_size: int = DEFAULT_BLOCK, accuracy_level: int = 0,
                 hessian: np.ndarray | None = None):
        self.bits, self.block_size, self.accuracy_level, self.hessian = bits, block_size, accuracy_level, hessian

    def requires(self, model: onnx.ModelProto) -> str | None:
        return None if self.bits in HEAD_BITS else f"--head-bits {self.bits} is not supported; use 4, 8 or 16 (float)"

    def apply(self, model: onnx.ModelProto) -> PassResult[HeadReport]:
        bits, block_size = self.bits, self.block_size
        if bits == 16:
            return PassResult(model, HeadReport(bits=16), modified=False)
        g = model.graph
        tables = find_vocab_tables(model)
        inits = {t.name: t for t in g.initializer}
        new_inits: list[onnx.TensorProto] = []
        replaced: dict[str, onnx.NodeProto] = {}

        def quantized(name: str, transposed: bool):
            table = numpy_helper.to_array(inits[name]).astype(np.float32, copy=False)
            table = table if transposed else table.T  # [vocab, hidden]
            check_block(table.shape[1], block_size)
            return table.shape, _codes(table, bits, block_size, hessian=self.hessian)

        (vocab, hidden), (codes, scale, zp) = quantized(tables.head_weight, tables.head_transposed)
        blocks = hidden // block_size
        p = HEAD_PREFIX
        new_inits += [numpy_helper.from_array(np.ascontiguousarray(codes.reshape(vocab, blocks, -1)), f"{p}B"),
                      numpy_helper.from_array(np.ascontiguousarray(scale.reshape(-1)), f"{p}scales")]
        inputs = [tables.head.input[0], f"{p}B", f"{p}scales"]
        if bits != 4:  # 4-bit codes are symmetric: the kernel's default zero point, no input (its faster path)
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(zp), f"{p}zero_points"))
            inputs.append(f"{p}zero_points")
        attrs = dict(K=hidden, N=vocab, bits=bits, block_size=block_size)
        level = INT8_ACCURACY_LEVEL if bits == 8 else self.accuracy_level
        if level:
            attrs["accuracy_level"] = level
        head = tables.head
        replaced[head.name] = helper.make_node("MatMulNBits", inputs, [head.output[0]], name=f"{p}matmulnbits",
                                               domain="com.microsoft", **attrs)
        report = HeadReport(bits=bits, block_size=block_size, vocab=vocab, hidden=hidden, tied=tables.tied,
                            head="MatMulNBits", codes="gptq" if bits == 4 and self.hessian is not None else "rtn")
        if tables.embedding is not None:
            e = EMBEDDING_PREFIX
            if not tables.tied:
                _, (codes, scale, zp) = quantized(tables.embedding_weight, True)
            new_inits += [numpy_helper.from_array(np.ascontiguousarray(codes), f"{e}data"),
                          numpy_helper.from_array(np.ascontiguousarray(scale), f"{e}scales"),
                          numpy_helper.from_array(np.ascontiguousarray(zp), f"{e}zero_points")]
            emb = tables.embedding
            replaced[emb.name] = helper.make_node(
                "GatherBlockQuantized", [f"{e}data", emb.input[1], f"{e}scales", f"{e}zero_points"], [emb.output[0]],
                name=f"{e}gather", domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block_size,
                bits=bits)
            report.embedding = "GatherBlockQuantized"
        nodes = [replaced.get(n.name, n) for n in g.node]
        del g.node[:]
        g.node.extend(nodes)
        g.initializer.extend(new_inits)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        prune_dead_nodes(model)  # the float table and its Transpose
        return PassResult(model, report)


def head_input(model: onnx.ModelProto) -> str:
    """The tensor the LM head multiplies (the final norm's output): where a 4-bit head's Hessian is gathered."""
    return find_vocab_tables(model).head.input[0]


def quantize_head(model: onnx.ModelProto, bits: int, block_size: int = DEFAULT_BLOCK,
                  accuracy_level: int = 0) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with its LM head (and token embedding) as ``bits``-bit codes (``QuantizeHead``);
    returns (model, report); 16: ``model`` itself."""
    if bits == 16:
        return model, HeadReport(bits=16).as_dict()
    result = QuantizeHead(bits, block_size, accuracy_level).run(model)
    return result.model, result.report.as_dict()

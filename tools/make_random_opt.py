"""Write a seeded random OPT: a Hugging Face directory, or (``--onnx``) its ONNX export, streamed layer by layer.

    python -m rptq_onnx.tools.make_random_opt OUT_DIR [--shapes tiny|opt-125m] [--layers N] [--seed 0] [--tokenizer]
    python -m rptq_onnx.tools.make_random_opt OUT_DIR --onnx [--shapes tiny|opt-125m|opt-1.3b|opt-6.7b]
                                              [--layers N] [--seed 0] [--tokenizer]

The Hugging Face directory is built by transformers, which holds the whole model (and exporting it
takes about 3.6× its size). ``--onnx`` writes what ``rptq-onnx export`` writes for such a model with
its KV cache (model.onnx + model.onnx.data, export.json, config.json, generation_config.json,
genai_config.json; ``--tokenizer`` adds the small BPE ``rptq-onnx generate`` needs), the same graph,
without ever holding the model:

1. **template**: a random OPT of the same widths with 2 layers (1 for ``--layers 1``), exported by
   ``export.to_onnx`` in a child process; its weights are dropped there.
2. **split**: layer 0 is the nodes computed from its input (what its attention LayerNorm reads) and
   not from layer 1's input; layer 1 the next as many nodes computed from layer 1's input (the same
   ops); the rest is the head. Nodes that read no layer's data (attention mask, shape arithmetic)
   are computed once for all layers, as in the export.
3. **repeat**: layer 1's nodes once more for each further layer, its tensors, initializers, past
   inputs and present outputs renamed (``layers.1.`` → ``layers.K.``, ``past_key_values.1.`` →
   ``past_key_values.K.``, ``present.1.`` → ``present.K.``, other names get ``.layerK``); each copy
   reads the previous layer's output, the head the last one's.
4. **weights**: every float initializer with a dimension is drawn as ``models.random_opt`` draws
   it, by the op that reads it (LayerNorm γ 1 + 0.2·N(0, 1), β 0.1·N(0, 1), biases 0.05·N(0, 1),
   embeddings 0.1·N(0, 1), linear weights N(0, 1/fan_in)), from a generator seeded by (seed, the
   initializer's name), and streamed to model.onnx.data in chunks of ≤ 32 MiB at 4 KiB-aligned
   offsets. The template's small constants stay inline in model.onnx.

Same seed, same bytes; a layer's weights do not depend on ``--layers`` (past 1). The peak memory is
the template's export (the embedding and two layers, about twice over); streaming holds the graph
and a few chunks. Measured on 2 shared CPU cores (README "Large random models"): opt-1.3b, 5.26 GB
in 1 min 47 s, peak RSS 2.5 GB; opt-6.7b, 26.6 GB in 5 min 13 s, peak RSS 5.6 GB; 0.44 GB while
streaming either.
"""

from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from rptq_onnx.artifacts import MODEL_FILES, OWNED_FILES, RECORD_NAME
from rptq_onnx.errors import RptqError
from rptq_onnx.models import OPT_1_3B_SHAPES, OPT_6_7B_SHAPES, OPT_125M_SHAPES, TINY_SHAPES, save_random_opt

SHAPES = {"tiny": TINY_SHAPES, "opt-125m": OPT_125M_SHAPES, "opt-1.3b": OPT_1_3B_SHAPES, "opt-6.7b": OPT_6_7B_SHAPES}
DATA_NAME = MODEL_FILES[1]  # model.onnx.data
ALIGN = 4096  # tensor offsets in the .data file (ORT maps page-aligned tensors)
CHUNK_BYTES = 32 << 20  # rows drawn and written at a time
TEMPLATE_LAYERS = 2
_LAYER_1 = re.compile(r"(?<=layers\.)1(?!\d)|(?<=^past_key_values\.)1(?=\.)|(?<=^present\.)1(?=\.)")


def write_onnx_opt(out_dir: str | Path, shapes: dict, seed: int = 0, label: str = "custom",
                   tokenizer: bool = False) -> dict:
    """Write a random OPT with ``shapes`` (random_opt's config keys) as an exported model in ``out_dir``;
    ``tokenizer``: with save_random_opt's small BPE beside it (for ``rptq-onnx generate``).

    Returns timings and sizes: ``{"template_s", "weights_s", "data_bytes"}``. ``out_dir`` must not
    exist or be empty; everything is written to a staging directory beside it, then moved in."""
    from rptq_onnx.graph import staged_output
    from rptq_onnx.outdir import claim_output

    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()):
        raise RptqError(f"{out_dir}: exists and is not empty; choose a new OUT_DIR (the writer never overwrites)")
    layers = shapes["num_hidden_layers"]
    with claim_output(out_dir, need_bytes=parameter_bytes(shapes)):
        start = time.perf_counter()
        hf_config, generation_config, template = _template(shapes)
        model = stack_layers(template, layers)
        template_s = time.perf_counter() - start
        with staged_output(out_dir, owns=OWNED_FILES) as stage:
            data_bytes = write_weights(model, stage / DATA_NAME, seed)
            (stage / "model.onnx").write_bytes(model.SerializeToString())
            _write_side_files(stage, model, hf_config, generation_config, layers, seed, label, tokenizer)
        return {"template_s": template_s, "weights_s": time.perf_counter() - start - template_s,
                "data_bytes": data_bytes}


def parameter_bytes(shapes: dict) -> int:
    """fp32 bytes of an OPT's parameters (tied LM head)."""
    h, f, n = shapes["hidden_size"], shapes["ffn_dim"], shapes["num_hidden_layers"]
    per_layer = 4 * h * h + 2 * h * f + 9 * h + f  # q/k/v/out + fc1/fc2, their biases, two LayerNorms
    model = (shapes["vocab_size"] + shapes["max_position_embeddings"] + 2) * h + 2 * h
    return 4 * (n * per_layer + model)


def _template(shapes: dict):
    """(HF config, generation config, ONNX export without weights) of a random OPT with ≤ 2 layers.

    Exported in a child process: after ``to_onnx`` returns, onnxscript's rewrite rules still hold the
    last graph they matched, and with it the torch model's parameters, until the process ends."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from transformers import GenerationConfig, OPTConfig

    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            config, generation, model = child.submit(_export_template, shapes).result()
    except BrokenProcessPool:
        raise RptqError("the template export's process died (out of memory?); it holds the embedding and "
                        f"{TEMPLATE_LAYERS} layers, 2–3× their fp32 size") from None
    return OPTConfig.from_dict(config), GenerationConfig.from_dict(generation), onnx.load_from_string(model)


def _export_template(shapes: dict) -> tuple[dict, dict, bytes]:
    """In the child: export the template and drop its weights (model.onnx.data placeholders)."""
    from rptq_onnx.export import to_onnx
    from rptq_onnx.models import random_opt

    hf_model = random_opt(0, **{**shapes, "num_hidden_layers": min(TEMPLATE_LAYERS, shapes["num_hidden_layers"])})
    model = to_onnx(hf_model, with_past=True)
    for init in model.graph.initializer:
        if _is_parameter(init):
            init.ClearField("raw_data")
            del init.float_data[:]
            _point(init, 0, 0)  # offset and length once written
    return hf_model.config.to_dict(), hf_model.generation_config.to_dict(), model.SerializeToString()


def _is_parameter(init: onnx.TensorProto) -> bool:
    """Float tensors with a dimension are weights, drawn anew; scalars and integers are the graph's constants."""
    return init.data_type == onnx.TensorProto.FLOAT and len(init.dims) > 0


def split_layers(model: onnx.ModelProto) -> tuple[list[int], list[int], str, str]:
    """(positions of layer 0's nodes, of layer 1's, layer 1's input, layer 1's output) in a 2-layer export."""
    from rptq_onnx.anatomy import find_layers

    layers = find_layers(model)
    if len(layers) != 2:
        raise RptqError(f"the template has {len(layers)} decoder layers, expected 2")
    nodes = model.graph.node
    x1 = layers[1].attn_norm.input
    after0, after1 = _computed_from(nodes, layers[0].attn_norm.input), _computed_from(nodes, x1)
    layer0 = sorted(after0 - after1)
    rest = sorted(after1)
    layer1, head = rest[:len(layer0)], rest[len(layer0):]
    if [_signature(nodes[i]) for i in layer0] != [_signature(nodes[i]) for i in layer1]:
        raise RptqError("the template's layers 0 and 1 are not the same ops in the same order; cannot repeat layer 1")
    producer = next(i for i in layer0 if x1 in nodes[i].output)
    y1 = nodes[layer1[layer0.index(producer)]].output[list(nodes[producer].output).index(x1)]
    made = {t for i in layer1 for t in nodes[i].output}
    for i in head:  # the head reads layer 1's output, nothing else of it
        if any(t in made and t != y1 for t in nodes[i].input):
            raise RptqError(f"the template's head node {nodes[i].name} reads layer 1 beyond its output; "
                            "cannot repeat layer 1")
    return layer0, layer1, x1, y1


def _signature(node: onnx.NodeProto) -> tuple:
    return node.op_type, [a.SerializeToString() for a in node.attribute]


def _computed_from(nodes, tensor: str) -> set[int]:
    """Positions of the nodes whose inputs depend on ``tensor``."""
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for t in node.input:
            readers.setdefault(t, []).append(i)
    seen: set[int] = set()
    frontier = [tensor]
    while frontier:
        for i in readers.get(frontier.pop(), []):
            if i not in seen:
                seen.add(i)
                frontier.extend(t for t in nodes[i].output if t)
    return seen


def layer_name(name: str, k: int) -> str:
    """Layer 1's ``name`` for layer ``k``: its index replaced where the name has one, else ``name.layerK``."""
    renamed = _LAYER_1.sub(str(k), name)
    return renamed if renamed != name else f"{name}.layer{k}"


def stack_layers(model: onnx.ModelProto, layers: int) -> onnx.ModelProto:
    """The 2-layer export ``model`` with layer 1 repeated to ``layers`` layers, in place (weights not loaded)."""
    if layers <= TEMPLATE_LAYERS:
        return model  # the template is the export itself
    g = model.graph
    _, positions, x1, y1 = split_layers(model)
    nodes = list(g.node)
    layer1 = [nodes[i] for i in positions]
    made = [t for n in layer1 for t in n.output if t]
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(nodes):
        for t in node.input:
            readers.setdefault(t, set()).add(i)
    in_layer1 = set(positions)
    own = [i for i in g.initializer if readers.get(i.name) and readers[i.name] <= in_layer1]
    inputs = [v for v in g.input if readers.get(v.name) and readers[v.name] <= in_layer1]  # past_key_values.1.*
    outputs = [v for v in g.output if v.name in set(made)]  # present.1.*
    named = set(made) | {i.name for i in own}
    value_info = [v for v in g.value_info if v.name in named]
    copies, prev = [], y1
    for k in range(TEMPLATE_LAYERS, layers):
        names = {t: layer_name(t, k) for t in [*made, *(i.name for i in own), *(v.name for v in inputs)]}
        names[x1] = prev
        for node in layer1:
            c = copy.deepcopy(node)
            c.name = layer_name(node.name, k)
            _rename(c.input, names)
            _rename(c.output, names)
            for prop in c.metadata_props:
                prop.value = re.sub(r"(?<=layers\.)1(?!\d)", str(k), prop.value)
            copies.append(c)
        for protos, field in ((own, g.initializer), (inputs, g.input), (outputs, g.output), (value_info, g.value_info)):
            for proto in protos:
                field.add().CopyFrom(proto)
                field[-1].name = names[proto.name]
        prev = names[y1]
    for i, node in enumerate(nodes):  # the head reads the last layer's output
        if i not in in_layer1:
            _rename(node.input, {y1: prev})
    nodes = [*nodes[:positions[-1] + 1], *copies, *nodes[positions[-1] + 1:]]
    if not _in_order(nodes, g):
        from rptq_onnx.graph import topological_order

        nodes = topological_order(nodes, [i.name for i in g.input])
    del g.node[:]
    g.node.extend(nodes)
    _check_unique(g)
    return model


def _rename(fields, names: dict[str, str]) -> None:
    for i, t in enumerate(fields):
        if t in names:
            fields[i] = names[t]


def _in_order(nodes: list[onnx.NodeProto], g: onnx.GraphProto) -> bool:
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    for node in nodes:
        if any(t not in known for t in node.input):
            return False
        known.update(node.output)
    return True


def _check_unique(g: onnx.GraphProto) -> None:
    tensors = [t for n in g.node for t in n.output if t] + [i.name for i in g.initializer] + [i.name for i in g.input]
    names = [n.name for n in g.node if n.name]
    for kind, seen in (("tensor", tensors), ("node", names)):
        if len(set(seen)) != len(seen):
            raise RptqError(f"repeating the template's layer gave two {kind}s the same name; cannot write the model")


def write_weights(model: onnx.ModelProto, path: Path, seed: int) -> int:
    """Draw every external initializer of ``model`` into ``path`` and point it there; returns the file size."""
    readers = _readers(model.graph)
    with _BackgroundWriter(path) as out:
        for init in model.graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                continue
            mean, std = _distribution(init, readers.get(init.name, []))
            out.write(bytes(-out.position % ALIGN))
            offset = out.position
            for chunk in _draw(tuple(init.dims), mean, std, np.random.default_rng([seed, _name_key(init.name)])):
                out.write(chunk)
            _point(init, offset, out.position - offset)
    return out.position


class _BackgroundWriter:
    """A file written by one background thread, so drawing the next chunk overlaps writing this one
    (NumPy's generators release the GIL); at most ``depth`` chunks wait in memory."""

    def __init__(self, path: Path, depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.file = open(path, "wb")
        self.thread = ThreadPoolExecutor(1)
        self.pending: collections.deque = collections.deque()
        self.depth = depth
        self.position = 0

    def write(self, buffer) -> None:
        self.pending.append(self.thread.submit(self.file.write, buffer))
        self.position += memoryview(buffer).nbytes
        while len(self.pending) > self.depth:
            self.pending.popleft().result()  # a failed write (disk full) raises here

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.thread.shutdown(wait=True)
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.file.close()


def _point(init: onnx.TensorProto, offset: int, length: int) -> None:
    """Make ``init`` an external tensor at ``offset`` of model.onnx.data."""
    init.data_location = onnx.TensorProto.EXTERNAL
    del init.external_data[:]
    for key, value in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value


def _readers(g: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for slot, t in enumerate(node.input):
            found.setdefault(t, []).append((node, slot))
    return found


def _distribution(init: onnx.TensorProto, readers: list[tuple[onnx.NodeProto, int]]) -> tuple[float, float]:
    """(mean, std) of ``init``'s values, as random_opt draws the parameter it is, from the ops that read it."""
    ops = {(node.op_type, slot) for node, slot in readers}
    if ("Gather", 0) in ops:  # token (tied LM head) or position embedding
        return 0.0, 0.1
    if ("LayerNormalization", 1) in ops:
        return 1.0, 0.2
    if ("LayerNormalization", 2) in ops:
        return 0.0, 0.1
    if ("Gemm", 2) in ops or ("Add", 0) in ops or ("Add", 1) in ops:
        return 0.0, 0.05
    for node, slot in readers:
        if (node.op_type, slot) in (("MatMul", 1), ("Gemm", 1)) and len(init.dims) == 2:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            return 0.0, float(init.dims[1] if trans_b else init.dims[0]) ** -0.5  # std 1/√fan_in
        if node.op_type == "Transpose" and len(init.dims) == 2:  # Wᵀ into a MatMul: W is [out, in]
            return 0.0, float(init.dims[1]) ** -0.5
    what = ", ".join(sorted(f"{op} input {slot}" for op, slot in ops)) or "nothing"
    raise RptqError(f"the template's initializer {init.name} is read by {what}; no rule draws its values")


def _draw(shape: tuple[int, ...], mean: float, std: float, rng: np.random.Generator):
    """mean + std·N(0, 1) of ``shape`` (float32, little-endian), a chunk of rows at a time."""
    rows, row = (shape[0], int(np.prod(shape[1:]))) if shape else (1, 1)
    step = max(1, CHUNK_BYTES // (4 * row))
    for start in range(0, rows, step):
        chunk = rng.standard_normal(min(step, rows - start) * row, dtype=np.float32)
        chunk *= std
        if mean:
            chunk += mean
        yield chunk.astype("<f4", copy=False)


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _write_side_files(stage: Path, model: onnx.ModelProto, hf_config, generation_config, layers: int, seed: int,
                      label: str, tokenizer: bool) -> None:
    """config.json, generation_config.json, export.json, genai_config.json (and the tokenizer), as export writes them."""
    from rptq_onnx.constants import DEFAULT_OPSET
    from rptq_onnx.export import export_record
    from rptq_onnx.genai import write_genai_config
    from rptq_onnx.models import sotu_tokenizer

    config = copy.deepcopy(hf_config)
    config.num_hidden_layers = layers
    config.architectures, config.dtype = ["OPTForCausalLM"], "float32"  # as save_pretrained sets them
    if tokenizer:
        sotu_tokenizer(config, generation_config).save_pretrained(stage)
    config.save_pretrained(stage)
    generation_config.save_pretrained(stage)
    record = export_record(f"random OPT ({label} shapes, seed {seed})", config, model, DEFAULT_OPSET, "dynamo", True)
    record["writer"] = (f"rptq_onnx.tools.make_random_opt --onnx: a {min(layers, TEMPLATE_LAYERS)}-layer export "
                        "as template, layer 1 repeated, weights streamed")
    (stage / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    write_genai_config(model, stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--shapes", choices=list(SHAPES), default="tiny")
    parser.add_argument("--layers", type=int, help="decoder layers (default: as many as the shapes' model has)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", action="store_true",
                        help="also write a small BPE (≤ 512 tokens, trained on the bundled SOTU text) for generate")
    parser.add_argument("--onnx", action="store_true",
                        help="write the ONNX export (model.onnx + model.onnx.data, export.json, …), layer by layer")
    args = parser.parse_args(argv)
    shapes = dict(SHAPES[args.shapes])
    try:
        if args.layers is not None:
            if args.layers < 1:
                raise RptqError(f"--layers {args.layers}: a model needs at least 1 decoder layer")
            shapes["num_hidden_layers"] = args.layers
        if not args.onnx:
            save_random_opt(args.out_dir, seed=args.seed, tokenizer=args.tokenizer, **shapes)
            print(f"wrote a random OPT ({args.shapes} shapes, seed {args.seed}) to {args.out_dir}")
            return 0
        done = write_onnx_opt(args.out_dir, shapes, seed=args.seed, label=args.shapes, tokenizer=args.tokenizer)
    except RptqError as exc:
        print(f"make_random_opt: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a random OPT export ({args.shapes} shapes, {shapes['num_hidden_layers']} layers, seed {args.seed}) "
          f"to {args.out_dir}: {done['data_bytes'] / 1e9:.2f} GB of weights; template export "
          f"{done['template_s']:.0f} s, weights {done['weights_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

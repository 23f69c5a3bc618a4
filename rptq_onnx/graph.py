"""Loading, indexing and writing ONNX graphs.

This is the only module that writes model files. Everything is written into a staging
directory beside the destination and moved into place only once complete, so a failed run
leaves nothing partial behind and never touches its input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections import defaultdict, deque
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from rptq_onnx.errors import RptqError
from rptq_onnx.outdir import staging_prefix, write_error
from rptq_onnx.vocabulary import WITH_BLOCK_SUMS_PREFIX

# Above this serialized size a model is saved with its weights in an external data file
# (protobuf cannot hold more than 2 GiB in one message; below that, external weights still let
# calibration hand the weights to ONNX Runtime without holding a copy in Python).
EXTERNAL_DATA_THRESHOLD = 64 << 20
EXTERNAL_DATA_SUFFIX = ".data"


def load_model(path: str | os.PathLike, load_weights: bool = True) -> onnx.ModelProto:
    """Read an .onnx file (external data beside it is supported) or raise a one-line RptqError."""
    path = Path(path)
    if not path.exists():
        raise RptqError(f"{path}: no such file; pass the path of an .onnx model (e.g. OUT_DIR/model.onnx from `rptq-onnx export`)")
    if path.is_dir():
        candidate = path / "model.onnx"
        if candidate.is_file():
            path = candidate
        else:
            raise RptqError(f"{path}: is a directory without model.onnx; pass the .onnx file itself")
    try:
        model = onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # protobuf raises several unrelated types for damaged files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RptqError(f"{path}: not a readable ONNX model ({reason}); the file may be truncated, re-export it with `rptq-onnx export`") from None
    if not load_weights:
        _load_small_external_tensors(model, path.parent)
    if not model.graph.node:
        raise RptqError(f"{path}: the ONNX file holds no graph nodes (truncated or empty); re-export it with `rptq-onnx export`")
    return model


def _load_small_external_tensors(model: onnx.ModelProto, base_dir: Path, max_elements: int = 4096) -> None:
    """Shape constants must be inline for shape inference and for ORT's graph resolution."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL and int(np.prod(init.dims)) <= max_elements:
            try:
                load_external_data_for_tensor(init, str(base_dir))
            except OSError as exc:
                raise RptqError(f"{base_dir}: external data of '{init.name}' cannot be read ({exc.strerror}); "
                                "keep model.onnx and its .data file together") from None
            except onnx.checker.ValidationError as exc:  # e.g. a location outside the model's folder
                reason = str(exc).strip().splitlines()[0][:200]
                raise RptqError(f"{base_dir}: external data of '{init.name}' refused ({reason}); external data must "
                                "sit in the model's folder") from None
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]


@contextlib.contextmanager
def staged_output(out_dir: str | os.PathLike, owns: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty staging directory; on success move its files into ``out_dir``.

    ``owns``: names this writer may produce; those already in ``out_dir`` that the stage lacks are
    removed (a recompile without ``--report`` leaves no stale report, a small model no stale .data).
    Other files in ``out_dir`` are left alone. On any exception the staging directory is deleted
    and ``out_dir`` is left as it was; a failed write (disk full, read-only) is a one-line error
    naming ``out_dir``. The staging directory's name holds our pid (``outdir.staging_prefix``), so a
    run killed before the move leaves something the next run recognises and removes.
    """
    shown = out_dir
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise RptqError(f"-o {shown}: exists and is not a directory; choose another -o/--output")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=staging_prefix(out_dir), dir=out_dir.parent))
    except OSError as exc:
        raise write_error(shown, exc) from None
    try:
        yield stage
        created = not out_dir.exists()
        try:
            out_dir.mkdir(exist_ok=True)
            written = sorted(stage.iterdir())
            for name in sorted(set(owns) - {item.name for item in written}):
                _remove(out_dir / name)  # stale from an earlier run
            for item in written:
                target = out_dir / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)  # a file is replaced atomically
        except BaseException:
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
    except OSError as exc:
        raise write_error(shown, exc) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) to write; on success rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (inside a staging directory), with external data when large."""
    path = Path(path)
    data_name = path.name + EXTERNAL_DATA_SUFFIX
    if _serialized_size(model) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def external_data_files(model: onnx.ModelProto) -> set[str]:
    """Relative locations of the external data files the model's initializers point to."""
    files = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in init.external_data if e.key == "location")
    return files


def weights_loaded(model: onnx.ModelProto) -> bool:
    """False when initializers still point to external data on disk (loaded with load_weights=False)."""
    return not external_data_files(model)


def _serialized_size(model: onnx.ModelProto) -> int:
    try:
        return model.ByteSize()
    except Exception:  # protobuf refuses to size messages past 2 GiB
        return 1 << 62


def topological_order(nodes: Iterable[onnx.NodeProto], graph_inputs: Iterable[str] = ()) -> list[onnx.NodeProto]:
    """Kahn's algorithm, iterative (deep LLM graphs overflow recursive sorts). Keeps file order on ties."""
    nodes = list(nodes)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer[out] = i
    deps: list[set[int]] = []
    users: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        d = {producer[t] for t in _all_inputs(node) if t in producer and producer[t] != i}
        deps.append(d)
        for j in d:
            users[j].append(i)
    remaining = [len(d) for d in deps]
    ready = deque(i for i, r in enumerate(remaining) if r == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for j in users[i]:
            remaining[j] -= 1
            if remaining[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        raise RptqError("the graph has a cycle; it is not a valid ONNX model")
    return [nodes[i] for i in order]


def _all_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node including those its subgraphs (If/Loop bodies) read from the outer scope."""
    names = [t for t in node.input if t]
    for attr in node.attribute:
        for sub in list(attr.g and [attr.g] or []) + list(attr.graphs):
            for n in sub.node:
                names.extend(_all_inputs(n))
    return names


class GraphIndex:
    """Producer/consumer maps and constant lookup for one (main) graph. Read-only."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.node_by_name = {n.name: n for n in self.nodes if n.name}
        self.position = {id(n): i for i, n in enumerate(topological_order(self.nodes))}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {i.name for i in graph.input} - set(self.initializers)
        self.graph_outputs = [o.name for o in graph.output]

    def constant_source(self, name: str) -> str | None:
        """The initializer (or Constant node output) behind ``name``, following Identity chains."""
        seen = 0
        while seen < 16:
            if name in self.initializers:
                return name
            node = self.producer.get(name)
            if node is None:
                return None
            if node.op_type == "Constant":
                return name
            if node.op_type != "Identity":
                return None
            name = node.input[0]
            seen += 1
        return None

    def is_constant(self, name: str) -> bool:
        return self.constant_source(name) is not None

    def constant_shape(self, name: str) -> tuple[int, ...] | None:
        src = self.constant_source(name)
        if src is None:
            return None
        if src in self.initializers:
            return tuple(self.initializers[src].dims)
        value = self.constant_value(src)
        return None if value is None else tuple(value.shape)

    def constant_value(self, name: str) -> np.ndarray | None:
        src = self.constant_source(name)
        if src is None:
            return None
        if src in self.initializers:
            return numpy_helper.to_array(self.initializers[src])
        node = self.producer[src]
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name in ("value_float", "value_int"):
                return np.array(onnx.helper.get_attribute_value(attr))
            if attr.name in ("value_floats", "value_ints"):
                return np.array(onnx.helper.get_attribute_value(attr))
        return None

    def readers_of_initializer(self, init_name: str) -> list[onnx.NodeProto]:
        """Non-Identity nodes that read ``init_name`` directly or through Identity chains."""
        found: list[onnx.NodeProto] = []
        frontier = [init_name]
        while frontier:
            tensor = frontier.pop()
            for node in self.consumers.get(tensor, []):
                if node.op_type == "Identity":
                    frontier.extend(node.output)
                else:
                    found.append(node)
        return found

    def value_readers(self, tensor: str) -> list[onnx.NodeProto]:
        """Consumers that read the values of ``tensor`` (Shape/Size read only its shape)."""
        return [n for n in self.consumers.get(tensor, []) if n.op_type not in ("Shape", "Size")]

    def dynamic_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [t for t in node.input if t and not self.is_constant(t)]


def rename_inputs(nodes: Iterable[onnx.NodeProto], mapping: dict[str, str]) -> None:
    """Make ``nodes`` read ``mapping[t]`` wherever they read ``t``."""
    for node in nodes:
        for i, t in enumerate(node.input):
            if t in mapping:
                node.input[i] = mapping[t]


def insert_nodes(graph: onnx.GraphProto, after: dict[str, list[onnx.NodeProto]],
                 first: list[onnx.NodeProto] | None = None) -> None:
    """Put ``after[t]`` right behind the producer of ``t`` and ``first`` at the front (keeps the file
    topological); groups whose tensor no node produces (graph inputs) go to the front too."""
    after = dict(after)
    ordered = list(first or [])
    for node in graph.node:
        ordered.append(node)
        for t in node.output:
            ordered.extend(after.pop(t, []))
    ordered[:0] = [n for nodes in after.values() for n in nodes]
    del graph.node[:]
    graph.node.extend(ordered)


def node_attr(node: onnx.NodeProto, name: str, default):
    """The value of ``node``'s attribute ``name``, or ``default`` when it is not set."""
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def prune_dead_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes no graph output depends on, then initializers nothing reads; returns nodes removed."""
    g = model.graph
    live = {o.name for o in g.output}
    kept = []
    for node in reversed(topological_order(g.node, [i.name for i in g.input])):
        if any(t in live for t in node.output if t):
            kept.append(node)
            live.update(_all_inputs(node))
    removed = len(g.node) - len(kept)
    del g.node[:]
    g.node.extend(reversed(kept))
    keep_initializers(g, live)
    return removed


def keep_initializers(graph: onnx.GraphProto, names: Container[str]) -> None:
    """Remove the initializers not in ``names``, in place (re-adding the kept ones would copy them)."""
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name not in names]):
        del graph.initializer[i]


def extended_input(index: GraphIndex, tensor: str, k_ext: int) -> tuple[str, int, int] | None:
    """(x, k, block) where ``tensor`` is x extended by copies of its block means for a MatMulNBits of K = ``k_ext``
    (passes/quantize_weights.py, ``--grid-offset blocks``: ``Concat(x, M, M, …)``, M an AveragePool over blocks of
    ``block``, directly or through a [N, 1, K] view), else None."""
    cat = index.producer.get(tensor)
    if cat is None or cat.op_type != "Concat" or not cat.name.startswith(WITH_BLOCK_SUMS_PREFIX):
        return None
    pool = index.producer[cat.input[1]]
    if pool.op_type != "AveragePool":  # the rank-2 view: Reshape(AveragePool(Reshape(x)))
        pool = index.producer[pool.input[0]]
    block = int(next(a.ints for a in pool.attribute if a.name == "kernel_shape")[-1])
    copies = len(cat.input) - 1
    return cat.input[0], k_ext // (block + copies) * block, block  # k_ext = k + copies · k / block


def declared_shape(graph: onnx.GraphProto, tensor: str) -> list[int | str] | None:
    """``tensor``'s shape where the graph declares it (value_info, inputs; a dim as its value or its name), else None."""
    for v in (*graph.value_info, *graph.input):
        if v.name == tensor and v.type.tensor_type.HasField("shape"):
            return [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
    return None

"""Weights on disk while a graph is edited: load a layer's initializers when a pass needs them, and write
each finished tensor to the output's external data file at once (``WeightSink``), so the model held in
memory is a skeleton plus one layer."""

from __future__ import annotations

import os
from collections.abc import Container, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_tensor, set_external_data

from rptq_onnx.errors import RptqError

MIN_EXTERNAL_BYTES = 1024  # as graph.save_model: smaller tensors stay in the .onnx file


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def load_initializers(model: onnx.ModelProto, names: Iterable[str], base_dir: str | os.PathLike) -> int:
    """Read the named initializers that still point to external data in ``base_dir`` into memory; returns
    how many were read."""
    wanted = set(names)
    count = 0
    for tensor in model.graph.initializer:
        if tensor.name in wanted and is_external(tensor):
            load_tensor(tensor, base_dir)
            count += 1
    return count


def load_tensor(tensor: onnx.TensorProto, base_dir: str | os.PathLike) -> None:
    """``tensor``'s external bytes into ``raw_data``, its reference dropped."""
    try:
        load_external_data_for_tensor(tensor, str(base_dir))
    except OSError as exc:
        raise RptqError(f"{base_dir}: external data of '{tensor.name}' cannot be read ({exc.strerror}); "
                        "keep model.onnx and its .data file together") from None
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


class WeightSink:
    """One external data file, appended to tensor by tensor; a tensor written here keeps only its reference
    (``location`` = ``name``, offset, length) in the model. ``sunk`` names the tensors written, which sets
    them apart from tensors still pointing to the source model's data file."""

    def __init__(self, folder: str | os.PathLike, name: str):
        self.path, self.name = Path(folder) / name, name
        self.file = open(self.path, "wb")
        self.sunk: set[str] = set()

    def write(self, tensor: onnx.TensorProto) -> None:
        data = tensor.raw_data
        offset = self.file.tell()
        self.file.write(data)
        set_external_data(tensor, self.name, offset=offset, length=len(data))
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        self.sunk.add(tensor.name)

    def write_loaded(self, model: onnx.ModelProto, keep: Container[str] = ()) -> int:
        """Write every initializer held in memory (as raw bytes of at least ``MIN_EXTERNAL_BYTES``) but ``keep``."""
        count = 0
        for tensor in model.graph.initializer:
            if not is_external(tensor) and tensor.HasField("raw_data") and len(tensor.raw_data) >= MIN_EXTERNAL_BYTES \
                    and tensor.name not in keep:
                self.write(tensor)
                count += 1
        return count

    def finish(self, model: onnx.ModelProto, source_dir: str | os.PathLike | None) -> None:
        """Write the rest: tensors still in the source's data file (read one at a time) and those in memory."""
        for tensor in model.graph.initializer:
            if is_external(tensor) and tensor.name not in self.sunk:
                if source_dir is None:
                    raise ValueError(f"{tensor.name} points to external data but no source folder was given")
                load_tensor(tensor, source_dir)
                if len(tensor.raw_data) >= MIN_EXTERNAL_BYTES:
                    self.write(tensor)
        self.write_loaded(model)
        self.file.close()

    def load_all(self, model: onnx.ModelProto) -> None:
        """Every tensor written here back into memory (a small model saved as one file)."""
        for tensor in model.graph.initializer:
            if is_external(tensor) and tensor.name in self.sunk:
                self.load(tensor)
        self.sunk.clear()

    def load(self, tensor: onnx.TensorProto) -> None:
        """A tensor written here, read back into memory (its reference dropped)."""
        if not self.file.closed:
            self.file.flush()
        load_tensor(tensor, self.path.parent)

    @contextmanager
    def borrowed(self, model: onnx.ModelProto, names: Iterable[str]) -> Iterator[None]:
        """The named tensors written here, in memory for the duration; those a pass left unchanged get their
        reference back (the others stay in memory, for ``finish``)."""
        wanted = set(names) & self.sunk
        refs = {}
        for tensor in model.graph.initializer:
            if tensor.name in wanted:
                refs[tensor.name] = list(tensor.external_data)
                self.load(tensor)
                refs[tensor.name].append(tensor.raw_data)
        yield
        for tensor in model.graph.initializer:
            entry = refs.get(tensor.name)
            if entry is not None and not is_external(tensor) and tensor.HasField("raw_data") and tensor.raw_data == entry[-1]:
                tensor.ClearField("raw_data")
                tensor.external_data.extend(entry[:-1])
                tensor.data_location = onnx.TensorProto.EXTERNAL
            elif entry is not None:
                self.sunk.discard(tensor.name)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()

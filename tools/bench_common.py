"""Shared plumbing of the benchmarks: which model to measure, and its layer map and limits."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKDIR = Path("runs/bench-opt125m")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="an exported model.onnx (default: a random OPT with opt-125m shapes)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the default model is built and cached")


def add_calib_args(parser: argparse.ArgumentParser, nsamples: int = 8, seqlen: int = 128) -> None:
    parser.add_argument("--calib", default="random", help="calibration text file, or random token ids (default)")
    parser.add_argument("--nsamples", type=int, default=nsamples)
    parser.add_argument("--seqlen", type=int, default=seqlen)


def prepare_model(workdir: Path) -> Path:
    """A random OPT with the opt-125m shapes, exported with past (cached in ``workdir``)."""
    onnx_path = workdir / "onnx" / "model.onnx"
    if onnx_path.is_file():
        return onnx_path
    from rptq_onnx.export import export
    from rptq_onnx.models import OPT_125M_SHAPES, save_random_opt

    save_random_opt(workdir / "hf", seed=0, **OPT_125M_SHAPES)
    return export(str(workdir / "hf"), workdir / "onnx", with_past=True).model_path


@dataclass
class BenchModel:
    path: Path
    layers: list
    vocab: int
    max_positions: int | None


def open_model(args: argparse.Namespace) -> BenchModel:
    from rptq_onnx.anatomy import find_layers
    from rptq_onnx.artifacts import model_limits
    from rptq_onnx.graph import load_model

    path = args.model or prepare_model(args.workdir)
    skeleton = load_model(path, load_weights=False)
    vocab, max_pos = model_limits(path, skeleton)
    return BenchModel(path=path, layers=find_layers(skeleton), vocab=vocab, max_positions=max_pos)

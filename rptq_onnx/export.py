"""Hugging Face OPT → ONNX export (`rptq-onnx export`).

The graph has named inputs ``input_ids``, ``attention_mask`` [batch, past + seq] and, with a
cache, ``past_key_values.N.key/value`` [batch, heads, past, head_dim]; outputs ``logits`` and
``present.N.key/value``. One with-past graph serves prefill (past length 0) and decode.
Attention is exported eagerly (no fused/SDPA attention node), so q/k/v and QKᵀ stay visible to
the passes. Opset 21 is the default: 4-bit Q/DQ types need it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx

from rptq_onnx.errors import RptqError
from rptq_onnx.graph import save_model, staged_output

DEFAULT_OPSET = 21
SUPPORTED_OPSETS = range(18, 24)
EXPORTERS = ("dynamo", "torchscript")
RECORD_NAME = "export.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json", "config.json",
                   "chat_template.jinja")


@dataclass(frozen=True)
class ExportResult:
    model_path: Path
    record: dict


def resolve_model_dir(model: str) -> Path:
    """A local HF model directory for ``model`` (a directory, or a hub id fetched to the HF cache)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RptqError(f"{model}: expected a Hugging Face model directory (config.json + weights) or a hub id, got a file")
        if not (path / "config.json").is_file():
            raise RptqError(f"{model}: no config.json in this directory; pass a Hugging Face model directory (save_pretrained output)")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep in model.replace("/", "", 1):
        raise RptqError(f"{model}: no such directory; pass a local Hugging Face model directory or a hub id like facebook/opt-125m")
    return _download_from_hub(model)


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as exc:
        kind = type(exc).__name__
        raise RptqError(f"{repo_id}: not a local directory, and the Hugging Face hub could not provide it ({kind}; "
                        "offline?); download the model elsewhere and pass its directory") from None
    return Path(local)


def load_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise RptqError(f"{model_dir}: config.json could not be read ({reason})") from None
    check_supported(config, str(model_dir))
    return config


def check_supported(config, where: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type != "opt":
        raise RptqError(f"{where}: model_type '{model_type}' is not supported; rptq-onnx compiles OPT models (model_type 'opt')")
    if not getattr(config, "do_layer_norm_before", True):
        raise RptqError(f"{where}: post-LN OPT (do_layer_norm_before=False, as in opt-350m) is not supported; "
                        "RPTQ folds reorders into pre-LN LayerNorms: use a pre-LN OPT (opt-125m, opt-1.3b, …)")
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        raise RptqError(f"{where}: OPT with project_in/project_out (word_embed_proj_dim != hidden_size) is not supported")


def export(model: str, out_dir: str | os.PathLike, with_past: bool = True, opset: int = DEFAULT_OPSET,
           exporter: str = "dynamo") -> ExportResult:
    """Export ``model`` (HF dir or hub id) to ``out_dir/model.onnx`` plus ``export.json``."""
    if opset not in SUPPORTED_OPSETS:
        raise RptqError(f"--opset {opset} is not supported; use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} "
                        f"(default {DEFAULT_OPSET}; 4-bit Q/DQ needs ≥ 21)")
    if exporter not in EXPORTERS:
        raise RptqError(f"--exporter {exporter} is unknown; use one of {', '.join(EXPORTERS)}")
    model_dir = resolve_model_dir(model)
    config = load_config(model_dir)
    hf_model = _load_torch_model(model_dir)
    onnx_model = to_onnx(hf_model, with_past=with_past, opset=opset, exporter=exporter)
    record = {
        "format": "rptq-onnx export",
        "version": 1,
        "source": str(model),
        "model_type": config.model_type,
        "config": json.loads(config.to_json_string(use_diff=False)),
        "opset": opset,
        "exporter": exporter,
        "with_past": with_past,
        "inputs": [_io_record(v) for v in onnx_model.graph.input if v.name not in {i.name for i in onnx_model.graph.initializer}],
        "outputs": [_io_record(v) for v in onnx_model.graph.output],
        "versions": _versions(),
    }
    with staged_output(out_dir) as stage:
        save_model(onnx_model, stage / "model.onnx")
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, stage / name)
        (stage / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return ExportResult(model_path=Path(out_dir) / "model.onnx", record=record)


def _load_torch_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager", dtype=torch.float32)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise RptqError(f"{model_dir}: the weights could not be loaded ({reason})") from None
    return model.eval()


class _FlatCausalLM:
    """Factory for a torch module with flat tensor I/O around a HF causal LM (export wrapper)."""

    @staticmethod
    def build(hf_model, with_past: bool):
        import torch
        from transformers import DynamicCache

        num_layers = hf_model.config.num_hidden_layers

        class WithPast(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = hf_model

            def forward(self, input_ids, attention_mask, past):
                cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(num_layers)], config=self.model.config)
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
                present = []
                for layer in out.cache.layers[:num_layers]:
                    present += [layer.keys, layer.values]
                return (out.logits, *present)

        class NoPast(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = hf_model

            def forward(self, input_ids, attention_mask):
                return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        module = WithPast() if with_past else NoPast()
        return module.eval()  # the TorchScript exporter restores the wrapper's own mode recursively


def io_names(num_layers: int, with_past: bool) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"]
    outputs = ["logits"]
    if with_past:
        for i in range(num_layers):
            inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def to_onnx(hf_model, with_past: bool = True, opset: int = DEFAULT_OPSET, exporter: str = "dynamo") -> onnx.ModelProto:
    """Trace ``hf_model`` (eager attention, eval mode) into an in-memory ONNX model."""
    import torch

    cfg = hf_model.config
    num_layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    module = _FlatCausalLM.build(hf_model, with_past)
    # Distinct example sizes > 1 so that no dimension gets specialised to a constant.
    batch, seq, past_len = 2, 5, 3 if with_past else 0
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    past = tuple(torch.randn(batch, heads, past_len, head_dim, generator=gen) for _ in range(2 * num_layers))
    args = (input_ids, attention_mask, past) if with_past else (input_ids, attention_mask)
    in_names, out_names = io_names(num_layers, with_past)
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
            shapes = [{0: b, 1: s}, {0: b, 1: t}]
            if with_past:
                shapes.append(tuple({0: b, 2: p} for _ in range(2 * num_layers)))
            program = torch.onnx.export(module, args, None, dynamo=True, opset_version=opset, input_names=in_names,
                                        output_names=out_names, dynamic_shapes=tuple(shapes), verbose=False)
            model = program.model_proto
        else:
            axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                    "logits": {0: "batch", 1: "seq"}}
            for name in in_names[2:]:
                axes[name] = {0: "batch", 2: "past"}
            for name in out_names[1:]:
                axes[name] = {0: "batch", 2: "total"}
            buf = io.BytesIO()
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset, input_names=in_names,
                              output_names=out_names, dynamic_axes=axes)
            model = onnx.load_from_string(buf.getvalue())
    return model


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and many warnings; keep the CLI's output to our own lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _io_record(value_info: onnx.ValueInfoProto) -> dict:
    t = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
    return {"name": value_info.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}


def _versions() -> dict:
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}

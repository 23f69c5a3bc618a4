"""Hugging Face OPT / Llama → ONNX export (`rptq-onnx export`).

The graph has named inputs ``input_ids``, ``attention_mask`` [batch, past + seq], for Llama-family
models ``position_ids`` [batch, seq] (left padding needs explicit positions), and, with a cache,
``past_key_values.N.key/value`` [batch, kv_heads, past, head_dim]; outputs ``logits`` and
``present.N.key/value``. One with-past graph serves prefill (past length 0) and decode.
Attention is exported eagerly (no fused/SDPA attention node), so q/k/v and QKᵀ stay visible to
the passes. Opset 21 is the default: 4-bit Q/DQ types need it.

Sources: a Hugging Face directory or hub id, a ``.gguf`` file (transformers dequantizes it to
fp32 on load; needs the ``gguf`` package), or a bundled name such as ``smollm2`` (see
``rptq_onnx.bundled``).
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

from rptq_onnx.artifacts import OWNED_FILES, RECORD_NAME, TOKENIZER_FILES
from rptq_onnx.bundled import named_model
from rptq_onnx.constants import DEFAULT_OPSET, EXPORTERS, SUPPORTED_OPSETS
from rptq_onnx.errors import RptqError
from rptq_onnx.genai import write_genai_config
from rptq_onnx.graph import save_model, staged_output
from rptq_onnx.outdir import check_writable, claim_output, input_bytes

# at opset 23 the dynamo exporter emits RMSNormalization / RotaryEmbedding nodes, which hide the
# Llama reorder points (and ORT's RotaryEmbedding failed for batch > 1 here)
LLAMA_MAX_OPSET = 22
# HF model_type → the layer-map family it exports to (Mistral and Qwen2 have Llama's graph; Qwen2 adds
# q/k/v biases, which the layer map folds like OPT's)
FAMILIES = {"opt": "opt", "llama": "llama", "mistral": "llama", "qwen2": "llama"}


@dataclass(frozen=True)
class ExportResult:
    model_path: Path
    record: dict


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: an HF directory, or a GGUF file inside ``directory``."""

    directory: Path
    gguf_file: str | None = None

    def hf_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model_source(model: str) -> ModelSource:
    """A local source for ``model``: a bundled name, a .gguf file, an HF directory, or a hub id."""
    bundled = named_model(model)
    if bundled is not None:
        return ModelSource(bundled.parent, bundled.name)
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise RptqError(f"{model}: no such GGUF file; pass the path of a .gguf model file")
        return ModelSource(path.parent, path.name)
    return ModelSource(resolve_model_dir(model))


def resolve_model_dir(model: str) -> Path:
    """A local HF model directory for ``model`` (a directory, or a hub id fetched to the HF cache)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RptqError(f"{model}: expected a Hugging Face model directory (config.json + weights), a .gguf file "
                            "or a hub id, got another file")
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


def load_config(source: ModelSource):
    from transformers import AutoConfig

    where = source.directory / source.gguf_file if source.gguf_file else source.directory
    try:
        with _quiet(), _no_progress_bars():
            config = AutoConfig.from_pretrained(str(source.directory), **source.hf_kwargs())
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        what = "the GGUF metadata" if source.gguf_file else "config.json"
        raise RptqError(f"{where}: {what} could not be read as a model config ({reason})") from None
    check_supported(config, str(where))
    return config


def family_of(config) -> str:
    return FAMILIES[config.model_type]


def check_supported(config, where: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise RptqError(f"{where}: model_type '{model_type}' is not supported; rptq-onnx compiles OPT and "
                        f"Llama-family models (model_type {', '.join(repr(t) for t in FAMILIES)})")
    if FAMILIES[model_type] == "llama":
        _check_llama(config, where)
        return
    if not getattr(config, "do_layer_norm_before", True):
        raise RptqError(f"{where}: post-LN OPT (do_layer_norm_before=False, as in opt-350m) is not supported; "
                        "RPTQ folds reorders into pre-LN LayerNorms: use a pre-LN OPT (opt-125m, opt-1.3b, …)")
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        raise RptqError(f"{where}: OPT with project_in/project_out (word_embed_proj_dim != hidden_size) is not supported")


def _check_llama(config, where: str) -> None:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise RptqError(f"{where}: Llama with hidden_act '{config.hidden_act}' is not supported; the layer map "
                        "expects the SwiGLU MLP (hidden_act 'silu')")
    if getattr(config, "pretraining_tp", 1) != 1:
        raise RptqError(f"{where}: pretraining_tp={config.pretraining_tp} splits the linears; set it to 1 in config.json")


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def export(model: str, out_dir: str | os.PathLike, with_past: bool = True, opset: int = DEFAULT_OPSET,
           exporter: str = "dynamo") -> ExportResult:
    """Export ``model`` (HF dir, hub id, .gguf file or bundled name) to ``out_dir/model.onnx`` plus ``export.json``."""
    if opset not in SUPPORTED_OPSETS:
        raise RptqError(f"--opset {opset} is not supported; use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} "
                        f"(default {DEFAULT_OPSET}; 4-bit Q/DQ needs ≥ 21)")
    if exporter not in EXPORTERS:
        raise RptqError(f"--exporter {exporter} is unknown; use one of {', '.join(EXPORTERS)}")
    with claim_output(out_dir, model):
        source = resolve_model_source(model)
        check_writable(out_dir, input_bytes(str(source.directory / (source.gguf_file or ""))))
        return _export(model, source, out_dir, with_past, opset, exporter)


def _export(model: str, source: ModelSource, out_dir: str | os.PathLike, with_past: bool, opset: int,
            exporter: str) -> ExportResult:
    config = load_config(source)
    if family_of(config) == "llama" and opset > LLAMA_MAX_OPSET:
        raise RptqError(f"--opset {opset}: Llama graphs are exported at opset ≤ {LLAMA_MAX_OPSET} (opset 23 fuses "
                        f"RMSNorm and RoPE into single nodes that hide the reorder points); use the default {DEFAULT_OPSET}")
    hf_model = _load_torch_model(source)
    try:
        onnx_model = to_onnx(hf_model, with_past=with_past, opset=opset, exporter=exporter)
    except Exception as exc:
        other = next(e for e in EXPORTERS if e != exporter)
        raise RptqError(f"{model}: the {exporter} exporter failed ({_first_line(exc)}); try --exporter {other}, "
                        "or check that torch and transformers match pyproject's versions") from None
    record = export_record(str(model), config, onnx_model, opset, exporter, with_past)
    config_dict = record["config"]
    with staged_output(out_dir, owns=OWNED_FILES) as stage:
        save_model(onnx_model, stage / "model.onnx")
        if source.gguf_file:
            _save_gguf_tokenizer(source, stage)
            (stage / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        else:
            for name in TOKENIZER_FILES:
                if (source.directory / name).is_file():
                    shutil.copy2(source.directory / name, stage / name)
        (stage / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        write_genai_config(onnx_model, stage)  # with a cache: an onnxruntime-genai model folder (rptq_onnx.genai)
    return ExportResult(model_path=Path(out_dir) / "model.onnx", record=record)


def export_record(source: str, config, onnx_model: onnx.ModelProto, opset: int, exporter: str, with_past: bool) -> dict:
    """The ``export.json`` record of ``onnx_model``, exported from ``source`` with HF ``config``."""
    config_dict = json.loads(config.to_json_string(use_diff=False))
    config_dict.pop("quantization_config", None)  # a GGUF source is dequantized to fp32 on load
    initializers = {i.name for i in onnx_model.graph.initializer}
    return {
        "format": "rptq-onnx export",
        "version": 1,
        "source": source,
        "model_type": config.model_type,
        "family": family_of(config),
        "config": config_dict,
        "opset": opset,
        "exporter": exporter,
        "with_past": with_past,
        "inputs": [_io_record(v) for v in onnx_model.graph.input if v.name not in initializers],
        "outputs": [_io_record(v) for v in onnx_model.graph.output],
        "versions": _versions(),
    }


def _save_gguf_tokenizer(source: ModelSource, stage: Path) -> None:
    """The tokenizer stored in the GGUF metadata (with its chat template), saved as HF files."""
    from transformers import AutoTokenizer

    try:
        with _quiet(), _no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(str(source.directory), **source.hf_kwargs())
    except Exception:
        return  # a GGUF without tokenizer metadata: the export still works from token ids
    tokenizer.save_pretrained(str(stage))


def _load_torch_model(source: ModelSource):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with _quiet(), _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(str(source.directory), attn_implementation="eager",
                                                         dtype=torch.float32, **source.hf_kwargs())
    except Exception as exc:
        raise RptqError(f"{source.directory / (source.gguf_file or '')}: the weights could not be loaded "
                        f"({_first_line(exc)})") from None
    return model.eval()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class _FlatCausalLM:
    """Factory for a torch module with flat tensor I/O around a HF causal LM (export wrapper)."""

    @staticmethod
    def build(hf_model, with_past: bool, positions: bool):
        import torch
        from transformers import DynamicCache

        num_layers = hf_model.config.num_hidden_layers

        def run(model, input_ids, attention_mask, position_ids, past):
            if past is None:
                return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).logits
            # plain full-length layers, also for a sliding-window config (Mistral): the graph keeps every
            # position and the attention mask applies the window, as the torch model computes it
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(num_layers)])
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        use_cache=True)
            present = []
            for layer in out.cache.layers[:num_layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

        # torch.export needs explicit signatures: one small module per input set
        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = hf_model

        class WithPast(Wrapper):
            def forward(self, input_ids, attention_mask, past):
                return run(self.model, input_ids, attention_mask, None, past)

        class WithPastPositions(Wrapper):
            def forward(self, input_ids, attention_mask, position_ids, past):
                return run(self.model, input_ids, attention_mask, position_ids, past)

        class NoPast(Wrapper):
            def forward(self, input_ids, attention_mask):
                return run(self.model, input_ids, attention_mask, None, None)

        class NoPastPositions(Wrapper):
            def forward(self, input_ids, attention_mask, position_ids):
                return run(self.model, input_ids, attention_mask, position_ids, None)

        module = {(True, False): WithPast, (True, True): WithPastPositions, (False, False): NoPast,
                  (False, True): NoPastPositions}[(with_past, positions)]()
        return module.eval()  # the TorchScript exporter restores the wrapper's own mode recursively


def takes_position_ids(config) -> bool:
    """Llama-family graphs take explicit positions (OPT derives them from the attention mask)."""
    return FAMILIES.get(getattr(config, "model_type", None)) == "llama"


def io_names(num_layers: int, with_past: bool, positions: bool = False) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"] + (["position_ids"] if positions else [])
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
    hf_model.set_attn_implementation("eager")  # q/k/v, QKᵀ and the softmax stay separate nodes
    num_layers, kv_heads, head_dim = cfg.num_hidden_layers, kv_heads_of(cfg), head_dim_of(cfg)
    positions = takes_position_ids(cfg)
    module = _FlatCausalLM.build(hf_model, with_past, positions)
    # Distinct example sizes > 1 so that no dimension gets specialised to a constant.
    batch, seq, past_len = 2, 5, 3 if with_past else 0
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    args = [input_ids, attention_mask]
    if positions:
        args.append(torch.arange(past_len, past_len + seq, dtype=torch.int64)[None].repeat(batch, 1))
    if with_past:
        args.append(tuple(torch.randn(batch, kv_heads, past_len, head_dim, generator=gen) for _ in range(2 * num_layers)))
    in_names, out_names = io_names(num_layers, with_past, positions)
    first_past = 3 if positions else 2
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
            shapes = [{0: b, 1: s}, {0: b, 1: t}] + ([{0: b, 1: s}] if positions else [])
            if with_past:
                shapes.append(tuple({0: b, 2: p} for _ in range(2 * num_layers)))
            program = torch.onnx.export(module, tuple(args), None, dynamo=True, opset_version=opset,
                                        input_names=in_names, output_names=out_names, dynamic_shapes=tuple(shapes),
                                        verbose=False)
            model = program.model_proto
        else:
            axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                    "logits": {0: "batch", 1: "seq"}}
            if positions:
                axes["position_ids"] = {0: "batch", 1: "seq"}
            for name in in_names[first_past:]:
                axes[name] = {0: "batch", 2: "past"}
            for name in out_names[1:]:
                axes[name] = {0: "batch", 2: "total"}
            buf = io.BytesIO()
            torch.onnx.export(module, tuple(args), buf, dynamo=False, opset_version=opset, input_names=in_names,
                              output_names=out_names, dynamic_axes=axes)
            model = onnx.load_from_string(buf.getvalue())
    return model


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' GGUF loader draws a tqdm bar of its own (no switch turns it off): hide stderr meanwhile."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


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

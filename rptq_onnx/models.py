"""Seeded random OPT and Llama models with non-trivial weights, for tests, smoke runs and benchmarks.

Biases and norm parameters are drawn at random too: with their default values (0 / 1)
exporters merge identical initializers, which hides sharing bugs and makes reorders trivial.
"""

from __future__ import annotations

import os
from pathlib import Path

# The published opt-125m shapes (random weights here; no hub access needed).
OPT_125M_SHAPES = dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                       max_position_embeddings=2048)
OPT_1_3B_SHAPES = dict(vocab_size=50272, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                       max_position_embeddings=2048)
OPT_6_7B_SHAPES = dict(vocab_size=50272, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                       max_position_embeddings=2048)
TINY_SHAPES = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                   max_position_embeddings=256)
# A tiny Llama with grouped-query attention (2 query heads per K/V head), RoPE and SwiGLU.
TINY_LLAMA_SHAPES = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=160, max_position_embeddings=256,
                         rope_theta=10000.0, tie_word_embeddings=True)


def random_opt(seed: int = 0, **config):
    """An ``OPTForCausalLM`` (eval mode, fp32) with seeded random weights; ``config`` overrides TINY_SHAPES."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    shapes = {**TINY_SHAPES, **config}
    shapes.setdefault("word_embed_proj_dim", shapes["hidden_size"])
    cfg = OPTConfig(**shapes, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(seed)
    return _randomized(OPTForCausalLM(cfg).eval(), seed)


def _randomized(model, seed: int):
    """Draw every parameter from a seeded generator: norm γ ≈ 1 ± 0.2, norm β / biases small,
    embeddings 0.1·N(0, 1), weights N(0, 1/fan_in)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith("norm.bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
            elif "embed" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    return model


def random_opt_with_outliers(seed: int = 7, ln_seed: int = 0, outliers: int = 4, factor: float = 30.0, **config):
    """A random OPT whose LayerNorm outputs have log-normal channel ranges and a few ×``factor``
    outlier channels (synthetic: it mimics the channel spread of large pretrained LLMs)."""
    import torch

    shapes = dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, ffn_dim=512, vocab_size=300)
    model = random_opt(seed, **{**shapes, **config})
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(ln_seed)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            for ln in (layer.self_attn_layer_norm, layer.final_layer_norm):
                ln.weight.mul_(torch.exp(torch.randn(hidden, generator=gen)))
                ln.weight[torch.randperm(hidden, generator=gen)[:outliers]] *= factor
    return model


# Llama-family model types with the same graph (Qwen2 adds q/k/v biases) → their transformers classes
LLAMA_FAMILY = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
                "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def random_llama(seed: int = 0, model_type: str = "llama", **config):
    """A Llama-family causal LM (``model_type`` in LLAMA_FAMILY; eval mode, fp32) with seeded random
    weights; ``config`` overrides TINY_LLAMA_SHAPES (e.g. ``num_key_value_heads``, ``head_dim``)."""
    import torch
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in LLAMA_FAMILY[model_type])
    cfg = config_cls(**{**TINY_LLAMA_SHAPES, **config}, attention_dropout=0.0)
    torch.manual_seed(seed)
    return _randomized(model_cls(cfg).eval(), seed)


def save_random_opt(out_dir: str | os.PathLike, seed: int = 0, tokenizer: bool = False, **config) -> Path:
    """Write a random OPT as a Hugging Face directory (config.json + safetensors).

    ``tokenizer``: also save a small byte-level BPE (≤ 512 tokens) trained on the bundled
    SOTU training text, so text-driven commands (generate, eval, text calibration) work.
    """
    return _save(random_opt(seed, **config), out_dir, tokenizer)


def save_random_llama(out_dir: str | os.PathLike, seed: int = 0, tokenizer: bool = False, **config) -> Path:
    """Write a random Llama as a Hugging Face directory (see ``save_random_opt``)."""
    return _save(random_llama(seed, **config), out_dir, tokenizer)


def _save(model, out_dir: str | os.PathLike, tokenizer: bool) -> Path:
    out_dir = Path(out_dir)
    tok = sotu_tokenizer(model.config, model.generation_config) if tokenizer else None
    model.save_pretrained(out_dir)
    if tok is not None:
        tok.save_pretrained(out_dir)
    return out_dir


def sotu_tokenizer(config, generation_config):
    """A byte-level BPE of ≤ 512 tokens trained on the bundled SOTU training text, for a model with
    ``config`` and ``generation_config``: both get the tokenizer's special ids."""
    from rptq_onnx.bundled import TEXTS

    text = TEXTS["sotu-train"].read_text(encoding="utf-8")[:200_000]
    tok = train_bpe_tokenizer([p for p in text.split("\n") if p.strip()], vocab_size=min(512, config.vocab_size))
    for cfg in (config, generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return tok


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE trained with the ``tokenizers`` library, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="</s>", pad_token="<pad>")

"""Train the bundled demo OPT from scratch on State of the Union text (the recipe, seeded).

    python -m rptq_onnx.tools.train_demo_model --train rptq_onnx/data/sotu/train.txt \
        --out rptq_onnx/data/demo-opt [--minutes 30] [--seed 0]

A pre-LN OPT (``do_layer_norm_before=True``, tied embeddings) with a byte-level BPE tokenizer
trained by the ``tokenizers`` library, saved as a transformers fast tokenizer. The last 2 % of
the training text is held out for validation; the test text is never read here. Training
stops after ``--minutes`` of wall time (or ``--max-steps``); the checkpoint is saved in fp16.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

DEFAULTS = dict(vocab=8192, layers=4, hidden=256, heads=4, ffn=1024, positions=256, seqlen=256, batch=16, lr=1.5e-3,
                warmup=200)


def train_tokenizer(text: str, vocab: int):
    from rptq_onnx.models import train_bpe_tokenizer

    paragraphs = [p for p in text.split("\n") if p.strip()]
    return train_bpe_tokenizer(paragraphs, vocab_size=vocab)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    for k, v in DEFAULTS.items():
        parser.add_argument(f"--{k}", type=type(v), default=v)
    args = parser.parse_args(argv)

    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    text = args.train.read_text(encoding="utf-8")
    t0 = time.perf_counter()
    tok = train_tokenizer(text, args.vocab)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    split = int(len(ids) * 0.98)
    train_ids, val_ids = torch.from_numpy(ids[:split]), torch.from_numpy(ids[split:])
    print(f"tokenizer: vocab {len(tok)}, {len(ids):,} tokens ({time.perf_counter() - t0:.0f} s); "
          f"train {len(train_ids):,}, validation {len(val_ids):,}", flush=True)

    cfg = OPTConfig(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, ffn_dim=args.ffn, max_position_embeddings=args.positions,
                    word_embed_proj_dim=args.hidden, do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = OPTForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    est_steps = args.max_steps or 10_000
    start, step, tokens = time.perf_counter(), 0, 0
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        if (args.max_steps and step >= args.max_steps) or (not args.max_steps and elapsed > budget):
            break
        frac = elapsed / budget if not args.max_steps else step / est_steps
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seqlen - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s:s + args.seqlen] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch.numel()
        if step % 50 == 0:
            el = time.perf_counter() - start
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr:.2e}  {tokens / el:,.0f} tokens/s  {el / 60:.1f} min",
                  flush=True)

    model.eval()
    with torch.no_grad():
        nll, count = 0.0, 0
        for s in range(0, len(val_ids) - args.seqlen, args.seqlen):
            window = val_ids[s:s + args.seqlen][None]
            nll += model(input_ids=window, labels=window).loss.item() * (args.seqlen - 1)
            count += args.seqlen - 1
    print(f"done: {step} steps, {tokens:,} tokens, validation perplexity {math.exp(nll / count):.1f}", flush=True)
    model.config._attn_implementation = "eager"
    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out)
    tok.save_pretrained(str(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

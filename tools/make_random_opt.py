"""Write a seeded random OPT model as a Hugging Face directory (for smoke runs without a hub).

    python -m rptq_onnx.tools.make_random_opt OUT_DIR [--shapes tiny|opt-125m] [--seed 0]
"""

from __future__ import annotations

import argparse

from rptq_onnx.models import OPT_125M_SHAPES, TINY_SHAPES, save_random_opt

SHAPES = {"tiny": TINY_SHAPES, "opt-125m": OPT_125M_SHAPES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    save_random_opt(args.out_dir, seed=args.seed, **SHAPES[args.shapes])
    print(f"wrote a random OPT ({args.shapes} shapes, seed {args.seed}) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

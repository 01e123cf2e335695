#!/usr/bin/env python
"""Write a random-weight CLIP checkpoint in OpenAI's format (for tests, demos and benchmarks).

Examples:
    python tools/make_tiny_clip.py --out /tmp/tiny-vit.pt
    python tools/make_tiny_clip.py --like tiny-rn --format torchscript --out /tmp/tiny-rn.pt
    python tools/make_tiny_clip.py --like ViT-B/16 --half --out /tmp/vit-b16-random.pt
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clip.configs import get_config, list_models  # noqa: E402
from clip.tiny import FORMATS, random_state_dict, save_checkpoint  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--like", default="tiny-vit", choices=list_models(), metavar="NAME",
                        help=f"architecture (default tiny-vit); one of: {', '.join(list_models())}")
    parser.add_argument("--format", default="state_dict", choices=FORMATS, dest="fmt",
                        help="torch.save'd state dict, or a TorchScript archive like OpenAI's releases")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--half", action="store_true",
                        help="store Conv/Linear weights in fp16 as OpenAI's released archives do")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = get_config(args.like)
    sd = random_state_dict(config, seed=args.seed, half=args.half)
    path = save_checkpoint(args.out, sd, fmt=args.fmt)
    n_params = sum(v.numel() for k, v in sd.items() if v.is_floating_point())
    tower = f"ViT {config.vision_patch_size}px patches" if config.is_vit else f"ResNet {config.vision_layers}"
    print(f"wrote {path}: {args.fmt}, like {config.name} ({tower}, {config.image_resolution}px, "
          f"embed {config.embed_dim}), {n_params / 1e6:.2f}M parameters, seed {args.seed}"
          f"{', fp16 weights' if args.half else ''}, {os.path.getsize(path) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

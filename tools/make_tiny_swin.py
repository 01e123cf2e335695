#!/usr/bin/env python
"""Write a tiny random-weight Swin-V2 classifier as a Hugging Face snapshot (for tests, demos, benchmarks).

The snapshot is what ``Swinv2ForImageClassification.save_pretrained`` writes (``config.json`` +
``model.safetensors``, or ``pytorch_model.bin`` with ``--format bin``); with ``--hub-layout`` it is
stored as the Hugging Face Hub cache stores a download (``models--<org>--<name>/blobs``,
``snapshots/<commit>``, ``refs/main``), the layout SeTAR users already have. Needs ``transformers``.

Examples:
    python tools/make_tiny_swin.py --out /tmp/tiny-swin
    python tools/make_tiny_swin.py --out /tmp/hub --hub-layout --num-labels 1000
    python tools/make_tiny_swin.py --out /tmp/tiny-swin-bin --format bin --image-size 24
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from locoop.models.swinv2 import make_tiny_swinv2, save_snapshot  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-labels", type=int, default=10, help="classes of the classifier head (default 10)")
    parser.add_argument("--hub-layout", action="store_true",
                        help="write the Hub-cache layout out/models--<org>--<name>/... instead of a plain folder")
    parser.add_argument("--repo-id", default="local/tiny-swinv2", help="org/name of the Hub-cache folder")
    parser.add_argument("--format", default="safetensors", choices=("safetensors", "bin"), dest="fmt",
                        help="weights file: model.safetensors (default) or pytorch_model.bin")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--image-size", type=int, default=32, help="input side in pixels (default 32)")
    parser.add_argument("--patch-size", type=int, default=2, help="patch side in pixels (default 2)")
    parser.add_argument("--window-size", type=int, default=4, help="attention window side (default 4)")
    parser.add_argument("--embed-dim", type=int, default=16, help="width of the first stage (default 16)")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 2], help="blocks per stage (default 2 2)")
    parser.add_argument("--num-heads", type=int, nargs="+", default=None,
                        help="heads per stage (default: 2, 4, 8, ... one per stage)")
    args = parser.parse_args(argv)
    if args.num_heads is None:
        args.num_heads = [2 * 2 ** i for i in range(len(args.depths))]
    if len(args.num_heads) != len(args.depths):
        parser.error(f"--num-heads needs one value per stage ({len(args.depths)}), got {args.num_heads}")
    if args.num_labels < 1:
        parser.error(f"--num-labels must be >= 1, got {args.num_labels}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = make_tiny_swinv2(args.num_labels, seed=args.seed, image_size=args.image_size,
                             patch_size=args.patch_size, window_size=args.window_size, embed_dim=args.embed_dim,
                             depths=list(args.depths), num_heads=list(args.num_heads))
    snapshot = save_snapshot(model, args.out, fmt=args.fmt, hub_layout=args.hub_layout, repo_id=args.repo_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {snapshot}: Swin-V2 {args.image_size}px, patch {args.patch_size}, window {args.window_size}, "
          f"depths {list(args.depths)}, embed {args.embed_dim}, {args.num_labels} classes, "
          f"{n_params / 1e3:.1f}k parameters, seed {args.seed}, {args.fmt}"
          f"{', Hub-cache layout' if args.hub_layout else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

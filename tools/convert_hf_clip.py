#!/usr/bin/env python
"""Convert a local Hugging Face CLIP snapshot (config.json + weights) to an OpenAI-format checkpoint.

``clip.load`` reads such a snapshot directly; converting once saves the conversion on every
load and gives a file that the papers' code can read too.

    python tools/convert_hf_clip.py /path/to/clip-vit-base-patch16 ViT-B-16.pt [--format torchscript]
"""
from __future__ import annotations

import argparse

from clip.hf import load_hf_snapshot
from clip.model import build_model
from clip.tiny import FORMATS, save_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("snapshot", help="directory with config.json and model.safetensors / pytorch_model.bin")
    p.add_argument("out", help="output checkpoint path")
    p.add_argument("--format", choices=FORMATS, default="state_dict")
    args = p.parse_args(argv)
    state_dict = load_hf_snapshot(args.snapshot)
    build_model(state_dict)  # fail here, not at load time, if the result is not a valid CLIP
    path = save_checkpoint(args.out, state_dict, fmt=args.format)
    print(f"wrote {path} ({args.format}, {len(state_dict)} tensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

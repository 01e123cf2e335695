"""tools/convert_hf_clip.py: an HF snapshot converted to a file loads to the same model."""
import subprocess
import sys
from pathlib import Path

import torch

import clip
from clip.hf import save_hf_snapshot

ROOT = Path(__file__).resolve().parents[1]


def test_convert_tool_round_trip(tiny_vit_path, tmp_path):
    model, _ = clip.load(tiny_vit_path)
    save_hf_snapshot(model.openai_state_dict(), tmp_path / "hf")
    out = tmp_path / "converted.pt"
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_clip.py"), str(tmp_path / "hf"), str(out)],
                   check=True, capture_output=True)
    converted, _ = clip.load(str(out))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=0, atol=0, msg=key)

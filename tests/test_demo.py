"""The smoke demo (``python -m locoop demo``, what ``make demo`` runs) and the scripts it tells a newcomer
to try next: the README's demo commands, its SeTAR validation split and configs, and the visualisation."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from locoop.commands.demo import DEMO_CLASSES, DEMO_TOPK, next_commands, prepare_demo
from locoop.config import load_cfg
from locoop.data.datasets.valsplit import read_split_json

REPO = Path(__file__).resolve().parents[1]


def _env():
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")


def _readme_commands():
    return [ln.strip() for ln in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
            if ln.strip().startswith("bash scripts/") and "demo_output/" in ln]


def test_readme_shows_the_commands_the_demo_prints(monkeypatch):
    monkeypatch.chdir(REPO)  # `make demo` runs in the repository: ./demo_output
    out = REPO / "demo_output"
    prepared = {"data": out / "data", "configs": {n: out / "configs" / n for n in ("SeTAR.yaml", "SeTAR+FT.yaml")}}
    printed = next_commands(out, prepared, out / "data" / "scenes" / "n01440001_scene.jpg", 1)
    readme = _readme_commands()
    assert readme and all(cmd in printed for cmd in readme), (readme, printed)
    assert any("scripts/setar/search.sh" in c for c in readme) and any("scripts/setar/finetune.sh" in c for c in readme)


def test_demo_data_has_a_setar_split_and_configs_that_load(tmp_path):
    prepared = prepare_demo(tmp_path, seed=3)
    split = read_split_json(str(prepared["val_split"]))
    assert prepared["val_split"].name == "imagenet1k_val_data.json"  # SeTAR's name, found in the dataset folder
    assert sorted(split) == prepared["wnids"] and all(len(files) == 1 for files in split.values())
    for wnid, files in split.items():
        assert (prepared["data"] / "imagenet" / "images" / "train" / wnid / files[0]).is_file()
    search = load_cfg(str(prepared["configs"]["SeTAR.yaml"]))
    assert search.SETAR.TOPK == DEMO_TOPK < DEMO_CLASSES and search.DATASET.VAL_SPLIT_FILE == "imagenet1k_val_data.json"
    assert search.MODEL.BACKBONE.NAME == str(prepared["checkpoint"]) and list(search.SETAR.RATIOS)[0] == 0.0
    ft = load_cfg(str(prepared["configs"]["SeTAR+FT.yaml"]))
    assert ft.SETAR.FT.TOPK == DEMO_TOPK and ft.TRAINER.NAME == "SeTARFT" and ft.OPTIM.MAX_EPOCH <= 2
    header = prepared["configs"]["SeTAR.yaml"].read_text().splitlines()[:3]
    assert header[0].startswith("# The demo's copy of configs/setar/imagenet/SeTAR.yaml")
    assert len(prepared["scenes"]) == DEMO_CLASSES and all(p.is_file() for p in prepared["scenes"])


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "locoop", "demo", "--output", str(out), "--epochs", "2", "--quiet"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = out / "run"
    assert (run / "ood_results.md").is_file() and (run / "prompt_learner" / "model.pth.tar-2").is_file()
    assert "## Images" in (run / "ood_results.md").read_text()
    # The visualisation shows both kinds of region on ViT-B/16's 14x14 grid.
    m = re.search(r"(\d+) of 196 regions \(14x14 grid\) are OOD for label (\d+)", p.stdout)
    assert m, p.stdout[-2000:]
    n_ood, label = int(m.group(1)), int(m.group(2))
    assert 0 < n_ood < 196, p.stdout[-2000:]
    png = run / "visualization" / "scenes" / f"n0144{label:04d}_scene.png"
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (224, 224)
    # The commands to try next are printed, the SeTAR ones among them.
    tail = p.stdout[p.stdout.index("Next, the scripts"):]
    shown = [ln.strip() for ln in tail.splitlines()[1:] if ln.strip()]
    assert [c.split()[1] for c in shown] == ["scripts/locoop/eval.sh", "scripts/locoop/demo_visualization.sh",
                                             "scripts/setar/search.sh", "scripts/setar/search.sh",
                                             "scripts/setar/finetune.sh"]
    assert f"{out / 'data' / 'scenes' / png.with_suffix('.jpg').name} {label}" in shown[1]


@pytest.mark.slow
def test_setar_scripts_run_on_the_demo_data_as_printed(tmp_path):
    prepared = prepare_demo(tmp_path, seed=1)
    cmds = next_commands(tmp_path, prepared, prepared["scenes"][0], 0)
    search, finetune = cmds[2], cmds[4]
    p = subprocess.run(shlex.split(search), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "setar" / "SeTAR"
    doc = json.loads((out / "best_settings.json").read_text())
    assert doc["complete"] is True  # the completion marker of a finished search
    settings = doc["settings"]
    assert [s[:3] for s in settings] == [["visual", "W_up", 1], ["visual", "W_up", 0], ["text", "W_up", 1],
                                         ["text", "W_up", 0]]
    rows = (out / "search_log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4 * 4  # 2 visual + 2 text W_up steps x the demo's 4 ratios
    assert set(json.loads((out / "ood_results.json").read_text())["scores"]) == {"MCM", "GL-MCM"}
    p = subprocess.run(shlex.split(finetune), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ft = tmp_path / "setar" / "SeTAR+FT"
    assert (ft / "adapters" / "model.pth.tar-2").is_file() and (ft / "ood_results.json").is_file()

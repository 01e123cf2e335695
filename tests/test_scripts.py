"""The shell scripts' shared preamble (scripts/_common.sh) and the run settings they read
(``python -m locoop run-settings``, locoop/commands/run_settings.py)."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from locoop.cli import main as cli_main
from locoop.commands.run_settings import SCRIPT_NAMES, read_run_settings
from locoop.config import dump_cfg, get_cfg_default

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["scripts/locoop/train.sh", "scripts/locoop/eval.sh", "scripts/locoop/demo_visualization.sh",
           "scripts/setar/search.sh", "scripts/setar/finetune.sh", "scripts/demo.sh"]


# ------------------------------------------------------------------------------ interpreter choice
def _fake_repo(tmp_path, venv_python=None):
    """A folder laid out like the repository with scripts/_common.sh and a probe script sourcing it."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "_common.sh", repo / "scripts" / "_common.sh")
    probe = repo / "scripts" / "probe.sh"
    probe.write_text('set -euo pipefail\nsource "$(dirname "${BASH_SOURCE[0]}")/_common.sh"\necho "PY=${PY}"\n')
    if venv_python:
        _wrapper(repo / ".venv" / "bin" / "python", venv_python)
    return repo


def _wrapper(path, target):
    """An executable that runs ``target`` (stands in for an interpreter at ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _probe(repo, path_dirs=(), **env):
    full = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    full["PATH"] = os.pathsep.join([str(d) for d in path_dirs] + [os.environ.get("PATH", "/usr/bin:/bin")])
    full.update(env)
    return subprocess.run(["bash", str(repo / "scripts" / "probe.sh")], env=full, capture_output=True, text=True,
                          timeout=60)


def test_scripts_use_the_repository_venv_silently(tmp_path):
    repo = _fake_repo(tmp_path, venv_python=sys.executable)
    p = _probe(repo)
    assert p.returncode == 0 and p.stdout.strip() == f"PY={repo / '.venv' / 'bin' / 'python'}", p.stderr
    assert p.stderr == ""


def test_python_variable_wins_and_is_named(tmp_path):
    repo = _fake_repo(tmp_path, venv_python=sys.executable)
    p = _probe(repo, PYTHON=sys.executable)
    assert p.returncode == 0 and p.stdout.strip() == f"PY={sys.executable}"
    assert p.stderr.strip() == f"probe.sh: using {sys.executable} (PYTHON)"
    p = _probe(repo, PYTHON=str(tmp_path / "nope"))
    assert p.returncode == 2 and "PYTHON=" in p.stderr and "is not an executable" in p.stderr


def test_without_venv_python3_is_used_with_one_note(tmp_path):
    repo = _fake_repo(tmp_path)
    bin_dir = tmp_path / "bin"
    _wrapper(bin_dir / "python3", sys.executable)  # a python3 that has the project's packages
    p = _probe(repo, [bin_dir])
    assert p.returncode == 0 and p.stdout.strip() == "PY=python3", p.stderr
    assert p.stderr.strip() == f"probe.sh: using {bin_dir / 'python3'} (no {repo / '.venv' / 'bin' / 'python'})"


def _bare_python(tmp_path):
    """A real Python without the project's packages."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    return bare / "bin" / "python3"


def test_a_python_without_the_packages_stops_with_the_fix(tmp_path):
    bare = _bare_python(tmp_path)
    repo = _fake_repo(tmp_path)
    venv = repo / ".venv" / "bin" / "python"
    p = _probe(repo, [bare.parent])
    assert p.returncode == 2
    msg = p.stderr.strip().splitlines()
    assert msg[0] == f"probe.sh: using {bare} (no {venv})" and len(msg) == 2
    assert msg[1].startswith(f"probe.sh: error: python3 lacks the project's packages (yacs torch torchvision): "
                             f"run 'make install' in {repo} (creates .venv, which the scripts then use)")
    assert msg[1].endswith("pip install -r requirements.txt && pip install -e .")
    # A .venv whose installation stopped half-way says so (and nothing about which interpreter: it is the venv).
    _wrapper(venv, bare)
    p = _probe(repo)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert f"the installation into {repo}/.venv is incomplete: run 'make install' there again" in p.stderr
    # PYTHON without the packages while a good .venv exists: unset it.
    _wrapper(venv, sys.executable)
    p = _probe(repo, PYTHON=str(bare))
    assert p.returncode == 2 and f"unset PYTHON to use {venv}" in p.stderr


def test_every_script_sources_the_shared_preamble():
    for rel in SCRIPTS:
        text = (REPO / rel).read_text()
        assert "_common.sh" in text, rel
        assert "PYTHON:-python}" not in text and "export PYTHONPATH" not in text, rel  # no copies of the preamble
        assert subprocess.run(["bash", "-n", str(REPO / rel)]).returncode == 0, rel


# ------------------------------------------------------------------------------ run settings
def _run_folder(root, *, config=True, epochs=(2, 4), ctx_shape=(3, 4, 8), max_epoch=5, backbone="/x/tiny.pt"):
    root.mkdir(parents=True, exist_ok=True)
    if config:
        cfg = get_cfg_default()
        cfg.TRAINER.NAME = "CoOp"
        cfg.MODEL.BACKBONE.NAME = backbone
        cfg.TRAINER.LOCOOP.N_CTX = ctx_shape[-2]
        cfg.TRAINER.LOCOOP.CSC = len(ctx_shape) == 3
        cfg.TRAINER.LOCOOP.CLASS_TOKEN_POSITION = "middle"
        cfg.TRAINER.LOCOOP.TOPK = 3
        cfg.OPTIM.MAX_EPOCH = max_epoch
        dump_cfg(cfg, str(root / "config.yaml"))
    for e in epochs:
        (root / "prompt_learner").mkdir(exist_ok=True)
        torch.save({"state_dict": {"ctx": torch.zeros(ctx_shape)}, "epoch": e, "trainer": "CoOp"},
                   root / "prompt_learner" / f"model.pth.tar-{e}")
    return root


def test_settings_come_from_config_yaml_and_the_last_checkpoint(tmp_path):
    run = _run_folder(tmp_path / "run")
    s = read_run_settings(str(run))
    assert s.values == {"TRAINER.NAME": "CoOp", "MODEL.BACKBONE.NAME": "/x/tiny.pt", "TRAINER.LOCOOP.N_CTX": 4,
                        "TRAINER.LOCOOP.CSC": True, "TRAINER.LOCOOP.CTX_INIT": "",
                        "TRAINER.LOCOOP.CLASS_TOKEN_POSITION": "middle", "TRAINER.LOCOOP.TOPK": 3,
                        "OPTIM.MAX_EPOCH": 5}
    assert s.epochs == [2, 4] and s.load_epoch == 4 and s.config_file == str(run / "config.yaml")
    assert len(s.notes) == 1 and "last checkpoint is epoch 4 of OPTIM.MAX_EPOCH 5" in s.notes[0]
    assert read_run_settings(str(run), "2").load_epoch == 2 and read_run_settings(str(run), "2").notes == []
    assert read_run_settings(str(run), "latest").load_epoch is None


def test_bad_folders_and_epochs_name_the_scripts_variables(tmp_path):
    run = _run_folder(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"LOAD_EPOCH=3: .* no checkpoint of epoch 3; checkpoints: epochs 2, 4"):
        read_run_settings(str(run), "3", SCRIPT_NAMES)
    with pytest.raises(FileNotFoundError, match="--load-epoch=3"):
        read_run_settings(str(run), "3")
    with pytest.raises(ValueError, match="LOAD_EPOCH=x is not an epoch number"):
        read_run_settings(str(run), "x", SCRIPT_NAMES)
    with pytest.raises(FileNotFoundError, match="MODEL_DIR .* is not a folder"):
        read_run_settings(str(tmp_path / "missing"), None, SCRIPT_NAMES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither config.yaml nor checkpoints"):
        read_run_settings(str(tmp_path / "empty"), None, SCRIPT_NAMES)
    with pytest.raises(FileNotFoundError, match="has a config.yaml but no checkpoint yet"):
        read_run_settings(str(_run_folder(tmp_path / "cfg_only", epochs=())), None, SCRIPT_NAMES)


def test_without_config_yaml_the_checkpoint_gives_n_ctx_and_csc(tmp_path):
    s = read_run_settings(str(_run_folder(tmp_path / "csc", config=False, ctx_shape=(5, 7, 8))))
    assert s.values == {"TRAINER.LOCOOP.N_CTX": 7, "TRAINER.LOCOOP.CSC": True, "TRAINER.LOCOOP.CTX_INIT": "",
                        "TRAINER.NAME": "CoOp"}
    assert s.config_file is None and s.load_epoch == 4 and "read from prompt_learner/model.pth.tar-4" in s.notes[0]
    shared = read_run_settings(str(_run_folder(tmp_path / "shared", config=False, ctx_shape=(16, 8))))
    assert shared.values["TRAINER.LOCOOP.N_CTX"] == 16 and shared.values["TRAINER.LOCOOP.CSC"] is False


def test_shell_output_survives_the_shell(tmp_path, capsys):
    run = _run_folder(tmp_path / "run", backbone=str(tmp_path / "my models" / "it's.pt"), epochs=(5,))
    assert cli_main(["run-settings", str(run), "--shell", "--prog", "eval.sh"]) == 0
    out, err = capsys.readouterr()
    assert err.strip().startswith("eval.sh: run settings from ") and "N_CTX 4, CSC True, class token middle" in err
    p = subprocess.run(["bash", "-c", 'eval "$(cat)"; printf "%s|" "$RUN_TRAINER" "$RUN_BACKBONE" "$RUN_NCTX" '
                        '"$RUN_CSC" "$RUN_CTX_INIT" "$RUN_CTP" "$RUN_TOPK" "$RUN_LOAD_EPOCH"'],
                       input=out, capture_output=True, text=True, check=True)
    assert p.stdout == f"CoOp|{tmp_path / 'my models' / 'its.pt'}|4|True||middle|3|5|".replace("its", "it's")
    assert cli_main(["run-settings", str(run), "--shell", "--prog", "eval.sh", "--load-epoch", "9"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().startswith("eval.sh: error: LOAD_EPOCH=9:")
    assert cli_main(["run-settings", str(run)]) == 0
    assert "TRAINER.LOCOOP.N_CTX" in capsys.readouterr().out


def _script(rel, args, cwd, **env):
    full = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **{k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(REPO / rel)] + [str(a) for a in args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=300)


def _only_script_names(stderr):
    """Error lines name the scripts' own arguments and variables, never a python -m locoop flag."""
    errors = [ln for ln in stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1, stderr
    assert " --" not in errors[0] and "python -m locoop" not in errors[0], errors[0]
    return errors[0]


def test_eval_and_visualization_errors_name_their_own_arguments(tmp_path):
    run = _run_folder(tmp_path / "run", epochs=(5,))
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    data = tmp_path
    cases = [
        ("scripts/locoop/eval.sh", [data, "imagenet", "vit_b16_ep50", 1, run], {"LOAD_EPOCH": 50}, "LOAD_EPOCH=50"),
        ("scripts/locoop/eval.sh", [data, "imagenet", "vit_b16_ep50", 1, run], {"EPOCHS": 50}, "LOAD_EPOCH=50"),
        ("scripts/locoop/eval.sh", [data, "imagenet", "vit_b16_ep50", 1, tmp_path / "nope"], {}, "MODEL_DIR"),
        ("scripts/locoop/eval.sh", [data, "imagenet", "vit_b16_ep50", 1, tmp_path], {}, "holds neither"),
        ("scripts/locoop/eval.sh", [tmp_path / "nodata", "imagenet", "vit_b16_ep50", 1, run], {}, "DATA "),
        ("scripts/locoop/eval.sh", [data, "imagnet", "vit_b16_ep50", 1, run], {}, "DATASET 'imagnet'"),
        ("scripts/locoop/eval.sh", [data, "imagenet", "vit_b16", 1, run], {}, "CFG 'vit_b16'"),
        ("scripts/locoop/eval.sh", [data, "imagenet", "vit_b16_ep50", "one", run], {}, "T must be a number"),
        ("scripts/locoop/demo_visualization.sh", [data, "imagenet", "vit_b16_ep50", run, tmp_path / "no.png", 0], {},
         "IMAGE_PATH"),
        ("scripts/locoop/demo_visualization.sh", [data, "imagenet", "vit_b16_ep50", run, image, -1], {}, "LABEL must"),
        ("scripts/locoop/demo_visualization.sh", [data, "imagenet", "vit_b16_ep50", run, image, 0], {"LOAD_EPOCH": 2},
         "LOAD_EPOCH=2"),
        ("scripts/locoop/train.sh", [data, "imagenet", "vit_b16_ep50", "back", 16, 16, "False", 0.25, 200], {},
         "CTP must be"),
        ("scripts/locoop/train.sh", [data, "imagenet", "vit_b16_ep50", "end", 16, 16, "false", 0.25, 200], {},
         "CSC must be"),
    ]
    for rel, args, env, expected in cases:
        p = _script(rel, args, tmp_path, **env)
        assert p.returncode == 2, (rel, args, p.stdout[-500:], p.stderr[-1000:])
        line = _only_script_names(p.stderr)
        assert line.startswith(f"{Path(rel).name}: error: ") and expected in line, (rel, line)
    p = _script("scripts/locoop/eval.sh", [data, "imagenet"], tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("usage: bash ") and "DATA DATASET CFG T MODEL_DIR" in p.stderr


@pytest.mark.slow
def test_eval_and_visualization_scripts_read_the_run(tmp_path, tiny_vit_path, capsys):
    from locoop.data.synthetic import make_imagenet_like, make_ood_sets

    data = tmp_path / "data"
    make_imagenet_like(str(data), num_classes=4, train_per_class=4, val_per_class=3, image_size=(32, 32), seed=0)
    make_ood_sets(str(data), per_set=3, image_size=(32, 32), seed=1)
    run = tmp_path / "run"
    small = ["INPUT.SIZE", "(32,32)", "DATALOADER.NUM_WORKERS", "0", "TRAINER.LOCOOP.PREC", "fp32"]
    # Trained with settings that differ from every script default: N_CTX 3, CSC, class token in front, TOPK 2.
    assert cli_main(["train", "--root", str(data), "--trainer", "LoCoOp", "--seed", "1", "--output-dir", str(run),
                     "--dataset-config-file", str(REPO / "configs/datasets/imagenet.yaml"),
                     "--config-file", str(REPO / "configs/trainers/LoCoOp/vit_b16_ep50.yaml"), "--topk", "2",
                     "MODEL.BACKBONE.NAME", tiny_vit_path, "TRAINER.LOCOOP.N_CTX", "3", "TRAINER.LOCOOP.CSC", "True",
                     "TRAINER.LOCOOP.CLASS_TOKEN_POSITION", "front", "OPTIM.MAX_EPOCH", "2", "DATASET.NUM_SHOTS", "2",
                     "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "VERBOSE", "False"] + small) == 0
    capsys.readouterr()
    extra = " ".join(small + ["OOD.PLOT", "False", "OOD.SCORES", "['MCM']", "VERBOSE", "False"])
    # No NCTX / CSC / CTP / BACKBONE / EPOCHS: everything comes from the run folder.
    p = _script("scripts/locoop/eval.sh", [data, "imagenet", "vit_b16_ep50", 1, run], tmp_path, EXTRA_OPTS=extra)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert ("eval.sh: run settings from " + str(run / "config.yaml")) in p.stderr
    doc = json.loads((run / "ood_results.json").read_text())
    assert doc["meta"]["load_epoch"] == 2
    lc = doc["meta"]["config"]["TRAINER"]["LOCOOP"]
    assert (lc["N_CTX"], lc["CSC"], lc["CLASS_TOKEN_POSITION"]) == (3, True, "front")
    assert doc["meta"]["config"]["MODEL"]["BACKBONE"]["NAME"] == tiny_vit_path
    image = sorted((data / "imagenet/images/val").glob("*/*"))[0]
    p = _script("scripts/locoop/demo_visualization.sh", [data, "imagenet", "vit_b16_ep50", run, image, 0], tmp_path,
                EXTRA_OPTS=" ".join(small))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "are OOD for label 0 (not in their top-2)" in p.stdout  # the run's TOPK, not the YAML's 200

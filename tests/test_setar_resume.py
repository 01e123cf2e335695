"""A SeTAR search that is interrupted resumes to exactly the uninterrupted run; settings files carry a
completion marker that every consumer checks (locoop/setar/search.py, outputs.py, settings.py)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip
from clip.model import build_model
from clip.tiny import random_state_dict
from locoop.models.head import ClassPrompts
from locoop.setar.criterion import Criterion
from locoop.setar.outputs import LOG_CSV, LOG_JSON, PROGRESS_FILE, SETTINGS_FILE, SUMMARY_FILE, read_progress
from locoop.setar.search import SearchData, run_search
from locoop.setar.settings import load_settings, save_best_settings, save_settings

REPO = Path(__file__).resolve().parents[1]
C = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, 32, 32, generator=g), torch.randint(0, C, (5,), generator=g)) for _ in range(2)]
    tokens = clip.tokenize([f"a photo of a thing{i}." for i in range(C)])
    return SearchData(batches, ClassPrompts(tokens=tokens, chunk_size=4))


def tiny():
    return build_model(random_state_dict("tiny-vit", seed=0))


KW = dict(ratios=[0.0, 0.1, 0.3, 0.5, 0.7], top_k=2, lam=0.5, verbose=False, freeze_proj=False)


class Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, where, n):
    """Stop the run like a kill would: at the n-th criterion evaluation (in the middle of a step),
    or right after the n-th progress file was written (between two steps)."""
    import locoop.setar.search as search

    calls = {"n": 0}
    if where == "criterion":
        original = Criterion.__call__

        def call(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise Interrupted()
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Criterion, "__call__", call)
    else:
        write = search.write_progress

        def write_progress(out, progress):
            path = write(out, progress)
            calls["n"] += 1
            if calls["n"] == n:
                raise Interrupted()
            return path

        monkeypatch.setattr(search, "write_progress", write_progress)


def _files(folder):
    return {name: (Path(folder) / name).read_bytes() for name in (LOG_CSV, LOG_JSON, SETTINGS_FILE)}


@pytest.mark.parametrize("searcher, mode, stop", [
    # in the 4th step (text W_p): the visual tower is done, its features are recomputed on resume
    ("visual_text", "fast", ("criterion", 14)),
    ("visual_text", "naive", ("criterion", 30)),  # at the last candidate
    # after round 5, which committed ratio 0: round 6 reuses round 5's results, also after the resume
    ("layer_exhaustive", "fast", ("progress", 5)),
])
def test_interrupted_search_resumes_to_the_same_settings_and_log(tmp_path, monkeypatch, data, searcher, mode, stop):
    ref = run_search(tiny(), data, searcher=searcher, mode=mode, output_dir=tmp_path / "ref", **KW)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_after(m, *stop)
        with pytest.raises(Interrupted):
            run_search(tiny(), data, searcher=searcher, mode=mode, output_dir=out, **KW)
    progress = read_progress(out)
    assert progress is not None and not progress.complete and 0 < len(progress.settings) < len(ref.settings)
    assert not (out / SETTINGS_FILE).exists() and not (out / SUMMARY_FILE).exists()
    assert progress.settings == ref.settings[:len(progress.settings)]
    with pytest.raises(FileNotFoundError):
        load_settings(out / SETTINGS_FILE)
    with pytest.raises(ValueError, match="progress file of a SeTAR search"):
        load_settings(out / PROGRESS_FILE)

    model = tiny()
    res = run_search(model, data, searcher=searcher, mode=mode, output_dir=out, resume=progress, **KW)
    assert res.settings == ref.settings and res.log == ref.log  # every value bit for bit, reuse flags too
    if searcher == "layer_exhaustive":
        assert any(row["reused"] for row in res.log if row["step"] == 5)
    assert res.final == ref.final and res.baseline == ref.baseline
    assert _files(out) == _files(tmp_path / "ref")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["resumed_at"] == [len(progress.settings)] and summary["settings"] == ref.settings
    assert read_progress(out).complete
    # the resumed model is the uninterrupted one
    ref_model = tiny()
    from locoop.setar.lowrank import LowRankEditor
    from locoop.setar.settings import apply_settings

    apply_settings(LowRankEditor(ref_model), ref.settings)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))
    # a complete search "resumed" again does nothing but rewrite the same files
    again = run_search(tiny(), data, searcher=searcher, mode=mode, output_dir=out, resume=read_progress(out), **KW)
    assert again.log == ref.log and _files(out) == _files(tmp_path / "ref")


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch, data):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_after(m, "criterion", 8)
        with pytest.raises(Interrupted):
            run_search(tiny(), data, output_dir=out, identity={"prompts": "a"}, **KW)
    progress = read_progress(out)
    before = (out / PROGRESS_FILE).read_bytes()
    kw = dict(KW, lam=0.25, ratios=[0.0, 0.2])
    with pytest.raises(ValueError, match=r"lambda \(SETAR.LAMBDA\): 0.5 there, 0.25 now; prompts: \"a\" there, "
                                         r"\"b\" now; ratios \(SETAR.RATIOS\): \[0.0, 0.1, 0.3, 0.5, 0.7\] there, "
                                         r"\[0.0, 0.2\] now"):
        run_search(tiny(), data, output_dir=out, identity={"prompts": "b"}, resume=progress, **kw)
    with pytest.raises(ValueError, match=r"searcher \(SETAR.SEARCHER\)"):
        run_search(tiny(), data, searcher="text_visual", output_dir=out, identity={"prompts": "a"}, resume=progress,
                   **KW)
    assert (out / PROGRESS_FILE).read_bytes() == before  # refused before anything was written
    # the mode and the cache budget change nothing: a fast search resumes in naive mode
    res = run_search(tiny(), data, mode="naive", output_dir=out, identity={"prompts": "a"}, resume=progress, **KW)
    assert json.loads((out / SUMMARY_FILE).read_text())["resumed_at"] == [len(progress.settings)]
    assert read_progress(out).modes == ["fast", "naive"] and len(res.settings) == 6


def test_settings_files_and_the_completion_marker(tmp_path):
    settings = [["visual", "W_up", 1, 0.35], ["text", "W_p", None, 0.1]]
    marked = save_best_settings(tmp_path / "best.json", settings)
    doc = json.loads(marked.read_text())
    assert doc == {"format": "locoop.setar.settings", "complete": True, "settings": settings}
    assert [list(s) for s in load_settings(marked)] == settings
    plain = save_settings(tmp_path / "plain.json", settings)  # hand-written / SeTAR form: no marker, accepted
    assert json.loads(plain.read_text()) == settings and [list(s) for s in load_settings(plain)] == settings
    for bad, match in [({**doc, "complete": False}, "marked incomplete"), ({k: v for k, v in doc.items()
                                                                            if k != "complete"}, "marked incomplete"),
                       ({"format": "locoop.setar.settings", "complete": True}, "no 'settings' entry"),
                       ({"lora_settings": None, "model_name": "x"}, "lora_settings is null"),
                       ({"settings": settings}, "expected a list .*, a best_settings.json .* or SeTAR's config_best")]:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_settings(path)


# ------------------------------------------------------------------------------------ the command, killed for real
def _make_data(root):
    from clip.tiny import make_tiny_checkpoint
    from locoop.data.synthetic import make_imagenet_like, make_val_split

    make_imagenet_like(str(root), num_classes=5, train_per_class=2, val_per_class=2, image_size=(40, 40))
    make_val_split(str(root / "val_split.json"), str(root / "imagenet" / "images" / "train"), per_class=2)
    return make_tiny_checkpoint(root / "tiny-vit.pt", like="tiny-vit", seed=0)


def _argv(root, out, *extra):
    return ["setar-search", "--root", str(root), "--config-file", str(REPO / "configs/setar/imagenet/SeTAR.yaml"),
            "--output-dir", str(out), "--no-test", "MODEL.BACKBONE.NAME", str(root / "tiny-vit.pt"),
            "MODEL.DEVICE", "cpu", "DATASET.VAL_SPLIT_FILE", str(root / "val_split.json"), "INPUT.SIZE", "(32, 32)",
            "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "4", "SETAR.TOPK", "2", "VERBOSE", "False",
            *extra]


# The child kills itself with SIGKILL in the middle of step 3 (after step 2's progress was written): a
# real kill at a deterministic point, however fast or slow the machine is.
_KILLED_CHILD = """
import os, signal, sys, torch
torch.set_num_threads(1)
import locoop.setar.search as search
from locoop.setar.criterion import Criterion
write, call = search.write_progress, Criterion.__call__
armed = []
def write_progress(out, progress):
    path = write(out, progress)
    if len(progress.settings) == 2:
        armed.append(True)
    return path
def criterion(self, *a, **k):
    if armed:
        os.kill(os.getpid(), signal.SIGKILL)
    return call(self, *a, **k)
search.write_progress, Criterion.__call__ = write_progress, criterion
from locoop.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_search_command_resumes(tmp_path, capsys):
    from locoop.cli import main

    _make_data(tmp_path)
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main(_argv(tmp_path, ref)) == 0

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-c", _KILLED_CHILD, *_argv(tmp_path, out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-2000:]
    progress = json.loads((out / PROGRESS_FILE).read_text())
    assert len(progress["settings"]) == 2 and progress["complete"] is False
    assert not (out / SETTINGS_FILE).exists()  # only a complete search writes it

    # the consumers refuse what the killed search left, with one line saying what to do
    capsys.readouterr()
    ft = ["setar-finetune", "--root", str(tmp_path), "--config-file",
          str(REPO / "configs/setar/finetune/imagenet/SeTAR+FT.yaml"), "--output-dir", str(tmp_path / "ft")]
    assert main(ft + ["--settings", str(out / PROGRESS_FILE)]) == 2
    err = capsys.readouterr().err
    assert "progress file of a SeTAR search" in err and "run the same `python -m locoop setar-search`" in err
    assert main(_argv(tmp_path, tmp_path / "apply", "SETAR.SETTINGS_FILE", str(out / SETTINGS_FILE))) == 2
    assert "not found" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished.json"
    unfinished.write_text(json.dumps({"format": "locoop.setar.settings", "complete": False,
                                      "settings": progress["settings"]}))
    assert main(_argv(tmp_path, tmp_path / "apply", "SETAR.SETTINGS_FILE", str(unfinished))) == 2
    err = capsys.readouterr().err
    assert "marked incomplete" in err and len(err.strip().splitlines()) == 1  # one line (the debug hint on it)

    # resuming with other search settings is refused, naming them; nothing is touched
    before = (out / PROGRESS_FILE).read_bytes()
    assert main(_argv(tmp_path, out, "SETAR.LAMBDA", "0.2", "SETAR.WEIGHT_TYPES", "['W_down']")) == 2
    err = capsys.readouterr().err
    assert "cannot resume the SeTAR search" in err
    assert "lambda (SETAR.LAMBDA): 0.1 there, 0.2 now" in err and "weight_types (SETAR.WEIGHT_TYPES)" in err
    assert (out / PROGRESS_FILE).read_bytes() == before
    assert main(_argv(tmp_path, out, "INPUT.SIZE", "(40, 40)")) == 2
    assert "INPUT.SIZE" in capsys.readouterr().err

    # the same command resumes: the same settings and log as the uninterrupted run
    assert main(_argv(tmp_path, out)) == 0
    for name in (LOG_JSON, LOG_CSV, SETTINGS_FILE):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["resumed_at"] == [2] and json.loads((ref / SUMMARY_FILE).read_text())["resumed_at"] == []
    # and its best_settings.json is accepted by the consumers
    assert main(_argv(tmp_path, tmp_path / "apply2", "SETAR.SETTINGS_FILE", str(out / SETTINGS_FILE))) == 0

    # a folder holding settings of another run is not searched into
    assert main(_argv(tmp_path, tmp_path / "apply2")) == 2
    assert "belongs to another run" in capsys.readouterr().err

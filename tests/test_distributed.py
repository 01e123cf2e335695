"""Distributed training, evaluation, SeTAR search and SeTAR+FT with two real processes (torchrun, gloo, CPU).

The slow tests launch this file as a torchrun worker. ``_worker``: CoOp trains a few steps with a
DistributedSampler and averaged gradients, then the OOD benchmark and the classification test run
sharded; the parent compares with one process that uses the same global batch. ``_cli_worker``:
one command of the command-line interface (``setar-search``, ``setar-finetune``) on every rank,
with an audit hook recording every file the non-zero ranks create, change or remove under the
output folder; the parent compares with the same command in one process.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
OOD_SETS = ["iNaturalist", "Texture"]
WORLD = 2
PER_RANK_BATCH = 2


def make_cfg(data_root, backbone, out, batch_size):
    from locoop.config import get_cfg_default

    cfg = get_cfg_default()
    cfg.SEED = 1
    cfg.VERBOSE = False
    cfg.OUTPUT_DIR = str(out)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.TRAINER.NAME = "CoOp"
    cfg.DATASET.ROOT = str(data_root)
    cfg.DATASET.NAME = "ImageNet"
    cfg.DATASET.NUM_SHOTS = 4
    cfg.INPUT.SIZE = (32, 32)
    cfg.INPUT.TRANSFORMS = ["normalize"]  # no random augmentation: both runs see the same pixels
    cfg.INPUT.PIXEL_MEAN = MEAN
    cfg.INPUT.PIXEL_STD = STD
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.TRAIN_X.SAMPLER = "SequentialSampler"
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = batch_size
    cfg.DATALOADER.TEST.BATCH_SIZE = 2  # 5 images per OOD set = 3 batches: uneven shards over 2 ranks
    cfg.OPTIM.NAME = "sgd"
    cfg.OPTIM.LR = 0.05
    cfg.OPTIM.MAX_EPOCH = 2
    cfg.OPTIM.LR_SCHEDULER = "cosine"
    cfg.TEST.NO_TEST = True
    cfg.TRAINER.LOCOOP.N_CTX = 4
    cfg.OOD.DATASETS = list(OOD_SETS)
    cfg.OOD.SCORES = ["MCM", "GL-MCM", "energy"]
    cfg.OOD.PLOT = False
    cfg.OOD.USE_CACHE = False
    return cfg


def train_and_evaluate(cfg, eval_dir):
    """Train, then the classification test and the OOD benchmark; returns what the test compares."""
    from locoop.engine.registry import build_trainer
    from locoop.engine.seed import set_random_seed
    from locoop.ood.runner import run_ood_benchmark

    set_random_seed(cfg.SEED)  # as the train command does: the same context initialisation everywhere
    trainer = build_trainer(cfg)
    trainer.train()
    acc = trainer.test()
    # The OOD benchmark of the frozen CLIP with fixed text features: the same model in both runs,
    # so sharded scoring can be compared bit for bit.
    text = torch.randn(trainer.num_classes, trainer.clip_model.embed_dim, generator=torch.Generator().manual_seed(0))
    res = run_ood_benchmark(cfg, trainer.clip_model, text, eval_dir, device="cpu", dataset=trainer.dm.dataset,
                            verbose=False)
    return {"ctx": trainer.model.prompt_learner.ctx.detach().clone(), "acc": float(acc),
            "id_scores": res["id_scores"], "ood_scores": res["ood_scores"], "metrics": res["metrics"],
            "num_images": res["num_images"]}


def _worker(data_root, backbone, out):
    """One torchrun process: writes nothing itself except its dump under ``out/dumps``."""
    torch.set_num_threads(1)
    from locoop.engine import dist

    rank = int(os.environ["RANK"])
    cfg = make_cfg(data_root, backbone, os.path.join(out, f"train_rank{rank}"), PER_RANK_BATCH)
    res = train_and_evaluate(cfg, os.path.join(out, f"eval_rank{rank}"))
    # Collective helpers with uneven inputs: rank r contributes r + 3 rows.
    part = torch.arange((rank + 3) * 2, dtype=torch.float32).reshape(rank + 3, 2) + 100 * rank
    res["gathered"] = dist.all_gather_tensor(part)
    res["objects"] = dist.all_gather_object({"rank": rank})
    res["world"] = dist.get_world_size()
    res["main"] = dist.is_main_process()
    os.makedirs(os.path.join(out, "dumps"), exist_ok=True)
    torch.save(res, os.path.join(out, "dumps", f"rank{rank}.pt"))


# ------------------------------------------------------------------------------------ helpers
def test_shard_indices_cover_in_order_and_align():
    from locoop.engine.dist import shard_indices

    for n in (0, 1, 5, 9, 10, 17):
        for w in (1, 2, 3, 4):
            for align in (1, 2, 4):
                shards = [shard_indices(n, r, w, align=align) for r in range(w)]
                assert [i for s in shards for i in s] == list(range(n))
                for s in shards:  # every shard starts on a batch boundary
                    assert len(s) == 0 or s.start % align == 0
                sizes = [-(-len(s) // align) for s in shards]  # batches per rank differ by at most one
                assert max(sizes) - min(sizes) <= 1
    # 9 images in batches of 2 = 5 batches: rank 0 gets 2 (floor(5 / 2)), rank 1 the other 3.
    assert list(shard_indices(9, 0, 2, align=2)) == [0, 1, 2, 3]
    assert list(shard_indices(9, 1, 2, align=2)) == [4, 5, 6, 7, 8]
    assert list(shard_indices(5, 0, 2)) == [0, 1] and list(shard_indices(5, 1, 2)) == [2, 3, 4]
    assert list(shard_indices(5, 1, 2, mode="strided")) == [1, 3]
    with pytest.raises(ValueError, match="rank 2 is not in"):
        shard_indices(5, 2, 2)


def test_single_process_is_the_default(monkeypatch):
    from locoop.engine import dist

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert dist.init_from_env("cpu") is False
    assert (dist.get_rank(), dist.get_world_size(), dist.is_main_process(), dist.is_distributed()) == (0, 1, True,
                                                                                                       False)
    assert dist.all_gather_object(3) == [3] and dist.broadcast_object("x") == "x"
    t = torch.ones(2)
    dist.all_reduce_mean_([t])
    assert t.tolist() == [1.0, 1.0]
    dist.barrier()
    # Before the process group exists, torchrun's RANK alone keeps non-zero ranks quiet.
    monkeypatch.setenv("RANK", "1")
    assert dist.is_main_process() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="launch with `torchrun"):
        dist.init_from_env("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from locoop.data.synthetic import make_imagenet_like, make_ood_sets

    root = tmp_path_factory.mktemp("dist_data")
    # 12 ID test images (not 9: sklearn's AUPR of 9 perfectly separated ID images is 1.0000000000000002,
    # which the result writer refuses).
    make_imagenet_like(str(root), num_classes=3, train_per_class=4, val_per_class=4, image_size=(32, 32), seed=0)
    make_ood_sets(str(root), names=OOD_SETS, per_set=5, image_size=(32, 32), seed=1)
    return root


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one(tmp_path, data_root, tiny_vit_path):
    torch.set_num_threads(1)
    # One process, global batch = 2 per rank x 2 ranks. Running it first also writes the few-shot
    # split file, so the distributed run has no reason to write anywhere but its output folder.
    single = train_and_evaluate(make_cfg(data_root, tiny_vit_path, tmp_path / "single", PER_RANK_BATCH * WORLD),
                                tmp_path / "single_eval")

    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), os.path.abspath(__file__), "--worker",
           json.dumps([str(data_root), tiny_vit_path, str(out)])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / "dumps" / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    assert [r["world"] for r in ranks] == [WORLD, WORLD] and [r["main"] for r in ranks] == [True, False]
    # Training: both ranks hold the same context vectors, equal to the one-process run's.
    torch.testing.assert_close(ranks[0]["ctx"], ranks[1]["ctx"], rtol=0, atol=0)
    assert not torch.allclose(single["ctx"], torch.zeros_like(single["ctx"]))
    torch.testing.assert_close(ranks[0]["ctx"], single["ctx"], rtol=1e-4, atol=1e-4)
    # Classification test (sharded loader, gathered outputs) on every rank = one process's.
    assert [r["acc"] for r in ranks] == [single["acc"]] * WORLD
    # OOD benchmark: every image scored once, in order, bit-identical to one process (12 ID images
    # and 5 per OOD set in batches of 2: uneven shards), the same result on both ranks.
    for r in ranks:
        assert r["num_images"] == {"ID": 12, "iNaturalist": 5, "Texture": 5} == single["num_images"]
        assert r["metrics"] == single["metrics"]
        for s, v in single["id_scores"].items():
            np.testing.assert_array_equal(r["id_scores"][s], v)
        for o, per in single["ood_scores"].items():
            for s, v in per.items():
                np.testing.assert_array_equal(r["ood_scores"][o][s], v)
    # Uneven gathers keep every row once, in rank order.
    expected = torch.cat([torch.arange(6.).reshape(3, 2), torch.arange(8.).reshape(4, 2) + 100])
    for r in ranks:
        torch.testing.assert_close(r["gathered"], expected)
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]
    # Only rank 0 wrote files.
    assert (out / "train_rank0" / "prompt_learner" / "model.pth.tar-2").is_file()
    assert (out / "train_rank0" / "log.txt").is_file()
    assert (out / "eval_rank0" / "ood_results.json").is_file() and (out / "eval_rank0" / "ood_scores.npz").is_file()
    assert not (out / "train_rank1").exists() and not (out / "eval_rank1").exists()


# ------------------------------------------------------------------------------------ commands under torchrun
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _cli_worker(argv, watch_dir, report_dir):
    """One torchrun process running ``python -m locoop <argv>``; records writes under ``watch_dir`` (rank > 0)."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    watch = os.path.realpath(watch_dir)
    writes = []

    def under(path):
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return False
        real = os.path.realpath(path)
        return real == watch or real.startswith(watch + os.sep)

    def hook(event, args):
        if event == "open" and args and under(args[0]):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int)
                                                                              and flags & _WRITE_FLAGS):
                writes.append([event, str(args[0])])
        elif event in ("os.rename", "os.remove", "os.rmdir", "os.truncate", "os.chmod") and args and under(args[0]):
            writes.append([event, str(args[0])])
        elif event == "os.mkdir" and args and under(args[0]) and not os.path.isdir(args[0]):
            writes.append([event, str(args[0])])

    if rank != 0:
        sys.addaudithook(hook)
    from locoop.cli import main

    rc = main(list(argv))
    recorded = list(writes)  # the dump below is outside the watched folder
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rc": rc, "writes": recorded}, f)
    sys.exit(rc)


def _torchrun_cli(argv, watch_dir, tmp_path):
    report = tmp_path / "reports"
    report.mkdir(exist_ok=True)
    os.makedirs(watch_dir, exist_ok=True)  # as rank 0 would; then no rank races to create it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), os.path.abspath(__file__), "--cli-worker",
           json.dumps([list(argv), str(watch_dir), str(report)])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((report / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["rc"] for r in reports] == [0] * WORLD
    return reports


@pytest.fixture(scope="module")
def setar_root(data_root):
    from locoop.data.synthetic import make_val_split

    make_val_split(str(data_root / "val.json"), str(data_root / "imagenet" / "images" / "train"), per_class=2, seed=0)
    (data_root / "ft_settings.json").write_text(json.dumps([["visual", "W_up", 1, 0.25], ["text", "W_up", 1, 0.25]]))
    return data_root


def _common_opts(root, backbone):
    return ["MODEL.BACKBONE.NAME", backbone, "MODEL.DEVICE", "cpu", "DATASET.VAL_SPLIT_FILE", str(root / "val.json"),
            "INPUT.SIZE", "(32, 32)", "INPUT.TRANSFORMS", "['normalize']", "DATALOADER.NUM_WORKERS", "0",
            "DATALOADER.TEST.BATCH_SIZE", "2", "OOD.DATASETS", str(OOD_SETS), "OOD.PLOT", "False",
            "OOD.USE_CACHE", "False", "VERBOSE", "False"]


def _same_results(a, b):
    """ood_results.json metrics and ood_scores.npz of two runs are identical."""
    ra, rb = (json.loads((d / "ood_results.json").read_text()) for d in (a, b))
    assert ra["scores"] == rb["scores"] and ra["id_accuracy"] == rb["id_accuracy"]
    sa, sb = np.load(a / "ood_scores.npz"), np.load(b / "ood_scores.npz")
    assert sorted(sa.files) == sorted(sb.files) and "Texture/GL-MCM" in sa.files
    for k in sa.files:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


@pytest.mark.slow
def test_setar_search_on_two_processes_is_the_single_process_search(tmp_path, setar_root, tiny_vit_path):
    from locoop.cli import main

    torch.set_num_threads(1)
    argv = lambda out: ["setar-search", "--root", str(setar_root), "--config-file",  # noqa: E731
                        os.path.join(REPO, "configs/setar/imagenet/SeTAR.yaml"), "--output-dir", str(out),
                        *_common_opts(setar_root, tiny_vit_path), "SETAR.TOPK", "2"]
    single, dist_out = tmp_path / "single", tmp_path / "dist"
    assert main(argv(single)) == 0
    reports = _torchrun_cli(argv(dist_out), dist_out, tmp_path)
    assert reports[1]["writes"] == []  # rank 1 created, changed or removed nothing
    for name in ("best_settings.json", "search_log.json", "search_log.csv"):
        assert (dist_out / name).read_bytes() == (single / name).read_bytes(), name  # settings and criteria
    assert json.loads((dist_out / "search_progress.json").read_text())["complete"] is True
    _same_results(dist_out, single)  # the sharded test pass of the pruned model


@pytest.mark.slow
def test_setar_finetune_on_two_processes(tmp_path, setar_root, tiny_vit_path):
    from locoop.cli import main
    from locoop.engine.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    config = os.path.join(REPO, "configs/setar/finetune/imagenet/SeTAR+FT.yaml")
    # 6 validation images: one global batch of 6 = 3 per rank. LAMBDA 0: cross-entropy averaged over equal
    # shards is the global mean (LoCoOp's patch mean becomes a mean of per-rank means, as under DDP).
    argv = lambda out, batch: ["setar-finetune", "--root", str(setar_root), "--config-file", config,  # noqa: E731
                               "--output-dir", str(out), "--settings", str(setar_root / "ft_settings.json"),
                               *_common_opts(setar_root, tiny_vit_path), "DATALOADER.TRAIN_X.BATCH_SIZE", str(batch),
                               "DATALOADER.TRAIN_X.SAMPLER", "SequentialSampler", "OPTIM.MAX_EPOCH", "2",
                               "SETAR.FT.TOPK", "2", "SETAR.FT.LAMBDA", "0.0"]
    single, dist_out = tmp_path / "single", tmp_path / "dist"
    assert main(argv(single, 2 * 3)) == 0
    reports = _torchrun_cli(argv(dist_out, 3), dist_out, tmp_path)
    assert reports[1]["writes"] == []
    assert sorted(os.listdir(dist_out / "adapters")) == ["checkpoint", "model.pth.tar-2"]
    assert json.loads((dist_out / "finetune_settings.json").read_text()) == \
        json.loads((single / "finetune_settings.json").read_text())
    # training: the single-process adapters, to float tolerance (gradients are summed in another order)
    a = load_checkpoint(str(dist_out / "adapters" / "model.pth.tar-2"))["state_dict"]
    b = load_checkpoint(str(single / "adapters" / "model.pth.tar-2"))["state_dict"]
    assert a["_extra_state"] == b["_extra_state"]
    for k in a:
        if k != "_extra_state":
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # testing: the sharded test pass scores exactly what one process scores with these adapters
    again = tmp_path / "again"
    assert main(["setar-finetune", "--root", str(setar_root), "--config-file", config, "--model-dir", str(dist_out),
                 "--output-dir", str(again), *_common_opts(setar_root, tiny_vit_path)]) == 0
    _same_results(dist_out, again)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(*json.loads(sys.argv[sys.argv.index("--worker") + 1]))
if __name__ == "__main__" and "--cli-worker" in sys.argv:
    _cli_worker(*json.loads(sys.argv[sys.argv.index("--cli-worker") + 1]))

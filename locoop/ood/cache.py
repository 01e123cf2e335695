"""Feature cache: image features of a data set written once, reused by every later evaluation.

``python -m locoop extract`` encodes the ID test set and the OOD sets and stores, per set, the
normalised features that :func:`locoop.ood.features.iter_feature_batches` yields: global
``[N, D]`` in float32 (1 % of the bytes; kept at full precision so cached global scores are
bit-identical to uncached ones) and local ``[N, P, D]`` in float16 (``OOD.CACHE_LOCAL_DTYPE``;
float32 doubles the disk use and makes cached local scores bit-identical too), plus labels and paths. The OOD runner then
finds the entry by its key and streams features from disk (memory-mapped), so evaluating another
prompt checkpoint, score or temperature only recomputes the text side.

Key = SHA-256 of
  * the **image encoder**: every tensor of ``model.visual``'s state dict (names, dtypes, shapes,
    bytes) and the model classes, so a SeTAR-pruned tower, a fine-tuned adapter inside it, fp16
    weights or another backbone never match; a tower with forward hooks is not cached at all;
  * the **preprocessing**: ``repr`` of the test transform (resize, crop, interpolation, mean/std);
  * the **files**: the image list in order with labels, sizes and modification times;
  * the **compute**: device type, autocast (fp16 AMP features differ from fp32 ones) and the stored
    local-feature dtype.

Layout: ``<cache dir>/<set>-<key[:20]>/manifest.json`` + ``part-XXXXX.pt`` files. An entry is
built in a hidden temporary folder and renamed into place after its manifest is written
(:mod:`locoop.engine.fileio`), so a killed extraction never leaves a usable entry. A stale entry (another key for the same set), a foreign
or corrupt one (unreadable manifest, format or key mismatch, missing or truncated part) is
ignored with a message saying why, never used.

Cache folder: ``OOD.CACHE_DIR``, else ``$LOCOOP_FEATURE_CACHE``, else
``$XDG_CACHE_HOME/locoop/features`` (``~/.cache/locoop/features``): per user, outside the data
root (often read-only and shared) and outside run folders (so runs share it). ViT-B/16 needs about
200 KB per image (ImageNet val + the four OOD sets: about 18 GB); delete entries freely. Under
torchrun every rank writes the parts of its shard and reads the rows of its shard, so on several
nodes the folder must be on a shared file system (the runner falls back to encoding otherwise).

Consistency with an uncached evaluation (which keeps local features in float32), for the same
``DATALOADER.TEST.BATCH_SIZE`` as the extraction (batches are aligned to it; with another batch
size everything agrees to float rounding only):

* global scores (MCM, energy, max-logit, entropy, variance) and the ID accuracy: bit-identical;
* local scores (L-MCM, GL-MCM) from a float16 entry: within the fp16 rounding of the stored
  features. Each stored value has a relative error of at most ``2**-11``, so a local cosine moves by
  at most ``2**-11`` and L-MCM = max softmax(cos / T) by at most ``2**-11 / T`` (GL-MCM by
  ``lambda_local`` times that); measured differences are about ``1e-5`` (``tests/test_feature_cache.py``);
* everything from a float32 entry (``OOD.CACHE_LOCAL_DTYPE float32``): bit-identical.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch

from locoop.engine import dist
from locoop.engine.fileio import (atomic_torch_save, atomic_write_text, make_temp_folder, publish_folder,
                                 remove_stale_temps)
from locoop.engine.provenance import weights_sha256
from locoop.ood.features import FeatureSet, concat_features, iter_feature_batches

__all__ = ["CACHE_FORMAT", "MANIFEST", "default_cache_dir", "resolve_cache_dir", "visual_fingerprint",
           "preprocess_fingerprint", "files_fingerprint", "CacheKey", "make_key", "CachedFeatures",
           "FeatureCache", "CacheWriter", "extract_to_cache", "format_bytes", "directory_size"]

CACHE_FORMAT = 2  # 2: the visual key is the shared weights_sha256 (format 1 entries are re-extracted)
MANIFEST = "manifest.json"
_PART = "part-{:05d}.pt"

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------ locations
def default_cache_dir() -> str:
    """``$LOCOOP_FEATURE_CACHE``, else ``$XDG_CACHE_HOME/locoop/features`` (``~/.cache/locoop/features``)."""
    env = os.environ.get("LOCOOP_FEATURE_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "locoop", "features")


def resolve_cache_dir(cfg: Any) -> str:
    """``cfg.OOD.CACHE_DIR`` when set, else :func:`default_cache_dir`."""
    d = str(getattr(cfg.OOD, "CACHE_DIR", "") or "")
    return os.path.abspath(os.path.expanduser(d)) if d else default_cache_dir()


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KB'`` (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TB"


def directory_size(path: PathLike) -> int:
    """Bytes of all files under ``path`` (0 if missing)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


# ------------------------------------------------------------------------------------ fingerprints
def _has_hooks(module: torch.nn.Module) -> bool:
    for m in module.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return True
    return False


def visual_fingerprint(clip_model: torch.nn.Module) -> Optional[str]:
    """SHA-256 of the image encoder's weights, or None when its output cannot be keyed by them.

    :func:`locoop.engine.provenance.weights_sha256` of ``clip_model.visual`` (the whole model when
    it has no ``visual``), with the model classes as header. None when a module of the tower carries forward hooks (they may
    change the features without changing any weight): such a model bypasses the cache.
    """
    visual = getattr(clip_model, "visual", None)
    if not isinstance(visual, torch.nn.Module):
        visual = clip_model
    if _has_hooks(visual):
        return None
    header = (f"{type(clip_model).__module__}.{type(clip_model).__qualname__}|"
              f"{type(visual).__module__}.{type(visual).__qualname__}|")
    return weights_sha256(visual, header=header)


def preprocess_fingerprint(tfm: Any) -> str:
    """SHA-256 of the test transform's ``repr`` (torchvision transforms print all their settings)."""
    return hashlib.sha256(repr(tfm).encode()).hexdigest()


def files_fingerprint(items: Sequence[Any]) -> str:
    """SHA-256 of the ordered image list: path, label, size and modification time of each file.

    A missing file hashes as missing, so its later appearance changes the key too.
    """
    h = hashlib.sha256()
    for d in items:
        path = d.impath
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{path}|{int(d.label)}|{stamp}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """The components of a cache key; :attr:`digest` names the entry."""

    visual: str
    preprocess: str
    files: str
    compute: str

    @property
    def digest(self) -> str:
        payload = json.dumps({"format": CACHE_FORMAT, **self.as_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def as_dict(self) -> Dict[str, str]:
        return {"visual": self.visual, "preprocess": self.preprocess, "files": self.files, "compute": self.compute}


_COMPONENT_WORDS = {"visual": "image-encoder weights", "preprocess": "preprocessing", "files": "image files",
                    "compute": "device/autocast/local-feature dtype"}


def make_key(clip_model: torch.nn.Module, tfm: Any, items: Sequence[Any], device: Union[str, torch.device],
             amp: bool, visual: Optional[str] = None, local_dtype: torch.dtype = torch.float16) -> Optional[CacheKey]:
    """The key of ``items`` encoded by ``clip_model`` with ``tfm`` on ``device`` (None: not cacheable).

    ``visual``: a :func:`visual_fingerprint` computed before (it hashes every weight, so callers
    keying several sets with one model compute it once). ``local_dtype``: how the entry stores local
    features (``OOD.CACHE_LOCAL_DTYPE``): a float32 request never reads a float16 entry.
    """
    vis = visual if visual is not None else visual_fingerprint(clip_model)
    if vis is None:
        return None
    compute = (f"{torch.device(device).type}|{'amp-fp16' if amp else 'no-autocast'}|"
               f"local-{str(local_dtype).replace('torch.', '')}")
    return CacheKey(vis, preprocess_fingerprint(tfm), files_fingerprint(items), compute)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "set"


# ------------------------------------------------------------------------------------ reading
@dataclass
class CachedFeatures:
    """A valid cache entry: streams its rows as :class:`FeatureSet` pieces (memory-mapped)."""

    path: Path
    manifest: Dict[str, Any]
    _parts: List[Dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def num_rows(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def with_local(self) -> bool:
        return bool(self.manifest["with_local"])

    @property
    def skipped_paths(self) -> Dict[str, str]:
        return dict(self.manifest.get("skipped_paths") or {})

    @property
    def size_bytes(self) -> int:
        return int(self.manifest.get("size_bytes", 0))

    def _load_part(self, i: int) -> Dict[str, Any]:
        part = self.manifest["parts"][i]
        return torch.load(self.path / part["file"], map_location="cpu", weights_only=True, mmap=True)

    def iter_batches(self, lo: int = 0, hi: Optional[int] = None, batch_size: int = 256,
                     with_local: bool = True) -> Iterator[FeatureSet]:
        """Rows ``lo:hi`` in order, in the batches ``[k*batch_size, (k+1)*batch_size)`` of the whole set.

        Batches are aligned to the set, not to ``lo``, so a shard's batches are the ones one
        process would score. Views into the memory-mapped parts (a batch spanning two parts is
        copied).
        """
        hi = self.num_rows if hi is None else min(int(hi), self.num_rows)
        if with_local and not self.with_local:
            raise ValueError(f"the cached features in {self.path} have no local features")
        batch_size = max(1, int(batch_size))
        parts = self.manifest["parts"]
        starts = [0]
        for part in parts:
            starts.append(starts[-1] + int(part["rows"]))
        loaded: Dict[int, Dict[str, Any]] = {}
        keys = ("global", "local", "labels") if with_local else ("global", "labels")
        s = max(0, int(lo))
        while s < hi:
            e = min(hi, (s // batch_size + 1) * batch_size)
            pieces = []
            for i in range(len(parts)):
                a, b = max(s, starts[i]), min(e, starts[i + 1])
                if a >= b:
                    continue
                if i not in loaded:
                    for j in [j for j in loaded if j < i]:
                        del loaded[j]  # parts are read in order: drop the mapping of passed ones
                    loaded[i] = self._load_part(i)
                d = loaded[i]
                r0, r1 = a - starts[i], b - starts[i]
                pieces.append({k: d[k][r0:r1] for k in keys} | {"impaths": list(d["impaths"][r0:r1])})
            cat = (lambda k: pieces[0][k]) if len(pieces) == 1 else (lambda k: torch.cat([p[k] for p in pieces]))
            yield FeatureSet(global_feats=cat("global"), local_feats=cat("local") if with_local else None,
                             labels=cat("labels"), impaths=[x for p in pieces for x in p["impaths"]])
            s = e

    def load(self, with_local: bool = True) -> FeatureSet:
        """All rows as one :class:`FeatureSet` (copied into memory), with the skipped images."""
        skipped = self.skipped_paths
        return concat_features(list(self.iter_batches(0, self.num_rows, self.num_rows or 1, with_local)), skipped)


class FeatureCache:
    """A cache folder of feature entries (see the module docstring).

    Args:
        directory: the cache folder (created on the first write only).
        verbose: print what is used, ignored and written.
    """

    def __init__(self, directory: PathLike, verbose: bool = True):
        self.directory = Path(directory)
        self.verbose = verbose

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(msg)

    def entry_path(self, name: str, key: CacheKey) -> Path:
        return self.directory / f"{_slug(name)}-{key.digest[:20]}"

    def entries(self, name: Optional[str] = None) -> List[Path]:
        """Entry folders (of set ``name`` when given), temporary ones excluded."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in sorted(self.directory.iterdir()):
            if not p.is_dir() or p.name.startswith("."):  # hidden: a temporary folder
                continue
            if name is None or p.name.rsplit("-", 1)[0] == _slug(name):
                out.append(p)
        return out

    def disk_usage(self) -> int:
        """Bytes used by the whole cache folder (temporary folders included)."""
        return directory_size(self.directory)

    @staticmethod
    def read_manifest(path: Path) -> Dict[str, Any]:
        """The manifest of entry ``path``.

        Raises:
            ValueError: missing or unreadable manifest.
        """
        try:
            with open(path / MANIFEST, encoding="utf-8") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise ValueError("it has no manifest (an interrupted write?)") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"its manifest is unreadable ({e})") from None
        if not isinstance(manifest, dict):
            raise ValueError("its manifest is not a JSON object")
        return manifest

    def _validate(self, path: Path, manifest: Dict[str, Any], key: CacheKey) -> None:
        if manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"it has cache format {manifest.get('format')!r}, this code reads {CACHE_FORMAT}")
        if manifest.get("key") != key.digest:
            raise ValueError("its manifest names another key (a foreign or renamed entry)")
        rows = 0
        for part in manifest.get("parts", []):
            f = path / str(part.get("file", ""))
            try:
                size = f.stat().st_size
            except OSError:
                raise ValueError(f"its part {f.name} is missing") from None
            if size != int(part.get("bytes", -1)):
                raise ValueError(f"its part {f.name} has {size} bytes, the manifest says {part.get('bytes')} "
                                 "(truncated or replaced)")
            rows += int(part["rows"])
        if rows != int(manifest.get("num_rows", -1)):
            raise ValueError(f"its parts hold {rows} rows, the manifest says {manifest.get('num_rows')}")

    def lookup(self, name: str, key: Optional[CacheKey], need_local: bool = True) -> Optional[CachedFeatures]:
        """The valid entry of set ``name`` for ``key``, or None.

        When there is none, every other entry of the set is reported with the reason it cannot
        be used (which key components differ, or what is broken) and its size.
        """
        if key is None:
            return None
        want = self.entry_path(name, key)
        if want.is_dir():
            try:
                manifest = self.read_manifest(want)
                self._validate(want, manifest, key)
                if need_local and not manifest.get("with_local"):
                    raise ValueError("it has no local features (needed by L-MCM / GL-MCM); run extract again")
                entry = CachedFeatures(want, manifest)
                if entry.num_rows and manifest["parts"]:
                    entry._load_part(0)  # a corrupt file fails here, before the evaluation relies on it
                return entry
            except Exception as e:  # noqa: BLE001 - any failure means: do not use it
                self._say(f"Feature cache {want} ignored: {e}")
        for path in self.entries(name):
            if path == want:
                continue
            size = format_bytes(directory_size(path))
            try:
                manifest = self.read_manifest(path)
            except ValueError as e:
                self._say(f"Feature cache {path} ignored: {e} ({size}; delete it to free the space)")
                continue
            if manifest.get("format") != CACHE_FORMAT:
                self._say(f"Feature cache {path} ignored: written in cache format {manifest.get('format')!r}, this "
                          f"version reads {CACHE_FORMAT}; run extract again ({size}; delete it to free the space)")
                continue
            have = manifest.get("components") or {}
            differ = [_COMPONENT_WORDS[k] for k, v in key.as_dict().items() if have.get(k) != v]
            why = (", ".join(differ) + " differ") if differ else "its folder name does not match its key (renamed?)"
            self._say(f"Feature cache {path} ignored (stale or foreign): {why} ({size})")
        return None

    def writer(self, name: str, key: CacheKey, meta: Optional[Dict[str, Any]] = None,
               with_local: bool = True) -> "CacheWriter":
        """A :class:`CacheWriter` for set ``name`` (collective in a distributed run)."""
        return CacheWriter(self, name, key, meta or {}, with_local)

    def remove_stale_temps(self) -> int:
        """Delete temporary folders of this host whose writing process no longer runs; returns their count."""
        return remove_stale_temps(self.directory)


class CacheWriter:
    """Writes one entry: each rank adds the parts of its shard, :meth:`commit` publishes the entry.

    All ranks must create the writer and call :meth:`commit` (both are collectives when
    distributed). Parts go into a temporary folder; the manifest is written last and the folder
    is renamed into place, so readers see a complete entry or none.
    """

    def __init__(self, cache: FeatureCache, name: str, key: CacheKey, meta: Dict[str, Any], with_local: bool):
        self.cache = cache
        self.name = name
        self.key = key
        self.meta = dict(meta)
        self.with_local = with_local
        self.final = cache.entry_path(name, key)
        tmp = None
        if dist.is_main_process():
            cache.directory.mkdir(parents=True, exist_ok=True)
            cache.remove_stale_temps()
            tmp = make_temp_folder(self.final)
        self.tmp = Path(dist.broadcast_object(str(tmp) if tmp is not None else None))
        self._parts: List[Dict[str, Any]] = []
        self._skipped: Dict[str, str] = {}

    def add_part(self, index: int, feats: Optional[FeatureSet], skipped_paths: Optional[Dict[str, str]] = None) -> None:
        """Write part ``index`` (parts are ordered by index; ``feats`` None = all its images unreadable)."""
        self._skipped.update(skipped_paths or {})
        if feats is None or len(feats) == 0:
            return
        if self.with_local and feats.local_feats is None:
            raise ValueError("this entry stores local features but the part has none")
        data = {"global": feats.global_feats.float().contiguous(), "labels": feats.labels.long().contiguous(),
                "impaths": list(feats.impaths)}
        if self.with_local:
            data["local"] = feats.local_feats.contiguous()
        fname = _PART.format(index)
        path = atomic_torch_save(data, self.tmp / fname)
        self._parts.append({"index": int(index), "file": fname, "rows": len(feats), "bytes": path.stat().st_size,
                            "local_dtype": str(feats.local_feats.dtype) if self.with_local else None})

    def commit(self) -> Optional[Path]:
        """Publish the entry (rank 0 writes the manifest and renames); returns its path on rank 0."""
        gathered = dist.all_gather_object((self._parts, self._skipped))
        if not dist.is_main_process():
            dist.barrier()
            return None
        parts = sorted((p for ps, _ in gathered for p in ps), key=lambda p: p["index"])
        skipped: Dict[str, str] = {}
        for _, s in gathered:
            skipped.update(s)
        num_rows = sum(p["rows"] for p in parts)
        manifest = {
            "format": CACHE_FORMAT,
            "key": self.key.digest,
            "components": self.key.as_dict(),
            "dataset": self.name,
            "num_rows": num_rows,
            "with_local": self.with_local,
            "global_dtype": "torch.float32",
            "local_dtype": parts[0]["local_dtype"] if parts else None,
            "parts": parts,
            "skipped_paths": skipped,
            "size_bytes": sum(p["bytes"] for p in parts),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__,
            **self.meta,
        }
        atomic_write_text(self.tmp / MANIFEST, json.dumps(manifest, indent=1, default=str))
        publish_folder(self.tmp, self.final, replace=True)  # same key written again (e.g. now with local): swap
        dist.barrier()
        return self.final

    def abort(self) -> None:
        """Remove this writer's temporary folder (rank 0)."""
        if dist.is_main_process():
            shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ writing
def extract_to_cache(cache: FeatureCache, name: str, items: Sequence[Any], clip_model: torch.nn.Module,
                     make_loader: Any, tfm: Any, device: Union[str, torch.device], amp: bool = False,
                     with_local: bool = True, chunk_images: int = 10000, batch_size: int = 1,
                     meta: Optional[Dict[str, Any]] = None, progress: Optional[bool] = None,
                     local_dtype: torch.dtype = torch.float16) -> Optional[Path]:
    """Encode ``items`` and write their entry; sharded over the ranks in a distributed run.

    Args:
        cache: the cache.
        name: set name (``ID``, ``iNaturalist``, ...); also the runner's lookup name.
        items: the images (Datum-like, with ``impath`` and ``label``), in the evaluation's order.
        clip_model: the model in eval mode.
        make_loader: ``make_loader(items, sampler) -> loader`` (the runner's evaluation loader).
        tfm: the test transform (part of the key; the loader must apply it).
        device: where the model runs.
        amp: autocast to fp16 on CUDA (part of the key).
        with_local: also store the local features.
        chunk_images: images per part file (bounds the memory of one write; rounded down to a
            multiple of ``batch_size``).
        batch_size: the loader's batch size (parts and shards are aligned to it).
        meta: extra manifest fields (backbone name, preprocessing text, ...).
        progress: tqdm bars (None: when stderr is a terminal, rank 0 only).
        local_dtype: storage dtype of the local features (float16 halves the disk use; part of the key).

    Returns:
        The entry path (rank 0), else None.

    Raises:
        ValueError: the model cannot be keyed (hooks on the image encoder).
    """
    key = make_key(clip_model, tfm, items, device, amp, local_dtype=local_dtype)
    if key is None:
        raise ValueError("the image encoder has forward hooks, so its features cannot be keyed by its weights; "
                         "remove the hooks before extracting")
    key = dist.broadcast_object(key)  # rank 0's view of the files decides for everybody
    batch_size = max(1, int(batch_size))
    # Shards and parts of whole batches: the features of every image come from the same batch as
    # in a single-process, uncached evaluation with this batch size.
    chunk_images = max(batch_size, int(chunk_images) // batch_size * batch_size)
    shard = dist.shard_indices(len(items), align=batch_size)
    if progress is None:
        progress = None if dist.is_main_process() else False
    writer = cache.writer(name, key, dict(meta or {}, preprocess_repr=repr(tfm), num_items=len(items)),
                          with_local=with_local)
    try:
        for lo in range(shard.start, shard.stop, chunk_images):
            hi = min(shard.stop, lo + chunk_images)
            loader = make_loader(items, range(lo, hi))
            batches = list(iter_feature_batches(clip_model, loader, device, with_local=with_local, amp=amp,
                                                local_dtype=local_dtype, progress=progress, desc=f"{name} [{lo}:{hi}]"))
            skipped = dict(getattr(loader, "skipped", {}) or {})
            writer.add_part(lo, concat_features(batches, skipped) if batches else None, skipped)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()

"""OpenAI CLIP checkpoints: names, download with checksum, cache, and loading of local files.

``load(name_or_path)`` accepts

* a released model name (:func:`available_models`): downloaded once from OpenAI's public URL into
  the cache directory (``$CLIP_CACHE_DIR``, else ``~/.cache/clip``), verified against the SHA256
  that is part of the URL;
* a TorchScript archive (how OpenAI ships the weights) or a ``torch.save``'d / safetensors state
  dict with OpenAI's key names;
* a Hugging Face ``CLIPModel`` snapshot directory (converted by :mod:`clip.hf`).

The model is always rebuilt by :func:`clip.model.build_model` from the weights; TorchScript code in
an archive is never run.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
import warnings
import zipfile
from typing import Callable, Optional, Union
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from .fileio import atomic_write

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

_BASE_URL = "https://openaipublic.azureedge.net/clip/models"
# The path component before the file name is the file's SHA256.
_MODELS = {
    "RN50": f"{_BASE_URL}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": f"{_BASE_URL}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": f"{_BASE_URL}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": f"{_BASE_URL}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": f"{_BASE_URL}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": f"{_BASE_URL}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": f"{_BASE_URL}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": f"{_BASE_URL}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": f"{_BASE_URL}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/"
                      "ViT-L-14-336px.pt",
}
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download failed (network error, incomplete transfer or checksum mismatch)."""


def available_models() -> list[str]:
    """Names of the OpenAI CLIP models that can be downloaded."""
    return list(_MODELS)


def model_url(name: str) -> str:
    """Download URL of a released model.

    Raises:
        ValueError: unknown name, listing the available ones.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown CLIP model {name!r}; available models: {available_models()}")
    return _MODELS[name]


def sha256_from_url(url: str) -> Optional[str]:
    """The SHA256 embedded in an OpenAI-style URL (``.../<sha256>/<file>``), or None."""
    parts = urlparse(url).path.rstrip("/").split("/")
    if len(parts) >= 2 and _SHA256_RE.match(parts[-2].lower()):
        return parts[-2].lower()
    return None


def default_cache_dir() -> str:
    """Where downloads go: ``$CLIP_CACHE_DIR`` if set, else ``~/.cache/clip``."""
    env = os.environ.get("CLIP_CACHE_DIR")
    return os.path.expanduser(env) if env else os.path.expanduser(os.path.join("~", ".cache", "clip"))


def file_sha256(path: PathLike) -> str:
    """Hex SHA256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    root: Optional[PathLike] = None,
    expected_sha256: Optional[str] = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> str:
    """Download ``url`` into directory ``root`` unless a verified copy is already there.

    The file is streamed to a hidden temporary ``.<file>.<host>-<pid>-<random>.part`` next to the
    target, its SHA256 checked, then renamed into place (:func:`clip.fileio.atomic_write`), so
    neither an interrupted download (any exception, including KeyboardInterrupt) nor a corrupt one
    leaves a file under the final name. A unique part name lets several processes (e.g. torchrun
    ranks) download at once without clobbering each other.

    Args:
        url: http(s) URL; its last path component is the file name.
        root: target directory (default :func:`default_cache_dir`).
        expected_sha256: hex digest to verify; by default taken from the URL when it holds one
            (OpenAI's URLs do). Without any, an existing file is trusted as is.
        progress: show a tqdm progress bar.
        timeout: socket timeout in seconds.

    Returns:
        Path of the downloaded (or already present) file.

    Raises:
        ValueError: the URL has no file name or ``expected_sha256`` is not a hex SHA256.
        DownloadError: network error, incomplete transfer, or checksum mismatch.
    """
    filename = os.path.basename(urlparse(url).path)
    if not filename:
        raise ValueError(f"cannot tell the file name from URL {url!r}")
    expected = (expected_sha256 or sha256_from_url(url) or "").lower() or None
    if expected is not None and not _SHA256_RE.match(expected):
        raise ValueError(f"expected_sha256 must be 64 hex digits, got {expected_sha256!r}")
    root = os.fspath(root) if root is not None else default_cache_dir()
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, filename)

    if os.path.exists(target):
        if not os.path.isfile(target):
            raise ValueError(f"{target} exists and is not a regular file; remove it or choose another root")
        if expected is None or file_sha256(target) == expected:
            return target
        warnings.warn(f"{target} exists but its SHA256 does not match {expected}; downloading it again")

    def fetch(out) -> None:
        received, total, digest = _stream(url, out, filename, progress, timeout)
        if total is not None and received != total:
            raise DownloadError(f"download of {url} is incomplete: received {received} of {total} bytes "
                                "(connection closed early); try again")
        if expected is not None and digest != expected:
            raise DownloadError(f"SHA256 of the file downloaded from {url} is {digest}, expected {expected}; "
                                "the download is corrupt or the file changed. Nothing was kept; try again")

    # A raise inside fetch (checksum, network, Ctrl-C) deletes the partial file; only a verified one is renamed.
    try:
        atomic_write(target, fetch, suffix=".part")
    except DownloadError as e:
        if not getattr(e, "no_connection", False):
            raise
        # No network: say exactly where the file must go, so it can be copied in by hand.
        sha = f" (SHA256 {expected})" if expected else ""
        raise DownloadError(f"{e.args[0]}; without internet access, download {url} elsewhere and copy it to "
                            f"{target}{sha} (the cache folder is $CLIP_CACHE_DIR, default {default_cache_dir()}), "
                            f"or pass the file's path instead of the model name") from e
    return target


def _stream(url: str, out, desc: str, progress: bool, timeout: float) -> tuple[int, Optional[int], str]:
    """Copy the body of ``url`` to ``out``; return (bytes received, Content-Length or None, sha256)."""
    request = urllib.request.Request(url, headers={"User-Agent": "locoop-ood-clip"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        err = DownloadError(f"could not download {url}: {reason}")
        err.no_connection = True  # download() adds where to put the file by hand
        raise err from e
    digest = hashlib.sha256()
    received = 0
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, disable=not progress, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, ValueError) as e:  # e.g. http.client.IncompleteRead, reset connection
                    raise DownloadError(f"download of {url} failed after {received} bytes: {e!r}") from e
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    return received, total, digest.hexdigest()


def _is_torchscript_archive(path: str) -> bool:
    # torch.jit.save writes code/ and constants.pkl into its zip; torch.save writes neither.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # 8-byte little-endian header size, then the JSON header.
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (1 << 30)


def _unwrap_state_dict(obj: object, path: str) -> dict[str, Tensor]:
    # Training checkpoints often nest the weights; DDP prefixes them with "module.".
    for _ in range(2):
        if isinstance(obj, dict):
            for key in ("state_dict", "model"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__}); expected a dict of "
                         "tensors with OpenAI CLIP key names, possibly under 'state_dict' or 'model'")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: state dict entries that are not tensors: {not_tensors[:10]}")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _unpickling_reason(e: BaseException) -> str:
    # torch wraps the actual cause of a weights_only failure after a long generic preamble.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else type(e).__name__)
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _load_file(path: str) -> tuple[dict[str, Tensor], str]:
    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():
                # torch.jit is deprecated, but it is the format of OpenAI's released archives.
                warnings.simplefilter("ignore", FutureWarning)
                archive = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise ValueError(f"{path} looks like a TorchScript archive but cannot be loaded: {e}") from e
        return dict(archive.state_dict()), "torchscript"
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap_state_dict(load_file(path, device="cpu"), path), "state_dict"
        except SafetensorError as e:
            if path.endswith(".safetensors"):
                raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on foreign data (KeyError for text, ...)
        reason = _unpickling_reason(e)
        if "Unsupported global" in reason:
            raise ValueError(f"{path} holds Python objects that weights_only=True refuses to load ({reason}); "
                             "foreign pickles are never executed. Re-save the weights as a plain state "
                             "dict of tensors") from e
        raise ValueError(f"{path} is not a TorchScript archive nor a state dict ({reason})") from e
    return _unwrap_state_dict(obj, path), "state_dict"


def load_state_dict(name_or_path: PathLike, download_root: Optional[PathLike] = None) -> tuple[dict[str, Tensor], str]:
    """OpenAI-format state dict of a model name or a local checkpoint.

    Args:
        name_or_path: a name from :func:`available_models` (downloaded if needed), a TorchScript
            archive, a ``torch.save``'d or safetensors state dict (possibly nested under
            ``"state_dict"`` or ``"model"``), or a Hugging Face CLIP snapshot directory.
        download_root: cache directory for downloads (default :func:`default_cache_dir`).

    Returns:
        ``(state_dict, source_kind)`` with ``source_kind`` one of ``"torchscript"``,
        ``"state_dict"``, ``"hf"``.

    Raises:
        TypeError: ``name_or_path`` is not a string or path.
        ValueError: unknown name that is no existing path, or a file that is no checkpoint.
        DownloadError: the download failed.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a model name or a path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    if name in _MODELS:
        path = download(_MODELS[name], download_root if download_root is not None else default_cache_dir())
        return _load_file(path)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        from . import hf

        if hf.is_hf_snapshot(path):
            return dict(hf.load_hf_snapshot(path)), "hf"
        raise ValueError(f"{path} is a directory but not a Hugging Face CLIP snapshot (needs config.json and "
                         "model.safetensors or pytorch_model.bin)")
    if os.path.isfile(path):
        return _load_file(path)
    raise ValueError(f"model {name!r} not found: it is neither one of the available models {available_models()} "
                     "nor an existing checkpoint file or Hugging Face snapshot directory")


def load(
    name_or_path: PathLike,
    device: Union[str, torch.device] = "cpu",
    jit: bool = False,
    download_root: Optional[PathLike] = None,
) -> tuple[torch.nn.Module, Callable]:
    """Load a CLIP model and its preprocessing transform.

    Args:
        name_or_path: see :func:`load_state_dict`.
        device: where to put the model; on CUDA its weights are cast to fp16 as CLIP ships them
            (LayerNorms compute in fp32), on CPU they are fp32.
        jit: must be False; the model is always rebuilt from the archive's weights.
        download_root: cache directory for downloads.

    Returns:
        ``(model, preprocess)``: the model in eval mode and a PIL-image-to-tensor transform for its
        input resolution.

    Raises:
        ValueError: ``jit=True``, an unusable device, or a bad checkpoint (see :func:`load_state_dict`).
    """
    if jit:
        raise ValueError("jit=True is not supported: the model is always rebuilt from the archive's weights "
                         "(our CLIP returns local features and splits q/k/v); call load(..., jit=False)")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use device='cpu'")
    from .model import build_model, convert_weights_fp16
    from .transform import build_preprocess

    state_dict, _ = load_state_dict(name_or_path, download_root=download_root)
    model = build_model(state_dict).to(device)
    if device.type == "cuda":
        convert_weights_fp16(model)
    return model.eval(), build_preprocess(int(model.visual.input_resolution))

"""Tests of clip/pretrained.py: download (real HTTP on 127.0.0.1), cache, checkpoint loading."""

import hashlib
import http.server
import os
import re
import threading
from collections import OrderedDict

import pytest
import torch
from PIL import Image

import clip.pretrained as P
from clip.configs import list_openai_models
from clip.tiny import random_state_dict, save_checkpoint


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.requests.append(self.path)
        if self.path not in self.server.routes:
            self.send_error(404, "no such file")
            return
        body, mode = self.server.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "short":
            # Announce the whole body, send half of it, hang up.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def _httpd():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes, httpd.requests = {}, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(_httpd):
    _httpd.routes.clear()
    _httpd.requests.clear()
    return _httpd


def _serve(server, body: bytes, name: str = "tiny.pt", mode: str = "ok", sha: str | None = None) -> str:
    sha = sha or hashlib.sha256(body).hexdigest()
    path = f"/{sha}/{name}"
    server.routes[path] = (body, mode)
    return server.base + path


BODY = os.urandom(3 * 1024 * 1024 + 17)  # several read chunks


def test_download_verifies_and_caches(server, tmp_path):
    url = _serve(server, BODY)
    path = P.download(url, tmp_path, progress=False)
    assert path == str(tmp_path / "tiny.pt")
    assert open(path, "rb").read() == BODY
    assert os.listdir(tmp_path) == ["tiny.pt"]
    assert P.download(url, tmp_path, progress=False) == path
    assert len(server.requests) == 1  # second call served from the cache


def test_explicit_checksum_for_plain_url(server, tmp_path):
    server.routes["/plain.bin"] = (BODY, "ok")
    path = P.download(server.base + "/plain.bin", tmp_path, hashlib.sha256(BODY).hexdigest(), progress=False)
    assert open(path, "rb").read() == BODY
    with pytest.raises(ValueError, match="64 hex digits"):
        P.download(server.base + "/plain.bin", tmp_path, "abc", progress=False)


def test_bad_checksum_leaves_nothing(server, tmp_path):
    url = _serve(server, BODY, sha="0" * 64)
    with pytest.raises(P.DownloadError, match="SHA256"):
        P.download(url, tmp_path, progress=False)
    assert os.listdir(tmp_path) == []


def test_corrupt_cached_file_is_downloaded_again(server, tmp_path):
    url = _serve(server, BODY)
    (tmp_path / "tiny.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="does not match"):
        path = P.download(url, tmp_path, progress=False)
    assert open(path, "rb").read() == BODY and len(server.requests) == 1
    assert os.listdir(tmp_path) == ["tiny.pt"]


def test_connection_closed_mid_body_leaves_nothing(server, tmp_path):
    url = _serve(server, BODY, mode="short")
    with pytest.raises(P.DownloadError, match="incomplete|failed after"):
        P.download(url, tmp_path, progress=False)
    assert os.listdir(tmp_path) == []


def test_interrupt_leaves_nothing(server, tmp_path, monkeypatch):
    class InterruptingBar:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(P, "tqdm", InterruptingBar)
    with pytest.raises(KeyboardInterrupt):
        P.download(_serve(server, BODY), tmp_path)
    assert os.listdir(tmp_path) == []


def test_http_error_and_no_network(server, tmp_path):
    with pytest.raises(P.DownloadError, match="HTTP 404"):
        P.download(server.base + "/" + "a" * 64 + "/missing.pt", tmp_path, progress=False)
    # A port nobody listens on stands in for a machine without internet.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(P.DownloadError, match="copy it to " + re.escape(str(tmp_path / "x.pt"))):
        P.download(f"http://127.0.0.1:{port}/x.pt", tmp_path, progress=False, timeout=5)
    assert os.listdir(tmp_path) == []


def test_model_table():
    assert P.available_models() == list_openai_models()
    assert len(P.available_models()) == 9
    for name in P.available_models():
        url = P.model_url(name)
        assert url.startswith("https://openaipublic.azureedge.net/clip/models/") and url.endswith(".pt")
        assert len(P.sha256_from_url(url)) == 64
    assert P.sha256_from_url(P.model_url("ViT-B/16")).startswith("5806e77c")
    assert P.sha256_from_url("http://x/y/file.pt") is None
    with pytest.raises(ValueError, match="ViT-B/16"):
        P.model_url("ViT-B/17")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "cache"))
    assert P.default_cache_dir() == str(tmp_path / "cache")
    monkeypatch.delenv("CLIP_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert P.default_cache_dir() == os.path.join(str(tmp_path), ".cache", "clip")


@pytest.fixture(scope="module")
def tiny_sd():
    return random_state_dict("tiny-vit", seed=3)


def _assert_same(sd, ref):
    assert set(sd) == set(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k


def test_model_name_downloads_and_loads(server, tmp_path, monkeypatch, tiny_sd):
    archive = save_checkpoint(tmp_path / "src.pt", tiny_sd, fmt="torchscript")
    body = open(archive, "rb").read()
    monkeypatch.setitem(P._MODELS, "tiny-test", _serve(server, body, name="tiny-test.pt"))
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIP_CACHE_DIR", str(cache))
    sd, kind = P.load_state_dict("tiny-test")
    assert kind == "torchscript" and os.listdir(cache) == ["tiny-test.pt"]
    _assert_same(sd, tiny_sd)
    model, preprocess = P.load("tiny-test", download_root=tmp_path / "other")
    assert len(server.requests) == 2  # other root: downloaded again; same root: cached
    P.load_state_dict("tiny-test")
    assert len(server.requests) == 2
    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module.", "torchscript", "safetensors"])
def test_local_checkpoint_formats(tmp_path, tiny_sd, wrap):
    path = str(tmp_path / "ckpt.pt")
    if wrap == "torchscript":
        save_checkpoint(path, tiny_sd, fmt="torchscript")
    elif wrap == "safetensors":
        from safetensors.torch import save_file

        path = str(tmp_path / "ckpt.safetensors")
        save_file(dict(tiny_sd), path)
    elif wrap == "module.":
        torch.save(OrderedDict(("module." + k, v) for k, v in tiny_sd.items()), path)
    elif wrap == "plain":
        save_checkpoint(path, tiny_sd)
    else:
        torch.save({wrap: tiny_sd, "epoch": 3}, path)
    sd, kind = P.load_state_dict(path)
    assert kind == ("torchscript" if wrap == "torchscript" else "state_dict")
    _assert_same(sd, tiny_sd)


def test_bad_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not a TorchScript archive nor a state dict"):
        P.load_state_dict(junk)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a TorchScript archive nor a state dict"):
        P.load_state_dict(text)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        P.load_state_dict(tmp_path / "list.pt")
    torch.save({"a": torch.zeros(1), "b": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"not tensors: \['b'\]"):
        P.load_state_dict(tmp_path / "mixed.pt")
    torch.save({"w": _Opaque()}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="never executed"):
        P.load_state_dict(tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="not a Hugging Face CLIP snapshot"):
        P.load_state_dict(tmp_path)


class _Opaque:
    pass


def test_unknown_name_lists_models(tmp_path):
    with pytest.raises(ValueError, match=r"ViT-B/17.*available models.*'RN50'.*'ViT-L/14@336px'"):
        P.load_state_dict("ViT-B/17")
    with pytest.raises(ValueError, match="not found"):
        P.load_state_dict(str(tmp_path / "missing.pt"))
    with pytest.raises(TypeError, match="model name or a path"):
        P.load_state_dict(3)


def test_load_arguments_checked_first(tmp_path):
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="jit=True is not supported"):
        P.load(missing, jit=True)
    with pytest.raises(ValueError, match="invalid device"):
        P.load(missing, device="toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            P.load(missing, device="cuda")


@pytest.mark.parametrize("name, fmt, half", [("tiny-vit", "torchscript", True), ("tiny-rn", "state_dict", False)])
def test_load_builds_model_and_preprocess(tmp_path, name, fmt, half):
    sd = random_state_dict(name, seed=1, half=half)
    path = save_checkpoint(tmp_path / "m.pt", sd, fmt=fmt)
    model, preprocess = P.load(path)
    res = sd["input_resolution"].item()
    assert model.visual.input_resolution == res and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 on CPU even from fp16 weights
    image = preprocess(Image.new("RGB", (res + 20, res + 5), (90, 30, 200)))
    assert image.shape == (3, res, res)
    # The weights are the archive's: exporting gives them back (fp16 values are exact in fp32).
    exported = model.openai_state_dict()
    for key, value in exported.items():
        assert torch.equal(value, sd[key].float()), key

"""Named assets: local look-up, clear missing-asset errors, resumable verified downloads, the CLI.

Downloads come from a loopback HTTP server (127.0.0.1, port 0) that honours Range requests.
"""
from __future__ import annotations

import hashlib
import http.server
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sfd import assets
from sfd.assets.cli import main
from sfd.assets import (
    Asset, AssetChecksumError, AssetDownloadError, MissingAssetError, UnknownAssetError, fetch, require,
)

PAYLOAD = bytes(range(256)) * 1000  # 256 kB


class Server:
    """Serves ``files`` (path → bytes) with Range support and records every request's Range header."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.ranges: list[str | None] = []
        self.cut_after: dict[str, int] = {}  # path → bytes sent before the connection drops
        self.no_length: set[str] = set()  # paths served without a Content-Length header
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                data = server.files.get(self.path)
                server.ranges.append(self.headers.get("Range"))
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[len("bytes="):].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                if self.path not in server.no_length:
                    self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = server.cut_after.get(self.path)
                self.wfile.write(body if cut is None else body[:cut])  # a dropped connection

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server({"/data.bin": PAYLOAD})
    yield s
    s.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SFD_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def temp_asset(server):
    """Register test assets; unregister them afterwards."""
    names = []

    def make(name="test-data", **kw):
        kw.setdefault("url", server.url + "/data.bin")
        asset = Asset(name=name, filename=kw.pop("filename", "data.bin"), **kw)
        assets.register(asset, replace=True)
        names.append(name)
        return asset

    yield make
    for n in names:
        assets.unregister(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_registry_has_the_project_assets():
    expected = {"edm-cifar10-32x32-uncond-vp", "edm-ffhq-64x64-uncond-vp", "edm-afhqv2-64x64-uncond-vp",
                "edm-imagenet-64x64-cond-adm", "fid-ref-cifar10-32x32", "fid-ref-imagenet-64x64",
                "fid-ref-ffhq-64x64", "fid-ref-afhqv2-64x64", "inception-2015-12-05", "lpips-vgg16",
                "lpips-alexnet", "cifar10-train", "sd-v1-5", "coco-30k-captions"}
    assert expected <= set(assets.ASSETS)
    for name in expected:
        a = assets.get(name)
        assert a.url.startswith("https://") and a.url.endswith(a.filename)
    assert assets.get("edm-cifar10-32x32-uncond-vp").url == (
        "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl")
    with pytest.raises(UnknownAssetError, match="unknown asset 'nope'; known assets: .*lpips-vgg16"):
        assets.get("nope")


def test_lpips_weights_live_in_torch_hub_cache(home, tmp_path, monkeypatch):
    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    ckpt = tmp_path / "hub" / "checkpoints"
    assert assets.get("lpips-vgg16").fetch_dir() == ckpt
    assert assets.asset_path("lpips-vgg16") is None
    ckpt.mkdir(parents=True)
    (ckpt / "vgg16-397923af.pth").write_bytes(b"x")
    assert assets.asset_path("lpips-vgg16") == ckpt / "vgg16-397923af.pth"
    # found there, but not the weights (their sha256 starts 397923af): refused, saying how to get them again
    with pytest.raises(assets.AssetChecksumError, match="does not start with 397923af.*delete it and run "
                                                        "`python -m sfd.assets fetch lpips-vgg16`"):
        require("lpips-vgg16")


def test_a_truncated_file_is_refused_where_the_asset_knows_its_size(home, tmp_path):
    """CIFAR-10's tarball has a registered size and md5: a partial copy used to pass every check and fail
    inside the run when its images were read."""
    part = tmp_path / "cifar-10-python.tar.gz"
    part.write_bytes(b"\x1f\x8b" + bytes(100))
    with pytest.raises(assets.AssetChecksumError, match="size 102 bytes, expected 170498071"):
        require("cifar10-train", path=part)


def test_require_message_names_everything(home, temp_asset):
    asset = temp_asset(name="test-missing", subdir="things", extra_dirs=(lambda: Path("/nowhere/else"),))
    with pytest.raises(MissingAssetError) as info:
        require("test-missing")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and "\n" not in msg
    for part in ("'test-missing'", "data.bin", str(home / "things" / "data.bin"), str(home / "data.bin"),
                 "/nowhere/else/data.bin", "python -m sfd.assets fetch test-missing", asset.url):
        assert part in msg
    (home / "data.bin").parent.mkdir(parents=True)
    (home / "data.bin").write_bytes(b"1")
    assert require("test-missing") == home / "data.bin"


def test_require_explicit_path(tmp_path, temp_asset):
    temp_asset()
    f = tmp_path / "mine.bin"
    with pytest.raises(MissingAssetError, match=f"not found at the given path {f}"):
        require("test-data", path=f)
    f.write_bytes(b"1")
    assert require("test-data", path=f) == f
    (tmp_path / "data.bin").write_bytes(b"2")
    assert require("test-data", path=tmp_path) == tmp_path / "data.bin"  # a folder holding the file


def test_fetch_verifies_and_renames(home, server, temp_asset):
    temp_asset(sha256=sha256(PAYLOAD), size=len(PAYLOAD), subdir="sub")
    path = fetch("test-data", progress=False)
    assert path == home / "sub" / "data.bin" and path.read_bytes() == PAYLOAD
    assert not path.with_name("data.bin.part").exists()
    assert server.ranges == [None]
    assert fetch("test-data", progress=False) == path and len(server.ranges) == 1  # present: no download
    assert require("test-data") == path


def test_fetch_resumes_partial_download(tmp_path, server, temp_asset):
    temp_asset(sha256=sha256(PAYLOAD))
    part = tmp_path / "data.bin.part"
    part.write_bytes(PAYLOAD[:100_000])
    path = fetch("test-data", dest_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD and not part.exists()
    assert server.ranges == ["bytes=100000-"]


def test_dropped_connection_keeps_part_for_resume(tmp_path, server, temp_asset):
    server.files["/flaky.bin"] = PAYLOAD
    server.cut_after["/flaky.bin"] = 50_000
    temp_asset(url=server.url + "/flaky.bin", sha256=sha256(PAYLOAD))
    with pytest.raises(AssetDownloadError, match="again to resume"):
        fetch("test-data", dest_dir=tmp_path, progress=False)
    assert (tmp_path / "data.bin.part").stat().st_size == 50_000 and not (tmp_path / "data.bin").exists()
    del server.cut_after["/flaky.bin"]
    assert fetch("test-data", dest_dir=tmp_path, progress=False).read_bytes() == PAYLOAD
    assert server.ranges == [None, "bytes=50000-"]


def test_fetch_refuses_checksum_mismatch(tmp_path, server, temp_asset):
    temp_asset(sha256="0" * 64)
    with pytest.raises(AssetChecksumError, match="sha256 .* != expected 0000"):
        fetch("test-data", dest_dir=tmp_path, progress=False)
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()
    temp_asset(md5="f" * 32)
    with pytest.raises(AssetChecksumError, match="md5"):
        fetch("test-data", dest_dir=tmp_path, progress=False)
    temp_asset(sha256_prefix=sha256(PAYLOAD)[:8], size=len(PAYLOAD) + 1)
    with pytest.raises(AssetChecksumError, match="size"):
        fetch("test-data", dest_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_download_without_length_or_checksum_says_it_is_unchecked(tmp_path, server, temp_asset):
    server.no_length.add("/data.bin")
    temp_asset()
    with pytest.warns(UserWarning, match="sent no length .* nothing can tell whether the 256000 bytes"):
        assert fetch("test-data", dest_dir=tmp_path, progress=False).read_bytes() == PAYLOAD


def test_fetch_offline_is_clear(tmp_path, temp_asset):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.bin"
    temp_asset(url=url)
    with pytest.raises(AssetDownloadError) as info:
        fetch("test-data", dest_dir=tmp_path, progress=False, timeout=5)
    msg = str(info.value)
    assert url in msg and "download" in msg and str(tmp_path / "data.bin") in msg
    assert not (tmp_path / "data.bin").exists()


def test_fetch_http_error_and_url_override(tmp_path, server, temp_asset):
    temp_asset(url=server.url + "/missing.bin")
    with pytest.raises(AssetDownloadError, match="404"):
        fetch("test-data", dest_dir=tmp_path, progress=False)
    path = fetch("test-data", dest_dir=tmp_path, url=server.url + "/data.bin", progress=False)
    assert path.read_bytes() == PAYLOAD


def test_cli(home, server, temp_asset, capsys):
    temp_asset(sha256=sha256(PAYLOAD))
    assert main(["path", "test-data"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: asset 'test-data'") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["fetch", "test-data", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "data.bin")
    assert main(["path", "test-data"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "data.bin")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "test-data" in out and str(home / "data.bin") in out and "edm-cifar10-32x32-uncond-vp" in out
    dest = home / "elsewhere"
    assert main(["fetch", "test-data", "--dest", str(dest), "--url", server.url + "/data.bin",
                 "--no-progress"]) == 0
    assert (dest / "data.bin").read_bytes() == PAYLOAD
    (dest / "data.bin").write_bytes(b"junk")  # a corrupt copy: refused, and --force downloads it again
    assert main(["fetch", "test-data", "--dest", str(dest), "--no-progress"]) == 2
    assert "delete it, or fetch with --force" in capsys.readouterr().err
    assert main(["fetch", "test-data", "--dest", str(dest), "--no-progress", "--force"]) == 0
    assert (dest / "data.bin").read_bytes() == PAYLOAD
    assert main(["fetch", "no-such-asset"]) == 2
    assert "unknown asset 'no-such-asset'" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_module_entry_point(tmp_path):
    env = {"SFD_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "sfd.assets", "path", "fid-ref-cifar10-32x32"],
                       capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "python -m sfd.assets fetch fid-ref-cifar10-32x32" in r.stderr

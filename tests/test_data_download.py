"""The data download path as a user meets it, without the internet: a loopback HTTP server (127.0.0.1, started
and stopped here) serves copies of ../shared/data in the data root's layout; the downloader, pointed at it as a
mirror, fetches and verifies; train.py stops at once without the data and trains with it."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest

from conftest import ROOT
from prefixtuning.data.datamodule import build_dataset
from prefixtuning.data.download import SOURCES, DownloadError, download, sources

SHARED = ROOT.parent / "shared" / "data"
E2E = sources("e2e")
needs_e2e = pytest.mark.skipif(not all((SHARED / s.path).is_file() for s in E2E), reason="../shared/data/e2e absent")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; `cut` lists paths whose first request is broken off halfway (an interrupted transfer)."""

    cut: set = set()
    requests: list = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path.lstrip("/")
        type(self).requests.append(path)
        if path in self.cut:
            self.cut.discard(path)
            data = (Path(self.directory) / path).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.close()
            return
        super().do_GET()


@pytest.fixture()
def mirror(tmp_path):
    """(base URL, served folder) of a loopback server over a copy of the E2E files."""
    served = tmp_path / "served"
    for s in E2E:
        (served / s.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED / s.path, served / s.path)
    handler = type("Handler", (_Handler,), {"cut": set(), "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served, handler
    finally:
        server.shutdown()
        server.server_close()


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def cli(args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_the_checksum_table_covers_every_file_the_loaders_read(tmp_path):
    """Every file the E2E, WebNLG, DART and XSUM loaders read under a data root has a checksummed source; the
    one exception is XSUM's article file, which the hub distributes (docs/data.md)."""
    table = {s.path for s in SOURCES}
    assert all(s.sha256 or s.git_sha1 for s in SOURCES)
    from omegaconf import OmegaConf

    root = tmp_path / "root"
    for name in ("e2e", "webnlg", "dart", "xsum"):
        cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml"), resolve=False)
        folder = cfg["data_dir"].replace("${paths.data_dir}", str(root))
        data = build_dataset(OmegaConf.create({"name": name, "data_dir": folder, "files": cfg["files"]}))
        for p in data.needed_files(["train", "dev", "test"]):
            rel = p.relative_to(root).as_posix()
            if name == "xsum" and rel == "xsum/xsum.jsonl":
                continue
            if p.suffix == ".xml" or "." in p.name:
                assert rel in table, f"{rel} has no checksum in sources.json"
            else:  # an XML folder: the table holds its files
                assert any(t.startswith(rel + "/") for t in table), f"{rel}/ has no files in sources.json"
    for s in SOURCES:  # and every file the local copy has matches its checksum
        if (SHARED / s.path).is_file() and s.sha256:
            assert sha256(SHARED / s.path) == s.sha256, s.path


@needs_e2e
def test_download_from_a_mirror_then_train_on_it(tmp_path, mirror):
    url, _, handler = mirror
    root = tmp_path / "root"
    # without the data, train.py stops before any model is built and names the command
    run = cli(["train.py", "data=e2e", "backbone=tiny-gpt2", f"hydra.run.dir={tmp_path / 'r0'}"],
              env={"PREFIXTUNING_DATA": str(root)})
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-2000:]
    assert f"{root / 'e2e' / 'trainset.csv'} does not exist" in out
    assert "python -m prefixtuning.data download e2e" in out
    assert "Traceback" not in out and "[backbone]" not in out and "Loading weights" not in out
    # the download command, pointed at the mirror
    run = cli(["-m", "prefixtuning.data", "download", "e2e", "--quiet"],
              env={"PREFIXTUNING_DATA": str(root), "PREFIXTUNING_DATA_MIRROR": url})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "e2e: 4 files verified (4 fetched" in run.stdout
    for s in E2E:
        assert sha256(root / s.path) == s.sha256
    assert sorted(handler.requests) == sorted(s.path for s in E2E)
    # the same train command now trains on the official files
    run_dir = tmp_path / "r1"
    run = cli(["train.py", "data=e2e", "backbone=tiny-gpt2", "trainer=cpu", "trainer.max_steps=1",
               "data.max_train_examples=16", "data.max_dev_examples=4", "val_generation.enabled=false",
               "test_max_inputs=2", "decoding=greedy", "decoding.max_new_tokens=4", "show_examples=0",
               f"hydra.run.dir={run_dir}"], env={"PREFIXTUNING_DATA": str(root)})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/inputs"] == 2 and "test/BLEU" in metrics and "val/loss_start" in metrics


@needs_e2e
def test_a_corrupted_file_is_rejected_and_a_good_copy_kept(tmp_path, mirror):
    url, served, _ = mirror
    src = next(s for s in E2E if s.path == "e2e/devset.csv")
    data = bytearray((served / src.path).read_bytes())
    data[100] ^= 0x01  # one byte changed on the mirror
    (served / src.path).write_bytes(bytes(data))
    root = tmp_path / "root"
    with pytest.raises(DownloadError) as err:
        download(["e2e"], root=root, mirror=url, progress=False)
    msg = str(err.value)
    assert "e2e/devset.csv" in msg and f"expected sha256 {src.sha256}" in msg
    assert f"got sha256 {hashlib.sha256(bytes(data)).hexdigest()}" in msg
    assert not (root / src.path).exists() and not list((root / "e2e").glob(".*part*"))
    # a good copy already in place is verified and left alone; the corrupted mirror is not even asked
    shutil.copyfile(SHARED / src.path, root / src.path)
    before = (root / src.path).stat().st_mtime_ns
    download(["e2e"], root=root, mirror=url, progress=False)
    assert (root / src.path).stat().st_mtime_ns == before and sha256(root / src.path) == src.sha256
    # a corrupted local copy is replaced only by a verified one: with the mirror still bad, it stays as it was
    (root / src.path).write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="is left as it was"):
        download(["e2e"], root=root, mirror=url, progress=False)
    assert (root / src.path).read_bytes() == bytes(data)


@needs_e2e
def test_an_interrupted_download_restarts_cleanly(tmp_path, mirror):
    url, _, handler = mirror
    handler.cut.add("e2e/trainset.csv")  # the first transfer breaks off halfway
    root = tmp_path / "root"
    download(["e2e"], root=root, mirror=url, progress=False)
    assert handler.requests.count("e2e/trainset.csv") == 2
    assert sha256(root / "e2e" / "trainset.csv") == next(s for s in E2E if s.path == "e2e/trainset.csv").sha256


def test_offline_gets_the_sentence_not_a_traceback(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = cli(["-m", "prefixtuning.data", "download", "conll04", "--quiet", "--root", str(tmp_path),
               "--mirror", f"http://127.0.0.1:{port}"])
    assert run.returncode == 1
    assert run.stderr.startswith("error: could not fetch http://127.0.0.1:") and "after 3 tries" in run.stderr
    assert "PREFIXTUNING_DATA_MIRROR" in run.stderr and "Traceback" not in run.stderr
    assert not list(tmp_path.rglob("*.txt"))


def test_shared_data_is_never_a_default_in_conf():
    """../shared/data exists on this project's machines only: conf/ never points there (the Makefile sets
    $PREFIXTUNING_DATA to it where it exists)."""
    offending = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "conf").rglob("*.yaml")
                 for n, line in enumerate(p.read_text().splitlines(), start=1) if "shared" in line.split("#")[0]]
    assert not offending

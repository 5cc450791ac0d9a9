"""The official data files on any machine: `python -m prefixtuning.data download <dataset ...|all>`.

Each file the loaders read is fetched from its canonical public source at a pinned commit (the datasets' own
GitHub repositories; `sources.json` lists URL, size and checksum per file, rebuilt by
tools/make_data_sources.py), checked against that checksum (sha256; git blob SHA-1 for the two files whose
upstream tree records only that), and moved into place only when it matches: a failed or corrupted download
never replaces a good copy. HTTP goes through pooch (progress bar), retried 3 times; an interrupted download
restarts cleanly from a fresh temporary file.

Where files go (the data root; the same order `train.py` reads them from):
1. an explicit `data.data_dir` (train.py) or `--root` (here),
2. `$PREFIXTUNING_DATA`,
3. the project cache: `$PREFIXTUNING_CACHE/data`, else `~/.cache/prefixtuning/data`.
The root holds one folder per dataset in the layout the loaders read (`e2e/trainset.csv`,
`webnlg/challenge_2017_xml/...`, `dart/v1.1.1/...`, `xsum/...`, `superglue/<task>/...`, `ner/...`).

A mirror is a base URL serving that same layout (`$PREFIXTUNING_DATA_MIRROR` or `--mirror`): an institution's
copy, or a test's loopback server. XSUM's articles are distributed through the Hugging Face hub
(EdinburghNLP/xsum); `download xsum` fetches the official split and URL lists, and the articles with the
`datasets` package when it is installed and the hub is reachable.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pooch

from ..backbone import hub_offline
from ..cache import default_cache_dir
from ..atomic import atomic_path
from ..errors import UserError

DATA_ENV = "PREFIXTUNING_DATA"
MIRROR_ENV = "PREFIXTUNING_DATA_MIRROR"
DATASETS = ("e2e", "webnlg", "dart", "xsum", "superglue", "conll03", "conll04")
RETRIES = 3
_TABLE = json.loads((Path(__file__).parent / "sources.json").read_text())
XSUM_HUB = "EdinburghNLP/xsum"


class DownloadError(UserError):
    """A file that could not be fetched or did not match its checksum."""


@dataclass(frozen=True)
class Source:
    dataset: str
    path: str  # under the data root, as the loaders read it
    url: str
    bytes: int | None
    sha256: str | None = None
    git_sha1: str | None = None

    def url_from(self, mirror: str | None) -> str:
        return f"{mirror.rstrip('/')}/{self.path}" if mirror else self.url

    def checksum(self, path: Path) -> tuple[bool, str, str]:
        """(matches, expected, actual) for the file at `path`."""
        data = path.read_bytes()
        if self.sha256:
            return (actual := hashlib.sha256(data).hexdigest()) == self.sha256, f"sha256 {self.sha256}", f"sha256 {actual}"
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return blob == self.git_sha1, f"git blob SHA-1 {self.git_sha1}", f"git blob SHA-1 {blob}"


SOURCES: list[Source] = [Source(**f) for f in _TABLE["files"]]
LICENSES: dict[str, str] = _TABLE["licenses"]


def sources(dataset: str) -> list[Source]:
    if dataset not in DATASETS:
        raise DownloadError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)} or all")
    return [s for s in SOURCES if s.dataset == dataset]


def data_root(explicit: str | Path | None = None) -> Path:
    """The data root: `explicit`, else $PREFIXTUNING_DATA, else the project cache's data folder."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return default_cache_dir() / "data"


def download_command(dataset: str) -> str:
    return f"python -m prefixtuning.data download {dataset}"


def _fetch(url: str, dest: Path, progress: bool) -> None:
    """One file over HTTP(S) with pooch's downloader, retried; `dest` holds it only if a try completed."""
    downloader = pooch.HTTPDownloader(progressbar=progress, timeout=60)
    last = None
    for attempt in range(1, RETRIES + 1):
        dest.unlink(missing_ok=True)
        try:
            downloader(url, str(dest), None)
            return
        except Exception as err:  # noqa: BLE001 - network errors of every kind are retried, then reported
            last = err
            dest.unlink(missing_ok=True)
            if attempt < RETRIES:
                time.sleep(min(2.0 ** attempt, 10.0) / 10.0)
    raise DownloadError(f"could not fetch {url} after {RETRIES} tries ({type(last).__name__}: {last}). Without "
                        f"network access, point ${MIRROR_ENV} at a mirror of the data layout, or copy the files "
                        f"into the data root yourself")


def fetch_source(src: Source, root: Path, mirror: str | None = None, progress: bool = True) -> str:
    """Make `root / src.path` a verified copy. Returns "ok" (already there and valid) or "fetched"."""
    dest = root / src.path
    if dest.is_file() and src.checksum(dest)[0]:
        return "ok"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part{os.getpid()}")
    url = src.url_from(mirror)
    try:
        _fetch(url, tmp, progress)
        ok, expected, actual = src.checksum(tmp)
        if not ok:
            kept = f"the copy already at {dest} is left as it was" if dest.exists() else f"nothing was written to {dest}"
            raise DownloadError(f"{src.path}: the file from {url} does not match its checksum (expected {expected}, "
                                f"got {actual}); {kept}")
        os.replace(tmp, dest)  # same folder, so atomic: readers see the old file or the whole new one
    finally:
        tmp.unlink(missing_ok=True)
    return "fetched"


def download(datasets: list[str], root: str | Path | None = None, mirror: str | None = None,
             progress: bool = True, log=print) -> Path:
    """Fetch and verify every file of `datasets` ("all" for every one) into the data root; returns the root."""
    names = list(DATASETS) if "all" in datasets else list(dict.fromkeys(datasets))
    for name in names:
        sources(name)  # unknown names fail before anything is fetched
    root = data_root(root)
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    for name in names:
        todo = sources(name)
        fetched = 0
        for n, src in enumerate(todo, start=1):
            if fetch_source(src, root, mirror, progress) == "fetched":
                fetched += 1
            if progress and len(todo) > 10 and n % 25 == 0:
                log(f"[data] {name}: {n}/{len(todo)} files checked")
        size = sum((root / s.path).stat().st_size for s in todo)
        log(f"[data] {name}: {len(todo)} files verified ({fetched} fetched, {size / 2**20:.1f} MiB) in {root}; "
            f"license: {LICENSES[name]}")
        if name == "xsum":
            _xsum_articles(root, log)
    return root


def _xsum_articles(root: Path, log) -> None:
    """XSUM's articles, from the hub (their official distribution), as the jsonl the loader reads."""
    out = root / "xsum" / "xsum.jsonl"
    if out.is_file():
        log(f"[data] xsum: articles already in {out}")
        return
    hint = (f"train with data.files.hub=true (reads {XSUM_HUB} from the hub), or write {out} yourself (one JSON "
            f"object per line: id, document, summary)")
    if hub_offline():
        log(f"[data] xsum: the articles come from the Hugging Face hub ({XSUM_HUB}), which is switched off here "
            f"(HF_HUB_OFFLINE=1): not fetched. With the hub: {hint}")
        return
    try:
        import datasets
    except ImportError:
        log(f"[data] xsum: the articles come from the hub ({XSUM_HUB}) and need the `datasets` package "
            f"(pip install datasets): not fetched. Otherwise: {hint}")
        return
    ds = datasets.load_dataset(XSUM_HUB)
    with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8") as f:
        for split in ds.values():
            for r in split:
                f.write(json.dumps({"id": r["id"], "document": r["document"], "summary": r["summary"]},
                                   ensure_ascii=False) + "\n")
    log(f"[data] xsum: articles written to {out}")

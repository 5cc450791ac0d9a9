"""Rebuild src/prefixtuning/data/sources.json, the download table (`python -m prefixtuning.data download`), from
a verified local copy of the data (this project's ../shared/data, whose READMEs record each file's upstream
repository, commit and path, checked against the git blob ids) and the upstream git trees.

    python tools/make_data_sources.py ../shared/data

Every file gets its canonical URL at a pinned commit, its size and sha256 as read from the verified copy. Files
too large for the copy (DART's train JSON, XSUM's URL list) get the git blob SHA-1 that the upstream tree at
the pinned commit records for them (a checksum of the content too: sha1 of "blob <size>\\0" + bytes)."""

import hashlib
import json
import re
import sys
from pathlib import Path

RAW = "https://raw.githubusercontent.com"
PT = f"{RAW}/XiangLi1999/PrefixTuning/6519d30e69b15a180f23e2cd41b766d3f62b8e82"
DART = f"{RAW}/Yale-LILY/dart/bb644b12ec1d0264f96a31145534b9a94f6ff5f5"
E2E = f"{RAW}/tuetschek/e2e-dataset/ab0d967dd5729ce455ef14ba9ffafc456a335264"
XSUM = f"{RAW}/EdinburghNLP/XSum/7b95485c3e861d7caff76a8b4c6b3fd3bf7ee9b1"
LICENSES = {"e2e": "CC BY-SA 4.0", "webnlg": "CC BY-NC-SA 4.0", "dart": "MIT (repository); E2E/WebNLG parts under "
            "their own licenses", "xsum": "MIT (repository); BBC article text for research use",
            "superglue": "not stated in the source repository (per-task licenses)",
            "conll03": "not stated (Reuters RCV1 text, research use)", "conll04": "MIT (source repository)"}


def entry(root: Path, dataset: str, path: str, url: str) -> dict:
    data = (root / path).read_bytes()
    return {"dataset": dataset, "path": path, "url": url, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def readme_rows(readme: Path, folder: str, dataset: str, prefix: str = "") -> list[dict]:
    rows = []
    for line in readme.read_text().splitlines():
        m = re.match(r"\| `([^`]+)` \| ([^@]+)@([0-9a-f]{40}):(\S+) \| `[0-9a-f]+` \| `([0-9a-f]{64})` \| ([\d,]+) \|", line)
        if m and m.group(1).startswith(prefix):
            name, repo, commit, upath, sha, size = m.groups()
            rows.append({"dataset": dataset, "path": f"{folder}/{name}", "url": f"{RAW}/{repo}/{commit}/{upath}",
                         "bytes": int(size.replace(",", "")), "sha256": sha})
    return rows


def main(root: Path) -> None:
    out = []
    for name in ("trainset.csv", "devset.csv", "testset_w_refs.csv", "testset.csv"):
        out.append(entry(root, "e2e", f"e2e/{name}", f"{E2E}/{name}"))
    for p in sorted((root / "webnlg" / "challenge_2017_xml").rglob("*.xml")):
        rel = p.relative_to(root / "webnlg" / "challenge_2017_xml").as_posix()
        out.append(entry(root, "webnlg", f"webnlg/challenge_2017_xml/{rel}", f"{PT}/data/webnlg_challenge_2017/{rel}"))
    for name in ("dart-v1.1.1-full-dev.json", "dart-v1.1.1-full-test.xml"):
        out.append(entry(root, "dart", f"dart/v1.1.1/{name}", f"{DART}/data/v1.1.1/{name}"))
    out.append({"dataset": "dart", "path": "dart/v1.1.1/dart-v1.1.1-full-train.json",
                "url": f"{DART}/data/v1.1.1/dart-v1.1.1-full-train.json", "bytes": None,
                "git_sha1": "773adb6db19640ab5328eaddec7ba7495b1702cf"})
    out.append(entry(root, "xsum", "xsum/XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json",
                     f"{XSUM}/XSum-Dataset/XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json"))
    out.append({"dataset": "xsum", "path": "xsum/XSum-WebArxiveUrls.txt",
                "url": f"{XSUM}/XSum-Dataset/XSum-WebArxiveUrls.txt", "bytes": None,
                "git_sha1": "de1ab321de955f65603fe18625a0a38f9a00a0ca"})
    out += readme_rows(root / "superglue" / "README.md", "superglue", "superglue")
    out += readme_rows(root / "ner" / "README.md", "ner", "conll03", "conll2003/")
    out += readme_rows(root / "ner" / "README.md", "ner", "conll04", "conll04/")
    for e in out:  # every row of the local copy must match the checksum recorded for it
        p = root / e["path"]
        if p.exists() and "sha256" in e:
            assert hashlib.sha256(p.read_bytes()).hexdigest() == e["sha256"], e["path"]
    table = {"about": __doc__.splitlines()[0], "licenses": LICENSES, "files": out}
    dest = Path(__file__).resolve().parents[1] / "src" / "prefixtuning" / "data" / "sources.json"
    dest.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{len(out)} files -> {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

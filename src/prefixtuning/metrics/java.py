"""The Java tools the official scorers use: METEOR 1.5 and Stanford's PTB tokenizer (coco-caption).

Both jars ship inside the PyPI package `pycocoevalcap` (the same jars coco-caption and e2e-metrics
run); `METEOR_JAR` / `CORENLP_JAR` point elsewhere if wanted. When Java or a jar is missing, callers
get a `MissingDependency` whose message says what is missing, and the metric is reported as skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import UserError
from typing import Sequence


class MissingDependency(UserError, RuntimeError):
    pass


def _package_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap")  # a namespace package: no __file__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def java() -> str:
    exe = shutil.which("java")
    if exe is None:
        raise MissingDependency("Java is not installed (no `java` on PATH); install a JRE (>= 8) to compute it")
    return exe


def _jar(env: str, relative: str, what: str) -> Path:
    if os.environ.get(env):
        p = Path(os.environ[env])
    else:
        pkg = _package_dir()
        if pkg is None:
            raise MissingDependency(f"{what} needs the jar from the `pycocoevalcap` package "
                                    f"(pip install pycocoevalcap) or {env}=/path/to/jar")
        p = pkg / relative
    if not p.is_file():
        raise MissingDependency(f"{what} jar not found at {p}")
    return p


def meteor_jar() -> Path:
    return _jar("METEOR_JAR", "meteor/meteor-1.5.jar", "METEOR 1.5")


def corenlp_jar() -> Path:
    return _jar("CORENLP_JAR", "tokenizer/stanford-corenlp-3.4.1.jar", "the PTB tokenizer")


# Tokens coco-caption drops after PTB tokenization.
COCO_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                    "--", "...", ";"}


def ptb_tokenize(lines: Sequence[str]) -> list[str]:
    """coco-caption's tokenization: Stanford PTBTokenizer (-preserveLines -lowerCase), punctuation removed."""
    exe, jar = java(), corenlp_jar()
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(line.replace("\n", " ") for line in lines))
        path = fh.name
    try:
        out = subprocess.run([exe, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                              "-lowerCase", path], capture_output=True, check=True).stdout.decode("utf-8")
    finally:
        os.unlink(path)
    toks = out.split("\n")
    if len(toks) < len(lines):
        raise RuntimeError(f"PTB tokenizer returned {len(toks)} lines for {len(lines)} inputs")
    return [" ".join(w for w in t.rstrip().split(" ") if w not in COCO_PUNCTUATION) for t in toks[: len(lines)]]


class Meteor:
    """One METEOR 1.5 process (`-l en -norm`, stdio protocol). `segment_stats` aligns one output with its
    references; `corpus` aggregates any list of segment statistics into the corpus score, exactly what
    `java -jar meteor-1.5.jar hyp refs -l en -norm -r N` reports for those segments."""

    def __init__(self, lang: str = "en"):
        exe, jar = java(), meteor_jar()
        cmd = [exe, "-Xmx2G", "-jar", str(jar), "-", "-", "-stdio", "-l", lang, "-norm"]
        self.proc = subprocess.Popen(cmd, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)

    def _send(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode("utf-8"))
        self.proc.stdin.flush()

    def _read(self) -> str:
        line = self.proc.stdout.readline().decode("utf-8")
        if not line:
            raise RuntimeError("the METEOR process ended unexpectedly")
        return line.strip()

    @staticmethod
    def _clean(s: str) -> str:  # '|||' separates fields in the protocol
        return " ".join(s.replace("|||", " ").split())

    def segment_stats(self, hyp: str, refs: Sequence[str]) -> str:
        self._send(" ||| ".join(["SCORE", *[self._clean(r) for r in refs], self._clean(hyp)]))
        return self._read()

    def corpus(self, stats: Sequence[str]) -> float:
        self._send(" ||| ".join(["EVAL", *stats]))
        for _ in stats:  # one score per segment, then the corpus score
            self._read()
        return float(self._read())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def meteor(hyps: Sequence[str], refs: Sequence[Sequence[str]], lang: str = "en") -> float:
    """Corpus METEOR 1.5 of outputs against their references (each output's best reference counts)."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} outputs but {len(refs)} reference groups")
    with Meteor(lang) as m:
        return m.corpus([m.segment_stats(h, r) for h, r in zip(hyps, refs)])

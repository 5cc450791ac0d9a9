"""The README and docs/ pages: every `python train.py ...` line they show composes and passes the config check
exactly as typed (no tiny-backbone swap), every relative link points at a file, and the README stays short.
The commands that need a trained run (evaluate, export, gates, serving, score, report) run as subprocesses in
their own tests (test_cli.py, test_serving.py, test_gates.py, test_report.py, test_default_run.py)."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from conftest import ROOT
from prefixtuning.config_check import check_train_config

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Hydra plugins some commands name; a command whose plugin is not installed here is skipped with the reason
PLUGINS = {"hydra/launcher=submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
           "hparams_search=optuna": "hydra_plugins.hydra_optuna_sweeper"}


def code_lines(page: Path) -> list[str]:
    """Lines inside ``` blocks, comments cut, continuation lines joined."""
    out, inside, pending = [], False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        line = pending + line.split("  #")[0].rstrip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        out.append(line.strip())
    return out


def train_commands() -> list[tuple[str, str]]:
    """`python train.py ...` in code blocks and in inline code spans of every page."""
    found = []
    for page in PAGES:
        inline = re.findall(r"`(python train\.py[^`]*)`", page.read_text())
        for line in code_lines(page) + inline:
            if line.startswith("python train.py"):
                found.append((page.name, line.strip()))
    # the same command shown on several pages is composed once
    return sorted(set(found), key=lambda x: (x[0], x[1]))


def test_the_readme_is_short_and_its_links_resolve():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_pages_show_train_commands():
    assert len([c for p, c in train_commands() if p == "README.md"]) >= 10


@pytest.mark.parametrize("page,command", train_commands(), ids=[f"{p}:{c[16:70]}" for p, c in train_commands()])
def test_every_train_command_of_the_docs_composes_and_passes_the_check(tmp_path, page, command):
    if "<" in command or "..." in command:
        pytest.skip("a placeholder to fill in (<run>, <grid>, ...)")
    for arg, module in PLUGINS.items():
        if arg in command and importlib.util.find_spec(module) is None:
            pytest.skip(f"{arg} needs {module.split('.')[-1]} (an optional extra), not installed here")
    args = shlex.split(command)[2:]
    overrides = []
    for a in args:
        if a == "-m" or a.startswith("--"):
            continue
        key, _, value = a.partition("=")
        if "," in value and not value.startswith(("[", "'", '"')):  # a sweep: its first value stands for all
            value = value.split(",")[0]
        overrides.append(f"{key}={value}")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        full = compose("train", overrides=overrides, return_hydra_config=True)
    choices = full.hydra.runtime.choices
    cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])  # what train.py receives
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)  # ${hydra:runtime.output_dir} outside a Hydra run
    check_train_config(cfg)
    for o in overrides:  # what the user typed is what the run gets
        key, _, value = o.partition("=")
        if key in choices:  # a group: that option was selected
            assert choices[key] == value, f"{key}: {choices[key]} selected, {value} typed"
            continue
        if key.startswith("hydra"):
            continue
        node = cfg
        for part in key.split("."):
            node = node[part]
        if isinstance(node, bool):
            assert str(node).lower() == value.lower(), f"{key}: {node!r} != {value!r}"
        elif isinstance(node, (int, float)):
            assert float(node) == float(value), f"{key}: {node!r} != {value!r}"
        else:
            assert str(node) == value, f"{key}: {node!r} != {value!r}"

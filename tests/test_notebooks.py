"""Both notebooks execute headless (nbclient, as in CI): the quickstart trains an APT prefix on the tiny
backbone, uses it through the Python API and draws its gates; the analysis notebook draws a real tiny
sweep's report. Notebooks are kept in git without outputs."""

import json
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOKS = ROOT / "notebooks"


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_analysis.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text())
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")


def _execute(name: str, env: dict, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = dict(os.environ)
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    return nb, images


@pytest.mark.slow
def test_quickstart_trains_then_uses_the_prefix(tmp_path):
    nb, images = _execute("01_quickstart.ipynb", {"QUICKSTART_RUN": str(tmp_path), "PROJECT_ROOT": str(ROOT),
                                                  "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert images == 1  # the gate heatmap
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "name : Blue Spice | Type : pub | area : riverside ->" in text
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_analysis_notebook_draws_a_sweeps_report(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["train.py", "-m", "backbone=tiny-gpt2", "init=random", "optim.lr=1.0e-2", "data.batch_size=16",
            "trainer=cpu", "trainer.enable_progress_bar=false", "trainer.limit_train_batches=2", "optim.epochs=1",
            "val_generation.enabled=false", "validate_before_training=false", "test_max_inputs=3",
            "decoding=greedy", "decoding.max_new_tokens=6", "prefix.length=2,3", f"hydra.sweep.dir={sweep}",
            "+hydra.callbacks.report._target_=prefixtuning.report.ReportCallback"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, images = _execute("02_analysis.ipynb", {"PREFIXTUNING_REPORT": str(sweep / "report")}, tmp_path)
    assert images == 1 + len(list((sweep / "report").glob("*.png")))  # its plot + the report's figures

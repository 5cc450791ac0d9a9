"""The same computations on a CUDA GPU as on the CPU, where the rest of the suite checks them against explicit
attention math and PEFT: forward, loss and prefix gradients (GPT-2, Llama/GQA, BART x static, reparam,
APT), generation against PEFT on the GPU, the mixed-prefix bank, bf16 autocast, and `train.py trainer=gpu` +
`evaluate.py` as the user types them. Skipped on a machine without CUDA (CI's); run with `make test-gpu`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TEXTS, batch, load_tiny, make_model, peft_prefix_twin
from prefixtuning.serving import PrefixBank
from prefixtuning.prefixes import build_prefix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """TF32 would round fp32 matmuls to 10 mantissa bits on the GPU; the equalities below are in true fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _forward_backward(m, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    out = m(ids, mask, labels=labels)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)
    return out.logits.detach().float().cpu(), out.loss.detach().cpu(), [g.cpu() for g in grads]


@pytest.mark.parametrize("family", ["gpt2", "llama", "bart"])
@pytest.mark.parametrize("kind", ["static", "reparam", "apt"])
def test_forward_loss_and_prefix_gradients_on_cuda_equal_cpu(family, kind):
    kw = {"mid_dim": 16} if kind == "reparam" else {"gate_init_std": 0.5} if kind == "apt" else {}
    m = make_model(family, kind, length=4, **kw).eval()
    if hasattr(m.prefix, "reset_random"):
        m.prefix.reset_random(0.3)
    ids, mask = batch(m.backbone.tokenizer, TEXTS)
    logits_cpu, loss_cpu, grads_cpu = _forward_backward(m, ids, mask)
    m.to(CUDA)
    logits, loss, grads = _forward_backward(m, ids.to(CUDA), mask.to(CUDA))
    assert len(grads) == len(grads_cpu) > 0
    assert torch.allclose(logits, logits_cpu, atol=1e-4, rtol=1e-4)
    assert torch.allclose(loss, loss_cpu, atol=1e-5, rtol=1e-5)
    for g, g_cpu in zip(grads, grads_cpu):
        assert g.abs().sum() > 0
        assert torch.allclose(g, g_cpu, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logits_and_greedy_generation_equal_peft_on_cuda(family):
    m = make_model(family, "static", length=5).eval()
    peft = peft_prefix_twin(m)
    m.to(CUDA)
    peft.to(CUDA)
    tok = m.backbone.tokenizer
    ids, mask = (t.to(CUDA) for t in batch(tok, TEXTS))
    with torch.no_grad():
        diff = (m(ids, mask).logits - peft(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max().item() <= 1e-5
    ids, mask = (t.to(CUDA) for t in batch(tok, TEXTS, side="left"))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ref = peft.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    assert torch.equal(m.generate(ids, mask, **kw), ref)


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_beam_search_on_cuda_equals_cpu(family):
    m = make_model(family, "static", length=4).eval()
    if hasattr(m.prefix, "reset_random"):
        m.prefix.reset_random(0.3)
    tok = m.backbone.tokenizer
    ids, mask = batch(tok, TEXTS, side="left" if family == "gpt2" else "right")
    kw = dict(max_new_tokens=8, min_new_tokens=3, num_beams=4, do_sample=False, pad_token_id=tok.pad_token_id)
    cpu = m.generate(ids, mask, **kw)
    m.to(CUDA)
    assert torch.equal(m.generate(ids.to(CUDA), mask.to(CUDA), **kw).cpu(), cpu)


def test_mixed_prefix_bank_on_cuda_equals_cpu():
    """A batch mixing prefixes of different lengths and kinds, and a row with none, on the GPU."""
    texts = [t.strip() for t in TEXTS] + ["name : Alimentum | area : riverside"]
    ids = ["p3", None, "g5", "r4"]
    outputs = []
    for device in ("cpu", CUDA):
        bb = load_tiny("gpt2")
        bb.model.to(device)
        torch.manual_seed(1)
        bank = PrefixBank(bb)
        for name, cfg in {"p3": {"kind": "static", "length": 3},
                          "r4": {"kind": "reparam", "length": 4, "mid_dim": 16},
                          "g5": {"kind": "apt", "length": 5, "gate_init_std": 0.5}}.items():
            p = build_prefix(cfg, bb.geometry)
            if hasattr(p, "reset_random"):
                p.reset_random(0.3)
            bank.add(name, p)
        outputs.append(bank.generate(texts, ids, max_new_tokens=8, min_new_tokens=3, do_sample=False))
    assert outputs[0] == outputs[1]
    assert len(set(outputs[1])) > 1


def test_bf16_autocast_on_cuda_is_close_to_fp32():
    m = make_model("llama", "static", length=4).eval().to(CUDA)
    ids, mask = (t.to(CUDA) for t in batch(m.backbone.tokenizer, TEXTS))
    with torch.no_grad():
        ref = m(ids, mask).logits.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = m(ids, mask).logits.float()
    real = mask.bool()
    err = (low - ref)[real].abs().max().item()
    assert 0 < err < 0.05 * ref[real].abs().max().item()  # rounded, not wrong


def _run(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_train_and_evaluate_on_gpu_as_typed(tmp_path):
    out = tmp_path / "run"
    log = _run(["train.py", "trainer=gpu", "backbone=tiny-gpt2", "init=random", "optim.lr=1.0e-2",
                "data.batch_size=16", "data.max_train_examples=160", "data.max_dev_examples=32", "optim.epochs=3",
                "test_max_inputs=8",
                "logger=csv", f"hydra.run.dir={out}"])
    assert "GPU available: True (cuda), used: True" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val/loss"] < metrics["val/loss_start"]
    assert len((out / "predictions_test.txt").read_text().splitlines()) == 8
    ev = tmp_path / "eval"
    log = _run(["evaluate.py", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "split=test", "max_inputs=8",
                f"hydra.run.dir={ev}"])
    assert "[eval] decoding on cuda" in log
    assert (ev / "predictions_test.txt").read_text() == (out / "predictions_test.txt").read_text()


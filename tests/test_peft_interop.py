"""PEFT interoperability: our prefix exported in PEFT's format gives PeftModel.from_pretrained the same
logits (right-padded and unpadded) and the same greedy tokens; a PEFT adapter imports to the same prefix."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import ROOT, TEXTS, batch, compose_cfg, load_tiny, make_model
from prefixtuning.artifacts import ExportError
from prefixtuning.model import TunedModel
from prefixtuning.peft_interop import export_peft, load_peft_prefix
from prefixtuning.serving import PrefixBank


def _base(m):
    return AutoModelForCausalLM.from_pretrained(m.backbone.model.name_or_path).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["static", "reparam"])
def test_export_to_peft_is_exact(tmp_path, family, kind):
    m = make_model(family, kind, length=5, **({"mid_dim": 16} if kind == "reparam" else {})).eval()
    export_peft(m.prefix, m.backbone, tmp_path / "peft")
    peft = PeftModel.from_pretrained(_base(m), tmp_path / "peft").eval()
    tok = m.backbone.tokenizer
    for texts in (TEXTS, TEXTS[:1]):  # right-padded, unpadded
        ids, mask = batch(tok, texts)
        with torch.no_grad():
            diff = (m(ids, mask).logits - peft(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
        assert diff.abs().max().item() <= 1e-5
    ids, mask = batch(tok, TEXTS, side="left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ref = peft.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    assert torch.equal(m.generate(ids, mask, **kw), ref)
    back, _ = load_peft_prefix(tmp_path / "peft", m.backbone)  # and the round trip is exact
    for a, b in zip(back.key_values()["decoder"], m.prefix.key_values()["decoder"]):
        assert torch.equal(a, b.detach())


def test_import_a_peft_adapter_made_by_peft(tmp_path):
    bb = load_tiny("llama")  # grouped-query attention: PEFT sizes the prefix by key/value heads
    base = AutoModelForCausalLM.from_pretrained(bb.model.name_or_path)
    peft = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    torch.manual_seed(0)
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    peft.save_pretrained(tmp_path / "adapter")
    prefix, _ = load_peft_prefix(tmp_path / "adapter", bb)
    ours = TunedModel(bb, prefix).eval()
    ids, mask = batch(bb.tokenizer, TEXTS)
    with torch.no_grad():
        ref = peft.eval()(input_ids=ids, attention_mask=mask).logits
        assert (ours(ids, mask).logits - ref)[mask.bool()].abs().max().item() <= 1e-5
    bank = PrefixBank(bb)  # the serving bank loads PEFT adapter directories directly
    bank.load("from_peft", tmp_path / "adapter")
    assert bank.entries["from_peft"].prefix.length == 4


def test_what_peft_cannot_express_is_refused(tmp_path):
    apt = make_model("gpt2", "apt", length=3)
    with pytest.raises(ExportError, match="APT's token gates"):
        export_peft(apt.prefix, apt.backbone, tmp_path / "a")
    unshifted = make_model("gpt2", "static", length=3, shift=False)
    with pytest.raises(ExportError, match="shift_positions=false"):
        export_peft(unshifted.prefix, unshifted.backbone, tmp_path / "b", shift_positions=False)
    bart = make_model("bart", "static", length=3)
    with pytest.raises(ExportError, match="encoder-decoder"):
        export_peft(bart.prefix, bart.backbone, tmp_path / "c")
    gpt2 = make_model("gpt2", "static", length=3)
    export_peft(gpt2.prefix, gpt2.backbone, tmp_path / "d")
    with pytest.raises(ExportError, match="does not match backbone tiny-llama"):
        load_peft_prefix(tmp_path / "d", load_tiny("llama"))
    # a corrupt weights file and an adapter declaring another base are refused with their names
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "gpt2-medium"}))
    gpt2.backbone.name = "gpt2"  # as if loaded from the hub as gpt2
    with pytest.raises(ExportError, match=r"adapter_config.json: the adapter was trained on gpt2-medium, not on "
                                          r"backbone gpt2"):
        load_peft_prefix(tmp_path / "d", gpt2.backbone)
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "d" / "adapter_model.safetensors").write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(ExportError, match=r"adapter_model.safetensors: no readable prompt_embeddings"):
        load_peft_prefix(tmp_path / "d", gpt2.backbone)


def test_export_cli_format_peft(tmp_path):
    from prefixtuning.training import train

    train(compose_cfg(["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.limit_train_batches=2",
                       "optim.epochs=1", "test_after_training=false", "val_generation.enabled=false"], tmp_path / "run"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "export.py", f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                           f"out={tmp_path / 'peft'}", "format=peft", f"hydra.run.dir={tmp_path / 'h'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from prefixtuning.loading import load_trained

    model, _ = load_trained(tmp_path / "run" / "checkpoints" / "last.ckpt")
    peft = PeftModel.from_pretrained(_base(model), tmp_path / "peft").eval()
    ids, mask = batch(model.backbone.tokenizer, TEXTS)
    with torch.no_grad():
        assert (model(ids, mask).logits - peft(input_ids=ids, attention_mask=mask).logits)[mask.bool()].abs().max() <= 1e-5

"""Every method in the same harness: parameter counts equal their formulas (computed here from the backbone
config), step 0 equals the backbone where the method says so, LoRA equals HF PEFT's, prompt tuning equals
feeding the vectors as input embeddings, FT-top2 touches nothing else, APT starts as its static prefix,
the gate probe keeps input order, and each method trains, resumes exactly, evaluates and exports."""

import json

import pytest
import torch

from conftest import TEXTS, batch, compose_cfg, load_tiny, make_model
from prefixtuning.factory import build_model, initialize, parameter_report
from prefixtuning.methods import METHODS
from prefixtuning.model import TunedModel
from prefixtuning.prefixes import build_prefix
from prefixtuning.training import train

METHOD_NAMES = ["prefix", "finetune", "finetune_top2", "adapter", "prompt", "lora"]


def model_for(method: str, family: str = "gpt2", **overrides):
    cfg = compose_cfg([f"method={method}", f"backbone=tiny-{family}", *(f"{k}={v}" for k, v in overrides.items())],
                      "/tmp/unused")
    bb = load_tiny(family)
    torch.manual_seed(0)
    model = build_model(cfg, bb)
    initialize(cfg, model)
    return model.eval(), cfg


def plain_logits(bb, ids, mask):
    bb.injector.deactivate()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return bb.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


# ---------------------------------------------------------------- trainable counts = formulas

def test_trainable_counts_equal_their_formulas_on_gpt2():
    c = load_tiny("gpt2").model.config
    d, L, V, T = c.n_embd, c.n_layer, c.vocab_size, c.n_positions
    block = 12 * d * d + 13 * d  # c_attn 3d^2+3d, c_proj d^2+d, mlp 4d^2+4d and 4d^2+d, two LayerNorms 4d
    total = V * d + T * d + L * block + 2 * d  # tied LM head, final ln_f
    P, r_lora, r_adapter = 5, 8, 7
    expect = {
        "prefix": L * 2 * d * P,                                  # keys and values, every layer
        "finetune": total,
        "finetune_top2": 2 * block + 2 * d,                       # top 2 blocks + ln_f (head tied: frozen)
        "adapter": 2 * L * (2 * d * r_adapter + r_adapter + d),   # after attention and after the FFN
        "prompt": P * d,
        "lora": L * r_lora * (d + 3 * d),                         # c_attn: d -> 3d
    }
    for method, n in expect.items():
        extra = {"method.bottleneck": r_adapter} if method == "adapter" else {}
        model, _ = model_for(method, **extra)
        r = parameter_report(model)
        assert r["trainable_params"] == n, (method, r["trainable_params"], n)
        assert r["backbone_params"] == total
        assert abs(r["trainable_share_of_backbone"] - n / total) < 1e-12


def test_gqa_counts_on_llama():
    bb = load_tiny("llama")
    c = bb.model.config
    d, L, H, KV = c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    hd = d // H
    lora, _ = model_for("lora", "llama")  # q: d -> H hd, v: d -> KV hd
    assert parameter_report(lora)["trainable_params"] == L * 8 * ((d + H * hd) + (d + KV * hd))
    prefix, _ = model_for("prefix", "llama")
    assert parameter_report(prefix)["trainable_params"] == L * 2 * KV * 5 * hd


def test_adapter_share_picks_the_bottleneck_of_the_papers_settings():
    """GPT-2 medium's 354,823,168 parameters and 48 adapters of width 1024: 0.1% -> r=3, 3% -> r=108."""
    from prefixtuning.methods.adapter import AdapterMethod

    n, sites, d = 354_823_168, 48, 1024
    for share, r in ((0.001, 3), (0.03, 108)):
        assert max(1, round((share * n / sites - d) / (2 * d + 1))) == r
        assert abs(sites * (2 * d * r + r + d) / n - share) / share < 0.05
    import prefixtuning.methods.adapter as adapter_module

    assert "gives r=3" in adapter_module.__doc__ and "gives r=108" in adapter_module.__doc__  # documented as computed
    del AdapterMethod


# ---------------------------------------------------------------- step 0 and equivalences

@pytest.mark.parametrize("family", ["gpt2", "bart", "llama"])
@pytest.mark.parametrize("method", ["adapter", "lora", "finetune", "finetune_top2"])
def test_step_zero_is_the_backbone_exactly(method, family):
    model, _ = model_for(method, family)
    ref, _ = model_for("finetune", family)  # untouched weights, same tiny build
    tok = model.backbone.tokenizer
    ids, mask = batch(tok, TEXTS)
    with torch.no_grad():
        if family == "bart":
            dec = ids[:, :4]
            got = model(ids, mask, decoder_input_ids=dec).logits
            ref.method.deactivate(ref.backbone)
            want = ref.backbone.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        else:
            got, want = model(ids, mask).logits, plain_logits(ref.backbone, ids, mask)
    assert torch.equal(got, want)


def test_lora_equals_peft_lora_for_the_same_matrices():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, _ = model_for("lora")
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.method.layers.values():
            layer.B.normal_(0.0, 0.2)  # a trained-looking update, not the zero start
    base = AutoModelForCausalLM.from_pretrained(model.backbone.model.name_or_path)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0,
                                           fan_in_fan_out=True)).eval()
    for name, mod in peft.named_modules():
        if name.endswith("attn.c_attn") and hasattr(mod, "lora_A"):
            ours = model.method.layers[name.split("model.", 2)[-1].replace(".", "__")]
            mod.lora_A["default"].weight.data.copy_(ours.A)
            mod.lora_B["default"].weight.data.copy_(ours.B)
    ids, mask = batch(model.backbone.tokenizer, TEXTS)
    with torch.no_grad():
        ours = model(ids, mask).logits
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = peft(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (ours - ref)[mask.bool()].abs().max().item() <= 1e-5
    clean = load_tiny("gpt2")  # the hooks live on `model`'s backbone: compare with a fresh one
    assert (ours - plain_logits(clean, ids, mask))[mask.bool()].abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_prompt_equals_its_vectors_fed_as_input_embeddings(family):
    model, _ = model_for("prompt", family)
    bb, P = model.backbone, model.method.length
    ids, mask = batch(bb.tokenizer, TEXTS)
    with torch.no_grad():
        emb = bb.model.get_input_embeddings()(ids)
        embeds = torch.cat([model.method.prompt.expand(len(TEXTS), -1, -1), emb], 1)
        full = torch.cat([torch.ones(len(TEXTS), P, dtype=mask.dtype), mask], 1)
        kw = {"decoder_input_ids": ids[:, :4]} if family == "bart" else {
            "position_ids": (full.cumsum(-1) - 1).clamp(min=0)}
        ref = bb.model(inputs_embeds=embeds, attention_mask=full, **kw).logits
        got = model(ids, mask, **({"decoder_input_ids": ids[:, :4]} if family == "bart" else {})).logits
    assert torch.equal(got, ref)
    if family == "gpt2":  # and greedy generation equals a manual loop over the same embeddings
        lids, lmask = batch(bb.tokenizer, TEXTS, side="left")
        gen = model.generate(lids, lmask, max_new_tokens=4, do_sample=False, pad_token_id=bb.tokenizer.pad_token_id)
        e = torch.cat([model.method.prompt.expand(len(TEXTS), -1, -1), bb.model.get_input_embeddings()(lids)], 1)
        m = torch.cat([torch.ones(len(TEXTS), P, dtype=lmask.dtype), lmask], 1)
        toks = []
        with torch.no_grad():
            for _ in range(4):
                nxt = bb.model(inputs_embeds=e, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0)
                               ).logits[:, -1].argmax(-1)
                toks.append(nxt)
                e = torch.cat([e, bb.model.get_input_embeddings()(nxt)[:, None]], 1)
                m = torch.cat([m, torch.ones(len(TEXTS), 1, dtype=m.dtype)], 1)
        assert torch.equal(gen, torch.stack(toks, 1))


def test_prompt_task_words_init_is_their_embeddings():
    model, cfg = model_for("prompt", **{"init": "task_words"})
    bb = model.backbone
    ids = bb.tokenizer(cfg.init.text, add_special_tokens=False)["input_ids"]
    tiled = (ids * 5)[: model.method.length]
    assert torch.equal(model.method.prompt.data, bb.model.get_input_embeddings().weight[tiled])


def test_finetune_top2_leaves_every_other_weight_bit_identical():
    model, _ = model_for("finetune_top2", "llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = batch(model.backbone.tokenizer, TEXTS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(ids, mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    opt.step()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n in before if n.startswith(("backbone.model.model.layers.0.", "backbone.model.model.layers.1.",
                                                          "backbone.model.model.norm."))}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trained), n  # trained ones moved, everything else did not


# ---------------------------------------------------------------- APT

@pytest.mark.parametrize("init", ["random", "task_words"])
def test_apt_at_step_zero_equals_the_static_prefix_it_wraps(init):
    apt = make_model("gpt2", "apt", length=4)
    from prefixtuning.initialization import initialize_prefix

    initialize_prefix({"kind": init, "text": "table-to-text:", "std": 1.0}, apt.prefix, apt.backbone)
    static = build_prefix({"kind": "static", "length": 4}, apt.backbone.geometry)
    static.set_key_values({"decoder": (apt.prefix.keys["decoder"].data, apt.prefix.values["decoder"].data)})
    ref = TunedModel(apt.backbone, static)
    ids, mask = batch(apt.backbone.tokenizer, TEXTS)
    with torch.no_grad():
        assert torch.equal(apt(ids, mask, source_mask=mask).logits, ref(ids, mask).logits)
    g = apt.prefix.token_gates()
    assert torch.equal(apt.prefix.layer_scales() * g[0, :, 0], torch.ones_like(g[0, :, 0]))


def test_prefix_dropout_acts_in_training_only():
    m = make_model("gpt2", "static", length=4, dropout=0.5)
    ids, mask = batch(m.backbone.tokenizer, TEXTS)
    with torch.no_grad():
        m.eval()
        a, b = m(ids, mask).logits, m(ids, mask).logits
        m.train()
        torch.manual_seed(0)
        c = m(ids, mask).logits
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gate_probe_returns_gates_in_input_order():
    from prefixtuning.gates import probe_gates

    m = make_model("gpt2", "apt", length=3, gate_init_std=0.5)
    tok = m.backbone.tokenizer
    texts = TEXTS + [" name : Cocum", " name : Alimentum | area : riverside | food : Chinese"]
    prompts = [tok(" " + t.strip(), add_special_tokens=False)["input_ids"] for t in texts]
    together = probe_gates(m, prompts, batch_size=2)  # sorted by length and batched
    for i, p in enumerate(prompts):
        alone = probe_gates(m, [p], batch_size=1)
        for key, g in alone.items():
            torch.testing.assert_close(together[key][i], g[0], rtol=0, atol=1e-6)
    # decode() leaves the gates of every input, in the caller's order
    from omegaconf import OmegaConf

    from prefixtuning.decoding import decode

    decode(m, prompts, OmegaConf.create({"num_beams": 2, "min_new_tokens": 1, "max_new_tokens": 3,
                                         "length_penalty": 1.0, "no_repeat_ngram_size": 0, "no_newlines": False}),
           batch_size=2, progress=False)
    for key, g in together.items():
        torch.testing.assert_close(m.prefix.last_token_gates[key], g, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the harness: train, resume, evaluate, export

SMALL = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.limit_train_batches=2",
         "test_after_training=false", "val_generation.enabled=false", "validate_before_training=false"]


# prompt x BART is the case that found the stale last.ckpt: its val loss stops improving in epoch 2
# T5 (relative position bias, prefixes at all three sites) with the prefix method, as its first-class test
# (the BART rows repeat what the GPT-2 rows and prefix x T5 check for an encoder-decoder: in the slow tier, to
# keep `make test` near 10 minutes; test_reliability checks the stale-last.ckpt case prompt x BART found)
HARNESS = [(m, "gpt2") for m in METHOD_NAMES if m != "prefix"] + [("prefix", "t5")] + [
    pytest.param(m, "bart", marks=pytest.mark.slow) for m in METHOD_NAMES if m != "prefix"]


@pytest.mark.parametrize("method,family", HARNESS)
def test_every_method_trains_resumes_exactly_evaluates_and_exports(tmp_path, method, family):
    from prefixtuning.loading import load_trained
    from prefixtuning.evaluation import evaluate
    from prefixtuning.export import export_checkpoint

    from test_training import interrupted_run

    common = SMALL + [f"method={method}", f"backbone=tiny-{family}", "optim.epochs=2"]
    if family in ("bart", "t5"):
        common += ["data=e2e_sample", "optim.lr=1.0e-2", "data.batch_size=16"]
    full = train(compose_cfg(common, tmp_path / "full"))
    interrupted_run(compose_cfg(common, tmp_path / "part"))
    resumed = train(compose_cfg(common + ["ckpt_path=last"], tmp_path / "part"))
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4  # last.ckpt is the end of training in both
    model, _ = load_trained(tmp_path / "full" / "checkpoints" / "last.ckpt")
    trained = {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad} or None
    assert set(a["state_dict"]) == trained, "the checkpoint holds exactly the trained tensors"
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert resumed["val/loss"] == full["val/loss"] and full["method"] == method
    # evaluate.py's path on the checkpoint and on the export give the same numbers
    out = export_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt", tmp_path / "export")
    stem = "prefix" if method == "prefix" else "method"  # a prefix exports as the prefix bank's format
    assert out.name == f"{stem}.safetensors"
    meta = json.loads((tmp_path / "export" / f"{stem}.json").read_text())
    assert (meta["method"]["kind"] == method) if method != "prefix" else (meta["kind"] == "static")
    common_eval = ["split=dev", "max_inputs=2", "progress=false", "decoding=greedy", "decoding.max_new_tokens=5"]
    e1 = evaluate(compose_cfg([f"ckpt={tmp_path / 'full' / 'checkpoints' / 'last.ckpt'}", *common_eval],
                              tmp_path / "ev1", config_name="eval"))
    e2 = evaluate(compose_cfg([f"ckpt={tmp_path / 'export'}", *common_eval], tmp_path / "ev2", config_name="eval"))
    assert e1["reference_loss"] == e2["reference_loss"]
    assert (tmp_path / "ev1" / "predictions_dev.txt").read_text() == (tmp_path / "ev2" / "predictions_dev.txt").read_text()
    if family == "t5":  # beam search (5 beams, the paper's table-to-text decoding) from checkpoint and export
        beam = ["split=dev", "max_inputs=2", "progress=false", "decoding=table_to_text", "decoding.max_new_tokens=5"]
        evaluate(compose_cfg([f"ckpt={tmp_path / 'full' / 'checkpoints' / 'last.ckpt'}", *beam], tmp_path / "b1",
                             config_name="eval"))
        evaluate(compose_cfg([f"ckpt={tmp_path / 'export'}", *beam], tmp_path / "b2", config_name="eval"))
        lines = (tmp_path / "b1" / "predictions_dev.txt").read_text().splitlines()
        assert len(lines) == 2 and lines == (tmp_path / "b2" / "predictions_dev.txt").read_text().splitlines()


def test_prefix_bank_refuses_another_methods_export(tmp_path):
    from prefixtuning.artifacts import ExportError
    from prefixtuning.export import export_model
    from prefixtuning.serving import PrefixBank

    model, cfg = model_for("lora")
    from omegaconf import OmegaConf

    export_model(model, tmp_path / "lora", OmegaConf.to_container(cfg, resolve=True))
    with pytest.raises(ExportError, match="method=lora export, not a prefix: mixed-prefix batching"):
        PrefixBank(model.backbone).load("x", tmp_path / "lora")


def test_every_method_is_registered_with_a_config():
    from conftest import ROOT

    assert set(METHODS) == set(METHOD_NAMES) == {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}


def test_gate_probe_cli_writes_the_heatmap_and_csv(tmp_path):
    """`python -m prefixtuning.gates ckpt=... split=dev` as a user types it, on a trained APT checkpoint."""
    import csv
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from prefixtuning.loading import load_trained
    from prefixtuning.data.datamodule import PrefixDataModule
    from prefixtuning.gates import probe_gates

    train(compose_cfg(SMALL + ["prefix=apt", "optim.epochs=1"], tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "prefixtuning.gates", f"ckpt={ckpt}", "split=dev", "max_inputs=6",
                           "per_example=true", f"out={tmp_path / 'gates'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "gates" / "gates_dev.csv")))
    model, cfg = load_trained(ckpt)
    L, P = model.backbone.geometry.sites["decoder"].n_layers, model.prefix.length
    assert len(rows) == L * P and {r["n"] for r in rows} == {"6"}
    dm = PrefixDataModule(cfg.data, model.backbone.tokenizer, False)
    gates = probe_gates(model, [dm.featurizer.prompt_ids(g.source) for g in dm.eval_groups("dev")[:6]])
    for r in rows:
        assert abs(float(r["mean_gate"]) - gates[("decoder", int(r["layer"]))][:, int(r["token"])].mean().item()) < 1e-6
    assert (tmp_path / "gates" / "gates_dev.png").stat().st_size > 1000
    examples = [json.loads(l) for l in (tmp_path / "gates" / "gates_dev_examples.jsonl").read_text().splitlines()]
    assert [e["index"] for e in examples] == list(range(6))
    # a model without gates: a sentence, exit status 2
    train(compose_cfg(SMALL + ["optim.epochs=1"], tmp_path / "static"))
    proc = subprocess.run([sys.executable, "-m", "prefixtuning.gates",
                           f"ckpt={tmp_path / 'static' / 'checkpoints' / 'last.ckpt'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs an APT prefix (prefix=apt); this model has a static prefix" in proc.stderr

"""Quantized frozen backbones (backbone.quantization=int8|int4, torchao, weight-only).

The oracle: the same backbone with every quantized weight replaced by its dequantized float tensor (plain
nn.Linear, no quantized kernel). With a prefix, the quantized model's logits and the prefix's gradient equal
the oracle's within 1e-5 (float32; the kernels dequantize in another order); the quantization is real (the
full-precision model differs from both by far more); a prefix trained on the quantized base loads, as an
export and as a PEFT adapter, onto the full-precision base with the same tensors.
"""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import TEXTS, batch, compose_cfg, load_tiny
from prefixtuning.config_check import ConfigError
from prefixtuning.loading import load_prefix, load_trained
from prefixtuning.model import PrefixTuningModel
from prefixtuning.peft_interop import export_peft
from prefixtuning.prefixes import build_prefix
from prefixtuning.quantization import QuantizationError, dequantized_copy, is_quantized, targets
from prefixtuning.training import train

TOL = 1e-5


def _prefixed(bb, seed=0):
    torch.manual_seed(seed)
    return PrefixTuningModel(bb, build_prefix({"kind": "static", "length": 4}, bb.geometry), shift_positions=True)


def _logits_and_grad(m, ids, mask):
    m.zero_grad()
    logits = m(ids, mask).logits
    keep = mask[:, 1:].bool()  # next-token loss on the real tokens
    torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep]).backward()
    grads = [p.grad.detach().clone() for p in m.prefix.parameters()]
    return logits.detach()[mask.bool()], grads


def _assert_equals_oracle(quant, oracle, full):
    """With a prefix: the quantized model's logits and prefix gradients equal the dequantized-weight oracle's
    within TOL, the full-precision model differs by far more, and gradients reach the prefix."""
    ids, mask = batch(quant.tokenizer, TEXTS)
    a, ga = _logits_and_grad(_prefixed(quant), ids, mask)
    b, gb = _logits_and_grad(_prefixed(oracle), ids, mask)
    c, _ = _logits_and_grad(_prefixed(full), ids, mask)
    assert (a - b).abs().max().item() <= TOL
    assert (a - c).abs().max().item() > 100 * TOL  # the weights really are quantized
    for x, y in zip(ga, gb):  # gradients reach the prefix through the quantized projections
        assert x.abs().sum() > 0 and (x - y).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_quantized_backbone_with_a_prefix_equals_its_dequantized_weights(kind):
    quant = load_tiny("llama", quantization=kind)
    names = targets(quant.model)
    assert names and all(is_quantized(quant.model.get_submodule(n).weight) for n in names)
    assert quant.model.get_input_embeddings().weight.dtype == torch.float32  # embeddings / head stay float
    oracle = load_tiny("llama", quantization=kind)
    dequantized_copy(oracle.model)
    assert not any(is_quantized(oracle.model.get_submodule(n).weight) for n in names)
    _assert_equals_oracle(quant, oracle, load_tiny("llama"))


def test_quantization_refusals_name_the_reason(tmp_path):
    with pytest.raises(QuantizationError, match="tiny-gpt2 has no nn.Linear projection to quantize .*Conv1D"):
        load_tiny("gpt2", quantization="int8")
    for method in ("finetune", "finetune_top2"):
        with pytest.raises(ConfigError, match=f"method={method} trains the backbone's own weights, which "
                                              "backbone.quantization=int8 stores as frozen integers"):
            train(compose_cfg([f"method={method}", "backbone=tiny-llama", "backbone.quantization=int8"],
                              tmp_path / method))
        assert not (tmp_path / method).exists()
    with pytest.raises(ConfigError, match="backbone.quantization"):
        train(compose_cfg(["backbone=tiny-llama", "backbone.quantization=int3"], tmp_path / "x"))


def test_a_prefix_trained_on_a_quantized_base_loads_on_the_full_precision_base(tmp_path):
    from prefixtuning.export import export_checkpoint

    train(compose_cfg(["backbone=tiny-llama", "backbone.quantization=int8", "trainer=cpu", "optim.epochs=1",
                       "trainer.limit_train_batches=2", "test_after_training=false", "val_generation.enabled=false",
                       "validate_before_training=false", "logger=csv", "trainer.enable_progress_bar=false"],
                      tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trained, _ = load_trained(ckpt)  # rebuilt as trained: on the int8 base
    assert trained.backbone.quantization == "int8"
    export_checkpoint(str(ckpt), tmp_path / "export")
    full = load_tiny("llama")
    prefix, meta = load_prefix(tmp_path / "export", full)  # the identity is the model, not its storage
    for a, b in zip(prefix.key_values()["decoder"], trained.method.prefix.inference().key_values()["decoder"]):
        assert torch.equal(a, b.detach())
    # PEFT, on the full-precision base: the same logits as this project's model with that prefix
    export_peft(trained.method.prefix, trained.backbone, tmp_path / "peft")
    base = AutoModelForCausalLM.from_pretrained(full.model.name_or_path).eval()
    peft = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ours = PrefixTuningModel(full, prefix, shift_positions=True).eval()
    ids, mask = batch(full.tokenizer, TEXTS)
    with torch.no_grad():
        diff = (ours(ids, mask).logits - peft(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max().item() <= TOL


@pytest.mark.parametrize("method", ["prefix_apt", "prompt", "lora", "adapter"])
def test_every_method_that_adds_weights_trains_on_a_quantized_base(tmp_path, method):
    over = ["prefix=apt"] if method == "prefix_apt" else [f"method={method}"]
    metrics = train(compose_cfg(over + ["backbone=tiny-llama", "backbone.quantization=int8", "trainer=cpu",
                                        "optim.epochs=1", "trainer.limit_train_batches=2", "test_after_training=false",
                                        "val_generation.enabled=false", "logger=csv",
                                        "trainer.enable_progress_bar=false"], tmp_path))
    assert metrics["val/loss"] < metrics["val/loss_start"]  # the added weights learned through int8 projections
    model, _ = load_trained(tmp_path / "checkpoints" / "last.ckpt")
    assert model.backbone.quantization == "int8"
    added = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert added and all(p.dtype == torch.float32 for p in added)  # the trained tensors stay float32


# ------------------------------------------------------------------ bitsandbytes (quantization_backend=bitsandbytes)
def test_bitsandbytes_nf4_with_a_prefix_equals_its_dequantized_weights():
    """NF4 is weight-only: each matmul dequantizes the weight's blocks, so the dequantized-weight oracle is exact
    up to float order; the weights were loaded straight into 4-bit storage (no float copy held)."""
    from prefixtuning.quantization import quantized_modules

    quant = load_tiny("llama", quantization="int4", quantization_backend="bitsandbytes")
    assert quant.quantization_backend == "bitsandbytes"
    names = quantized_modules(quant.model)
    assert len(names) == len(targets(load_tiny("llama").model))  # every projection, not the LM head
    assert all(type(quant.model.get_submodule(n)).__name__ == "Linear4bit" for n in names)
    oracle = load_tiny("llama", quantization="int4", quantization_backend="bitsandbytes")
    dequantized_copy(oracle.model)
    assert not quantized_modules(oracle.model)
    _assert_equals_oracle(quant, oracle, load_tiny("llama"))


def test_bitsandbytes_int8_is_llm_int8_against_its_explicit_math():
    """LLM.int8 quantizes the activations too (float16, int8 per row), so the oracle is that explicit math, not
    the dequantized weight: on activations below the outlier threshold (6.0) the projection equals
    round(x * 127 / rowmax) @ CB^T * rowmax * SCB / 127^2 within 1e-4, while the weight-only product differs by
    far more. (Columns above the threshold take bitsandbytes' float16 path, not re-derived here.)"""
    quant = load_tiny("llama", quantization="int8", quantization_backend="bitsandbytes")
    m = quant.model.model.layers[0].mlp.down_proj
    assert type(m).__name__ == "Linear8bitLt" and m.weight.dtype == torch.int8
    cb = m.weight.data.float()
    scb = (m.weight.SCB if getattr(m.weight, "SCB", None) is not None else m.state.SCB).float()
    torch.manual_seed(0)
    x = torch.randn(5, cb.shape[1]).clamp(-5.5, 5.5)
    x16 = x.half().float()
    rowmax = x16.abs().amax(1, keepdim=True)
    explicit = (torch.round(x16 * 127 / rowmax) @ cb.T) * rowmax * scb[None, :] / 127**2
    y = m(x).float()
    assert (y - explicit).abs().max().item() <= 1e-4
    assert (y - x @ (cb * scb[:, None] / 127).T).abs().max().item() > 10 * 1e-4


def test_a_prefix_trains_on_a_bitsandbytes_base_and_loads_on_the_full_precision_base(tmp_path):
    from prefixtuning.export import export_checkpoint

    metrics = train(compose_cfg(["backbone=tiny-llama", "backbone.quantization=int4",
                                 "backbone.quantization_backend=bitsandbytes", "trainer=cpu", "optim.epochs=1",
                                 "trainer.limit_train_batches=2", "test_after_training=false",
                                 "val_generation.enabled=false", "logger=csv", "trainer.enable_progress_bar=false"],
                                tmp_path / "run"))
    assert metrics["val/loss"] < metrics["val/loss_start"]
    trained, _ = load_trained(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert (trained.backbone.quantization, trained.backbone.quantization_backend) == ("int4", "bitsandbytes")
    export_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt"), tmp_path / "export")
    prefix, _ = load_prefix(tmp_path / "export", load_tiny("llama"))
    for a, b in zip(prefix.key_values()["decoder"], trained.method.prefix.inference().key_values()["decoder"]):
        assert torch.equal(a, b.detach())


def test_an_absent_quantization_backend_is_named():
    from prefixtuning.quantization import resolve_backend

    assert resolve_backend("none", "bitsandbytes", on_cuda=True) == "none"
    assert resolve_backend("int8", "auto", on_cuda=False) == "torchao"
    with pytest.raises(QuantizationError, match="quantization_backend='gptq'"):
        resolve_backend("int8", "gptq", on_cuda=False)


def test_bitsandbytes_nf4_keeps_passing_gradients_after_an_eval_call_without_grad():
    """bitsandbytes 0.50 on an AVX512-BF16 CPU packs a Linear4bit's weight for an inference-only kernel the first
    time it runs in eval mode on an input without grad (q/k/v under a frozen backbone), and from then on passes no
    gradient (quantization.keep_differentiable). After loading, a projection called that way first still passes
    the gradient of a later input that requires it, as the NF4 matmul of its dequantized weight does."""
    from prefixtuning.quantization import dequantized_weight

    quant = load_tiny("llama", quantization="int4", quantization_backend="bitsandbytes")
    quant.model.eval()
    lin = next(m for m in quant.model.modules() if type(m).__name__ == "Linear4bit")
    torch.manual_seed(0)
    with torch.no_grad():
        lin(torch.randn(2, 3, lin.in_features))  # the call that would pack the weight
    x = torch.randn(2, 3, lin.in_features, requires_grad=True)
    lin(x).pow(2).sum().backward()
    assert x.grad is not None
    w = dequantized_weight(lin).float()
    xr = x.detach().clone().requires_grad_(True)
    (xr @ w.T).pow(2).sum().backward()
    assert (x.grad - xr.grad).abs().max().item() <= 1e-3 * xr.grad.abs().max().item()

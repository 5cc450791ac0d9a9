"""Every architecture family of the pinned transformers: exact under the oracle, or refused with one sentence
before any work (tests/architectures.py holds the families and the oracle). The support table in
docs/architectures.md is what these verdicts produce; `python tests/architectures.py --write` rewrites it."""

from __future__ import annotations

import re

import pytest
import torch

from architectures import FAMILIES, ROOT, TOL, V, Verdict, build, check, support_table
from prefixtuning.backbone import Backbone
from prefixtuning.model import TunedModel
from prefixtuning.prefixes.static import StaticPrefix

DOC = ROOT / "docs" / "architectures.md"


def documented() -> dict[str, str]:
    """family -> its row of the support table in docs/architectures.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| (\S+) \| (exact|refused) \|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def test_the_support_table_lists_every_family_and_no_failures():
    rows = documented()
    assert set(rows) == set(FAMILIES)
    assert len(FAMILIES) >= 30


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_exact_or_refused_as_documented(family):
    verdict = check(family)  # raises where a supported family deviates from the oracle by more than TOL
    assert verdict.status in ("exact", "refused")
    assert verdict.worst <= TOL
    row = support_table([Verdict(verdict.family, verdict.status, verdict.detail)]).splitlines()[-1]
    assert documented()[family] == row, "docs/architectures.md is out of date: python tests/architectures.py --write"


def test_a_refused_family_stops_train_py_with_its_sentence_before_any_work(tmp_path):
    """GPT-J does not route its attention through transformers' interface: train.py on it ends with the one
    sentence and exit status 1 when the backbone loads, before any training (the data files were checked
    first: seconds, where a backbone may take minutes to fetch)."""
    import subprocess
    import sys

    model = build("gptj")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    model.save_pretrained(tmp_path / "gptj")
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t2", pad_token="t0").save_pretrained(tmp_path / "gptj")
    run = subprocess.run([sys.executable, "train.py", f"backbone.name_or_path={tmp_path / 'gptj'}",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True)
    out = run.stdout + run.stderr
    assert run.returncode == 1
    assert "gptj: its attention does not go through transformers' attention interface" in out
    assert "Traceback" not in out
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_t5_encoder_prefix_bias_equals_the_explicit_computation():
    """T5's encoder is bidirectional, so no cache oracle reaches it: layer 0's self-attention output with a
    prefix equals softmax(q [Pk; K]^T + bias + mask) [Pv; V] computed here, where the bias of the prefix columns
    is the model's own compute_bias for keys at positions 0..P-1 and queries at P.. (the documented rule)."""
    model = build("t5")
    bb = Backbone(model, None, "tiny-random-t5")
    P, T = 3, 5
    prefix = StaticPrefix(bb.geometry, P, sites=["encoder"])
    prefix.reset_random(1.0)
    tuned = TunedModel(bb, prefix).eval()
    attn = model.encoder.block[0].layer[0].SelfAttention
    seen = {}
    def keep_output(module, args, kwargs, out):
        seen["out"] = out[0]

    def keep_input(module, args, kwargs):
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    h1 = attn.register_forward_hook(keep_output, with_kwargs=True)
    h2 = attn.register_forward_pre_hook(keep_input, with_kwargs=True)
    x = torch.randint(3, V, (1, T), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            tuned.method.activate(bb, torch.ones_like(x))
            model.encoder(input_ids=x, attention_mask=torch.ones_like(x))
            tuned.method.deactivate(bb)
    finally:
        h1.remove()
        h2.remove()
    h = seen["in"]
    g = bb.geometry.sites["encoder"]
    with torch.no_grad():
        q = attn.q(h).view(1, T, g.n_heads, g.head_dim).transpose(1, 2)
        k = attn.k(h).view(1, T, g.n_heads, g.head_dim).transpose(1, 2)
        v = attn.v(h).view(1, T, g.n_heads, g.head_dim).transpose(1, 2)
        pk, pv = prefix.keys["encoder"][0][None], prefix.values["encoder"][0][None]
        bias = attn.compute_bias(T, P + T, past_seen_tokens=P)  # queries at P.., keys at 0..P+T-1
        scores = q @ torch.cat([pk, k], 2).transpose(-1, -2) + bias  # T5 does not scale
        out = torch.softmax(scores, -1) @ torch.cat([pv, v], 2)
        want = attn.o(out.transpose(1, 2).reshape(1, T, -1))
    assert (seen["out"] - want).abs().max().item() <= 1e-5
    # and the bias matters: without it the output differs
    with torch.no_grad():
        plain = attn.o((torch.softmax(q @ torch.cat([pk, k], 2).transpose(-1, -2)
                                      + torch.cat([torch.zeros(1, g.n_heads, T, P), bias[..., P:]], -1), -1)
                        @ torch.cat([pv, v], 2)).transpose(1, 2).reshape(1, T, -1))
    assert (seen["out"] - plain).abs().max().item() > 1e-4


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_sliding_window_the_prefix_stays_visible(family):
    """The documented choice: a window shorter than prefix + input hides real keys as the model does, while
    the prefix stays visible to every query. With a window (6) at least as long as the input (5) but shorter
    than prefix + input (3 + 5), the prefixed model equals the same weights with no window at all, and
    differs from the plain model reading A + B through its window (where A falls out of view)."""
    windowed = build(family)
    windowed.config.sliding_window = 6
    if hasattr(windowed.config, "layer_types"):
        windowed.config.layer_types = ["sliding_attention"] * windowed.config.num_hidden_layers
    open_model = build(family)
    open_model.config.sliding_window = None if family == "mistral" else 10_000
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(3, V, (1, 3), generator=gen), torch.randint(3, V, (1, 5), generator=gen)
    logits = []
    for model in (windowed, open_model):
        bb = Backbone(model, None, family)
        prefix = StaticPrefix(bb.geometry, 3)
        prefix.reset_random(1.0)
        torch.manual_seed(0)
        prefix.reset_random(1.0)
        with torch.no_grad():
            logits.append(TunedModel(bb, prefix).eval()(b, torch.ones_like(b)).logits)
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-5
    with torch.no_grad():
        windowed_plain = windowed(input_ids=torch.cat([a, b], 1)).logits[:, 3:]
        open_plain = open_model(input_ids=torch.cat([a, b], 1)).logits[:, 3:]
    assert (windowed_plain - open_plain).abs().max().item() > 1e-4  # the window does hide A there

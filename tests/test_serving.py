"""Export and reload; the prefix bank: mixed-prefix batches equal rows run alone; bad input."""

import json

import pytest
import torch

from conftest import TEXTS, batch, compose_cfg, load_tiny
from prefixtuning.artifacts import ExportError
from prefixtuning.export import export_prefix
from prefixtuning.loading import load_prefix
from prefixtuning.model import PrefixTuningModel
from prefixtuning.prefixes import build_prefix
from prefixtuning.serving import PrefixBank, UnknownPrefix, serve_jsonl

SOURCES = [t.strip() for t in TEXTS] + ["name : Alimentum | area : riverside", "name : Cocum | food : Chinese"]


def _bank(family: str, apt: bool = True):
    """A bank with prefixes of different lengths and kinds, each a mild (input-dependent) prefix."""
    bb = load_tiny(family)
    torch.manual_seed(1)
    prefixes = {"p3": build_prefix({"kind": "static", "length": 3}, bb.geometry),
                "p6": build_prefix({"kind": "static", "length": 6}, bb.geometry),
                "r4": build_prefix({"kind": "reparam", "length": 4, "mid_dim": 16}, bb.geometry)}
    if apt:
        prefixes["g5"] = build_prefix({"kind": "apt", "length": 5, "gate_init_std": 0.5}, bb.geometry)
    bank = PrefixBank(bb)
    for name, p in prefixes.items():
        if hasattr(p, "reset_random"):
            p.reset_random(0.3)
        bank.add(name, p)
    return bank


def _alone(bank, text, pid, **kw):
    """The same request through the single-prefix path (PrefixTuningModel), or the plain backbone."""
    bb = bank.backbone
    f = bank.featurizer
    ids = torch.tensor([f.prompt_ids(text)])
    mask = torch.ones_like(ids)
    if pid is None:
        bb.injector.deactivate()
        out = bb.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=bb.tokenizer.pad_token_id, **kw)
        out = out if bb.is_encoder_decoder else out[:, ids.shape[1]:]
    else:
        e = bank.entries[pid]
        out = PrefixTuningModel(bb, e.prefix, e.shift_positions).generate(
            ids, mask, pad_token_id=bb.tokenizer.pad_token_id, **kw)
    return bb.tokenizer.decode(out[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("family", ["gpt2", "bart"])
@pytest.mark.parametrize("beams", [1, 5])
def test_mixed_batch_equals_each_row_alone(family, beams):
    bank = _bank(family)
    ids = ["p3", None, "g5", "p6", "r4"]
    kw = dict(max_new_tokens=10, min_new_tokens=3, num_beams=beams, do_sample=False)
    mixed = bank.generate(SOURCES, ids, **kw)
    alone = [_alone(bank, s, p, **kw) for s, p in zip(SOURCES, ids)]
    assert mixed == alone
    assert len(set(mixed)) > 1 or family == "bart"


def test_mixed_logits_equal_alone_and_plain_rows():
    bank = _bank("gpt2")
    ids = ["p6", None, "g5", "p3", None]
    logits, mask = bank.logits(SOURCES, ids)
    bb = bank.backbone
    for row, (s, pid) in enumerate(zip(SOURCES, ids)):
        single, m1 = bank.logits([s], [pid])
        n = int(m1.sum())
        torch.testing.assert_close(logits[row, -n:], single[0, -n:], rtol=0, atol=1e-5)
        if pid is None:
            bb.injector.deactivate()
            x = torch.tensor([bank.featurizer.prompt_ids(s)])
            with torch.no_grad():
                plain = bb.model(input_ids=x).logits
            torch.testing.assert_close(logits[row, -n:], plain[0], rtol=0, atol=1e-5)


def test_export_reload_gives_identical_logits_to_the_checkpoint(tmp_path):
    from prefixtuning.loading import load_trained
    from prefixtuning.export import export_checkpoint
    from prefixtuning.training import train

    cfg = compose_cfg(["trainer=cpu", "trainer.enable_progress_bar=false", "prefix=reparam", "prefix.mid_dim=32",
                       "data.max_train_examples=32", "optim.epochs=1", "test_after_training=false",
                       "val_generation.enabled=false", "validate_before_training=false"], tmp_path / "run")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path = export_checkpoint(ckpt, tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "prefix.json").read_text())
    assert meta["kind"] == "static" and meta["trained_kind"] == "reparam" and meta["backbone"] == "tiny-gpt2"
    model, _ = load_trained(ckpt)
    prefix, _ = load_prefix(tmp_path / "export", model.backbone)
    assert not any("mlp" in n for n in prefix.state_dict())
    ids, mask = batch(model.backbone.tokenizer, TEXTS)
    with torch.no_grad():
        a = model(ids, mask).logits
        b = PrefixTuningModel(model.backbone, prefix, meta["shift_positions"])(ids, mask).logits
    assert torch.equal(a, b)
    # size: exactly the key/value tensors plus the safetensors header
    n = sum(t.numel() for t in prefix.state_dict().values())
    assert n * 4 < path.stat().st_size < n * 4 + 4096
    # evaluate.py takes the export directory too, and decodes the same outputs as the checkpoint
    from prefixtuning.evaluation import evaluate

    common = ["split=test", "progress=false", "max_inputs=4"]
    a = evaluate(compose_cfg([f"ckpt={ckpt}", *common], tmp_path / "ev_ckpt", config_name="eval"))
    b = evaluate(compose_cfg([f"ckpt={tmp_path / 'export'}", *common], tmp_path / "ev_export", config_name="eval"))
    assert (tmp_path / "ev_ckpt" / "predictions_test.txt").read_text() == (
        tmp_path / "ev_export" / "predictions_test.txt").read_text()
    assert a["BLEU"] == b["BLEU"]


def test_serving_cli(tmp_path, capsys):
    from prefixtuning.serving import main

    bb = load_tiny("gpt2")
    torch.manual_seed(0)
    export_prefix(build_prefix({"kind": "static", "length": 3}, bb.geometry), bb, tmp_path / "a")
    reqs = tmp_path / "r.jsonl"
    reqs.write_text(json.dumps({"prefix": "a", "input": SOURCES[0]}) + "\n" + json.dumps({"input": SOURCES[1]}))
    assert main(["--backbone", "tiny-gpt2", "--prefix", f"a={tmp_path / 'a'}", "--prefix", f"b={tmp_path / 'nope'}",
                 "--input", str(reqs), "--output", str(tmp_path / "o.jsonl"), "--num-beams", "2",
                 "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "prefix 'b' not loaded" in captured.err and json.loads(captured.out.splitlines()[-1])["served"] == 2
    out = [json.loads(l) for l in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [o["prefix"] for o in out] == ["a", None] and all(isinstance(o["output"], str) for o in out)


def test_export_roundtrip_keeps_apt_gates(tmp_path):
    bb = load_tiny("gpt2")
    torch.manual_seed(0)
    apt = build_prefix({"kind": "apt", "length": 4, "gate_init_std": 0.5}, bb.geometry)
    export_prefix(apt, bb, tmp_path)
    loaded, meta = load_prefix(tmp_path, bb)
    assert meta["kind"] == "apt"
    for k, v in apt.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_bad_exports_and_ids_fail_with_a_sentence_and_the_bank_keeps_serving(tmp_path):
    gpt2, llama = load_tiny("gpt2"), load_tiny("llama")
    torch.manual_seed(0)
    export_prefix(build_prefix({"kind": "static", "length": 3}, gpt2.geometry), gpt2, tmp_path / "good")
    with pytest.raises(ExportError, match=r"good was trained with backbone 'tiny-gpt2', but this model has 'tiny-llama'"):
        load_prefix(tmp_path / "good", llama)
    # same id, other geometry: the sentence names the geometry
    meta = json.loads((tmp_path / "good" / "prefix.json").read_text())
    meta["geometry"]["sites"]["decoder"]["n_layers"] = 24
    (tmp_path / "bad_geo").mkdir()
    (tmp_path / "bad_geo" / "prefix.json").write_text(json.dumps(meta))
    (tmp_path / "bad_geo" / "prefix.safetensors").write_bytes((tmp_path / "good" / "prefix.safetensors").read_bytes())
    with pytest.raises(ExportError, match=r"bad_geo was trained with geometry .*'n_layers': 24.* but this model has .*'n_layers': 2"):
        load_prefix(tmp_path / "bad_geo", gpt2)
    # truncated weights
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "prefix.json").write_text((tmp_path / "good" / "prefix.json").read_text())
    data = (tmp_path / "good" / "prefix.safetensors").read_bytes()
    (tmp_path / "trunc" / "prefix.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"trunc/prefix.safetensors is not a readable safetensors file"):
        load_prefix(tmp_path / "trunc", gpt2)

    bank = PrefixBank(gpt2)
    bank.load("good", tmp_path / "good")
    with pytest.raises(UnknownPrefix, match=r"unknown prefix id 'nobody'; the bank has \['good'\]"):
        bank.generate(["x"], ["nobody"], max_new_tokens=2)
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text("\n".join(json.dumps(r) for r in [
        {"prefix": "good", "input": SOURCES[0]}, {"prefix": "nobody", "input": SOURCES[1]},
        {"prefix": None, "input": SOURCES[2]}, {"input": 3}]) + "\n")
    stats = serve_jsonl(bank, reqs, tmp_path / "out.jsonl", max_new_tokens=5, num_beams=2)
    out = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert stats == {"served": 2, "errors": 2} and len(out) == 4
    assert out[0]["output"] == bank.generate([SOURCES[0]], ["good"], max_new_tokens=5, num_beams=2)[0]
    assert "unknown prefix id 'nobody'" in out[1]["error"] and "reqs.jsonl, line 2" in out[1]["error"]
    assert "output" in out[2] and "line 4" in out[3]["error"]


def test_serving_cli_answers_every_line_of_a_mixed_file(tmp_path):
    """Valid and invalid requests in one file, through the CLI as a user runs it: each line gets its own
    answer, in order; a request longer than the model's positions no longer takes the others down."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    gpt2 = load_tiny("gpt2")
    torch.manual_seed(0)
    prefix = build_prefix({"kind": "static", "length": 4}, gpt2.geometry)
    from prefixtuning.export import export_prefix
    export_prefix(prefix, gpt2, tmp_path / "a")
    too_long = " ".join(["name : The Vaults"] * 400)  # > 1024 positions of the tiny backbone
    lines = [json.dumps({"prefix": "a", "input": SOURCES[0]}),
             json.dumps({"prefix": "a", "input": too_long}),
             json.dumps({"prefix": "a", "input": ""}),
             json.dumps({"prefix": "a", "input": ["not", "text"]}),
             json.dumps({"prefix": 7, "input": SOURCES[1]}),
             json.dumps({"prefix": "nobody", "input": SOURCES[1]}),
             "{not json",
             json.dumps(["a list"]),
             json.dumps({"prefix": None, "input": SOURCES[2]})]
    reqs = tmp_path / "reqs.jsonl"
    lines.append('{"prefix": "a", "input": "lone \\ud800 surrogate"}')  # valid JSON, unencodable text
    reqs.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prefix": "a", "input": "caf\xff"}\n')
    out_path = tmp_path / "out.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "prefixtuning.serving", "--backbone", "tiny-gpt2",
                           "--prefix", f"a={tmp_path / 'a'}", "--input", str(reqs), "--output", str(out_path),
                           "--max-new-tokens", "4", "--num-beams", "2", "--batch-size", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["served"] + summary["errors"] == 11 and summary["errors"] >= 8
    out = [json.loads(l) for l in out_path.read_text().splitlines()]
    assert [r["line"] for r in out] == list(range(1, 12))  # every line answered, the surrogate one included
    assert "output" in out[0] and "output" in out[8] and ("output" in out[9] or "error" in out[9])
    expect = {2: "positions", 3: "'input' is empty", 4: "'input' must be a string", 5: "'prefix' must be a string",
              6: "unknown prefix id 'nobody'", 7: "not JSON", 8: "expected a JSON object", 11: "not UTF-8"}
    for line, words in expect.items():
        assert words in out[line - 1]["error"] and f"line {line}" in out[line - 1]["error"], out[line - 1]


def test_serving_writes_as_it_goes_so_a_crash_keeps_the_served_lines(tmp_path, monkeypatch):
    gpt2 = load_tiny("gpt2")
    bank = PrefixBank(gpt2)
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text("\n".join(json.dumps({"prefix": None, "input": s}) for s in SOURCES * 2) + "\n")
    real = bank.generate
    calls = {"n": 0}

    def crash_on_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SystemExit("the process dies")
        return real(*a, **k)

    monkeypatch.setattr(bank, "generate", crash_on_second_batch)
    with pytest.raises(SystemExit):
        serve_jsonl(bank, reqs, tmp_path / "out.jsonl", batch_size=len(SOURCES), max_new_tokens=3)
    done = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["line"] for r in done] == list(range(1, len(SOURCES) + 1)) and all("output" in r for r in done)

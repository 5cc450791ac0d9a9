"""trainer=fsdp: the frozen backbone sharded with FSDP2 through Lightning's ModelParallelStrategy.

In-process (one gloo process, the default tier): a sharded model's loss, prefix gradients and greedy generation
equal the unsharded model's; the trainable state goes out of and back into the shards unchanged; the
data-parallel sampler gives the ranks exactly one process's global batches.

Through `train.py` as a user types it (two CPU processes over gloo; slow tier): an FSDP run with 2 x 4 examples
per step equals one process with 8 (losses, validation loss, prefix, test predictions), each rank holding about
half of the backbone's weights; an FSDP run stopped after its first epoch and continued from its checkpoint
equals the uninterrupted one bit for bit, and a single-process checkpoint continues under FSDP.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TEXTS, batch, make_model

# float32 sums over two processes are added in another order than in one process: a few ulps of difference
LOSS_RTOL = 1e-6
PREFIX_ATOL = 1e-6


@pytest.fixture
def one_process_group():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_sharded_model_equals_the_unsharded_one(family, one_process_group):
    from prefixtuning.sharding import (full_trainable_state, gathered_method_tensors, is_sharded,
                                       load_trainable_state, shard_model)

    plain, sharded = make_model(family, length=3), make_model(family, length=3)
    sharded.load_state_dict(plain.state_dict())
    report = shard_model(sharded, one_process_group)
    assert is_sharded(sharded) and report["world"] == 1
    assert report["backbone_mib_per_rank"] == pytest.approx(report["backbone_mib"])
    ids, mask = batch(plain.backbone.tokenizer, TEXTS)
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for m in (plain, sharded):
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        losses.append(out.loss.detach())
        assert int(out.loss_tokens) == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(losses[0], losses[1], rtol=LOSS_RTOL, atol=0)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    sgrads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.requires_grad}
    assert grads.keys() == sgrads.keys() and grads
    for n in grads:
        assert torch.allclose(grads[n], sgrads[n], atol=1e-6, rtol=1e-5), n
    ids, mask = batch(plain.backbone.tokenizer, TEXTS[:2], side="left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=plain.backbone.tokenizer.pad_token_id)
    assert torch.equal(plain.generate(ids, mask, **kw), sharded.generate(ids, mask, **kw))
    with gathered_method_tensors(sharded) as distributed:
        assert distributed is False  # one process: generate adds no synchronisation
    # the trainable state leaves the shards and goes back into them unchanged
    state = full_trainable_state(sharded)
    assert state.keys() == {n for n, p in plain.named_parameters() if p.requires_grad}
    for n, t in state.items():
        assert torch.equal(t, dict(plain.named_parameters())[n].detach()), n
    load_trainable_state(sharded, {n: t + 1 for n, t in state.items()})
    assert all(torch.equal(full_trainable_state(sharded)[n], t + 1) for n, t in state.items())


def test_a_backbone_without_block_classes_is_refused():
    from torch import nn

    from prefixtuning.sharding import ShardingError, transformer_blocks

    with pytest.raises(ShardingError, match="declares no transformer block classes.*trainer=ddp"):
        transformer_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_the_ranks_batches_together_are_one_process_batches():
    from prefixtuning.data.datamodule import EpochSeededSampler, ShardedEpochSampler

    n, b, world = 37, 4, 2
    for epoch in (0, 3):
        single = EpochSeededSampler(n, seed=5)
        single.set_epoch(epoch)
        order = list(single)
        ranks = [ShardedEpochSampler(n, 5, r, world) for r in range(world)]
        for s in ranks:
            s.set_epoch(epoch)
        shares = [list(s) for s in ranks]
        assert all(len(sh) == len(r) == 19 for sh, r in zip(shares, ranks))
        for k in range(n // (b * world)):  # the full global batches
            together = sorted(i for sh in shares for i in sh[k * b:(k + 1) * b])
            assert together == sorted(order[k * b * world:(k + 1) * b * world])
        padded = [i for pair in zip(*shares) for i in pair]
        assert padded[:n] == order and padded[n:] == order[:1]  # padded with the epoch's first example


def test_fsdp_with_a_quantized_backbone_is_refused(tmp_path):
    from conftest import compose_cfg

    from prefixtuning.config_check import ConfigError, check_train_config

    cfg = compose_cfg(["trainer=fsdp", "backbone.quantization=int8"], tmp_path)
    with pytest.raises(ConfigError, match="trainer=fsdp with backbone.quantization=int8"):
        check_train_config(cfg)


# ------------------------------------------------------------------ train.py, two processes
RUN = ["backbone=tiny-gpt2", "backbone.dropout=0.0", "optim.schedule=constant", "trainer.limit_train_batches=3",
       "trainer.limit_val_batches=2", "val_generation.enabled=false", "trainer.log_every_n_steps=1",
       "trainer.enable_progress_bar=false", "test_max_inputs=6", "decoding.batch_size=3",
       "decoding.max_new_tokens=8"]
SINGLE = ["trainer=cpu", "data.batch_size=8", "data.eval_batch_size=8"]
FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=4", "data.eval_batch_size=4"]


def train_py(args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PREFIXTUNING_FAULT", None)
    r = subprocess.run([sys.executable, "train.py", *RUN, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(run: Path) -> list:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r.get("train/loss") if r["stage"] == "train" else r.get("val/loss"))
            for r in rows]


def prefix(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_close_runs(a: Path, b: Path, exact: bool = False) -> None:
    la, lb = losses(a), losses(b)
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    for (_, step, x), (_, _, y) in zip(la, lb):
        assert (x == y) if exact else abs(x - y) <= LOSS_RTOL * abs(x), (step, x, y)
    pa, pb = prefix(a), prefix(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]) if exact else torch.allclose(pa[k], pb[k], atol=PREFIX_ATOL, rtol=0), k


@pytest.mark.slow
def test_fsdp_on_two_processes_equals_one_process_with_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "fsdp"
    train_py([*SINGLE, "optim.epochs=2", f"hydra.run.dir={one}"])
    r = train_py([*FSDP, "optim.epochs=2", f"hydra.run.dir={two}"])
    assert "[fsdp] 4 units over 2 processes" in r.stdout
    assert_close_runs(one, two)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["val/loss"] == pytest.approx(m1["val/loss"], rel=LOSS_RTOL)
    # the test decode ran on both ranks of the sharded model; rank 0 wrote the same predictions
    assert (two / "predictions_test.txt").read_text() == (one / "predictions_test.txt").read_text()
    assert m2["test/BLEU"] == m1["test/BLEU"] and m2["test/inputs"] == 6
    # each rank held half of the frozen weights (dim-0 shards: at most one row more than half)
    fs = m2["fsdp"]
    assert fs["world"] == 2 and 0.5 * fs["backbone_mib"] <= fs["backbone_mib_per_rank"] <= 0.52 * fs["backbone_mib"]
    # the checkpoint holds the trainable tensors only, in a single process's layout: it loads anywhere
    ck = torch.load(two / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ck["state_dict"]) == {"model.method.prefix.keys.decoder", "model.method.prefix.values.decoder"}
    assert sorted(ck["optimizer_states"][0]["state"]) == [0, 1]


@pytest.mark.slow
def test_an_fsdp_run_continued_from_its_checkpoint_equals_the_uninterrupted_run(tmp_path):
    whole, cont, moved = tmp_path / "whole", tmp_path / "continued", tmp_path / "from_single"
    train_py([*FSDP, "optim.epochs=2", f"hydra.run.dir={whole}"])
    train_py([*FSDP, "optim.epochs=1", "test_after_training=false", f"hydra.run.dir={cont}"])
    # the same command continued for one more epoch from the FSDP checkpoint (constant lr: the schedule does
    # not depend on the number of epochs)
    train_py([*FSDP, "optim.epochs=2", "test_after_training=true", f"hydra.run.dir={cont}", "ckpt_path=last",
              "resume_allow_changes=true"])
    assert_close_runs(whole, cont, exact=True)
    assert (cont / "predictions_test.txt").read_text() == (whole / "predictions_test.txt").read_text()
    # a single-process checkpoint (8 examples a step) continued under FSDP (2 x 4)
    train_py([*SINGLE, "optim.epochs=1", "test_after_training=false", f"hydra.run.dir={moved}"])
    train_py([*FSDP, "optim.epochs=2", f"hydra.run.dir={moved}", "ckpt_path=last", "resume_allow_changes=true"])
    assert_close_runs(whole, moved)

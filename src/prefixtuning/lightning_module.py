"""LightningModule owning the frozen backbone and the training method (a prefix by default)."""

from __future__ import annotations

import random

import lightning as L
import torch
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from .errors import UserError
from .artifacts import IdentityMismatch, check_checkpoint, trainable_keys  # noqa: F401 (re-exported)
from .model import PrefixTuningModel
from .sharding import CHECKED_BY_STRATEGY, PrefixFSDPStrategy, is_sharded, shard_model

BACKBONE_KEY = "model.backbone."
# optim.schedule: after `warmup_steps` of linear warm-up, decay linearly to 0 at the last step (the paper's),
# or keep the learning rate constant
SCHEDULES = ("linear", "constant")


# A checkpoint of another backbone, geometry or method (the one identity error of artifacts.py).
CheckpointMismatch = IdentityMismatch


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a NaN or an infinity; raised at once, so no checkpoint holds garbage."""


class PrefixTuningModule(L.LightningModule):
    """Training: loss on target tokens only (the collator masks the source with -100), AdamW over the
    trainable parameters with the `optim/` group's settings (linear warm-up, then linear decay to 0 as the
    paper, or a constant rate). Checkpoints hold the trainable tensors only; the backbone is named (id +
    geometry) and checked on load."""

    def __init__(self, model: PrefixTuningModel, optim: dict, run_config: dict | None = None):
        super().__init__()
        self.model = model
        self.optim = dict(optim)
        self.run_config = run_config or {}
        self._val_sums: torch.Tensor | None = None  # (sum of token losses, number of tokens)
        self.shard_report: dict | None = None  # trainer=fsdp: what each rank holds (sharding.shard_model)
        self.strict_loading = False  # backbone tensors are absent from checkpoints by design; checked below
        # from_pretrained returns the backbone in eval mode and Lightning keeps each module's mode, so switch
        # it on here: the backbone's dropout (backbone.dropout) and gradient checkpointing act in training.
        self.train()

    # ---------------------------------------------------------------- steps
    def forward(self, batch):
        return self.model(**batch)

    def configure_model(self):
        """trainer=fsdp: shard the backbone (sharding.py) once the processes are up; a no-op otherwise."""
        if isinstance(self._trainer and self.trainer.strategy, PrefixFSDPStrategy) and not is_sharded(self.model):
            self.shard_report = shard_model(self.model, self.device_mesh["data_parallel"])
            if self.global_rank == 0:
                r = self.shard_report
                print(f"[fsdp] {r['units']} units over {r['world']} processes: each holds "
                      f"{r['backbone_mib_per_rank']:.1f} MiB of the backbone's {r['backbone_mib']:.1f} MiB of weights",
                      flush=True)

    def training_step(self, batch, batch_idx):
        out = self(batch)
        loss = logged = out.loss
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            loss, logged = self._global_token_mean(loss, out.loss_tokens, world)
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"train/loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}, batch "
                f"{batch_idx} of the epoch, {batch['input_ids'].shape[0]} examples); training stopped before "
                f"this step's update, the last checkpoint is untouched. {self._overflow_hint()}")
        self.log("train/loss", logged, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _global_token_mean(self, loss, n_local, world: int):
        """With data parallelism each rank's loss is a mean over its own target tokens and the gradients are
        averaged over ranks: a mean of means, which weights a rank's tokens by how few it has. Rescaled here so
        the averaged gradient is the gradient of the mean over all ranks' target tokens, the loss of one process
        taking the whole global batch (exactly: tests/test_sharding.py). Returns (that loss, the global batch's
        loss to log)."""
        n_local = n_local.to(torch.float64)
        both = torch.stack([loss.detach().double() * n_local, n_local])
        both = self.trainer.strategy.reduce(both, reduce_op="sum")
        logged = (both[0] / both[1].clamp(min=1)).to(loss.dtype)
        return loss * (n_local * world / both[1].clamp(min=1)).to(loss.dtype), logged

    def on_train_batch_end(self, outputs, batch, batch_idx):
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(
                f"the update of step {self.global_step - 1} (epoch {self.current_epoch}, batch {batch_idx} of the "
                f"epoch) made {len(bad)} trainable tensors non-finite ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): the optimizer overflowed. {self._overflow_hint()}")

    def learning_rate(self) -> float:
        """optim.lr x optim.lr_scale."""
        return float(self.optim["lr"]) * float(self.optim.get("lr_scale", 1.0))

    def _overflow_hint(self) -> str:
        clip = self.trainer.gradient_clip_val if self._trainer is not None else None
        return (f"The settings that drive the update: optim.lr={self.optim['lr']} x "
                f"optim.lr_scale={self.optim.get('lr_scale', 1.0)}, "
                f"optim.gradient_clip_val={clip}, trainer.precision="
                f"{self.trainer.precision if self._trainer is not None else '?'}; lower optim.lr or set "
                f"optim.gradient_clip_val=1.0, then resume from the last checkpoint or start again.")

    def on_validation_epoch_start(self):
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        self._val_sums = torch.zeros(2, dtype=dtype, device=self.device)

    def validation_step(self, batch, batch_idx):
        loss = self(batch).loss
        n_tokens = (batch["labels"] != -100).sum()
        # token-weighted mean over the whole split (not a mean of batch means)
        self._val_sums += torch.stack([loss.detach() * n_tokens, n_tokens.to(loss.dtype)]).to(self._val_sums.dtype)

    def on_validation_epoch_end(self):
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")  # over DDP ranks
        # already summed over ranks, so every rank logs the same value
        self.log("val/loss", (sums[0] / sums[1].clamp(min=1)).float(), prog_bar=True, sync_dist=True)

    # ---------------------------------------------------------------- optimization
    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate(),
                                weight_decay=self.optim.get("weight_decay", 0.0),
                                betas=tuple(self.optim.get("betas", (0.9, 0.999))),
                                eps=self.optim.get("eps", 1e-8))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(self.optim.get("warmup_steps", 0))
        schedule = self.optim.get("schedule", "linear")
        if schedule == "linear":
            sched = get_linear_schedule_with_warmup(opt, warmup, total)
        elif schedule == "constant":
            sched = get_constant_schedule_with_warmup(opt, warmup)
        else:
            raise ValueError(f"optim.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints
    def identity(self) -> dict:
        return self.model.identity()

    def on_save_checkpoint(self, checkpoint):
        keep = trainable_keys(self)  # the prefix; all weights for finetune; adapters / LoRA / prompt vectors
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        bad = [k for k, v in checkpoint["state_dict"].items()
               if torch.is_floating_point(v) and not torch.isfinite(v).all()]
        if bad:  # whatever path led here, a checkpoint never holds NaN or inf
            raise NonFiniteError(f"refusing to write a checkpoint at step {checkpoint.get('global_step')}: "
                                 f"{', '.join(bad[:3])} hold non-finite values")
        checkpoint["prefixtuning"] = {**self.identity(), "config": self.run_config}
        # Dropout in the backbone draws from these: restoring them makes a resumed run equal an
        # uninterrupted one (Lightning does not save them). Under DDP this is rank 0's state.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint):
        if "state_dict" in checkpoint or not checkpoint.get(CHECKED_BY_STRATEGY):
            check_checkpoint(checkpoint, self)  # (trainer=fsdp checks before its strategy loads the tensors)
        rng = checkpoint.get("rng_states")
        progress = (checkpoint.get("loops") or {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        if rng and progress.get("current", {}).get("completed", 0) > 0 and not progress.get("is_last_batch", True):
            # a mid-epoch checkpoint: the uninterrupted run went on from this state to the next batch, but a
            # resumed one first creates the epoch's data iterator, which draws a seed from the same generator;
            # the state is put back right before that next batch instead
            self._pending_rng = rng
        elif rng:
            _set_rng(rng)

    def on_train_batch_start(self, batch, batch_idx):
        if getattr(self, "_pending_rng", None) is not None:
            _set_rng(self._pending_rng)
            self._pending_rng = None


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x

"""LightningDataModule: a dataset family from the registry, tokenized for the backbone."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from pathlib import Path

from .base import DATASETS, DataError, group_references
from .features import Collator, Featurizer
from .subsets import filter_by_category, lowres_subsample, write_pairs


class EpochSeededSampler(Sampler[int]):
    """Random order that depends only on (seed, epoch), so a run resumed at an epoch boundary sees the
    same order as an uninterrupted one. Lightning calls `set_epoch` (and swaps in a DistributedSampler
    under DDP, which has the same property).

    A run resumed from a mid-epoch checkpoint (written when a signal stopped it between two batches) passes
    `resume=(epoch, k)`: that epoch's order is the same and its first k indices, the examples already trained
    on, are skipped once. `len` stays the epoch's full length, as Lightning counts the batches already done."""

    def __init__(self, n: int, seed: int, resume: tuple[int, int] | None = None):
        self.n, self.seed, self.epoch = n, seed, 0
        self.resume = resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.resume is not None and self.resume[0] == self.epoch:
            order = order[self.resume[1]:]
        self.resume = None
        return iter(order)

    def __len__(self) -> int:
        return self.n


class ShardedEpochSampler(DistributedSampler):
    """The data-parallel share of EpochSeededSampler's order: rank r takes positions r, r + world, ... of the
    epoch's order (the order padded at its end with its first examples to a multiple of the world size, as
    PyTorch's DistributedSampler pads). So the ranks' k-th batches of b examples together are the k-th batch of
    b x world examples of a single process with the same seed: DDP and FSDP runs train on the same global
    batches as one process (Lightning's own wrapper would shuffle the order a second time)."""

    def __init__(self, n: int, seed: int, rank: int, world: int):
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=False, seed=seed)
        self.order = EpochSeededSampler(n, seed)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.order.set_epoch(epoch)

    def __iter__(self):
        order = list(self.order)
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        return iter(order[self.rank:self.total_size:self.num_replicas])


def build_dataset(cfg):
    name = cfg.name
    if name not in DATASETS:
        raise DataError(f"data.name={name!r} is not a known dataset; choose one of {', '.join(sorted(DATASETS))}")
    files = dict(cfg.files) if cfg.get("files") else None
    return DATASETS[name](data_dir=cfg.get("data_dir"), files=files)


def missing_files(dataset, splits) -> list[Path]:
    """The files of `splits` that are absent (an XML folder without XML files counts as absent)."""
    return [p for p in dataset.needed_files(splits)
            if not (p.is_file() or (p.is_dir() and any(p.glob("**/*.xml"))))]


def preflight_data(cfg, splits, root: str | Path | None = None):
    """Before any model is built: every file the run reads exists and parses. A missing file is named with the
    command that fetches it. Returns the dataset (its parsed splits cached) for the data module."""
    dataset = build_dataset(cfg)
    missing = missing_files(dataset, splits)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        where = f" into {root}" if root else ""
        raise DataError(f"data={cfg.name}: {missing[0]} does not exist{more}. Fetch the official files{where} with "
                        f"`python -m prefixtuning.data download {cfg.name}` (or add data.download=true), or point "
                        f"data.data_dir or $PREFIXTUNING_DATA at a copy (docs/data.md)"
                        + ("; XSUM's articles come from the hub: data.files.hub=true reads them there"
                           if cfg.name == "xsum" else ""))
    for split in splits:  # parsed now: a malformed file stops the run here (training splits as pairs, the
        dataset.pairs(split) if split in ("train", "dev") else dataset.eval_groups(split)  # others as eval inputs)
    return dataset


class PrefixDataModule(L.LightningDataModule):
    """Tokenized splits of one dataset, with optional low-resource subsampling (`lowres`, the `lowres/`
    group) and category split (`split`, the `extrapolation/` group); the subsampled examples are written
    to `output_dir`."""

    def __init__(self, cfg, tokenizer, is_encoder_decoder: bool, seed: int = 0, lowres=None, split=None,
                 output_dir: str | Path | None = None, dataset=None):
        super().__init__()
        self.cfg = cfg
        self.dataset = dataset if dataset is not None else build_dataset(cfg)  # preflight_data's, already read
        self.featurizer = Featurizer(tokenizer, is_encoder_decoder, max_source_tokens=cfg.get("max_source_tokens"))
        self.collate = Collator(self.featurizer.pad_id, is_encoder_decoder)
        self.seed = seed
        self.lowres = lowres if lowres is not None and lowres.get("enabled") else None
        self.split_cfg = split if split is not None and split.get("name", "none") != "none" else None
        self.output_dir = Path(output_dir) if output_dir else None
        self.splits: dict[str, list[dict]] = {}
        self._lowres_pairs: dict | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, examples done) of a mid-epoch checkpoint

    # ---- mid-epoch resume: the checkpoint records how far into the epoch the run was
    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        # the epoch's own length (trainer.limit_train_batches counts), not the data's number of batches
        return {"epoch": trainer.current_epoch, "batch_size": int(self.cfg.batch_size), "batches_done": done,
                "epoch_finished": bool(done >= trainer.num_training_batches)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = None
        done, bs = int(state.get("batches_done", 0)), int(state.get("batch_size", self.cfg.batch_size))
        n_batches = -(-len(self.features("train")) // bs)
        if state.get("epoch_finished") or not 0 < done < n_batches:
            return  # an epoch-end checkpoint: the next epoch starts from its beginning
        if bs != int(self.cfg.batch_size):
            raise DataError(f"the checkpoint stopped after {done} batches of {bs} examples, but data.batch_size is "
                            f"now {self.cfg.batch_size}: resume with the run's own batch size")
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1:
            raise DataError("a mid-epoch checkpoint cannot be resumed with several processes (each rank's share of "
                            "the epoch would shift); this project writes mid-epoch checkpoints only for one process")
        self._resume = (int(state["epoch"]), done * bs)

    def _categories(self, split: str):
        if self.split_cfg is None:
            return None
        return self.split_cfg.get("test") if split == "test" else self.split_cfg.get("train")

    def _filtered(self, items, split):
        keep = self._categories(split)
        if not keep:
            return items
        return filter_by_category(items, self.split_cfg.field, keep, self.cfg.name, split)

    def pairs(self, split: str):
        return self._nonempty(self._pairs(split), split)

    def _nonempty(self, items, split: str):
        """No split is ever silently empty: a run on zero examples trains 0 steps and reports metrics."""
        if not items:
            how = []
            if self.lowres is not None and split in ("train", "dev"):
                how.append(f"lowres size {self.lowres.size}, sample {self.lowres.sample}")
            if self._categories(split):
                how.append(f"categories {list(self._categories(split))} of extrapolation={self.split_cfg.name}")
            raise DataError(f"data={self.cfg.name}: split {split!r} has no examples"
                            + (f" after {' and '.join(how)}" if how else ""))
        return items

    def _pairs(self, split: str):
        if self.lowres is not None and split in ("train", "dev"):
            if self._lowres_pairs is None:
                full = self._filtered(self.dataset.pairs("train"), "train")
                train, dev = lowres_subsample(full, self.lowres.size, self.lowres.sample,
                                              self.lowres.get("dev_fraction", 0.3))
                self._lowres_pairs = {"train": train, "dev": dev}
                if self.output_dir is not None:
                    for k, v in self._lowres_pairs.items():
                        write_pairs(v, self.output_dir / "lowres" / f"{k}.jsonl")
            return self._lowres_pairs[split]
        pairs = self._filtered(self.dataset.pairs(split), split)
        limit = self.cfg.get(f"max_{split}_examples")
        return pairs[: int(limit)] if limit else pairs

    def eval_groups(self, split: str):
        """Evaluation inputs with all references, in the official order (after lowres / category split)."""
        if self.lowres is not None and split in ("train", "dev"):
            return group_references(self.pairs(split))
        return self._nonempty(self._filtered(self.dataset.eval_groups(split), split), split)

    def features(self, split: str) -> list[dict]:
        if split not in self.splits:
            self.splits[split] = [self.featurizer.train_features(ex) for ex in self.pairs(split)]
            if self.featurizer.truncated:
                print(f"[data] {self.featurizer.truncated} {split} sources truncated to "
                      f"{self.featurizer.max_source_tokens} tokens (data.max_source_tokens)", flush=True)
                self.featurizer.truncated = 0
        return self.splits[split]

    def longest(self, splits=("train", "dev")) -> dict[str, int]:
        """Longest example per model side (decoder, encoder) over `splits`: checked against positions."""
        out: dict[str, int] = {}
        for split in splits:
            for f in self.features(split):
                for side, n in self.featurizer.lengths(f).items():
                    out[side] = max(out.get(side, 0), n)
        return out

    def setup(self, stage: str | None = None) -> None:
        self.features("train")
        self.features("dev")

    def train_dataloader(self):
        data = self.features("train")
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if world > 1:  # data parallel (ddp, fsdp): this rank's share of the single-process order
            sampler = ShardedEpochSampler(len(data), self.seed, trainer.global_rank, world)
        else:
            sampler = EpochSeededSampler(len(data), self.seed, self._resume)
        return DataLoader(data, batch_size=self.cfg.batch_size, sampler=sampler,
                          collate_fn=self.collate, num_workers=self.cfg.get("num_workers", 0))

    def val_dataloader(self):
        return DataLoader(self.features("dev"), batch_size=self.cfg.get("eval_batch_size", self.cfg.batch_size),
                          shuffle=False, collate_fn=self.collate, num_workers=self.cfg.get("num_workers", 0))

"""A bank of exported prefixes on one frozen backbone: one batch may mix rows of different prefixes,
and rows with no prefix, in one forward pass, greedy or beam search included.

How rows are mixed: for each attention site, the prefixes of a batch are stacked into one
(n_layers, B, n_kv_heads, P_max, head_dim) tensor, shorter prefixes padded and masked out per row
(`PrefixState.prefix_mask`); a row without a prefix has every prefix column masked, so it computes
exactly what the plain backbone computes. Each row's real tokens start at its own prefix's position
offset. APT prefixes compute their gates on their own rows. Beam search expands rows by repeat-
interleave, which the injector mirrors, so nothing is pre-expanded.

    bank = PrefixBank(backbone)
    bank.load("alice", "exports/alice"); bank.load("bob", "exports/bob")
    bank.generate(["name : The Vaults | Type : pub", "..."], ["alice", None], num_beams=5)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .backbone import Backbone
from .local_backbones import HUB_SUBSTITUTES
from .data.features import Featurizer
from .decoding import pad_prompts
from .artifacts import ExportError
from .loading import load_prefix
from .injection import PrefixState
from .model import real_positions
from .prefixes import Prefix


class UnknownPrefix(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class _Entry:
    prefix: Prefix
    shift_positions: bool

    @property
    def offset(self) -> int:
        return self.prefix.length if self.shift_positions else 0


class PrefixBank:
    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.entries: dict[str, _Entry] = {}
        self.featurizer = Featurizer(backbone.tokenizer, backbone.is_encoder_decoder)
        self.device = next(backbone.model.parameters()).device

    # ---------------------------------------------------------------- registry
    def load(self, name: str, path: str | Path) -> None:
        """An export of export.py, or an HF PEFT prefix-tuning adapter directory."""
        prefix, meta = load_prefix(path, self.backbone)
        self.add(name, prefix, meta.get("shift_positions", True))

    def add(self, name: str, prefix: Prefix, shift_positions: bool = True) -> None:
        prefix = prefix.inference()  # reparam: its computed prefix, the MLP dropped
        self.entries[name] = _Entry(prefix.to(self.device).eval(), bool(shift_positions))

    def check_ids(self, prefix_ids: Sequence[str | None]) -> None:
        for pid in prefix_ids:
            if pid is not None and pid not in self.entries:
                raise UnknownPrefix(f"unknown prefix id {pid!r}; the bank has {sorted(self.entries) or 'no prefixes'}")

    # ---------------------------------------------------------------- batching
    def _state(self, prefix_ids: Sequence[str | None], source_mask: Tensor | None) -> tuple[PrefixState, Tensor]:
        """The mixed PrefixState of a batch and each row's position offset (B,)."""
        self.check_ids(prefix_ids)
        B = len(prefix_ids)
        used = {pid: self.entries[pid] for pid in prefix_ids if pid is not None}
        offsets = torch.tensor([self.entries[p].offset if p is not None else 0 for p in prefix_ids],
                               device=self.device)
        kv: dict[str, tuple[Tensor, Tensor]] = {}
        masks: dict[str, Tensor] = {}
        # key/value prefixes here; memory prefixes (no positions) go to `_add_memories`
        positional = {pid: e.prefix for pid, e in used.items() if e.prefix.positional}
        sites = {s for p in positional.values() for s in p.sites}
        for site in sites:
            g = self.backbone.geometry.sites[site]
            p_max = max(p.length for p in positional.values() if site in p.sites)
            ref = next(iter(positional.values())).keys[site]
            K = ref.new_zeros(g.n_layers, B, g.n_kv_heads, p_max, g.head_dim)
            V = ref.new_zeros(g.n_layers, B, g.n_kv_heads, p_max, g.v_dim)
            M = torch.zeros(B, p_max, dtype=torch.bool, device=self.device)
            for row, pid in enumerate(prefix_ids):
                if pid not in positional or site not in positional[pid].sites:
                    continue
                pre = positional[pid]
                K[:, row, :, : pre.length] = pre.keys[site]
                V[:, row, :, : pre.length] = pre.values[site]
                M[row, : pre.length] = True
            kv[site], masks[site] = (K, V), M
        gate_fn = None
        if any(e.prefix.gated for e in used.values()):
            gate_fn = self._gate_fn(prefix_ids, {s: kv[s][0].shape[3] for s in sites})
        state = PrefixState(kv=kv, gate_fn=gate_fn, source_mask=source_mask, prefix_mask=masks)
        self._add_memories(state, prefix_ids, {pid: e.prefix for pid, e in used.items() if pid not in positional})
        return state, offsets

    def _add_memories(self, state: PrefixState, prefix_ids, memory: dict[str, Prefix]) -> None:
        """Rows of memory prefixes (PrefixMemory-Tuning): per site one (n_layers, B, n_kv, F, vd) memory, each row
        its prefix's M and zero elsewhere (a zero memory adds exactly nothing). One feature map per batch: memories
        trained with different maps are refused in one batch rather than read with the wrong one."""
        if not memory:
            return
        maps = {p.feature_map for p in memory.values()}
        if len(maps) > 1:
            raise ValueError(f"one batch mixes memory prefixes with different feature maps ({', '.join(sorted(maps))}: "
                             f"{', '.join(sorted(memory))}); serve them in separate batches")
        for site in {s for p in memory.values() for s in p.sites}:
            ref = next(p.memory[site] for p in memory.values() if site in p.sites)  # (L, n_kv, F, vd)
            M = ref.new_zeros(ref.shape[0], len(prefix_ids), *ref.shape[1:])
            for row, pid in enumerate(prefix_ids):
                if pid in memory and site in memory[pid].sites:
                    M[:, row] = memory[pid].memory[site]
            state.memory[site] = M
        state.feature_map = next(iter(memory.values())).phi

    def _gate_fn(self, prefix_ids, p_max: dict[str, int]):
        """Per-row APT gates: each gated prefix gates its own rows; other rows get 1."""
        groups: dict[str, list[int]] = {}
        for row, pid in enumerate(prefix_ids):
            if pid is not None and self.entries[pid].prefix.gated:
                groups.setdefault(pid, []).append(row)
        n = len(prefix_ids)

        def gate(site: str, layer: int, pooled: Tensor) -> Tensor:
            out = pooled.new_ones(pooled.shape[0], p_max[site])
            rep = pooled.shape[0] // n  # beam search: rows were repeat-interleaved
            for pid, rows in groups.items():
                pre = self.entries[pid].prefix
                if site not in pre.sites:
                    continue
                idx = torch.tensor([r * rep + k for r in rows for k in range(rep)], device=pooled.device)
                out[idx, : pre.length] = pre.gate(site, layer, pooled[idx])
            return out

        return gate

    def _prompts(self, texts: Sequence[str], offsets: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        prompts = [self.featurizer.prompt_ids(t) for t in texts]
        ids, mask = pad_prompts(prompts, self.backbone.tokenizer.pad_token_id, self.backbone.is_encoder_decoder)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = None if self.backbone.is_encoder_decoder else real_positions(mask, offsets)
        return ids, mask, pos

    # ---------------------------------------------------------------- serving
    @torch.no_grad()
    def generate(self, texts: Sequence[str], prefix_ids: Sequence[str | None], **generate_kwargs) -> list[str]:
        """One batched `generate` for rows with different prefixes (greedy, sampling or beam search)."""
        if len(texts) != len(prefix_ids):
            raise ValueError(f"{len(texts)} texts but {len(prefix_ids)} prefix ids")
        tok = self.backbone.tokenizer
        state, offsets = self._state(prefix_ids, None)
        ids, mask, pos = self._prompts(texts, offsets)
        state.source_mask = mask
        state.keep_gates = True
        generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
        if pos is not None:
            generate_kwargs["position_ids"] = pos
        injector = self.backbone.injector
        injector.activate(state)
        try:
            out = self.backbone.model.generate(input_ids=ids, attention_mask=mask, **generate_kwargs)
        finally:
            injector.deactivate()
        if not self.backbone.is_encoder_decoder:
            out = out[:, ids.shape[1]:]
        return [tok.decode(o, skip_special_tokens=True).strip() for o in out]

    @torch.no_grad()
    def logits(self, texts: Sequence[str], prefix_ids: Sequence[str | None]) -> tuple[Tensor, Tensor]:
        """Training-free scoring: next-token logits of the prompts (B, T, V) and their attention mask."""
        state, offsets = self._state(prefix_ids, None)
        ids, mask, pos = self._prompts(texts, offsets)
        state.source_mask = mask
        injector = self.backbone.injector
        injector.activate(state)
        try:
            kw = {"position_ids": pos} if pos is not None else {
                "decoder_input_ids": torch.full((len(texts), 1), self.backbone.model.config.decoder_start_token_id,
                                                device=self.device)}
            out = self.backbone.model(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
        finally:
            injector.deactivate()
        return out.logits, mask


class BadRequest(ValueError):
    pass


def _check_request(bank: PrefixBank, line: str, max_new_tokens: int) -> tuple[str | None, str]:
    """(prefix id, input text) of one request line, or BadRequest saying what is wrong with it."""
    try:
        req = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadRequest(f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(req, dict):
        raise BadRequest(f"expected a JSON object {{'prefix': name, 'input': text}}, got {type(req).__name__}")
    text, pid = req.get("input"), req.get("prefix")
    if not isinstance(text, str):
        raise BadRequest(f"field 'input' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise BadRequest("field 'input' is empty")
    if pid is not None and not isinstance(pid, str):
        raise BadRequest(f"field 'prefix' must be a string or null, got {type(pid).__name__}")
    try:
        bank.check_ids([pid])
    except UnknownPrefix as err:
        raise BadRequest(str(err)) from None
    n = len(bank.featurizer.prompt_ids(text))
    geo = bank.backbone.geometry
    offset = bank.entries[pid].offset if pid is not None else 0
    need = n + (0 if bank.backbone.is_encoder_decoder else offset + max_new_tokens)
    if not geo.fits(n if bank.backbone.is_encoder_decoder else need):
        raise BadRequest(f"input of {n} tokens (+ prefix offset {offset} + max_new_tokens {max_new_tokens}) needs "
                         f"{need} positions, but backbone {bank.backbone.name} has {geo.max_positions}")
    return pid, text


def serve_jsonl(bank: PrefixBank, in_path: str | Path, out_path: str | Path, batch_size: int = 16,
                **generate_kwargs) -> dict:
    """Read `{"prefix": name, "input": text}` lines, write `{"line", "prefix", "input", "output"}` or
    `{"line", "error"}` lines in the same order.

    A request that cannot be served (not JSON, wrong types, empty, unknown prefix, too long for the model)
    gets an error line and the others are served; if a batch fails anyway, its requests are retried one by
    one so only the failing one gets the error. Lines are written (and flushed) as each batch finishes, so
    a crash keeps everything served before it."""
    max_new = int(generate_kwargs.get("max_new_tokens") or 20)
    counts = {"served": 0, "errors": 0}
    with open(in_path, "rb") as src, \
            open(out_path, "w", encoding="utf-8", buffering=1) as out:
        pending: list[tuple[int, str | None, str]] = []
        ready: list[dict] = []

        def emit(record: dict) -> None:
            counts["errors" if "error" in record else "served"] += 1
            text = json.dumps(record, ensure_ascii=False)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate in the echoed input: written escaped, not lost
                text = json.dumps(record, ensure_ascii=True)
            out.write(text + "\n")

        def flush() -> None:
            results = {n: r for n, r in _serve_batch(bank, pending, generate_kwargs)}
            for record in sorted(ready + list(results.values()), key=lambda r: r["line"]):
                emit(record)
            out.flush()
            pending.clear()
            ready.clear()

        for n, raw in enumerate(src, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise BadRequest(f"bytes {raw[err.start:err.end]!r} at column {err.start + 1} are not UTF-8") from None
                pid, text = _check_request(bank, line, max_new)
                pending.append((n, pid, text))
            except BadRequest as err:
                ready.append({"line": n, "error": f"{in_path}, line {n}: {err}"})
            except Exception as err:  # noqa: BLE001 - whatever fails on one request is that request's error line
                ready.append({"line": n, "error": f"{in_path}, line {n}: {type(err).__name__}: {err}"})
            if len(pending) >= batch_size:
                flush()
        flush()
    return counts


def _serve_batch(bank: PrefixBank, chunk, generate_kwargs):
    """(line, record) for every request of a chunk; a failing batch is retried request by request."""
    if not chunk:
        return []
    try:
        outs = bank.generate([t for _, _, t in chunk], [p for _, p, _ in chunk], **generate_kwargs)
        return [(n, {"line": n, "prefix": p, "input": t, "output": o}) for (n, p, t), o in zip(chunk, outs)]
    except Exception as err:
        if len(chunk) == 1:
            n = chunk[0][0]
            return [(n, {"line": n, "error": f"line {n}: generation failed ({type(err).__name__}: {err})"})]
        return [r for req in chunk for r in _serve_batch(bank, [req], generate_kwargs)]


def main(argv=None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m prefixtuning.serving",
                                 description="Serve requests for many prefixes on one frozen backbone.")
    ap.add_argument("--backbone", required=True, help="hub id, local directory or local backbone (smollm2-135m-instruct-q4_1, tiny-gpt2, ...)")
    ap.add_argument("--prefix", action="append", default=[], metavar="NAME=DIR", help="an exported prefix")
    ap.add_argument("--input", required=True, help="JSON lines {'prefix': name, 'input': text}")
    ap.add_argument("--output", required=True)
    ap.add_argument("--num-beams", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    bank = PrefixBank(Backbone.load(args.backbone, offline_substitute=HUB_SUBSTITUTES.get(args.backbone)))
    for spec in args.prefix:
        name, _, path = spec.partition("=")
        try:
            bank.load(name, path)
        except ExportError as err:
            print(f"warning: prefix {name!r} not loaded: {err}", file=sys.stderr)
    stats = serve_jsonl(bank, args.input, args.output, args.batch_size, num_beams=args.num_beams,
                        max_new_tokens=args.max_new_tokens)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

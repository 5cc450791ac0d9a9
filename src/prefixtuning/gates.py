"""APT's probe: the token gates of a trained APT prefix over a split, as a layer x prefix-token heatmap.

    python -m prefixtuning.gates ckpt=<checkpoint or export dir> split=dev [out=DIR] [max_inputs=N] [stride=K]
                                 [per_example=true] [batch_size=16]

Writes, in `out` (default: the checkpoint's run folder, or the export dir):
  gates_<split>.csv              site, layer, token, mean gate alpha, std over examples, layer scale lambda
  gates_<split>.png              heatmap of the mean alpha (rows: layers, columns: prefix tokens), per site
  gates_<split>_examples.jsonl   with per_example=true: one line per input, in the split's order

Gates depend only on the source (they pool the layer input over the source tokens), so they are computed by
a forward pass over each input's prompt, the same prefill that generation runs; no decoding is needed.
Batching sorts inputs by length; the gates are put back in input order.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .data.datamodule import PrefixDataModule
from .decoding import pad_prompts, place_rows
from .evaluation import select_inputs
from .gate_report import write_gate_report  # noqa: F401 (part of this module's interface)
from .loading import load_trained


@torch.no_grad()
def probe_gates(model, prompts: list[list[int]], batch_size: int = 16) -> dict[tuple[str, int], torch.Tensor]:
    """(site, layer) -> (N, P) token gates alpha of every prompt, in the order given."""
    prefix = model.method.gated_prefix()  # an error naming what the model has instead of APT
    model.eval()
    tok = model.backbone.tokenizer
    device = next(model.backbone.model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: dict[tuple[str, int], torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_prompts([prompts[i] for i in idx], tok.pad_token_id, model.backbone.is_encoder_decoder)
        ids, mask = ids.to(device), mask.to(device)
        kw = {}
        if model.backbone.is_encoder_decoder:
            start_id = model.backbone.model.config.decoder_start_token_id
            kw["decoder_input_ids"] = torch.full((len(idx), 1), start_id, device=device)
        model(ids, mask, **kw)
        place_rows(out, {k: g.float() for k, g in prefix.last_token_gates.items()}, idx, len(prompts))
    return out


def main(argv=None) -> int:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    unknown = set(args) - {"ckpt", "split", "out", "max_inputs", "stride", "per_example", "batch_size"}
    if unknown or "ckpt" not in args:
        print("usage: python -m prefixtuning.gates ckpt=PATH [split=dev] [out=DIR] [max_inputs=N] [stride=K] "
              "[per_example=true] [batch_size=16]" + (f"; unknown: {sorted(unknown)}" if unknown else ""),
              file=sys.stderr)
        return 2
    ckpt = Path(args["ckpt"])
    split = args.get("split", "dev")
    model, run_cfg = load_trained(ckpt)
    dm = PrefixDataModule(run_cfg.data, model.backbone.tokenizer, model.backbone.is_encoder_decoder,
                          seed=run_cfg.get("seed", 0), lowres=run_cfg.get("lowres"), split=run_cfg.get("extrapolation"))
    groups = select_inputs(dm.eval_groups(split), args.get("max_inputs"), args.get("stride"))
    prompts = [dm.featurizer.prompt_ids(g.source) for g in groups]
    try:
        gates = probe_gates(model, prompts, int(args.get("batch_size", 16)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    default_out = ckpt if ckpt.is_dir() else ckpt.parent.parent
    paths = write_gate_report(gates, model.method.gated_prefix(), Path(args.get("out", default_out)), split,
                              args.get("per_example", "false").lower() in ("1", "true", "yes"))
    print(f"[gates] {len(prompts)} {split} inputs -> " + ", ".join(str(p) for p in paths.values()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""APT's gate heatmap and table (gates_<split>.csv / .png), written from gates already probed: shared by the
generation tasks' probe (gates.py) and the NLU tasks' test (nlu/evaluation.py), which collect the gates apart."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from . import atomic


def write_gate_report(gates, prefix, out_dir: Path, split: str, per_example: bool = False) -> dict[str, Path]:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's inline one) is untouched

    out_dir.mkdir(parents=True, exist_ok=True)
    sites = sorted({s for s, _ in gates}, key=["encoder", "decoder", "cross"].index)
    paths = {"csv": out_dir / f"gates_{split}.csv", "png": out_dir / f"gates_{split}.png"}
    with atomic.atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["site", "layer", "token", "mean_gate", "std_gate", "layer_scale", "n"])
        for s in sites:
            scales = prefix.layer_scales(s)
            for layer in range(prefix.geometry.sites[s].n_layers):
                g = gates[(s, layer)]
                for t in range(g.shape[1]):
                    w.writerow([s, layer, t, f"{g[:, t].mean().item():.6f}", f"{g[:, t].std(unbiased=False).item():.6f}",
                                f"{scales[layer].item():.6f}", g.shape[0]])
    fig = Figure(figsize=(2.2 + 0.45 * prefix.length * len(sites), 0.35 * max(
        prefix.geometry.sites[s].n_layers for s in sites) + 1.8))
    axes = fig.subplots(1, len(sites), squeeze=False)
    for ax, s in zip(axes[0], sites):
        L = prefix.geometry.sites[s].n_layers
        mean = torch.stack([gates[(s, i)].mean(0) for i in range(L)]).cpu().numpy()  # (L, P)
        im = ax.imshow(mean, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, origin="lower")
        ax.set_title(f"{s}: mean gate over {gates[(s, 0)].shape[0]} inputs ({split})", fontsize=9)
        ax.set_xticks(range(mean.shape[1]))
        ax.set_yticks(range(L))
        ax.set_xlabel("prefix token")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    with atomic.atomic_path(paths["png"]) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    if per_example:
        paths["jsonl"] = out_dir / f"gates_{split}_examples.jsonl"
        n = next(iter(gates.values())).shape[0]
        with atomic.atomic_path(paths["jsonl"]) as tmp, open(tmp, "w") as fh:
            for i in range(n):
                row = {f"{s}.{layer}": [round(x, 6) for x in gates[(s, layer)][i].tolist()] for s, layer in gates}
                fh.write(json.dumps({"index": i, "gates": row}) + "\n")
    return paths

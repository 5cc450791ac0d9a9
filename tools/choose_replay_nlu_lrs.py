"""Choose the CPU NLU replay's learning rates from a finished `experiment=replay_apt_nlu_lr` sweep (dev only).

    python tools/choose_replay_nlu_lrs.py logs/replay/replay_apt_nlu_lr [--write]

For each (task, row): the lr (starting value x optim.lr_scale) whose best dev metric over the validations after
step 0 is highest (val/accuracy; CoNLL04 val/f1), ties broken by the lower best dev loss. Prints the table (markdown)
and, with --write, puts the chosen values into conf/recipe_row/replay_nlu/<row>.yaml (recipe.lrs).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
MAIN = {"conll04": "val/f1"}


def jobs(sweep: Path):
    for d in sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file()):
        over = dict(o.split("=", 1) for o in OmegaConf.load(d / ".hydra" / "overrides.yaml"))
        cfg = OmegaConf.load(d / "config.yaml")
        vals = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        vals = [v for v in vals if v.get("stage") == "validate" and v["step"] > 0]
        metric = MAIN.get(over["data"], "val/accuracy")
        yield {"data": over["data"], "row": over["row"], "lr": float(cfg.optim.lr) * float(cfg.optim.lr_scale),
               "dev": max(v[metric] for v in vals), "dev_loss": min(v["val/loss"] for v in vals), "metric": metric}


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    rows = list(jobs(Path(argv[0])))
    chosen: dict[str, dict[str, float]] = {}
    print("| task | row | lr | best dev metric | best dev loss | chosen |\n|---|---|---|---|---|---|")
    for key in sorted({(r["data"], r["row"]) for r in rows}):
        cands = [r for r in rows if (r["data"], r["row"]) == key]
        best = max(cands, key=lambda r: (r["dev"], -r["dev_loss"]))
        chosen.setdefault(key[1], {})[key[0]] = best["lr"]
        for r in sorted(cands, key=lambda r: r["lr"]):
            print(f"| {key[0]} | {key[1]} | {r['lr']:.3g} | {r['metric'].removeprefix('val/')} {r['dev']:.4f} | "
                  f"{r['dev_loss']:.4f} | {'x' if r is best else ''} |")
    if "--write" in argv:
        for row, lrs in chosen.items():
            path = ROOT / "conf" / "recipe_row" / "replay_nlu" / f"{row}.yaml"
            text = path.read_text()
            new = "{" + ", ".join(f"{t}: {lr:.3g}" for t, lr in sorted(lrs.items())) + "}"
            path.write_text(re.sub(r"(?m)^  lrs: \{.*\}$", f"  lrs: {new}", text))
            print(f"[lrs] {path.relative_to(ROOT)}: {new}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

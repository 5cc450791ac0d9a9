"""What beam 5 (the paper's table-to-text decoding) costs against the replays' greedy decoding, on a trained replay
checkpoint: the first N MRs of the official E2E test set, batch 16, decoded greedy and with beam 5 under the
replays' limits (max 80 new tokens), interleaved (greedy, beam, greedy, beam, ...) in one process; the median
time of each and their ratio are printed, with how many outputs the two decodings share.

    python benchmarks/replay_decoding.py <checkpoint.ckpt> [--inputs 16] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from machine import cpu_model  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from prefixtuning.data.datamodule import PrefixDataModule  # noqa: E402
from prefixtuning.decoding import decode  # noqa: E402
from prefixtuning.evaluation import select_inputs  # noqa: E402
from prefixtuning.loading import load_trained  # noqa: E402

CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "decoding")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    model, cfg = load_trained(args.ckpt)
    model.eval()
    bb = model.backbone
    dm = PrefixDataModule(cfg.data, bb.tokenizer, bb.is_encoder_decoder)
    groups = select_inputs(dm.eval_groups("test"), args.inputs)
    prompts = [dm.featurizer.prompt_ids(g.source) for g in groups]
    beam = OmegaConf.load(os.path.join(CONF, "table_to_text.yaml"))  # the paper's: beam 5
    settings = {"greedy": OmegaConf.merge(beam, {"num_beams": 1, "max_new_tokens": 80}),  # the replays' decoding
                "beam 5": OmegaConf.merge(beam, {"max_new_tokens": 80})}
    times: dict[str, list[float]] = {k: [] for k in settings}
    outputs: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, dcfg in settings.items():
            start = time.perf_counter()
            outputs[name] = decode(model, prompts, dcfg, batch_size=16, progress=False)
            times[name].append(time.perf_counter() - start)
    sources = groups
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch threads; backbone {bb.name}; "
          f"{len(sources)} test MRs, batch {len(sources)}, max 80 new tokens, {args.repeats} repeat(s)")
    for name, t in times.items():
        print(f"{name:>7}: median {statistics.median(t):7.1f} s  (runs: {', '.join(f'{x:.1f}' for x in t)})")
    ratio = statistics.median(times["beam 5"]) / statistics.median(times["greedy"])
    same = sum(a.strip() == b.strip() for a, b in zip(outputs["greedy"], outputs["beam 5"]))
    print(f"beam 5 / greedy: {ratio:.2f}x; identical outputs: {same} of {len(sources)}")


if __name__ == "__main__":
    main()

"""Evaluate a trained prefix: `python evaluate.py ckpt=logs/train/runs/.../checkpoints/last.ckpt split=test`."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from prefixtuning.errors import exit_on_user_error  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_error  # a config / data / backbone mistake: one line and exit 1, no traceback
def main(cfg: DictConfig):
    from prefixtuning.evaluation import evaluate

    evaluate(cfg)  # metrics.json in the run folder; nothing returned, so Hydra's exit status stays 0


if __name__ == "__main__":
    main()

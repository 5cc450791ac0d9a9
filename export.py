"""Export the inference prefix of a checkpoint: `python export.py ckpt=.../last.ckpt out=exports/e2e`
(`format=peft` writes HF PEFT's prefix-tuning adapter instead)."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from prefixtuning.errors import exit_on_user_error  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@exit_on_user_error  # a config / data / backbone mistake: one line and exit 1, no traceback
def main(cfg: DictConfig):
    from prefixtuning.export import export_from_config

    export_from_config(cfg)


if __name__ == "__main__":
    main()

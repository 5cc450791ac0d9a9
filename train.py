"""Train a prefix on a frozen LM. `python train.py` runs the embedded default (tiny GPT-2, E2E sample).

    python train.py data=e2e backbone=gpt2-medium prefix=reparam prefix.length=10
    python train.py -m data=e2e prefix.length=1,5,10,20,40
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from prefixtuning.errors import UserError, exit_on_user_error  # noqa: E402

import prefixtuning  # noqa: E402,F401  (registers the config resolvers)
from prefixtuning.resume import ResumeError, resume_argv  # noqa: E402
# imported before Hydra opens the run's train.log: what a library logs on import (e.g. bitsandbytes' kernel
# warning on AVX512-BF16 CPUs) goes to the console, never into the folder of a run that is then refused
from prefixtuning.training import train  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error  # a config / data / backbone mistake: one line and exit 1, no traceback
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    metrics = train(cfg)
    key = cfg.get("optimized_metric", "val/loss")  # the objective for Hydra sweepers (hparams_search=optuna)
    hc = HydraConfig.get()
    reads_objective = "BasicSweeper" not in str(hc.sweeper.get("_target_", ""))  # Optuna & co.; the basic one does not
    if key not in metrics and hc.mode == RunMode.MULTIRUN and reads_objective:  # it would optimize nothing
        raise UserError(f"optimized_metric={key} is not among this run's metrics, so the sweeper has nothing to "
                        f"optimize (the run ended before a validation?); its metrics: "
                        f"{', '.join(sorted(k for k, v in metrics.items() if isinstance(v, float)))}")
    return metrics.get(key)  # a single run (e.g. resuming a finished one) may have no new validation


if __name__ == "__main__":
    import sys

    try:  # a resume restores the run's own overrides before Hydra composes (and writes) anything
        sys.argv = resume_argv(sys.argv)
    except ResumeError as err:  # the same one line and exit status as every other user error
        print(f"error (ResumeError): {err}", file=sys.stderr)
        raise SystemExit(1)
    main()

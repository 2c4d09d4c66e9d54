"""Hydra entry point: `python train.py +experiment=resnet18_ternary [group=choice] [key=value]`.

Multirun: `python train.py -m +experiment=resnet18_ternary quant=bwn,xnor,ternary` (one run
directory, summary.json and W&B run per job). DDP: `torchrun --nproc_per_node=N train.py ...`.
Bad input prints one line and exits with status 2 (HYDRA_FULL_ERROR=1: with the traceback), Ctrl-C
exits with 130; a launch that fails before writing anything leaves no run directory (`qat.train.cli`).

The job's return value (a Hydra sweeper's objective) is the run's best validation figure of its task
(`qat.train.tasks`): top-1 in % for classification (higher is better), bits per byte for a language
model (lower is better: a sweeper must minimize it); None when the run had no validation split.
"""
import os
import sys

import hydra
from omegaconf import DictConfig

import qat.train.config  # noqa: F401  (registers the config resolvers before Hydra composes)
from qat.train import cli

if int(os.environ.get("RANK", "0")) > 0:
    # Under torchrun only rank 0 writes the run directory (Hydra's own files and log included).
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    with cli.hydra_job() as run_dir:
        from qat.train.tasks import get_task
        from qat.train.trainer import train

        summary = train(cfg, run_dir)
    return summary.get(f"best_val_{get_task(summary.get('task')).best_metric}")


if __name__ == "__main__":
    sys.exit(cli.run_hydra(main, "train.py"))

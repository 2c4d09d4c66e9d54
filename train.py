"""Hydra entry point: `python train.py +experiment=resnet18_ternary [group=choice] [key=value]`.

Multirun: `python train.py -m +experiment=resnet18_ternary quant=bwn,xnor,ternary` (one run
directory, summary.json and W&B run per job). DDP: `torchrun --nproc_per_node=N train.py ...`.
"""
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import qat.config  # noqa: F401  (registers the config resolvers before Hydra composes)

if int(os.environ.get("RANK", "0")) > 0:
    # Under torchrun only rank 0 writes the run directory (Hydra's own files and log included).
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from qat.trainer import train

    summary = train(cfg, Path(HydraConfig.get().runtime.output_dir))
    return summary.get("best_val_acc1")


if __name__ == "__main__":
    main()

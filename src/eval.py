"""Evaluate a checkpoint: ``python src/eval.py ckpt_path=... [data=...] [split=test]`` (Hydra;
see conf/eval.yaml). Writes metrics.json, per_class.md, the devkit's result files and PR curves."""

import hydra
from omegaconf import DictConfig

from fasterrcnn.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["metrics"][f"{cfg.split}/map"]


if __name__ == "__main__":
    main()

"""Train Faster R-CNN: ``python src/train.py [overrides]`` (Hydra; see conf/train.yaml).

    python src/train.py                                # built-in shapes data, CPU default
    python src/train.py anchor=k9 sampler=default      # swap config groups
    python src/train.py -m anchor=k3_scales,k9,k15     # a sweep, one output folder per job
    python src/train.py -m anchor=k9,k15 seed=0,1,2    # with repeats: scripts/sweep_report.py groups the seeds
    python src/train.py experiment=voc07_vgg16         # the paper's recipe on VOC2007
"""

import time

STARTED: float | None = time.time()  # before the imports: metrics.json's startup counts from here

import logging  # noqa: E402
import math  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fasterrcnn.sweeps import USES, objective  # noqa: E402
from fasterrcnn.training import train  # noqa: E402

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the value a Hydra sweeper optimises: val/map of metrics.json's ``final`` (the last
    model) or, with ``objective=best``, of ``best`` (chosen on the validations it is scored on, so
    optimistic); -inf for a failed multirun job."""
    global STARTED
    if cfg.objective not in USES:  # before training, not after it
        raise ValueError(f"objective must be one of {', '.join(USES)}, not {cfg.objective!r}")
    # The first job of the process counts its startup from the script's first line (a shell's
    # `bash -c "... && python src/train.py"` execs python in a process that began earlier, so
    # the process's own start time would count the commands before it); later multirun jobs
    # from their own start.
    started, STARTED = STARTED or time.time(), None
    try:
        metrics = train(cfg, started=started)
    except Exception:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        # In a sweep a failed job is recorded (metrics.json says "failed") and the sweep goes on.
        # -inf, not NaN: the Optuna sweeper aborts the whole study on a NaN objective.
        log.exception("job %s failed; continuing the sweep", HydraConfig.get().job.num)
        return -math.inf
    return objective(metrics, cfg.objective)


if __name__ == "__main__":
    main()

"""A training step on an idle machine and beside a competing CPU-bound process, under a thread
policy (``scripts/bench.py --busy-steps N``; ``threads=`` of the configs, :mod:`fasterrcnn.threads`).

For each of three conditions, in this order, the thread count is chosen (``threads=auto``
samples the machine's load then, as a run does at its start), set with ``torch.set_num_threads``,
and ``steps`` training steps of our detector (:class:`~fasterrcnn.bench.harness.Contender`:
forward, backward, SGD step on the bench's image) are timed after ``warmup``; the median is kept:

* ``idle``: nothing else running, the policy's count;
* ``busy``: one competing process (``python -c "while True: pass"``, a child of this one), the
  policy's count chosen under that load;
* ``busy_all_threads``: the same load with torch's default count (one per core), what a run
  without the policy would use.

``busy_ratio`` = busy / idle (the target is at most 1.5) and ``unmanaged_ratio`` =
busy_all_threads / idle. The thread count is restored afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import torch

from fasterrcnn.bench.harness import Contender, Log, median
from fasterrcnn.threads import DEFAULT_THREADS, choose_threads

SPIN = "while True: pass"


def _steps(contender: Contender, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        contender.train_step()
    return [sum(contender.train_step()[0]) for _ in range(steps)]


def competing_process() -> subprocess.Popen:
    """A CPU-bound child process, started now; kill it when done."""
    proc = subprocess.Popen([sys.executable, "-c", SPIN])
    time.sleep(0.5)  # running, so that the load sampling sees it
    return proc


def busy_machine(contender: Contender, steps: int = 25, warmup: int = 5, threads: int | str = "auto", log: Log = print,
                 compete: Callable[[], subprocess.Popen] = competing_process) -> dict:
    """The three conditions of the module docstring; returns each one's ``threads``, ``step_s``
    (median) and ``runs_s``, and the two ratios."""
    if steps < 1:
        raise ValueError("busy_machine: steps must be at least 1")
    before = torch.get_num_threads()
    result: dict = {"policy": str(threads), "steps": steps, "warmup": warmup}
    try:
        for name, loaded, policy in (("idle", False, threads), ("busy", True, threads), ("busy_all_threads", True, DEFAULT_THREADS)):
            proc = compete() if loaded else None
            try:
                count = choose_threads(policy)
                torch.set_num_threads(count)
                runs = _steps(contender, steps, warmup)
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
            result[name] = {"threads": count, "step_s": median(runs), "runs_s": runs}
            log(f"  {name}: {count} thread(s), training step {median(runs) * 1000:.1f} ms")
    finally:
        torch.set_num_threads(before)
    idle = result["idle"]["step_s"]
    result["busy_ratio"] = result["busy"]["step_s"] / idle
    result["unmanaged_ratio"] = result["busy_all_threads"]["step_s"] / idle
    return result

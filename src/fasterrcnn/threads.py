"""How many CPU threads a run uses, on an idle or a busy machine (``threads=`` in the configs).

With 2 OpenMP threads on 2 cores a training step is fastest while the machine is idle, and
several times slower when another CPU-bound process runs: every parallel region ends at a
barrier, and the thread whose core is taken makes the other one wait (spinning). One thread
on the free core is then faster than two on one and a half. ``threads: auto``
(:func:`choose_threads`) samples ``/proc/stat`` for a quarter of a second at the start and leaves the
cores that other processes keep busy to them: 2 idle cores give 2 threads, one busy core
gives 1. The count is fixed for the run, logged and written to ``metrics.json``
(``threads``), because results differ in the last bits between thread counts: a fixed count
keeps a run reproducible and a resume exact. ``threads: <n>`` fixes it by hand.

OpenMP's passive wait policy (``OMP_WAIT_POLICY=PASSIVE``) was measured too and is not used: it
helps two threads on a busy machine but costs an idle one about a third of its speed
(docs/speed.md, "A busy machine").
"""

from __future__ import annotations

import os
import time

import torch

# torch's own count (one per physical core) before anything here changes it.
DEFAULT_THREADS = torch.get_num_threads()


def _cpu_times() -> tuple[float, float] | None:
    """``(busy, total)`` jiffies of all CPUs from ``/proc/stat`` (None where it does not exist)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(sample_s: float = 0.25) -> float:
    """How many cores other processes keep busy, measured over ``sample_s`` while this process
    sleeps (0 where ``/proc/stat`` is unavailable)."""
    start = _cpu_times()
    if start is None:
        return 0.0
    time.sleep(sample_s)
    end = _cpu_times()
    if end is None or end[1] <= start[1]:
        return 0.0
    return (end[0] - start[0]) / (end[1] - start[1]) * (os.cpu_count() or 1)


def choose_threads(threads: int | str | None, sample_s: float = 0.25) -> int:
    """The intra-op thread count for ``threads``: a positive int as it is; ``auto`` (or None):
    torch's default count less the cores other processes keep busy, at least 1."""
    if threads in (None, "auto"):
        available = DEFAULT_THREADS
        return max(1, min(available, round(available - busy_cores(sample_s))))
    if isinstance(threads, bool) or not str(threads).isdecimal() or int(threads) < 1:
        raise ValueError(f"threads must be a positive integer or 'auto', not {threads!r}")
    return int(threads)


def set_threads(threads: int | str | None, sample_s: float = 0.25) -> int:
    """:func:`choose_threads` applied with ``torch.set_num_threads``; returns the count."""
    count = choose_threads(threads, sample_s)
    torch.set_num_threads(count)
    return count

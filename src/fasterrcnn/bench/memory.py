"""Peak memory of one training step against the number of objects G in one image.

A legal annotation can hold tens of thousands of objects; the IoU matching of the creators
(:mod:`fasterrcnn.matcher`) is what grows with G. Each count is measured in a fresh child
process (``multiprocessing`` spawn), so a count's peak is not hidden by an earlier, larger one.
The child composes the default config (``conf/train.yaml``, untrained weights, nothing
downloaded), builds the model, makes one synthetic image of ``image_size`` with G random boxes
and runs one training step: the four losses, backward and an SGD step. It reports:

* ``peak_rss_mib``: the child's peak resident set size (``getrusage``'s ``ru_maxrss``), which
  includes Python, torch and the model: the number the OS compares with its limits;
* ``base_rss_mib``: the same peak just before the step (imports, model, inputs);
* ``step_s``: the step's wall-clock time.

``chunked=False`` runs the step with the creators' IoU matrices whole (``max_chunk_elements``
None), the computation before the memory bound, for comparison.
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_COUNTS = (1000, 10000, 30000)
DEFAULT_IMAGE_SIZE = (300, 400)  # (height, width): the default data's images are 224-320 x 288-400


@dataclass
class StepMemory:
    """One measurement; ``error`` says why there is none (e.g. the child was killed)."""

    num_objects: int
    chunked: bool
    peak_rss_mib: float | None = None
    base_rss_mib: float | None = None
    step_s: float | None = None
    error: str | None = None


def synthetic_targets(num_objects: int, image_size: tuple[int, int], num_classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``num_objects`` random boxes ``(G, 4)`` inside the image, sides 4 to 100 px, and their
    labels ``(G,)`` in 1..num_classes."""
    g = torch.Generator().manual_seed(seed)
    height, width = image_size
    size = torch.tensor([width, height], dtype=torch.float32)
    wh = torch.minimum(4 + torch.rand(num_objects, 2, generator=g) * 96, size)
    xy = torch.rand(num_objects, 2, generator=g) * (size - wh)
    labels = torch.randint(1, num_classes + 1, (num_objects,), generator=g)
    return torch.cat((xy, xy + wh), dim=1), labels


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure_step(
    num_objects: int,
    overrides: Sequence[str] = (),
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    chunked: bool = True,
    threads: int | None = 1,
    seed: int = 0,
) -> StepMemory:
    """One training step with ``num_objects`` objects, in this process (see the module docstring)."""
    from fasterrcnn.build import build_model, compose_config, model_config

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([*overrides, "logger=none"], tmp, pretrained=False)
    model = build_model(model_config(cfg))
    if not chunked:
        model.anchor_target_creator.max_chunk_elements = None
        model.proposal_target_creator.max_chunk_elements = None
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    boxes, labels = synthetic_targets(num_objects, image_size, model.num_classes, seed)
    images = torch.randn(1, 3, *image_size)
    base = _peak_rss_mib()
    start = time.perf_counter()
    losses = model.losses(images, [image_size], [image_size], [boxes], [labels])
    losses["loss"].backward()
    optimizer.step()
    step_s = time.perf_counter() - start
    return StepMemory(num_objects, chunked, peak_rss_mib=_peak_rss_mib(), base_rss_mib=base, step_s=step_s)


def measure(
    counts: Sequence[int] = DEFAULT_COUNTS,
    overrides: Sequence[str] = (),
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    chunked: bool = True,
    threads: int | None = 1,
) -> list[StepMemory]:
    """:func:`measure_step` for each count, each in a fresh spawned child process."""
    results = []
    for count in counts:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                results.append(pool.submit(measure_step, count, list(overrides), tuple(image_size), chunked, threads).result())
            except BrokenProcessPool:
                results.append(StepMemory(count, chunked, error="the child process died (killed by the OS for memory?)"))
    return results


def markdown_table(results: Sequence[StepMemory]) -> str:
    """One row per measurement."""
    lines = ["| objects | IoU matching | peak RSS (MiB) | before the step (MiB) | step (s) |", "| ---: | --- | ---: | ---: | ---: |"]
    for r in results:
        mode = "chunked" if r.chunked else "whole matrix"
        if r.error:
            lines.append(f"| {r.num_objects} | {mode} | {r.error} | | |")
        else:
            lines.append(f"| {r.num_objects} | {mode} | {r.peak_rss_mib:.0f} | {r.base_rss_mib:.0f} | {r.step_s:.2f} |")
    return "\n".join(lines)

"""The speed bench's timing harness: its inputs, the contenders, interleaved runs, peak memory in
a child process, data-loader throughput and the machine's description.

Every run records wall-clock time (``time.perf_counter``) and the CPU time of the process
(``time.process_time``, all threads): with other processes on the machine, wall-clock time
counts their time slices too, CPU time does not (it does count OpenMP threads spinning at
barriers, so it is cleanest with one torch thread).
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from fasterrcnn.build import build_datamodule, build_model, compose_config, model_config
from fasterrcnn.data import DetectionBatch, collate
from fasterrcnn.lit import training_targets
from fasterrcnn.model import FasterRCNN

Log = Callable[[str], None]
DEFAULT_PRECISIONS = ("32", "32-true")  # trainer.precision without autocast


# ---------------------------------------------------------------------------- inputs
def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory for a ``trainer.precision``: bf16/16 mixed -> autocast, 32 -> none."""
    if precision.startswith("bf16"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return lambda: torch.autocast(device.type, dtype=torch.float16)
    if precision not in DEFAULT_PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r}: the bench knows 32-true, bf16-mixed and 16-mixed")
    return contextlib.nullcontext


def load_batch(cfg: DictConfig, image_size: Sequence[int] | None = None) -> DetectionBatch:
    """The first validation image as a batch of one; with ``image_size (H, W)`` resized to exactly
    that, and its boxes with it. The original size is the input size: nothing is resized back."""
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    item = dm.datasets["val"][0]
    if image_size:
        h, w = item["image"].shape[-2:]
        item["image"] = F.interpolate(item["image"][None], size=tuple(image_size), mode="bilinear", align_corners=False)[0]
        item["boxes"] = item["boxes"] * torch.tensor([image_size[1] / w, image_size[0] / h] * 2)
    item["original_size"] = tuple(item["image"].shape[-2:])
    return collate([item])


def setup(
    overrides: Sequence[str], seed: int = 0, device: str = "cpu", image_size: Sequence[int] | None = None
) -> tuple[DictConfig, FasterRCNN, DetectionBatch]:
    """The composed config (untrained weights, nothing downloaded), our model seeded with ``seed``
    on ``device`` and the bench's batch (:func:`load_batch`). On a GPU ``trainer.benchmark``
    (``trainer=gpu``: true) sets ``cudnn.benchmark`` as Lightning's Trainer would, for every
    contender of the process."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(list(overrides), output_dir=tmp, pretrained=False)
    if torch.device(device).type == "cuda" and cfg.trainer.get("benchmark") is not None:
        torch.backends.cudnn.benchmark = bool(cfg.trainer.benchmark)
    torch.manual_seed(seed)
    model = build_model(model_config(cfg), pretrained=False)
    return cfg, model.to(device), load_batch(cfg, image_size).to(device)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA), so that a timer reads the work, not its launch."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# ---------------------------------------------------------------------------- contenders
class Contender:
    """One detector with its optimiser, on the bench's batch.

    ``kind`` ``"ours"`` runs :meth:`FasterRCNN.losses` and :meth:`FasterRCNN.predict`,
    ``"torchvision"`` torchvision's ``forward`` in train and eval mode. The optimiser is the
    same for all: SGD, lr 1e-3, momentum 0.9, weight decay 5e-4, all trainable parameters.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        kind: str,
        batch: DetectionBatch,
        autocast: Callable = contextlib.nullcontext,
        sync: Callable[[], None] = lambda: None,
    ) -> None:
        self.name, self.model, self.kind = name, model, kind
        self.autocast, self.sync = autocast, sync
        self.images, self.sizes = batch.images, batch.image_sizes
        self.boxes, self.labels = training_targets(batch)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4, foreach=True)
        self.train_times: list[tuple[float, float, float]] = []  # (forward, backward, step) wall seconds
        self.train_cpu: list[float] = []
        self.train_cpu_split: list[tuple[float, float, float]] = []
        self.infer_times: list[float] = []  # per image
        self.infer_cpu: list[float] = []

    def loss(self) -> Tensor:
        if self.kind == "ours":
            return self.model.losses(self.images, self.sizes, self.sizes, self.boxes, self.labels)["loss"]
        targets = [{"boxes": b, "labels": lab} for b, lab in zip(self.boxes, self.labels)]
        return sum(self.model(list(self.images), targets).values())

    def detect(self) -> list[dict[str, Tensor]]:
        if self.kind == "ours":
            return self.model.predict(self.images, self.sizes, self.sizes)
        return self.model(list(self.images))

    def train_step(self, record: bool = False) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """One training step: wall-clock and CPU seconds of (forward, backward, optimiser step),
        kept in :meth:`runs` when ``record``."""
        self.model.train()
        marks = [self._mark()]
        with self.autocast():
            loss = self.loss()
        marks.append(self._mark())
        loss.backward()
        marks.append(self._mark())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(self._mark())
        (w0, c0), (w1, c1), (w2, c2), (w3, c3) = marks
        wall, cpu = (w1 - w0, w2 - w1, w3 - w2), (c1 - c0, c2 - c1, c3 - c2)
        if record:
            self.train_times.append(wall)
            self.train_cpu.append(sum(cpu))
            self.train_cpu_split.append(cpu)
        return wall, cpu

    def infer(self, record: bool = False) -> tuple[float, float]:
        """Inference on the batch: wall-clock and CPU seconds per image, kept in :meth:`runs`
        when ``record``."""
        self.model.eval()
        start = self._mark()
        with torch.no_grad(), self.autocast():
            self.detect()
        end = self._mark()
        wall, cpu = (end[0] - start[0]) / len(self.sizes), (end[1] - start[1]) / len(self.sizes)
        if record:
            self.infer_times.append(wall)
            self.infer_cpu.append(cpu)
        return wall, cpu

    def runs(self) -> dict[str, list[float]]:
        """The recorded runs: ``train`` and ``infer`` (per image) in wall-clock seconds,
        ``train_cpu`` and ``infer_cpu`` in CPU seconds."""
        return {"train": [sum(t) for t in self.train_times], "infer": self.infer_times, "train_cpu": self.train_cpu, "infer_cpu": self.infer_cpu}

    def _mark(self) -> tuple[float, float]:
        self.sync()
        return time.perf_counter(), time.process_time()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_interleaved(contenders: Sequence[Contender], warmup: int, repeats: int, log: Log = print) -> None:
    """Training steps, then inference, round by round, the order alternating every round, so
    that drift and other processes hit all contenders; rounds after ``warmup`` are recorded."""
    for r in range(warmup + repeats):
        order = contenders if r % 2 == 0 else contenders[::-1]
        measured = r >= warmup
        for c in order:
            c.train_step(record=measured)
        for c in order:
            c.infer(record=measured)
        label = f"run {r - warmup + 1}/{repeats}" if measured else "warm-up"
        log(f"  {label}: " + ", ".join(f"{c.name} train {sum(c.train_times[-1]) if measured else float('nan'):.3f}s" for c in contenders))


# ---------------------------------------------------------------------------- memory (child processes)
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory(name: str, overrides: Sequence[str], seed: int, device: str, threads: int | None, image_size: Sequence[int] | None) -> dict:
    """In this process (meant to be a fresh one): build one contender (``ours``, ``torchvision``
    or ``torchvision_same``), reset the peak RSS (Linux ``VmHWM``), run two training steps (the
    optimiser's state exists from the second on) and an inference; the growth of the peak over
    the post-build RSS, in MiB. On a GPU also the peak of the memory torch allocated there
    (``torch.cuda.max_memory_allocated``, reset after the build) and its growth over the built
    model, and the peak the caching allocator reserved."""
    from fasterrcnn.bench.twin import torchvision_twin

    if threads:
        torch.set_num_threads(threads)
    cfg, model, batch = setup(overrides, seed, device, image_size)
    ours_settings = name in ("ours", "torchvision_same")
    autocast = autocast_factory(str(cfg.trainer.precision), batch.images.device) if ours_settings else contextlib.nullcontext
    if name == "ours":
        contender = Contender(name, model, "ours", batch, autocast)
    else:
        tv = torchvision_twin(model, channels_last=ours_settings and model.channels_last)
        del model
        contender = Contender(name, tv, "torchvision", batch, autocast)
    gc.collect()
    cuda = batch.images.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()
    base = _proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
        reset = True
    except OSError:
        reset = False
    contender.train_step()
    contender.train_step()
    contender.infer()
    peak = _proc_status_kib("VmHWM")
    out = {"rss_after_build_mib": base / 1024, "peak_rss_mib": peak / 1024, "peak_growth_mib": (peak - base) / 1024, "peak_reset": reset}
    if cuda:
        torch.cuda.synchronize()
        gpu_peak = torch.cuda.max_memory_allocated()
        out.update(
            gpu_after_build_mib=gpu_base / 2**20,
            peak_gpu_mib=gpu_peak / 2**20,
            peak_gpu_growth_mib=(gpu_peak - gpu_base) / 2**20,
            peak_gpu_reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
        )
    return out


def measure_memory(
    names: Sequence[str],
    overrides: Sequence[str],
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    image_size: Sequence[int] | None = None,
    log: Log = print,
) -> dict[str, dict]:
    """:func:`peak_memory` of each contender, each in a fresh spawned child process."""
    result = {}
    for name in names:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                result[name] = pool.submit(peak_memory, name, list(overrides), seed, device, threads, image_size).result()
            except BrokenProcessPool as err:
                raise RuntimeError(f"memory measurement of {name}: the child process died (an error above, or killed by the OS for memory?)") from err
        gpu = f", peak GPU {result[name]['peak_gpu_mib']:.0f} MiB (+{result[name]['peak_gpu_growth_mib']:.0f})" if "peak_gpu_mib" in result[name] else ""
        log(f"  {name}: peak RSS {result[name]['peak_rss_mib']:.0f} MiB (+{result[name]['peak_growth_mib']:.0f} MiB over the built model){gpu}")
    return result


# ---------------------------------------------------------------------------- data loading, machine
def data_throughput(cfg: DictConfig, num_images: int) -> float:
    """Images per second the config's training DataLoader delivers (after its first batch)."""
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    next(loader)
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += len(batch)
        if n >= num_images:
            break
    return n / (time.perf_counter() - t0)


def machine() -> dict[str, str | int]:
    """The CPU, its cores, torch's threads and version, the load average now and, where CUDA
    is available, the GPU and the CUDA version torch was built with."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pass
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    out: dict[str, str | int] = {"cpu": cpu, "cores": os.cpu_count() or 0, "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "load_average": load}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = str(torch.version.cuda)
    return out

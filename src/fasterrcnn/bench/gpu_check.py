"""The prepared GPU check (issue 14; ``scripts/gpu_check.py``): everything below on one GPU in at
most :data:`BUDGET_S` seconds, each part a subprocess with its own timeout (never more than the
budget has left, so the timeouts sum to at most the budget), its figures in one JSON and a table.

Parts (:data:`PARTS`, in this order; ``--parts`` picks some, e.g. to rerun one after a fix):

* ``data``: the built-in dataset, generated once into the check's data folder (the other parts
  read it);
* ``tests``: the suite's CUDA-marked tests (``pytest -m cuda tests``: creators, losses and
  detections against the CPU, host syncs, pinned batches, training steps in fp32 and bf16, the
  evaluation of their checkpoint); counts from pytest's JUnit XML;
* ``bench_fp32``, ``bench_bf16``: ``scripts/bench.py --device cuda`` at VGG16 600x1000
  (untrained weights, the paper's anchors and sampler) against torchvision's FasterRCNN
  configured identically, in fp32 and under bf16 autocast: training and inference images per
  second, the ratios, peak GPU memory, our stage split, the data loader against training;
* ``train``: the default recipe (``python src/train.py``, tiny backbone, built-in data) for
  :data:`TRAIN_STEPS` steps on the GPU (``trainer=gpu``): its final val mAP and steps/s;
* ``ddp``: the same through ``trainer=ddp`` with one GPU, :data:`DDP_STEPS` steps;
* ``bench_compile``: ``bench_fp32`` with ``model.compile=true``, last, in what is left of the
  budget (compiling VGG16 takes a while): does torch.compile win on the GPU?

``device="cpu", tiny=True`` is the dry run of the same parts on the CPU at tiny sizes (tiny
backbone, small images, a few steps, ``trainer.accelerator=cpu``): it checks the commands and
the reading of their outputs, not the GPU; ``tests/test_gpu_check.py`` runs it. Nothing is
marked measured on a GPU unless ``gpu_check.json``'s ``measured_on_gpu`` is true.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
BUDGET_S = 480.0  # 8 minutes for the whole check
MIN_PART_S = 20.0  # a part that would get less than this is skipped, not started
TRAIN_STEPS = 300
DDP_STEPS = 50
NUM_WORKERS = 4  # DataLoader workers of the GPU runs (the bench reports what they deliver against training)
PARTS = ("data", "tests", "bench_fp32", "bench_bf16", "train", "ddp", "bench_compile")
# Each part's timeout in seconds (its cap; never more than the budget has left): on the GPU the
# first six sum to the budget, so bench_compile runs only in what they leave; the dry run's caps.
TIMEOUTS = {"data": 45, "tests": 100, "bench_fp32": 100, "bench_bf16": 90, "train": 90, "ddp": 55, "bench_compile": 480}
TINY_TIMEOUTS = {"data": 30, "tests": 60, "bench_fp32": 60, "bench_bf16": 60, "train": 60, "ddp": 60, "bench_compile": 120}
# The check's own small data in the dry run (as tests/conftest.py's SMALL_DATA).
TINY_DATA = ["data.builtin.num_train=24", "data.builtin.num_val=8", "data.builtin.num_test=8", "data.builtin.num_test_shift=8"]
TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
VGG16 = ["backbone=vgg16", "anchor=k9", "sampler=default", "data.min_size=600", "data.max_size=1000"]

Log = Callable[[str], None]


@dataclass
class Part:
    """One subprocess of the check: ``argv`` run in the repository with ``timeout_s`` (a cap),
    its output in ``<run>/<name>.log``; ``read`` turns what it wrote into figures."""

    name: str
    description: str
    argv: list[str]
    timeout_s: float
    read: Callable[[Path], dict] = field(repr=False, default=lambda run: {})


def plan(run: Path, device: str = "cuda", tiny: bool = False, python: str = sys.executable) -> list[Part]:
    """The parts of :data:`PARTS` for ``device``, writing under ``run``; ``tiny``: the dry run's sizes."""
    data_dir = run / "data"
    data = [f"paths.data_dir={data_dir}", *(TINY_DATA if tiny else [])]
    timeout = TINY_TIMEOUTS if tiny else TIMEOUTS

    if tiny:
        bench_options = ["--image-size", "96", "128", "--repeats", "1", "--warmup", "0", "--data-images", "2", "--no-memory"]
        bench_overrides = TINY_NET
    else:
        bench_options = ["--image-size", "600", "1000", "--repeats", "5", "--warmup", "2", "--data-images", "40"]
        bench_overrides = [*VGG16, f"data.num_workers={NUM_WORKERS}", "trainer=gpu"]  # trainer=gpu: cudnn.benchmark (one image size)

    def bench(name: str, overrides: Sequence[str], options: Sequence[str] = ()) -> Part:
        """``options`` come after the common ones (argparse keeps the last of each)."""
        out = run / f"{name}.json"
        argv = [python, str(REPO / "scripts" / "bench.py"), "--device", device, "--out", str(out), *bench_options, *options, "~experiment", *bench_overrides, *data, *overrides]
        return Part(name, f"scripts/bench.py --device {device} {' '.join(overrides) or 'fp32'}", argv, timeout[name], lambda run, out=out: _bench_figures(out))

    accelerator = ["trainer.accelerator=cpu"] if device == "cpu" else []
    # The built-in data has ~300 image sizes in 1000 images: cudnn.benchmark off (conf/trainer/gpu.yaml's rule).
    train_common = ["logger=csv", "evaluation.coco=false", "trainer.enable_progress_bar=false", "trainer.max_epochs=1", "trainer.benchmark=false", *data, *accelerator]
    if tiny:
        train_common += [*TINY_NET, "data.min_size=128", "data.max_size=200", "trainer.limit_val_batches=2"]
    else:
        train_common += [f"data.num_workers={NUM_WORKERS}"]
    train_steps, ddp_steps = (3, 2) if tiny else (TRAIN_STEPS, DDP_STEPS)

    def train(name: str, trainer: Sequence[str], steps: int) -> Part:
        folder = run / name
        argv = [python, str(REPO / "src" / "train.py"), *trainer, f"trainer.max_steps={steps}", *train_common, f"hydra.run.dir={folder}"]
        return Part(name, f"src/train.py {' '.join(trainer)}, {steps} steps", argv, timeout[name], lambda run, folder=folder: _train_figures(folder))

    ensure = (
        "import sys; from fasterrcnn.build import build_datamodule, compose_config; "
        "dm = build_datamodule(compose_config(sys.argv[1:], output_dir='unused', pretrained=False)); dm.prepare_data(); print('data ready')"
    )
    tests_xml = run / "tests.xml"
    parts = [
        Part("data", "the built-in dataset, generated once", [python, "-c", ensure, *data], timeout["data"]),
        Part(
            "tests",
            "pytest -m cuda tests",
            [python, "-m", "pytest", "-q", "-m", "cuda", "-rs", "-p", "no:cacheprovider", f"--junitxml={tests_xml}", *cuda_test_files()],
            timeout["tests"],
            lambda run: _junit_figures(tests_xml),
        ),
        bench("bench_fp32", []),
        bench("bench_bf16", ["trainer.precision=bf16-mixed"]),
        train("train", ["trainer=gpu"], train_steps),
        train("ddp", ["trainer=ddp", "trainer.devices=1"], ddp_steps),
        # two warm-up rounds: the training and inference graphs compile in the first, the RoI counts' dynamic shapes in the second
        bench("bench_compile", ["model.compile=true"], ["--repeats", "1" if tiny else "3", "--warmup", "2", "--no-memory", "--data-images", "0"]),
    ]
    assert tuple(p.name for p in parts) == PARTS
    return parts


def cuda_test_files() -> list[str]:
    """The test files with CUDA-marked tests (``pytest.mark.cuda``): only those are collected, so
    that a test module needing a package the GPU machine lacks (wandb, say) cannot stop the run."""
    return [str(p) for p in sorted((REPO / "tests").glob("test_*.py")) if "mark.cuda" in p.read_text()]


# ---------------------------------------------------------------------------- reading the parts' outputs
def _junit_figures(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase") if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"], "failed_tests": failed}


def _bench_figures(path: Path) -> dict:
    result = json.loads(path.read_text())
    names = list(result["train_s"])
    out: dict = {
        "settings": result["config"]["settings"],
        "image_size": result["config"]["image_size"],
        "train_img_per_s": {n: 1.0 / result["train_s"][n] for n in names},
        "infer_img_per_s": {n: 1.0 / result["infer_s"][n] for n in names},
        "train_ratio": result["train_ratio"],
        "infer_ratio": result["infer_ratio"],
    }
    for key in ("train_ratio_same_settings", "infer_ratio_same_settings"):
        if key in result:
            out[key] = result[key]
    memory = result.get("memory") or {}
    if memory:
        key = "peak_gpu_mib" if any("peak_gpu_mib" in m for m in memory.values()) else "peak_growth_mib"
        out["memory_key"] = key
        out["peak_memory_mib"] = {n: m.get(key) for n, m in memory.items()}
    split = result["split"]
    out["split_ms"] = {
        "train_forward": {k: 1000 * v for k, v in split["train_forward"].items()},
        "backward": 1000 * split["backward_s"],
        "optimizer": 1000 * split["optimizer_s"],
        "infer": {k: 1000 * v for k, v in split["infer"].items()},
        "outside_share_wall": split.get("outside_share_wall"),
    }
    if "data" in result:
        out["data"] = result["data"]
    out["twin_inference_diff"] = result["twin_inference_diff"]
    out["machine"] = result["machine"]
    return out


def _train_figures(folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    final = metrics.get("final") or {}
    seconds = (metrics.get("time_s") or {}).get("training") or metrics.get("train_time_s")
    steps = metrics.get("steps")
    return {
        "status": metrics.get("status"),
        "steps": steps,
        "val_map": final.get("val/map"),
        "val_num_images": final.get("val/num_images"),
        "training_s": seconds,
        "steps_per_s": steps / seconds if steps and seconds else None,
        "time_s": metrics.get("time_s"),
    }


# ---------------------------------------------------------------------------- running
def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-chars:]


def run_part(part: Part, run: Path, timeout_s: float, env: dict) -> dict:
    """Run one part: its status (``ok``, ``failed``, ``timeout``), seconds, return code, figures
    (or why there are none) and the tail of its log."""
    log_path = run / f"{part.name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(part.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
            status, code = ("ok" if proc.returncode == 0 else "failed"), proc.returncode
        except subprocess.TimeoutExpired:
            status, code = "timeout", None
    record: dict = {"status": status, "seconds": round(time.perf_counter() - start, 1), "timeout_s": round(timeout_s, 1), "returncode": code}
    try:
        record["figures"] = part.read(run)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, ET.ParseError) as err:
        record["figures"] = {}
        record["figures_error"] = f"{type(err).__name__}: {err}"
    record["command"] = part.argv
    record["log"] = str(log_path)
    record["log_tail"] = _tail(log_path)
    return record


def child_env(device: str) -> dict:
    """The parts' environment: this checkout's ``src`` first on the path (the package need not be
    installed), unbuffered output, no wandb, and on the CPU no GPU at all."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="disabled", WANDB_SILENT="true")
    env.pop("LOCAL_RANK", None)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def check(
    out: Path | None = None,
    device: str = "cuda",
    tiny: bool = False,
    parts: Sequence[str] | None = None,
    budget_s: float = BUDGET_S,
    copy_to: Path | None = None,
    log: Log = print,
) -> dict:
    """Run the check (module docstring) into ``out`` (default ``outputs/gpu_check/<time>``) and
    return what ``gpu_check.json`` holds; ``copy_to``: also put ``gpu_check.json``, the table and
    a ``.tar.gz`` of the run folder (logs, each part's JSON and metrics; no checkpoints or data)
    there, e.g. the device machine's ``$OUT``."""
    import torch

    chosen = list(parts or PARTS)
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    run = Path(out) if out else REPO / "outputs" / "gpu_check" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    run.mkdir(parents=True, exist_ok=True)
    gpu = device == "cuda" and torch.cuda.is_available()
    if device == "cuda" and not gpu:
        raise RuntimeError("gpu_check --device cuda: torch sees no CUDA GPU here (the dry run is --device cpu --tiny)")
    from fasterrcnn.bench.harness import machine

    result: dict = {
        "device": device,
        "tiny": tiny,
        "measured_on_gpu": gpu,
        "started": datetime.now().isoformat(timespec="seconds"),
        "budget_s": budget_s,
        "machine": machine(),
        "parts": {},
    }
    env = child_env(device)
    start = time.perf_counter()
    for part in plan(run, device, tiny):
        if part.name not in chosen:
            continue
        left = budget_s - (time.perf_counter() - start)
        if left < MIN_PART_S:
            result["parts"][part.name] = {"status": "skipped", "why": f"{left:.0f} s of the {budget_s:.0f} s budget left", "command": part.argv}
            log(f"[{part.name}] skipped: {left:.0f} s of the budget left")
            continue
        timeout = min(part.timeout_s, left)
        log(f"[{part.name}] {part.description} (timeout {timeout:.0f} s) ...")
        record = run_part(part, run, timeout, env)
        result["parts"][part.name] = record
        log(f"[{part.name}] {record['status']} in {record['seconds']:.1f} s")
        if record["status"] != "ok":
            log("  " + record["log_tail"][-1500:].replace("\n", "\n  "))
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    fp32, compiled = result["parts"].get("bench_fp32", {}), result["parts"].get("bench_compile", {})
    if fp32.get("figures") and compiled.get("figures"):
        f, c = fp32["figures"], compiled["figures"]
        result["compile_speedup"] = {
            "train": c["train_img_per_s"]["ours"] / f["train_img_per_s"]["ours"],
            "infer": c["infer_img_per_s"]["ours"] / f["infer_img_per_s"]["ours"],
        }
    text = table(result)
    (run / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (run / "gpu_check.txt").write_text(text + "\n")
    log("\n" + text)
    log(f"\nwrote {run / 'gpu_check.json'}")
    if copy_to is not None:
        copy_to = Path(copy_to)
        copy_to.mkdir(parents=True, exist_ok=True)
        (copy_to / "gpu_check.json").write_text(json.dumps(result, indent=2))
        (copy_to / "gpu_check.txt").write_text(text + "\n")
        with tarfile.open(copy_to / "gpu_check_run.tar.gz", "w:gz") as tar:
            data = f"{run.name}/data"
            skip = lambda info: info.name.endswith(".ckpt") or info.name == data or info.name.startswith(data + "/")  # noqa: E731
            tar.add(run, arcname=run.name, filter=lambda info: None if skip(info) else info)
        log(f"copied gpu_check.json, gpu_check.txt and gpu_check_run.tar.gz to {copy_to}")
    return result


# ---------------------------------------------------------------------------- the table
def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict) -> str:
    """The check's figures, one line each: ``part | figure | value``."""
    rows: list[tuple[str, str, str]] = []
    where = "GPU" if result["measured_on_gpu"] else f"{result['device'].upper()} dry run{' (tiny sizes)' if result['tiny'] else ''}: no GPU figure"
    for name, rec in result["parts"].items():
        rows.append((name, "status", f"{rec['status']}" + (f" in {rec['seconds']:.0f} s (timeout {rec['timeout_s']:.0f} s)" if "seconds" in rec else f" ({rec.get('why', '')})")))
        f = rec.get("figures") or {}
        if rec.get("figures_error"):
            rows.append((name, "figures", rec["figures_error"]))
        if name == "tests" and f:
            rows.append((name, "passed / failed / errors / skipped", f"{f['passed']} / {f['failures']} / {f['errors']} / {f['skipped']}"))
            for test in f["failed_tests"]:
                rows.append((name, "failed", test))
        elif name.startswith("bench") and f:
            names = list(f["train_img_per_s"])
            rows.append((name, "settings, image", f"{f['settings']}, {f['image_size'][0]}x{f['image_size'][1]}"))
            rows.append((name, "training img/s: " + " / ".join(names), " / ".join(_fmt(f["train_img_per_s"][n], ".1f") for n in names)))
            rows.append((name, "inference img/s: " + " / ".join(names), " / ".join(_fmt(f["infer_img_per_s"][n], ".1f") for n in names)))
            rows.append((name, "time ours / torchvision: training, inference", f"{f['train_ratio']:.3f}, {f['infer_ratio']:.3f}"))
            if "train_ratio_same_settings" in f:
                rows.append((name, "  against torchvision with our settings", f"{f['train_ratio_same_settings']:.3f}, {f['infer_ratio_same_settings']:.3f}"))
            if "peak_memory_mib" in f:
                label = "peak GPU memory (MiB)" if f["memory_key"] == "peak_gpu_mib" else "peak RSS growth (MiB)"
                rows.append((name, f"{label}: " + " / ".join(f["peak_memory_mib"]), " / ".join(_fmt(v, ".0f") for v in f["peak_memory_mib"].values())))
            split = f["split_ms"]
            rows.append((name, "our training forward (ms)", ", ".join(f"{k} {v:.1f}" for k, v in split["train_forward"].items())))
            rows.append((name, "  backward, optimiser step (ms)", f"{split['backward']:.1f}, {split['optimizer']:.1f}"))
            rows.append((name, "our inference (ms)", ", ".join(f"{k} {v:.1f}" for k, v in split["infer"].items())))
            if split.get("outside_share_wall") is not None:
                rows.append((name, "outside trunk and RoI head layers", f"{split['outside_share_wall']:.1%} of a training step"))
            if "data" in f:
                d = f["data"]
                rows.append((name, f"data loader ({d['num_workers']} workers) / training", f"{d['images_per_s']:.1f} img/s / {d['train_steps_per_s']:.2f} steps/s = x{d['ratio']:.1f}"))
        elif name in ("train", "ddp") and f:
            rows.append((name, "steps, val mAP (VOC07)", f"{f['steps']}, {_fmt(f['val_map'], '.4f')} on {_fmt(f['val_num_images'], '.0f')} images"))
            rows.append((name, "training steps/s", _fmt(f["steps_per_s"])))
    if "compile_speedup" in result:
        s = result["compile_speedup"]
        rows.append(("bench_compile", "model.compile speed-up: training, inference", f"x{s['train']:.2f}, x{s['infer']:.2f}"))
    width = max((len(r[1]) for r in rows), default=10)
    lines = [f"gpu_check on {where}; {result['machine'].get('gpu', result['machine'].get('cpu'))}, torch {result['machine']['torch']}; {result.get('elapsed_s', 0):.0f} s of {result['budget_s']:.0f} s"]
    lines += [f"{part:14} {label:{width}}  {value}" for part, label, value in rows]
    return "\n".join(lines)

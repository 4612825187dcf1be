"""The GPU paths (issue 14): everything on the model's device, equal to the CPU within float
tolerance, and no host synchronisation in a training step but the listed ones.

* CUDA-marked tests (``pytest -m cuda``; ``scripts/gpu_check.py`` runs them) skip without a GPU:
  the creators on CUDA against the CPU, the detector's losses and detections on CUDA against the
  CPU (float64, so that score order is the algorithm's, not rounding's), a host-sync check with
  ``torch.cuda.set_sync_debug_mode("error")``, pinned non-blocking batches, a few Lightning
  training steps in fp32 and bf16, and the evaluation of the tiny checkpoint they wrote.
* The other tests run everywhere: :class:`HostSyncAudit` traces the torch calls of one training
  step that would make the host wait for a GPU (on CPU tensors, with ProposalCreator's GPU
  branch) and checks them against :data:`ALLOWED_SYNCS`; ``model.compile=true`` gives the
  eager model's losses; the GPU trainer configs.

``FASTERRCNN_TEST_DEVICE=cpu`` runs the CUDA tests' comparisons with the CPU standing in for the
GPU (a dry run of their logic; the tests that need CUDA itself still skip).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torchvision.ops import nms

import fasterrcnn.creators
from fasterrcnn.anchors import AnchorGenerator
from fasterrcnn.build import build_model, model_config, to_container
from fasterrcnn.creators import AnchorTargetCreator, ProposalCreator, ProposalTargetCreator
from fasterrcnn.data import DetectionBatch, collate
from fasterrcnn.lit import FasterRCNNModule
from fasterrcnn.matcher import Matcher

from .conftest import SMALL_DATA, compose_config

DEVICE = os.environ.get("FASTERRCNN_TEST_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda" and torch.cuda.is_available()
cuda = [pytest.mark.cuda, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (not only a stand-in device)")]

TINY = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
FEW_STEPS = ["trainer.max_steps=3", "trainer.max_epochs=1", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false"]
# trainer=gpu (the CPU's accelerator when it stands in for the GPU); no COCO-style mAP (pycocotools)
GPU_TRAINER = ["trainer=gpu", "evaluation.coco=false", *(["trainer.accelerator=cpu"] if DEVICE == "cpu" else [])]


def apply(marks):
    def decorate(fn):
        for mark in reversed(marks):
            fn = mark(fn)
        return fn

    return decorate


def _tiny_model(overrides=(), seed=0):
    cfg = compose_config(["paths.output_dir=/tmp/unused", *TINY, *overrides])
    torch.manual_seed(seed)
    return build_model(model_config(cfg))


def _gt(device=None, dtype=torch.float32, n=1):
    """Ground truth of ``n`` images in input coordinates: N ``(2, 4)`` boxes and ``(2,)`` labels."""
    boxes = torch.tensor([[20.0, 30.0, 90.0, 120.0], [100.0, 40.0, 180.0, 100.0]], dtype=dtype, device=device)
    return [boxes + 5 * i for i in range(n)], [torch.tensor([3, 1 + i], device=device) for i in range(n)]


@contextlib.contextmanager
def ieee_fp32():
    """No TF32 in cuDNN's convolutions or cuBLAS's matmuls (both may default to it on Ampere and later)."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def host_rand(monkeypatch):
    """``torch.rand`` drawn on the CPU and moved to the requested device, so that the creators'
    random sampling keys are the same numbers on both devices (the CUDA generator's differ)."""
    rand = torch.rand

    def on_host(*size, device=None, **kwargs):
        return rand(*size, **kwargs).to(device)

    with monkeypatch.context() as m:
        m.setattr(torch, "rand", on_host)
        yield


# ---------------------------------------------------------------------------- host syncs, traced on any device
# Every call of one training step that makes the host wait for a GPU, by call site
# (file, function, torch call), with its count per image (None: once per step) and why it stays.
ALLOWED_SYNCS = {
    ("creators.py", "_candidates", "where"): (
        1,
        "ProposalCreator: torchvision's remove_small_boxes returns the indices of the boxes it keeps (a count that depends on the data)",
    ),
    ("creators.py", "_select", "nms"): (
        1,
        "ProposalCreator: torchvision's CUDA NMS builds the overlap mask on the GPU and makes its greedy pass on the host",
    ),
    ("lit.py", "training_targets", "__getitem__"): (
        2,
        "training_targets: difficult objects leave the ground truth through a boolean mask (boxes, labels); removable only "
        "by computing the index on the host before the transfer (data/batch.py)",
    ),
    ("lit.py", "training_step", "__bool__"): (None, "the non-finite-loss check, before backward: the step's deliberate sync"),
}
# Tensor methods and torch functions that wait for a GPU when they run on one.
SYNC_CALLS = frozenset(
    {
        "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__format__", "numpy", "cpu",
        "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "repeat_interleave",
        "equal", "allclose", "new_tensor", "nms",
    }
)  # fmt: skip
_LIBRARIES = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules["torchvision"]))
_COMPREHENSIONS = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    if name in SYNC_CALLS:
        return True
    if name in ("tensor", "as_tensor"):  # from Python data: a blocking copy when it goes to a GPU
        return kwargs.get("device") not in (None, "cpu")
    if name == "where":  # torch.where(condition): nonzero
        return len(args) + len(kwargs) == 1
    if name == "to":  # to the host
        return any(a == "cpu" or (isinstance(a, torch.device) and a.type == "cpu") for a in (*args[1:], *kwargs.values()))
    if name in ("__getitem__", "__setitem__", "index_put_", "index_put"):  # a boolean mask: nonzero
        index = args[1] if len(args) > 1 else ()
        parts = index if isinstance(index, (tuple, list)) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)
    return False


class HostSyncAudit(TorchFunctionMode):
    """Records the torch calls that would make the host wait for a GPU (:data:`SYNC_CALLS`, boolean
    masks, one-argument ``where``, copies to the host and from Python data), by the call site in
    our code: the first caller outside torch and torchvision, comprehensions folded into their
    function. Works on any device: it reads the calls, not the GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[str, str, str]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _is_sync(name, args, kwargs):
            frame = sys._getframe(1)
            while frame is not None and (
                frame.f_code.co_filename.startswith(_LIBRARIES) or frame.f_code.co_name in _COMPREHENSIONS or frame.f_code is _gpu_nms.__code__
            ):
                frame = frame.f_back
            site = (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name) if frame is not None else ("?", "?")
            self.calls[(*site, name)] += 1
        return func(*args, **kwargs)


def _gpu_nms(boxes, scores, thresh, k):
    """ProposalCreator's GPU branch, ``nms(...)[:k]`` (the audit counts its NMS at ProposalCreator)."""
    return nms(boxes, scores, thresh)[:k]


def _gpu_branch(monkeypatch):
    """The creators' GPU branches on CPU tensors: the CPU branches' nms_topk (ProposalCreator)
    and topk with a host-side count (``smallest``, the samplers) are CPU-only and make syncs
    that never run on a GPU."""
    monkeypatch.setattr(fasterrcnn.creators, "nms_topk", _gpu_nms)
    monkeypatch.setattr(fasterrcnn.creators, "smallest", lambda keys, k: fasterrcnn.creators._rank(keys) < k)


def _batch(device="cpu", n=2) -> DetectionBatch:
    g = torch.Generator().manual_seed(3)
    items = [
        {
            "image": torch.randn(3, 160, 224, generator=g),
            "original_size": (320, 448),
            "boxes": torch.tensor([[20.0, 30.0, 90.0, 120.0], [5.0, 5.0, 50.0, 50.0], [100.0, 40.0, 180.0, 100.0]]),
            "labels": torch.tensor([3, 1, 2]),
            "difficult": torch.tensor([False, True, False]),
            "original_boxes": torch.tensor([[40.0, 60.0, 180.0, 240.0], [10.0, 10.0, 100.0, 100.0], [200.0, 80.0, 360.0, 200.0]]),
            "image_id": f"img{i}",
        }
        for i in range(n)
    ]
    return collate(items).to(device)


def test_a_training_step_syncs_the_host_only_where_listed(monkeypatch):
    _gpu_branch(monkeypatch)
    cfg = compose_config(["paths.output_dir=/tmp/unused", *TINY])
    module = FasterRCNNModule(model_config(cfg), optim=to_container(cfg.optim))
    n = 2
    batch = _batch(n=n)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log")  # no Trainer: self.log warns and returns
        module.training_step(batch, 0)  # first-call work (anchor cache) out of the way
        with HostSyncAudit() as audit:
            loss = module.training_step(batch, 0)
            loss.backward()
    unexpected = {site: count for site, count in audit.calls.items() if site not in ALLOWED_SYNCS}
    assert not unexpected, f"host syncs in the training step that ALLOWED_SYNCS does not list (remove them, or list them with why): {unexpected}"
    expected = {site: n * per_image if per_image else 1 for site, (per_image, _) in ALLOWED_SYNCS.items()}
    assert {site: audit.calls[site] for site in ALLOWED_SYNCS} == expected


def test_the_audit_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with HostSyncAudit() as audit:
        x[x > 2]
        float(x.sum())
        x.nonzero()
        torch.where(x > 1)
        x.new_tensor([1.0])
        torch.where(x > 1, x, 0.0)  # three arguments: no sync
        x[torch.tensor([0, 1])]  # integer index: no sync
    assert {name for _, _, name in audit.calls} == {"__getitem__", "__float__", "nonzero", "where", "new_tensor"}
    assert all(site[:2] == ("test_cuda.py", "test_the_audit_sees_each_kind_of_sync") for site in audit.calls)


# ---------------------------------------------------------------------------- torch.compile and the GPU configs
@pytest.mark.slow
def test_compile_gives_the_eager_losses():
    """model.compile=true (torch.compile of the trunk and heads, about 20 s to compile here)."""
    eager = _tiny_model()
    compiled = _tiny_model(["model.compile=true"])
    compiled.load_state_dict(eager.state_dict())
    assert compiled.compiled and list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load either way
    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    sizes = [(96, 128)]
    boxes, labels = [torch.tensor([[20.0, 30.0, 60.0, 80.0]])], [torch.tensor([3])]
    out = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        torch.manual_seed(5)
        out[name] = model.losses(images, sizes, sizes, boxes, labels)
        out[name]["loss"].backward()
    for key in ("rpn_cls", "rpn_loc", "roi_cls", "roi_loc", "loss"):
        torch.testing.assert_close(out["compiled"][key], out["eager"][key], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gpu_trainer_configs():
    base = ["paths.output_dir=/tmp/unused"]
    assert compose_config(base).trainer.benchmark is None and compose_config(base).model.compile is False
    gpu = compose_config([*base, "trainer=gpu"]).trainer
    assert (gpu.accelerator, gpu.devices, gpu.benchmark, gpu.precision) == ("gpu", 1, True, "32-true")
    ddp = compose_config([*base, "trainer=ddp"]).trainer
    assert (ddp.accelerator, ddp.strategy, ddp.benchmark) == ("gpu", "ddp", True)


# ---------------------------------------------------------------------------- the creators on the GPU
@apply(cuda)
def test_matcher_on_the_gpu_equals_the_cpu():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3000, 2, generator=g) * 500
    boxes = torch.cat((xy, xy + 8 + torch.rand(3000, 2, generator=g) * 200), dim=1)
    gt = boxes[torch.randperm(3000, generator=g)[:40]] + torch.randn(40, 4, generator=g) * 3
    valid = torch.rand(3000, generator=g) > 0.2
    for matcher in (Matcher(0.7, 0.3, allow_low_quality_matches=True), Matcher(0.5, (0.1, 0.5), max_chunk_elements=3000 * 7)):
        labels, matched = matcher(boxes, gt, valid)
        labels_d, matched_d = matcher(boxes.to(DEVICE), gt.to(DEVICE), valid.to(DEVICE))
        assert labels_d.device.type == DEVICE
        assert torch.equal(labels_d.cpu(), labels) and torch.equal(matched_d.cpu(), matched)


@apply(cuda)
def test_target_creators_on_the_gpu_equal_the_cpu(monkeypatch):
    anchors = AnchorGenerator(scales=(2, 4, 8))(20, 30)  # 16 px stride: a 320 x 480 image
    gt, gt_labels = torch.tensor([[20.0, 30.0, 90.0, 120.0], [100.0, 40.0, 300.0, 200.0], [250.0, 150.0, 470.0, 310.0]]), torch.tensor([3, 1, 2])
    g = torch.Generator().manual_seed(1)
    rois = torch.cat((gt + torch.randn(3, 4, generator=g) * 5, anchors[torch.randperm(anchors.shape[0], generator=g)[:500]]))
    atc, ptc = AnchorTargetCreator(), ProposalTargetCreator()
    with host_rand(monkeypatch):
        results = {}
        for device in ("cpu", DEVICE):
            torch.manual_seed(7)
            a = atc(anchors.to(device), gt.to(device), (320, 480))
            p = ptc(rois.to(device), gt.to(device), gt_labels.to(device))
            results[device] = [t.cpu() for t in (*a, *p)]
    cpu, dev = results["cpu"], results[DEVICE]
    assert torch.equal(dev[0], cpu[0]) and int((cpu[0] == 1).sum()) > 0  # anchor labels
    torch.testing.assert_close(dev[1], cpu[1], rtol=1e-5, atol=1e-6)  # RPN regression targets
    assert torch.equal(dev[2], cpu[2]) and torch.equal(dev[3], cpu[3]) and torch.equal(dev[4], cpu[4])  # sampled RoIs


@apply(cuda)
def test_proposal_creator_gpu_nms_equals_the_cpu_nms_topk():
    """The GPU runs torchvision's CUDA NMS, the CPU nms_topk: the same proposals."""
    anchors = AnchorGenerator()(38, 50)
    g = torch.Generator().manual_seed(2)
    deltas = torch.randn(anchors.shape[0], 4, generator=g) * 0.1
    scores = torch.rand(anchors.shape[0], generator=g)  # continuous: no ties, whose order NMS leaves open
    pc = ProposalCreator()
    for training in (True, False):
        cpu = pc(deltas, scores, anchors, (600, 800), training=training)
        dev = pc(deltas.to(DEVICE), scores.to(DEVICE), anchors.to(DEVICE), (600, 800), training=training)
        assert dev.device.type == DEVICE and dev.shape == cpu.shape and cpu.shape[0] > 100
        torch.testing.assert_close(dev.cpu(), cpu, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------- the detector on the GPU
def _conditioned_model(seed=0):
    """A tiny detector whose scores lie far apart (RPN and classifier weights scaled up; RoIAlign,
    whose features differ for different RoIs), in float64: the CPU and the GPU then order every
    score alike, and ties, which NMS breaks differently on each device, do not occur."""
    model = _tiny_model(["model.roi_pooling=roi_align"], seed=seed)
    with torch.no_grad():
        model.rpn.score.weight.mul_(100)
        model.roi_head.cls_score.weight.mul_(5)
    return model.double()


def _sorted_detections(dets):
    out = []
    for d in dets:
        order = d["scores"].cpu().sort(descending=True, stable=True).indices
        out.append({k: v.cpu()[order] if k != "proposals" else v.cpu() for k, v in d.items()})  # proposals: by score already
    return out


@apply(cuda)
def test_losses_and_detections_on_the_gpu_equal_the_cpu(monkeypatch):
    cpu_model = _conditioned_model()
    dev_model = copy.deepcopy(cpu_model).to(DEVICE)
    images = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sizes, originals = [(160, 224), (150, 200)], [(320, 448), (300, 400)]
    boxes, labels = _gt(dtype=torch.float64, n=2)
    losses = {}
    with ieee_fp32(), host_rand(monkeypatch):
        for device, model in (("cpu", cpu_model), (DEVICE, dev_model)):
            torch.manual_seed(11)
            losses[device] = model.losses(images.to(device), sizes, sizes, [b.to(device) for b in boxes], [lab.to(device) for lab in labels])
    for key in ("rpn_cls", "rpn_loc", "roi_cls", "roi_loc", "loss", "num_pos_anchors", "num_pos_rois"):
        assert losses[DEVICE][key].device.type == DEVICE
        torch.testing.assert_close(losses[DEVICE][key].cpu(), losses["cpu"][key], rtol=1e-5, atol=1e-7, msg=key)
    cpu_model.eval()
    dev_model.eval()
    cpu = _sorted_detections(cpu_model.predict(images, sizes, originals, return_proposals=True))
    dev = _sorted_detections(dev_model.predict(images.to(DEVICE), sizes, originals, return_proposals=True))
    for c, d in zip(cpu, dev):
        assert c["boxes"].shape[0] > 10 and d["labels"].tolist() == c["labels"].tolist()
        torch.testing.assert_close(d["boxes"], c["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(d["scores"], c["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d["proposals"], c["proposals"], rtol=0, atol=1e-3)


@apply(cuda)
@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_a_training_step_on_the_gpu_stays_there(precision):
    model = _tiny_model().to(DEVICE)
    images = torch.randn(1, 3, 160, 224, device=DEVICE)
    boxes, labels = _gt(DEVICE)
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with autocast:
        trace = model.trace(images, [(160, 224)], [(160, 224)], boxes, labels, detect=True)
    stages = trace.training
    for t in (trace.anchors, stages.anchor_labels, stages.anchor_targets, stages.rois, stages.roi_labels, stages.roi_targets, *stages.losses.values()):
        assert t.device.type == DEVICE
    assert all(v.dtype == torch.float32 for v in stages.losses.values()) and torch.isfinite(stages.losses["loss"])
    stages.losses["loss"].backward()
    assert model.trunk[0][0].weight.grad is not None and model.trunk[0][0].weight.grad.device.type == DEVICE
    dets = trace.testing.detections[0]
    assert dets["boxes"].device.type == DEVICE and dets["boxes"].dtype == torch.float32


@contextlib.contextmanager
def sync_debug(mode):
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def _allowed(fn):
    """``fn`` with sync checks off while it runs (a sync that :data:`ALLOWED_SYNCS` lists)."""

    def call(*args, **kwargs):
        with sync_debug(0):
            return fn(*args, **kwargs)

    return call


@apply(cuda_only)
@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_a_training_step_on_the_gpu_syncs_only_where_listed(monkeypatch, precision):
    """Forward, backward and SGD step under ``torch.cuda.set_sync_debug_mode("error")``, with only
    ProposalCreator's data-dependent counts (ALLOWED_SYNCS) let through: any other sync raises."""
    model = _tiny_model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    images = torch.randn(2, 3, 160, 224, device="cuda")
    sizes = [(160, 224), (150, 200)]
    boxes, labels = _gt("cuda", n=2)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = model.losses(images, sizes, sizes, boxes, labels)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # first calls: anchor cache, cuDNN plans, optimiser state
    torch.cuda.synchronize()
    monkeypatch.setattr(fasterrcnn.creators, "remove_small_boxes", _allowed(fasterrcnn.creators.remove_small_boxes))
    monkeypatch.setattr(fasterrcnn.creators, "nms", _allowed(fasterrcnn.creators.nms))
    with sync_debug("error"):
        step()
    torch.cuda.synchronize()


@apply(cuda_only)
def test_batches_are_pinned_and_copied_without_blocking(make_cfg):
    from fasterrcnn.build import build_datamodule
    from fasterrcnn.data.datamodule import pinned

    batch = _batch()
    pinned_batch = pinned(batch)
    assert pinned_batch.images.is_pinned() and all(t.is_pinned() for t in (*pinned_batch.boxes, *pinned_batch.difficult))
    assert pinned(pinned_batch) is pinned_batch and not batch.images.is_pinned()
    dm = build_datamodule(make_cfg(TINY))
    moved = dm.transfer_batch_to_device(batch, torch.device("cuda"), 0)
    torch.cuda.synchronize()
    assert moved.images.device.type == "cuda" and all(b.device.type == "cuda" for b in moved.boxes)
    assert torch.equal(moved.images.cpu(), batch.images) and torch.equal(moved.boxes[0].cpu(), batch.boxes[0])


# ---------------------------------------------------------------------------- Lightning on the GPU
@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, data_dir):
    """A few fp32 training steps on the GPU (trainer=gpu), then validation: its metrics and checkpoint."""
    from fasterrcnn.training import train

    out = tmp_path_factory.mktemp("gpu_run")
    cfg = compose_config([f"paths.output_dir={out}", f"paths.data_dir={data_dir}", "logger=none", *SMALL_DATA, *TINY, *FEW_STEPS, *GPU_TRAINER])
    return cfg, train(cfg)


@apply(cuda)
def test_training_steps_on_the_gpu(gpu_run):
    _, metrics = gpu_run
    assert metrics["status"] == "completed" and metrics["steps"] == 3
    assert 0.0 <= metrics["final"]["val/map"] <= 1.0 and metrics["final"]["val/num_images"] > 0
    for key in ("val/loss", "val/rpn_cls", "val/roi_loc"):
        assert torch.isfinite(torch.tensor(metrics["final"][key]))


@apply(cuda)
def test_bf16_training_steps_on_the_gpu(tmp_path, data_dir):
    from fasterrcnn.training import train

    cfg = compose_config(
        [f"paths.output_dir={tmp_path}", f"paths.data_dir={data_dir}", "logger=none", *SMALL_DATA, *TINY, *FEW_STEPS, *GPU_TRAINER, "trainer.precision=bf16-mixed"]
    )
    metrics = train(cfg)
    assert metrics["status"] == "completed" and metrics["steps"] == 3 and 0.0 <= metrics["final"]["val/map"] <= 1.0


@apply(cuda)
def test_the_tiny_checkpoint_evaluates_on_the_gpu_as_on_the_cpu(gpu_run):
    from fasterrcnn.bench.accuracy import precision_map

    cfg, metrics = gpu_run
    ckpt = metrics["checkpoints"]["last"]
    assert Path(ckpt).is_file()
    on_gpu = precision_map(cfg, ckpt, DEVICE, log=lambda msg: None)
    on_cpu = precision_map(cfg, ckpt, "cpu", log=lambda msg: None)
    assert on_gpu["fp32"]["images"] == on_cpu["fp32"]["images"] == 8
    assert abs(on_gpu["fp32"]["map"] - on_cpu["fp32"]["map"]) <= 0.01
    assert 0.0 <= on_gpu["bf16"]["map"] <= 1.0

"""Nothing in a checkpoint runs: a model is built only from the project's own ``_target_``s.

A checkpoint of dicts, strings and tensors passes ``torch.load(weights_only=True)``; its
``hyper_parameters.model_cfg`` would then go to Hydra's ``instantiate``, which calls whatever
``_target_`` it names. Each tampered checkpoint below aims at a file in ``tmp_path``: every entry
point (eval, predict, explain, ``FasterRCNNModule.load``) must refuse it, naming the key and the
value, before anything is built.
"""

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from fasterrcnn.build import ALLOWED_TARGETS, CONF_DIR, UnsafeConfigError, build_model, check_config, model_config, to_container
from fasterrcnn.evaluate import evaluate
from fasterrcnn.lit import FasterRCNNModule
from fasterrcnn.predict import PredictError, predict

from .conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
TINY_NET = ["backbone=tiny", "backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
MODEL_GROUPS = ("backbone", "anchor", "sampler", "model")


def write_text(path: Path) -> dict:
    """``Path(path).write_text("pwned")`` as a config."""
    return {"_target_": "pathlib.Path.write_text", "self": {"_target_": "pathlib.Path", "_args_": [str(path)]}, "data": "pwned"}


def _set(keys: str, value):
    """A tampering: ``model_cfg[k1][k2]... = value(files)``."""

    def tamper(model_cfg: dict, files: dict) -> None:
        *parents, last = keys.split(".")
        node = model_cfg
        for key in parents:
            node = node[key]
        node[last] = value(files)

    return tamper


# (name, tampering, the key and the value the error must name)
ATTACKS = [
    ("write_text", _set("backbone", lambda f: write_text(f["pwned"])), "model_cfg.backbone._target_", "pathlib.Path.write_text"),
    ("open", _set("anchor", lambda f: {"_target_": "builtins.open", "_args_": [str(f["victim"]), "w"]}), "model_cfg.anchor._target_", "builtins.open"),
    (
        "subprocess",
        _set("sampler.proposal", lambda f: {"_target_": "subprocess.run", "_args_": [["touch", str(f["pwned"])]]}),
        "model_cfg.sampler.proposal._target_",
        "subprocess.run",
    ),
    (
        "os_system",
        _set("sampler.anchor_target", lambda f: {"_target_": "os.system", "_args_": [f"touch {f['pwned']}"]}),
        "model_cfg.sampler.anchor_target._target_",
        "os.system",
    ),
    (
        "exec",
        _set("sampler.proposal_target", lambda f: {"_target_": "builtins.exec", "_args_": [f"open({str(f['pwned'])!r}, 'w').write('x')"]}),
        "model_cfg.sampler.proposal_target._target_",
        "builtins.exec",
    ),
    ("nested", _set("backbone.widths", lambda f: write_text(f["pwned"])), "model_cfg.backbone.widths._target_", "pathlib.Path.write_text"),
    ("in_args", _set("model._args_", lambda f: [write_text(f["pwned"])]), "model_cfg.model._args_[0]._target_", "pathlib.Path.write_text"),
    (
        "in_partial",
        _set(
            "anchor",
            lambda f: {"_target_": "fasterrcnn.anchors.AnchorGenerator", "_partial_": True, "scales": {"_target_": "builtins.open", "_args_": [str(f["victim"]), "w"]}},
        ),
        "model_cfg.anchor.scales._target_",
        "builtins.open",
    ),
]
ATTACK_IDS = [a[0] for a in ATTACKS]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """An untrained tiny detector saved as Lightning does (``state_dict`` and ``hyper_parameters``
    = ``dict(module.hparams)``), without a training run."""
    cfg = compose_config(TINY_NET)
    module = FasterRCNNModule(
        model_config(cfg), optim=to_container(cfg.optim), use_07_metric=cfg.use_07_metric, evaluation=to_container(cfg.evaluation), on_nonfinite_loss="stop"
    )  # as fasterrcnn.training.train builds it
    return {"state_dict": module.state_dict(), "hyper_parameters": copy.deepcopy(dict(module.hparams))}


@pytest.fixture
def files(tmp_path) -> dict:
    """``victim``: an existing file an attack would truncate; ``pwned``: one it would create."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    return {"victim": victim, "pwned": tmp_path / "pwned.txt"}


def save(checkpoint: dict, path: Path, tamper=None, files=None) -> Path:
    ckpt = copy.deepcopy(checkpoint)
    if tamper is not None:
        tamper(ckpt["hyper_parameters"]["model_cfg"], files)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def assert_untouched(files: dict) -> None:
    assert not files["pwned"].exists(), "the checkpoint created a file"
    assert files["victim"].read_text() == "keep", "the checkpoint truncated a file"


def names(key: str, value: str) -> str:
    return re.escape(f"{key}={value!r}")


def load_explain():
    spec = importlib.util.spec_from_file_location("explain_script", REPO / "scripts" / "explain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "a.png"
    path.parent.mkdir()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(path)
    return path


# ---------------------------------------------------------------------------------- the attacks
def test_the_attacks_are_real_without_the_allowlist(files):
    """Plain ``instantiate`` of such nodes does write and truncate: the tests below guard something."""
    instantiate(write_text(files["pwned"]))
    instantiate({"_target_": "builtins.open", "_args_": [str(files["victim"]), "w"]}).close()
    assert files["pwned"].read_text() == "pwned" and files["victim"].read_text() == ""


@pytest.mark.parametrize("name, tamper, key, value", ATTACKS, ids=ATTACK_IDS)
def test_load_refuses_a_foreign_target(checkpoint, files, tmp_path, name, tamper, key, value):
    ckpt = save(checkpoint, tmp_path / "evil.ckpt", tamper, files)
    with pytest.raises(UnsafeConfigError, match=names(key, value)) as err:
        FasterRCNNModule.load(str(ckpt))
    assert str(ckpt) in str(err.value)
    assert_untouched(files)


@pytest.mark.parametrize("name, tamper, key, value", ATTACKS, ids=ATTACK_IDS)
def test_predict_refuses_a_foreign_target(checkpoint, files, tmp_path, name, tamper, key, value):
    ckpt = save(checkpoint, tmp_path / "evil.ckpt", tamper, files)
    cfg = compose_config([f"ckpt_path={ckpt}", f"input={image(tmp_path)}", f"output={tmp_path / 'out'}", "device=cpu", "min_size=64", "max_size=96"], config_name="predict")
    with pytest.raises(PredictError, match=names(key, value)) as err:
        predict(cfg)
    assert str(ckpt) in str(err.value)
    assert_untouched(files)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, tamper, key, value", ATTACKS, ids=ATTACK_IDS)
def test_eval_refuses_a_foreign_target(checkpoint, files, tmp_path, name, tamper, key, value):
    ckpt = save(checkpoint, tmp_path / "evil.ckpt", tamper, files)
    cfg = compose_config([f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'eval'}", f"paths.data_dir={tmp_path / 'data'}", "device=cpu"], config_name="eval")
    with pytest.raises(PredictError, match=names(key, value)) as err:
        evaluate(cfg)
    assert str(ckpt) in str(err.value)
    assert_untouched(files)
    assert not (tmp_path / "data").exists(), "refused before any data is prepared"


@pytest.mark.parametrize("name, tamper, key, value", ATTACKS, ids=ATTACK_IDS)
def test_explain_refuses_a_foreign_target(checkpoint, files, tmp_path, name, tamper, key, value):
    ckpt = save(checkpoint, tmp_path / "evil.ckpt", tamper, files)
    with pytest.raises(SystemExit, match=names(key, value)) as err:
        load_explain().main(["--ckpt", str(ckpt), "--out", str(tmp_path / "explain"), f"paths.data_dir={tmp_path / 'data'}", *TINY_NET])
    assert str(ckpt) in str(err.value)
    assert_untouched(files)


def test_explain_refuses_a_foreign_target_given_as_an_override(files, tmp_path):
    """Without --ckpt the model comes from the composed config: the same allowlist applies."""
    with pytest.raises(SystemExit, match=names("model_cfg.backbone._target_", "pathlib.Path.write_text")):
        load_explain().main(["--out", str(tmp_path / "explain"), f"paths.data_dir={tmp_path / 'data'}", "backbone._target_=pathlib.Path.write_text"])
    assert_untouched(files)


# ---------------------------------------------------------------------------------- not plain data
@pytest.mark.parametrize(
    "value, message",
    [
        (torch.tensor([0.5, 0.5, 0.5]), r"model_cfg.backbone.mean=tensor\(.*a Tensor is not plain config data"),
        ("${oc.env:HOME}", re.escape("model_cfg.backbone.mean='${oc.env:HOME}': refused, an interpolation")),
        ((0.5, 0.5, 0.5), re.escape("model_cfg.backbone.mean=(0.5, 0.5, 0.5): refused, a tuple")),
    ],
    ids=["tensor", "interpolation", "tuple"],
)
def test_load_refuses_values_that_are_not_plain_data(checkpoint, tmp_path, value, message):
    ckpt = save(checkpoint, tmp_path / "odd.ckpt", _set("backbone.mean", lambda f: value))
    with pytest.raises(UnsafeConfigError, match=message):
        FasterRCNNModule.load(str(ckpt))


def test_a_target_that_is_not_a_string_is_refused():
    with pytest.raises(UnsafeConfigError, match=re.escape("cfg.x._target_=['fasterrcnn.model.FasterRCNN']: refused")):
        check_config({"x": {"_target_": ["fasterrcnn.model.FasterRCNN"]}}, "cfg")


def test_unknown_hyper_parameters_are_refused_not_passed_on(checkpoint, tmp_path):
    ckpt = copy.deepcopy(checkpoint)
    ckpt["hyper_parameters"]["callback"] = {"_target_": "os.system", "_args_": ["true"]}
    path = tmp_path / "extra.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(UnsafeConfigError, match=re.escape("hyper_parameters has unknown key(s) 'callback'")):
        FasterRCNNModule.load(str(path))
    cfg = compose_config([f"ckpt_path={path}", f"input={image(tmp_path)}", f"output={tmp_path / 'out'}", "device=cpu", "min_size=64", "max_size=96"], config_name="predict")
    with pytest.raises(PredictError, match=re.escape(f"{path}: refused, hyper_parameters has unknown key(s) 'callback'")):
        predict(cfg)


@pytest.mark.parametrize(
    "optimizer, key, value",
    [
        (lambda f: write_text(f["pwned"]), "optim.optimizer._target_", "pathlib.Path.write_text"),
        (lambda f: {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": write_text(f["pwned"])}, "optim.optimizer.momentum._target_", "pathlib.Path.write_text"),
        (lambda f: {"_target_": "fasterrcnn.model.FasterRCNN"}, "optim.optimizer._target_", "fasterrcnn.model.FasterRCNN"),  # a model builder is no optimiser
    ],
    ids=["write_text", "nested", "model_builder"],
)
def test_load_refuses_a_foreign_optimizer_target(checkpoint, files, tmp_path, optimizer, key, value):
    """``hyper_parameters.optim.optimizer`` is a ``_partial_`` target too: only torch.optim.SGD and AdamW."""
    ckpt = copy.deepcopy(checkpoint)
    assert ckpt["hyper_parameters"]["optim"]["optimizer"]["_target_"] in ("torch.optim.SGD", "torch.optim.AdamW")
    ckpt["hyper_parameters"]["optim"]["optimizer"] = optimizer(files)
    path = tmp_path / "evil_optim.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(UnsafeConfigError, match=names(key, value)) as err:
        FasterRCNNModule.load(str(path))
    assert str(path) in str(err.value)
    assert_untouched(files)


# ---------------------------------------------------------------------------------- not too strict
def test_an_untampered_checkpoint_loads_and_predicts(checkpoint, tmp_path):
    ckpt = save(checkpoint, tmp_path / "good.ckpt")
    module = FasterRCNNModule.load(str(ckpt))
    assert module.class_names == checkpoint["hyper_parameters"]["model_cfg"]["classes"]
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, checkpoint["state_dict"][name]), name
    out = tmp_path / "out"
    cfg = compose_config([f"ckpt_path={ckpt}", f"input={image(tmp_path)}", f"output={out}", "device=cpu", "min_size=64", "max_size=96", "score_thresh=0"], config_name="predict")
    result = predict(cfg)
    assert [r["file"] for r in result["images"]] == ["a.png"] and not result["failures"]
    assert (out / "detections.json").is_file()


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _targets(node) -> set[str]:
    """Every ``_target_`` anywhere in ``node``."""
    if isinstance(node, dict):
        own = {node["_target_"]} if "_target_" in node else set()
        return own.union(*map(_targets, node.values()))
    if isinstance(node, list):
        return set().union(*map(_targets, node))
    return set()


def test_every_model_group_choice_is_allowed_and_the_allowlist_names_only_them():
    """Each backbone/anchor/sampler/model file and each experiment composes into a model config
    that passes :func:`check_config`; together they name exactly :data:`ALLOWED_TARGETS`."""
    overrides = [f"{group}={choice}" for group in MODEL_GROUPS for choice in _choices(group)]
    overrides += [f"experiment={choice}" for choice in _choices("experiment")]
    named: set[str] = set()
    for override in overrides:
        model_cfg = model_config(compose_config([override]))
        check_config(model_cfg, f"model_cfg ({override})")
        named |= _targets(model_cfg)
    assert named == ALLOWED_TARGETS


@pytest.mark.parametrize("override", [f"{g}={c}" for g in ("anchor", "sampler") for c in _choices(g)])
def test_every_anchor_and_sampler_choice_builds(override):
    model = build_model(model_config(compose_config([*TINY_NET, override])), pretrained=False)
    assert model.anchor_generator.num_anchors > 0

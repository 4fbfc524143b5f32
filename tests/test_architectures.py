"""Issue 12: Residual blocks with shortcuts, Concat, child names, torchvision models, graph pictures.

All offline: torchvision weights are written by the tests themselves (a seeded random init)
into a temporary torch hub cache (TORCH_HOME).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from nnctl.config import loader as C
from nnctl.config import structure as CS
from nnctl.model import weights as W
from nnctl.model import freeze as F
from nnctl.model import plan as M
from nnctl.model import blocks as MB
from nnctl.errors import ConfigError

from .conftest import ROOT, make, run_cli, write

RESNET18 = ROOT / "configs" / "resnet18.yaml"


def plan_of(model: dict, **extra):
    cfg, doc = C.from_dict(make(model=model, **extra), "c.yaml")
    return M.plan(cfg, doc)


def build_of(model: dict, seed: int = 0):
    cfg, doc = C.from_dict(make(model=model), "c.yaml")
    return M.build(cfg, doc, seed=seed)


def problems(model: dict) -> list:
    with pytest.raises(ConfigError) as info:
        plan_of(model)
    return info.value.problems


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A private torch hub cache holding resnet18 IMAGENET1K_V1 weights: a seeded random init."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.manual_seed(1234)
    ref = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    path = tmp_path / "torch_home" / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    return ref, path


def image_folder(root: Path, classes=("cat", "dog"), n: int = 6, size: int = 32) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = (torch.rand(size, size, 3, generator=g) * 120 + 100 * k).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


# --- 1. Residual: layers, shortcut, after -----------------------------------------------------

BASIC_DOWN = {"Residual": {
    "layers": [
        {"Conv2d": {"out_channels": 8, "kernel_size": 3, "stride": 2, "padding": 1, "bias": False}, "name": "conv1"},
        {"BatchNorm2d": None, "name": "bn1"},
        {"ReLU": True, "name": "relu"},
        {"Conv2d": {"out_channels": 8, "kernel_size": 3, "padding": 1, "bias": False}, "name": "conv2"},
        {"BatchNorm2d": None, "name": "bn2"},
    ],
    "shortcut": {"Sequential": [{"Conv2d": {"out_channels": 8, "kernel_size": 1, "stride": 2, "bias": False}},
                                "BatchNorm2d"], "name": "downsample"},
    "after": [{"ReLU": True, "name": "relu_out"}],
}}


def test_residual_with_projection_shortcut_is_torchvision_basicblock():
    from torchvision.models.resnet import BasicBlock, conv1x1

    built, p = build_of({"input_shape": [4, 8, 8], "layers": [BASIC_DOWN]})
    block = built[0]
    assert isinstance(block, MB.Residual) and p.output_shape == (8, 4, 4)
    ref = BasicBlock(4, 8, stride=2, downsample=nn.Sequential(conv1x1(4, 8, 2), nn.BatchNorm2d(8)))
    assert list(block.state_dict()) == list(ref.state_dict())
    torch.manual_seed(0)
    for t in ref.state_dict().values():
        if t.is_floating_point():
            t.copy_(torch.randn_like(t).abs() + 0.1)
    block.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(block.eval()(x), ref.eval()(x), atol=1e-6)
    assert block.parts() == {"body": ["conv1", "bn1", "relu", "conv2", "bn2"], "shortcut": "downsample",
                             "after": ["relu_out"]}


def test_residual_shortcut_list_and_defaults():
    # a list shortcut is a child named "shortcut"; after entries are numbered after the body
    entry = {"Residual": {"layers": [{"Conv2d": {"out_channels": 6, "kernel_size": 1}}],
                          "shortcut": [{"Conv2d": {"out_channels": 6, "kernel_size": 1}}], "after": ["ReLU"]}}
    built, p = build_of({"input_shape": [3, 5, 5], "layers": [entry]})
    assert list(built.state_dict()) == ["0.0.weight", "0.0.bias", "0.shortcut.0.weight", "0.shortcut.0.bias"]
    block = built[0]
    assert block.parts()["after"] == ["2"]
    x = torch.randn(2, 3, 5, 5)
    assert torch.allclose(block(x), torch.relu(block["0"](x) + block["shortcut"](x)))
    # the plain list form is unchanged: x + body(x), children 0, 1, ...
    built, _ = build_of({"input_shape": [3, 5, 5], "layers": [{"Residual": [{"Conv2d": [3, 3, 1]}]}]})
    assert list(built.state_dict()) == ["0.0.weight", "0.0.bias"]
    assert torch.allclose(built(x), x + built[0][0](x))


def test_residual_shortcut_mismatch_names_both_parts_and_lines():
    bad = copy.deepcopy(BASIC_DOWN)
    bad["Residual"]["shortcut"]["Sequential"][0]["Conv2d"]["stride"] = 1
    text = "model:\n  input_shape: [4, 8, 8]\n  layers:\n    - " + __import__("json").dumps(bad) + "\n"
    from nnctl.config import yamlio

    doc = yamlio.load_text(text, "c.yaml")
    cfg = CS.validate(doc)
    with pytest.raises(ConfigError) as info:
        M.plan(cfg, doc)
    (p,) = info.value.problems
    assert p.line == 4 and "body" in p.message and "shortcut" in p.message
    assert "[8, 4, 4]" in p.message and "[8, 8, 8]" in p.message and "line 4" in p.message
    # an identity shortcut on a downsampling body: the hint shows the projection to write
    (p,) = problems({"input_shape": [4, 8, 8], "layers": [{"Residual": {"layers": BASIC_DOWN["Residual"]["layers"]}}]})
    assert "identity" in p.message and "shortcut: {Sequential" in p.message and "stride: 2" in p.message


def test_residual_unknown_key():
    (p,) = problems({"input_shape": [4], "layers": [{"Residual": {"layers": ["ReLU"], "shortcuts": ["ReLU"]}}]})
    assert "did you mean 'shortcut'" in p.message


# --- 2. Concat ----------------------------------------------------------------------------------

def test_concat_shapes_and_mismatch():
    p = plan_of({"input_shape": [3, 8, 8], "layers": [{"Concat": {"dim": 1, "branches": [
        [], [{"Conv2d": {"out_channels": 5, "kernel_size": 3, "padding": 1}}]]}}, "Flatten",
        {"Linear": {"out_features": 2}}]})
    assert p.root.children[0][1].out_shape == (8, 8, 8)
    assert p.root.children[2][1].kwargs["in_features"] == 8 * 8 * 8
    (prob,) = problems({"input_shape": [3, 8, 8], "layers": [{"Concat": {"branches": [
        [], [{"Conv2d": {"out_channels": 5, "kernel_size": 3}}]]}}]})
    assert "[5, 6, 6]" in prob.message and "[3, 8, 8]" in prob.message and prob.path.endswith("branches[1]")
    (prob,) = problems({"input_shape": [3, 8, 8], "layers": [{"Concat": {"dim": 0, "branches": [[], []]}}]})
    assert "batch" in prob.message


def test_densenet_layer_param_count_and_outputs():
    # torchvision's _DenseLayer: BN, ReLU, 1x1 conv (bn_size * growth), BN, ReLU, 3x3 conv (growth); concat
    growth, bn_size, c = 8, 4, 16
    layer = {"Concat": {"dim": 1, "branches": [[], [
        "BatchNorm2d", {"ReLU": True}, {"Conv2d": {"out_channels": bn_size * growth, "kernel_size": 1, "bias": False}},
        "BatchNorm2d", {"ReLU": True},
        {"Conv2d": {"out_channels": growth, "kernel_size": 3, "padding": 1, "bias": False}}]]}}
    built, p = build_of({"input_shape": [c, 8, 8], "layers": [layer, layer]})
    assert p.output_shape == (c + 2 * growth, 8, 8)
    from torchvision.models.densenet import _DenseBlock

    ref = _DenseBlock(2, c, bn_size, growth, drop_rate=0.0).eval()
    mine = [t for t in built.state_dict().values()]
    theirs = list(ref.state_dict().values())
    assert sum(q.numel() for q in built.parameters()) == sum(q.numel() for q in ref.parameters())
    assert [tuple(t.shape) for t in mine] == [tuple(t.shape) for t in theirs]
    built.load_state_dict(dict(zip(built.state_dict(), theirs)))
    x = torch.randn(2, c, 8, 8)
    assert torch.allclose(built.eval()(x), ref(x), atol=1e-5)


def test_inception_block_param_count_and_outputs():
    def conv(out, k, pad=0):
        return {"Conv2d": {"out_channels": out, "kernel_size": k, "padding": pad}}

    block = {"Concat": {"dim": 1, "branches": [
        [conv(8, 1), "ReLU"],
        [conv(6, 1), "ReLU", conv(12, 3, 1), "ReLU"],
        [conv(2, 1), "ReLU", conv(4, 5, 2), "ReLU"],
        [{"MaxPool2d": {"kernel_size": 3, "stride": 1, "padding": 1}}, conv(4, 1), "ReLU"]]}}
    built, p = build_of({"input_shape": [16, 8, 8], "layers": [block]})
    assert p.output_shape == (28, 8, 8)

    class Inception(nn.Module):  # written by hand
        def __init__(self):
            super().__init__()
            self.b1 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU())
            self.b2 = nn.Sequential(nn.Conv2d(16, 6, 1), nn.ReLU(), nn.Conv2d(6, 12, 3, padding=1), nn.ReLU())
            self.b3 = nn.Sequential(nn.Conv2d(16, 2, 1), nn.ReLU(), nn.Conv2d(2, 4, 5, padding=2), nn.ReLU())
            self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(16, 4, 1), nn.ReLU())

        def forward(self, x):
            return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)

    ref = Inception()
    assert sum(q.numel() for q in built.parameters()) == sum(q.numel() for q in ref.parameters())
    built.load_state_dict(dict(zip(built.state_dict(), ref.state_dict().values())))
    x = torch.randn(2, 16, 8, 8)
    assert torch.allclose(built(x), ref(x), atol=1e-6)


UNET = ROOT / "configs" / "unet_digits.yaml"


def test_unet_denoiser_beats_noisy_input():
    from nnctl import api

    prep = api.prepare(str(UNET), overrides=["train.epochs=6"], device="cpu")
    torch.manual_seed(0)
    api.fit(prep)
    model = prep.model.eval()
    split = prep.data.val
    pairs = list(split.epoch(0))  # (noisy input, clean target) batches of the validation split
    noisy = torch.cat([x for x, _ in pairs])
    clean = torch.cat([y for _, y in pairs])
    assert not torch.equal(noisy, clean)  # data.noise applies
    with torch.no_grad():
        denoised = model(noisy)
    err_noisy = torch.mean((noisy - clean) ** 2).item()
    err_model = torch.mean((denoised - clean) ** 2).item()
    assert err_model < 0.5 * err_noisy, (err_model, err_noisy)


# --- 3. child names --------------------------------------------------------------------------------

def test_child_names_as_add_module_accepts():
    built, _ = build_of({"input_shape": [4], "layers": [
        {"Sequential": [{"Linear": {"out_features": 3}, "name": 0}], "name": "downsample"},
        {"Linear": {"out_features": 2}, "name": "0"}]})
    assert list(built.state_dict()) == ["downsample.0.weight", "downsample.0.bias", "0.weight", "0.bias"]
    for bad, needle in (("a.b", "cannot contain '.'"), ("", "cannot be empty"), ("forward", "clashes"),
                        (1.5, "a child name is a string")):
        (p,) = problems({"input_shape": [4], "layers": [{"Linear": {"out_features": 3}, "name": bad}]})
        assert needle in p.message and p.path.endswith(".name"), p.message
    (p,) = problems({"input_shape": [4], "layers": [{"ReLU": None, "name": "1"}, "ReLU"]})
    assert "default name '1'" in p.message


# --- 4/5. torchvision and the seed's case ------------------------------------------------------------

def test_resnet18_config_equals_torchvision(tmp_path):
    cfg, doc = C.load(str(RESNET18), ["model.input_shape=[3,64,64]"])
    model, plan = M.build(cfg, doc)
    torch.manual_seed(7)
    ref = torchvision.models.resnet18().eval()
    ours, theirs = model.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)
    assert [n for n, _ in model.named_children()] == [n for n, _ in ref.named_children()]
    weights = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), weights)  # saved by torchvision's model, loaded by nnctl's --init path
    report, _ = W.init_from(model, plan, str(weights))
    assert "loaded all" in report
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), ref(x), atol=1e-5)


def tv_model(**extra) -> dict:
    return {"torchvision": "resnet18", "weights": "IMAGENET1K_V1", "input_shape": [3, 32, 32],
            "replace": {"fc": {"Linear": {"out_features": 2}}}, **extra}


def test_torchvision_source_loads_cached_weights(hub):
    ref, _ = hub
    model, plan = build_of(tv_model())
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.in_features == 512 and model.fc.out_features == 2 and plan.output_shape == (2,)
    theirs = ref.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, theirs[k]), k
    pre = plan.torchvision["preprocessing"]
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["crop_size"] == [224] and len(pre["classes"]) == 1000
    # the plan knows each child's shapes: the summary table reads them
    assert plan.node_for("layer4").out_shape == (512, 1, 1) and plan.node_for("fc").kwargs["in_features"] == 512


def test_torchvision_offline_error_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(ConfigError) as info:
        build_of(tv_model())
    (p,) = info.value.problems
    assert p.path == "model.weights" and "resnet18-f37072fd.pth" in p.message
    assert str(tmp_path / "empty" / "hub" / "checkpoints") in p.message and "never downloads" in p.message
    assert not (tmp_path / "empty" / "hub" / "checkpoints" / "resnet18-f37072fd.pth").exists()


def test_torchvision_random_init_and_args():
    model, plan = build_of({"torchvision": "resnet18", "weights": None, "input_shape": [3, 32, 32],
                            "args": {"num_classes": 3}})
    assert model.fc.out_features == 3 and plan.output_shape == (3,)
    (p,) = problems({"torchvision": "resnet18", "input_shape": [3, 32, 32], "args": {"norm_layer": "x"}})
    assert "unknown argument 'norm_layer'" in p.message


def seed_loop_frozen(resnet: nn.Module) -> set[str]:
    """The seed's fine-tuning loop, verbatim in spirit."""
    ct = 0
    for child in resnet.children():
        ct += 1
        if ct < 6:
            for param in child.parameters():
                param.requires_grad = False
    return {n for n, q in resnet.named_parameters() if not q.requires_grad}


def test_freeze_first5_equals_seed_loop_and_training_keeps_them(hub, tmp_path, cli, monkeypatch):
    from nnctl.runs import records as RS
    import json

    from nnctl import api
    from nnctl.runs import checkpoint as K

    expected = seed_loop_frozen(torchvision.models.resnet18())
    model, _ = build_of(tv_model())
    freezing = F.make_freeze(model, first=5)
    assert set(freezing["frozen"]) == expected
    assert {n.split(".")[0] for n in expected} == {"conv1", "bn1", "layer1"}  # relu, maxpool: no parameters

    images = image_folder(tmp_path / "images", n=8)  # 12 train (3 full batches of 4), 4 val
    d = make(model=tv_model(), data={"source": "image_folder", "root": str(images), "image_size": [32, 32],
                                     "val_fraction": 0.25},
             train={"epochs": 1, "batch_size": 4, "optimizer": {"SGD": {"lr": 0.1}}}, freeze={"first": 5})
    cfg_path = write(tmp_path, d)
    code, out, err = cli("freeze", str(cfg_path), "--first", "5", "--json")
    assert code == 0, err
    rows = json.loads(out)["children"]
    assert [x["status"] for x in rows[:5]] == ["frozen", "frozen", "-", "-", "frozen"]
    assert all(x["status"] == "trainable" for x in rows[5:] if x["params"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = api.train(str(cfg_path), out=str(tmp_path / "run"))
    after = K.load(RS.resolve(result.run_dir, "last"))["model"]
    for k, v in before.items():
        if k.split(".")[0] in ("conv1", "bn1", "layer1"):  # weights and BatchNorm running statistics (eval mode)
            assert torch.equal(after[k], v), k
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    assert not torch.equal(after["layer4.1.conv2.weight"], before["layer4.1.conv2.weight"])
    # export-weights in every format (onnx checked against eager in onnxruntime)
    for fmt in ("safetensors", "pt", "npz", "onnx"):
        res = api.export(str(result.run_dir), fmt, str(tmp_path / f"w.{fmt}"), which="last")
        assert Path(res.path).stat().st_size > 1000
        if fmt == "onnx":  # relative to the logits' size (a random-init network trained at lr 0.1)
            with torch.no_grad():
                scale = api.load(result.run_dir, which="last")(torch.randn(4, 3, 32, 32)).abs().max().item()
            assert res.max_abs_diff is not None and res.max_abs_diff < 1e-4 * max(scale, 1.0), (res.max_abs_diff, scale)
    # a checkpoint rebuilds without the hub cache (its own weights replace the pretrained ones)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nothing"))
    code, out, err = cli("summary", str(result.run_dir), "--which", "last", "--json")
    assert code == 0, err
    assert json.loads(out)["trainable_params"] < json.loads(out)["total_params"]
    # --init from the run into a config of the random-init model: loads every tensor
    d2 = make(model=tv_model(weights=None))
    model2 = api.build(str(write(tmp_path, d2, "c2.yaml")), init=str(result.run_dir / "last.pt"))
    assert torch.equal(model2.state_dict()["fc.weight"], after["fc.weight"])


# --- ONNX ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [
    [BASIC_DOWN, {"AdaptiveAvgPool2d": 1}, "Flatten", {"Linear": {"out_features": 3}}],
    [{"Concat": {"dim": 1, "branches": [[], [{"Conv2d": {"out_channels": 4, "kernel_size": 3, "padding": 1}}],
                                        [{"MaxPool2d": {"kernel_size": 3, "stride": 1, "padding": 1}}]]}},
     "Flatten", {"Linear": {"out_features": 3}}],
], ids=["residual-shortcut", "concat"])
def test_onnx_export_matches_eager(layers, tmp_path):
    pytest.importorskip("onnxruntime")
    d = make(model={"input_shape": [4, 8, 8], "layers": layers})
    cfg_path = write(tmp_path, d)
    r = run_cli("freeze", str(cfg_path), "--children", "0", "-o", str(tmp_path / "ck.pt"))
    assert r.returncode == 0, r.stderr
    from nnctl import api

    res = api.export(str(tmp_path / "ck.pt"), "onnx", str(tmp_path / "m.onnx"))
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-4


# --- 6. the graph picture ----------------------------------------------------------------------------

@pytest.mark.slow  # a real-process test (README test command kept under ~6 minutes; .ci/run runs it)
def test_summary_graph_png_and_svg(tmp_path):
    d = make(model={"input_shape": [4, 8, 8], "layers": [BASIC_DOWN, {"Concat": {"branches": [[], ["ReLU"]]}},
                                                         "Flatten", {"Linear": {"out_features": 3}}]})
    cfg_path = write(tmp_path, d)
    for suffix in ("png", "svg"):
        out = tmp_path / f"g.{suffix}"
        r = run_cli("summary", str(cfg_path), "--graph", str(out))
        assert r.returncode == 0, r.stderr
        assert out.stat().st_size > 1000
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    svg = (tmp_path / "g.svg").read_text()
    assert "downsample" in svg and "[8, 4, 4]" in svg and "Concat" in svg
    r = run_cli("summary", str(cfg_path), "--graph", str(tmp_path / "g.txt"))
    assert r.returncode == 2


def test_pretrained_weights_preprocessing_becomes_the_runs(hub, tmp_path):
    """With torchvision weights and no data.normalize, the run normalises with the weights' own mean/std,
    resizes images to the model's input size, and records both; the data's folder names stay the classes."""
    from nnctl import api

    image_folder(tmp_path / "imgs", n=4, size=40)  # 40x40 files, the model takes 32x32
    d = make(model=tv_model(), data={"source": "image_folder", "root": str(tmp_path / "imgs"), "val_fraction": 0.25},
             train={"epochs": 1, "batch_size": 4})
    prepared = api.prepare(d)
    record = prepared.data.preprocessing
    assert record.mean == [0.485, 0.456, 0.406] and record.std == [0.229, 0.224, 0.225]
    assert record.resize == [32, 32] and record.classes == ["cat", "dog"]
    own = make(model=tv_model(), data={"source": "image_folder", "root": str(tmp_path / "imgs"),
                                        "image_size": [32, 32], "normalize": True}, train={"epochs": 1})
    assert api.prepare(own).data.preprocessing.mean != record.mean  # an explicit normalize wins

"""Fine-tuning: freeze selections, --init from outside weights, exports that round-trip into plain PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import nnctl
from nnctl.runs import checkpoint as K
from nnctl.config import loader as C
from nnctl.data import loading as D
from nnctl.use import export as E
from nnctl.model import weights as W
from nnctl.model import freeze as F
from nnctl.model import plan as M
from nnctl.training import trainer as T
from nnctl.errors import CheckpointError, UsageError

from .conftest import ROOT, make, run_cli, write

CPU = torch.device("cpu")
BN_MODEL = {"input_shape": [1, 8, 8], "layers": [
    {"Conv2d": {"out_channels": 8, "kernel_size": 3, "padding": 1}}, "BatchNorm2d", "ReLU",
    {"Conv2d": {"out_channels": 8, "kernel_size": 3, "padding": 1}}, "BatchNorm2d", "ReLU",
    "Flatten", {"Linear": {"out_features": 10}}]}


def hand_model() -> nn.Sequential:
    """BN_MODEL written by hand."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(512, 10))


def test_freeze_first_children_then_train(tmp_path):
    cfg, doc = C.from_dict(make(model=BN_MODEL, train={"epochs": 2, "optimizer": {"SGD": {"lr": 0.1}}}))
    model, plan = M.build(cfg, doc)
    freezing = F.make_freeze(model, first=3)
    F.apply(model, freezing)
    assert freezing["frozen"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = D.load_data(cfg, CPU)
    T.fit(cfg, model, data, CPU, tmp_path, T.FitOptions(freezing=freezing))
    after = model.state_dict()
    for k in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(before[k], after[k]), k  # frozen weights and norm statistics bit-identical
    for k in ("3.weight", "4.weight", "4.running_mean", "7.weight"):
        assert not torch.equal(before[k], after[k]), k  # the rest trained
    state = K.load(tmp_path / "last.pt")
    # the optimizer holds only the trainable parameters: 3.w 3.b 4.w 4.b 7.w 7.b
    assert len(state["optimizer"]["param_groups"][0]["params"]) == 6
    assert state["freeze"]["frozen"] == freezing["frozen"]


def test_train_frozen_norm_option_lets_statistics_move(tmp_path):
    cfg, doc = C.from_dict(make(model=BN_MODEL, train={"epochs": 1}))
    model, _ = M.build(cfg, doc)
    freezing = F.make_freeze(model, first=3, train_frozen_norm=True)
    F.apply(model, freezing)
    before = model[1].running_mean.clone()
    T.fit(cfg, model, D.load_data(cfg, CPU), CPU, tmp_path, T.FitOptions(freezing=freezing))
    assert torch.equal(model[1].weight, model[1].weight) and not torch.equal(before, model[1].running_mean)


def test_freeze_selectors_and_errors():
    d = make(model={"input_shape": [4], "layers": [
        {"Sequential": [{"Linear": {"out_features": 4}}, "ReLU", {"Linear": {"out_features": 4}}], "name": "features"},
        {"Sequential": ["ReLU", {"Linear": {"out_features": 2}}], "name": "classifier"}]})
    cfg, doc = C.from_dict(d)
    model, _ = M.build(cfg, doc)
    assert F.make_freeze(model, names=["features"])["frozen"] == ["features.0.weight", "features.0.bias",
                                                               "features.2.weight", "features.2.bias"]
    assert F.make_freeze(model, names=["features.*.weight"])["frozen"] == ["features.0.weight", "features.2.weight"]
    assert F.make_freeze(model, children=[0], unfreeze=["features.2"])["frozen"] == ["features.0.weight",
                                                                                  "features.0.bias"]
    with pytest.raises(UsageError, match="matches no module"):
        F.make_freeze(model, names=["featurez"])
    with pytest.raises(UsageError, match="freezes every parameter"):
        F.make_freeze(model, first=2)
    with pytest.raises(UsageError, match="has 2 children"):
        F.make_freeze(model, children=[5])


def test_freeze_command_writes_checkpoint_for_init(tmp_path, cli):
    p = write(tmp_path, make(model=BN_MODEL, train={"epochs": 1}))
    code, out, err = cli("freeze", str(p), "--first", "3", "-o", str(tmp_path / "frozen.pt"), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert [r["status"] for r in info["children"]][:3] == ["frozen", "frozen", "-"]
    assert info["frozen"] == 8 * 9 + 8 + 16
    r = run_cli("train", str(p), "--init", str(tmp_path / "frozen.pt"), "--out", str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr
    start = K.load(tmp_path / "frozen.pt")["model"]
    end = K.load(tmp_path / "ft" / "last.pt")["model"]
    assert torch.equal(start["0.weight"], end["0.weight"]) and torch.equal(start["1.running_var"], end["1.running_var"])
    assert not torch.equal(start["7.weight"], end["7.weight"])
    code, out, err = cli("freeze", str(p), "--names", "nothing_here")
    assert code == 2 and "matches no module" in err


def test_init_from_outside_safetensors_and_pt(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    ref = hand_model()
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, tmp_path / "w.pt")  # a DDP-style prefix
    p = write(tmp_path, make(model=BN_MODEL))
    cfg, doc = C.load(str(p))
    for f in ("w.safetensors", "w.pt"):
        model, plan = M.build(cfg, doc)
        report, _ = W.init_from(model, plan, str(tmp_path / f))
        assert "loaded all" in report
        model.eval(), ref.eval()
        x = torch.randn(3, 1, 8, 8)
        assert torch.equal(model(x), ref(x))


def test_mismatch_lists_keys_with_layers_and_partial_load(tmp_path):
    torch.manual_seed(0)
    ref = hand_model()
    ref[7] = nn.Linear(512, 3)  # a different head
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    cfg, doc = C.from_dict(make(model=BN_MODEL))
    model, plan = M.build(cfg, doc)
    with pytest.raises(CheckpointError) as info:
        W.init_from(model, plan, str(tmp_path / "w.pt"))
    msg = str(info.value)
    assert "2 wrong shape: 7.weight [3, 512] in the file, [10, 512] in the model [model.layers[7] (Linear" in msg
    report, _ = W.init_from(model, plan, str(tmp_path / "w.pt"), partial=True)
    assert "skipped" in report and "7.weight" in report
    assert torch.equal(model[0].weight, ref[0].weight)


def test_pickle_payload_in_pt_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {sentinel}",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    cfg, doc = C.from_dict(make())
    model, plan = M.build(cfg, doc)
    with pytest.raises(CheckpointError, match="refused"):
        W.init_from(model, plan, str(tmp_path / "evil.pt"))
    assert not sentinel.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """BN_MODEL trained for 1 epoch through nnctl.train, in this process (the module's tests only read it)."""
    tmp = tmp_path_factory.mktemp("exp")
    p = write(tmp, make(model=BN_MODEL, train={"epochs": 1}))
    assert nnctl.train(str(p), out=str(tmp / "run")).run_dir == tmp / "run"
    return tmp / "run"


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "npz"])
def test_export_round_trips_into_hand_built_model(fmt, trained, cli, tmp_path):
    out = tmp_path / f"w.{fmt}"
    code, stdout, err = cli("export-weights", str(trained), "--format", fmt, "-o", str(out))
    assert code == 0, err
    state = K.load(trained / "best.pt")["model"]
    ref = hand_model()
    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        loaded = load_file(str(out))
        with safe_open(str(out), "pt") as fh:
            meta = fh.metadata()
        assert json.loads(meta["config"])["name"] == "t" and json.loads(meta["input_shape"]) == [1, 8, 8]
    elif fmt == "pt":
        loaded = torch.load(out, weights_only=True)
    else:
        z = np.load(out, allow_pickle=False)
        loaded = {k: torch.from_numpy(z[k]) for k in z.files if k != "__nnctl_meta__"}
    ref.load_state_dict(loaded)
    model = hand_model()
    model.load_state_dict(state)
    ref.eval(), model.eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(ref(x), model(x))


def test_npz_bf16_and_shared_tensors(tmp_path):
    lin = nn.Linear(4, 4).to(torch.bfloat16)
    state = {"a.weight": lin.weight.data, "b.weight": lin.weight.data, "a.bias": lin.bias.data}
    payload = {"model": state, "config": {"model": {"input_shape": [4]}}, "epoch": 1}
    for fmt in ("npz", "safetensors", "pt"):
        res = E.export(payload, None, fmt, str(tmp_path / f"w.{fmt}"))
        assert res.shared == [("b.weight", "a.weight")]
    z = np.load(tmp_path / "w.npz", allow_pickle=False)
    assert z["a.weight"].dtype == np.float32
    assert torch.equal(torch.from_numpy(z["a.weight"]).to(torch.bfloat16), lin.weight.data)
    assert json.loads(json.loads(str(z["__nnctl_meta__"]))["dtypes"])["a.weight"] == "bfloat16"


def test_onnx_export_matches_eager(trained, cli, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    out = tmp_path / "m.onnx"
    code, stdout, err = cli("export-weights", str(trained), "--format", "onnx", "-o", str(out))
    assert code == 0, err
    diff = float(stdout.rsplit("=", 1)[1])
    assert diff < 1e-4


def test_alexnet_config_loads_torchvision_state_dict(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    cfg, doc = C.load(str(ROOT / "configs" / "alexnet_torchvision.yaml"))
    model, plan = M.build(cfg, doc)
    ref = torchvision.models.alexnet()  # random weights; nothing is downloaded
    assert list(model.state_dict()) == list(ref.state_dict())
    torch.save(ref.state_dict(), tmp_path / "alexnet.pth")
    report, _ = W.init_from(model, plan, str(tmp_path / "alexnet.pth"))
    assert "loaded all 16" in report
    model.eval(), ref.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(model(x), ref(x))


def test_readme_fine_tuning_walkthrough(tmp_path):
    """The README's walk-through, command for command: train, freeze features, new head, export, plain load."""
    r = run_cli("train", str(ROOT / "configs" / "digits_features.yaml"), "--epochs", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("freeze", "runs/digits-features", "--names", "features", "-o", "frozen.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", str(ROOT / "configs" / "digits_parity.yaml"), "--init", "frozen.pt", "--partial",
                "--epochs", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped: 2 wrong shape: classifier.2.weight" in r.stdout
    r = run_cli("export-weights", "runs/digits-parity", "-o", "parity.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                               nn.Flatten()))
    model.add_module("classifier", nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 2)))
    model.load_state_dict(load_file(str(tmp_path / "parity.safetensors")))
    base = K.load(tmp_path / "runs" / "digits-features" / "best.pt")["model"]
    # the frozen feature extractor is the base model's, bit for bit
    assert torch.equal(model.features[0].weight, base["features.0.weight"])
    cfg, doc = C.load(str(ROOT / "configs" / "digits_parity.yaml"))
    data = D.load_data(cfg, CPU)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.val.epoch(0):
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    assert correct / total > 0.85

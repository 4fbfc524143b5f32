"""Every layer of the documented core, built from YAML, equals the same module built by hand."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from nnctl.config import loader as C
from nnctl.config import structure as CS
from nnctl.model import registry as L
from nnctl.model import plan as M
from nnctl.model import blocks as MB
from nnctl.config.nn_names import LAYER_NAMES

from .conftest import make

# (YAML layer entries, input shape, the same model written by hand)
CORE = {
    "Conv2d": ([{"Conv2d": {"out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1}}], [3, 9, 9],
               lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1)),
    "Conv2d-positional": ([{"Conv2d": [3, 4, 3, 1]}], [3, 9, 9], lambda: nn.Conv2d(3, 4, 3, 1)),
    "Linear": ([{"Linear": {"out_features": 5, "bias": False}}], [7], lambda: nn.Linear(7, 5, bias=False)),
    "Linear-list": ([{"Linear": [7, 5]}], [7], lambda: nn.Linear(7, 5)),
    "Dropout2d": ([{"Dropout2d": 0.25}], [3, 4, 4], lambda: nn.Dropout2d(0.25)),
    "Dropout": ([{"Dropout": {"p": 0.5}}], [6], lambda: nn.Dropout(p=0.5)),
    "MaxPool2d": ([{"MaxPool2d": 2}], [2, 6, 6], lambda: nn.MaxPool2d(2)),
    "MaxPool2d-list": ([{"MaxPool2d": [3, 2, 1]}], [2, 7, 7], lambda: nn.MaxPool2d(3, 2, 1)),
    "ReLU": (["ReLU"], [5], lambda: nn.ReLU()),
    "ReLU-inplace": ([{"ReLU": True}], [5], lambda: nn.ReLU(True)),
    "Softmax": ([{"Softmax": {"dim": 1}}], [5], lambda: nn.Softmax(dim=1)),
    "LogSoftmax": ([{"LogSoftmax": {"dim": 1}}], [5], lambda: nn.LogSoftmax(dim=1)),
    "ReflectionPad2d-int": ([{"ReflectionPad2d": 1}], [2, 5, 5], lambda: nn.ReflectionPad2d(1)),
    "ReflectionPad2d-tuple": ([{"ReflectionPad2d": [1, 1, 2, 2]}], [2, 5, 5], lambda: nn.ReflectionPad2d((1, 1, 2, 2))),
    "InstanceNorm2d": (["InstanceNorm2d"], [3, 5, 5], lambda: nn.InstanceNorm2d(3)),
    "InstanceNorm2d-affine": ([{"InstanceNorm2d": {"affine": True}}], [3, 5, 5],
                              lambda: nn.InstanceNorm2d(3, affine=True)),
    "Flatten": (["Flatten"], [2, 3, 3], lambda: nn.Flatten()),
    "Sequential": ([{"Sequential": [{"Conv2d": {"out_channels": 4, "kernel_size": 3}}, "ReLU"], "name": "features"}],
                   [1, 6, 6], lambda: nn.Sequential(OrderedDict(features=nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())))),
}


def hand_wrapped(entry_name: str, module: nn.Module) -> nn.Module:
    return module if entry_name == "Sequential" else nn.Sequential(module)


@pytest.mark.parametrize("key", list(CORE))
def test_core_layer_matches_hand_built(key):
    entries, shape, hand = CORE[key]
    cfg, doc = C.from_dict(make(model={"input_shape": shape, "layers": entries}))
    built, plan = M.build(cfg, doc, seed=123)
    torch.manual_seed(123)
    ref = hand_wrapped(key, hand())
    # same classes and arguments
    assert [type(m) for m in built.modules()] == [type(m) for m in ref.modules()]
    assert repr(built) == repr(ref)
    # same initial weights under the same seed, and the same state_dict keys
    assert list(built.state_dict()) == list(ref.state_dict())
    for (k, a), (_, b) in zip(built.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    # same output on the same input and weights, in eval and (seeded) train mode
    x = torch.randn(4, *shape)
    built.eval(), ref.eval()
    assert torch.equal(built(x), ref(x))
    built.train(), ref.train()
    torch.manual_seed(7)
    y1 = built(x.clone())
    torch.manual_seed(7)
    y2 = ref(x.clone())
    assert torch.equal(y1, y2)
    assert list(plan.output_shape) == list(ref(x).shape[1:])


def test_residual_is_x_plus_body():
    body = [{"ReflectionPad2d": 1}, {"Conv2d": {"out_channels": 3, "kernel_size": 3}}, "InstanceNorm2d", "ReLU"]
    cfg, doc = C.from_dict(make(model={"input_shape": [3, 6, 6], "layers": [{"Residual": body}]}))
    built, _ = M.build(cfg, doc, seed=5)
    torch.manual_seed(5)
    ref_body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, 3, 3), nn.InstanceNorm2d(3), nn.ReLU())
    x = torch.randn(2, 3, 6, 6)
    assert isinstance(built[0], MB.Residual)
    assert list(built.state_dict()) == ["0.1.weight", "0.1.bias"]
    built[0].load_state_dict(ref_body.state_dict())
    assert torch.equal(built(x), x + ref_body(x))


def test_blocks_repeat_and_names():
    d = make(model={
        "input_shape": [4, 5, 5],
        "blocks": {"ResBlock": {"Residual": [{"ReflectionPad2d": 1}, {"Conv2d": {"out_channels": 4, "kernel_size": 3}},
                                             "InstanceNorm2d"]}},
        "layers": [{"ResBlock": None, "repeat": 2}, {"ResBlock": None, "repeat": 3, "name": "trunk"},
                   {"Conv2d": {"out_channels": 2, "kernel_size": 1}, "name": "head"}],
    })
    cfg, doc = C.from_dict(d)
    model, plan = M.build(cfg, doc)
    names = [n for n, _ in model.named_children()]
    assert names == ["0", "1", "trunk", "head"]
    assert len(model.trunk) == 3 and all(isinstance(b, MB.Residual) for b in model.trunk)
    assert "trunk.2.1.weight" in model.state_dict()
    # every copy has its own weights
    assert model[0][1].weight.data_ptr() != model[1][1].weight.data_ptr()
    assert plan.output_shape == (2, 5, 5)


def test_inference_of_sizes():
    d = make(model={"input_shape": [3, 8, 8], "layers": [
        {"Conv2d": {"out_channels": 6, "kernel_size": 3}}, "BatchNorm2d", "Flatten", {"Linear": {"out_features": 4}},
        "BatchNorm1d"]})
    cfg, doc = C.from_dict(d)
    model, _ = M.build(cfg, doc)
    assert model[0].in_channels == 3 and model[1].num_features == 6
    assert model[3].in_features == 6 * 6 * 6 and model[4].num_features == 4


def test_any_torch_nn_class_and_only_those():
    reg = L.registry()
    for name in ("BatchNorm2d", "Tanh", "ConvTranspose2d", "AdaptiveAvgPool2d", "GELU", "LayerNorm"):
        assert reg[name] is getattr(nn, name)
    assert all(cls.__module__.startswith("torch.nn") for cls in reg.values())
    assert "Module" not in reg and "ModuleList" not in reg


def test_static_names_exist():
    """The editor-schema list (no torch import) names only real torch.nn classes."""
    reg = L.registry()
    missing = [n for n in LAYER_NAMES if n not in reg]
    assert not missing


def test_same_seed_same_model():
    cfg, doc = C.from_dict(make())
    a, _ = M.build(cfg, doc)
    b, _ = M.build(cfg, doc)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


def test_lints():
    d = make(model={"input_shape": [4], "layers": [{"Linear": {"out_features": 3}}, {"Softmax": {"dim": 1}}]})
    cfg, doc = C.from_dict(d)
    _, plan = M.build(cfg, doc)
    msgs = [p.message for p in M.lint(cfg, plan)]
    assert any("raw logits" in m for m in msgs)
    d = make(model={"input_shape": [4], "layers": [{"Linear": {"out_features": 3}}, {"LogSoftmax": {"dim": 1}}]})
    cfg, doc = C.from_dict(d)
    _, plan = M.build(cfg, doc)
    assert any("did you mean loss: nll" in p.message for p in M.lint(cfg, plan))
    d = make(model={"input_shape": [4], "layers": [{"Linear": {"out_features": 3}}, "Dropout"]})
    cfg, doc = C.from_dict(d)
    _, plan = M.build(cfg, doc)
    assert any("last layer" in p.message for p in M.lint(cfg, plan))
    cfg, doc = C.from_dict(make())
    _, plan = M.build(cfg, doc)
    assert M.lint(cfg, plan) == []


def test_where_names_the_config_layer():
    cfg, doc = C.from_dict(make())
    _, plan = M.build(cfg, doc)
    assert plan.where("1.weight").startswith("model.layers[1] (Linear")


# --- layers nnctl refuses: losses, tuple outputs, unlistable signatures ----------------

def test_registry_has_only_listable_single_tensor_layers():
    reg = L.registry()
    assert not [n for n in reg if n.endswith("Loss")]
    for name in ("LSTM", "GRU", "RNN", "LSTMCell", "MultiheadAttention", "AdaptiveLogSoftmaxWithLoss",
                 "Bilinear", "Transformer", "DataParallel"):
        assert name not in reg, name
    for name, cls in reg.items():  # every class either lists its arguments or takes none
        assert L._listable(cls), name
    assert set(LAYER_NAMES) == set(reg)  # the editor list is the registry


@pytest.mark.parametrize("entry,needle", [
    ({"LSTM": {"input_size": 8, "hidden_size": 4}}, "LSTM returns a tuple (output, (h_n, c_n))"),
    ({"GRU": [8, 4]}, "GRU returns a tuple"),
    ({"RNN": [8, 4]}, "RNN returns a tuple"),
    ({"MultiheadAttention": [8, 2]}, "MultiheadAttention returns a tuple"),
    ("CrossEntropyLoss", "CrossEntropyLoss is a loss, not a layer"),
    ({"MSELoss": None}, "MSELoss is a loss"),
    ({"Bilinear": [8, 8, 4]}, "takes several inputs"),
])
def test_refused_layers_get_a_located_reason(entry, needle):
    from nnctl.config import yamlio
    from nnctl.errors import ConfigError

    d = make(model={"input_shape": [8, 8], "layers": ["ReLU", entry]})
    cfg, doc = C.from_dict(d)
    with pytest.raises(ConfigError) as info:
        M.plan(cfg, doc)
    (p,) = info.value.problems
    assert needle in p.message and p.path.startswith("model.layers[1]")
    if "loss" in needle:
        assert "train.loss" in p.message
    # located in a real file
    text = "model:\n  input_shape: [8, 8]\n  layers:\n    - ReLU\n    - " + (
        entry if isinstance(entry, str) else f"{next(iter(entry))}: {list(entry.values())[0]}".replace("None", "")) + "\n"
    doc = yamlio.load_text(text, "c.yaml")
    with pytest.raises(ConfigError) as info:
        M.plan(CS.validate(doc), doc)
    assert info.value.problems[0].line == 5


def test_layers_command_lists_no_losses_or_tuple_modules(cli):
    import json

    code, out, _ = cli("layers", "--json")
    assert code == 0
    names = {d["name"] for d in json.loads(out)}
    assert "Conv2d" in names and "Tanh" in names and "Identity" in names
    assert not {"CrossEntropyLoss", "MSELoss", "LSTM", "GRU", "RNN", "MultiheadAttention"} & names
    assert all(d["arguments"] or d["name"] in {"Identity", "Tanh", "Sigmoid", "LogSigmoid", "Softsign",
                                                  "Tanhshrink", "Softmax2d"} for d in json.loads(out))

"""nnctl.summary: rows and totals, checked against torchinfo and hand formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchinfo
from torch import nn

from nnctl.config import loader as config
from nnctl.config import structure as CS
from nnctl.model import plan as model
from nnctl.model.summary import Row, Summary, flop_counts_by_module, summarize
from nnctl.config.yamlio import load_text

CONV = {"Conv2d": {"out_channels": 8, "kernel_size": 3, "padding": 1}}
RES = {"Residual": [{"ReflectionPad2d": 1}, {"Conv2d": {"out_channels": 8, "kernel_size": 3}}, "InstanceNorm2d", "ReLU"]}

MNIST = [  # pytorch/examples mnist/main.py
    {"Conv2d": {"out_channels": 32, "kernel_size": 3}}, "ReLU",
    {"Conv2d": {"out_channels": 64, "kernel_size": 3}}, "ReLU",
    {"MaxPool2d": 2}, {"Dropout": 0.25}, "Flatten",
    {"Linear": {"out_features": 128}}, "ReLU", {"Dropout": 0.5},
    {"Linear": {"out_features": 10}}, {"LogSoftmax": {"dim": 1}},
]

MODELS = {
    "mlp": ([4], [{"Linear": {"out_features": 16}}, "ReLU", {"Linear": {"out_features": 16}}, "Tanh",
                  {"Linear": {"out_features": 3}}]),
    "cnn": ([1, 8, 8], [CONV, "ReLU", {"MaxPool2d": 2}, "Flatten", {"Linear": {"out_features": 10}}]),
    "mnist": ([1, 28, 28], MNIST),
    "nested": ([3, 8, 8], [CONV, {"Sequential": [CONV, "ReLU", {"BatchNorm2d": None}, RES], "name": "features"},
                           RES, {"AdaptiveAvgPool2d": 1}, "Flatten",
                           {"Sequential": [{"Dropout": 0.5}, {"Linear": {"out_features": 10}}], "name": "classifier"}]),
}


def build(layers, input_shape, blocks=None, loss="cross_entropy"):
    m = {"input_shape": list(input_shape), "layers": layers}
    if blocks:
        m["blocks"] = blocks
    cfg, doc = config.from_dict({"name": "t", "model": m, "data": {"source": "digits"}, "train": {"loss": loss}})
    return model.build(cfg, doc)


def named(name):
    shape, layers = MODELS[name]
    net, plan = build(layers, shape, loss="nll" if name == "mnist" else "cross_entropy")
    return net, plan, shape


def oracle(net, shape, depth):
    """torchinfo's rows down to `depth` (torchinfo's depth 1 = our depth 0), and its summary."""
    s = torchinfo.summary(net, input_size=(1, *shape), verbose=0, depth=depth)
    rows = [r for r in s.summary_list if 1 <= r.depth <= depth]
    return rows, s


# --- torchinfo as the oracle -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("depth", [1, 3])
def test_params_and_shapes_agree_with_torchinfo(name, depth):
    net, plan, shape = named(name)
    ours = summarize(net, plan, shape, depth=depth)
    rows, ti = oracle(net, shape, depth)
    assert ours.total_params == ti.total_params
    assert ours.trainable_params == ti.trainable_params
    assert ours.frozen_params == 0
    assert len(ours.rows) == len(rows)
    for r, t in zip(ours.rows, rows):
        assert r.depth == t.depth - 1
        assert r.type.split(" (")[-1].rstrip(")") == t.class_name
        assert r.params == t.num_params, r.name
        assert r.trainable == t.trainable_params, r.name
        assert r.output_shape == list(t.output_size[1:]), r.name


def test_frozen_parameters_agree_with_torchinfo():
    net, plan, shape = named("nested")
    for p in net[0].parameters():
        p.requires_grad_(False)
    net.features[0].weight.requires_grad_(False)  # half of a conv: partial
    for p in net.classifier.parameters():
        p.requires_grad_(False)
    ours = summarize(net, plan, shape, depth=0)
    rows, ti = oracle(net, shape, 10)
    assert (ours.total_params, ours.trainable_params) == (ti.total_params, ti.trainable_params)
    assert ours.frozen_params == ours.total_params - ti.trainable_params > 0
    for r, t in zip(ours.rows, rows, strict=True):
        assert (r.params, r.trainable) == (t.num_params, t.trainable_params), r.name
    by = {r.name: r for r in ours.rows}
    assert by["0"].status == "frozen"
    assert by["features"].status == "partial"
    assert by["features.0"].status == "partial"
    assert by["features.0"].trainable == 8
    assert by["features.2"].status == "trainable"  # BatchNorm2d
    assert by["features.1"].status == "-"  # ReLU
    assert by["classifier"].status == "frozen"
    assert by["classifier.0"].status == "-"  # Dropout


def test_macs_against_torchinfo_and_by_hand():
    """flop_counter counts no bias; torchinfo 1.8 adds one per output element for a bias."""
    net, plan, shape = named("mnist")
    ours = summarize(net, plan, shape, depth=1)
    rows, _ = oracle(net, shape, 1)
    by = {r.name: r for r in ours.rows}
    # by hand: Conv2d C_out*C_in/groups*kh*kw*H_out*W_out, Linear in*out
    conv1 = 32 * 1 * 3 * 3 * 26 * 26
    conv2 = 64 * 32 * 3 * 3 * 24 * 24
    fc1, fc2 = 9216 * 128, 128 * 10
    assert by["0"].macs == conv1
    assert by["2"].macs == conv2
    assert by["7"].macs == fc1
    assert by["10"].macs == fc2
    assert ours.total_macs == conv1 + conv2 + fc1 + fc2
    for name in ("1", "3", "4", "5", "6", "8", "9", "11"):
        assert by[name].macs == 0
    # torchinfo's mult-adds = ours + bias additions (out numel), on Conv2d and Linear
    for r, t in zip(ours.rows, rows, strict=True):
        if r.type in ("Conv2d", "Linear"):
            assert t.macs == r.macs + math.prod(r.output_shape), r.name


def test_macs_equal_torchinfo_without_bias():
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, bias=False), nn.Conv2d(6, 6, 3, groups=3, bias=False),
                        nn.Flatten(), nn.Linear(6 * 9 * 9, 7, bias=False))
    ours = summarize(net, None, [3, 23, 23])
    ti = torchinfo.summary(net, input_size=(1, 3, 23, 23), verbose=0)
    assert ours.total_macs == ti.total_mult_adds
    assert ours.rows[1].macs == 6 * (6 // 3) * 3 * 3 * 9 * 9  # groups divide the input channels


def test_nested_macs_are_recursive():
    net, plan, shape = named("nested")
    s = summarize(net, plan, shape, depth=0)
    by = {r.name: r for r in s.rows}
    assert by["features"].macs == sum(by[f"features.{i}"].macs for i in range(4))
    assert by["features.3"].macs == by["features.3.1"].macs == 8 * 8 * 9 * 8 * 8
    assert s.total_macs == sum(r.macs for r in s.rows if r.depth == 0)


# --- shapes, depth, plan ----------------------------------------------------------------------

def test_output_shapes_equal_plain_forward():
    net, plan, shape = named("nested")
    s = summarize(net, plan, shape, depth=1)
    x = torch.randn(1, *shape)
    net.eval()
    with torch.no_grad():
        for row, child in zip(s.rows, net.children(), strict=True):
            x = child(x)
            assert row.output_shape == list(x.shape[1:])
    assert s.output_shape == list(x.shape[1:]) == [10]
    # and the plan agrees
    for row in s.rows:
        assert row.output_shape == list(plan.node_for(row.name).out_shape)


def test_depth():
    net, plan, shape = named("nested")
    one = summarize(net, plan, shape, depth=1)
    two = summarize(net, plan, shape, depth=2)
    every = summarize(net, plan, shape, depth=0)
    assert [r.name for r in one.rows] == ["0", "features", "2", "3", "4", "classifier"]
    assert all(r.depth == 0 for r in one.rows)
    assert [r.name for r in two.rows] == [
        "0", "features", "features.0", "features.1", "features.2", "features.3", "2", "2.0", "2.1", "2.2", "2.3",
        "3", "4", "classifier", "classifier.0", "classifier.1"]
    assert [r.name for r in every.rows] == [n for n, _ in net.named_modules() if n]
    assert max(r.depth for r in every.rows) == 2  # features.3.1
    for s in (one, two, every):  # totals do not depend on the depth shown
        assert (s.total_params, s.total_macs, s.activation_bytes) == (one.total_params, one.total_macs,
                                                                       one.activation_bytes)
    with pytest.raises(ValueError):
        summarize(net, plan, shape, depth=-1)


def test_plan_none_gives_class_names_and_no_lines():
    blocks = {"ResBlock": RES}
    net, plan = build([CONV, {"ResBlock": None, "repeat": 2}, "Flatten", {"Linear": {"out_features": 4}}],
                      [1, 8, 8], blocks=blocks)
    with_plan = summarize(net, plan, [1, 8, 8], depth=0)
    bare = summarize(net, None, [1, 8, 8], depth=0)
    assert [r.type for r in with_plan.rows if r.depth == 0] == ["Conv2d", "ResBlock (Residual)",
                                                                 "ResBlock (Residual)", "Flatten", "Linear"]
    assert [r.type for r in bare.rows if r.depth == 0] == ["Conv2d", "Residual", "Residual", "Flatten", "Linear"]
    assert all(r.line is None for r in bare.rows)
    strip = lambda s: [(r.name, r.output_shape, r.params, r.trainable, r.macs, r.status) for r in s.rows]
    assert strip(with_plan) == strip(bare)
    assert with_plan.to_dict() | {"rows": None} == bare.to_dict() | {"rows": None}


def test_yaml_lines_from_the_plan():
    text = """\
name: t
model:
  input_shape: [1, 8, 8]
  layers:
    - Conv2d: {out_channels: 4, kernel_size: 3, padding: 1}
    - ReLU
    - Sequential:
        - Conv2d: {out_channels: 4, kernel_size: 1}
        - ReLU
      name: features
    - Flatten
    - Linear: {out_features: 10}
data: {source: digits}
train: {loss: cross_entropy}
"""
    doc = load_text(text, "t.yaml")
    cfg = CS.validate(doc)
    net, plan = model.build(cfg, doc)
    s = summarize(net, plan, cfg.model.input_shape, depth=2)
    assert [(r.name, r.line) for r in s.rows] == [
        ("0", 5), ("1", 6), ("features", 7), ("features.0", 8), ("features.1", 9), ("3", 11), ("4", 12)]
    assert summarize(net, plan, None).input_shape == [1, 8, 8]  # the plan's input shape by default


def test_model_not_matching_the_plan_trusts_the_model():
    net, plan, shape = named("cnn")
    other = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10))
    s = summarize(other, plan, shape)
    assert s.rows[1].type == "Tanh" and s.rows[1].line is None


# --- totals, bytes, JSON ---------------------------------------------------------------------

def test_bytes_and_activation_estimate():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 5)))
    s = summarize(net, None, [1, 8, 8])
    assert s.param_bytes == 4 * sum(p.numel() for p in net.parameters())
    # running_mean, running_var (float32) and num_batches_tracked (int64)
    assert s.buffer_bytes == 4 * 4 + 4 * 4 + 8
    leaves = [4 * 8 * 8, 4 * 8 * 8, 4 * 8 * 8, 4 * 8 * 8, 5]  # conv, bn, relu, flatten, linear
    assert s.activation_bytes == 4 * sum(leaves)
    ti = torchinfo.summary(net, input_size=(1, 1, 8, 8), verbose=0)
    assert s.param_bytes == ti.total_param_bytes


def test_to_dict_is_json_and_holds_the_numbers():
    net, plan, shape = named("nested")
    net.features.requires_grad_(False)
    s = summarize(net, plan, shape, depth=0)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["total_params"] == s.total_params
    assert d["trainable_params"] == s.trainable_params
    assert d["frozen_params"] == s.frozen_params > 0
    assert d["total_macs"] == s.total_macs
    assert d["param_bytes"] == s.param_bytes and d["buffer_bytes"] == s.buffer_bytes
    assert d["activation_bytes"] == s.activation_bytes
    assert d["input_shape"] == list(shape) and d["output_shape"] == [10]
    assert len(d["rows"]) == len(s.rows)
    for row, got in zip(s.rows, d["rows"]):
        assert Row(**got) == row
    assert isinstance(s, Summary)


def test_leaves_model_alone_and_prints_nothing(capsys):
    net, plan, shape = named("nested")
    net.train()
    net.features[2].eval()  # a frozen BatchNorm kept in eval mode
    before = {k: v.clone() for k, v in net.state_dict().items()}
    summarize(net, plan, shape, depth=0)
    assert net.training and net.features.training and not net.features[2].training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics untouched
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_flop_counter_keys():
    """torch names modules '<RootClass>.<dotted child>' plus 'Global'; check it on this torch."""
    from torch.utils.flop_counter import FlopCounterMode

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))

        def forward(self, x):
            return self.body(x)

    net = Net()
    counter = FlopCounterMode(display=False)
    with counter:
        net(torch.zeros(1, 3))
    counts = counter.get_flop_counts()
    assert {"Global", "Net", "Net.body", "Net.body.0", "Net.body.2.0"} <= set(counts)
    flops, total = flop_counts_by_module(counts, net)
    assert flops["body.0"] == 2 * 3 * 4 and flops["body.2.0"] == 2 * 4 * 2
    assert flops["body"] == flops[""] == total == 2 * (12 + 8)
    # and through summarize, with a root that is not a Sequential
    s = summarize(net, None, [3], depth=0)
    assert [(r.name, r.macs) for r in s.rows] == [("body", 20), ("body.0", 12), ("body.1", 0), ("body.2", 8),
                                                  ("body.2.0", 8)]
    assert s.total_macs == 20


def test_bad_input_shape():
    net, plan, shape = named("mlp")
    with pytest.raises(ValueError):
        summarize(net, None, None)
    with pytest.raises(ValueError):
        summarize(net, None, [0])

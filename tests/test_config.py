"""The YAML loader and the config schema: safe reading, located errors, overrides."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from nnctl import config as C
from nnctl import yamlio
from nnctl.errors import ConfigError

from .conftest import BASE, make

MALFORMED = sorted((Path(__file__).parent / "malformed").glob("*.yaml"))


def problems_of(text: str) -> list:
    with pytest.raises(ConfigError) as info:
        doc = yamlio.load_text(text, "c.yaml")
        C.validate(doc)
    return info.value.problems


def test_core_schema_scalars():
    doc = yamlio.load_text("a: 1e-3\nb: no\nc: on\nd: 0755\ne: 12:30\nf: true\ng: ~\nh: 0x1F\ni: 2001-12-14\n"
                           "j: .inf\nk: 3.\nl: '1e-3'\n")
    d = doc.data
    assert d["a"] == 1e-3 and isinstance(d["a"], float)  # PyYAML alone: the string "1e-3"
    assert d["b"] == "no" and d["c"] == "on"  # YAML 1.1 would give booleans
    assert d["d"] == 755  # never octal 493
    assert d["e"] == "12:30"  # never sexagesimal 750
    assert d["f"] is True and d["g"] is None and d["h"] == 31
    assert d["i"] == "2001-12-14"  # dates stay strings
    assert d["j"] == math.inf and d["k"] == 3.0 and d["l"] == "1e-3"


def test_marks_point_at_values():
    doc = yamlio.load_text("name: x\nmodel:\n  layers:\n    - Conv2d: {kernel_size: 3}\n")
    assert doc.locate(("model", "layers", 0, "Conv2d", "kernel_size")) == (4, 29)
    assert doc.locate(("model", "layers", 0, "Conv2d", "nothing", "deeper")) == doc.locate(
        ("model", "layers", 0, "Conv2d"))


def test_all_problems_reported_together():
    text = "name: x\nmodel: {input_shape: [1, 8, 8], layers: [Flatten]}\ndata: {source: digitz, val_fraction: 2}\n" \
           "train: {loss: nll, epochs: 0, optimiser: {Adam: {}}}\n"
    probs = problems_of(text)
    paths = {p.path for p in probs}
    assert {"data.source", "data.val_fraction", "train.epochs", "train.optimiser"} <= paths
    assert all(p.line is not None for p in probs)
    src = next(p for p in probs if p.path == "data.source")
    assert "did you mean 'digits'" in src.message and src.line == 3
    key = next(p for p in probs if p.path == "train.optimiser")
    assert "did you mean 'optimizer'" in key.message


def test_yaml_11_booleans_rejected_with_hint():
    probs = problems_of(yamlio_text := "name: x\nmodel: {input_shape: [1], layers: [ReLU]}\n"
                        "data: {source: digits, download: yes}\ntrain: {loss: mse}\n")
    assert yamlio_text
    (p,) = probs
    assert p.path == "data.download" and "write true" in p.message


@pytest.mark.parametrize("text,needle", [
    ("a: !!python/object/apply:os.system [echo]\n", "not allowed"),
    ("a: !!python/name:os.system\n", "not allowed"),
    ("a: !!set {x}\n", "not allowed"),
    ("a: &x [*x]\n", "self-referential"),
    ("a: 1\na: 2\n", "duplicate key"),
    ("a: 1\n---\nb: 2\n", "more than one YAML document"),
    ("", "empty"),
    ("a: [" * 100 + "]" * 100 + "\n", "nesting deeper"),
    ("x: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(f"x{i}: &a{i} [{','.join(['*a' if i == 0 else f'*a{i - 1}'] * 10)}]\n"
                                                  for i in range(6)), "alias bomb"),
])
def test_dangerous_yaml_refused(text, needle):
    with pytest.raises(ConfigError) as info:
        yamlio.load_text(text, "c.yaml")
    assert needle in str(info.value)


def test_alias_bomb_refused_before_expansion():
    import time

    layers = "l0: &l0 [a, a, a, a, a, a, a, a, a, a]\n" + "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 12))
    began = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb"):
        yamlio.load_text(layers)
    assert time.perf_counter() - began < 5  # 10^12 values would never finish


def test_overrides_apply_and_parse_yaml(tmp_path):
    from .conftest import write

    p = write(tmp_path, make())
    cfg, doc = C.load(str(p), ["train.optimizer.Adam.lr=0.01", "train.epochs=3", "model.layers[1].Linear.out_features=7",
                               "data.val_fraction=1e-1"])
    assert cfg.train.optimizer == {"Adam": {"lr": 0.01}}
    assert cfg.train.epochs == 3 and cfg.data.val_fraction == 0.1
    assert doc.data["model"]["layers"][1]["Linear"]["out_features"] == 7
    with pytest.raises(ConfigError) as info:
        C.load(str(p), ["train.epochs=zero"])
    (prob,) = info.value.problems
    assert prob.file == "--set train.epochs=zero" and prob.path == "train.epochs"
    with pytest.raises(ConfigError, match="expected key.path=value"):
        C.load(str(p), ["train.epochs"])


def test_defaults_resolved():
    cfg, _ = C.from_dict(make())
    r = C.resolved(cfg)
    assert r["train"]["optimizer"] == {"Adam": {"lr": 0.001}}
    assert r["train"]["device"] == "auto" and r["train"]["precision"] == "fp32"
    assert C.from_dict(r)[0] == cfg  # a resolved config validates to itself


def test_schema_is_json_schema_with_layers():
    import json

    s = C.json_schema()
    json.dumps(s)
    assert s["properties"]["train"]
    assert "Conv2d" in s["$defs"]["LayerEntry"]["anyOf"][1]["properties"]


@pytest.mark.parametrize("path", MALFORMED, ids=lambda p: p.name)
def test_malformed_corpus_exit_2_one_line_each_with_line(path, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a payload would write SENTINEL
    code, out, err = cli("check", str(path))
    assert code == 2, (out, err)
    assert "Traceback" not in err + out
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no message"
    for line in lines:
        # file:line[:col]: ... one line a problem, each naming its line
        assert re.match(rf"^{re.escape(str(path))}:\d+(:\d+)?: \S", line), line
    assert not (tmp_path / "SENTINEL").exists()


def test_corpus_is_large_enough():
    assert len(MALFORMED) >= 40


def test_base_config_valid():
    cfg, _ = C.from_dict(BASE)
    assert cfg.name == "t"

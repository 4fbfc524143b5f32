"""The YAML loader and the config schema: safe reading, located errors, overrides."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from nnctl.config import structure as CS
from nnctl.config import schema as C
from nnctl.config import loader as CL
from nnctl.config import yamlio
from nnctl.errors import ConfigError

from .conftest import BASE, make

MALFORMED = sorted((Path(__file__).parent / "malformed").glob("*.yaml"))


def problems_of(text: str) -> list:
    with pytest.raises(ConfigError) as info:
        doc = yamlio.load_text(text, "c.yaml")
        CS.validate(doc)
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
    cfg, doc = CL.load(str(p), ["train.optimizer.Adam.lr=0.01", "train.epochs=3", "model.layers[1].Linear.out_features=7",
                               "data.val_fraction=1e-1"])
    assert cfg.train.optimizer == {"Adam": {"lr": 0.01}}
    assert cfg.train.epochs == 3 and cfg.data.val_fraction == 0.1
    assert doc.data["model"]["layers"][1]["Linear"]["out_features"] == 7
    with pytest.raises(ConfigError) as info:
        CL.load(str(p), ["train.epochs=zero"])
    (prob,) = info.value.problems
    assert prob.file == "--set train.epochs=zero" and prob.path == "train.epochs"
    with pytest.raises(ConfigError, match="expected key.path=value"):
        CL.load(str(p), ["train.epochs"])


def test_defaults_resolved():
    cfg, _ = CL.from_dict(make())
    r = C.resolved(cfg)
    assert r["train"]["optimizer"] == {"Adam": {"lr": 0.001}}
    assert r["train"]["device"] == "auto" and r["train"]["precision"] == "32-true"  # fp32, by Lightning's name
    assert CL.from_dict(r)[0] == cfg  # a resolved config validates to itself


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
    cfg, _ = CL.from_dict(BASE)
    assert cfg.name == "t"


# --- configs as a user writes them (issue points 11-14) -------------------------------

MODEL_ONLY = "model:\n  input_shape: [1, 8, 8]\n  layers:\n    - Flatten\n    - Linear: {out_features: 16}\n" \
             "    - ReLU\n    - Linear: {out_features: 10}\n"


def test_model_only_config_works_for_check_summary_freeze_export(tmp_path):
    from .conftest import run_cli

    p = tmp_path / "only-model.yaml"
    p.write_text(MODEL_ONLY)
    r = run_cli("check", str(p))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: ") and "1,210 parameters" in r.stdout
    r = run_cli("summary", str(p), "--json")
    assert r.returncode == 0, r.stderr
    assert json_total(r.stdout) == 1210
    r = run_cli("freeze", str(p), "--first", "2", "-o", str(tmp_path / "frozen.pt"))
    assert r.returncode == 0, r.stderr
    r = run_cli("export-weights", str(tmp_path / "frozen.pt"), "-o", str(tmp_path / "w.safetensors"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "w.safetensors").stat().st_size > 0


def json_total(text: str) -> int:
    import json

    return json.loads(text)["total_params"]


def test_model_only_defaults():
    doc = yamlio.load_text(MODEL_ONLY, "configs/my model.yaml")
    cfg = CS.validate(doc)
    assert cfg.data is None
    assert cfg.name == "my-model"  # the file's name, made a valid run name
    t = cfg.train
    assert (t.loss, t.epochs, t.batch_size, t.optimizer, t.device) == (
        "cross_entropy", 10, 64, {"Adam": {"lr": 0.001}}, "auto")
    assert CL.from_dict(C.resolved(cfg))[0] == cfg  # the resolved form (data: null) validates to itself


def test_require_data_names_the_fix():
    doc = yamlio.load_text(MODEL_ONLY, "m.yaml")
    cfg = CS.validate(doc)
    with pytest.raises(ConfigError) as info:
        CS.require_data(cfg, doc)
    (p,) = info.value.problems
    assert p.file == "m.yaml" and p.path == "data"
    assert "no data: section: training needs one" in p.message and "data: {source: digits}" in p.message
    assert "evaluation needs one" in str(pytest.raises(ConfigError, CS.require_data, cfg, doc, "evaluation").value)
    full = CS.validate(yamlio.load_text(MODEL_ONLY + "data: {source: digits}\n", "m.yaml"))
    assert CS.require_data(full, doc).source == "digits"


def test_lint_and_monitor_without_data():
    from nnctl.model import plan as M
    from nnctl.optim import optimizers as OPT
    from nnctl.training import policy as POL

    doc = yamlio.load_text(MODEL_ONLY, "m.yaml")
    cfg = CS.validate(doc)
    p = M.plan(cfg, doc)
    assert M.lint(cfg, p) == []
    assert POL.monitor_for(cfg, True) == ("val_accuracy", "max")
    assert OPT.validate(cfg, doc) == []


def test_check_reports_structure_first_then_shapes_and_the_api_all_in_one_pass(tmp_path):
    """`nnctl check`: structural problems (keys, types, ranges) come without import torch (issue 24: fast);
    the layer and shape problems, which need torch, once the structure is valid. nnctl.check() and
    `nnctl train` (which import torch anyway) report both kinds in one pass."""
    from .conftest import run_cli

    p = tmp_path / "c.yaml"
    p.write_text("name: x\nmodel:\n  input_shape: [1, 8, 8]\n  layers:\n    - Flatten\n    - Linear: [100, 10]\n"
                 "    - Conv2D: 3\ndata: {sorce: digits}\ntrain: {epochs: 0, optimizer: {Adamm: {}}}\n")
    r = run_cli("check", str(p))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr
    assert f"{p}:8:" in err and "data.sorce" in err  # structural: a broken data section
    assert f"{p}:9:" in err and "train.epochs" in err
    for line in err.strip().splitlines():
        assert re.match(rf"^{re.escape(str(p))}:\d+:\d+: \S", line), line
    import nnctl

    every = "\n".join(prob.format() for prob in nnctl.check(str(p)))
    assert "data.sorce" in every and "train.epochs" in every
    assert f"{p}:6:" in every and "in_features=100" in every and "64" in every  # the shape error
    assert f"{p}:7:" in every and "did you mean 'Conv2d'" in every
    assert "Adamm" in every and "did you mean 'Adam'" in every
    p.write_text(p.read_text().replace("sorce", "source").replace("epochs: 0", "epochs: 1"))
    err = run_cli("check", str(p)).stderr  # the structure fixed: the shapes, with torch
    assert f"{p}:6:" in err and "in_features=100" in err and f"{p}:7:" in err and "did you mean 'Adam'" in err


def test_check_function_collects_everything():
    from nnctl import checking as CHK

    doc = yamlio.load_text("model: {input_shape: [4], layers: [{Linear: [5, 2]}]}\ndata: 3\n", "c.yaml")
    result = CHK.check(doc)
    assert result.cfg is None and result.plan is None
    assert [p.path for p in result.problems] == ["model.layers[0].Linear", "data"]
    with pytest.raises(ConfigError) as info:
        CS.validate(doc)
    assert [p.path for p in info.value.problems] == ["data"]  # validate alone stops at the structure


@pytest.mark.parametrize("text,line,col", [
    ("name: x\nmodel:\n  input_shape: [1, 8, 8\n  layers: [Flatten]\n", 3, 16),
    ("a: {x: 1\n\n\n", 1, 4),
    ("a: [1, {b: 2]\n", 1, 8),
    ("a: [\n  1,\n  2\nb: 3\n", 1, 4),
])
def test_unclosed_bracket_blamed_on_its_opening_line(text, line, col):
    with pytest.raises(ConfigError) as info:
        yamlio.load_text(text, "c.yaml")
    (p,) = info.value.problems
    assert (p.line, p.column) == (line, col), p.format()
    assert "unclosed" in p.message and "parser stopped at" in p.message


def test_unclosed_bracket_through_the_cli(tmp_path):
    from .conftest import run_cli

    path = Path(__file__).parent / "malformed" / "68_unclosed_flow_mapping.yaml"
    r = run_cli("check", str(path))
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"{path}:7:15: YAML syntax error: unclosed '{{'"), line
    assert "line 9" in line


@pytest.mark.parametrize("indent", ["      ", "    "])
def test_bare_block_name_with_repeat_gets_the_fix(indent):
    text = f"model:\n  layers:\n    - ResBlock\n{indent}repeat: 9\n"
    with pytest.raises(ConfigError) as info:
        yamlio.load_text(text, "c.yaml")
    (p,) = info.value.problems
    assert (p.line, p.column) == (3, 7)
    assert "`- ResBlock:`" in p.message and "repeat" in p.message


def test_config_file_read_refuses_fifo_and_devices(tmp_path):
    import os

    from .conftest import run_cli

    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    r = run_cli("check", str(fifo), timeout=60)  # a plain open() would wait for a writer forever
    assert r.returncode == 2 and "FIFO" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"{fifo}: ")
    with pytest.raises(ConfigError) as info:
        yamlio.load_file("/dev/zero")
    (p,) = info.value.problems
    assert p.file == "/dev/zero" and "character device" in p.message
    with pytest.raises(ConfigError, match="no such"):
        yamlio.load_file(str(tmp_path / "missing.yaml"))


def test_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    import os

    folder = tmp_path / "proj" / "configs"
    folder.mkdir(parents=True)
    p = folder / "c.yaml"
    p.write_text(MODEL_ONLY + "data: {source: image_folder, root: ../images}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg, doc = CL.load(os.path.relpath(p))
    assert cfg.data.root == str(tmp_path / "proj" / "images")
    # --set values are relative to the current directory
    cfg, _ = CL.load(os.path.relpath(p), ["data.root=imgs"])
    assert cfg.data.root == str(elsewhere / "imgs")
    cfg, _ = CL.load(str(p), ["data={source: tensors, path: d.npz}"])
    assert cfg.data.path == str(elsewhere / "d.npz")
    # ~ expands; absolute paths stay
    p.write_text(MODEL_ONLY + "data: {source: tensors, path: ~/d.npz, root: /abs/x}\n")
    cfg, _ = CL.load(str(p))
    assert cfg.data.path == os.path.join(os.path.expanduser("~"), "d.npz") and cfg.data.root == "/abs/x"
    # a config from a checkpoint (already resolved) is kept as it is
    cfg2, _ = CL.from_dict(C.resolved(cfg))
    assert cfg2.data.path == cfg.data.path
    rel, _ = CL.from_dict({"model": {"input_shape": [4], "layers": ["ReLU"]}, "data": {"source": "tensors",
                                                                                     "path": "rel.npz"}})
    assert rel.data.path == "rel.npz"


def test_optimizer_argument_beyond_float32_is_a_located_error(tmp_path):
    """SGD lr 1e300 is finite for Python but overflows the optimizer's float32 state: exit 2, located."""
    from .conftest import run_cli, write

    p = write(tmp_path, make(train={"optimizer": {"SGD": {"lr": 1e300}}}))
    r = run_cli("check", str(p))
    assert r.returncode == 2 and "beyond float32's range" in r.stderr and "internal error" not in r.stderr


def test_suggestions_count_two_swapped_letters_as_one_edit():
    """`Adma` suggested Adamax (difflib's ratio prefers the longer name); the fewest edits win now."""
    from nnctl.config.schema import suggest

    optimizers = ["Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "ASGD", "LBFGS", "NAdam", "RAdam", "RMSprop", "SGD"]
    assert suggest("Adma", optimizers) == "; did you mean 'Adam'?"
    assert suggest("SDG", optimizers) == "; did you mean 'SGD'?"
    assert suggest("Adamxa", optimizers) == "; did you mean 'Adamax'?"
    assert suggest("Lienar", ["Linear", "LazyLinear", "Bilinear"]) == "; did you mean 'Linear'?"

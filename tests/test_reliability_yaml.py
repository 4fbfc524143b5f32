"""Reliability and security, hostile configs: every YAML danger, names outside torch.nn,
absurd sizes, typos, the malformed corpus through `nnctl check`.

The threat model and the figures of a run are in docs/reliability.md. Set
NNCTL_RELIABILITY_REPORT=path.json to add this module's counts to that file.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from nnctl.config import loader as CL
from nnctl.config import structure as C
from nnctl.model import plan as M
from nnctl.optim import optimizers as T
from nnctl.config import yamlio
from nnctl.errors import ConfigError

from .conftest import SENTINEL, add_to_reliability_report, config_outcome, helper_command, make, not_one_line

MALFORMED_DIR = Path(__file__).parent / "malformed"

# figures for docs/reliability.md: counted as the tests run, written at the module's end
STATS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    add_to_reliability_report(STATS)


@pytest.mark.parametrize("text,needle", [
    # code-running tags, in every place a tag can sit
    ("name: !!python/object/apply:os.system ['touch SENTINEL']\n", "not allowed"),
    ("name: !!python/object/new:os.system ['touch SENTINEL']\n", "not allowed"),
    ("name: !!python/module:os\n", "not allowed"),
    ("name: !!python/name:builtins.eval\n", "not allowed"),
    ("? !!python/name:os.system\n: 1\n", "not allowed"),  # a tagged key
    ("? !!python/object/apply:os.system ['touch SENTINEL']\n: 1\n", "plain name"),  # a code-shaped key
    ("a: !!python/object/apply:subprocess.check_call [[touch, SENTINEL]]\n", "not allowed"),
    ("a: !Local {x: 1}\n", "not allowed"),
    ("a: !<tag:yaml.org,2002:python/object:os.system> x\n", "not allowed"),
    ("a: !!timestamp 2001-12-14\n", "not allowed"),
    ("a: !!omap [x: 1]\n", "not allowed"),
    # alias tricks
    ("a: &a {b: *a}\n", "self-referential"),
    ("a: &a [1, [2, *a]]\n", "self-referential"),
    ("a: [" * 70 + "]" * 70 + "\n", "nesting deeper"),
    ("a:\n" + "".join("  " * i + " b:\n" for i in range(1, 70)) + "  " * 70 + " c: 1\n", "nesting deeper"),
    ("<<: {a: 1}\n", "merge keys"),
    # duplicate keys, at any depth, also as different spellings of one value
    ("a: {b: 1, b: 2}\n", "duplicate key"),
    ("1: a\n0x1: b\n", "duplicate key"),
    # documents, emptiness, characters
    ("--- {a: 1}\n--- {a: 2}\n", "more than one YAML document"),
    ("   \n\n", "empty"),
    ("---\n...\n", "empty"),
    ("a: x\x08y\n", "not allowed"),  # a control character: was a yaml.reader.ReaderError traceback
    ("a: \x1b[31mred\n", "not allowed"),
    ("a: 'unterminated\n", "syntax error"),
    ("a: [1, 2\n", "syntax error"),
    ("%TAG !py! tag:yaml.org,2002:python/object/apply:\n---\na: !py!os.system [x]\n", "not allowed"),
])
def test_dangerous_yaml_is_refused_in_process(text, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        C.validate(yamlio.load_text(text, "c.yaml"))
    assert needle in str(info.value), str(info.value)
    for p in info.value.problems:
        assert "\n" not in p.format() and p.format().startswith("c.yaml")
    assert not (tmp_path / SENTINEL).exists()
    STATS["configs_dangerous_yaml"] += 1


def test_yaml_11_surprises_in_typed_fields():
    base = "name: x\nmodel: {input_shape: [1, 8, 8], layers: [Flatten, {Linear: {out_features: 10}}]}\n" \
           "data: {source: digits%s}\ntrain: {loss: cross_entropy%s}\n"
    cfg = C.validate(yamlio.load_text(base % ("", ", epochs: 0755, optimizer: {Adam: {lr: 1e-3}}")))
    assert cfg.train.epochs == 755  # never octal 493
    assert cfg.train.optimizer["Adam"]["lr"] == 1e-3 and isinstance(cfg.train.optimizer["Adam"]["lr"], float)
    for train_extra, data_extra, needle in [
        (", epochs: 12:30", "", "expected an integer"),  # never sexagesimal 750
        ("", ", download: no", "write false"),
        ("", ", download: on", "write true"),
        ("", ", grayscale: yes", "write true"),
        (", compile: off", "", "write false"),
        (", epochs: 1e3", "", "expected an integer"),  # a float, not silently 1000
        (", epochs: 2001-12-14", "", "expected an integer"),
        (", batch_size: 0o777", "", None),  # YAML 1.2 octal: 511, accepted
    ]:
        text = base % (data_extra, train_extra)
        if needle is None:
            assert C.validate(yamlio.load_text(text)).train.batch_size == 511
            continue
        with pytest.raises(ConfigError) as info:
            C.validate(yamlio.load_text(text, "c.yaml"))
        assert needle in str(info.value), (train_extra, data_extra, str(info.value))
    STATS["configs_yaml11"] += 9


def test_file_level_refusals(tmp_path):
    cases = {
        "utf16.yaml": "name: x\n".encode("utf-16"),
        "latin1.yaml": "name: caf\xe9\n".encode("latin-1"),
        "nul.yaml": b"name: x\x00\n",
        "huge.yaml": b"# " + b"x" * (yamlio.MAX_BYTES + 10) + b"\n",
        "empty.yaml": b"",
    }
    for name, raw in cases.items():
        p = tmp_path / name
        p.write_bytes(raw)
        with pytest.raises(ConfigError) as info:
            yamlio.load_file(str(p))
        (prob,) = info.value.problems
        assert prob.file == str(p) and prob.line is not None, (name, prob)
    with pytest.raises(ConfigError, match="is a folder"):
        yamlio.load_file(str(tmp_path))
    with pytest.raises(ConfigError, match="no such file"):
        yamlio.load_file(str(tmp_path / "missing.yaml"))
    # a BOM is fine
    p = tmp_path / "bom.yaml"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(make()).encode())
    assert CL.load(str(p))[0].name == "t"
    STATS["configs_file_level"] += len(cases) + 2


OUTSIDE_TORCH_NN = ["os.system", "builtins.eval", "torch.load", "eval", "exec", "__import__", "getattr",
                    "subprocess.Popen", "torch.nn.Linear", "nn.Linear", "Linear.__init__", "__class__",
                    "Module", "ModuleList", "ModuleDict", "ParameterList", "Parameter", "Tensor",
                    "functional.relu", "F.relu", "torch.hub.load", "pickle.loads", "_reduce_ex", "__reduce__",
                    "Linear; import os", "../../Linear", "Linear\n", " Linear", "linear.Linear"]


@pytest.mark.parametrize("name", OUTSIDE_TORCH_NN)
def test_layer_types_outside_torch_nn_are_refused(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for entry in (name, {name: "touch SENTINEL"}, {name: ["touch SENTINEL"]}, {name: {"x": 1}}):
        d = make(model={"input_shape": [1, 8, 8], "layers": [entry]})
        with pytest.raises(ConfigError) as info:
            cfg, doc = CL.from_dict(d)
            M.plan(cfg, doc)
        assert "unknown layer type" in str(info.value), str(info.value)
    assert not (tmp_path / SENTINEL).exists()
    STATS["configs_outside_torch_nn"] += 4


def test_typos_get_suggestions():
    cases = [
        (make(model={"input_shape": [1, 8, 8], "layers": ["Flatten", {"Lineer": {"out_features": 10}}]}),
         "did you mean 'Linear'"),
        (make(model={"input_shape": [1, 8, 8], "layers": [{"Conv2D": {"out_channels": 4, "kernel_size": 3}}]}),
         "did you mean 'Conv2d'"),
        (make(model={"input_shape": [1, 8, 8], "layers": ["Maxpooling2d"]}), "did you mean 'MaxPool2d'"),
        (make(model={"input_shape": [1, 8, 8], "layers": [{"Conv2d": {"out_channels": 4, "kernal_size": 3}}]}),
         "did you mean 'kernel_size'"),
        (make(train={"optimizer": {"Adamw": {"lr": 0.1}}}), "did you mean 'AdamW'"),
        (make(train={"optimizer": {"Adam": {"lrr": 0.1}}}), "did you mean 'lr'"),
        (make(train={"scheduler": {"StepLr": {"step_size": 1}}}), "did you mean 'StepLR'"),
        (make(train={"los": "nll"}), "did you mean 'loss'"),
        (make(data={"source": "digit"}), "did you mean 'digits'"),
        (make(train={"loss": "crossentropy"}), "did you mean 'cross_entropy'"),
    ]
    for d, needle in cases:
        outcome, problems = config_outcome(yamlio.Document(d, "c.yaml"))
        assert outcome == "refused" and problems, (needle, outcome)
        assert not_one_line(problems) == [], problems
        with pytest.raises(ConfigError) as info:
            cfg, doc = CL.from_dict(d)
            M.plan(cfg, doc)
            probs = T.validate(cfg, doc)
            if probs:
                raise ConfigError(probs)
        assert needle in str(info.value), (needle, str(info.value))
    STATS["configs_typos"] += len(cases)


ABSURD = {
    "linear_1e12": make(model={"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 10**12}}]}),
    "conv_1e6_channels": make(model={"input_shape": [1, 8, 8], "layers": [
        {"Conv2d": {"out_channels": 10**6, "kernel_size": 3}}, {"Conv2d": {"out_channels": 10**6, "kernel_size": 3}}]}),
    "repeat_bomb": make(model={"input_shape": [4096], "layers": [{"Linear": {"out_features": 4096}, "repeat": 1000}]}),
    "embedding_1e12": make(model={"input_shape": [4], "layers": [{"Embedding": [10**12, 10**3]}]}),
    "activation_2e31": make(model={"input_shape": [1, 1024, 1024], "layers": [
        {"Upsample": {"scale_factor": 64}}]}),
    "input_shape_1e18": make(model={"input_shape": [10**6, 10**6, 10**6], "layers": ["Flatten"]}),
    "negative_epochs": make(train={"epochs": -3}),
    "huge_epochs": make(train={"epochs": 10**15}),
    "nan_lr": make(train={"optimizer": {"Adam": {"lr": math.nan}}}),
    "inf_lr": make(train={"optimizer": {"SGD": {"lr": math.inf}}}),
    "huge_batch": make(train={"batch_size": 10**12}),
    "synthetic_1e12": make(data={"source": "synthetic", "size": 10**12, "classes": 10}),
    "dropout_nan": make(model={"input_shape": [1, 8, 8], "layers": ["Flatten", {"Dropout": math.nan},
                                                                   {"Linear": {"out_features": 10}}]}),
}


def test_absurd_sizes_refused_before_memory_is_spent(tmp_path):
    """In a fresh process: every absurd config is refused and the peak RSS does not move."""
    # the warm-up plans the same layer types at small sizes: torch imports some meta kernels lazily
    # (tens of MiB of modules, once), which must not count as an allocation by the absurd configs
    warm = [make(model={"input_shape": [1, 8, 8], "layers": [{"Conv2d": {"out_channels": 4, "kernel_size": 3}},
                                                             {"Conv2d": {"out_channels": 4, "kernel_size": 3}},
                                                             "Flatten", {"Dropout": 0.5}]}),
            make(model={"input_shape": [64], "layers": [{"Linear": {"out_features": 64}, "repeat": 3}]}),
            make(model={"input_shape": [1, 8, 8], "layers": [{"Upsample": {"scale_factor": 2}}]})]
    (tmp_path / "cases.json").write_text(json.dumps({"base": warm, "cases": ABSURD}))
    r = subprocess.run(helper_command("plan_absurd_configs", str(tmp_path / "cases.json")),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(res["results"]) == sorted(ABSURD)  # every case was planned
    for name, message in res["results"].items():
        assert message != "ACCEPTED", name
        assert "\n" not in message
    # refusing 10^12 features, 10^18 input values, 10^12 epochs never allocates: under 64 MiB of growth
    assert res["growth_kib"] < 64 * 1024, res
    STATS["configs_absurd_sizes"] += len(ABSURD)
    STATS["absurd_peak_rss_growth_kib"] = max(STATS["absurd_peak_rss_growth_kib"], res["growth_kib"])


def test_new_malformed_files_exit_2_without_running_payloads(cli, tmp_path, monkeypatch):
    """The corpus files added for this suite, through the real command (in-process)."""
    monkeypatch.chdir(tmp_path)
    added = sorted(p for p in MALFORMED_DIR.glob("*.yaml") if int(p.name[:2]) >= 53)
    assert len(added) >= 10
    for path in added:
        code, out, err = cli("check", str(path))
        assert code == 2, (path.name, out, err)
        assert "Traceback" not in err + out and "internal error" not in err, (path.name, err)
        for line in err.strip().splitlines():
            assert re.match(rf"^{re.escape(str(path))}:\d+(:\d+)?: \S", line), (path.name, line)
    assert not (tmp_path / SENTINEL).exists()
    STATS["configs_malformed_corpus"] = len(list(MALFORMED_DIR.glob("*.yaml")))

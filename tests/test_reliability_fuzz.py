"""Reliability and security, fuzzing: property-based mutations of configs (as dicts and as
YAML bytes) through the loader and the model builder, random --set overrides, and a sample
of mutated files through `nnctl check`.

The long loops are marked `slow` (python -m pytest -m slow -q tests/test_reliability_fuzz.py).
Set NNCTL_RELIABILITY_REPORT=path.json to add this module's counts to that file.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnctl.config import loader as C
from nnctl.config import yamlio
from nnctl.errors import ConfigError

from .conftest import (BASE, CONFIGS, SENTINEL, add_to_reliability_report, config_outcome, not_one_line,
                       text_outcome)

# figures for docs/reliability.md: counted as the tests run, written at the module's end
STATS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    add_to_reliability_report(STATS)


SEEDS = [copy.deepcopy(BASE)] + [yamlio.load_file(str(p)).data for p in CONFIGS]
SEED_TEXTS = [p.read_bytes() for p in CONFIGS] + [json.dumps(BASE).encode()]
LAYER_NAMES = ["ReLU", "Flatten", "Conv2d", "Linear", "os.system", "builtins.eval", "torch.load", "Sequential",
               "Residual", "MaxPool2d", "Dropout", "LSTM", "Transformer", "Embedding", "Softmax", "BatchNorm2d",
               "Identity", "Unflatten", "Bilinear", "MultiheadAttention", "Fold", "Upsample", "PixelShuffle",
               "AdaptiveAvgPool2d", "Conv3d", "ConvTranspose2d", "LazyLinear", "ModuleList", "Module", "RNN",
               "GRU", "TransformerEncoderLayer", "EmbeddingBag", "CrossEntropyLoss", "ZeroPad2d", "Threshold",
               "LogSoftmax", "InstanceNorm2d", "ReflectionPad2d", "Dropout2d", "Conv1d", "GroupNorm", "Unfold"]
KEYS = ["a", "lr", "out_features", "in_features", "kernel_size", "name", "repeat", "dim", "padding", "stride",
        "epochs", "source", "loss", "layers", "input_shape", "Adam", "SGD", "StepLR", "blocks", "freeze"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-3, max_value=70),
    st.sampled_from([0, -1, 10**12, -(10**12), 2**63, 2**31, 1 << 20]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["", "x", "no", "on", "12:30", "1e-3", "0755", "ReLU", "Conv2d", "cpu", "cuda:7", "nll",
                     "digits", "synthetic", "input", "../../etc", "os.system", "!!python/name:os.system"]),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS + LAYER_NAMES), inner, max_size=3)),
    max_leaves=8,
)
layer_entries = st.one_of(
    st.sampled_from(LAYER_NAMES),
    st.builds(lambda n, v: {n: v}, st.sampled_from(LAYER_NAMES), values),
    st.builds(lambda n, v, k, r: {n: v, k: r}, st.sampled_from(LAYER_NAMES), values,
              st.sampled_from(["name", "repeat"]), scalars),
)


def _places(d, pre=()):
    if pre:
        yield pre
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _places(v, pre + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _places(v, pre + (i,))


def _at(d, path):
    for k in path:
        d = d[k]
    return d


def mutate(data, seed_index: int) -> dict:
    """Apply 1 to 5 random structural mutations to a valid config (drawn through hypothesis)."""
    d = copy.deepcopy(SEEDS[seed_index % len(SEEDS)])
    for _ in range(data.draw(st.integers(1, 5), label="mutations")):
        places = list(_places(d))
        if not places:
            break
        path = places[data.draw(st.integers(0, len(places) - 1), label="place")]
        parent, key = _at(d, path[:-1]), path[-1]
        op = data.draw(st.sampled_from(["delete", "replace", "insert_layer", "swap_layer_name", "add_key"]))
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = data.draw(values, label="value")
        elif op == "insert_layer" and isinstance(parent, list):
            parent.insert(key, data.draw(layer_entries, label="layer"))
        elif op == "swap_layer_name" and isinstance(parent, dict) and isinstance(key, str) and key[:1].isupper():
            new = data.draw(st.sampled_from(LAYER_NAMES), label="new name")
            parent[new] = parent.pop(key)
        elif op == "add_key" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(KEYS + LAYER_NAMES), label="key")] = data.draw(values, label="value")
        else:
            parent[key] = data.draw(layer_entries, label="layer")
    return d


def mutate_text(data) -> str | None:
    """Byte flips, insertions of YAML syntax, truncations and deletions on a config file's bytes."""
    raw = bytearray(data.draw(st.sampled_from(SEED_TEXTS), label="file"))
    for _ in range(data.draw(st.integers(1, 5), label="edits")):
        if not raw:
            break
        pos = data.draw(st.integers(0, len(raw) - 1), label="offset")
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if op == "flip":
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.sampled_from([
                b"!!python/object/apply:os.system ['touch SENTINEL'] ", b"&a ", b"*a", b"\t", b"{", b"[", b"]",
                b"---\n", b"\x00", b"\xff", b"\x08", b"<<: ", b": ", b"\n- ", b"'", b'"', b"%YAML 1.1\n", b"!",
                b"|", b">", b"? ", b"\r", b"\n  ", b"~", b"1e-3", b"no", b".nan", b"-", b"#", b"@", b"`",
                b"!!binary ", b"&x [*x]", b"\xef\xbb\xbf"]), label="insert")
        else:
            del raw[pos:pos + data.draw(st.integers(1, 40))]
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None  # load_file refuses these before YAML: tested on files below


FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
LONG = settings(max_examples=4000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def draw_config(data) -> dict:
    """A mutated config: one of the seeds, mutated (drawn through hypothesis)."""
    return mutate(data, data.draw(st.integers(0, len(SEEDS) - 1), label="seed"))


@FAST
@given(st.data())
def test_fuzz_mutated_config_dicts(data):
    """A mutated config builds a plan, or is refused with one-line problems; never another exception."""
    outcome, problems = config_outcome(yamlio.Document(draw_config(data), "c.yaml"))
    assert outcome == "ok" or problems, "refused with no problem"
    assert not_one_line(problems) == [], problems
    STATS[f"fuzz_dict_{outcome}"] += 1


@FAST
@given(st.data())
def test_fuzz_mutated_yaml_text(data):
    """Damaged YAML text loads and builds a plan, or is refused with one-line problems; no payload runs."""
    text = mutate_text(data)
    if text is None:
        STATS["fuzz_text_not_utf8"] += 1
        return
    cwd = os.getcwd()
    outcome, problems = text_outcome(text)
    assert outcome == "ok" or problems, "refused with no problem"
    assert not_one_line(problems) == [], problems
    assert not os.path.exists(os.path.join(cwd, SENTINEL))
    STATS[f"fuzz_text_{outcome}"] += 1


@pytest.mark.slow
@LONG
@given(st.data())
def test_fuzz_mutated_config_dicts_long(data):
    outcome, problems = config_outcome(yamlio.Document(draw_config(data), "c.yaml"))
    assert outcome == "ok" or problems, "refused with no problem"
    assert not_one_line(problems) == [], problems
    STATS[f"fuzz_dict_long_{outcome}"] += 1


@pytest.mark.slow
@LONG
@given(st.data())
def test_fuzz_mutated_yaml_text_long(data):
    text = mutate_text(data)
    if text is None:
        STATS["fuzz_text_long_not_utf8"] += 1
        return
    cwd = os.getcwd()
    outcome, problems = text_outcome(text)
    assert outcome == "ok" or problems, "refused with no problem"
    assert not_one_line(problems) == [], problems
    assert not os.path.exists(os.path.join(cwd, SENTINEL))
    STATS[f"fuzz_text_long_{outcome}"] += 1


def test_fuzz_overrides_never_crash():
    """--set with random keys and values: applied or refused, never an exception."""
    rng = random.Random(7)
    keys = ["train.epochs", "model.layers[0]", "model.layers[99].Linear.out_features", "a..b", "[3]", ".x",
            "model.layers.0.Conv2d", "name.x", "data", "train.optimizer.Adam.lr", "model.input_shape[1]", "",
            "model.layers[1].Linear", "x[999999999999]", "model.blocks.B", "train.optimizer"]
    raws = ["1", "-1", "", "[", "{a: 1}", "!!python/name:os.system", "&a [*a]", "1e-3", "no", "\x08", ".nan",
            "ReLU", "[1, 2", "a: 1\na: 2", "---\n---", "10000000000000"]
    for _ in range(300):
        doc = yamlio.Document(copy.deepcopy(rng.choice(SEEDS)), "c.yaml")
        items = [f"{rng.choice(keys)}={rng.choice(raws)}" for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.1:
            items.append(rng.choice(keys))  # no '='
        try:
            C.apply_overrides(doc, items)
        except ConfigError as exc:
            assert all("\n" not in p.format() for p in exc.problems)
            STATS["fuzz_overrides_refused"] += 1
            continue
        outcome, problems = config_outcome(doc)
        assert outcome == "ok" or problems, (items, "refused with no problem")
        assert not_one_line(problems) == [], (items, problems)
        STATS[f"fuzz_overrides_{outcome}"] += 1


def test_fuzz_sample_through_the_cli(cli, tmp_path, monkeypatch):
    """A sample of mutated configs through `nnctl check`: exit 0 or 2, never a traceback."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(11)
    import yaml

    for i in range(25):
        d = copy.deepcopy(rng.choice(SEEDS))
        places = list(_places(d))
        for _ in range(rng.randint(1, 3)):
            places = list(_places(d))
            path = rng.choice(places)
            parent, key = _at(d, path[:-1]), path[-1]
            parent[key] = rng.choice([None, -1, 10**12, "os.system", "no", [1, [2]], {"ReLU": None}, "12:30",
                                      {"Linear": {"out_features": 3}}, math.nan, "Conv2D"])
        p = tmp_path / f"m{i}.yaml"
        text = yaml.safe_dump(d, sort_keys=False)
        if i % 3 == 0:  # and some byte-level damage
            b = bytearray(text.encode())
            b[rng.randrange(len(b))] = rng.choice(b"[]{}:&*!\t\x08'\"")
            p.write_bytes(bytes(b))
        else:
            p.write_text(text)
        code, out, err = cli("check", str(p))
        assert code in (0, 2), (code, out, err)
        assert "Traceback" not in out + err and "internal error" not in err, err
        if code == 2:
            assert all(line.startswith(str(p)) for line in err.strip().splitlines()), err
        STATS[f"fuzz_cli_exit_{code}"] += 1
    assert not (tmp_path / SENTINEL).exists()

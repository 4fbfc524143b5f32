"""Reliability and security, hostile checkpoints and weight files: pickle payloads, corrupted
and truncated checkpoints, odd files, malformed .safetensors, weights of another model.

The long loops are marked `slow` (python -m pytest -m slow -q tests/test_reliability_checkpoints.py).
Set NNCTL_RELIABILITY_REPORT=path.json to add this module's counts to that file.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch

from nnctl.runs import checkpoint as K
from nnctl.config import loader as C
from nnctl.model import weights as F
from nnctl.model import plan as M
from nnctl.errors import CheckpointError

from .conftest import SENTINEL, add_to_reliability_report, make, write

# figures for docs/reliability.md: counted as the tests run, written at the module's end
STATS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    add_to_reliability_report(STATS)


@pytest.fixture
def real_run(digits_run):
    """A real nnctl run (1 epoch, a scheduler, in-process): its folder with last.pt and best.pt. The
    session's shared run (tests/conftest.py digits_run): read it, or copy it before writing."""
    return digits_run


class _Payload:
    """Unpickling this runs code: it creates the sentinel file."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


def _hostile_files(tmp_path: Path) -> dict[str, Path]:
    import pickle

    sentinel = str(tmp_path / SENTINEL)
    good = {"w": torch.ones(3)}
    files = {}
    # a zip-format torch file, with the payload beside real tensors, in an nnctl-looking checkpoint
    files["nnctl_ckpt.pt"] = {"format": K.FORMAT, "format_version": 1, "config": make(),
                              "model": good, "extra": _Payload(sentinel)}
    files["state_dict.pt"] = {"w": torch.ones(3), "b": _Payload(sentinel)}
    files["nested.pth"] = {"state_dict": {"w": torch.ones(3)}, "meta": [1, {"x": _Payload(sentinel)}]}
    files["bare_object.pt"] = _Payload(sentinel)
    out = {}
    for name, obj in files.items():
        p = tmp_path / name
        torch.save(obj, p)
        out[name] = p
    # the legacy (non-zip) torch format and a raw pickle stream
    p = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3), "x": _Payload(sentinel)}, p, _use_new_zipfile_serialization=False)
    out["legacy.pt"] = p
    p = tmp_path / "raw_pickle.pt"
    p.write_bytes(pickle.dumps({"w": _Payload(sentinel)}, protocol=2))
    out["raw_pickle.pt"] = p
    p = tmp_path / "raw_pickle5.pth"
    p.write_bytes(pickle.dumps(_Payload(sentinel), protocol=5))
    out["raw_pickle5.pth"] = p
    return out


def test_pickle_payloads_refused_never_run(tmp_path):
    files = _hostile_files(tmp_path)
    sentinel = tmp_path / SENTINEL
    for name, p in files.items():
        with pytest.raises(CheckpointError) as info:
            K.load(p)
        assert "refused" in str(info.value) or "not a readable" in str(info.value), (name, str(info.value))
        with pytest.raises(CheckpointError):
            F.read_weights(str(p))
        assert not sentinel.exists(), name
        STATS["hostile_pickles_refused"] += 2
    # the control: plain torch.load(weights_only=False) WOULD run it, so the payload is real
    torch.load(files["state_dict.pt"], weights_only=False)
    assert sentinel.read_text() == "pwned"


def test_pickle_payloads_refused_by_the_cli(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = _hostile_files(tmp_path)
    cfg = write(tmp_path, make())
    for name, p in files.items():
        before = sorted(os.listdir(tmp_path))
        code, out, err = cli("train", "--resume", str(p))
        assert code == 2 and "Traceback" not in err, (name, err)
        code, out, err = cli("train", str(cfg), "--init", str(p), "--out", str(tmp_path / "run"))
        assert code == 2 and "Traceback" not in err, (name, err)
        assert sorted(os.listdir(tmp_path)) == before, name  # no run folder, nothing written
        STATS["hostile_pickles_refused_cli"] += 2
    for cmd in (["summary", str(files["nnctl_ckpt.pt"])], ["eval", str(files["nnctl_ckpt.pt"])],
                ["export-weights", str(files["nnctl_ckpt.pt"])], ["freeze", str(files["state_dict.pt"])]):
        code, out, err = cli(*cmd)
        assert code == 2 and "refused" in err, (cmd, err)
    assert not (tmp_path / SENTINEL).exists()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def corrupt_and_load(original: bytes, reference: dict, path: Path, rng: random.Random) -> str:
    """One random truncation or 1-3 bit flips: 'caught', 'harmless' (loaded equal to the original) or 'SILENT'."""
    b = bytearray(original)
    kind = "truncate" if rng.random() < 0.3 else "flip"
    if kind == "truncate":
        b = b[:rng.randrange(len(b))]
    else:
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(b))
    try:
        state = K.load(path)
    except CheckpointError:
        return f"{kind}_caught"
    # a loaded file must be exactly the original: a flip in zip metadata that carries no data
    # (alignment padding, timestamps) is harmless; anything else would be a silent corruption
    return f"{kind}_harmless" if kind == "flip" and _same(reference, state) else f"{kind}_SILENT"


def _corruption_loop(run: Path, tmp_path: Path, n: int, seed: int, key: str) -> Counter:
    counts: Counter = Counter()
    for which in ("last.pt", "best.pt"):
        original = (run / which).read_bytes()
        reference = K.load(run / which)
        rng = random.Random(seed)
        for _ in range(n // 2):
            counts[corrupt_and_load(original, reference, tmp_path / "c.pt", rng)] += 1
    for k, v in counts.items():
        STATS[f"{key}_{k}"] += v
    STATS[f"{key}_tried"] += sum(counts.values())
    return counts


def test_corrupted_checkpoints_are_reported(real_run, tmp_path):
    counts = _corruption_loop(real_run, tmp_path, 300, 1, "ckpt_corrupt")
    assert not any("SILENT" in k for k in counts), counts
    assert counts["truncate_caught"] > 0 and "truncate_harmless" not in counts
    assert counts["flip_caught"] >= 0.8 * (counts["flip_caught"] + counts["flip_harmless"]), counts


@pytest.mark.slow
def test_corrupted_checkpoints_are_reported_long(real_run, tmp_path):
    counts = _corruption_loop(real_run, tmp_path, 4000, 2, "ckpt_corrupt_long")
    assert not any("SILENT" in k for k in counts), counts


@pytest.mark.slow
def test_every_single_byte_flip_of_a_checkpoint(real_run, tmp_path):
    """Every byte of a real checkpoint, flipped: reported, or loaded equal to the original."""
    original = (real_run / "last.pt").read_bytes()
    reference = K.load(real_run / "last.pt")
    counts: Counter = Counter()
    p = tmp_path / "c.pt"
    for pos in range(len(original)):
        b = bytearray(original)
        b[pos] ^= 0xFF
        p.write_bytes(bytes(b))
        try:
            state = K.load(p)
        except CheckpointError:
            counts["caught"] += 1
            continue
        counts["harmless" if _same(reference, state) else "SILENT"] += 1
    STATS["ckpt_every_byte_tried"] += len(original)
    for k, v in counts.items():
        STATS[f"ckpt_every_byte_{k}"] += v
    assert counts["SILENT"] == 0, counts


def test_central_directory_folder_flag_is_caught(real_run, tmp_path):
    """Regression: one bit in a zip record's external attributes (the MS-DOS folder flag) passes
    zipfile's CRC checks but makes torch.load return other bytes; the state digest catches it."""
    import zipfile

    original = (real_run / "last.pt").read_bytes()
    end = original.rindex(b"PK\x05\x06")
    (cd_offset,) = struct.unpack("<I", original[end + 16:end + 20])
    hits = 0
    pos = cd_offset
    while original[pos:pos + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", original[pos + 28:pos + 34])
        name = original[pos + 46:pos + 46 + name_len].decode()
        b = bytearray(original)
        b[pos + 38] |= 0x10  # external attributes: "a folder"
        (tmp_path / "c.pt").write_bytes(bytes(b))
        with zipfile.ZipFile(tmp_path / "c.pt") as zf:
            assert zf.testzip() is None  # the zip checks alone do not see it
        try:
            state = K.load(tmp_path / "c.pt")
            assert _same(K.load(real_run / "last.pt"), state), name
        except CheckpointError:
            hits += 1
        pos += 46 + name_len + extra_len + comment_len
    assert hits > 0
    STATS["ckpt_folder_flag_tried"] += 1


def test_corrupt_resume_exits_2_and_writes_nothing(real_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    original = (run / "last.pt").read_bytes()
    rng = random.Random(3)
    for i in range(4):
        b = bytearray(original)
        if i % 2:
            b = b[: rng.randrange(len(b))]
        else:
            b[rng.randrange(len(b) // 2, len(b))] ^= 0x55
        (run / "last.pt").write_bytes(bytes(b))
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        for args in (["train", "--resume", str(run)], ["train", "--resume", str(run / "last.pt")]):
            code, out, err = cli(*args)
            assert code == 2 and "corrupt" in err and "Traceback" not in err, err
            assert "epoch" not in out  # never taken as a fresh start
            assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
            STATS["ckpt_corrupt_resume_cli"] += 1
    # a missing --resume or --init path is an error, not a new run
    cfg = write(tmp_path, make(), "c.yaml")
    for args in (["train", "--resume", str(tmp_path / "nowhere")],
                 ["train", "--resume", str(tmp_path / "nowhere.pt")],
                 ["train", str(cfg), "--resume", str(tmp_path / "nowhere")],
                 ["train", str(cfg), "--init", str(tmp_path / "nowhere.pt"), "--out", str(tmp_path / "new")]):
        code, out, err = cli(*args)
        assert code == 2 and "no such" in err, (args, err)
        assert not (tmp_path / "new").exists() and not (tmp_path / "runs").exists()
        STATS["ckpt_missing_path_cli"] += 1


def test_odd_files_as_checkpoints(tmp_path):
    import zipfile

    cases = {
        "empty.pt": b"",
        "text.pt": b"hello, not a checkpoint\n",
        "zeros.pt": bytes(4096),
        "zip_of_other.pt": None,
        "pk_prefix.pt": b"PK\x03\x04" + os.urandom(200),
        "random.pt": random.Random(5).randbytes(5000),
    }
    for name, raw in cases.items():
        p = tmp_path / name
        if raw is None:
            with zipfile.ZipFile(p, "w") as zf:
                zf.writestr("readme.txt", "a zip, not a torch file")
        else:
            p.write_bytes(raw)
        with pytest.raises(CheckpointError):
            K.load(p)
        with pytest.raises(CheckpointError):
            F.read_weights(str(p))
    with pytest.raises(CheckpointError, match="folder"):
        K.read_state(tmp_path)
    # a plain torch file that is not an nnctl checkpoint, or that lies about its version
    torch.save({"w": torch.ones(2)}, tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="not an nnctl checkpoint"):
        K.load(tmp_path / "sd.pt")
    torch.save({"format": K.FORMAT, "format_version": 99, "config": {}, "model": {}}, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="newer"):
        K.load(tmp_path / "v99.pt")
    torch.save({"format": K.FORMAT, "format_version": 1, "config": [], "model": {}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="'config'"):
        K.load(tmp_path / "bad.pt")
    STATS["ckpt_odd_files"] += len(cases) * 2 + 4


def _safetensors_cases(tmp_path: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"1.weight": torch.zeros(10, 64), "1.bias": torch.zeros(10)}, str(good))
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]

    def with_header(h, pad_body=body) -> bytes:
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + pad_body

    bad_offsets = copy.deepcopy(header)
    bad_offsets["1.weight"]["data_offsets"] = [0, 10**15]
    overlap = copy.deepcopy(header)
    overlap["1.bias"]["data_offsets"] = [0, 40]  # inside 1.weight's bytes
    overlap["1.weight"]["data_offsets"] = [0, 2560]
    wrong_size = copy.deepcopy(header)
    wrong_size["1.weight"]["shape"] = [10**6, 10**6]
    bad_dtype = copy.deepcopy(header)
    bad_dtype["1.weight"]["dtype"] = "PYOBJ"
    negative = copy.deepcopy(header)
    negative["1.bias"]["shape"] = [-1]
    cases = {
        "huge_header_len": struct.pack("<Q", 2**62) + raw[8:],
        "header_len_past_end": struct.pack("<Q", len(raw)) + raw[8:],
        "header_len_8gib": struct.pack("<Q", 8 << 30) + b"{}",
        "invalid_json": struct.pack("<Q", 12) + b"{not json!!}" + body,
        "json_not_object": with_header([1, 2, 3]),
        "offsets_out_of_range": with_header(bad_offsets),
        "offsets_overlap": with_header(overlap),
        "shape_does_not_match_bytes": with_header(wrong_size),
        "unknown_dtype": with_header(bad_dtype),
        "negative_shape": with_header(negative),
        "truncated_body": raw[: len(raw) - 100],
        "truncated_header": raw[:20],
        "only_length": raw[:8],
        "empty": b"",
    }
    out = {}
    for name, b in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(b)
        out[name] = p
    return out


def test_malformed_safetensors_are_reported(tmp_path):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, p in _safetensors_cases(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            F.read_weights(str(p))
        assert "not a readable .safetensors" in str(info.value), name
        STATS["safetensors_malformed_caught"] += 1
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 256 * 1024, f"reading bad headers grew the peak RSS by {grown} KiB"


def test_malformed_safetensors_via_cli_init(tmp_path, cli):
    cases = _safetensors_cases(tmp_path)
    cfg = write(tmp_path, make())
    for name in ("huge_header_len", "invalid_json", "offsets_out_of_range"):
        code, out, err = cli("train", str(cfg), "--init", str(cases[name]), "--out", str(tmp_path / "r"))
        assert code == 2 and "safetensors" in err and "Traceback" not in err, (name, err)
        assert not (tmp_path / "r").exists()


def test_checkpoint_of_another_model_lists_every_key(real_run, tmp_path, cli):
    other = make(model={"input_shape": [1, 8, 8], "layers": [
        "Flatten", {"Linear": {"out_features": 5}}, "ReLU", {"Linear": {"out_features": 10}}]})
    cfg, doc = C.from_dict(other)
    model, plan = M.build(cfg, doc)
    state = K.load(real_run / "last.pt")["model"]  # 1.weight [10, 64], 1.bias [10]
    with pytest.raises(CheckpointError) as info:
        F.load_weights(model, plan, state, "last.pt")
    text = str(info.value)
    assert "2 missing: 3.weight" in text and "3.bias" in text  # the second Linear's keys
    assert "wrong shape: 1.weight [10, 64] in the file, [5, 64] in the model" in text
    assert "model.layers[1] (Linear" in text  # each key named with its config layer
    state = dict(state, **{"9.weight": torch.ones(1)})
    with pytest.raises(CheckpointError, match="1 unexpected: 9.weight"):
        F.load_weights(model, plan, state, "x")
    # through the CLI: --init of another model is refused without --partial, nothing written
    p = write(tmp_path, other)
    code, out, err = cli("train", str(p), "--init", str(real_run / "last.pt"), "--out", str(tmp_path / "r"))
    assert code == 2 and "does not fit this model" in err and "--partial" in err, err
    assert not (tmp_path / "r").exists()
    # and a resume with another model's config is refused (the configs differ)
    run = tmp_path / "copy"
    shutil.copytree(real_run, run)
    code, out, err = cli("train", str(p), "--resume", str(run))
    assert code == 2 and "differs from the checkpoint" in err, err
    STATS["ckpt_other_model_refused"] += 4

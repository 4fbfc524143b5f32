"""Issue points 6, 9 (data side) and 10, and the clear data errors: symbolic links, FIFOs and other
non-regular files in image_folder, tensors files and --init weights; non-finite values in tensors
files; targets checked against the model's output; corrupt images read by DataLoader workers;
decompression bombs; stop signals while reading data. Real files, FIFOs and processes."""

from __future__ import annotations

import copy
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from nnctl.config import loader as C
from nnctl.data import loading as D
from nnctl.model import weights as F
from nnctl.model import plan as M
from nnctl.training import signals as T
from nnctl.errors import CheckpointError, NnctlError, UsageError

from .conftest import make, run_cli, write

CPU = torch.device("cpu")


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) if the test blocks for 30 s, e.g. opening a FIFO."""
    def on_alarm(signum, frame):
        raise TimeoutError("blocked for 30 s (a FIFO opened for reading?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def cfg_of(data: dict, input_shape=(3, 6, 5), train: dict | None = None, layers=None):
    d = {"name": "t", "seed": 0,
         "model": {"input_shape": list(input_shape), "layers": layers or ["Flatten", {"Linear": {"out_features": 2}}]},
         "data": {"num_workers": 0, **data}, "train": {"loss": "cross_entropy", **(train or {})}}
    return C.from_dict(copy.deepcopy(d))


def write_images(root: Path, classes=("cat", "dog"), n=3, size=(6, 5)):
    from PIL import Image

    rng = np.random.default_rng(3)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


# --- point 6: image_folder never follows a link into a folder already read, never opens a FIFO ----

def test_image_folder_links_to_ancestors_fifos_and_devices_are_skipped(tmp_path, deadline):
    root = tmp_path / "pets"
    write_images(root)
    os.symlink("..", root / "cat" / "up")            # a link to the class folder's parent: the root
    os.symlink("../..", root / "dog" / "upup")       # a second link, further up (hung forever before)
    os.symlink(".", root / "dog" / "self")           # a link to its own folder
    os.symlink(str(root), root / "root-again")       # a class folder that is the root itself
    os.mkfifo(root / "cat" / "x.png")                # a FIFO with an image name (hung forever before)
    os.symlink("/dev/zero", root / "dog" / "zero.png")  # a device behind a link
    (root / "cat" / "real").mkdir()
    os.symlink(str(root / "dog" / "0.png"), root / "cat" / "real" / "copy.png")  # the same file again
    cfg, _ = cfg_of({"source": "image_folder", "root": str(root), "normalize": False, "val_fraction": 0.5,
                     "preload": False})
    b = D.load_data(cfg, CPU)
    assert b.num_classes == 2
    store = b.train.store
    assert len(store) == 6  # the six real images, once each
    assert len({os.path.realpath(p) for p in store.files}) == 6
    train_files = {store.files[i] for i in b.train.indices.tolist()}
    val_files = {store.files[i] for i in b.val.indices.tolist()}
    assert not train_files & val_files
    text = "\n".join(b.notes)
    for name in ("up", "upup", "self", "root-again", "x.png", "zero.png", "copy.png"):
        assert name in text, (name, text)
    assert "FIFO" in text and "character device" in text and "already read" in text
    assert all("\n" not in n for n in b.notes)
    # the order and labels are ImageFolder's
    assert [os.path.basename(p) for p in store.files] == ["0.png", "1.png", "2.png"] * 2
    assert store.y.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_folder_link_to_another_real_folder_is_followed_once(tmp_path):
    root = tmp_path / "pets"
    write_images(root)
    extra = tmp_path / "more_cats"
    write_images(extra, classes=("x",), n=2)
    os.symlink(str(extra / "x"), root / "cat" / "more")   # a genuine link to images outside the root
    os.symlink(str(extra / "x"), root / "dog" / "more")   # and a second link to the same folder
    cfg, _ = cfg_of({"source": "image_folder", "root": str(root), "normalize": False, "val_fraction": 0.0})
    b = D.load_data(cfg, CPU)
    assert len(b.train.store) == 8 and b.train.store.y.tolist().count(0) == 5
    assert any("dog/more" in n and "already read" in n for n in b.notes)


def test_image_folder_fifo_through_the_cli_prints_a_note(tmp_path):
    root = tmp_path / "pets"
    write_images(root)
    os.mkfifo(root / "dog" / "x.png")
    d = make(model={"input_shape": [3, 6, 5], "layers": ["Flatten", {"Linear": {"out_features": 2}}]},
             data={"source": "image_folder", "root": str(root), "val_fraction": 0.0})
    p = write(tmp_path, d)
    r = run_cli("train", str(p), "--out", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "x.png: skipped: a FIFO" in r.stdout + r.stderr


def _in_a_process(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run Python code in a child process: a read that blocks forever (a FIFO opened in native code,
    where no signal handler runs) fails the test instead of hanging the suite."""
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=str(Path(__file__).resolve().parent.parent))
    except subprocess.TimeoutExpired:
        pytest.fail(f"blocked for {timeout} s (a FIFO opened for reading?)")


def test_tensors_file_that_is_a_fifo_is_refused(tmp_path):
    fifo = tmp_path / "d.npz"
    os.mkfifo(fifo)
    r = _in_a_process(f"""
from nnctl.config import loader as C
from nnctl.data import loading as D
from nnctl.errors import UsageError
cfg, _ = C.from_dict({{"name": "t", "model": {{"input_shape": [4], "layers": [{{"Linear": {{"out_features": 2}}}}]}},
                     "data": {{"source": "tensors", "path": {str(fifo)!r}}}, "train": {{"loss": "cross_entropy"}}}})
try:
    D.load_data(cfg, "cpu")
except UsageError as exc:
    print("REFUSED", exc)
""")
    assert "REFUSED" in r.stdout and "FIFO" in r.stdout and str(fifo) in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_init_weights_that_are_a_fifo_are_refused(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    r = _in_a_process(f"""
from nnctl.model import weights as F
from nnctl.errors import CheckpointError
try:
    F.read_weights({str(fifo)!r})
except CheckpointError as exc:
    print("REFUSED", exc)
""")
    assert "REFUSED" in r.stdout and "FIFO" in r.stdout, r.stdout + r.stderr


def test_init_safetensors_read_through_open_input(tmp_path):
    from safetensors.torch import save_file

    save_file({"1.weight": torch.ones(2, 3)}, str(tmp_path / "w.safetensors"))
    state, plan, kind = F.read_weights(str(tmp_path / "w.safetensors"))
    assert kind == "safetensors" and torch.equal(state["1.weight"], torch.ones(2, 3))
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        F.read_weights(str(tmp_path / "bad.safetensors"))


# --- point 9: non-finite values in a tensors file ---------------------------------------------

@pytest.mark.parametrize("ext", [".npz", ".pt", ".safetensors"])
def test_tensors_with_nan_or_inf_are_refused_at_load(tmp_path, ext):
    x = np.random.default_rng(0).normal(size=(20, 4)).astype("float32")
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    x[7, 2] = -np.inf
    y = np.zeros(20, dtype="int64")
    path = tmp_path / f"d{ext}"
    if ext == ".npz":
        np.savez(path, x=x, y=y)
    elif ext == ".pt":
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, path)
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, str(path))
    cfg, _ = cfg_of({"source": "tensors", "path": str(path)}, input_shape=(4,))
    with pytest.raises(UsageError) as info:
        D.load_data(cfg, CPU)
    assert str(path) in str(info.value) and "3 non-finite values" in str(info.value) and "sample 3" in str(info.value)


def test_float_targets_with_nan_are_refused(tmp_path):
    x = np.zeros((10, 2), dtype="float32")
    y = np.zeros((10, 1), dtype="float32")
    y[4] = np.nan
    np.savez(tmp_path / "r.npz", x=x, y=y)
    cfg, _ = cfg_of({"source": "tensors", "path": str(tmp_path / "r.npz")}, input_shape=(2,), train={"loss": "mse"})
    with pytest.raises(UsageError, match=r"r\.npz: y holds 1 non-finite"):
        D.load_data(cfg, CPU)


def test_float64_beyond_float32_range_is_refused(tmp_path):
    x = np.ones((10, 2), dtype="float64")
    x[2, 0] = 1e300  # finite in float64, infinite once converted to float32
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(10, dtype="int64"))
    cfg, _ = cfg_of({"source": "tensors", "path": str(tmp_path / "d.npz")}, input_shape=(2,))
    with pytest.raises(UsageError, match="1 non-finite values"):
        D.load_data(cfg, CPU)


# --- point 10: targets against the model's output ----------------------------------------------

def _labels_file(tmp_path: Path, top: int = 4) -> Path:
    x = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")
    y = np.arange(40) % (top + 1)
    np.savez(tmp_path / "labels.npz", x=x, y=y.astype("int64"))
    return tmp_path / "labels.npz"


def _targets(tmp_path: Path, d: dict):
    cfg, doc = C.load(str(write(tmp_path, d)))  # from a file: problems carry YAML lines
    plan = M.plan(cfg, doc)
    return D.check_targets(cfg, doc, plan, D.load_data(cfg, CPU))


def test_check_targets_labels_beyond_the_output_width(tmp_path):
    path = _labels_file(tmp_path)  # labels 0..4
    d = make(model={"input_shape": [4], "layers": [{"Linear": {"out_features": 16}}, "ReLU",
                                                   {"Linear": {"out_features": 3}}, {"LogSoftmax": {"dim": 1}}]},
             data={"source": "tensors", "path": str(path)}, train={"loss": "nll"})
    problems = _targets(tmp_path, d)
    assert len(problems) == 1
    text = problems[0].format()
    assert "model.layers[2]" in text and "Linear" in text and "3 class scores" in text
    assert "0..4 (5 classes)" in text and str(path) in text and "out_features: 5" in text
    assert problems[0].line is not None
    d["model"]["layers"][2] = {"Linear": {"out_features": 5}}
    assert _targets(tmp_path, d) == []


def test_check_targets_output_not_one_score_per_class():
    d = make(model={"input_shape": [1, 8, 8], "layers": [{"Conv2d": {"out_channels": 10, "kernel_size": 3}}]})
    cfg, doc = C.from_dict(d)
    problems = D.check_targets(cfg, doc, M.plan(cfg, doc), D.load_data(cfg, CPU))
    assert len(problems) == 1 and "[10, 6, 6]" in problems[0].message and "shape [10]" in problems[0].message


def test_check_targets_regression_shape_differs(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 4)).astype("float32")
    np.savez(tmp_path / "r.npz", x=x, y=np.zeros((30, 2), dtype="float32"))
    d = make(model={"input_shape": [4], "layers": [{"Linear": {"out_features": 1}}]},
             data={"source": "tensors", "path": str(tmp_path / "r.npz")}, train={"loss": "mse"})
    problems = _targets(tmp_path, d)
    assert len(problems) == 1
    assert "[1]" in problems[0].message and "[2]" in problems[0].message and "broadcast" in problems[0].message
    d["model"]["layers"][0] = {"Linear": {"out_features": 2}}
    assert _targets(tmp_path, d) == []
    # target: input needs an output of the input's shape
    d = make(model={"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 64}}]},
             data={"source": "digits", "target": "input"}, train={"loss": "l1"})
    problems = _targets(tmp_path, d)
    assert len(problems) == 1 and "[64]" in problems[0].message and "[1, 8, 8]" in problems[0].message


# CLI call site: nnctl/run.py (another engineer's file) calls D.check_targets after load_data and
# before anything is written, and raises ConfigError -> exit 2. This test checks that wiring.
def test_cli_train_refuses_labels_beyond_the_output_width(tmp_path):
    path = _labels_file(tmp_path)
    d = make(model={"input_shape": [4], "layers": [{"Linear": {"out_features": 3}}]},
             data={"source": "tensors", "path": str(path)})
    p = write(tmp_path, d)
    r = run_cli("train", str(p), "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "internal error" not in r.stderr and "3 class scores" in r.stderr and "model.layers[0]" in r.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


# --- clear errors -----------------------------------------------------------------------------

def test_corrupt_image_read_by_a_worker_is_one_line_naming_the_file(tmp_path):
    root = tmp_path / "pets"
    write_images(root, n=4)
    bad = root / "dog" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG: its header is intact, its pixels are not
    d = make(model={"input_shape": [3, 6, 5], "layers": ["Flatten", {"Linear": {"out_features": 2}}]},
             data={"source": "image_folder", "root": str(root), "preload": False, "num_workers": 2,
                   "normalize": False, "val_fraction": 0.0})
    p = write(tmp_path, d)
    r = run_cli("train", str(p), "--out", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 500, r.stderr
    assert str(bad) in lines[0] and "cannot read image" in lines[0] and "internal error" not in lines[0]


def test_corrupt_image_in_process_both_paths(tmp_path):
    root = tmp_path / "pets"
    write_images(root)
    bad = root / "cat" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    for preload in (True, False):
        cfg, _ = cfg_of({"source": "image_folder", "root": str(root), "preload": preload, "normalize": False,
                         "image_size": [6, 5]})
        with pytest.raises(UsageError, match=r"cannot read image .*1\.png"):
            b = D.load_data(cfg, CPU)
            for split in (b.train, b.val):
                for _ in split.epoch(0):
                    pass


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [12_000, 20_000])  # over PIL's warning limit; over its error limit
def test_decompression_bomb_is_refused_naming_the_file(tmp_path, side):
    root = tmp_path / "pets"
    write_images(root)
    bomb = root / "cat" / "bomb.png"
    _png_header_only(bomb, side, side)
    d = make(model={"input_shape": [3, 6, 5], "layers": ["Flatten", {"Linear": {"out_features": 2}}]},
             data={"source": "image_folder", "root": str(root)})
    p = write(tmp_path, d)
    r = run_cli("train", str(p), "--out", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 2, r.stderr
    assert str(bomb) in r.stderr and "decompression bomb" in r.stderr and "internal error" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


class _Stop(NnctlError):
    """What the CLI's SIGTERM handler raises while data is loading (train.Interrupted)."""


@pytest.mark.parametrize("ext", [".npz", ".pt"])
def test_sigterm_while_reading_a_tensors_file_is_not_corrupt_data(tmp_path, monkeypatch, ext):
    x, y = np.zeros((10, 2), dtype="float32"), np.zeros(10, dtype="int64")
    path = tmp_path / f"d{ext}"
    if ext == ".npz":
        np.savez(path, x=x, y=y)
    else:
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, path)
    module, name = (np, "load") if ext == ".npz" else (torch, "load")
    real = getattr(module, name)

    def read_and_get_signalled(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered while the file is being parsed
        return real(*a, **k)

    def on_term(signum, frame):  # as the CLI's handler does until the loop takes over
        raise T.Interrupted(signum, None)

    old = signal.signal(signal.SIGTERM, on_term)
    monkeypatch.setattr(module, name, read_and_get_signalled)
    try:
        cfg, _ = cfg_of({"source": "tensors", "path": str(path), "preload": False}, input_shape=(2,))
        with pytest.raises(T.Interrupted) as info:
            D.load_data(cfg, CPU)
        assert info.value.exit_code == 143 and "cannot read" not in str(info.value)
    finally:
        signal.signal(signal.SIGTERM, old)


def test_stop_signal_while_decoding_an_image_is_not_corrupt_data(tmp_path, monkeypatch):
    root = tmp_path / "pets"
    write_images(root)
    cfg, _ = cfg_of({"source": "image_folder", "root": str(root), "preload": False, "normalize": False})
    b = D.load_data(cfg, CPU)
    from PIL import Image

    def interrupted(*a, **k):
        raise _Stop("stopped by SIGTERM; nothing saved")

    monkeypatch.setattr(Image, "open", interrupted)
    with pytest.raises(_Stop):
        for _ in b.train.epoch(0):
            pass

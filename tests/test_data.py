"""Tests of nnctl.data: every source from small real-format files, batching, splits, sharding."""

from __future__ import annotations

import copy
import pickle
import struct

import numpy as np
import pytest
import torch

from nnctl.config.loader import from_dict
from nnctl.data.loading import load_data
from nnctl.data.sources import read_cifar_batch
from nnctl.errors import NnctlError, UsageError

CPU = torch.device("cpu")


def make_cfg(data: dict | None = None, *, input_shape=(1, 8, 8), train: dict | None = None, seed: int = 0):
    d = {
        "name": "t",
        "seed": seed,
        "model": {"input_shape": list(input_shape), "layers": ["Flatten", {"Linear": {"out_features": 10}}]},
        "data": {"source": "digits", "num_workers": 0, **(data or {})},
        "train": {"loss": "cross_entropy", **(train or {})},
    }
    return from_dict(copy.deepcopy(d))[0]


def all_batches(batches, epoch=0, start=0):
    return [(x.clone(), y.clone()) for x, y in batches.epoch(epoch, start)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --- real-format file writers ------------------------------------------------------------

def write_idx(path, arr: np.ndarray):
    """An IDX file: big-endian magic 2051 (images) or 2049 (labels), the dims, then uint8 data."""
    magic = 2051 if arr.ndim == 3 else 2049
    with open(path, "wb") as f:
        f.write(struct.pack(">i", magic))
        f.write(struct.pack(">" + "i" * arr.ndim, *arr.shape))
        f.write(arr.astype(np.uint8).tobytes())


def write_mnist(root, folder="MNIST", n_train=20, n_test=10):
    rng = np.random.default_rng(1)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        out[prefix] = (x, y)
    return out


def write_cifar(root, kind="cifar10", per_file=6):
    rng = np.random.default_rng(2)
    if kind == "cifar10":
        base, names, key, classes = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + [
            "test_batch"], b"labels", 10
    else:
        base, names, key, classes = root / "cifar-100-python", ["train", "test"], b"fine_labels", 100
    base.mkdir(parents=True)
    out = {}
    for name in names:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, per_file)]
        with open(base / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, key: labels}, f, protocol=2)
        out[name] = (data, labels)
    return out


# --- digits ------------------------------------------------------------------------------

def test_digits_shapes_ranges_and_split():
    cfg = make_cfg({"normalize": False})
    b = load_data(cfg, CPU)
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10 and b.task == "classification"
    assert b.preloaded and b.mean is None
    assert b.train.num_samples == 1437 and b.val.num_samples == 360
    assert "1,437 train / 360 val" in b.description
    assert set(b.train.indices.tolist()).isdisjoint(b.val.indices.tolist())
    assert len(set(b.train.indices.tolist()) | set(b.val.indices.tolist())) == 1797
    xs, ys = zip(*all_batches(b.train))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
    assert set(y.tolist()) == set(range(10))
    assert len(b.train) == 23 and [len(v) for v in ys][-1] == 1437 - 22 * 64


def test_digits_val_zero_and_limit():
    b = load_data(make_cfg({"val_fraction": 0.0, "limit": 100}), CPU)
    assert b.val is None and b.train.num_samples == 100 and len(b.train) == 2


def test_determinism_and_epoch_order():
    cfg = make_cfg()
    a, b = load_data(cfg, CPU), load_data(cfg, CPU)
    assert_same(all_batches(a.train, 3), all_batches(b.train, 3))
    e0, e1 = all_batches(a.train, 0), all_batches(a.train, 1)
    assert not torch.equal(e0[0][1], e1[0][1])
    assert sorted(torch.cat([y for _, y in e0]).tolist()) == sorted(torch.cat([y for _, y in e1]).tolist())
    other = load_data(make_cfg(seed=5), CPU)
    assert not torch.equal(all_batches(other.train)[0][0], e0[0][0])
    # validation: in order, the same every epoch
    assert_same(all_batches(a.val, 0), all_batches(a.val, 7))


@pytest.mark.parametrize("preload", [True, False])
def test_start_step_is_exact(preload):
    b = load_data(make_cfg({"preload": preload}), CPU)
    full = all_batches(b.train, 2)
    assert_same(all_batches(b.train, 2, start=5), full[5:])
    assert all_batches(b.train, 2, start=len(b.train)) == []


def test_preload_and_dataloader_agree_digits():
    a = load_data(make_cfg({"preload": True}), CPU)
    b = load_data(make_cfg({"preload": False, "num_workers": 2}), CPU)
    assert a.preloaded and not b.preloaded and "DataLoader" in b.description
    for epoch in (0, 1):  # the second epoch reuses the persistent workers
        assert_same(all_batches(a.train, epoch), all_batches(b.train, epoch))
    assert_same(all_batches(a.train, 1, 3), all_batches(b.train, 1, 3))
    assert_same(all_batches(a.val), all_batches(b.val))
    it = b.train.epoch(4)
    next(it)  # an epoch left unfinished (an interrupted run) does not disturb the next one
    assert_same(all_batches(a.train, 5, 2), all_batches(b.train, 5, 2))


def test_normalisation_on_train_only():
    b = load_data(make_cfg(), CPU)
    x = torch.cat([x for x, _ in b.train.epoch(0)])
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-3
    v = torch.cat([x for x, _ in b.val.epoch(0)])
    assert abs(v.mean().item()) > 1e-6  # val uses the training statistics, not its own
    raw = load_data(make_cfg({"normalize": False}), CPU)
    rx = torch.cat([x for x, _ in raw.train.epoch(0)])
    assert b.mean[0] == pytest.approx(rx.double().mean().item(), abs=1e-6)


def test_normalize_given_values():
    b = load_data(make_cfg({"normalize": {"mean": 0.5, "std": 0.25}}), CPU)
    assert b.mean == [0.5] and b.std == [0.25]
    raw = load_data(make_cfg({"normalize": False}), CPU)
    assert torch.allclose(next(b.train.epoch(0))[0], (next(raw.train.epoch(0))[0] - 0.5) / 0.25)
    with pytest.raises(UsageError, match="normalize.mean has 2 values"):
        load_data(make_cfg({"normalize": {"mean": [0.1, 0.2], "std": 1.0}}), CPU)


def test_shape_mismatch():
    with pytest.raises(UsageError, match=r"data gives samples of shape \[1, 8, 8\] but model.input_shape is "
                                         r"\[1, 28, 28\].*digits"):
        load_data(make_cfg(input_shape=(1, 28, 28)), CPU)


def test_train_reports_a_shape_mismatch_at_the_input_shape_line(tmp_path):
    """nnctl train: the samples' shape against model.input_shape, at that key's line (it had no file:line)."""
    from .conftest import run_cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: g\nmodel:\n  input_shape: [3, 8, 8]\n  layers: [Flatten, {Linear: {out_features: 10}}]\n"
                   "data: {source: digits}\ntrain: {epochs: 1}\n")
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"{cfg}:3:16: model.input_shape: data gives samples of shape [1, 8, 8] but "
                                "model.input_shape is [3, 8, 8] (source: digits); set model.input_shape: [1, 8, 8]")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_loss_does_not_fit_labels():
    with pytest.raises(UsageError, match="class labels but train.loss is mse"):
        load_data(make_cfg(train={"loss": "mse"}), CPU)


def test_target_input_with_noise():
    cfg = make_cfg({"target": "input", "noise": 0.5}, train={"loss": "mse"})
    b = load_data(cfg, CPU)
    assert b.task == "reconstruction" and b.num_classes is None  # nnctl.tasks: data.target input
    e0 = all_batches(b.train, 0)
    x, y = e0[0]
    assert x.shape == y.shape and not torch.equal(x, y)
    assert 0.4 < (x - y).std().item() < 0.6
    assert_same(all_batches(b.train, 0, 4), e0[4:])  # noise is part of the exact resume
    assert_same(all_batches(load_data(cfg, CPU).train, 0), e0)
    e1 = all_batches(b.train, 1)
    assert not torch.equal(e0[0][0] - e0[0][1], e1[0][0] - e1[0][1])
    vx, vy = next(b.val.epoch(0))
    vx2, vy2 = next(b.val.epoch(3))
    assert not torch.equal(vx, vy) and torch.equal(vx, vx2) and torch.equal(vy, vy2)
    plain = load_data(make_cfg({"target": "input"}, train={"loss": "l1"}), CPU)
    px, py = next(plain.train.epoch(0))
    assert torch.equal(px, py)


def test_rank_sharding():
    single = load_data(make_cfg(train={"batch_size": 64}), CPU)
    ranks = [load_data(make_cfg(train={"batch_size": 64}), CPU, rank=r, world_size=2) for r in (0, 1)]
    full = all_batches(single.train, 1)
    parts = [all_batches(r.train, 1) for r in ranks]
    assert len(ranks[0].train) == len(ranks[1].train) == len(full)
    for k, (x, y) in enumerate(full):
        (x0, y0), (x1, y1) = parts[0][k], parts[1][k]
        if k < len(full) - 1:
            assert len(y0) == len(y1) == 32
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert ranks[0].train.num_samples + ranks[1].train.num_samples == 1437
    # validation: disjoint blocks that together are the whole validation set
    v = torch.cat([y for _, y in single.val.epoch(0)])
    assert torch.equal(torch.cat([y for r in ranks for _, y in r.val.epoch(0)]), v)
    # resume inside a sharded epoch
    assert_same(all_batches(ranks[1].train, 1, 10), parts[1][10:])
    with pytest.raises(UsageError, match="multiple of the number of processes"):
        load_data(make_cfg(train={"batch_size": 63}), CPU, rank=0, world_size=2)


# --- mnist / fashion_mnist ------------------------------------------------------------------

@pytest.mark.parametrize("source,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files(tmp_path, source, folder):
    files = write_mnist(tmp_path, folder)
    cfg = make_cfg({"source": source, "root": str(tmp_path), "split": "test", "normalize": False,
                    "preload": False}, input_shape=(1, 28, 28), train={"batch_size": 8})
    b = load_data(cfg, CPU)
    assert b.train.num_samples == 20 and b.val.num_samples == 10 and b.num_classes == 10
    (vx, vy), = all_batches(b.val)
    tx, ty = files["t10k"]
    assert torch.equal(vx, torch.from_numpy(tx).float().unsqueeze(1) / 255)
    assert vy.tolist() == ty.tolist()
    xs, ys = zip(*all_batches(b.train))
    order = b.train.order(0).tolist()
    trx, tr_y = files["train"]
    assert torch.equal(torch.cat(xs), torch.from_numpy(trx[order]).float().unsqueeze(1) / 255)
    assert torch.cat(ys).tolist() == tr_y[order].tolist()


def test_mnist_offline_missing(tmp_path):
    cfg = make_cfg({"source": "mnist", "root": str(tmp_path)}, input_shape=(1, 28, 28))
    with pytest.raises(UsageError) as err:
        load_data(cfg, CPU)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg
    assert "data.download: true" in msg


# --- cifar --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_files(tmp_path, kind):
    files = write_cifar(tmp_path, kind)
    cfg = make_cfg({"source": kind, "root": str(tmp_path), "split": "test", "normalize": False},
                   input_shape=(3, 32, 32))
    b = load_data(cfg, CPU)
    n_train = 30 if kind == "cifar10" else 6
    assert b.train.num_samples == n_train and b.val.num_samples == 6
    assert b.num_classes == (10 if kind == "cifar10" else 100)
    (vx, vy), = all_batches(b.val)
    data, labels = files["test_batch" if kind == "cifar10" else "test"]
    assert torch.equal(vx, torch.from_numpy(data).float().reshape(-1, 3, 32, 32) / 255)
    assert vy.tolist() == labels
    nb = load_data(make_cfg({"source": kind, "root": str(tmp_path)}, input_shape=(3, 32, 32)), CPU)
    assert len(nb.mean) == 3 and len(nb.std) == 3


def test_cifar_offline_missing(tmp_path):
    cfg = make_cfg({"source": "cifar10", "root": str(tmp_path)}, input_shape=(3, 32, 32))
    with pytest.raises(UsageError, match="cifar-10-batches-py.*data.download: true"):
        load_data(cfg, CPU)


class _Hostile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_hostile_pickle_refused(tmp_path):
    write_cifar(tmp_path)
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with open(bad, "wb") as f:
        pickle.dump({b"data": _Hostile(sentinel), b"labels": [0]}, f, protocol=2)
    cfg = make_cfg({"source": "cifar10", "root": str(tmp_path)}, input_shape=(3, 32, 32))
    with pytest.raises(UsageError, match=r"refusing to unpickle (builtins|io)\.open"):
        load_data(cfg, CPU)
    assert not sentinel.exists()
    with open(bad, "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(UsageError, match="data_batch_3"):
        read_cifar_batch(bad, b"labels")


# --- image_folder -----------------------------------------------------------------------

def write_images(root, size=(6, 5), n=3, odd_size=None):
    from PIL import Image

    rng = np.random.default_rng(3)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(n):
            h, w = odd_size if (odd_size and c == 1 and i == 0) else size
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")


@pytest.mark.parametrize("preload", [True, False])
def test_image_folder(tmp_path, preload):
    write_images(tmp_path)
    cfg = make_cfg({"source": "image_folder", "root": str(tmp_path), "normalize": False, "preload": preload,
                    "val_fraction": 0.0}, input_shape=(3, 6, 5))
    b = load_data(cfg, CPU)
    assert b.num_classes == 2 and b.preloaded is preload
    x, y = next(b.train.epoch(0))
    from PIL import Image

    first = b.train.order(0)[0].item()
    path = tmp_path / ("cat" if first < 3 else "dog") / f"{first % 3}.png"
    ref = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.equal(x[0], ref) and y[0].item() == (0 if first < 3 else 1)


def test_image_folder_sizes_and_grayscale(tmp_path):
    write_images(tmp_path, odd_size=(7, 7))
    cfg = make_cfg({"source": "image_folder", "root": str(tmp_path)}, input_shape=(3, 6, 5))
    with pytest.raises(UsageError, match="different sizes.*data.image_size"):
        load_data(cfg, CPU)
    cfg = make_cfg({"source": "image_folder", "root": str(tmp_path), "image_size": [4, 4], "grayscale": True},
                   input_shape=(1, 4, 4))
    b = load_data(cfg, CPU)
    x, _ = next(b.train.epoch(0))
    assert x.shape[1:] == (1, 4, 4) and len(b.mean) == 1


# --- tensors ------------------------------------------------------------------------------

def _xy(n=50, classification=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g) if classification else torch.randn(n, generator=g)
    return x, y


@pytest.mark.parametrize("ext", [".pt", ".npz", ".safetensors"])
def test_tensors_formats(tmp_path, ext):
    x, y = _xy()
    path = tmp_path / f"d{ext}"
    if ext == ".pt":
        torch.save({"x": x, "y": y}, path)
    elif ext == ".npz":
        np.savez(path, x=x.numpy(), y=y.numpy())
    else:
        from safetensors.torch import save_file

        save_file({"x": x, "y": y}, str(path))
    cfg = make_cfg({"source": "tensors", "path": str(path), "val_fraction": 0.0}, input_shape=(4,),
                   train={"batch_size": 50})
    b = load_data(cfg, CPU)
    assert b.task == "classification" and b.num_classes == int(y.max()) + 1 and b.mean is None
    (bx, by), = all_batches(b.train)
    order = b.train.order(0)
    assert torch.equal(bx, x[order]) and torch.equal(by, y[order])


def test_tensors_regression_and_preload_equality(tmp_path):
    x, y = _xy(classification=False)
    path = tmp_path / "r.pt"
    torch.save({"x": x, "y": y}, path)
    base = {"source": "tensors", "path": str(path)}
    a = load_data(make_cfg({**base, "preload": True}, input_shape=(4,), train={"loss": "mse", "batch_size": 8}),
                  CPU)
    b = load_data(make_cfg({**base, "preload": False}, input_shape=(4,), train={"loss": "mse", "batch_size": 8}),
                  CPU)
    assert a.task == "regression" and a.num_classes is None
    xs = all_batches(a.train, 2)
    assert xs[0][1].shape == (8, 1) and xs[0][1].dtype == torch.float32
    assert_same(xs, all_batches(b.train, 2))
    assert_same(all_batches(a.val), all_batches(b.val))
    with pytest.raises(UsageError, match="float targets.*cross_entropy"):
        load_data(make_cfg(base, input_shape=(4,)), CPU)


def test_tensors_bad_files(tmp_path):
    x, y = _xy()
    cases = {
        "noy.pt": lambda p: torch.save({"x": x}, p),
        "short.pt": lambda p: torch.save({"x": x, "y": y[:10]}, p),
        "corrupt.pt": lambda p: p.write_bytes(b"garbage"),
        "corrupt.npz": lambda p: p.write_bytes(b"garbage"),
        "corrupt.safetensors": lambda p: p.write_bytes(b"garbage"),
        "data.csv": lambda p: p.write_text("1,2"),
    }
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(UsageError, match=name.replace(".", r"\.")):
            load_data(make_cfg({"source": "tensors", "path": str(path)}, input_shape=(4,)), CPU)
    with pytest.raises(UsageError, match="does not exist"):
        load_data(make_cfg({"source": "tensors", "path": str(tmp_path / "none.pt")}, input_shape=(4,)), CPU)


# --- synthetic ----------------------------------------------------------------------------

def test_synthetic():
    cfg = make_cfg({"source": "synthetic", "classes": 5, "size": 100}, input_shape=(2, 3))
    b = load_data(cfg, CPU)
    assert b.num_classes == 5 and b.train.num_samples == 80 and b.mean is None
    x, y = next(b.train.epoch(0))
    assert x.shape[1:] == (2, 3) and 0 <= y.min() and y.max() < 5
    assert torch.equal(next(load_data(cfg, CPU).train.epoch(0))[0], x)
    reg = load_data(make_cfg({"source": "synthetic", "size": 64, "shape": [3]}, input_shape=(3,),
                             train={"loss": "l2"}), CPU)
    rx, ry = next(reg.train.epoch(0))
    assert reg.task == "regression" and ry.shape == (len(rx), 1) and ry.dtype == torch.float32
    # y is a linear function of x plus small noise
    sol = torch.linalg.lstsq(rx, ry).solution
    assert (rx @ sol - ry).abs().max() < 0.1


def test_nnctl_error_is_base():
    assert issubclass(UsageError, NnctlError)

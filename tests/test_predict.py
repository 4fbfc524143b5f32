"""After training: the preprocessing record, nnctl predict, eval on other data, exports that carry the record.

The oracle is plain PyTorch (and onnxruntime) applying the record by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nnctl
from nnctl import api

from .conftest import ROOT, run_cli, write

COLOURS = {"blue": (0, 0, 255), "red": (255, 0, 0), "green": (0, 160, 0)}


def png(path: Path, colour, size, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 90, (size[0], size[1], 3)).astype(np.int32)
    arr += np.array(colour, dtype=np.int32) * 2 // 3
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path)


def image_folder(root: Path, per_class: int, size, seed: int) -> Path:
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(per_class):
            png(root / name / f"{i:03d}.png", colour, size, seed * 1000 + c * 100 + i)
    return root


IMAGE_CONFIG = {
    "name": "colours", "seed": 0,
    "model": {"input_shape": [3, 8, 8], "layers": [{"Conv2d": {"out_channels": 4, "kernel_size": 3}}, "ReLU",
                                                   "Flatten", {"Linear": {"out_features": 3}}]},
    "data": {"source": "image_folder", "root": "train_images", "image_size": [8, 8], "val_fraction": 0.25},
    "train": {"epochs": 3, "batch_size": 16, "loss": "cross_entropy", "optimizer": {"Adam": {"lr": 0.01}}},
}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    image_folder(tmp / "train_images", 16, (16, 16), seed=1)  # 16x16 files, resized to 8x8 for training
    cfg = write(tmp, IMAGE_CONFIG)
    result = nnctl.api.train(str(cfg), out=str(tmp / "run"))
    new = tmp / "new"
    for i, (name, colour) in enumerate(COLOURS.items()):  # other sizes than training: the resize applies
        png(new / f"{name}.png", colour, (20 + 3 * i, 13 + i), seed=77 + i)
    return tmp, result.run_dir, new


def by_hand(record: dict, files: list[Path]) -> torch.Tensor:
    """The record applied by hand: PIL decode + bilinear resize, /255, (x - mean) / std."""
    xs = []
    for f in files:
        with Image.open(f) as img:
            img = img.convert(record["color_mode"])
            h, w = record["resize"]
            if (img.height, img.width) != (h, w):
                img = img.resize((w, h), Image.BILINEAR)
            xs.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    raw = torch.stack(xs)
    return raw


def normalise(raw: torch.Tensor, record: dict) -> torch.Tensor:
    mean = torch.tensor(record["mean"]).reshape(1, -1, 1, 1)
    std = torch.tensor(record["std"]).reshape(1, -1, 1, 1)
    return (raw.float() / record["image_scale"] - mean) / std


def test_checkpoint_carries_the_record(image_run):
    _, run, _ = image_run
    record = nnctl.load_record(run)
    assert record.classes == ["blue", "green", "red"]  # image_folder's folder names, sorted
    assert record.color_mode == "RGB" and record.resize == [8, 8] and record.scale == 255.0
    assert record.task == "classification" and record.input_shape == [3, 8, 8]
    assert len(record.mean) == 3 and all(s > 0 for s in record.std)


def test_predict_cli_equals_load_on_preprocessed_tensors(image_run):
    tmp, run, new = image_run
    files = sorted(new.glob("*.png"))
    r = run_cli("predict", str(run), str(new), "--format", "jsonl", "--top-k", "3")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["input"] for row in rows] == [str(f) for f in files]
    model = nnctl.load(run)
    record = model.nnctl_meta["preprocessing"].to_dict()
    with torch.no_grad():
        probs = torch.softmax(model(normalise(by_hand(record, files), record)), dim=1)
    for row, p in zip(rows, probs):
        top = p.topk(3)
        assert row["classes"] == top.indices.tolist()
        assert row["names"] == [record["classes"][i] for i in top.indices.tolist()]
        assert np.allclose(row["probabilities"], top.values.tolist(), atol=1e-6)
    assert [row["names"][0] for row in rows] == ["blue", "green", "red"]  # the colours are learnable


def test_onnx_with_preprocess_takes_raw_pixels(image_run):
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    tmp, run, new = image_run
    files = sorted(new.glob("*.png"))
    r = run_cli("export-weights", str(run), "--format", "onnx", "--with-preprocess", "-o", str(tmp / "m.onnx"))
    assert r.returncode == 0, r.stderr
    props = {p.key: p.value for p in onnx.load(str(tmp / "m.onnx")).metadata_props}
    record = json.loads(props["nnctl.preprocessing"])
    raw = by_hand(record, files).float().numpy()  # 0..255, no scaling, no normalisation
    session = ort.InferenceSession(str(tmp / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.softmax(torch.from_numpy(session.run(None, {"input": raw})[0]), dim=1)
    preds = nnctl.predict(run, files, top_k=3)
    for row, p in zip(preds, got):
        assert row.classes == p.topk(3).indices.tolist()
        assert np.allclose(row.probabilities, p.topk(3).values.tolist(), atol=1e-5)


def test_safetensors_export_alone_reproduces_predictions(image_run):
    """Plain PyTorch, the .safetensors file and its metadata: nothing of nnctl."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch import nn

    tmp, run, new = image_run
    out = tmp / "w.safetensors"
    assert run_cli("export-weights", str(run), "-o", str(out)).returncode == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    record = json.loads(meta["preprocessing"])
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model.load_state_dict(load_file(str(out)))
    files = sorted(new.glob("*.png"))
    with torch.no_grad():
        probs = torch.softmax(model.eval()(normalise(by_hand(record, files), record)), dim=1)
    preds = nnctl.predict(run, files, top_k=1)
    assert [record["classes"][i] for i in probs.argmax(dim=1).tolist()] == [p.names[0] for p in preds]
    assert np.allclose([p.probabilities[0] for p in preds], probs.max(dim=1).values.tolist(), atol=1e-6)


def test_predict_lists_unreadable_inputs_and_predicts_the_rest(image_run, tmp_path):
    _, run, new = image_run
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    torch.save({"x": torch.rand(2, 1, 5, 5)}, tmp_path / "wrong.pt")
    torch.save({"x": torch.rand(2, 3, 8, 8)}, tmp_path / "good.pt")
    r = run_cli("predict", str(run), str(new / "red.png"), str(tmp_path / "pipe.png"), str(tmp_path / "broken.png"),
                str(tmp_path / "wrong.pt"), str(tmp_path / "good.pt"), "--format", "csv")
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0].startswith("input,class1,name1,probability1")
    assert len(lines) == 1 + 6  # red.png, 3 failures, good.pt[0], good.pt[1]
    assert "FIFO" in r.stderr and "not a readable image" in r.stderr and "shape [2, 1, 5, 5]" in r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr


def test_predict_o_never_over_an_input(image_run, cli):
    _, run, new = image_run
    before = (new / "red.png").read_bytes()
    code, _, err = cli("predict", str(run), str(new / "red.png"), "-o", str(new / "red.png"))
    assert code == 2 and "input" in err
    assert (new / "red.png").read_bytes() == before


def test_eval_on_other_data_with_a_confusion_picture(image_run, tmp_path):
    _, run, _ = image_run
    image_folder(tmp_path / "other", 5, (11, 9), seed=5)
    other = write(tmp_path, {"data": {"source": "image_folder", "root": "other", "image_size": [8, 8]}}, "other.yaml")
    r = run_cli("eval", str(run), "--data", str(other), "--confusion", "--confusion-out", str(tmp_path / "cm.png"))
    assert r.returncode == 0, r.stderr
    assert "split all  samples 15" in r.stdout
    for name in COLOURS:
        assert name in r.stdout  # the per-class table names the classes
    with Image.open(tmp_path / "cm.png") as img:
        assert img.width > 300 and img.height > 300
    result = api.evaluate(run, data=str(other), confusion=True, confusion_path=str(tmp_path / "cm2.png"))
    assert sum(map(sum, result.confusion)) == 15
    assert result.metrics["accuracy"] == pytest.approx(sum(result.confusion[i][i] for i in range(3)) / 15)


def test_eval_of_a_config_with_init_weights_trains_nothing(tmp_path):
    d = {"name": "bn", "seed": 0,
         "model": {"input_shape": [1, 8, 8], "layers": [{"Conv2d": {"out_channels": 4, "kernel_size": 3}},
                                                        "BatchNorm2d", "ReLU", "Flatten",
                                                        {"Linear": {"out_features": 10}}]},
         "data": {"source": "digits"}, "train": {"epochs": 1, "loss": "cross_entropy"}}
    cfg = write(tmp_path, d)
    run = nnctl.api.train(str(cfg), out=str(tmp_path / "run")).run_dir
    before = torch.load(run / "best.pt", weights_only=True)["model"]
    from_ckpt = api.evaluate(run)
    from_init = api.evaluate(str(cfg), init=str(run / "best.pt"))
    assert from_init.metrics == pytest.approx(from_ckpt.metrics, abs=1e-6)
    after = torch.load(run / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included


def test_old_checkpoint_without_a_record_still_predicts_with_a_note(image_run, tmp_path):
    from nnctl.runs import checkpoint as K

    _, run, new = image_run
    state = torch.load(run / "best.pt", weights_only=True)
    state.pop("preprocessing")
    for key in K.DIGEST_KEYS:
        state.pop(key)
    K.save(tmp_path / "old.pt", state)
    r = run_cli("predict", str(tmp_path / "old.pt"), str(new / "red.png"))
    assert r.returncode == 0, r.stderr
    assert "no preprocessing record" in r.stderr


def test_api_build_matches_the_trained_architecture_and_check_reports(tmp_path):
    model = nnctl.build(IMAGE_CONFIG)
    assert [type(m).__name__ for m in model] == ["Conv2d", "ReLU", "Flatten", "Linear"]
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 3)
    bad = dict(IMAGE_CONFIG, model={"input_shape": [3, 8, 8], "layers": [{"Linear": {"out_features": 3}},
                                                                        {"Conv2d": {"out_channels": 2}}]})
    problems = nnctl.check(bad)
    assert problems and all(p.line is None or p.line >= 1 for p in problems)


def test_import_nnctl_does_not_import_torch():
    code = "import sys, nnctl; assert 'torch' not in sys.modules; print(callable(nnctl.train))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


def test_readme_api_snippet_runs_after_the_quick_start(tmp_path):
    """The README's Python API block, run as written, after `nnctl train configs/digits_cnn.yaml`."""
    text = (ROOT / "README.md").read_text()
    block = text.split("### The Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    r = run_cli("train", "configs/digits_cnn.yaml", "--epochs", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (tmp_path / "snippet.py").write_text(block)
    r = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Sequential ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']" in r.stdout
    assert "'accuracy'" in r.stdout and "[]" in r.stdout

"""Issue 24, points 1 and 2: an image_folder with validation / test folders of its own (data.val_root,
data.test_root: ImageNet's train/ and val/ layout), and one default for eval on other data (scored whole,
however it is given), with a line that says which samples were scored."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

import nnctl
from nnctl.config.loader import from_dict
from nnctl.data import cache
from nnctl.data.loading import load_data
from nnctl.data.sources.read import read_paths
from nnctl.errors import ConfigError, UsageError
from nnctl.runs import checkpoint as K

from .conftest import run_cli, write

CLASSES = ("ant", "bee", "cat")


def _folder(root: Path, per: int, seed: int, classes=CLASSES) -> Path:
    """``per`` 8x8 RGB PNGs a class; the classes differ in brightness, with noise, so a linear model
    learns them only in part (the scores are not all 1.0)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per):
            pixels = (rng.random((8, 8, 3)) * 160 + c * 45).clip(0, 255).astype("uint8")
            Image.fromarray(pixels, "RGB").save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture
def layout(tmp_path):
    """train/ (20 a class), val/ (5 a class), test/ (4 a class) and a config naming them relatively."""
    _folder(tmp_path / "train", 20, seed=0)
    _folder(tmp_path / "val", 5, seed=1)
    _folder(tmp_path / "test", 4, seed=2)
    return tmp_path


def _config(data: dict, epochs: int = 3) -> dict:
    return {"name": "folders", "model": {"input_shape": [3, 8, 8],
                                         "layers": ["Flatten", {"Linear": {"out_features": 3}}]},
            "data": {"source": "image_folder", **data}, "train": {"epochs": epochs, "batch_size": 16}}


def _by_hand(run: Path, folder: Path, which: str = "last") -> tuple[float, float, int]:
    """(cross-entropy, accuracy, samples) of the run's checkpoint on every image of ``folder``, in plain
    PyTorch: PIL pixels / 255, the recorded mean and std, the Linear's weights from the checkpoint."""
    state = K.load(run / f"{which}.pt")
    pre = state["preprocessing"]
    xs, ys = [], []
    for c, name in enumerate(pre["classes"]):
        for f in sorted((folder / name).glob("*.png")) if (folder / name).is_dir() else []:
            xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255)
            ys.append(c)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    y = torch.tensor(ys)
    linear = nn.Linear(192, 3)
    linear.load_state_dict({"weight": state["model"]["1.weight"], "bias": state["model"]["1.bias"]})
    with torch.no_grad():
        out = linear(x.flatten(1))
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).double().mean().item(), len(y)


def _last_row(run: Path) -> dict:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))[-1]


# --- 1: val_root and test_root ----------------------------------------------------------------

def test_a_train_val_layout_validates_on_its_val_folder(layout, cli):
    """root trains (60 images), val_root validates (15): the run's val metrics are those of the model on
    the val folder computed by hand; eval scores the same and says so."""
    cfg = write(layout, _config({"root": "train", "val_root": "val"}))  # relative to the config file
    code, out, err = cli("train", str(cfg), "-o", str(layout / "run"))
    assert code == 0, err
    assert "image_folder: 60 train / 15 val samples" in out
    run = layout / "run"
    loss, accuracy, n = _by_hand(run, layout / "val")
    row = _last_row(run)
    assert n == 15 and 0 < accuracy < 1
    assert float(row["val_accuracy"]) == pytest.approx(accuracy, abs=1e-6)
    assert float(row["val_loss"]) == pytest.approx(loss, rel=1e-5)
    result = nnctl.evaluate(str(run), which="last")
    assert result.split == "val" and result.samples == 15
    assert result.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert result.metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert result.scored == f"the val split: all 15 samples of data.val_root {layout / 'val'}"
    train = nnctl.evaluate(str(run), which="last", split="train")
    assert train.samples == 60 and train.scored == f"the train split: 60 samples of data.root {layout / 'train'}"
    everything = nnctl.evaluate(str(run), which="last", split="all")
    assert everything.samples == 75  # root and val_root: the run's data
    record = K.load(run / "last.pt")["preprocessing"]["data"]
    assert record["samples"] == 60 and record["val_root"]["samples"] == 15
    assert record["val_root"]["per_class"] == [5, 5, 5]
    # the run's config keeps the folders, without the val_fraction that val_root replaces
    saved = (run / "config.yaml").read_text()
    assert "val_root:" in saved and "val_fraction" not in saved


def test_split_test_validates_on_test_root_and_eval_scores_it(layout):
    run = layout / "run"
    nnctl.train(_config({"root": str(layout / "train"), "val_root": str(layout / "val"),
                         "test_root": str(layout / "test")}), out=str(run))
    loss, accuracy, n = _by_hand(run, layout / "test", which="best")
    result = nnctl.evaluate(str(run), split="test")
    assert (result.samples, n) == (12, 12)
    assert result.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert result.metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert result.scored == f"the test split: all 12 samples of data.test_root {layout / 'test'}"

    tested = layout / "tested"  # split: test trains on root and validates on test_root
    nnctl.train(_config({"root": str(layout / "train"), "test_root": str(layout / "test"), "split": "test"}),
                out=str(tested))
    loss, accuracy, _ = _by_hand(tested, layout / "test")
    row = _last_row(tested)
    assert float(row["val_accuracy"]) == pytest.approx(accuracy, abs=1e-6)
    assert float(row["val_loss"]) == pytest.approx(loss, rel=1e-5)
    assert K.load(tested / "last.pt")["preprocessing"]["data"]["test_root"]["samples"] == 12


def test_split_test_needs_a_test_root():
    problems = nnctl.check("model:\n  input_shape: [3, 8, 8]\n  layers: [Flatten, {Linear: {out_features: 3}}]\n"
                           "data:\n  source: image_folder\n  root: x\n  split: test\n")
    assert [(p.line, p.path) for p in problems] == [(7, "data.split")]
    assert problems[0].message == ("source image_folder has no test split of its own; use split: fraction, "
                                   "or give test_root")


def test_a_class_only_in_the_val_folder_is_refused_naming_it(layout):
    _folder(layout / "val", 2, seed=3, classes=("zebra",))
    text = ("model:\n  input_shape: [3, 8, 8]\n  layers: [Flatten, {Linear: {out_features: 3}}]\n"
            f"data:\n  source: image_folder\n  root: {layout / 'train'}\n  val_root: {layout / 'val'}\n")
    problems = nnctl.check(text)
    assert [(p.line, p.path) for p in problems] == [(7, "data.val_root")]
    assert "class folder 'zebra' is not a class of data.root" in problems[0].message
    with pytest.raises(ConfigError, match=r"data.val_root: .*val: class folder 'zebra' is not a class of data.root "
                                          r".*train \(its classes: ant, bee, cat\)"):  # train checks first
        nnctl.train(_config({"root": str(layout / "train"), "val_root": str(layout / "val")}),
                    out=str(layout / "run"))
    assert not (layout / "run").exists()
    cfg, _ = from_dict(_config({"root": str(layout / "train"), "val_root": str(layout / "val")}), "c.yaml")
    with pytest.raises(UsageError, match=r"class folder 'zebra' is not a class of data.root"):  # the reader too
        load_data(cfg, torch.device("cpu"))


def test_a_class_missing_from_the_val_folder_is_allowed_with_a_note(layout, cli):
    shutil.rmtree(layout / "val" / "bee")
    cfg = write(layout, _config({"root": "train", "val_root": "val"}, epochs=1))
    code, out, err = cli("train", str(cfg), "-o", str(layout / "run"))
    assert code == 0, err
    assert f"note: image_folder: data.val_root {layout / 'val'} has no folder for class 'bee': the val split " \
           "holds none of it" in out
    loss, accuracy, n = _by_hand(layout / "run", layout / "val")
    assert n == 10  # ant and cat, labelled by name: cat is still class 2
    row = _last_row(layout / "run")
    assert float(row["val_accuracy"]) == pytest.approx(accuracy, abs=1e-6)
    assert float(row["val_loss"]) == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("bad", ["train", "nowhere"])
def test_a_val_root_that_is_root_or_no_folder_is_refused_at_its_line(layout, bad):
    text = ("model:\n  input_shape: [3, 8, 8]\n  layers: [Flatten, {Linear: {out_features: 3}}]\n"
            f"data:\n  source: image_folder\n  root: {layout / 'train'}\n  val_root: {layout / bad}\n")
    problems = nnctl.check(text)
    assert [(p.line, p.path) for p in problems] == [(7, "data.val_root")]
    assert problems[0].message == (f"{layout / bad} is data.root: its images would be training images too; give "
                                   "a folder of other images" if bad == "train" else
                                   f"{layout / bad} is not a folder; image_folder needs one sub-folder of "
                                   "images per class")


def test_val_fraction_and_val_root_together_are_refused_at_the_line():
    text = ("model:\n  input_shape: [3, 8, 8]\n  layers: [Flatten, {Linear: {out_features: 3}}]\n"
            "data:\n  source: image_folder\n  root: a\n  val_root: b\n  val_fraction: 0.1\n")
    problems = nnctl.check(text)
    assert [(p.line, p.path, p.message) for p in problems] == [
        (8, "data.val_fraction", "val_root is the validation split: remove val_fraction")]
    problems = nnctl.check(text.replace("image_folder", "digits").replace("  val_fraction: 0.1\n", ""))
    assert [(p.line, p.path, p.message) for p in problems] == [
        (7, "data.val_root", "val_root applies to source: image_folder, not digits")]


@pytest.mark.slow  # a real-process test (README test command kept under ~6 minutes; .ci/run runs it)
def test_a_file_added_to_the_val_folder_is_noticed_by_eval_and_resume(layout):
    run = layout / "run"
    nnctl.train(_config({"root": str(layout / "train"), "val_root": str(layout / "val")}, epochs=2), out=str(run))
    assert nnctl.evaluate(str(run)).samples == 15
    shutil.copy(layout / "train" / "ant" / "00.png", layout / "val" / "ant" / "zz.png")  # a training image
    change = r"data.val_root: 16 samples now, 15 then; class ant: 5 -> 6"
    # a separate val folder keeps training samples out: the message says so, not that they moved in
    with pytest.raises(UsageError, match=rf"the data changed since this model was trained \({change}\); its val "
                                         r"split is the folder data.val_root as it is now, which holds other "
                                         r"samples than the ones the run used\. Score all"):
        nnctl.evaluate(str(run))
    assert "data.val_root: 16 samples now" in nnctl.evaluate(str(run), split="all").notes[0]
    best = (run / "best.pt").read_bytes()
    r = run_cli("train", "--resume", str(run), "--epochs", "3")
    assert r.returncode == 2 and "the data changed since" in r.stderr, r.stderr
    assert "data.val_root: 16 samples now, 15 then; class ant: 5 -> 6" in r.stderr
    assert "its val split is the folder data.val_root as it is now" in r.stderr
    assert "training samples" not in r.stderr, r.stderr
    assert (run / "best.pt").read_bytes() == best and K.load(run / "last.pt")["epoch"] == 2


def test_the_decoded_cache_serves_both_folders(layout, monkeypatch):
    monkeypatch.setenv("NNCTL_CACHE_DIR", str(layout / "cache"))
    data = {"root": str(layout / "train"), "val_root": str(layout / "val")}
    plain = nnctl.train(_config(data, epochs=2), out=str(layout / "plain"))
    first = nnctl.train(_config({**data, "cache": True}, epochs=2), out=str(layout / "first"))
    second = nnctl.train(_config({**data, "cache": True}, epochs=2), out=str(layout / "second"))
    assert len(list((layout / "cache").glob("*.u8"))) == 2  # one entry a folder
    losses = [[(h["train_loss"], h["val_loss"], h["val_accuracy"]) for h in r.history] for r in (plain, first, second)]
    assert losses[0] == losses[1] == losses[2]  # a cache hit gives the batches of a fresh decode
    assert {e.root for e in cache.entries()} == {str(layout / "train"), str(layout / "val")}


def test_the_val_and_test_folders_are_input_folders(layout):
    cfg, _ = from_dict(_config({"root": str(layout / "train"), "val_root": str(layout / "val"),
                                "test_root": str(layout / "test")}), "c.yaml")
    assert read_paths(cfg) == ([], [str(layout / "train"), str(layout / "val"), str(layout / "test")])
    cfg_file = write(layout, _config({"root": "train", "val_root": "val"}, epochs=1))
    r = run_cli("train", str(cfg_file), "-o", str(layout / "val" / "run"))
    assert r.returncode == 2 and "val" in r.stderr, r.stderr
    assert not (layout / "val" / "run").exists()


# --- 2: eval on other data: one default ----------------------------------------------------------

@pytest.fixture
def fraction_run(tmp_path):
    """A run trained on one folder split by fraction (60 images: 48 train / 12 val), and another folder."""
    _folder(tmp_path / "imgs", 20, seed=0)
    _folder(tmp_path / "other", 7, seed=4)
    nnctl.train(_config({"root": str(tmp_path / "imgs")}, epochs=2), out=str(tmp_path / "run"))
    return tmp_path


def test_eval_on_another_root_scores_all_of_it_as_data_does(fraction_run):
    run, other = fraction_run / "run", fraction_run / "other"
    loss, accuracy, n = _by_hand(run, other, which="best")
    by_set = nnctl.evaluate(str(run), overrides=[f"data.root={other}"])
    by_data = nnctl.evaluate(str(run), data={"source": "image_folder", "root": str(other)})
    for result in (by_set, by_data):
        assert (result.split, result.samples, n) == ("all", 21, 21)
        assert result.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-9)
        assert result.metrics["loss"] == pytest.approx(loss, rel=1e-5)
        assert result.scored == f"all 21 samples of image_folder {other}"
        assert not result.notes  # other data: no "the data changed since training"
    assert by_set.metrics == by_data.metrics
    chosen = nnctl.evaluate(str(run), overrides=[f"data.root={other}"], split="val")  # --split still chooses
    assert chosen.samples == 5 and chosen.scored == f"the val split (5 of 21 samples of image_folder {other})"
    # options that do not change which data is read keep the run's own val split
    own = nnctl.evaluate(str(run), overrides=["data.num_workers=0"])
    assert own.split == "val" and own.samples == 12


def test_eval_on_another_root_of_a_run_without_a_val_fraction(tmp_path):
    """With val_fraction: 0 the run has no val split; --set data.root=OTHER was an error, now all of OTHER."""
    _folder(tmp_path / "imgs", 10, seed=0)
    _folder(tmp_path / "other", 3, seed=4)
    nnctl.train(_config({"root": str(tmp_path / "imgs"), "val_fraction": 0.0}, epochs=1), out=str(tmp_path / "run"))
    result = nnctl.evaluate(str(tmp_path / "run"), overrides=[f"data.root={tmp_path / 'other'}"])
    assert (result.split, result.samples) == ("all", 9)


def test_eval_on_another_root_leaves_the_runs_val_root_out(layout):
    run = layout / "run"
    nnctl.train(_config({"root": str(layout / "train"), "val_root": str(layout / "val")}, epochs=1), out=str(run))
    result = nnctl.evaluate(str(run), overrides=[f"data.root={layout / 'test'}"])
    assert (result.split, result.samples) == ("all", 12)
    assert result.scored == f"all 12 samples of image_folder {layout / 'test'}"
    both = nnctl.evaluate(str(run), overrides=[f"data.root={layout / 'test'}", f"data.val_root={layout / 'val'}"],
                          split="val")
    assert both.samples == 15


def test_the_printed_line_says_which_samples_were_scored(fraction_run, cli):
    run, other = fraction_run / "run", fraction_run / "other"
    code, out, err = cli("eval", str(run))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"scored: the val split (12 of 60 samples of image_folder {fraction_run / 'imgs'})"
    assert lines[1].startswith("split val  samples 12  epoch ")
    code, out, err = cli("eval", str(run), "--set", f"data.root={other}")
    assert code == 0, err
    assert out.splitlines()[0] == f"scored: all 21 samples of image_folder {other}"
    assert out.splitlines()[1].startswith("split all  samples 21  epoch ")
    code, out, err = cli("eval", str(run), "--set", f"data.root={other}", "--json")
    assert code == 0, err
    assert '"scored": "all 21 samples of image_folder' in out


def test_config_errors_name_the_folder_keys(layout):
    with pytest.raises(ConfigError) as info:
        nnctl.train(_config({"root": str(layout / "train"), "val_root": str(layout / "val"), "val_fraction": 0.3}),
                    out=str(layout / "run"))
    assert "val_root is the validation split: remove val_fraction" in str(info.value)


def test_a_folder_given_for_one_split_is_what_eval_scores(layout):
    """--set data.test_root=DIR scores that test folder (with or without --split test, on a run trained
    without one); --set data.val_root=DIR scores that folder, never the training folder beside it (the
    new-user pass of issue 24: both scored train + the folder, or refused the test_root they were told to give)."""
    run = layout / "run"
    nnctl.train(_config({"root": str(layout / "train"), "val_root": str(layout / "val")}, epochs=2), out=str(run))
    loss, acc, n = _by_hand(run, layout / "test", "best")
    assert n == 12
    for split in (None, "test"):
        r = nnctl.evaluate(str(run), split=split, overrides=[f"data.test_root={layout / 'test'}"])
        assert (r.split, r.samples) == ("test", 12)
        assert r.scored == f"the test split: all 12 samples of data.test_root {layout / 'test'}"
        assert r.metrics["loss"] == pytest.approx(loss, rel=1e-5) and r.metrics["accuracy"] == pytest.approx(acc)
    r = nnctl.evaluate(str(run), overrides=[f"data.val_root={layout / 'test'}"])
    assert (r.split, r.samples, r.metrics["loss"]) == ("val", 12, pytest.approx(loss, rel=1e-5))
    code = run_cli("eval", str(run), "--split", "test")
    assert code.returncode == 2
    assert code.stderr.strip() == ("error: --split test: image_folder has no test split of its own; score "
                                   "--set data.test_root=DIR (a folder of the same classes), other data with "
                                   "--data, or the run's validation split with --split val")


def test_check_says_what_training_notes_of_a_class_missing_from_the_val_folder(layout, cli):
    """`check` said plain ok where `train` noted that the val folder has no folder for a class (the
    new-user pass): now a warning at data.val_root (an error only under --strict)."""
    shutil.rmtree(layout / "val" / "bee")
    cfg = write(layout, _config({"root": str(layout / "train"), "val_root": str(layout / "val")}))
    line = next(i for i, t in enumerate(cfg.read_text().splitlines(), 1) if "val_root:" in t)
    code, out, err = cli("check", str(cfg))
    assert code == 0 and f"{cfg}:{line}:" in err
    assert (f"warning: data.val_root: {layout / 'val'} has no folder for class 'bee': the val split holds none "
            "of it") in err
    assert cli("check", str(cfg), "--strict")[0] == 2

"""Issue 24, points 3-7, as a new user met them: predict says when it adapts inputs, summary RUN shows what
inputs a model takes and the YAML lines, the run log names frozen children and the epochs a resume ran,
the DDP data line counts whole splits, and the cache commands speak whole sentences."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

import nnctl

from .conftest import make, run_cli, write


def test_predict_says_once_how_many_images_it_resized_or_converted_and_from_what(digits_run, tmp_path, cli):
    """28x28 PNGs given to the 8x8 digits model were resized without a word (all answered "4")."""
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / f"m{i}.png")
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "same.png")
    files = [str(tmp_path / n) for n in ("m0.png", "m1.png", "m2.png", "rgb.png", "same.png")]
    preds = nnctl.predict(str(digits_run), files)
    assert preds.notes == ["3 of 5 images: resized from 28x28 to 8x8, the size the model was trained on "
                           f"(the first: {files[0]})",
                           "1 of 5 images: converted from RGB to L, the colour mode the model was trained on "
                           f"({files[3]})"]
    code, out, err = cli("predict", str(digits_run), *files)
    assert code == 0 and err.count("note: 3 of 5 images: resized from 28x28 to 8x8") == 1
    assert not nnctl.predict(str(digits_run), files[-1:]).notes  # an image as trained: nothing to say


def test_predict_names_every_conversion_that_changes_an_image(digits_run, tmp_path):
    """Every colour mode other than the model's is said, with what the conversion does (the new-user pass:
    RGBA with its alpha dropped, P and CMYK were converted without a word), and which file."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (8, 8, 2), dtype=np.uint8), "LA").save(tmp_path / "la.png")
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).convert("P").save(tmp_path / "p.png")
    Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "l.png")
    files = [str(tmp_path / n) for n in ("la.png", "p.png", "i16.png", "l.png")]
    notes = nnctl.predict(str(digits_run), files).notes
    mode = Image.open(files[2]).mode  # PIL reads a 16-bit grey PNG as I;16 or I (by version)
    assert notes == [
        f"1 of 4 images: converted from LA (its alpha dropped) to L, the colour mode the model was trained on ({files[0]})",
        f"1 of 4 images: converted from P (a palette) to L, the colour mode the model was trained on ({files[1]})",
        f"1 of 4 images: converted from {mode} ({'16' if mode.startswith('I;16') else '32'}-bit, scaled to 8) to L, "
        f"the colour mode the model was trained on ({files[2]})"]


def test_summary_of_a_run_shows_its_inputs_and_the_lines_of_its_config(digits_run):
    s = nnctl.summarize(str(digits_run))
    assert s.inputs.startswith("[1, 8, 8]; images 8x8 L (one channel); image files' pixels / 255; digits values / 16;"
                               " then normalised with mean [")
    assert s.inputs.endswith("10 classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9") and s.to_dict()["inputs"] == s.inputs
    lines = [r.line for r in s.rows]
    assert all(isinstance(n, int) and n > 0 for n in lines)  # the run's config.yaml lines (the column was empty)
    text = (digits_run / "config.yaml").read_text().splitlines()
    assert "Linear" in text[s.rows[-1].line - 1] or "Linear" in text[s.rows[-1].line]
    # and it says which file the lines are in (the new-user pass read them against the file it trained from)
    assert s.lines_of == str(digits_run / "config.yaml") and s.to_dict()["lines_of"] == s.lines_of
    r = run_cli("summary", str(digits_run))
    assert r.returncode == 0 and f"line: in {digits_run / 'config.yaml'}" in r.stdout.splitlines(), r.stdout


@pytest.mark.slow  # a real-process test (README test command kept under ~6 minutes; .ci/run runs it)
def test_the_run_log_names_frozen_children_and_the_epochs_a_resume_ran(tmp_path):
    cfg = write(tmp_path, make(train={"epochs": 2}, model={"input_shape": [1, 8, 8], "layers": [
        "Flatten", {"Linear": {"out_features": 16}}, "ReLU", {"Linear": {"out_features": 10}}]},
        freeze={"first": 2}))
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "model: 1,210 parameters (170 trainable)" in r.stdout
    assert "frozen: 1 (Linear); 1,040 parameters" in r.stdout
    assert "run: 2 epochs in" in r.stdout  # the run's folder name, not the config's
    r = run_cli("train", "--resume", str(tmp_path / "run"), "--epochs", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "run: epochs 3-4 of 4, resumed, in" in r.stdout  # was "4 epochs in" for the 2 it ran


def test_the_ddp_data_line_counts_whole_splits(tmp_path):
    from nnctl.data.loading import load_data
    from nnctl.config.loader import from_dict
    import torch

    cfg, _ = from_dict(make(train={"epochs": 1}))
    one = load_data(cfg, torch.device("cpu")).description
    two = load_data(cfg, torch.device("cpu"), rank=1, world_size=2).description
    assert one.startswith("digits: 1,437 train / 360 val samples")
    assert two.startswith("digits: 1,437 train / 360 val samples") and two.endswith(
        "(rank 1 of 2: a 1/2 share of every training batch and 180 of the val samples)")


@pytest.mark.slow  # a real-process test (README test command kept under ~6 minutes; .ci/run runs it)
def test_train_refuses_an_image_folder_root_that_is_not_a_folder_before_making_a_run_folder(tmp_path, cli):
    """At its line, before anything is written. `nnctl check` passes it: the shipped configs are templates
    whose root comes with --set data.root=... (tests/test_cli.py checks them)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {input_shape: [1,8,8], layers: [Flatten, {Linear: {out_features: 3}}]}\n"
                   "data: {source: image_folder, root: nope}\n")
    line = f"c.yaml:2:36: data.root: {tmp_path / 'nope'} is not a folder; image_folder needs one sub-folder of images per class"
    code, out, err = cli("check", str(cfg))
    assert code == 0, err
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().endswith(line) and not (tmp_path / "run").exists()


def test_predict_says_when_tensor_inputs_are_far_from_the_training_datas_scale(digits_run):
    """Inputs on another scale were answered with confidence, silently (issue 24, point 4)."""
    import torch

    assert nnctl.predict(str(digits_run), torch.rand(5, 1, 8, 8)).notes == []  # the model's scale: 0..1
    raw = torch.randint(0, 17, (5, 1, 8, 8), dtype=torch.uint8)
    assert nnctl.predict(str(digits_run), raw).notes == []  # raw digits values, divided by 16 as in training
    (note,) = nnctl.predict(str(digits_run), torch.rand(5, 1, 8, 8) * 255).notes
    assert note.startswith("1 tensor input: values far from the training data's: after the recorded scaling and "
                           "normalisation their mean is ")
    assert note.endswith("were they scaled as the training data was (the training data's values were divided "
                         "by 16)?")


def test_more_class_scores_than_classes_is_a_warning_at_the_output_layer(tmp_path, cli):
    """A Linear of width 5 for 4 class folders: check said ok and train ran without a word (the new-user
    pass); now a warning at the layer's line, an error under --strict, and a note in the run log."""
    rng = np.random.default_rng(0)
    for c in "abcd":
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (4, 4), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    doc = make(model={"input_shape": [3, 4, 4], "layers": ["Flatten", {"Linear": {"out_features": 5}}]},
               data={"source": "image_folder", "root": str(tmp_path / "imgs"), "val_fraction": 0.25},
               train={"epochs": 1})
    cfg = write(tmp_path, doc)
    line, col = next((i, t.index("Linear") + 1) for i, t in enumerate(cfg.read_text().splitlines(), 1)
                     if "- Linear" in t)  # the layer's item: where every problem of a layer is reported
    warning = (f"{cfg}:{line}:{col}: warning: model.layers[1]: the model's output layer model.layers[1] (Linear, line "
               f"{line}) gives 5 class scores per sample, but the data (image_folder {tmp_path / 'imgs'}) has 4 "
               "classes: score 4 is never a target; set out_features: 4")
    code, out, err = cli("check", str(cfg))
    assert code == 0 and warning in err.splitlines(), err
    code, out, err = cli("check", str(cfg), "--strict")
    assert code == 2 and warning in err.splitlines(), err
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode == 0 and "warning: model.layers[1]: the model's output layer" in r.stderr + r.stdout
    doc["model"]["layers"][1] = {"Linear": {"out_features": 4}}
    code, out, err = cli("check", str(write(tmp_path, doc)))
    assert code == 0 and "warning" not in err, err

"""One check pipeline (nnctl.checking) behind every entry point (issue 19).

- `nnctl check` refuses what `nnctl train` refuses before it reads a sample, with the same located lines
  and the same exit code (real processes);
- the config's freeze: selection is applied the same way by nnctl.build, nnctl.train, api.prepare +
  api.fit and eval --init, and a frozen parameter does not change during api.fit;
- the tests' config_outcome goes through the pipeline (augment and loss problems included).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

import nnctl
from nnctl import api
from nnctl import checking as CHK
from nnctl.config import yamlio
from nnctl.data import sources as S
from nnctl.runs import checkpoint as K
from nnctl.training import loop as LOOP

from tests.conftest import config_outcome, make, run_cli, text_outcome, write

CNN = {"input_shape": [1, 8, 8], "layers": [{"Conv2d": {"out_channels": 4, "kernel_size": 3, "padding": 1}},
                                           "ReLU", "Flatten", {"Linear": {"out_features": 10}}]}

# --- check == train, as real processes ----------------------------------------------------------

# several problems in one config (each process costs an import of torch): located where the YAML says
MANY = """\
name: many
model:
  input_shape: [1, 8, 8]
  layers:
    - Flatten
    - Linear: {out_features: 5}
data:
  source: digits
  augment:
    - RandomCrop: {size: 8, padding: 1, paddng_mode: edge}
train:
  epochs: 1
  loss: {cross_entropy: {weight: [1.0, 2.0, 3.0]}}
  optimizer: {Adam: {lr: 0.01, betaz: [0.9, 0.99]}}
freeze:
  first: 7
  names: [features]
"""
MANY_LINES = [
    "c.yaml:6:7: model.layers[1]: the model's output layer model.layers[1] (Linear, line 6) gives 5 class scores "
    "per sample, but the data (digits) has class labels 0..9 (10 classes): a label at or above 5 has no score; "
    "set out_features: 10",
    "c.yaml:10:54: data.augment[0].RandomCrop.paddng_mode: unknown argument 'paddng_mode' for RandomCrop; did you "
    "mean 'padding_mode'?",
    "c.yaml:13:34: train.loss.cross_entropy.weight: weight has 3 values but the model gives 5 outputs: give one "
    "value per class",
    "c.yaml:14:39: train.optimizer.Adam.betaz: unknown argument 'betaz' for Adam; did you mean 'betas'?",
    "c.yaml:16:10: freeze.first: first 7: the model has 2 children (0 to 1)",
    "c.yaml:17:11: freeze.names[0]: freeze name 'features' matches no module or parameter of the model "
    "(its children: 0, 1)",
]

# mse on the digits' class labels: a loss for another task
LOSS_TASK = make(train={"loss": "mse"})
LOSS_TASK_LINES = ["c.yaml:15:9: train.loss: digits gives class labels but train.loss is mse; use cross_entropy "
                   "or nll, or data.target: input to reconstruct the input"]


IMAGE_FOLDER = """\
name: folder
model:
  input_shape: [1, 8, 8]
  layers:
    - Flatten
    - Linear: {out_features: 2}
data: {source: image_folder, root: images, grayscale: true}
train: {epochs: 1}
"""


def _image_folder(root, classes=("cat", "dog", "eel"), per_class=2):
    """Tiny PNGs, one sub-folder per class."""
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (8, 8), color=40 * i).save(root / c / f"{i}.png")
    return root


def _problem_lines(stderr: str, config) -> list[str]:
    """The located problem lines of stderr, with the config's folder taken out of the file name."""
    return [line.replace(f"{config.parent}/", "") for line in stderr.splitlines() if line.strip()]


def _case(tmp_path, case: str):
    if case == "many":
        path = tmp_path / "c.yaml"
        path.write_text(MANY)
        return path, MANY_LINES
    if case == "loss_task":
        return write(tmp_path, LOSS_TASK), LOSS_TASK_LINES
    # 2 class scores on an image folder of 3 class folders (its classes counted, no image opened)
    _image_folder(tmp_path / "images")
    path = tmp_path / "c.yaml"
    path.write_text(IMAGE_FOLDER)
    lines = ["c.yaml:6:7: model.layers[1]: the model's output layer model.layers[1] (Linear, line 6) gives 2 "
             "class scores per sample, but the data (image_folder images) has class labels 0..2 (3 classes): a "
             "label at or above 2 has no score; set out_features: 3"]
    return path, lines


@pytest.mark.parametrize("case", ["many", "loss_task", "image_folder"])
def test_check_refuses_what_train_refuses_with_the_same_lines(tmp_path, case):
    config, expected = _case(tmp_path, case)
    checked = run_cli("check", str(config), cwd=tmp_path)
    trained = run_cli("train", str(config), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert (checked.returncode, trained.returncode) == (2, 2), checked.stderr + trained.stderr
    assert sorted(_problem_lines(checked.stderr, config)) == sorted(expected), checked.stderr
    assert sorted(_problem_lines(trained.stderr, config)) == sorted(expected), trained.stderr
    assert checked.stdout == trained.stdout == ""
    assert not (tmp_path / "run").exists()  # refused before anything was written


TB_CONFIG = """\
name: logged
model:
  input_shape: [1, 8, 8]
  layers: [Flatten, {Linear: {out_features: 10}}]
data: {source: digits}
train:
  epochs: 1
  log: [csv, tensorboard]
"""
TB_MISSING = ("import sys\nsys.modules['tensorboard'] = None\nsys.argv = ['nnctl'] + sys.argv[1:]\n"
              "from nnctl.cli.app import main\nmain()\n")


def test_check_and_train_refuse_a_missing_tensorboard_alike(tmp_path):
    """train.log: tensorboard without the package: the environment's problem (exit 1), said by both."""
    config = tmp_path / "c.yaml"
    config.write_text(TB_CONFIG)
    runs = [subprocess.run([sys.executable, "-c", TB_MISSING, *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
            for args in (("check", str(config)), ("train", str(config), "--out", str(tmp_path / "run")))]
    expected = ["error: c.yaml:8:8: train.log: tensorboard needs the tensorboard package: "
                "pip install 'nnctl[tensorboard]'"]
    for r in runs:
        assert r.returncode == 1, r.stderr
        assert _problem_lines(r.stderr, config) == expected, r.stderr
    assert not (tmp_path / "run").exists()


# --- the pipeline's steps, in process --------------------------------------------------------------

def test_the_pipeline_collects_every_step_in_file_order(tmp_path):
    """Structure, plan, freeze, data facts, optimizer, augment and loss problems of one document, at once."""
    result = CHK.check(yamlio.load_text(MANY, "c.yaml"))
    assert [p.format() for p in result.problems] == MANY_LINES
    assert result.cfg is not None and result.plan is not None and result.warnings == []
    # a broken structure elsewhere still lets the freeze selection be checked against the plan
    broken = MANY.replace("epochs: 1", "epochs: -1")
    lines = [p.format() for p in CHK.check(yamlio.load_text(broken, "c.yaml")).problems]
    assert "c.yaml:12:11: train.epochs: Input should be greater than or equal to 1, got -1" in lines
    assert MANY_LINES[4] in lines and MANY_LINES[5] in lines


def test_training_needs_a_data_section_only_for_train():
    doc = yamlio.load_text(yaml.safe_dump({"model": CNN}), "m.yaml")
    assert CHK.check(doc).problems == []  # nnctl check: a model alone is a valid config
    assert [p.format() for p in CHK.check(doc, purpose="train").problems] == [
        "m.yaml: data: no data: section: training needs one; add for example `data: {source: digits}`"]
    with pytest.raises(ValueError, match="purpose must be one of"):
        CHK.check(doc, purpose="serve")


def test_label_map_changes_the_class_count():
    """digits mapped to even/odd: 2 classes, so 2 outputs fit; a map of the wrong length is located."""
    parity = make(data={"label_map": [0, 1] * 5},
                  model={"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 2}}]})
    assert api.check(parity) == []
    short = make(data={"label_map": [0, 1, 0]})
    assert [p.format() for p in api.check(short)] == [
        "<dict>: data.label_map: data.label_map has 3 entries but digits has 10 classes: give one new class "
        "for each original class"]


def test_class_count_reads_no_image(tmp_path):
    """An image folder's classes are its sub-folders: files that are no images at all are never opened."""
    root = tmp_path / "images"
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        (root / c / "0.png").write_bytes(b"not a png")
    (root / "notes.txt").write_text("a file, not a class")
    cfg = api.load_config(make(data={"source": "image_folder", "root": str(root)},
                               model={"input_shape": [3, 8, 8], "layers": ["Flatten", "Linear"]}))[0]
    assert S.class_count(cfg) == 3
    assert [S.class_count(api.load_config(make(data={"source": s}))[0]) for s in
            ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")] == [10, 10, 10, 10, 100]
    assert S.class_count(api.load_config(make(data={"source": "synthetic", "classes": 3}))[0]) is None


def test_freeze_selection_of_a_torchvision_model_is_checked_on_the_meta_device():
    d = make(model={"input_shape": [3, 32, 32], "torchvision": "resnet18", "args": {"num_classes": 10}},
             data={"source": "cifar10"})
    assert api.check({**d, "freeze": {"names": ["layer1", "fc.weight"]}}) == []
    problems = api.check({**d, "freeze": {"names": ["layer9"], "children": [3, 99]}})
    assert [(p.path, p.message) for p in problems] == [
        ("freeze.children[1]", "child 99 does not exist: the model has 10 children (0 to 9)"),
        ("freeze.names[0]", "freeze name 'layer9' matches no module or parameter of the model (its children: "
                            "conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, fc)"),
    ]


def test_config_outcome_goes_through_the_pipeline(tmp_path, cli):
    """augment and loss problems (which config_outcome once skipped) are refused, as `nnctl check` prints them."""
    text = yaml.safe_dump(make(data={"augment": [{"RandomHorizontalFlip": {"q": 0.5}}]},
                               train={"loss": {"cross_entropy": {"weight": [1.0, 2.0]}}}), sort_keys=False)
    outcome, lines = text_outcome(text, str(tmp_path / "c.yaml"))
    assert outcome == "refused"
    assert len(lines) == 2
    assert "data.augment[0].RandomHorizontalFlip.q: " in lines[0]
    assert lines[1].endswith("train.loss.cross_entropy.weight: weight has 2 values but the model gives 10 outputs: "
                             "give one value per class")
    (tmp_path / "c.yaml").write_text(text)
    code, out, err = cli("check", str(tmp_path / "c.yaml"))
    assert code == 2 and out == ""
    assert err.splitlines() == lines
    assert config_outcome(yamlio.load_text(yaml.safe_dump(make()), "ok.yaml")) == ("ok", [])


# --- the config's freeze: through every entry point -------------------------------------------------

def _frozen(model) -> list[str]:
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def test_freeze_is_the_same_through_every_entry_point(tmp_path, monkeypatch):
    d = make(model=CNN, train={"epochs": 2, "optimizer": {"SGD": {"lr": 0.5}}}, freeze={"first": 1})
    config = write(tmp_path, d)
    expected = ["0.weight", "0.bias"]

    built = nnctl.build(str(config))
    assert _frozen(built) == expected
    initial = {k: v.clone() for k, v in built.state_dict().items()}

    # api.prepare + api.fit: frozen before, bit-identical after; the rest trains
    prepared = api.prepare(str(config), device="cpu")
    assert _frozen(prepared.model) == expected and prepared.freezing["frozen"] == expected
    assert all(torch.equal(initial[k], v) for k, v in prepared.model.state_dict().items())
    api.fit(prepared)
    after = prepared.model.state_dict()
    for k in expected:
        assert torch.equal(initial[k], after[k]), k
    assert not torch.equal(initial["3.weight"], after["3.weight"])

    # nnctl.train: the checkpoint records the same selection; its frozen weights are the initial ones
    result = nnctl.train(str(config), out=str(tmp_path / "run"))
    state = K.load(result.run_dir / "last.pt")
    assert state["freeze"]["frozen"] == expected
    for k in expected:
        assert torch.equal(initial[k], state["model"][k]), k
    assert not torch.equal(initial["3.weight"], state["model"]["3.weight"])

    # eval CONFIG --init WEIGHTS: weights without a selection of their own; the config's freeze applies
    torch.save(built.state_dict(), tmp_path / "w.pt")
    seen = []
    real = LOOP.evaluate
    monkeypatch.setattr(LOOP, "evaluate", lambda model, *a, **k: seen.append(_frozen(model)) or real(model, *a, **k))
    api.evaluate(str(config), init=str(tmp_path / "w.pt"))
    assert seen == [expected]


def test_prepare_refuses_what_train_refuses():
    """api.prepare runs the pipeline for training: a freeze selection that matches nothing, no data."""
    with pytest.raises(nnctl.errors.ConfigError) as info:
        api.prepare(make(model=CNN, freeze={"names": ["features"]}))
    assert [p.format() for p in info.value.problems] == [
        "<dict>: freeze.names[0]: freeze name 'features' matches no module or parameter of the model "
        "(its children: 0, 1, 2, 3)"]
    with pytest.raises(nnctl.errors.ConfigError, match="no data: section: training needs one"):
        api.prepare({"model": CNN})


def test_a_softmax_without_dim_is_one_warning_in_nnctls_words(tmp_path, cli):
    """PyTorch's own deprecation warning and nnctl's lint said the same thing twice for one line (the
    new-user pass counted three warnings for one Softmax); now once, with the fix, wherever the layer is."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: sm\nmodel:\n  input_shape: [1, 8, 8]\n  layers:\n    - Flatten\n    - Linear: [64, 10]\n"
                   "    - Softmax\n    - Linear: [10, 10]\n    - LogSoftmax\ndata: {source: digits}\ntrain: {loss: nll}\n")
    code, out, err = cli("check", str(cfg))
    assert code == 0, err
    assert err.splitlines() == [
        f"{cfg}:7:7: warning: model.layers[2].Softmax: Softmax without dim: PyTorch guesses the dimension "
        "(deprecated); write Softmax: {dim: 1}",
        f"{cfg}:9:7: warning: model.layers[4].LogSoftmax: LogSoftmax without dim: PyTorch guesses the dimension "
        "(deprecated); write LogSoftmax: {dim: 1}"]


def test_a_scalar_meant_as_the_outputs_gets_the_hint(tmp_path, cli):
    """`Linear: 4` is in_features=4 (PyTorch's first argument): the new-user pass got "expected
    in_features=2352" with no word of what was meant. A list or mapping gets no hint."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  input_shape: [1, 8, 8]\n  layers:\n    - Flatten\n    - Linear: 4\n")
    code, out, err = cli("check", str(cfg))
    assert code == 2 and err.strip() == (
        f"{cfg}:5:15: model.layers[1].Linear: Linear at model.layers[1]: in_features=4 but the input's last "
        "dimension is 64 (input shape [64]); expected in_features=64; a scalar is in_features: for 4 outputs "
        "write Linear: {out_features: 4}")
    cfg.write_text("model:\n  input_shape: [1, 8, 8]\n  layers:\n    - Flatten\n    - Linear: [4, 3]\n")
    code, out, err = cli("check", str(cfg))
    assert code == 2 and err.strip().endswith("expected in_features=64")

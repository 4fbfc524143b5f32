"""data.augment (nnctl/augment.py): per-sample batch augmentation of training batches.

Proves: augmentation is per sample; deterministic for (seed, epoch, step); skipped on validation, in
nnctl eval and in nnctl predict; bit-identical on resume (SIGINT mid-epoch in process, SIGKILL through
the CLI) with preloaded and streamed data (0 and 2 workers), and identical between the two paths; equal
to torchvision's functional ops where the parameters are fixed; and checked by nnctl check at the line.
"""

from __future__ import annotations

import json
import signal
import time
import warnings

import pytest
import torch
import torchvision.transforms.v2 as TV
import torchvision.transforms.v2.functional as TF

from nnctl.data.augment import colour as AC
from nnctl.data.augment import ops as AO
from nnctl.data.augment import pipeline as A
from nnctl.data.augment import spec as AS
from nnctl.runs import checkpoint as K
from nnctl.config import loader as C
from nnctl.data import loading as D
from nnctl.errors import UsageError

from .conftest import make, write
from .test_reliability_faults import _differing_weights, _nnctl, _popen, _wait
from .test_train_safety import DROPOUT_MLP, _assert_equal_states, _fit

CPU = torch.device("cpu")
DIGITS_AUG = [{"RandomCrop": {"size": 8, "padding": 1}}, "RandomHorizontalFlip"]
# every kind of op, on digits (1 channel: saturation and hue leave it alone)
FULL_AUG = [{"RandomCrop": {"size": 8, "padding": 1, "padding_mode": "reflect"}}, "RandomHorizontalFlip",
            {"RandomAffine": {"degrees": 10, "translate": [0.1, 0.1], "scale": [0.9, 1.1]}},
            {"ColorJitter": {"brightness": 0.3, "contrast": 0.3}}, {"RandomErasing": {"p": 0.5}}]


def _gen(step: int = 0, epoch: int = 0, seed: int = 0) -> torch.Generator:
    return A.Augment.generator(seed, epoch, step)


def _digits(**data) -> dict:
    return make(model=DROPOUT_MLP, data={"source": "digits", **data}, train={"epochs": 2, "batch_size": 64})


def _batches(d: dict, split: str = "train", epoch: int = 0, **kw) -> list[torch.Tensor]:
    cfg, _ = C.from_dict(d)
    bundle = D.load_data(cfg, CPU)
    return [x for x, _ in getattr(bundle, split).epoch(epoch, **kw)]


# --- 1: per sample ----------------------------------------------------------------------------

def test_identical_images_in_one_batch_come_out_different():
    x = torch.rand(1, 3, 16, 16).expand(64, 3, 16, 16).contiguous()
    for spec in (DIGITS_AUG[:1], ["RandomHorizontalFlip"], [{"RandomResizedCrop": {"size": 16}}],
                 [{"RandomRotation": {"degrees": 30}}], [{"ColorJitter": {"brightness": 0.5}}],
                 [{"RandomErasing": {"p": 1.0}}]):
        spec = [{"RandomCrop": {"size": 16, "padding": 2}}] if spec == DIGITS_AUG[:1] else spec
        y = A.build(spec, (3, 16, 16))(x, _gen())
        distinct = len({tuple(v.flatten().tolist()) for v in y})
        assert distinct >= (2 if spec == ["RandomHorizontalFlip"] else 20), (spec, distinct)


@pytest.mark.parametrize("preload,workers", [(True, 0), (False, 2)])
def test_identical_samples_differ_in_a_training_batch_of_both_paths(tmp_path, preload, workers):
    path = tmp_path / "same.pt"
    torch.save({"x": torch.rand(1, 1, 8, 8).expand(48, 1, 8, 8).contiguous(), "y": torch.zeros(48, dtype=torch.long)},
               path)
    d = make(data={"source": "tensors", "path": str(path), "val_fraction": 0.0, "normalize": False,
                   "preload": preload, "num_workers": workers, "augment": DIGITS_AUG},
             train={"epochs": 1, "batch_size": 48})
    (x,) = _batches(d)
    assert len({tuple(v.flatten().tolist()) for v in x}) >= 10
    (plain,) = _batches(d, augment=False)
    assert all(torch.equal(v, plain[0]) for v in plain)  # the same samples, not augmented


# --- 2: deterministic ------------------------------------------------------------------------

def test_same_seed_epoch_step_same_batch_and_another_step_differs():
    aug = A.build(FULL_AUG, (1, 8, 8))
    x = torch.rand(32, 1, 8, 8)
    a, b = aug(x, _gen(step=3, epoch=1)), aug(x, _gen(step=3, epoch=1))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, _gen(step=4, epoch=1)))
    assert not torch.equal(a, aug(x, _gen(step=3, epoch=2)))
    assert not torch.equal(a, aug(x, _gen(step=3, epoch=1, seed=1)))


def test_preloaded_and_streamed_batches_are_identical_and_reloading_repeats_them():
    base = _digits(augment=FULL_AUG)
    want = _batches(base, epoch=1)
    assert want and not torch.equal(torch.cat(want), torch.cat(_batches(base, epoch=1, augment=False)))
    for preload, workers in ((True, 0), (False, 0), (False, 2)):
        d = _digits(augment=FULL_AUG, preload=preload, num_workers=workers)
        got = _batches(d, epoch=1)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert torch.equal(g, w), (preload, workers)


def test_streamed_batches_are_augmented_in_the_workers(monkeypatch):
    cfg, _ = C.from_dict(_digits(augment=DIGITS_AUG, preload=False, num_workers=2))
    batches = D.load_data(cfg, CPU).train.epoch(0)
    first = next(batches)  # the workers start here, with the real Augment

    def refuse(self, x, generator):
        raise AssertionError("augmented in the main process")

    monkeypatch.setattr(A.Augment, "__call__", refuse)  # the main process only: the workers are running
    rest = list(batches)
    assert len(rest) == 22 and first[0].dtype == torch.float32
    with pytest.raises(AssertionError, match="augmented in the main process"):  # the patch does bite here
        _batches(_digits(augment=DIGITS_AUG))


# --- 3: never on validation, eval or predict -----------------------------------------------

def test_validation_batches_are_not_augmented():
    for preload in (True, False):
        aug = _batches(_digits(augment=FULL_AUG, preload=preload, num_workers=0), "val")
        plain = _batches(_digits(preload=preload, num_workers=0), "val")
        assert len(aug) == len(plain) and all(torch.equal(a, b) for a, b in zip(aug, plain))
    cfg, _ = C.from_dict(_digits(augment=FULL_AUG))
    bundle = D.load_data(cfg, CPU)
    assert bundle.val.augment is None and bundle.train.augment is not None
    assert "; augment: RandomCrop(size=8, padding=1, padding_mode='reflect'), RandomHorizontalFlip(), " \
           "RandomAffine(" in bundle.description
    assert "augment" not in repr(bundle.preprocessing)  # the inference record leaves it out
    assert D.load_data(cfg, CPU, augment=False).train.augment is None


def test_eval_and_predict_never_augment(tmp_path, cli, monkeypatch):
    d = _digits(augment=DIGITS_AUG)
    d["train"]["epochs"] = 1
    _fit(d, tmp_path / "run")
    torch.save({"x": torch.rand(3, 1, 8, 8)}, tmp_path / "inputs.pt")

    def refuse(self, x, generator):
        raise AssertionError("augmented outside training")

    monkeypatch.setattr(A.Augment, "__call__", refuse)
    for args in (("eval", str(tmp_path / "run"), "--split", "train"), ("eval", str(tmp_path / "run")),
                 ("predict", str(tmp_path / "run"), str(tmp_path / "inputs.pt"), "--format", "csv")):
        code, out, err = cli(*args)
        assert code == 0, (args, out, err)
    with pytest.raises(AssertionError, match="augmented outside training"):  # the patch does bite
        _batches(d)


# --- 4: exact resume ------------------------------------------------------------------------

@pytest.mark.parametrize("preload,workers", [(True, 0), (False, 0), (False, 2)])
def test_sigint_mid_epoch_then_resume_is_bit_identical(tmp_path, preload, workers):
    d = _digits(augment=DIGITS_AUG, preload=preload, num_workers=workers)
    straight, _ = _fit(d, tmp_path / "straight")
    _fit(d, tmp_path / "cut", stop_at=(1, 9))
    state = K.load(tmp_path / "cut" / "last.pt")
    assert state["epoch"] == 1 and state["step_in_epoch"] == 9
    resumed, result = _fit(d, tmp_path / "cut", resume=state)
    assert result is not None and len(result.history) == 2
    _assert_equal_states(straight.state_dict(), resumed.state_dict())


@pytest.fixture(scope="module")
def straight_cli(tmp_path_factory):
    """An uninterrupted run of the CLI (in process) with augmentation (3 epochs; preloaded): the weights every
    path must end with."""
    from typer.testing import CliRunner

    from nnctl.cli.app import app

    tmp = tmp_path_factory.mktemp("straight")
    d = make(model=DROPOUT_MLP, data={"source": "digits", "augment": DIGITS_AUG}, train={"epochs": 3, "batch_size": 32})
    r = CliRunner().invoke(app, ["train", str(write(tmp, d)), "--out", str(tmp / "run")], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return d, K.load(tmp / "run" / "last.pt")["model"], r.stdout


@pytest.mark.parametrize("preload,workers", [(True, 0), (False, 2)])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, straight_cli, cli, preload, workers):
    """A real process killed by SIGKILL in epoch 2 (after epoch 1's checkpoint), resumed by the CLI."""
    base, want, out = straight_cli
    assert "augment: RandomCrop(size=8, padding=1), RandomHorizontalFlip()" in out  # the run log names it
    d = dict(base, data=dict(base["data"], preload=preload, num_workers=workers))
    run = tmp_path / "cut"
    proc = _popen(_nnctl("train", str(write(tmp_path, d)), "--out", str(run)), tmp_path)
    try:
        _wait(lambda: (run / "last.pt").exists(), proc, timeout=120)  # epoch 1 saved: now in epoch 2
        time.sleep(0.1)
        assert proc.poll() is None, "the run ended before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert K.load(run / "last.pt")["epoch"] < 3
    code, _, err = cli("train", "--resume", str(run))
    assert code == 0, err
    assert _differing_weights(want, K.load(run / "last.pt")["model"]) == []


# --- 5: equal to torchvision where the parameters are fixed ------------------------------------

def test_flips_with_p1_equal_torch_flip():
    x = torch.rand(5, 3, 6, 7)
    assert torch.equal(A.build([{"RandomHorizontalFlip": {"p": 1.0}}])(x, _gen()), torch.flip(x, [-1]))
    assert torch.equal(A.build([{"RandomVerticalFlip": {"p": 1.0}}])(x, _gen()), torch.flip(x, [-2]))
    assert torch.equal(A.build([{"RandomHorizontalFlip": {"p": 0.0}}])(x, _gen()), x)
    flipped = (A.build(["RandomHorizontalFlip"])(torch.rand(4000, 1, 1, 2), _gen()))
    share = (flipped[:, 0, 0, 0] > flipped[:, 0, 0, 1]).float().mean().item()  # random pairs: half swapped
    assert 0.45 < share < 0.55


@pytest.mark.parametrize("mode,fill", [("constant", 0.25), ("reflect", 0), ("edge", 0)])
def test_random_crop_is_padding_plus_slicing_at_a_uniform_offset(mode, fill):
    x = torch.rand(400, 3, 6, 6)
    y = A.build([{"RandomCrop": {"size": 6, "padding": 2, "padding_mode": mode, "fill": fill}}], (3, 6, 6))(x, _gen())
    padded = TF.pad(x, [2, 2, 2, 2], fill=fill, padding_mode=mode)
    seen = set()
    for k in range(len(x)):
        hits = [(t, l) for t in range(5) for l in range(5) if torch.equal(padded[k, :, t:t + 6, l:l + 6], y[k])]
        assert hits, k
        seen.add(hits[0])
    assert len(seen) == 25  # every offset of the 5 x 5 occurs


def test_color_jitter_with_fixed_factors_equals_torchvision_functional():
    x = torch.rand(6, 3, 5, 5)
    for key, f, ref in (("brightness", 1.3, TF.adjust_brightness), ("contrast", 0.7, TF.adjust_contrast),
                        ("saturation", 1.5, TF.adjust_saturation), ("hue", 0.1, TF.adjust_hue)):
        y = A.build([{"ColorJitter": {key: [f, f]}}])(x, _gen())
        torch.testing.assert_close(y, ref(x, f), rtol=0, atol=2e-6, msg=key)
    gray = A.build([{"RandomGrayscale": {"p": 1.0}}])(x, _gen())
    assert torch.equal(gray, TF.rgb_to_grayscale(x, num_output_channels=3))


def test_hue_per_sample_equals_adjust_hue_bit_for_bit_without_torchvision_private_code():
    """nnctl's batched RGB<->HSV pair (issue 19 item 7) against the public adjust_hue, one sample at a time,
    on grey pixels, ties of the largest channel, black and white; nothing imported from a private module."""
    import ast
    import inspect

    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 7, 7, generator=g)
    x[:4] = x[:4, :1]                           # grey: hue and saturation 0
    x[4:8, 0] = x[4:8, 1]                       # red == green == the largest
    x[8:16] = (x[8:16] * 4).round() / 4         # many ties
    x[16], x[17] = 0.0, 1.0
    factor = torch.rand(32, generator=g) - 0.5
    y = AC._hue(x, factor)
    for k in range(len(x)):
        assert torch.equal(y[k], TF.adjust_hue(x[k], float(factor[k]))), k
    tree = ast.parse(inspect.getsource(A))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("torchvision") and "._" in m], imported


def test_color_jitter_runs_its_four_operations_in_a_random_order_a_sample():
    import itertools

    x = torch.rand(24, 3, 3, 3)
    factors = {"brightness": 1.2, "contrast": 0.8, "saturation": 1.3, "hue": 0.05}
    y = A.build([{"ColorJitter": {k: [v, v] for k, v in factors.items()}}])(x, _gen())
    fns = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation,
           "hue": TF.adjust_hue}
    orders = set()
    for k in range(len(x)):
        for order in itertools.permutations(factors):
            z = x[k]
            for name in order:
                z = fns[name](z, factors[name])
            if torch.allclose(z, y[k], rtol=0, atol=1e-5):
                orders.add(order)
                break
        else:
            raise AssertionError(f"sample {k} is no order of torchvision's four operations")
    assert len(orders) >= 8  # per sample, not one order for the batch (24 orders, 24 samples)


def test_rotation_affine_and_resized_crop_equal_torchvision_functional():
    x = torch.rand(4, 3, 9, 9)
    y = A.build([{"RandomRotation": {"degrees": [37, 37], "fill": [0.2, 0.3, 0.4]}}])(x, _gen())
    assert torch.equal(y, TF.rotate(x, 37.0, fill=[0.2, 0.3, 0.4]))
    y = A.build([{"RandomAffine": {"degrees": [33, 33], "scale": [1.2, 1.2], "shear": [5, 5, 7, 7],
                                   "interpolation": "bilinear", "fill": 0.5}}])(x, _gen())
    ref = TF.affine(x, angle=33.0, translate=[0, 0], scale=1.2, shear=[5.0, 7.0],
                    interpolation=TV.InterpolationMode.BILINEAR, fill=0.5)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    boxes = [(1, 2, 5, 3), (0, 1, 6, 7), (2, 0, 4, 5), (3, 0, 3, 4)]  # top, left, height, width
    t, l, h, w = (torch.tensor(v) for v in zip(*boxes))
    for bilinear, mode in ((True, TV.InterpolationMode.BILINEAR), (False, TV.InterpolationMode.NEAREST)):
        y = AO._resized_crop(x, t, l, h, w, 9, 9, bilinear)
        ref = torch.stack([TF.resized_crop(x[k], *box, [9, 9], interpolation=mode) for k, box in enumerate(boxes)])
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    whole = A.build([{"RandomResizedCrop": {"size": 9, "scale": [1, 1], "ratio": [1, 1]}}])(x, _gen())
    assert torch.equal(whole, x)


def test_random_erasing_erases_one_box_a_sample_with_the_value():
    x = torch.rand(50, 3, 12, 12) + 2  # no pixel equals the value
    y = A.build([{"RandomErasing": {"p": 1.0, "value": [0, 0.5, 1]}}])(x, _gen())
    erased = (y != x).all(1)  # (N, H, W): every channel changed
    for k in range(len(x)):
        rows, cols = erased[k].any(1).nonzero().flatten(), erased[k].any(0).nonzero().flatten()
        box = erased[k][rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.all() and int(erased[k].sum()) == box.numel()  # one rectangle
        assert torch.equal(y[k, :, rows[0], cols[0]], torch.tensor([0, 0.5, 1]))
    areas = erased.flatten(1).sum(1).float() / 144
    assert 0.02 - 0.01 <= areas.min() and areas.max() <= 0.33 + 0.05


# --- 6: nnctl check ----------------------------------------------------------------------------

def test_check_reports_unknown_names_and_bad_arguments_at_their_lines(tmp_path, cli):
    p = tmp_path / "c.yaml"
    p.write_text(
        "model:\n"
        "  input_shape: [1, 8, 8]\n"
        "  layers: [Flatten, {Linear: {out_features: 10}}]\n"
        "data:\n"
        "  source: digits\n"
        "  augment:\n"
        "    - RandomFlip\n"                                  # line 7
        "    - RandomCrop: {size: 8, paddin: 1}\n"            # line 8
        "    - RandomHorizontalFlip: {p: 2}\n"                # line 9
        "    - RandomCrop: {size: 6, padding: 1}\n"           # line 10: not the sample shape
        "    - Resize: {size: 8}\n")                          # line 11: torchvision's, not supported
    code, out, err = cli("check", str(p))
    assert code == 2, (out, err)  # a config error: exit 2, as every config error
    assert f"{p}:7:7: data.augment[0]: unknown augmentation 'RandomFlip'; did you mean 'RandomHorizontalFlip'? " \
           "(supported: RandomCrop, " in err
    assert f"{p}:8:" in err and "data.augment[1].RandomCrop.paddin: unknown argument 'paddin' for RandomCrop; " \
                                "did you mean 'padding'?" in err
    assert f"{p}:9:" in err and "data.augment[2].RandomHorizontalFlip.p: " in err and "[0.0, 1.0]" in err
    assert f"{p}:10:" in err and "RandomCrop gives 6x6 images but the samples are 8x8" in err
    assert f"{p}:11:" in err and "torchvision's Resize is not one of the augmentations" in err
    assert "Traceback" not in err


def test_config_refuses_malformed_entries_and_non_images(tmp_path, cli):
    d = make(data={"source": "digits", "augment": [3, {"RandomCrop": 8}]})
    code, _, err = cli("check", str(write(tmp_path, d)))
    assert code == 2 and "data.augment[0]: expected an augmentation name" in err, err
    assert "data.augment[1]: expected an augmentation name" in err, err
    d = make(model={"input_shape": [64], "layers": [{"Linear": {"out_features": 10}}]},
             data={"source": "synthetic", "classes": 10, "augment": ["RandomHorizontalFlip"]})
    code, _, err = cli("check", str(write(tmp_path, d)))
    assert code == 2 and "data.augment: augmentation applies to images" in err, err
    with pytest.raises(UsageError, match=r"data.augment\[0\].RandomRotation.expand: .*not supported"):
        A.build([{"RandomRotation": {"degrees": 5, "expand": True}}], (3, 8, 8))


def test_summary_names_the_pipeline(tmp_path, cli):
    code, out, _ = cli("summary", str(write(tmp_path, _digits(augment=DIGITS_AUG))))
    assert code == 0
    assert "augment (training batches): RandomCrop(size=8, padding=1), RandomHorizontalFlip()" in out
    code, out, _ = cli("summary", str(write(tmp_path, _digits(augment=DIGITS_AUG))), "--json")
    assert code == 0 and json.loads(out)["augment"] == "RandomCrop(size=8, padding=1), RandomHorizontalFlip()"
    code, out, _ = cli("summary", str(write(tmp_path, _digits())), "--json")
    assert code == 0 and json.loads(out)["augment"] is None


@pytest.mark.parametrize("entry,message", [
    ("RandomResizedCrop: {size: 8, ratio: [0, 0]}", "RandomResizedCrop.ratio values must be positive"),
    ("RandomErasing: {p: 1, ratio: [0, 0]}", "RandomErasing.ratio values must be positive"),
    ("RandomErasing: {scale: [0.5, 0.1]}", "RandomErasing.scale must be [min, max] with min <= max"),
    ("RandomResizedCrop: {size: 8, ratio: [2, 1]}", "RandomResizedCrop.ratio must be [min, max] with min <= max"),
    ("RandomCrop: {size: 8, padding: 65536}", "RandomCrop.padding 65536 is larger than the image (8x8); at most 8"),
    ("RandomCrop: {size: 8, padding: [1, 9]}", "RandomCrop.padding 9 is larger than the image (8x8); at most 8"),
    ("RandomCrop: {size: 8, padding: 70000}", "RandomCrop.padding 70000 is out of range: at most 65536"),
])
def test_check_refuses_ranges_that_would_crash_or_explode_training(tmp_path, cli, entry, message):
    """Ranges that passed check and then failed in training (math domain error, terabytes of padding)."""
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  input_shape: [1, 8, 8]\n  layers: [Flatten, {Linear: {out_features: 10}}]\n"
                 f"data:\n  source: digits\n  augment:\n    - RandomHorizontalFlip\n    - {entry}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw torchvision warning on the way
        code, out, err = cli("check", str(p))
    assert code == 2 and f"{p}:8:" in err and message in err and "Traceback" not in err, (out, err)
    assert AS.problems([{"RandomCrop": {"size": 8, "padding": 8}}], (1, 8, 8)) == []  # the limit itself is fine

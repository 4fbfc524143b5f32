"""nnctl predict's inputs: what is read, how it is scaled, what fails alone, what never gets overwritten.

Each test is the regression test of one defect found by an adversarial tester. The oracle is
plain PyTorch applying the record by hand, or the same picture given another way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import nnctl
from nnctl import api
from nnctl.errors import UsageError
from nnctl.data.decode import decode_image

from .conftest import make, run_cli, write


# digits_run (tests/conftest.py): the session's tiny model trained on the built-in digits (an image
# source: L, 8x8, scale 16)


@pytest.fixture(scope="module")
def tensors_run(tmp_path_factory):
    """A tiny model trained on `source: tensors` with uint8 x: the digits' pixels 0..16 as they are."""
    from nnctl.data import sources as D

    tmp = tmp_path_factory.mktemp("tensors")
    store = D.builtin._digits()
    torch.save({"x": store.x.clone(), "y": store.y.clone()}, tmp / "digits.pt")
    cfg = write(tmp, make(data={"source": "tensors", "path": str(tmp / "digits.pt")}, train={"epochs": 2}))
    return api.train(str(cfg), out=str(tmp / "run")).run_dir, store.x[:4].clone()


def picture(seed: int = 0, size=(12, 10)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size).astype(np.uint8)


# 1 -----------------------------------------------------------------------------------------

def test_o_is_never_a_file_read_inside_an_input_folder(digits_run, tmp_path, cli):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, name in enumerate(("a.png", "b.png")):
        Image.fromarray(picture(i), "L").save(imgs / name)
    before = (imgs / "a.png").read_bytes()
    code, _, err = cli("predict", str(digits_run), str(imgs), "-o", str(imgs / "a.png"))
    assert code == 2 and "is an input" in err
    assert (imgs / "a.png").read_bytes() == before
    preds = nnctl.predict(digits_run, [imgs])
    assert preds.files == [str(imgs / "a.png"), str(imgs / "b.png")]
    code, out, err = cli("predict", str(digits_run), str(imgs), "-o", str(tmp_path / "out.csv"), "--format", "csv")
    assert code == 0, err
    assert (tmp_path / "out.csv").read_text().count("\n") == 3


# 2 -----------------------------------------------------------------------------------------

def test_an_image_and_a_uint8_tensor_agree_for_a_tensors_trained_model(tensors_run, tmp_path):
    run, pixels = tensors_run  # (4, 1, 8, 8) uint8, values 0..16: raw values as training used them
    record = nnctl.load_record(run)
    assert record.color_mode is None and not record.is_image and record.scale is None
    Image.fromarray(pixels[0, 0].numpy(), "L").save(tmp_path / "one.png")
    torch.save({"x": pixels[0]}, tmp_path / "one.pt")
    by_image, by_tensor = nnctl.predict(run, [tmp_path / "one.png", tmp_path / "one.pt"], top_k=10)
    assert by_image.error is None and by_tensor.error is None
    assert by_image.classes == by_tensor.classes
    assert by_image.probabilities == by_tensor.probabilities  # identical, not merely close
    model = nnctl.load(run)
    x = pixels[:1].float()  # training: uint8 x -> float32 as is (no scale), then (x - mean) / std if recorded
    if record.mean is not None:
        x = (x - torch.tensor(record.mean).reshape(1, -1, 1, 1)) / torch.tensor(record.std).reshape(1, -1, 1, 1)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0]
    top = probs.topk(10)
    assert by_image.classes == top.indices.tolist()
    assert np.allclose(by_image.probabilities, top.values.tolist(), atol=1e-6)


def test_an_image_for_an_image_source_is_divided_by_255(digits_run, tmp_path):
    record = nnctl.load_record(digits_run)
    assert record.is_image and record.scale == 16.0 and record.image_scale == 255.0
    pixels = torch.from_numpy(picture(3, (8, 8)))
    Image.fromarray(pixels.numpy(), "L").save(tmp_path / "p.png")
    (row,) = nnctl.predict(digits_run, tmp_path / "p.png", top_k=10)
    model = nnctl.load(digits_run)
    x = (pixels.float().reshape(1, 1, 8, 8) / 255 - record.mean[0]) / record.std[0]
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0]
    assert np.allclose(row.probabilities, probs.topk(10).values.tolist(), atol=1e-6)


# 3 -----------------------------------------------------------------------------------------

def test_a_16_bit_png_predicts_as_its_8_bit_picture(digits_run, tmp_path):
    pic = picture(5, (13, 11))  # another size than 8x8: the resize applies to both
    Image.fromarray(pic, "L").save(tmp_path / "p8.png")
    Image.fromarray(pic.astype(np.uint16) * 257).save(tmp_path / "p16.png")  # each v stored as v * 257
    with Image.open(tmp_path / "p16.png") as img:
        assert img.mode.startswith("I")  # really 16-bit
    assert torch.equal(decode_image(tmp_path / "p16.png", "L", (8, 8)), decode_image(tmp_path / "p8.png", "L", (8, 8)))
    a, b = nnctl.predict(digits_run, [tmp_path / "p8.png", tmp_path / "p16.png"], top_k=3)
    assert a.error is None and b.error is None
    assert a.classes == b.classes and a.probabilities == b.probabilities
    # scaled by value, round(v * 255 / 65535): 16-bit values that are not v * 257 are not saturated to 255 either
    ramp = (np.arange(64, dtype=np.uint16) * 1024).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    got = decode_image(tmp_path / "ramp.png", "L", None)[0].numpy()
    assert np.array_equal(got, ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))


def test_decode_image_reads_like_training_and_fails_in_one_clear_line(tmp_path, monkeypatch):
    pic = picture(7, (9, 14))
    Image.fromarray(pic, "L").save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as img:  # what training's decoder did: convert, bilinear resize
        want = np.asarray(img.convert("RGB").resize((5, 6), Image.BILINEAR))
    got = decode_image((tmp_path / "p.png").read_bytes(), "RGB", (6, 5))
    assert got.dtype == torch.uint8 and got.shape == (3, 6, 5)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), want)
    assert torch.equal(decode_image(tmp_path / "p.png", "RGB", (6, 5)), got)

    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    os.mkfifo(tmp_path / "pipe.png")
    for name, words in (("empty.png", "an empty file"), ("junk.png", "not a readable image"),
                        ("pipe.png", "FIFO")):
        with pytest.raises(UsageError) as err:
            decode_image(tmp_path / name, "L")
        text = str(err.value)
        assert words in text and str(tmp_path / name) in text
        assert "object at 0x" not in text and "\n" not in text
    with pytest.raises(UsageError) as err:
        decode_image(b"\x89PNG\r\n\x1a\n truncated", "L")
    assert "object at 0x" not in str(err.value) and "image data" in str(err.value)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 9x14 = 126 pixels: a "bomb" (warned, not raised)
    with pytest.raises(UsageError, match="decompression bomb"):
        decode_image(tmp_path / "p.png", "L")


def test_pil_warnings_never_reach_stderr(tmp_path):
    img = Image.new("P", (8, 8))
    img.putpalette([0, 0, 0, 255, 255, 255] * 128)
    img.info["transparency"] = b"\x00\xff"  # palette transparency as bytes: PIL warns on convert
    img.save(tmp_path / "pal.png", transparency=b"\x00\xff")
    code = ("import warnings, sys; warnings.simplefilter('always'); from nnctl.data.decode import decode_image; "
            f"t = decode_image({str(tmp_path / 'pal.png')!r}, 'RGB', (8, 8)); print(tuple(t.shape))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "(3, 8, 8)", r.stderr
    assert r.stderr == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing escapes to a caller that turns warnings into errors
        decode_image(tmp_path / "pal.png", "L")


# 4 -----------------------------------------------------------------------------------------

def test_integer_and_bool_tensors_are_refused_per_input(digits_run, tmp_path):
    good = torch.randint(0, 17, (2, 1, 8, 8), dtype=torch.uint8)
    rows = list(nnctl.predict(digits_run, [torch.randint(0, 17, (2, 1, 8, 8)), good,
                                           torch.zeros(1, 8, 8, dtype=torch.bool), good.to(torch.float64) / 16]))
    assert rows[0].error == "int64 values: give uint8 raw values or float32 model-scale values"
    assert [r.error for r in rows[1:3]] == [None, None]
    assert rows[3].error == "bool values: give uint8 raw values or float32 model-scale values"
    assert rows[4].error is None and rows[5].error is None  # float64 taken as model-scale values
    assert rows[1].probabilities == pytest.approx(rows[4].probabilities, abs=1e-6)  # uint8/16 == float
    torch.save({"x": torch.randint(0, 17, (3, 1, 8, 8), dtype=torch.int32)}, tmp_path / "ints.pt")
    r = run_cli("predict", str(digits_run), str(tmp_path / "ints.pt"))
    assert r.returncode == 1 and "int32 values: give uint8 raw values" in r.stderr
    assert "Traceback" not in r.stderr


# 5 -----------------------------------------------------------------------------------------

def test_a_str_path_or_tensor_is_one_input(digits_run, tmp_path):
    Image.fromarray(picture(1, (8, 8)), "L").save(tmp_path / "a.png")
    for one in (str(tmp_path / "a.png"), tmp_path / "a.png"):
        preds = nnctl.predict(digits_run, one)
        assert [r.input for r in preds] == [str(tmp_path / "a.png")] and not preds.failed
    preds = nnctl.predict(digits_run, torch.zeros(3, 1, 8, 8))
    assert [r.input for r in preds] == ["tensor#0[0]", "tensor#0[1]", "tensor#0[2]"]
    preds = nnctl.predict(digits_run, np.zeros((1, 8, 8), dtype=np.float32))
    assert len(preds) == 1 and not preds.failed
    with pytest.raises(UsageError, match="iterable"):
        nnctl.predict(digits_run, 42)
    (row,) = nnctl.predict(digits_run, [3.5])
    assert "not an input" in row.error


# 6 -----------------------------------------------------------------------------------------

def test_an_image_of_another_shape_fails_alone(tmp_path):
    d = make(model={"input_shape": [2, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 4}}]})
    model = api.build(d)
    Image.fromarray(picture(2, (8, 8)), "L").save(tmp_path / "a.png")
    preds = nnctl.predict(model, [tmp_path / "a.png", torch.rand(2, 8, 8), tmp_path / "a.png"])
    assert [r.error for r in preds] == ["an image decodes to [3, 8, 8]; the model takes [2, 8, 8]", None,
                                        "an image decodes to [3, 8, 8]; the model takes [2, 8, 8]"]
    assert len(preds[1].classes) == 4
    flat = api.build(make(model={"input_shape": [64], "layers": [{"Linear": {"out_features": 10}}]}))
    a, b = nnctl.predict(flat, [tmp_path / "a.png", torch.rand(64)])
    assert a.error.startswith("an image decodes to [3, 8, 8]; the model takes [64]") and b.error is None


# 7 -----------------------------------------------------------------------------------------

def test_a_plain_module_takes_tensors_as_given(tmp_path):
    model = torch.nn.Linear(64, 10)
    preds = nnctl.predict(model, [torch.zeros(64), torch.rand(5, 64)], top_k=2)
    assert len(preds) == 6 and not preds.failed
    assert [r.input for r in preds][:2] == ["tensor#0", "tensor#1[0]"]
    with torch.no_grad():
        want = torch.softmax(model(torch.zeros(1, 64)), dim=1)[0].topk(2)
    assert preds[0].classes == want.indices.tolist()
    assert any("no preprocessing record" in n for n in preds.notes)
    Image.fromarray(picture(2, (8, 8)), "L").save(tmp_path / "a.png")
    (row,) = nnctl.predict(model, tmp_path / "a.png")
    assert "no preprocessing record" in row.error and "give tensors" in row.error
    (row,) = nnctl.predict(model, torch.tensor(1.0))
    assert "a single number" in row.error


# 8 -----------------------------------------------------------------------------------------

def test_a_large_tensors_file_stays_one_tensor_and_rows_are_made_on_demand(digits_run, tmp_path):
    from nnctl.use import predict as P

    n = 20_000
    x = torch.randint(0, 17, (n, 1, 8, 8), dtype=torch.uint8)
    torch.save({"x": x}, tmp_path / "many.pt")
    preds = nnctl.predict(digits_run, [tmp_path / "many.pt"], top_k=2, batch_size=999)
    assert len(preds._groups) == 1 and preds._groups[0].x is None  # raw samples dropped once predicted
    assert preds._groups[0].top_i.shape == (n, 2)
    assert len(preds) == n and preds.outputs.shape == (n, 10)
    assert preds.rows[-1].input == preds[-1].input == f"{tmp_path / 'many.pt'}[{n - 1}]"
    assert not hasattr(P.Prediction("a"), "__dict__")  # slots: a compact row
    rows = list(preds)
    assert len(rows) == n and rows[123].input.endswith("[123]")
    with torch.no_grad():  # batching across slices gives the per-sample answer
        model = nnctl.load(digits_run)
        rec = nnctl.load_record(digits_run)
        want = torch.softmax(model(rec.from_raw(x[12_345:12_346])), dim=1)[0].topk(2)
    assert rows[12_345].classes == want.indices.tolist()
    assert np.allclose(rows[12_345].probabilities, want.values.tolist(), atol=1e-6)


def test_batches_span_inputs_and_keep_input_order(digits_run, tmp_path):
    xs = [torch.randint(0, 17, (k, 1, 8, 8), dtype=torch.uint8) for k in (3, 1, 5)]
    one = nnctl.predict(digits_run, xs, batch_size=1, top_k=3)
    big = nnctl.predict(digits_run, xs, batch_size=4, top_k=3)
    assert [r.input for r in one] == [r.input for r in big]
    assert [r.input for r in one][:4] == ["tensor#0[0]", "tensor#0[1]", "tensor#0[2]", "tensor#1"]
    for a, b in zip(one, big):
        assert a.classes == b.classes and np.allclose(a.probabilities, b.probabilities, atol=1e-6)


# 9 -----------------------------------------------------------------------------------------

def test_unreadable_files_inside_a_folder_are_failed_rows(digits_run, tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    Image.fromarray(picture(1, (8, 8)), "L").save(imgs / "a.png")
    os.mkfifo(imgs / "pipe.png")
    (imgs / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (imgs / "loop").symlink_to(imgs, target_is_directory=True)
    torch.save({"x": torch.zeros(0, 1, 8, 8)}, imgs / "sub" / "empty.pt")
    r = run_cli("predict", str(digits_run), str(imgs), "--format", "csv")
    assert r.returncode == 1, r.stderr
    assert len(r.stdout.splitlines()) == 1 + 4  # a.png, dangling.png, pipe.png, sub/empty.pt
    assert f"error: {imgs / 'pipe.png'}: is a FIFO (named pipe)" in r.stderr
    assert f"error: {imgs / 'dangling.png'}: a symbolic link to nothing" in r.stderr
    assert f"error: {imgs / 'sub' / 'empty.pt'}: holds no samples" in r.stderr
    assert "a link to a folder (not followed)" in r.stderr  # a folder link is not an input: a note
    assert "Traceback" not in r.stderr


# 10 ----------------------------------------------------------------------------------------

def test_a_config_or_a_weights_only_export_as_source_says_what_predict_needs(digits_run, tmp_path, cli):
    cfg = write(tmp_path, make())
    torch.save({"x": torch.zeros(1, 8, 8)}, tmp_path / "x.pt")
    code, _, err = cli("predict", str(cfg), str(tmp_path / "x.pt"))
    assert code == 2
    assert "predict needs a trained model: a run folder or a checkpoint (a config has no trained weights)" in err
    assert "nnctl.build" not in err and "nnctl.load" not in err
    code, _, err = cli("export-weights", str(digits_run), "-o", str(tmp_path / "w.safetensors"))
    assert code == 0, err
    code, _, err = cli("predict", str(tmp_path / "w.safetensors"), str(tmp_path / "x.pt"))
    assert code == 2
    assert ("w.safetensors holds weights only, without the config; predict needs a run folder or an nnctl "
            "checkpoint") in err
    assert "UTF-8" not in err
    with pytest.raises(UsageError, match="nnctl.load needs a trained model"):
        nnctl.load(str(cfg))

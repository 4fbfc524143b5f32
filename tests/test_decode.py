"""The one image decoder (nnctl/data/decode.py): one conversion rule for every PIL mode, and identical
tensors in training (preloaded and streamed), the decoded cache, eval and predict.

Issue 19 (two decoders: training saturated a 16-bit PNG to white, predict kept its high byte) and
issue 20 defect 4 (a model trained on 8-bit images scored 0.50 in eval on 16-bit copies and 40/40 in
predict; a 16-bit folder trained on white images). Real files written with PIL; every expected
value is computed here by hand from the pixels written, never by nnctl.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nnctl
from nnctl.config import loader as C
from nnctl.data import cache as K
from nnctl.data import loading as D
from nnctl.data import sources as SRC
from nnctl.data.decode import DECODER, DECODER_VERSION, decode_image
from nnctl.errors import UsageError

from .conftest import make

CPU = torch.device("cpu")
H, W = 6, 5
FLOAT_REFUSED = ("a 32-bit floating-point image (PIL mode F), refused: its pixel range is not defined; save it "
                 "with 8 or 16 bits per channel")
PALETTE = [(10, 20, 30), (200, 100, 50), (0, 255, 0), (255, 255, 255), (7, 130, 240)]


# --- the files and their pixels, by hand ----------------------------------------------------------

def _round_div(num: np.ndarray, den: int) -> np.ndarray:
    """round(num / den), halves up, in integers (num >= 0)."""
    return (2 * num + den) // (2 * den)


def _grey(v: np.ndarray) -> np.ndarray:
    return np.repeat(v.astype(np.uint8)[..., None], 3, axis=2)


def _sixteen_bit_values(rng) -> np.ndarray:
    v = rng.integers(0, 65536, (H, W)).astype(np.int64)
    v.flat[:6] = [0, 257, 32768, 65535, 1024, 65534]  # -> 0, 1, 128, 255, 4, 255
    return v


def _kinds(rng) -> dict[str, tuple[Image.Image, np.ndarray]]:
    """file name -> (the PIL image written, its expected 8-bit RGB pixels (H, W, 3))."""
    kinds = {}
    v16 = _sixteen_bit_values(rng)
    kinds["g16.png"] = Image.fromarray(v16.astype(np.uint16)), _grey(_round_div(v16 * 255, 65535))
    v32 = _sixteen_bit_values(rng)  # 'I' whose values fit 16 bits: the 16-bit rule
    kinds["i32.tif"] = Image.fromarray(v32.astype(np.int32), "I"), _grey(_round_div(v32 * 255, 65535))
    wide = rng.integers(-1000, 200_000, (H, W)).astype(np.int64)
    wide.flat[:2] = [-1000, 200_000]  # beyond 16 bits: the image's own range, min -> 0, max -> 255
    kinds["i32wide.tif"] = Image.fromarray(wide.astype(np.int32), "I"), _grey(_round_div((wide + 1000) * 255, 201_000))

    idx = rng.integers(0, len(PALETTE), (H, W)).astype(np.uint8)
    flat = [c for rgb in PALETTE for c in rgb]
    colours = np.array(PALETTE, dtype=np.uint8)[idx]
    pal = Image.fromarray(idx, "P")
    pal.putpalette(flat)
    kinds["pal.png"] = pal, colours
    kinds["pal_alpha.png"] = pal.copy(), colours  # saved with a tRNS alpha per entry: alpha dropped
    pa = Image.merge("PA", (Image.fromarray(idx, "L"), Image.fromarray(rng.integers(0, 256, (H, W)).astype(np.uint8))))
    pa.putpalette(flat)
    kinds["pa.tif"] = pa, colours

    cmyk = rng.integers(0, 256, (H, W, 4)).astype(np.int64)
    cmyk[0, 0] = [10, 20, 30, 40]  # -> (207, 198, 190)
    rgb = _round_div((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]), 255)
    kinds["cmyk.tif"] = Image.fromarray(cmyk.astype(np.uint8), "CMYK"), rgb.astype(np.uint8)
    kinds["cmyk.jpg"] = Image.fromarray(cmyk.astype(np.uint8), "CMYK"), None  # lossy: from the pixels read back

    la = rng.integers(0, 256, (H, W, 2)).astype(np.uint8)
    kinds["la.png"] = Image.fromarray(la, "LA"), _grey(la[..., 0])
    rgba = rng.integers(0, 256, (H, W, 4)).astype(np.uint8)
    kinds["rgba.png"] = Image.fromarray(rgba, "RGBA"), rgba[..., :3].copy()
    bits = rng.integers(0, 2, (H, W)).astype(bool)
    kinds["bw.png"] = Image.fromarray(bits), _grey(bits * 255)
    plain = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    kinds["rgb.png"] = Image.fromarray(plain, "RGB"), plain
    return kinds


def _save(img: Image.Image, path: Path) -> None:
    if path.name == "pal_alpha.png":
        img.save(path, transparency=bytes([0, 128, 255, 60, 200]))
    elif path.suffix == ".jpg":
        img.save(path, quality=95)
    else:
        img.save(path)


def _expected_jpeg(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "CMYK"
        cmyk = np.asarray(img).astype(np.int64)
    return _round_div((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]), 255).astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma in PIL's fixed point (L = R 299/1000 + G 587/1000 + B 114/1000)."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _expected(rgb: np.ndarray, mode: str, size: tuple[int, int] | None) -> torch.Tensor:
    """The expected (C, H, W) uint8 tensor: the 8-bit pixels, the colour mode, then the bilinear resize."""
    arr = rgb if mode == "RGB" else _luma(rgb)
    if size is not None:
        arr = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR))
    t = torch.from_numpy(np.array(arr, dtype=np.uint8))  # a writable copy
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _write_kinds(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Every kind, saved under folder; file name -> expected RGB pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (img, rgb) in _kinds(np.random.default_rng(seed)).items():
        _save(img, folder / name)
        with Image.open(folder / name) as back:  # really the mode meant (PIL decides on reading)
            want = {"g16.png": "I;16", "i32.tif": "I", "i32wide.tif": "I", "pal.png": "P", "pal_alpha.png": "P",
                    "pa.tif": "PA", "cmyk.tif": "CMYK", "cmyk.jpg": "CMYK", "la.png": "LA", "rgba.png": "RGBA",
                    "bw.png": "1", "rgb.png": "RGB"}[name]
            assert back.mode == want, (name, back.mode)
            if name == "pal_alpha.png":
                assert isinstance(back.info.get("transparency"), bytes)
        out[name] = _expected_jpeg(folder / name) if rgb is None else rgb
    return out


# --- 1: the rule, mode by mode --------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_mode_decodes_by_the_one_rule(tmp_path, mode):
    expected = _write_kinds(tmp_path)
    for name, rgb in expected.items():
        got = decode_image(tmp_path / name, mode)
        assert torch.equal(got, _expected(rgb, mode, None)), name
        assert torch.equal(decode_image((tmp_path / name).read_bytes(), mode), got), name  # bytes as the file
        resized = decode_image(tmp_path / name, mode, (4, 3))  # resized after the 8-bit conversion
        assert torch.equal(resized, _expected(rgb, mode, (4, 3))), name
    # the literal values of the rule
    g16 = decode_image(tmp_path / "g16.png", "L")[0].flatten()[:6].tolist()
    assert g16 == [0, 1, 128, 255, 4, 255]
    assert decode_image(tmp_path / "i32.tif", "L")[0].flatten()[:6].tolist() == [0, 1, 128, 255, 4, 255]
    assert decode_image(tmp_path / "i32wide.tif", "L")[0].flatten()[:2].tolist() == [0, 255]
    assert decode_image(tmp_path / "cmyk.tif", "RGB")[:, 0, 0].tolist() == [207, 198, 190]
    assert set(decode_image(tmp_path / "bw.png", "L").unique().tolist()) <= {0, 255}


def test_sixteen_and_thirty_two_bit_copies_decode_as_their_8_bit_picture(tmp_path):
    """An 8-bit picture stored as 16 bits (v * 257) or as a 32-bit 'I' TIFF gives back its pixels
    (PIL's convert saturated both to white); a constant 'I' image beyond 16 bits is clipped."""
    pic = np.random.default_rng(3).integers(0, 256, (7, 9)).astype(np.uint8)
    Image.fromarray(pic, "L").save(tmp_path / "p8.png")
    Image.fromarray(pic.astype(np.uint16) * 257).save(tmp_path / "p16.png")
    Image.fromarray(pic.astype(np.int32) * 257, "I").save(tmp_path / "p32.tif")
    want = torch.from_numpy(pic).unsqueeze(0)
    for name in ("p8.png", "p16.png", "p32.tif"):
        assert torch.equal(decode_image(tmp_path / name, "L"), want), name
        assert torch.equal(decode_image(tmp_path / name, "RGB"), want.expand(3, -1, -1)), name
    Image.fromarray(np.full((2, 2), 70_000, np.int32), "I").save(tmp_path / "high.tif")
    Image.fromarray(np.full((2, 2), -5, np.int32), "I").save(tmp_path / "low.tif")
    assert decode_image(tmp_path / "high.tif", "L").unique().tolist() == [255]
    assert decode_image(tmp_path / "low.tif", "L").unique().tolist() == [0]


# --- 2: training (both paths), the cache, eval and predict give identical tensors -------------------

def _folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Two classes holding every kind (a: the first half, b: the rest)."""
    root = tmp_path / "images"
    expected = _write_kinds(tmp_path / "all")
    names = sorted(expected)
    for i, name in enumerate(names):
        (root / ("a" if i < len(names) // 2 else "b")).mkdir(parents=True, exist_ok=True)
        (tmp_path / "all" / name).rename(root / ("a" if i < len(names) // 2 else "b") / name)
    return root, expected


def _config(root: Path, mode: str, size, **data) -> dict:
    channels = 3 if mode == "RGB" else 1
    h, w = size or (H, W)
    return make(model={"input_shape": [channels, h, w], "layers": ["Flatten", {"Linear": {"out_features": 2}}]},
                data={"source": "image_folder", "root": str(root), "grayscale": mode == "L",
                      "val_fraction": 0.25, "num_workers": 0, **({"image_size": list(size)} if size else {}), **data},
                train={"batch_size": 4, "epochs": 1})


def _load(d: dict):
    return D.load_data(C.from_dict(d)[0], CPU)


@pytest.mark.parametrize("mode,size", [("RGB", None), ("L", (4, 3))])
def test_training_cache_eval_and_predict_decode_identically(tmp_path, monkeypatch, mode, size):
    monkeypatch.setenv("NNCTL_CACHE_DIR", str(tmp_path / "cache"))
    root, expected = _folder(tmp_path)
    files = [Path(p) for p, _ in SRC.folder._scan_image_folder(root)[1]]  # the store's order
    want = torch.stack([_expected(expected[f.name], mode, size) for f in files])

    preloaded = _load(_config(root, mode, size, preload=True))
    assert preloaded.preloaded and torch.equal(preloaded.train.store.x, want)

    streamed = _load(_config(root, mode, size, preload=False))
    store = streamed.train.store
    assert store.x is None and store.files == [str(f) for f in files]
    assert torch.equal(torch.stack([store.sample(i)[0] for i in range(len(files))]), want)
    for a, b in ((preloaded.train, streamed.train), (preloaded.val, streamed.val)):  # the batches too
        for (xa, ya), (xb, yb) in zip(a.epoch(0), b.epoch(0), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    workers = _load(_config(root, mode, size, preload=False, num_workers=2))  # decoded in DataLoader workers
    for (xa, _), (xb, _) in zip(preloaded.train.epoch(0), workers.train.epoch(0), strict=True):
        assert torch.equal(xa, xb)

    built = _load(_config(root, mode, size, cache=True))
    assert any(n.startswith(f"decoded {len(files)} images into decoded cache") for n in built.notes), built.notes
    hit = _load(_config(root, mode, size, cache=True))
    assert any(n.startswith("using decoded cache") for n in hit.notes), hit.notes
    assert torch.equal(built.train.store.x, want) and torch.equal(hit.train.store.x, want)

    run = nnctl.train(_config(root, mode, size), out=str(tmp_path / "run")).run_dir
    seen = []
    real_load = D.load_data

    def spy(*args, **kwargs):
        seen.append(real_load(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(D, "load_data", spy)
    result = nnctl.evaluate(run, split="all")
    assert result.samples == len(files) and len(seen) == 1
    assert torch.equal(seen[0].train.store.x, want)  # eval's decoded pixels

    record = nnctl.load_record(run)
    assert record.color_mode == mode
    model = nnctl.load(run)
    inputs = []
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    preds = nnctl.predict(model, [str(f) for f in files], batch_size=5)
    assert [p.error for p in preds] == [None] * len(files)
    assert torch.equal(torch.cat(inputs), record.from_raw(want, image=True))  # predict's model input
    Image.fromarray(np.full((H, W), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    assert [p.error for p in nnctl.predict(run, tmp_path / "f.tif")] == [FLOAT_REFUSED]  # refused as training does


def test_a_float_image_is_refused_naming_the_file_on_both_training_paths(tmp_path):
    """Mode F has no defined range (0..1? 0..255?): refused, never guessed (predict: the identity test)."""
    root = tmp_path / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.zeros((H, W), np.uint8)).save(root / c / "0.png")
    bad = root / "b" / "f.tif"
    Image.fromarray(np.full((H, W), 0.5, np.float32), "F").save(bad)
    for preload in (True, False):
        with pytest.raises(UsageError) as err:
            b = _load(_config(root, "L", None, preload=preload, val_fraction=0.0))
            list(b.train.epoch(0))
        assert str(err.value) == f"image {bad}: {FLOAT_REFUSED}"


# --- 3: a 16-bit folder trains on its pixels; eval and predict score it as its 8-bit copy ------------

def _grey_folders(tmp_path: Path) -> dict[str, Path]:
    """The same 2-class pictures as 8-bit PNGs, 16-bit PNGs (v * 257) and 32-bit 'I' TIFFs."""
    rng = np.random.default_rng(5)
    roots = {k: tmp_path / k for k in ("p8", "p16", "p32")}
    for c, (lo, hi) in (("dark", (20, 90)), ("light", (120, 200))):  # every value under 255: 16-bit was white
        for i in range(12):
            pic = rng.integers(lo, hi, (4, 4)).astype(np.uint8)
            for k, root in roots.items():
                (root / c).mkdir(parents=True, exist_ok=True)
                if k == "p8":
                    Image.fromarray(pic, "L").save(root / c / f"{i:02d}.png")
                elif k == "p16":
                    Image.fromarray(pic.astype(np.uint16) * 257).save(root / c / f"{i:02d}.png")
                else:
                    Image.fromarray(pic.astype(np.int32) * 257, "I").save(root / c / f"{i:02d}.tif")
    return roots


def _grey_config(root: Path, **train) -> dict:
    return make(model={"input_shape": [1, 4, 4], "layers": ["Flatten", {"Linear": {"out_features": 2}}]},
                data={"source": "image_folder", "root": str(root), "grayscale": True, "val_fraction": 0.25},
                train={"batch_size": 6, "epochs": 1, **train})


def test_a_16_bit_folder_trains_on_its_pixels_and_scores_as_its_8_bit_copy(tmp_path):
    roots = _grey_folders(tmp_path)
    stores = {k: _load(_grey_config(r)).train.store.x for k, r in roots.items()}
    assert int(stores["p16"].max()) < 200 and torch.equal(stores["p16"], stores["p8"])  # not white: the pictures
    assert torch.equal(stores["p32"], stores["p8"])

    # trained on the 16-bit folder: the classes are separable by brightness, so it learns them
    run16 = nnctl.train(_grey_config(roots["p16"], epochs=3, optimizer={"Adam": {"lr": 0.05}}),
                        out=str(tmp_path / "run16")).run_dir
    assert nnctl.evaluate(run16, split="all").metrics["accuracy"] == 1.0

    # trained on 8-bit images: eval and predict on the 16-bit and 32-bit copies give its 8-bit answers
    run8 = nnctl.train(_grey_config(roots["p8"], epochs=2), out=str(tmp_path / "run8")).run_dir
    scores = {k: nnctl.evaluate(run8, data={"source": "image_folder", "root": str(r), "grayscale": True}).metrics
              for k, r in roots.items()}
    assert scores["p16"] == scores["p8"] and scores["p32"] == scores["p8"]
    rows = {k: [(p.classes, p.probabilities) for p in nnctl.predict(run8, r)] for k, r in roots.items()}
    assert len(rows["p8"]) == 24 and rows["p16"] == rows["p8"] and rows["p32"] == rows["p8"]


# --- 4: the cache's key holds the decoder's version -------------------------------------------------

def test_a_cache_written_by_another_decoder_version_is_rebuilt_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("NNCTL_CACHE_DIR", str(tmp_path / "cache"))
    roots = _grey_folders(tmp_path)
    d = _grey_config(roots["p16"])
    d["data"]["cache"] = True
    with monkeypatch.context() as m:
        m.setattr(K.entry, "DECODER", "PIL 13.0.0")  # what the key held before the one decoder (PIL's version alone)
        old = _load(d)
        assert any(n.startswith("decoded 24 images") for n in old.notes), old.notes
    new = _load(d)
    assert any(n.startswith("decoded 24 images") for n in new.notes), new.notes  # not the old entry
    again = _load(d)
    assert any(n.startswith("using decoded cache") for n in again.notes), again.notes
    assert torch.equal(again.train.store.x, _load(_grey_config(roots["p8"])).train.store.x)
    heads = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    assert sorted(h["decoder"] for h in heads) == sorted(["PIL 13.0.0", DECODER])
    assert DECODER.startswith(f"nnctl {DECODER_VERSION}, PIL ")


# --- 5: one decoder, by construction ------------------------------------------------------------------

def test_only_the_decoder_module_reads_images():
    """No nnctl module but nnctl/data/decode.py imports PIL or torchvision.io: a second image decoder
    cannot come back unnoticed (issue 19: two decoders drifted apart)."""
    import ast

    package = Path(nnctl.__file__).resolve().parent
    readers = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names] \
                if isinstance(node, ast.ImportFrom) else []
            if any(n == "PIL" or n.startswith("PIL.") or n.startswith("torchvision.io") for n in names):
                readers.append(str(path.relative_to(package)))
    assert sorted(set(readers)) == ["data/decode.py"]

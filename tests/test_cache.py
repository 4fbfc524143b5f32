"""The decoded-image cache (data.cache: true, nnctl/data/cache/): exact, invalidated, shared, self-checking.

Real image files (PNG and JPEG, 8x8 to 16x16, 3 classes) written by each test; the cache
folder is set through NNCTL_CACHE_DIR so that nothing touches ~/.cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nnctl.data import cache as K
from nnctl.runs import checkpoint as CK
from nnctl.config import loader as C
from nnctl.data import decode as DEC
from nnctl.data import sources as SRC
from nnctl.data import loading as D
from nnctl.data import store as STORE
from nnctl.errors import UsageError

from .conftest import ROOT, make, run_cli
from .test_train_safety import _assert_equal_states, _fit

_Result = namedtuple("_Result", "returncode stdout stderr")  # the in-process cli fixture's answer, as run_cli names it

CPU = torch.device("cpu")


def _image(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """3 classes x 12 images, PNG and JPEG, 8/12/16 pixels square; the cache under tmp_path."""
    monkeypatch.setenv("NNCTL_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "images"
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(12):
            _image(root / f"class{c}" / f"{i:02d}.{'png' if i % 2 else 'jpg'}", (8, 12, 16)[i % 3], 100 * c + i)
    return root


def _cfg(root: Path, cache: bool, preload: bool = True, workers: int = 0, **data):
    d = make(model={"input_shape": [3, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 3}}]},
             data={"source": "image_folder", "root": str(root), "image_size": [8, 8], "cache": cache,
                   "preload": preload, "num_workers": workers, **data},
             train={"batch_size": 8, "epochs": 1})
    return C.from_dict(d)[0]


def _batches(bundle) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = [b for e in (0, 1) for b in bundle.train.epoch(e)]
    return out + list(bundle.val.epoch(0))


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _no_decoding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded or opened although the cache holds it")

    monkeypatch.setattr(STORE, "decode_image", refuse)  # the one decoder, where the store calls it
    monkeypatch.setattr(SRC.folder, "image_size", refuse)  # the header reads of the size check


# --- 1: a hit gives the batches of a fresh decode ------------------------------------------------

@pytest.mark.parametrize("preload,workers", [(True, 0), (False, 0), (False, 2)])
def test_cache_hit_gives_the_batches_of_a_fresh_decode(folder, monkeypatch, preload, workers):
    fresh = _batches(D.load_data(_cfg(folder, False, preload, workers), CPU))
    built = D.load_data(_cfg(folder, True, preload, workers), CPU)
    assert any(n.startswith("decoded 36 images into decoded cache") for n in built.notes), built.notes
    _assert_same(fresh, _batches(built))
    with monkeypatch.context() as m:
        _no_decoding(m)  # a hit reads the memory-mapped file: no image is opened
        hit = D.load_data(_cfg(folder, True, preload, workers), CPU)
        assert any(n.startswith("using decoded cache") for n in hit.notes), hit.notes
        assert hit.train.store.files is None and hit.train.store.x.dtype == torch.uint8
        _assert_same(fresh, _batches(hit))
    entries = K.entries(verify=True)
    assert [e.status for e in entries] == ["valid"] and entries[0].images == 36
    assert entries[0].root == str(folder) and entries[0].shape == [36, 3, 8, 8]


def test_native_size_hit_skips_the_size_scan(tmp_path, monkeypatch):
    """Without image_size every header is read to check the sizes; a hit skips that too."""
    monkeypatch.setenv("NNCTL_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "same"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            _image(root / f"c{c}" / f"{i}.png", 8, 10 * c + i)
    fresh = _batches(D.load_data(_cfg(root, False, image_size=None), CPU))
    D.load_data(_cfg(root, True, image_size=None), CPU)
    _no_decoding(monkeypatch)
    hit = D.load_data(_cfg(root, True, image_size=None), CPU)
    assert hit.input_shape == (3, 8, 8)
    _assert_same(fresh, _batches(hit))


# --- 2: a changed file invalidates -----------------------------------------------------------------

def test_a_changed_added_or_touched_file_invalidates_the_cache(folder):
    first = D.load_data(_cfg(folder, True), CPU)
    target = folder / "class1" / "03.png"
    old = DEC.decode_image(str(target), "RGB", (8, 8))
    _image(target, 12, 9999)  # other pixels (the same size as before)
    new = DEC.decode_image(str(target), "RGB", (8, 8))
    assert not torch.equal(old, new)
    again = D.load_data(_cfg(folder, True), CPU)
    assert any(n.startswith("decoded 36 images") for n in again.notes), again.notes
    files = [p for p, _ in SRC.folder._scan_image_folder(folder)[1]]  # the store's order is the scan's
    i = files.index(str(target))
    assert torch.equal(again.train.store.x[i], new) and torch.equal(first.train.store.x[i], old)
    _assert_same(_batches(D.load_data(_cfg(folder, False), CPU)), _batches(again))

    st = os.stat(target)  # only the modification time changes: decoded again
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = D.load_data(_cfg(folder, True), CPU)
    assert any(n.startswith("decoded 36 images") for n in touched.notes), touched.notes
    _image(folder / "class2" / "99.png", 8, 4242)  # a new file
    added = D.load_data(_cfg(folder, True), CPU)
    assert any(n.startswith("decoded 37 images") for n in added.notes), added.notes
    assert len(K.entries()) == 4  # stale entries are never found again; `nnctl cache clear` frees them


# --- 3: two processes fill one cache at once ---------------------------------------------------------

_FILLER = r"""
import hashlib, json, sys, time
sys.path.insert(0, {root!r})
from nnctl.config import loader as C
from nnctl.data import loading as D, store as S
import torch
slow = S.decode_image
def decode(*a, **k):
    time.sleep(0.02)  # a fill long enough for the other process to arrive in the middle of it
    return slow(*a, **k)
S.decode_image = decode
cfg = C.from_dict({cfg!r})[0]
while time.time() < {start!r}:
    time.sleep(0.005)
bundle = D.load_data(cfg, torch.device("cpu"))
x = bundle.train.store.x
print(json.dumps({{"sha": hashlib.sha256(x.numpy().tobytes()).hexdigest(), "notes": bundle.notes}}))
"""


def test_two_processes_filling_one_cache_end_with_one_valid_entry(folder, tmp_path):
    d = make(model={"input_shape": [3, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 3}}]},
             data={"source": "image_folder", "root": str(folder), "image_size": [8, 8], "cache": True,
                   "num_workers": 0}, train={"batch_size": 8})
    script = _FILLER.format(root=str(ROOT), cfg=d, start=time.time() + 4.0)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0]["sha"] == outs[1]["sha"]
    notes = [n for o in outs for n in o["notes"]]
    assert sum(n.startswith("decoded 36 images") for n in notes) == 1, notes  # one built, the other waited
    assert sum(n.startswith("using decoded cache") for n in notes) == 1, notes
    entries = K.entries(verify=True)
    assert [e.status for e in entries] == ["valid"]
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(f"{entries[0].key}.{s}" for s in ("json", "lock", "u8"))
    fresh = D.load_data(_cfg(folder, False), CPU).train.store
    SRC.folder._decode_all(fresh, 0)
    import hashlib

    assert hashlib.sha256(fresh.x.numpy().tobytes()).hexdigest() == outs[0]["sha"]


# --- 4: a corrupt cache is detected, reported, rebuilt, never used -----------------------------------

def _flip(data: Path, head: Path) -> None:
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


def _truncate(data: Path, head: Path) -> None:
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 5)


def _garbage_header(data: Path, head: Path) -> None:
    head.write_bytes(b"\x00{not json")


def _forged_header(data: Path, head: Path) -> None:
    h = json.loads(head.read_text())
    h["shape"][0] = 35  # a header that no longer describes the data
    head.write_text(json.dumps(h))


def _missing_data(data: Path, head: Path) -> None:
    data.unlink()


@pytest.mark.parametrize("damage", [_flip, _truncate, _garbage_header, _forged_header, _missing_data])
def test_a_corrupt_cache_is_detected_reported_and_rebuilt(folder, damage):
    fresh = _batches(D.load_data(_cfg(folder, False), CPU))
    D.load_data(_cfg(folder, True), CPU)
    (entry,) = K.entries()
    damage(entry.path, entry.path.with_suffix(".json"))
    again = D.load_data(_cfg(folder, True), CPU)
    corrupt = [n for n in again.notes if "was corrupt" in n]
    assert len(corrupt) == 1 and entry.key in corrupt[0] and corrupt[0].endswith(": rebuilt"), again.notes
    assert any(n.startswith("decoded 36 images") for n in again.notes)
    _assert_same(fresh, _batches(again))  # the damaged bytes were never used
    assert [e.status for e in K.entries(verify=True)] == ["valid"]


def test_a_large_entry_is_sampled_but_a_changed_data_file_is_hashed_in_full(folder, monkeypatch):
    """Past FULL_VERIFY_BYTES only 8 chunks are hashed, unless the data file changed since it was written
    (size, mtime, inode): then all of them, so a flipped byte in an unsampled chunk is still found."""
    monkeypatch.setattr(K.entry, "FULL_VERIFY_BYTES", 0)
    monkeypatch.setattr(K.entry, "CHUNK_BYTES", 64)  # 6,912 bytes of data: 108 chunks
    D.load_data(_cfg(folder, True), CPU)
    (entry,) = K.entries()
    head = json.loads(entry.path.with_suffix(".json").read_text())
    assert len(head["chunks"]) == 108
    raw = bytearray(entry.path.read_bytes())
    raw[64 * 5 + 3] ^= 1  # chunk 5: not one of the 8 sampled
    entry.path.write_bytes(bytes(raw))
    again = D.load_data(_cfg(folder, True), CPU)
    assert any("was corrupt (checksum mismatch" in n for n in again.notes), again.notes


def test_a_corrupt_image_keeps_its_error_and_leaves_no_entry(folder, tmp_path):
    (folder / "class0" / "05.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UsageError, match=r"cannot read image .*05\.png"):
        D.load_data(_cfg(folder, True), CPU)
    assert [n for n in os.listdir(tmp_path / "cache") if not n.endswith(".lock")] == []


# --- 5: resume stays bit-identical with the cache -----------------------------------------------------

@pytest.mark.parametrize("preload", [True, False])
def test_sigint_then_resume_with_the_cache_is_bit_identical(folder, tmp_path, preload):
    d = make(model={"input_shape": [3, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 16}}, "ReLU",
                                                         {"Dropout": 0.5}, {"Linear": {"out_features": 3}}]},
             data={"source": "image_folder", "root": str(folder), "image_size": [8, 8], "cache": True,
                   "preload": preload, "num_workers": 0},
             train={"epochs": 2, "batch_size": 8})
    straight, _ = _fit(d, tmp_path / "straight")
    _fit(d, tmp_path / "cut", stop_at=(1, 1))
    state = CK.load(tmp_path / "cut" / "last.pt")
    assert state["epoch"] == 1 and state["step_in_epoch"] == 1
    resumed, result = _fit(d, tmp_path / "cut", resume=state)
    assert result is not None and len(result.history) == 2
    _assert_equal_states(straight.state_dict(), resumed.state_dict())
    plain = dict(d, data=dict(d["data"], cache=False))
    uncached, _ = _fit(plain, tmp_path / "plain")
    _assert_equal_states(straight.state_dict(), uncached.state_dict())  # the cache changes nothing


# --- 6: nnctl cache info / clear; the config field ----------------------------------------------------

def test_cache_info_and_clear_through_the_cli(folder, tmp_path, cli):
    """The cache commands in process (the CLI's own subprocess tests are elsewhere): info, --json --verify, clear."""
    D.load_data(_cfg(folder, True), CPU)
    (entry,) = K.entries()
    stray = tmp_path / "cache" / (f"{'a' * 64}.u8.tmp-999999-0000")  # what a killed writer leaves
    stray.write_bytes(b"x" * 10)
    env = {"NNCTL_CACHE_DIR": str(tmp_path / "cache")}
    r = _Result(*cli("cache", "info", env=env))
    assert r.returncode == 0, r.stderr
    assert entry.key[:12] in r.stdout and str(folder) in r.stdout and "valid" in r.stdout and "3x8x8" in r.stdout
    assert "partial" in r.stdout
    r = _Result(*cli("cache", "info", "--json", "--verify", env=env))
    info = json.loads(r.stdout)
    assert {e["status"] for e in info["entries"]} == {"valid", "partial (an interrupted fill)"}
    assert [e["verified"] for e in info["entries"] if e["status"] == "valid"] == [True]  # hashed whole
    valid = next(e for e in info["entries"] if e["status"] == "valid")
    assert valid["last_used"][:4].isdigit() and valid["last_used"][10] == "T"  # ISO 8601, as created_at
    r = _Result(*cli("cache", "info", "--verify", env=env))
    assert "valid (verified)" in r.stdout and "each chunk's SHA-256 compared with its header" in r.stdout
    r = _Result(*cli("cache", "clear", env=env))
    assert r.returncode == 2 and r.stderr.strip() == ("error: say which entries to remove: --all for every one, "
                                                      "or --root DIR for those of one image folder")
    r = _Result(*cli("cache", "clear", "--root", str(tmp_path / "elsewhere"), env=env))
    assert r.returncode == 0 and "removed 0 entries" in r.stdout and entry.path.exists()
    r = _Result(*cli("cache", "clear", "--root", str(folder), env=env))
    assert r.returncode == 0 and "removed 1 entry" in r.stdout and not entry.path.exists()
    r = _Result(*cli("cache", "clear", "--all", env=env))
    assert r.returncode == 0 and "removed 1 entry" in r.stdout and not stray.exists()
    r = _Result(*cli("cache", "info", env=env))
    assert r.returncode == 0 and "empty" in r.stdout
    assert os.listdir(tmp_path / "cache") == []


def test_cache_applies_to_image_folder_only():
    """Other sources are whole tensors already: data.cache is refused there, at its YAML line."""
    from nnctl import api

    text = ("model:\n  input_shape: [1, 8, 8]\n  layers: [Flatten, {Linear: {out_features: 10}}]\n"
            "data:\n  source: digits\n  cache: true\n")
    (problem,) = api.check(text)
    assert problem.path == "data.cache" and problem.line == 6 and "image_folder" in problem.message
    assert api.check(text.replace("digits", "image_folder\n  root: x")) == []


def test_a_fill_reports_its_progress(folder):
    """progress_to(callback): (0, N) first, then after each decoded batch, ending at (N, N); a hit reports nothing."""
    seen = []
    with K.progress_to(lambda done, total: seen.append((done, total))):
        D.load_data(_cfg(folder, True), CPU)
        assert seen[0] == (0, 36) and seen[-1] == (36, 36)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        seen.clear()
        D.load_data(_cfg(folder, True), CPU)
    assert seen == []


# --- 7: a folder (or other odd file) where an entry's file belongs ---------------------------------------

@pytest.mark.parametrize("suffix", [".lock", ".json", ".u8"])
def test_a_folder_named_like_an_entry_file_never_breaks_training_or_the_cache_commands(folder, tmp_path, suffix):
    """Training notes it and decodes without the cache; info says unusable; clear removes what it can."""
    fresh = _batches(D.load_data(_cfg(folder, False), CPU))
    D.load_data(_cfg(folder, True), CPU)
    (entry,) = K.entries()
    K.clear(all=True)
    odd = tmp_path / "cache" / f"{entry.key}{suffix}"
    odd.mkdir()
    (odd / "keep").write_text("x")  # not empty: clear cannot remove it
    bundle = D.load_data(_cfg(folder, True), CPU)
    note = [n for n in bundle.notes if "decoding without the cache" in n]
    assert len(note) == 1 and f"{odd.name} is a folder" in note[0], bundle.notes
    _assert_same(fresh, _batches(bundle))
    (e,) = K.entries()
    assert e.status.startswith("unusable:") and "is a folder" in e.status
    done = K.clear(all=True)
    assert done.removed == 0 and [k for k, _ in done.skipped] == [entry.key] and odd.is_dir()
    env = {"NNCTL_CACHE_DIR": str(tmp_path / "cache")}
    r = run_cli("cache", "info", env=env)
    assert r.returncode == 0 and "unusable" in r.stdout, r.stderr
    r = run_cli("cache", "clear", "--all", env=env)
    assert r.returncode == 0, r.stderr
    (odd / "keep").unlink()  # an empty folder is removed
    done = K.clear(all=True)
    assert done.removed == 1 and not done.skipped and os.listdir(tmp_path / "cache") == []


# --- 8: issue 20 --------------------------------------------------------------------------------------

def _bmp_folder(root: Path) -> None:
    """2 classes x 4 BMP images: a BMP's size depends on its dimensions only, so new pixels keep the size."""
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            rng = np.random.default_rng(10 * c + i)
            Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.bmp")


@pytest.mark.parametrize("how", ["cp -p", "os.utime"])
def test_a_same_size_change_with_its_mtime_put_back_is_not_served_from_the_cache(tmp_path, monkeypatch, how):
    """Defect 6: the key held size and mtime only; `cp -p` (or a write and os.utime) of other pixels of the
    same size kept both, and a later run trained on the old pixels. The ctime (and inode) catch it."""
    monkeypatch.setenv("NNCTL_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "bmp"
    _bmp_folder(root)
    target = root / "c0" / "1.bmp"
    D.load_data(_cfg(root, True), CPU)
    old = DEC.decode_image(str(target), "RGB", (8, 8))
    other = tmp_path / "other.bmp"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(other)
    before = os.stat(target)
    assert os.path.getsize(other) == before.st_size
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    if how == "cp -p":
        subprocess.run(["cp", "-p", str(other), str(target)], check=True)
    else:
        target.write_bytes(other.read_bytes())
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(target)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)  # what the old key held
    new = DEC.decode_image(str(target), "RGB", (8, 8))
    assert not torch.equal(old, new) and int(new.max()) == 7
    again = D.load_data(_cfg(root, True), CPU)
    assert any(n.startswith("decoded 8 images") for n in again.notes), again.notes  # before: "using decoded cache"
    files = [p for p, _ in SRC.folder._scan_image_folder(root)[1]]
    assert torch.equal(again.train.store.x[files.index(str(target))], new)
    _assert_same(_batches(D.load_data(_cfg(root, False), CPU)), _batches(again))
    hit = D.load_data(_cfg(root, True), CPU)  # and nothing else changed: a hit
    assert any(n.startswith("using decoded cache") for n in hit.notes), hit.notes


def test_a_fill_starts_past_the_clock_tick_of_the_newest_change():
    """entry.settle: decoding waits until the clock is SETTLE_NS past the newest ctime (a same-tick
    write would keep the ctime), and never waits for a change time from a clock far ahead."""
    now = time.time_ns()
    K.entry.settle(now)
    assert time.time_ns() >= now + K.entry.SETTLE_NS
    start = time.monotonic()
    K.entry.settle(time.time_ns() + 3_600 * 10**9)  # a skewed clock: not waited for
    K.entry.settle(0)
    assert time.monotonic() - start < 0.01


@pytest.mark.slow  # real CLI runs over a hostile header (about 15 s): .ci/run runs the slow group
def test_a_deeply_nested_header_is_corrupt_in_cache_info_and_rebuilt_by_train(folder, tmp_path):
    """Defect 13: a header of 100,000 nested '[' was `internal error: RecursionError` in `nnctl cache info`
    and `nnctl train`; it is a corrupt entry: info says so, train rebuilds it."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({
        "model": {"input_shape": [3, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 3}}]},
        "data": {"source": "image_folder", "root": str(folder), "image_size": [8, 8], "cache": True,
                 "num_workers": 0}, "train": {"batch_size": 8, "epochs": 1}}))
    env = {"NNCTL_CACHE_DIR": str(tmp_path / "cache")}
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "runs" / "a"), env=env)
    assert r.returncode == 0, r.stderr
    (entry,) = K.entries()
    header = entry.path.with_suffix(".json")
    header.write_text("[" * 100_000)
    why = f"unreadable header {header.name}: nested too deeply"
    r = run_cli("cache", "info", "--json", env=env)
    assert r.returncode == 0 and "internal error" not in r.stderr, r.stderr
    assert [e["status"] for e in json.loads(r.stdout)["entries"]] == [f"corrupt: {why}"]
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "runs" / "b"), env=env)
    assert r.returncode == 0 and "internal error" not in r.stderr, r.stderr
    out = " ".join((r.stdout + r.stderr).split())
    assert f"{entry.key}.u8 was corrupt ({why}): rebuilt" in out, out
    assert [e.status for e in K.entries(verify=True)] == ["valid"]


def test_no_room_says_the_margin_and_never_zero_for_a_need(folder, tmp_path, monkeypatch):
    """Defect 19: "(0 MiB needed, 3 MiB free)": the need is rounded up, the free space down, and the
    margin the check keeps free is said, so the numbers add up."""
    from nnctl.data.cache import fill

    free = 3 << 20
    monkeypatch.setattr(fill.shutil, "disk_usage", lambda d: namedtuple("U", "total used free")(free, 0, free))
    bundle = D.load_data(_cfg(folder, True), CPU)
    need = 36 * 3 * 8 * 8  # 6,912 bytes: 6.75 KiB
    assert need + K.entry.FREE_MARGIN > free
    assert (f"not enough room for the decoded cache (6.8 KiB needed and 64.0 MiB kept free, 3.0 MiB free in "
            f"{tmp_path / 'cache'}): decoding without the cache") in bundle.notes, bundle.notes
    assert fill._bytes(2**20 + 1, up=True) == "1.1 MiB" and fill._bytes(2**21 - 1, up=False) == "1.9 MiB"
    assert fill._bytes(1, up=True) == "1 byte" and fill._bytes(1536) == "1.5 KiB"


def _signal_during_fills(tmp_path: Path, tries: list[tuple[signal.Signals, float]]) -> list[str]:
    """Defect 12: `nnctl train` with data.cache, a fill with decode workers (PARALLEL_FROM images or more),
    the signal sent to the process group (as Ctrl-C does) `delay` seconds after the fill's temporary file
    appears (the workers start right after it). Every try: exit 128 + signal, status interrupted, one line
    on stderr (no traceback, no "DataLoader worker ... stopped"), no worker left, no temporary file left."""
    root = tmp_path / "many"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(K.entry.PARALLEL_FROM // 2 + 100):
            _image(root / f"c{c}" / f"{i:03d}.png", 32, 1000 * c + i)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({
        "model": {"input_shape": [3, 16, 16], "layers": ["Flatten", {"Linear": {"out_features": 2}}]},
        "data": {"source": "image_folder", "root": str(root), "image_size": [16, 16], "cache": True,
                 "preload": False, "num_workers": 0}, "train": {"batch_size": 32, "epochs": 1}}))
    failures = []
    for t, (sig, delay) in enumerate(tries):
        cache, run = tmp_path / f"cache{t}", tmp_path / "runs" / f"t{t}"
        env = dict(os.environ, NNCTL_CACHE_DIR=str(cache), PYTHONWARNINGS="ignore")
        p = subprocess.Popen([sys.executable, "-m", "nnctl", "train", str(cfg), "--out", str(run)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline and not (
                cache.is_dir() and any(".u8.tmp-" in n for n in os.listdir(cache))):
            time.sleep(0.001)
        time.sleep(delay)
        sent = time.monotonic()
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        _, err = p.communicate(timeout=120)
        took = time.monotonic() - sent
        left = subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True, check=False).stdout.split()
        status = json.loads((run / "status.json").read_text()) if (run / "status.json").exists() else {}
        temps = [n for n in os.listdir(cache) if ".tmp-" in n] if cache.is_dir() else []
        ok = (p.returncode == 128 + sig and status.get("state") == "interrupted" and "Traceback" not in err
              and "DataLoader worker" not in err and len(err.strip().splitlines()) <= 2 and took < 20
              and not left and not temps)
        if not ok:
            failures.append(f"{sig.name} +{delay:.3f}s: exit {p.returncode}, state {status.get('state')}, "
                            f"{took:.1f}s, left {left} {temps}: {err[-600:]}")
    return failures


_MOMENTS = [0.0, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15]


@pytest.mark.slow  # signals to real processes during a fill (about 14 s): .ci/run runs the slow group
def test_a_signal_while_the_decode_workers_start_is_a_clean_interruption(tmp_path):
    tries = [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.005), (signal.SIGINT, 0.02), (signal.SIGTERM, 0.08)]
    assert _signal_during_fills(tmp_path, tries) == []


@pytest.mark.slow
def test_a_signal_at_many_moments_of_the_fill_is_a_clean_interruption(tmp_path):
    tries = [(sig, m) for m in _MOMENTS for sig in (signal.SIGINT, signal.SIGTERM)] * 2
    assert _signal_during_fills(tmp_path, tries) == []


def test_a_header_whose_image_count_disagrees_with_its_shape_is_corrupt(folder):
    """A header saying "images": 12 over a shape of 24 was listed as valid with 12 images by `cache info
    --verify` while training used 24 (the outside pass, D5): the count shown must be the count used."""
    D.load_data(_cfg(folder, True), CPU)
    (entry,) = K.entries()
    header = entry.path.with_suffix(".json")
    head = json.loads(header.read_text())
    assert head["images"] == head["shape"][0]
    head["images"] = head["shape"][0] // 2
    header.write_text(json.dumps(head))
    (listed,) = K.entries(verify=True)
    assert listed.status != "valid", listed
    again = D.load_data(_cfg(folder, True), CPU)
    assert any("was corrupt" in n for n in again.notes), again.notes
    assert [e.status for e in K.entries(verify=True)] == ["valid"]


def test_an_entry_of_a_folder_that_changed_since_is_listed_as_superseded(folder):
    """After a file of the folder changed, the next run decodes a new entry; the old one is intact but no
    run reads it again: `cache info` said "valid" for both (the new-user pass), now "superseded by KEY"."""
    D.load_data(_cfg(folder, True, True, 0), CPU)
    old = K.entries()[0]
    image = next(folder.rglob("*.png"))
    image.write_bytes(image.read_bytes())  # the same bytes, written again: a new ctime, so a new key
    D.load_data(_cfg(folder, True, True, 0), CPU)
    listed = {e.key: e.status for e in K.entries()}
    new = next(k for k in listed if k != old.key)
    assert listed == {new: "valid", old.key: f"superseded by {new[:12]} (the folder changed since)"}

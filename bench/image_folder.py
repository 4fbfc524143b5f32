"""nnctl on a folder of PNG/JPEG files against torchvision ImageFolder + transforms.v2 + DataLoader.

    python bench/image_folder.py            # the measurement (about 5-8 minutes on 2 cores)
    python bench/image_folder.py --tiny     # tiny sizes, one run: checks that it works

The folders are generated once (half PNG, half JPEG, smooth random images, 10 classes)
under ~/.cache/nnctl-bench/ (the tiny one in a temporary folder), and read from the page
cache by every variant alike. Every variant trains the same small CNN (seeded, Adam, fp32,
the same torch threads) for 2 epochs with the same batch size, image size, resize and
normalisation (fixed mean and std, so no side computes statistics):

* torchvision: ``ImageFolder`` + ``v2.Compose([ToImage(), Resize(antialias=True),
  ToDtype(float32, scale=True), Normalize])`` + ``DataLoader(shuffle=True)`` with
  ``num_workers`` 0, 2 and the core count (persistent workers; ``pin_memory`` on CUDA only);
* nnctl (``nnctl.prepare`` + ``nnctl.fit``, no run folder): without the cache (the folder is
  decoded into memory at start-up by 2 DataLoader workers, then preloaded), with a cold
  cache (the entry is removed before each run, so the run decodes into it), and with a warm
  cache (a later run: the memory-mapped entry is read, nothing is decoded); and streamed
  (``data.preload: false``, as a folder larger than memory is: 2 DataLoader workers), without
  the cache (every image decoded every epoch) and with a warm cache (workers index the
  memory-mapped entry).

Torch runs 1 thread on both sides unless --threads says otherwise: with DataLoader
workers beside it, 2 OpenMP threads on 2 cores oversubscribe and make every epoch time
erratic (5-20x on a loaded machine), which would measure the scheduler, not the data path.

Timed from before the dataset is made (after imports): the time to the first optimizer
step, the first epoch (start-up included), and the second epoch alone. Variants run in
rounds, interleaved in alternating order; the tables give medians. Goals (issue 14): nnctl's
first epoch <= 1.0x the best DataLoader's; with the cache, later epochs and later runs
(warm cache, first epoch) <= 0.2x.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common

EPOCHS = 2
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def model_layers() -> list:
    """A small CNN (a short experiment): the data path, not the model, decides the epoch time."""
    return [{"Conv2d": [3, 8, 3, 2, 1]}, "ReLU", {"Conv2d": [8, 16, 3, 2, 1]}, "ReLU",
            {"AdaptiveAvgPool2d": 4}, "Flatten", {"Linear": [256, 10]}]


# --- the folder ---------------------------------------------------------------------------------

def generate(root: Path, count: int, size: int, classes: int = 10) -> Path:
    """count images (size x size, half PNG, half JPEG) in `classes` class folders; written once."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for c in range(classes):
        (tmp / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        c = i % classes
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # smooth, so that the files compress as photos do
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3)), 0, 255)
        img = Image.fromarray(arr.astype(np.uint8))
        name = tmp / f"class{c:02d}" / f"{i:06d}.{'png' if i % 2 else 'jpg'}"
        img.save(name, quality=90) if i % 2 == 0 else img.save(name)
    (tmp / ".complete").write_text("ok\n")
    os.replace(tmp, root)
    print(f"generated {count:,} files of {size}x{size} in {root} ({time.perf_counter() - t0:.1f}s)",
          file=sys.stderr, flush=True)
    return root


# --- the two sides --------------------------------------------------------------------------------

def _timings(t0: float, first_step: float, ends: list[float], starts: list[float]) -> dict:
    return {"first step": first_step - t0, "first epoch": ends[0] - t0, "later epoch": ends[1] - starts[1]}


def run_torchvision(root: Path, image: int, batch: int, workers: int) -> dict:
    import torch
    from torchvision import datasets
    from torchvision.transforms import v2

    from nnctl import api

    model = api.build(config(root, image, batch))  # the same seeded weights as nnctl's
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    transform = v2.Compose([v2.ToImage(), v2.Resize((image, image), antialias=True),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                                         generator=torch.Generator().manual_seed(0))
    first_step, starts, ends = None, [], []
    model.train()
    for _ in range(EPOCHS):
        starts.append(time.perf_counter())
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if first_step is None:
                first_step = time.perf_counter()
        ends.append(time.perf_counter())
    del loader
    return _timings(t0, first_step, ends, starts)


def config(root: Path, image: int, batch: int, cache: bool = False, preload: bool | None = None) -> dict:
    return {
        "name": "bench-image-folder", "seed": 1,
        "model": {"input_shape": [3, image, image], "layers": model_layers()},
        "data": {"source": "image_folder", "root": str(root), "image_size": [image, image], "cache": cache,
                 "val_fraction": 0.0, "normalize": {"mean": MEAN, "std": STD}, "num_workers": 2,
                 "preload": preload},
        "train": {"epochs": EPOCHS, "batch_size": batch, "loss": "cross_entropy",
                  "optimizer": {"Adam": {"lr": 1e-3}}, "device": "cpu"},
    }


def run_nnctl(root: Path, image: int, batch: int, cache: bool, notes: list, preload: bool | None = None) -> dict:
    from nnctl import api

    marks: dict = {"starts": [], "ends": []}

    def on_event(e):
        if e.kind == "step" and "first" not in marks:
            marks["first"] = time.perf_counter()
        elif e.kind == "epoch_start":
            marks["starts"].append(time.perf_counter())
        elif e.kind == "epoch_end":
            marks["ends"].append(time.perf_counter())

    t0 = time.perf_counter()
    prepared = api.prepare(config(root, image, batch, cache, preload))
    notes[:] = prepared.data.notes
    api.fit(prepared, on_event=on_event)
    return _timings(t0, marks["first"], marks["ends"], marks["starts"])


def clear_cache() -> None:
    from nnctl import api

    api.cache_clear(all=True)


# --- the comparison ---------------------------------------------------------------------------------

METRICS = ("first step", "first epoch", "later epoch")


def compare(root: Path, count: int, source_size: int, image: int, batch: int, runs: int, warmup: int) -> list:
    cores = os.cpu_count() or 1
    worker_counts = sorted({0, 2, cores})
    notes: dict[str, list] = {"nnctl": [], "nnctl, cold cache": [], "nnctl, warm cache": [],
                              "nnctl streamed": [], "nnctl streamed, warm cache": []}
    variants = {f"torchvision, {w} workers": (lambda w=w: run_torchvision(root, image, batch, w))
                for w in worker_counts}

    def cold():
        clear_cache()
        return run_nnctl(root, image, batch, True, notes["nnctl, cold cache"])

    variants["nnctl"] = lambda: run_nnctl(root, image, batch, False, notes["nnctl"])
    variants["nnctl, cold cache"] = cold
    variants["nnctl, warm cache"] = lambda: run_nnctl(root, image, batch, True, notes["nnctl, warm cache"])
    # data.preload: false, as for a folder larger than memory: decoded every epoch, or read from the cache
    variants["nnctl streamed"] = lambda: run_nnctl(root, image, batch, False, notes["nnctl streamed"], False)
    variants["nnctl streamed, warm cache"] = lambda: run_nnctl(root, image, batch, True,
                                                               notes["nnctl streamed, warm cache"], False)
    names = list(variants)
    times: dict[str, dict[str, list]] = {n: {m: [] for m in METRICS} for n in names}
    print(f"{count:,} files of {source_size}x{source_size} -> {image}x{image}, batch {batch}", file=sys.stderr,
          flush=True)
    for r in range(warmup + runs):
        order = names if r % 2 == 0 else names[::-1]
        if r % 2:  # the warm runs need an entry: after the cold one
            warm = [n for n in order if n.endswith("warm cache")]
            order = [n for n in order if n not in warm] + warm
        for name in order:
            got = variants[name]()
            if r >= warmup:
                for m in METRICS:
                    times[name][m].append(got[m])
        if r >= warmup:
            print(f"  run {r - warmup + 1}/{runs}: " + "  ".join(
                f"{n} {times[n]['first epoch'][-1]:.2f}s/{times[n]['later epoch'][-1]:.2f}s" for n in names),
                file=sys.stderr, flush=True)
    med = {n: {m: common.median(times[n][m]) for m in METRICS} for n in names}
    tv = [n for n in names if n.startswith("torchvision")]
    best = min(tv, key=lambda n: med[n]["first epoch"] + med[n]["later epoch"])
    rows = []
    for n in names:
        ratio_first = med[n]["first epoch"] / med[best]["first epoch"]
        ratio_later = med[n]["later epoch"] / med[best]["later epoch"]
        goal = ""
        if n in ("nnctl", "nnctl, cold cache", "nnctl streamed"):
            goal = f"first epoch {common.verdict(ratio_first, 1.0)}"
        elif n.endswith("warm cache"):
            goal = (f"later run {common.verdict(ratio_first, 0.2)}; later epochs "
                    f"{common.verdict(ratio_later, 0.2)}")
        elif n == best:
            goal = "the best DataLoader"
        rows.append([f"{count:,} x {source_size}px -> {image}px", n, med[n]["first step"], med[n]["first epoch"],
                     med[n]["later epoch"], f"{count / med[n]['later epoch']:,.0f}", f"{ratio_first:.2f}x",
                     f"{ratio_later:.2f}x", goal])
    for n, ns in notes.items():
        for line in ns:
            print(f"  {n}: note: {line}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], runs=3).parse_args()
    threads = common.setup_threads(args.threads or 1)  # 1 by default: see the module docstring
    common.header("image folders: nnctl (with and without the decoded cache) vs torchvision DataLoader", args.quick)
    runs = 1 if args.quick else args.runs
    warmup = 0 if args.quick else 1
    tmp = tempfile.mkdtemp(prefix="nnctl-bench-") if args.quick else None
    base = Path(tmp) if tmp else Path(os.path.expanduser("~")) / ".cache" / "nnctl-bench"
    os.environ["NNCTL_CACHE_DIR"] = str(base / "decoded")  # never the user's own cache
    cases = [(48, 16, 8, 16)] if args.quick else [(20_000, 32, 32, 128), (5_000, 96, 32, 128)]
    rows = []
    try:
        for count, size, image, batch in cases:
            root = generate(base / f"image_folder-{count}-{size}px", count, size)
            rows += compare(root, count, size, image, batch, runs, warmup)
    finally:
        clear_cache()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    common.table(
        f"image folder, {EPOCHS} epochs, median of {runs} interleaved runs, {threads} threads",
        ["folder", "variant", "first step s", "first epoch s", "later epoch s", "later samples/s",
         "first epoch / best", "later epoch / best", "goal"],
        rows,
        "first step and first epoch: from before the dataset is made (start-up, decoding or reading the "
        "cache included); later epoch: the second epoch alone. / best: against the torchvision DataLoader "
        "with the lowest first + later epoch. nnctl, warm cache = a later run: its first epoch is the "
        "'later runs' goal.")


if __name__ == "__main__":
    main()

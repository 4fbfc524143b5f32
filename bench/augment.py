"""The cost of data.augment per epoch: nnctl's batch augmentation against torchvision's per-sample transforms.

    python bench/augment.py            # the measurement (a few minutes on 2 cores)
    python bench/augment.py --quick    # tiny sizes, one run: checks that it works

Data: 10,000 random uint8 images of 3x32x32 (CIFAR's shape) and labels, in memory. One
epoch of training batches (batch 128, shuffled) is read and finished to normalised float32
on the CPU; no model runs, so the figures are the input pipeline's own cost. Variants:

* floor: nnctl's preloaded Batches without augmentation (what an epoch costs anyway);
* nnctl preloaded: the same Batches with data.augment, vectorised over each batch;
* nnctl streamed: data.preload false, a DataLoader with 2 workers that augment each batch;
* torchvision: transforms.v2 per sample (uint8 in, ToDtype and Normalize last, as its
  docs recommend) in a Dataset + DataLoader, with 0 and with 2 workers.

Two pipelines: the classic CIFAR one, RandomCrop(32, padding=4) + RandomHorizontalFlip,
and the same plus ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4). All variants
run interleaved (A B C ..., then reversed), after one warm-up round; the table gives
medians and the spread.
"""

from __future__ import annotations

import time

import common

PIPELINES = {
    "crop+flip": [{"RandomCrop": {"size": 32, "padding": 4}}, "RandomHorizontalFlip"],
    "crop+flip+jitter": [{"RandomCrop": {"size": 32, "padding": 4}}, "RandomHorizontalFlip",
                         {"ColorJitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4}}],
}
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def torchvision_pipeline(spec: list):
    import torch
    import torchvision.transforms.v2 as T

    steps = []
    for entry in spec:
        name, args = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        steps.append(getattr(T, name)(**args))
    return T.Compose(steps + [T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


class PerSample:
    """A map-style Dataset: one uint8 image, transformed by torchvision, per __getitem__."""

    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), self.y[i]


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], runs=3).parse_args()
    threads = common.setup_threads(args.threads)
    common.header("augmentation cost per epoch", args.quick)

    import torch

    from nnctl.data.augment import pipeline as A
    from nnctl.data import store as D

    n, batch = (256, 128) if args.quick else (10_000, 128)
    runs = 1 if args.quick else args.runs
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    store = D._Store(y=y, sample_shape=(3, 32, 32), x=x, scale=255.0, num_classes=10)
    cpu = torch.device("cpu")
    indices = torch.arange(n)
    loaders = []

    def batches(augment, preload: bool, workers: int = 0):
        b = D.Batches(store, indices, batch, cpu, shuffle=True, seed=0, mean=MEAN, std=STD, target_input=False,
                      noise=0.0, preloaded=preload, num_workers=workers, device_x=x if preload else None,
                      device_y=y if preload else None, augment=augment)
        loaders.append(b)
        return b

    def epoch_of(b):
        state = {"epoch": 0}

        def run() -> float:
            t0 = time.perf_counter()
            count = 0
            for xb, _ in b.epoch(state["epoch"]):
                count += len(xb)
            state["epoch"] += 1
            assert count == n, count
            return time.perf_counter() - t0
        return run

    def torchvision_of(spec, workers: int):
        loader = torch.utils.data.DataLoader(PerSample(x, y, torchvision_pipeline(spec)), batch_size=batch,
                                             shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                                             generator=torch.Generator().manual_seed(0))
        loaders.append(loader)

        def run() -> float:
            t0 = time.perf_counter()
            count = sum(len(xb) for xb, _ in loader)
            assert count == n, count
            return time.perf_counter() - t0
        return run

    rows = []
    for label, spec in PIPELINES.items():
        pipeline = A.build(spec, (3, 32, 32))
        variants = {
            "floor (no augmentation)": epoch_of(batches(None, True)),
            "nnctl preloaded (batch)": epoch_of(batches(pipeline, True)),
            "nnctl streamed, 2 workers (batch)": epoch_of(batches(pipeline, False, 2)),
            "torchvision per sample, 0 workers": torchvision_of(spec, 0),
            "torchvision per sample, 2 workers": torchvision_of(spec, 2),
        }
        print(f"{label}: {pipeline.describe()}", flush=True)
        times = common.interleaved(variants, runs)
        med = {k: common.median(v) for k, v in times.items()}
        floor = med["floor (no augmentation)"]
        best_tv = min(med["torchvision per sample, 0 workers"], med["torchvision per sample, 2 workers"])
        for name, t in med.items():
            extra = t - floor if not name.startswith("floor") else 0.0
            rows.append([label, name, t, common.spread(times[name]), extra, n / t,
                         f"{best_tv / t:.1f}x" if not name.startswith("floor") else ""])
    common.table(f"Augmentation cost per epoch ({n:,} uint8 3x32x32 images, batch {batch}, CPU, "
                 f"{threads} threads)",
                 ["pipeline", "variant", "epoch s (median)", "spread", "augmentation s", "images/s",
                  "best torchvision / this"], rows,
                 note=f"{runs} interleaved runs after one warm-up; augmentation s = the epoch minus the floor; "
                      "no model runs (the input pipeline only)")


if __name__ == "__main__":
    main()

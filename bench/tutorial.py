"""nnctl against the training loop most users write: a PIL Dataset, ToTensor, Normalize, DataLoader.

    python bench/tutorial.py            # the measurement (a few minutes on 2 cores)
    python bench/tutorial.py --quick    # tiny sizes, one run: checks that it works

The tutorial side is torchvision's MNIST pattern: uint8 28x28 images held in a tensor,
each sample made into a PIL image in __getitem__ (Image.fromarray(img.numpy(), mode="L"),
as torchvision.datasets.MNIST does), then ToTensor() and Normalize((0.1307,), (0.3081,)),
fed by a DataLoader(batch_size=64, shuffle=True) with num_workers 0 and 2 (both are
timed; the ratio is against the faster), and the pytorch/examples training loop
(zero_grad, forward, loss, backward, step; loss.item() every 10 batches, as its logging does).

nnctl gets the same images as a `tensors` .pt file whose float x is already scaled and
normalised as ToTensor + Normalize would (data.normalize: false), preloaded; its
epoch is nnctl.api.fit (the loop, nothing written). Reading the file (load_data)
is set-up, timed separately and shown under the table. Only the epoch is compared.

Goal on the CPU: nnctl epoch time <= 0.5x the tutorial loop's for the MLP, <= 1.0x for the CNN.
The CNN uses 2,000 samples instead of 20,000 so that a run takes seconds on 2 cores.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import common


class TutorialMNIST:
    """torchvision.datasets.MNIST's __getitem__, over in-memory uint8 images."""

    def __init__(self, data, targets, transform):
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        img, target = self.data[index], int(self.targets[index])
        img = _fromarray(img.numpy(), "L")
        return self.transform(img), target


def _fromarray(arr, mode):
    try:  # torchvision's own wrapper (Pillow >= 11.3 deprecates the mode argument)
        from torchvision.utils import _Image_fromarray

        return _Image_fromarray(arr, mode=mode)
    except ImportError:
        from PIL import Image

        return Image.fromarray(arr, mode=mode)


def tutorial_epoch(model, loader, optimizer, loss_fn) -> float:
    model.train()
    t0 = time.perf_counter()
    for batch_idx, (data, target) in enumerate(loader):
        optimizer.zero_grad()
        output = model(data)
        loss = loss_fn(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % 10 == 0:
            loss.item()
    return time.perf_counter() - t0


def compare(model_name: str, size: int, batch: int, runs: int, tmp: Path, workers: list[int]) -> tuple[list, str]:
    import torch
    from torchvision import transforms

    import dataclasses

    from nnctl import api

    x_u8, y = common.mnist_like(size)
    path = common.write_tensors_file(tmp / f"{model_name}-{size}.pt", x_u8, y)
    data = {"source": "tensors", "path": str(path), "normalize": False, "val_fraction": 0.0}
    d = common.config_dict(model_name, data, batch)
    t0 = time.perf_counter()
    prepared = api.prepare(d, device="cpu")
    load_s = time.perf_counter() - t0
    bundle = prepared.data
    assert bundle.preloaded

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((common.MNIST_MEAN,),
                                                                                (common.MNIST_STD,))])
    dataset = TutorialMNIST(x_u8, y, transform)
    # one sample through both paths: the tutorial's tensor equals nnctl's (float rounding aside)
    x0, _ = dataset[0]
    assert torch.allclose(x0, bundle.train.store.x[0], atol=1e-5), "the two data paths differ"

    layers, loss, opt = common.MODELS[model_name]
    (opt_name, opt_args), = opt.items()
    loss_fn = torch.nn.CrossEntropyLoss() if loss == "cross_entropy" else torch.nn.NLLLoss()

    def run_nnctl():
        model = api.build(d)
        t0 = time.perf_counter()
        api.fit(dataclasses.replace(prepared, model=model))
        return time.perf_counter() - t0

    def tutorial(nw):
        def run():
            model = api.build(d)                # the same architecture and init
            model = copy.deepcopy(model)
            optimizer = getattr(torch.optim, opt_name)(model.parameters(), **opt_args)
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=nw)
            return tutorial_epoch(model, loader, optimizer, loss_fn)
        return run

    variants = {"nnctl": run_nnctl}
    variants.update({f"tutorial w{nw}": tutorial(nw) for nw in workers})
    print(f"{model_name}: {size:,} samples, batch {batch}", flush=True)
    times = common.interleaved(variants, runs, warmup=0 if runs == 1 else 1)
    a = common.median(times["nnctl"])
    tut = {k: common.median(v) for k, v in times.items() if k != "nnctl"}
    best_name = min(tut, key=tut.get)
    b = tut[best_name]
    goal = 0.5 if model_name == "mlp" else 1.0
    ratio = a / b
    row = [model_name, f"{size:,}", batch, a] + [tut[f"tutorial w{nw}"] for nw in workers] + [
        best_name.split()[-1].replace("w", "num_workers="), ratio, common.verdict(ratio, goal)]
    return row, f"{model_name}: nnctl load_data (read the .pt file, preload) {load_s:.3f}s, once, not in the epoch"


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    threads = common.setup_threads(args.threads)
    common.header("tutorial: nnctl vs the PIL/ToTensor/Normalize DataLoader loop (CPU)", args.quick)
    runs = 1 if args.quick else args.runs
    cases = [("mlp", 256, 64), ("cnn", 64, 32)] if args.quick else [("mlp", 20_000, 64), ("cnn", 2_000, 64)]
    workers = [0, 2]
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, batch in cases:
            row, note = compare(name, size, batch, runs, Path(tmp), workers)
            rows.append(row)
            notes.append(note)
    common.table(
        f"tutorial, one epoch, median of {runs} interleaved runs, {threads} threads",
        ["model", "samples", "batch", "nnctl s"] + [f"tutorial s (num_workers={nw})" for nw in workers]
        + ["fastest tutorial", "nnctl / tutorial", "goal"],
        rows, "nnctl / tutorial = nnctl s / the fastest tutorial's s (lower is better).\n" + "\n".join(notes))


if __name__ == "__main__":
    main()

"""The parity and tutorial comparisons on a CUDA device, plus bf16, channels_last and compile.

    python bench/gpu.py            # the measurement (about 5 minutes on one H100)
    python bench/gpu.py --quick    # 4,096 samples, one run: checks that it works (under a minute)

Without a CUDA device it prints the reference figures and a "skipped" line and exits 0.

The pytorch/examples MNIST network with Adadelta (lr 1.0) on synthetic 1x28x28 samples
(60,000 by default, as the reference figures), one epoch a run, every variant once a
round, rounds interleaved, after one untimed warm-up round (cuDNN, the caching
allocator and torch.compile settle there). Each variant keeps its model between runs
(a fresh optimizer each run), so compile: true compiles once. Every timed epoch ends
with torch.cuda.synchronize().

- hand loop: the model (a deep copy of nnctl's freshly built one) over GPU-resident
  tensors, indexed by the epoch's permutation, losses kept on the device.
- nnctl: nnctl.api.fit (the loop; nothing written) on data preloaded on the device by
  nnctl.api.prepare; fp32, then train.precision: bf16, channels_last, compile: true.
- TensorDataset + DataLoader: CPU tensors, batch 64, shuffle, .to(device) each batch.
- tutorial: the PIL / ToTensor / Normalize Dataset of bench/tutorial.py, DataLoader
  with num_workers 0 and 4, .to(device) each batch.

Goal: nnctl fp32 within 1.05x of the GPU-resident hand loop at the same batch size.
"""

from __future__ import annotations

import copy
import math
import time
import traceback

import common

REFERENCE = [  # one NVIDIA H100 80GB, PyTorch 2.11, one epoch of 60,000 synthetic 28x28 samples, Adadelta
    ["hand loop, GPU-resident tensors, batch 64", 2.54],
    ["hand loop, GPU-resident tensors, batch 512", 0.29],
    ["TensorDataset + DataLoader, batch 64", 3.19],
    ["Lightning Trainer over that DataLoader, batch 64", 3.36],
    ["PIL/ToTensor/Normalize tutorial loop, batch 64", 13.29],
]


def print_reference() -> None:
    common.table("reference figures (given, not measured here): one NVIDIA H100 80GB, PyTorch 2.11, "
                 "pytorch/examples MNIST network, Adadelta, 60,000 synthetic samples, one epoch",
                 ["loop", "seconds"], REFERENCE)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=None, help="synthetic samples (default 60,000; --quick 4,096)")
    p.add_argument("--device", default="cuda",
                   help="the CUDA device (default cuda); 'cpu' dry-runs this script's logic on the CPU")
    p.add_argument("--no-tutorial", action="store_true", help="leave out the slow PIL tutorial loops")
    args = p.parse_args()
    import torch

    common.header("gpu: nnctl vs hand-written loops on a CUDA device", args.quick)
    dry = args.device == "cpu"
    if not dry and not torch.cuda.is_available():
        print_reference()
        print(f"skipped: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
              "run this on a machine with an NVIDIA GPU")
        return
    import dataclasses

    from nnctl import api

    dev = torch.device(args.device)
    if dry:
        name = "CPU (dry run of the script, not a GPU measurement)"
        sync = lambda: None
    else:
        torch.cuda.set_device(dev)
        name = torch.cuda.get_device_name(dev)
        sync = lambda: torch.cuda.synchronize(dev)
        print(f"device: {name}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}\n", flush=True)
    runs = 1 if args.quick else args.runs
    n = args.samples or (4096 if args.quick else 60_000)

    bundles, cfgs = {}, {}

    def cfg_for(batch, **train_opts):
        key = (batch, tuple(sorted(train_opts.items())))
        if key not in cfgs:
            cfgs[key] = common.config_dict("cnn", common.synthetic(n), batch, device=str(dev), **train_opts)
        return cfgs[key]

    def bundle_for(batch):
        if batch not in bundles:
            bundles[batch] = api.prepare(cfg_for(batch), device=str(dev))
            assert bundles[batch].data.preloaded, "the data was not preloaded on the GPU"
        return bundles[batch]

    fresh = {}  # batch -> a freshly built model (nnctl's init), copied by every variant of that batch

    def initial(batch):
        if batch not in fresh:
            fresh[batch] = api.build(cfg_for(batch))
        return copy.deepcopy(fresh[batch])

    losses: dict[str, float] = {}

    def nnctl_variant(batch, tag, **opts):
        d = cfg_for(batch, **opts)
        base = bundle_for(batch)
        model = initial(batch)
        cfg, doc = api.load_config(d)
        prepared = dataclasses.replace(base, cfg=cfg, doc=doc, model=model)

        def run():
            sync()
            torch.manual_seed(1234)
            t0 = time.perf_counter()
            res = api.fit(prepared)
            sync()
            took = time.perf_counter() - t0
            losses[tag] = res.history[-1]["train_loss"]
            return took
        return run

    def hand_variant(batch, tag):
        bundle = bundle_for(batch).data
        X, Y = bundle.train.store.x.to(dev), bundle.train.store.y.to(dev)
        model = initial(batch).to(dev)
        loss_fn = torch.nn.NLLLoss()

        def run():
            optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
            model.train()
            sync()
            torch.manual_seed(1234)
            t0 = time.perf_counter()
            order = bundle.train.order(0).to(dev)
            step_losses = []
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                loss = loss_fn(model(X[idx]), Y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step_losses.append(loss.detach())
            mean = float(torch.stack(step_losses).mean())  # the one host sync, as nnctl's
            sync()
            took = time.perf_counter() - t0
            losses[tag] = mean
            return took
        return run

    def loader_variant(batch, loader_fn):
        model = initial(batch).to(dev)
        loss_fn = torch.nn.NLLLoss()

        def run():
            optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
            model.train()
            sync()
            t0 = time.perf_counter()
            for batch_idx, (x, y) in enumerate(loader_fn()):
                x, y = x.to(dev), y.to(dev)
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                if batch_idx % 10 == 0:
                    loss.item()
            sync()
            return time.perf_counter() - t0
        return run

    variants: dict = {}
    variants["hand b64"] = hand_variant(64, "hand b64")
    variants["nnctl b64"] = nnctl_variant(64, "nnctl b64")
    variants["hand b512"] = hand_variant(512, "hand b512")
    variants["nnctl b512"] = nnctl_variant(512, "nnctl b512")
    if dry or torch.cuda.is_bf16_supported():
        variants["nnctl b64 bf16"] = nnctl_variant(64, "bf16", precision="bf16")
    variants["nnctl b64 channels_last"] = nnctl_variant(64, "cl", channels_last=True)
    variants["nnctl b64 compile"] = nnctl_variant(64, "compile", compile=True)
    variants["nnctl b512 bf16+channels_last+compile"] = nnctl_variant(512, "all512", precision="bf16",
                                                                       channels_last=True, compile=True)
    store = bundle_for(64).data.train.store
    tds = torch.utils.data.TensorDataset(store.x, store.y)
    variants["TensorDataset+DataLoader b64"] = loader_variant(
        64, lambda: torch.utils.data.DataLoader(tds, batch_size=64, shuffle=True))
    if not args.no_tutorial:
        from torchvision import transforms

        from tutorial import TutorialMNIST

        x_u8, y_u8 = common.mnist_like(n)
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((common.MNIST_MEAN,), (common.MNIST_STD,))])
        ds = TutorialMNIST(x_u8, y_u8, tf)
        for nw in (0, 4):
            variants[f"tutorial b64 num_workers={nw}"] = loader_variant(
                64, lambda nw=nw: torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=nw))

    failed: dict[str, str] = {}

    def guarded(name, fn):
        def run():
            if name in failed:
                return math.nan
            try:
                return fn()
            except Exception as exc:  # an option this GPU / build cannot run: report it, go on
                failed[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                traceback.print_exc()
                return math.nan
        return run

    print(f"cnn: {n:,} synthetic samples, {len(variants)} variants", flush=True)
    times = common.interleaved({k: guarded(k, v) for k, v in variants.items()}, runs, warmup=1)
    med = {k: common.median([t for t in v if not math.isnan(t)]) for k, v in times.items()}

    rows = []
    for batch in (64, 512):
        h, a = med[f"hand b{batch}"], med[f"nnctl b{batch}"]
        diff = abs(losses.get(f"hand b{batch}", math.nan) - losses.get(f"nnctl b{batch}", math.nan))
        rows.append([batch, h, a, a / h, common.verdict(a / h, 1.05), f"{diff:.1e}"])
    common.table(f"parity on {name}, {n:,} samples, one epoch, median of {runs} "
                 "interleaved runs", ["batch", "hand loop s", "nnctl s", "nnctl / hand", "goal",
                                      "last epoch's mean-loss diff"], rows,
                 "Both over GPU-resident tensors, same init and batch order; GPU kernels are not bit-exact, "
                 "so the losses agree only closely.")
    rows = []
    for name in variants:
        if name.startswith("hand"):
            continue
        batch = 512 if "b512" in name else 64
        ref = med[f"hand b{batch}"]
        rows.append([name, med[name], f"{n / med[name]:,.0f}" if med[name] == med[name] else "n/a",
                     med[name] / ref, failed.get(name, "")])
    common.table("every variant against the hand loop at its batch size (lower is better)",
                 ["variant", "s / epoch", "samples/s", "/ hand loop", "error"], rows)
    print_reference()
    if failed:
        print("failed variants: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))


if __name__ == "__main__":
    main()

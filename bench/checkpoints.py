"""Checkpoint and weight I/O: nnctl.runs.checkpoint / nnctl.use.export vs torch.save / torch.load / safetensors.

    python bench/checkpoints.py            # the measurement (under a minute)
    python bench/checkpoints.py --quick    # a small model, one run: checks that it works

The state: an MLP 784-2048-1024-10 (3.7M parameters) built by nnctl from a config,
after one Adam step (so the optimizer holds exp_avg and exp_avg_sq: 3x the weights),
in a payload with the fields fit() writes. Pairs, interleaved:

- save:   nnctl.runs.checkpoint.save (SHA-256 digest of the weights, temporary file, fsync, rename)
          vs torch.save of the same dict to the file;
- load:   nnctl.runs.checkpoint.load (zip CRC check, weights_only load, digest check)
          vs torch.load(weights_only=True);
- export: nnctl.use.export.export(..., "safetensors") (CPU copies + metadata + atomic write)
          vs safetensors.torch.save_file of the state_dict;
- weights load: safetensors.torch.load_file of nnctl's export vs torch.load(weights_only=True)
          of a plain state_dict .pt.

Files live in one temporary folder, so reads come from the page cache.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import common


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], runs=9).parse_args()
    threads = common.setup_threads(args.threads)
    common.header("checkpoints: nnctl save/load/export vs torch.save/torch.load/safetensors", args.quick)
    import torch
    from safetensors.torch import load_file, save_file

    from nnctl import api
    from nnctl.runs import checkpoint
    from nnctl.config import schema as config
    from nnctl.use import export

    runs = 1 if args.quick else args.runs
    hidden = [64, 32] if args.quick else [2048, 1024]
    layers = ["Flatten", {"Linear": [784, hidden[0]]}, "ReLU", {"Linear": [hidden[0], hidden[1]]}, "ReLU",
              {"Linear": [hidden[1], 10]}]
    d = common.config_dict("mlp", common.synthetic(64))
    d["model"]["layers"] = layers
    cfg, doc = api.load_config(d)
    model = api.build(d)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 1, 28, 28)).sum().backward()
    opt.step()
    payload = checkpoint.make_payload(
        "last", config.resolved(cfg), model.state_dict(), optimizer=opt.state_dict(), epoch=1, global_step=1,
        rng=checkpoint.rng_state(), best={"metric": "train_loss", "mode": "min", "value": 1.0, "epoch": 1},
        history=[{"epoch": 1, "train_loss": 1.0}], input_shape=[1, 28, 28])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nn_ckpt, pt_ckpt = tmp / "nnctl.pt", tmp / "plain.pt"
        st_nnctl, st_plain, pt_weights = tmp / "nnctl.safetensors", tmp / "plain.safetensors", tmp / "weights.pt"

        def t(fn):
            def run():
                t0 = time.perf_counter()
                fn()
                return time.perf_counter() - t0
            return run

        def torch_save_fsync():
            with open(pt_ckpt, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())

        pairs = [
            ("save a checkpoint", {
                "nnctl.runs.checkpoint.save": t(lambda: checkpoint.save(nn_ckpt, payload)),
                "torch.save": t(lambda: torch.save(payload, pt_ckpt)),
                "torch.save + fsync": t(torch_save_fsync),
                "(nnctl's SHA-256 digest alone)": t(lambda: checkpoint.tensor_digest(payload["model"])),
            }),
            ("load a checkpoint", {
                "nnctl.runs.checkpoint.load": t(lambda: checkpoint.load(nn_ckpt)),
                "torch.load(weights_only=True)": t(lambda: torch.load(pt_ckpt, weights_only=True)),
            }),
            ("export weights", {
                "nnctl.use.export.export safetensors": t(lambda: export.export(payload, None, "safetensors",
                                                                               str(st_nnctl))),
                "safetensors save_file": t(lambda: save_file(model.state_dict(), str(st_plain))),
            }),
            ("load weights", {
                "load_file(nnctl export)": t(lambda: load_file(str(st_nnctl))),
                "torch.load(state_dict .pt)": t(lambda: torch.load(pt_weights, weights_only=True)),
            }),
        ]
        torch.save(payload, pt_ckpt)
        checkpoint.save(nn_ckpt, payload)
        export.export(payload, None, "safetensors", str(st_nnctl))
        torch.save(model.state_dict(), pt_weights)
        sizes = {"nnctl.runs.checkpoint.save": nn_ckpt, "torch.save": pt_ckpt, "torch.save + fsync": pt_ckpt,
                 "nnctl.use.export.export safetensors": st_nnctl, "safetensors save_file": st_plain}
        for what, variants in pairs:
            print(what, flush=True)
            times = common.interleaved(variants, runs, warmup=0 if runs == 1 else 1)
            names = list(variants)
            base = common.median(times[names[1]])
            for i, name in enumerate(names):
                m = common.median(times[name])
                size = f"{sizes[name].stat().st_size / 2**20:.1f}" if name in sizes else ""
                rows.append([what if i == 0 else "", f"`{name}`", m * 1000, size,
                             f"{m / base:.2f}x" if i != 1 else "1 (reference)"])
    common.table(f"checkpoint I/O, {params / 1e6:.1f}M parameters + Adam state, median of {runs} interleaved "
                 f"runs, {threads} threads",
                 ["operation", "how", "median ms", "file MiB", "vs plain torch"], rows,
                 "Ratios are against the second row of each operation (the plain PyTorch / safetensors call).")


if __name__ == "__main__":
    main()

"""Wall time from process start to a trained, checkpointed model: `nnctl train` vs a Lightning Trainer script.

    pip install lightning                     # for this benchmark only; not an nnctl dependency
    python bench/lightning_vs_nnctl.py        # the measurement (a few minutes on 2 cores)
    python bench/lightning_vs_nnctl.py --quick

Both sides are fresh subprocesses (timed from fork to exit) that read the same `tensors`
.pt file (float x, already normalised), train the same model with the same optimizer,
batch size and epochs, with no validation split, on the CPU, and write a checkpoint:

- nnctl: `nnctl train CONFIG --out DIR` (it also writes metrics.csv and curves.png).
- Lightning: a LightningModule around the same nn.Sequential, a DataLoader over a
  TensorDataset (batch 64, shuffle), `Trainer(max_epochs=E, accelerator="cpu", devices=1,
  logger=CSVLogger, enable_progress_bar=False)`, whose default ModelCheckpoint writes the
  checkpoint; train_loss is logged per epoch, as nnctl logs it. The progress bar is off
  because nnctl's is off when its output is piped, as here.

Goal: nnctl <= 0.8x Lightning's wall time. Without lightning installed this prints why and exits 0.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import common
import overhead

LIGHTNING_SCRIPT = r'''
import json, sys
import torch
from torch import nn
import lightning as L
from lightning.pytorch.loggers import CSVLogger

args = json.loads(sys.argv[1])
torch.manual_seed(args["seed"])
MLP = lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
CNN = lambda: nn.Sequential(
    nn.Conv2d(1, 32, 3, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
    nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10), nn.LogSoftmax(dim=1))


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = MLP() if args["model"] == "mlp" else CNN()
        self.loss = nn.CrossEntropyLoss() if args["model"] == "mlp" else nn.NLLLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        if args["model"] == "mlp":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.Adadelta(self.parameters(), lr=1.0)


d = torch.load(args["data"], weights_only=True)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(d["x"], d["y"]), batch_size=args["batch"],
                                     shuffle=True)
trainer = L.Trainer(max_epochs=args["epochs"], accelerator="cpu", devices=1, default_root_dir=args["out"],
                    logger=CSVLogger(args["out"]), enable_progress_bar=False)
trainer.fit(Net(), loader)
assert trainer.checkpoint_callback.best_model_path or list(__import__("pathlib").Path(args["out"]).rglob("*.ckpt"))
'''

# the floor: what PyTorch alone costs for the same work (import, model, optimizer, the epochs, a checkpoint):
# bench/overhead.py's hand-written script, which also clocks its phases
HAND_SCRIPT = overhead.HAND_CHILD


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    common.header("Lightning: process start to a trained, checkpointed model (CPU)", args.quick)
    if importlib.util.find_spec("lightning") is None:
        print("skipped: lightning is not installed (pip install lightning); it is not an nnctl dependency")
        return
    import yaml

    runs = 1 if args.quick else args.runs
    cases = [("mlp", 256, 1)] if args.quick else [("mlp", 20_000, 3), ("cnn", 2_000, 1)]
    env = None
    if args.threads:
        import os

        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        script = tmp / "lightning_train.py"
        script.write_text(LIGHTNING_SCRIPT)
        hand_script = tmp / "hand_train.py"
        hand_script.write_text(HAND_SCRIPT)
        for name, size, epochs in cases:
            x_u8, y = common.mnist_like(size)
            data_path = common.write_tensors_file(tmp / f"{name}.pt", x_u8, y)
            cfg = common.config_dict(name, {"source": "tensors", "path": str(data_path), "normalize": False,
                                            "val_fraction": 0.0}, 64, epochs)
            cfg_path = tmp / f"{name}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            counter = {"n": 0}

            def out_dir(side):
                counter["n"] += 1
                return tmp / f"{name}-{side}-{counter['n']}"

            def run_nnctl():
                out = out_dir("nnctl")
                took = common.wall(common.nnctl_exe() + ["train", str(cfg_path), "--out", str(out)], env=env, cwd=tmp)
                assert (out / "last.pt").exists(), "nnctl wrote no checkpoint"
                return took

            def run_lightning():
                out = out_dir("lightning")
                spec = json.dumps({"model": name, "data": str(data_path), "epochs": epochs, "batch": 64,
                                   "out": str(out), "seed": 1})
                took = common.wall([sys.executable, str(script), spec], env=env, cwd=tmp)
                assert list(out.rglob("*.ckpt")), "Lightning wrote no checkpoint"
                return took

            def run_hand():
                out = out_dir("hand")
                spec = json.dumps({"model": name, "data": str(data_path), "epochs": epochs, "batch": 64,
                                   "out": str(out), "seed": 1})
                took = common.wall([sys.executable, str(hand_script), repr(time.time()), spec], env=env, cwd=tmp)
                assert Path(str(out) + ".pt").exists(), "the hand-written script wrote no checkpoint"
                return took

            print(f"{name}: {size:,} samples, {epochs} epoch(s), batch 64", flush=True)
            times = common.interleaved({"nnctl": run_nnctl, "lightning": run_lightning, "hand": run_hand}, runs,
                                       warmup=0 if runs == 1 else 1)
            a, b, h = (common.median(times[k]) for k in ("nnctl", "lightning", "hand"))
            rows.append([name, f"{size:,}", epochs, a, common.spread(times["nnctl"]), b,
                         common.spread(times["lightning"]), h, a / b, h / b, common.verdict(a / b, 0.8)])
    import lightning

    common.table(f"process start to checkpointed model, median of {runs} interleaved runs "
                 f"(lightning {lightning.__version__})",
                 ["model", "samples", "epochs", "nnctl train s", "nnctl range", "Lightning s", "Lightning range",
                  "hand-written s", "nnctl / Lightning", "hand-written / Lightning", "goal"], rows,
                 "Wall time of each subprocess, fork to exit; lower is better. hand-written: the same epochs in a "
                 "plain PyTorch script (no validation, no progress, one torch.save): the floor.")


if __name__ == "__main__":
    main()

"""nnctl's training path against a hand-written PyTorch loop on the CPU.

    python bench/parity.py            # the measurement (about 1-2 minutes on 2 cores)
    python bench/parity.py --quick    # tiny sizes, one run: checks that it works

Both sides train the same freshly built model (the hand side gets a deep copy of the
model nnctl.api.build made), over the same preloaded tensors, in the same batch order
(nnctl's Batches.order for the epoch), with the same optimizer, loss, precision (fp32)
and torch threads, in one process. Only the epoch is timed: nnctl.api.fit without a run
folder (nothing written; no validation split) against the loop below. The global RNG is
reseeded before each side, so Dropout draws the same masks and the losses must agree.
Goal: nnctl throughput >= 0.97x the hand loop's, with equal losses (to 5 decimals).
"""

from __future__ import annotations

import copy
import tempfile

import common


def hand_epoch(model, X, Y, order, batch_size, optimizer, loss_fn):
    """The loop a careful PyTorch user writes over preloaded tensors."""
    model.train()
    losses = []
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        x, y = X[idx], Y[idx]
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def compare(model_name: str, size: int, batch: int, runs: int, tmp: str) -> list:
    import time

    import torch
    import dataclasses

    from nnctl import api

    d = common.config_dict(model_name, common.synthetic(size), batch)
    prepared = api.prepare(d, device="cpu")       # the public API: config -> model + data on the device
    bundle = prepared.data
    X, Y = bundle.train.store.x, bundle.train.store.y   # the very tensors nnctl batches from
    state: dict = {"diff_loss": 0.0, "diff_weight": 0.0, "diff_mean": 0.0}

    def before_round():
        model = api.build(d)                       # seeded: the same init every round
        state["nnctl_model"], state["hand_model"] = model, copy.deepcopy(model)

    def run_nnctl():
        model = state["nnctl_model"]
        seen = {}

        def on_event(e):
            if e.kind == "step":
                seen["sums"] = e.sums

        torch.manual_seed(1234)
        t0 = time.perf_counter()
        res = api.fit(dataclasses.replace(prepared, model=model), on_event=on_event)  # nothing written
        took = time.perf_counter() - t0
        state["nnctl_losses"] = torch.stack(seen["sums"].losses)
        state["nnctl_mean"] = res.history[-1]["train_loss"]
        return took

    def run_hand():
        model = state["hand_model"]
        layers, loss, opt = common.MODELS[model_name]
        (opt_name, opt_args), = opt.items()
        optimizer = getattr(torch.optim, opt_name)(model.parameters(), **opt_args)
        loss_fn = torch.nn.CrossEntropyLoss() if loss == "cross_entropy" else torch.nn.NLLLoss()
        torch.manual_seed(1234)
        t0 = time.perf_counter()
        order = bundle.train.order(0)  # the epoch's shuffle: a randperm, as a hand loop draws one
        losses = hand_epoch(model, X, Y, order, batch, optimizer, loss_fn)
        took = time.perf_counter() - t0
        state["hand_losses"] = torch.stack(losses)
        sizes = torch.tensor([min(batch, len(order) - i) for i in range(0, len(order), batch)], dtype=torch.float64)
        state["hand_mean"] = float((state["hand_losses"].double() * sizes).sum() / sizes.sum())
        return took

    def after_round():
        hand, ref = state.pop("hand_model").state_dict(), state.pop("nnctl_model").state_dict()
        state["diff_loss"] = max(state["diff_loss"], float((state["hand_losses"] - state["nnctl_losses"]).abs().max()))
        state["diff_mean"] = max(state["diff_mean"], abs(state["hand_mean"] - state["nnctl_mean"]))
        state["diff_weight"] = max(state["diff_weight"], max(float((v - ref[k]).abs().max()) for k, v in hand.items()))

    print(f"{model_name}: {size:,} samples, batch {batch}", flush=True)
    times = common.interleaved({"nnctl": run_nnctl, "hand": run_hand}, runs, warmup=0 if runs == 1 else 1,
                               before_round=before_round, after_round=after_round)
    a, b = common.median(times["nnctl"]), common.median(times["hand"])
    ratio = b / a  # nnctl throughput relative to the hand loop's
    equal = state["diff_loss"] < 5e-6
    return [model_name, f"{size:,}", batch, a, b, f"{size / a:,.0f}", f"{size / b:,.0f}", ratio,
            common.verdict(ratio, 0.97, lower_is_better=False),
            f"{state['diff_loss']:.1e}" + ("" if equal else " (DIFFERENT)"), f"{state['diff_weight']:.1e}"]


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], runs=7).parse_args()
    threads = common.setup_threads(args.threads)
    common.header("parity: nnctl.api.fit vs a hand-written loop (CPU, fp32)", args.quick)
    runs = 1 if args.quick else args.runs
    cases = [("mlp", 256, 64), ("cnn", 64, 32)] if args.quick else [("mlp", 20_000, 64), ("cnn", 2_000, 64)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, batch in cases:
            rows.append(compare(name, size, batch, runs, tmp))
    common.table(
        f"parity, one epoch, median of {runs} interleaved runs, {threads} threads",
        ["model", "samples", "batch", "nnctl s", "hand s", "nnctl samples/s", "hand samples/s",
         "throughput nnctl/hand", "goal", "max loss diff", "max weight diff"],
        rows,
        "throughput nnctl/hand = hand s / nnctl s. Loss diff: per step, nnctl vs hand, over every run; "
        "weight diff: every parameter after the epoch.")


if __name__ == "__main__":
    main()

"""Serve a trained run whose every forward pass takes SECONDS (the drain test's in-flight requests), through
nnctl.api.serve as `nnctl serve` serves: python serve_slow.py RUN PORT SECONDS. Prints the url when listening."""

import sys
import time

import torch

import nnctl


class Slow(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, seconds: float):
        super().__init__()
        self.inner = inner
        self.seconds = seconds
        self.nnctl_meta = inner.nnctl_meta

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x)


if __name__ == "__main__":
    run, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    model = Slow(nnctl.load(run), seconds)
    served = nnctl.serve(model, port=port, max_batch=1, drain_timeout=20,
                         on_listening=lambda url, p: print(url, flush=True))
    print(f"stopped by {served.stopped_by}: {served.answered} answered", flush=True)

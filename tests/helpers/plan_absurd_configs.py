"""Plan configs with absurd sizes in a fresh process and measure the peak RSS this costs.

Usage: python tests/helpers/plan_absurd_configs.py CASES.json

CASES.json holds {"base": [config, ...], "cases": {name: config, ...}}: the "base" configs warm
up the code paths first. Prints one JSON line: {"growth_kib": peak RSS growth while planning the
cases, "results": {name: "ACCEPTED" or the first problem, formatted}}.
"""

from __future__ import annotations

import json
import resource
import sys

from nnctl.config import loader as C
from nnctl.model import plan as M
from nnctl.optim import optimizers as T
from nnctl.errors import ConfigError


def attempt(d: dict) -> None:
    try:
        cfg, doc = C.from_dict(d)
        M.plan(cfg, doc)
        T.validate(cfg, doc)
    except ConfigError:
        pass


def outcome(d: dict) -> str:
    try:
        cfg, doc = C.from_dict(d)
        M.plan(cfg, doc)
        probs = T.validate(cfg, doc)
        if probs:
            raise ConfigError(probs)
    except ConfigError as exc:
        return exc.problems[0].format()
    return "ACCEPTED"


def main(argv: list[str]) -> None:
    with open(argv[0]) as fh:
        everything = json.load(fh)
    cases = everything["cases"]
    # warm up the code paths on a small valid config, so imports and caches count in the baseline
    for d in everything["base"]:
        cfg, doc = C.from_dict(d)
        M.plan(cfg, doc)
        T.validate(cfg, doc)
    # a first pass over the cases themselves: planning large layers makes torch import sympy and
    # friends lazily (about 150 MiB of modules, once); that is not an allocation for the model
    for d in cases.values():
        attempt(d)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {name: outcome(d) for name, d in cases.items()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kib": peak - base, "results": out}))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Every rank of a distributed run trains the same thing: the same resolved config and the same data.

Machines are started one by one, each with its own command line and its own copy of the config and
the data, so one of them can hold another config (an edited file, another ``--set``) or other data
(a folder copied half-way). DDP would not notice: every rank would train, the gradients would be
averaged, and the run would be neither config's. So, once the process group is up and before
anything is claimed or trained, every rank sends rank 0's peers a small dict: its host, a digest of
its resolved config less the options that may differ from machine to machine (``PER_HOST``) and the
fingerprint of its data (``nnctl.data.loading.data_fingerprint``: from the listing or the bytes,
never a decode). A difference is a UsageError (exit 2) raised on every rank, naming the ranks and
what differs.
"""

from __future__ import annotations

import hashlib
import json
import socket
from typing import Any

from nnctl.config import schema as C
from nnctl.data import loading as D
from nnctl.errors import UsageError
from nnctl.training.distributed import Dist

# resolved-config keys that may differ between machines: where the data lies (its identity is the
# fingerprint's), how it is read, and this machine's device and threads
PER_HOST = frozenset({
    "train.device", "train.threads", "data.num_workers", "data.cache", "data.download",
    "data.root", "data.path", "data.val_root", "data.test_root",
})
SHOWN = 4  # differences named for one rank


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A resolved config as {dotted key: leaf value}, list items as key[i]."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, item in enumerate(value):
            out.update(flat(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def shared_config(cfg) -> dict[str, Any]:
    """The resolved config as every rank must hold it: flat, less PER_HOST."""
    return {k: v for k, v in flat(C.resolved(cfg)).items() if k not in PER_HOST}


def identity(cfg) -> tuple[dict, BaseException | None]:
    """(what this rank sends: host, config digest, data fingerprint; the error reading the data raised)."""
    text = json.dumps(shared_config(cfg), sort_keys=True, default=str)
    mine = {"host": socket.gethostname(), "config": hashlib.sha256(text.encode()).hexdigest()}
    try:
        mine["data"] = D.data_fingerprint(cfg)
        return mine, None
    except Exception as exc:  # every rank learns it, and none waits for this one in a collective
        mine["data"] = {"error": " ".join(str(exc).split())[:300]}
        return mine, exc


def check_same_run(cfg, dist: Dist) -> None:
    """Every rank calls this (collectives): a UsageError on every rank when one holds another config or
    other data than rank 0; a rank that cannot read its data re-raises its own error."""
    if not dist.enabled:
        return
    mine, error = identity(cfg)
    ranks = dist.gather(mine)
    if error is not None:
        raise error
    unreadable = [f"rank {r} ({x['host']}) cannot read its data: {x['data']['error']}"
                  for r, x in enumerate(ranks) if "error" in x["data"]]
    if unreadable:
        raise UsageError("; ".join(unreadable))
    configs = dist.gather(shared_config(cfg)) if any(x["config"] != ranks[0]["config"] for x in ranks) else None
    problems = []
    for r, x in enumerate(ranks[1:], start=1):
        if configs is not None and x["config"] != ranks[0]["config"]:
            problems.append(f"rank {r} (host {x['host']}) trains another config: "
                            f"{config_differences(configs[r], configs[0])} on rank 0")
        elif x["data"] != ranks[0]["data"]:
            problems.append(f"rank {r}'s data (host {x['host']}) differs: "
                            f"{data_differences(x['data'], ranks[0]['data'])} on rank 0")
    if problems:
        raise UsageError("the processes of this run do not train the same thing: " + "; ".join(problems)
                         + f" (rank 0: host {ranks[0]['host']}); give every machine the same config, "
                           "--set options and data")


def _shown(value: Any) -> str:
    return "absent" if value is _ABSENT else json.dumps(value, default=str)


_ABSENT = object()


def config_differences(theirs: dict, zeros: dict) -> str:
    """'train.epochs 3 vs 5, ...': each differing key, its value on that rank vs rank 0's."""
    keys = [k for k in list(zeros) + [k for k in theirs if k not in zeros]
            if theirs.get(k, _ABSENT) != zeros.get(k, _ABSENT)]
    text = ", ".join(f"{k} {_shown(theirs.get(k, _ABSENT))} vs {_shown(zeros.get(k, _ABSENT))}"
                     for k in keys[:SHOWN])
    return text + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def data_differences(theirs: dict, zeros: dict) -> str:
    """The fingerprints' difference in words (that rank's vs rank 0's): sample counts, samples per class,
    else the samples themselves; an image folder's val_root / test_root apart."""
    parts = []
    if theirs.get("samples") != zeros.get("samples"):
        parts.append(f"{theirs.get('samples', 0):,} samples vs {zeros.get('samples', 0):,}")
    a, b = list(theirs.get("per_class") or []), list(zeros.get("per_class") or [])
    if a and b and a != b:
        width = max(len(a), len(b))
        a, b = a + [0] * (width - len(a)), b + [0] * (width - len(b))
        diffs = [f"class {i}: {x:,} vs {y:,}" for i, (x, y) in enumerate(zip(a, b)) if x != y]
        parts.append(", ".join(diffs[:SHOWN]) + (f" and {len(diffs) - SHOWN} more" if len(diffs) > SHOWN else ""))
    if not parts and theirs.get("digest") != zeros.get("digest"):
        parts.append(f"the same {theirs.get('samples', 0):,} samples in number, but not the same samples "
                     f"(digest {theirs.get('digest')} vs {zeros.get('digest')})")
    for key in sorted(k for k in set(theirs) | set(zeros) if isinstance(theirs.get(k, zeros.get(k)), dict)):
        x, y = theirs.get(key), zeros.get(key)
        if x != y:
            parts.append(f"data.{key}: " + (data_differences(x, y) if isinstance(x, dict) and isinstance(y, dict)
                                            else "none on one of them"))
    return "; ".join(parts)

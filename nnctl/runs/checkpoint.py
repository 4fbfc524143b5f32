"""Checkpoints: self-describing, safe to load, written atomically.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts
(no pickled classes), so ``torch.load(path, weights_only=True)`` reads it, in
nnctl or in a plain script. Like nanoGPT's, it carries what rebuilds the model:
the resolved config. Fields (``FORMAT_VERSION`` 1):

- ``format`` ("nnctl.checkpoint"), ``format_version``, ``nnctl_version``, ``kind`` (last | best | epoch | freeze)
- ``config``: the resolved config (every default filled in)
- ``model``: the model's ``state_dict``
- ``optimizer``, ``scheduler``, ``scaler``: their ``state_dict`` (None when absent)
- ``epoch`` (completed epochs), ``step_in_epoch`` (steps done in the current epoch, 0 at a boundary),
  ``global_step``
- ``rng``: ``torch`` CPU generator state and ``cuda`` states (one a device)
- ``best``: ``{"metric", "mode", "value", "epoch"}``; ``history``: one dict an epoch
- ``freeze``: the freeze selection (names of frozen parameters and the options), or None
- ``partial``: the running sums of an interrupted epoch, or None
- ``digest``: SHA-256 over the model tensors' bytes, checked on load, so flipped
  bits in the weights are reported instead of silently loaded
- ``state_digest``: SHA-256 over everything else as loaded (optimizer, scheduler, RNG,
  history, ...); both digests are required on load
- ``rng_ranks``, ``world_size``, ``bad_epochs``, ``input_shape``, ``source``
- ``preprocessing``: the preprocessing record (``nnctl.preprocess``): what turns raw inputs
  into the model's inputs and outputs into answers (None in checkpoints written before it)
- ``loss_reference``: the first step's loss, the scale of the divergence rule
- ``stopping``: early stopping's reference ``{"metric", "mode", "value", "epoch"}`` (its own
  metric and min_delta; ``bad_epochs`` counts the epochs since it last improved), or None
- ``stopped_early``: ``{"epoch", "reason"}`` when early stopping ended the run at this epoch (the run is
  finished: ``--resume`` refuses it, as it refuses a run that ran all its epochs), else None; a checkpoint
  written before this field has none, and a resume decides from ``bad_epochs`` and the patience

``FIELDS`` below lists the optional fields with their types; ``make_payload`` is the one
place a payload is assembled, and ``load`` checks every field's type.

Writing is atomic: a temporary file in the same folder, flushed and fsynced,
then renamed over the target, then the folder fsynced. A crash at any instant
leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

from typing import Any
import torch
from nnctl.errors import NnctlError
import hashlib
import io
import json
import os
import stat
import zipfile
from safetensors.torch import save as safetensors_save
from nnctl._version import __version__
from nnctl.errors import CheckpointError
from nnctl.files import WriteError, atomic_write, deferred_signals  # noqa: F401  (re-exported)
from nnctl.runs.rundir import RunDir
from nnctl.files import read_input

def _is_checkpoint_file(path) -> bool:
    """A regular file (not a link) in torch's zip format: what nnctl's epoch checkpoints are."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return False
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def prune_epoch_checkpoints(run_dir, keep: int | None) -> list[str]:
    """Remove all but the ``keep`` newest epoch-N.pt checkpoints of a run folder (None: keep all).

    Only regular files in torch's checkpoint format are counted and removed: a folder, a link or a
    file that is not a checkpoint is never touched. A failure to remove one is not an error (the
    epoch is saved). Returns the removed names.
    """
    if not keep:
        return []
    found = [path for _, path in RunDir(run_dir).epoch_checkpoints() if _is_checkpoint_file(path)]
    removed = []
    for path in found[:-keep]:
        try:
            os.unlink(path)
            removed.append(path.name)
        except OSError:
            pass
    return removed

FORMAT = "nnctl.checkpoint"
FORMAT_VERSION = 1


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state_dict, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        h.update(key.encode())
        if not isinstance(t, torch.Tensor):
            h.update(repr(t).encode())
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return h.hexdigest()


def state_digest(obj: Any) -> str:
    """SHA-256 over a whole checkpoint payload: every tensor's bytes and every plain value, in order.

    The zip records' CRCs do not cover everything a reader trusts: a flipped bit in the
    central directory's attributes (say, the "is a folder" flag of one record) passes
    Python's zipfile checks, yet makes PyTorch's zip reader hand back other bytes for that
    record. Hashing what ``torch.load`` returned, not the file's bytes, catches any such
    difference, in the optimizer and RNG states as well as in the weights.
    """
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
        elif isinstance(x, dict):
            h.update(f"D{len(x)}:".encode())
            for k, v in x.items():
                feed(k)
                feed(v)
        elif isinstance(x, list | tuple):
            h.update(f"{type(x).__name__[0]}{len(x)}:".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return h.hexdigest()


DIGEST_KEYS = ("digest", "state_digest")

# optional fields: name -> (default, accepted types); checked on load, filled in by make_payload
FIELDS: dict[str, tuple[Any, tuple]] = {
    "optimizer": (None, (dict, type(None))),
    "scheduler": (None, (dict, type(None))),
    "scaler": (None, (dict, type(None))),
    "epoch": (0, (int,)),
    "step_in_epoch": (0, (int,)),
    "global_step": (0, (int,)),
    "rng": (None, (dict, type(None))),
    "rng_ranks": (None, (list, type(None))),
    "world_size": (1, (int,)),
    "best": (None, (dict, type(None))),
    "bad_epochs": (0, (int,)),
    "history": (list, (list,)),
    "freeze": (None, (dict, type(None))),
    "partial": (None, (dict, type(None))),
    "input_shape": (None, (list, type(None))),
    "source": (None, (str, type(None))),
    "preprocessing": (None, (dict, type(None))),  # nnctl.preprocess.Preprocessing.to_dict()
    "loss_reference": (None, (float, int, type(None))),  # the first step's loss: the divergence rule's scale
    "stopping": (None, (dict, type(None))),  # early stopping's reference: {"metric", "mode", "value", "epoch"}
    "stopped_early": (None, (dict, type(None))),  # {"epoch", "reason"}: early stopping ended the run here
}


def make_payload(kind: str, config: dict, model: dict[str, torch.Tensor], **fields: Any) -> dict[str, Any]:
    """The one place a checkpoint's fields are put together (the schema is this module's docstring).

    ``kind`` is last, best or freeze; ``fields`` are the optional training-state fields
    (optimizer, scheduler, scaler, epoch, step_in_epoch, global_step, rng, rng_ranks,
    world_size, best, bad_epochs, history, freeze, partial, input_shape, source). Unknown
    field names are refused, so a misspelt field cannot silently go missing.
    """
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(f"unknown checkpoint field(s): {', '.join(sorted(unknown))}")
    payload: dict[str, Any] = {"kind": kind, "config": config, "model": model}
    for key, (default, _) in FIELDS.items():
        payload[key] = fields.get(key, default() if callable(default) else default)
    if payload.get("input_shape") is None:
        payload["input_shape"] = list((config.get("model") or {}).get("input_shape") or [])
    return payload


def save(path: str | os.PathLike, payload: dict[str, Any], inputs: tuple | list = (), run_file: bool = True,
         input_dirs: tuple | list = ()) -> None:
    """Write a checkpoint atomically (never over ``inputs`` nor inside ``input_dirs``: ``files.check_output``).
    I/O failures (disk full, read-only) raise NnctlError."""
    payload = dict(payload)
    payload.setdefault("format", FORMAT)
    payload.setdefault("format_version", FORMAT_VERSION)
    payload.setdefault("nnctl_version", __version__)
    payload["digest"] = tensor_digest(payload["model"])
    payload.pop("state_digest", None)
    payload["state_digest"] = state_digest({k: v for k, v in payload.items() if k not in DIGEST_KEYS})
    try:
        atomic_write(path, lambda fh: torch.save(payload, fh), inputs, run_file=run_file, input_dirs=input_dirs)
    except OSError as exc:
        previous = "; the previous checkpoint is intact" if os.path.exists(path) else ""
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise WriteError(exc.errno, f"could not write checkpoint {path}: {reason}{previous}") from None


# --- the checkpoint's weights as a file of their own (nnctl export-weights; MLflow's artifact) ------

def plain_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """CPU, contiguous, unshared copies of a state_dict; and the (name, first name) pairs that shared storage."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    shared = []
    for key, t in state.items():
        t = t.detach()
        ident = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) \
            if t.numel() else None
        if ident is not None and ident in seen:
            shared.append((key, seen[ident]))
        elif ident is not None:
            seen[ident] = key
        t = t.to("cpu").contiguous()
        out[key] = t.clone() if ident is not None and seen[ident] != key else t  # copy only what is shared
    return out, shared


def weights_metadata(state: dict, which: str, source: str) -> dict[str, str]:
    """The metadata an exported weights file carries: the config, input shape, source, epoch, preprocessing."""
    cfg = state.get("config") or {}
    return {
        "format": "nnctl.weights",
        "nnctl_version": __version__,
        "config": json.dumps(cfg, sort_keys=False),
        "input_shape": json.dumps(state.get("input_shape") or cfg.get("model", {}).get("input_shape")),
        "source": os.path.basename(source),
        "which": which,
        "epoch": str(state.get("epoch")),
        # the preprocessing record (nnctl.preprocess): what turns raw inputs into this model's inputs
        "preprocessing": json.dumps(state.get("preprocessing")),
    }


def safetensors_bytes(weights: dict[str, torch.Tensor], meta: dict[str, str], shared: list[tuple[str, str]]) -> bytes:
    """plain_state's weights as a safetensors file, with the metadata and the pairs that shared storage."""
    return safetensors_save(weights, metadata={**meta, "shared": json.dumps(shared)})


def weights_file(state: dict, which: str, source: str) -> bytes:
    """A loaded checkpoint's weights as ``nnctl export-weights`` writes them (safetensors), in memory."""
    weights, shared = plain_state(state["model"])
    return safetensors_bytes(weights, weights_metadata(state, which, source), shared)


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(weights_only=True) with every failure turned into a CheckpointError."""

    path = str(path)
    data = read_input(path, "checkpoint file", CheckpointError)  # never blocks on a FIFO
    if not data:
        raise CheckpointError(f"{path}: the file is empty (a checkpoint cut off while being written?)")
    if data[:2] != b"PK" and data[:1] != b"\x80":  # neither torch's zip format nor its legacy pickle format
        raise CheckpointError(f"{path}: not a torch checkpoint file ({_what_file(data)})")
    if data[:2] == b"PK":
        try:  # CRC-check every record: catches truncation and flipped bytes anywhere
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise CheckpointError(f"{path}: corrupt (record {bad} fails its CRC check)")
        except NnctlError:  # a CheckpointError, or a stop signal (Interrupted) while reading: not corruption
            raise
        except Exception as exc:  # BadZipFile, and for mangled headers UnicodeDecodeError, NotImplementedError,
            # OverflowError, struct.error, zlib.error, EOFError, ...: every one means a damaged file
            text = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"{path}: corrupt or truncated ({type(exc).__name__}: {text})") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except NnctlError:  # SIGTERM while unpickling: the file is not to blame
        raise
    except Exception as exc:  # UnpicklingError for pickled classes, RuntimeError for bad zips, ...
        text = " ".join(str(exc).split())
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise CheckpointError(f"{path}: refused: the file holds pickled Python objects, which could run "
                                  "code; only plain tensors and containers are loaded "
                                  f"(torch.load weights_only=True: {text[:200]})") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or not a torch file): {text[:200]}") from None


def _what_file(data: bytes) -> str:
    """A short guess at what a file that is not a checkpoint is, for the message."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "a PNG image"
    if data[:3] == b"\xff\xd8\xff":
        return "a JPEG image"
    if len(data) > 8 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data):
        return "a .safetensors file: weights without nnctl's config; use it with nnctl train CONFIG --init"
    if data[:1] in (b"{", b"[") or data.lstrip()[:1] in (b"{", b"#") or b": " in data[:200]:
        return "it looks like text (JSON or YAML)"
    return f"it starts with bytes {data[:8]!r}"


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load and verify an nnctl checkpoint (format, version, digest)."""
    state = read_state(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an nnctl checkpoint (no 'format: {FORMAT}' field); "
                              "plain state_dicts and .safetensors files are weights: use `nnctl train --init`")
    version = state.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: corrupt checkpoint: format version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is newer than this nnctl "
                              f"understands ({FORMAT_VERSION}); upgrade nnctl")
    for key in ("config", "model"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path}: corrupt checkpoint: '{key}' is missing or not a mapping")
    bad = [k for k, v in state["model"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: corrupt checkpoint: 'model' holds {len(bad)} entries that are not "
                              f"named tensors (first: {str(bad[0])[:60]!r})")
    for key in DIGEST_KEYS:  # every checkpoint nnctl has written carries both
        if not isinstance(state.get(key), str):
            raise CheckpointError(f"{path}: corrupt or altered checkpoint: its '{key}' field is missing, so its "
                                  "contents cannot be verified; refused")
    digest = state["digest"]
    if tensor_digest(state["model"]) != digest:
        raise CheckpointError(f"{path}: corrupt checkpoint: the weights do not match their recorded SHA-256")
    whole = state["state_digest"]
    if state_digest({k: v for k, v in state.items() if k not in DIGEST_KEYS}) != whole:
        raise CheckpointError(f"{path}: corrupt checkpoint: its contents (optimizer, RNG or training state) do "
                              "not match their recorded SHA-256")
    problems = []
    for key, (_, types) in FIELDS.items():
        if key in state and not isinstance(state[key], types):
            problems.append(f"'{key}' is {type(state[key]).__name__}")
        elif key in ("epoch", "step_in_epoch", "global_step", "bad_epochs") and isinstance(state.get(key), int) \
                and (isinstance(state[key], bool) or state[key] < 0):
            problems.append(f"'{key}' is {state[key]!r}")
    if not isinstance(state.get("kind", ""), str):
        problems.append(f"'kind' is {type(state['kind']).__name__}")
    if isinstance(state.get("history"), list) and not all(isinstance(r, dict) for r in state["history"]):
        problems.append("'history' holds entries that are not mappings")
    if problems:
        raise CheckpointError(f"{path}: corrupt checkpoint: fields of the wrong type or value: {'; '.join(problems)}")
    return state




def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | None) -> None:
    if not state:
        return
    if isinstance(state.get("torch"), torch.Tensor):
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])

"""Checkpoints: self-describing, safe to load, written atomically.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts
(no pickled classes), so ``torch.load(path, weights_only=True)`` reads it, in
nnctl or in a plain script. Like nanoGPT's, it carries what rebuilds the model:
the resolved config. Fields (``FORMAT_VERSION`` 1):

- ``format`` ("nnctl.checkpoint"), ``format_version``, ``nnctl_version``, ``kind`` (last | best | freeze)
- ``config``: the resolved config (every default filled in)
- ``model``: the model's ``state_dict``
- ``optimizer``, ``scheduler``, ``scaler``: their ``state_dict`` (None when absent)
- ``epoch`` (completed epochs), ``step_in_epoch`` (steps done in the current epoch, 0 at a boundary),
  ``global_step``
- ``rng``: ``torch`` CPU generator state and ``cuda`` states (one a device)
- ``best``: ``{"metric", "mode", "value", "epoch"}``; ``history``: one dict an epoch
- ``freeze``: the freeze plan (names of frozen parameters and the options), or None
- ``partial``: the running sums of an interrupted epoch, or None
- ``digest``: SHA-256 over the model tensors' bytes, checked on load, so flipped
  bits in the weights are reported instead of silently loaded
- ``state_digest``: SHA-256 over everything else as loaded (optimizer, scheduler, RNG,
  history, ...), checked on load when present (older checkpoints lack it)

Writing is atomic: a temporary file in the same folder, flushed and fsynced,
then renamed over the target, then the folder fsynced. A crash at any instant
leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import CheckpointError, NnctlError

FORMAT = "nnctl.checkpoint"
FORMAT_VERSION = 1
NAMES = {"last": "last.pt", "best": "best.pt"}


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
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
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
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
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


class WriteError(NnctlError, OSError):
    """A file could not be written (disk full, read-only folder, file-size limit): exit 1.

    Both an NnctlError (the CLI prints one line, no traceback) and an OSError (callers
    that catch OSError, such as the optional learning-curve plot, still do).
    """

    reason: str = ""  # the operating system's words, e.g. "No space left on device"

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class _Recording:
    """A file object that remembers the OSError of a failed write (serialisers may hide it)."""

    def __init__(self, fh):
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            n = self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise
        return n

    def __getattr__(self, name):
        return getattr(self._fh, name)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(fileobj) on a temporary file beside path, then rename it into place.

    An I/O failure removes the temporary file, leaves any previous file at path intact
    and raises WriteError naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sink = None
    try:
        with open(tmp, "wb") as fh:
            sink = _Recording(fh)
            write(sink)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        # torch.save reports a failed write (disk full, EFBIG) as a RuntimeError about the zip
        # writer's position; the OSError underneath is the real reason
        cause = exc if isinstance(exc, OSError) else (sink.error if sink is not None else None)
        if cause is not None and not isinstance(exc, WriteError) and not isinstance(exc, KeyboardInterrupt):
            err = WriteError(cause.errno, f"could not write {path}: {cause.strerror or cause}")
            err.reason = cause.strerror or str(cause)
            raise err from None
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems cannot fsync a folder; the rename is still atomic
        pass


def save(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically. I/O failures (disk full, read-only) raise NnctlError."""
    payload = dict(payload)
    payload.setdefault("format", FORMAT)
    payload.setdefault("format_version", FORMAT_VERSION)
    payload.setdefault("nnctl_version", __version__)
    payload["digest"] = tensor_digest(payload["model"])
    payload.pop("state_digest", None)
    payload["state_digest"] = state_digest({k: v for k, v in payload.items() if k not in DIGEST_KEYS})
    try:
        atomic_write(path, lambda fh: torch.save(payload, fh))
    except OSError as exc:
        previous = "; the previous checkpoint is intact" if os.path.exists(path) else ""
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise WriteError(exc.errno, f"could not write checkpoint {path}: {reason}{previous}") from None


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(weights_only=True) with every failure turned into a CheckpointError."""
    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not data:
        raise CheckpointError(f"{path}: the file is empty (a checkpoint cut off while being written?)")
    if data[:2] == b"PK":
        try:  # CRC-check every record: catches truncation and flipped bytes anywhere
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise CheckpointError(f"{path}: corrupt (record {bad} fails its CRC check)")
        except CheckpointError:
            raise
        except Exception as exc:  # BadZipFile, and for mangled headers UnicodeDecodeError, NotImplementedError,
            # OverflowError, struct.error, zlib.error, EOFError, ...: every one means a damaged file
            text = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"{path}: corrupt or truncated ({type(exc).__name__}: {text})") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for pickled classes, RuntimeError for bad zips, ...
        text = " ".join(str(exc).split())
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise CheckpointError(f"{path}: refused: the file holds pickled Python objects, which could run "
                                  "code; only plain tensors and containers are loaded "
                                  f"(torch.load weights_only=True: {text[:200]})") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or not a torch file): {text[:200]}") from None


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load and verify an nnctl checkpoint (format, version, digest)."""
    state = read_state(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an nnctl checkpoint (no 'format: {FORMAT}' field); "
                              "plain state_dicts and .safetensors files are weights: use `nnctl train --init`")
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is newer than this nnctl "
                              f"understands ({FORMAT_VERSION}); upgrade nnctl")
    for key in ("config", "model"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path}: corrupt checkpoint: '{key}' is missing or not a mapping")
    digest = state.get("digest")
    if digest is not None and tensor_digest(state["model"]) != digest:
        raise CheckpointError(f"{path}: corrupt checkpoint: the weights do not match their recorded SHA-256")
    whole = state.get("state_digest")
    if whole is not None and state_digest({k: v for k, v in state.items() if k not in DIGEST_KEYS}) != whole:
        raise CheckpointError(f"{path}: corrupt checkpoint: its contents (optimizer, RNG or training state) do "
                              "not match their recorded SHA-256")
    return state


def resolve(source: str | os.PathLike, which: str = "last") -> Path:
    """A run folder or a checkpoint file -> the checkpoint file."""
    p = Path(source)
    if p.is_dir():
        f = p / NAMES[which]
        if not f.exists():
            raise CheckpointError(f"{p}: no {NAMES[which]} in this folder (is it an nnctl run folder?)")
        return f
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    return p


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

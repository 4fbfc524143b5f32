"""Weights out of nnctl, in the formats the ecosystem reads.

- ``safetensors`` (default): the state_dict, with metadata (format, nnctl version, the
  resolved config as JSON, input shape, source checkpoint, epoch).
- ``pt``: a plain state_dict of CPU tensors; ``torch.load(path, weights_only=True)`` reads it.
- ``npz``: one array a tensor; bfloat16 (which numpy lacks) is widened to float32,
  losslessly, and the original dtypes are listed in the ``__nnctl_meta__`` entry.
- ``onnx`` (the ``onnx`` extra): the model graph with its weights, checked against the
  eager model on random input; the largest absolute difference is reported.

Tied or shared tensors (two names, one storage) are written once per name as
independent copies: every format then loads with a plain ``load_state_dict``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnctl.data.record import Preprocessing
from nnctl.errors import NnctlError, UsageError
from nnctl.files import atomic_write, check_output
from nnctl.runs.rundir import EXPORT, RunDir
from nnctl.runs.checkpoint import plain_state, safetensors_bytes
from nnctl.runs.checkpoint import weights_metadata as metadata

FORMATS = ("safetensors", "pt", "npz", "onnx")
SUFFIX = {"safetensors": ".safetensors", "pt": ".pt", "npz": ".npz", "onnx": ".onnx"}


@dataclass
class ExportResult:
    path: str
    format: str
    tensors: int
    bytes: int
    shared: list[tuple[str, str]] = field(default_factory=list)
    max_abs_diff: float | None = None  # onnx: largest |onnxruntime - eager| on random input
    notes: list[str] = field(default_factory=list)


def default_path(checkpoint: str | os.PathLike, fmt: str) -> Path:
    """Where an export goes without -o: an ``export/`` folder beside the checkpoint, never over an input.

    ``runs/x/best.pt`` -> ``runs/x/export/best.safetensors`` (``.pt``, ``.npz``, ``.onnx``).
    """
    ckpt = Path(checkpoint)
    return RunDir(ckpt.parent).export_dir / (ckpt.stem + SUFFIX[fmt])


def export(state: dict, model: nn.Module | None, fmt: str, out: str, which: str = "last",
           source: str = "", inputs: list | tuple = (), with_preprocess: bool = False,
           input_dirs: list | tuple = ()) -> ExportResult:
    """Write the checkpoint's weights in one format. `model` (with the weights loaded) is needed for onnx.

    The target is refused (exit 2) if it is one of ``inputs``, inside one of ``input_dirs`` (the data
    folders of the run or config read), a file nnctl keeps in a run folder, or anything but a regular file.
    """

    if with_preprocess and fmt != "onnx":
        raise UsageError("--with-preprocess applies to --format onnx (the other formats hold weights only; "
                         "their metadata carries the preprocessing record)")
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    inputs = [i for i in (*inputs, source) if i]
    out_path = Path(out)
    if out_path.parent.name == EXPORT and not out_path.parent.is_dir():
        if out_path.parent.exists() or out_path.parent.is_symlink():
            raise UsageError(f"cannot create the export folder {out_path.parent}: it exists and is not a folder; "
                             "give -o OUT")
        try:
            out_path.parent.mkdir(parents=False, exist_ok=True)
        except OSError as exc:
            raise NnctlError(f"could not create {out_path.parent}: {exc.strerror or exc}") from None
    check_output(out, inputs, what="output", input_dirs=input_dirs)
    weights, shared = plain_state(state["model"])
    meta = metadata(state, which, source)
    notes = [f"{a} shared storage with {b}: written as an independent copy" for a, b in shared]
    path = Path(out)
    try:
        if fmt == "safetensors":
            blob = safetensors_bytes(weights, meta, shared)
            atomic_write(path, lambda fh: fh.write(blob), inputs, input_dirs=input_dirs)
        elif fmt == "pt":
            atomic_write(path, lambda fh: torch.save(weights, fh), inputs, input_dirs=input_dirs)
        elif fmt == "npz":

            arrays = {}
            dtypes = {}
            for key, t in weights.items():
                dtypes[key] = str(t.dtype).replace("torch.", "")
                if t.dtype == torch.bfloat16:
                    t = t.float()
                    notes.append(f"{key}: bfloat16 widened to float32 (numpy has no bfloat16)") if len(notes) < 20 else None
                arrays[key] = t.numpy()
            meta["dtypes"] = json.dumps(dtypes)
            arrays["__nnctl_meta__"] = np.array(json.dumps(meta))
            atomic_write(path, lambda fh: np.savez(fh, **arrays), inputs, input_dirs=input_dirs)
        else:
            return _onnx(model, state, path, weights, shared, meta, with_preprocess, (inputs, input_dirs))
    except OSError as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise NnctlError(f"could not write {path}: {reason}") from None
    return ExportResult(str(path), fmt, len(weights), path.stat().st_size, shared, None, notes)


class WithPreprocess(nn.Module):
    """Raw values in (pixels 0..255, or the source's own uint8 scale), the model's output out."""

    def __init__(self, model: nn.Module, scale: float, mean: list[float] | None, std: list[float] | None,
                 ndim: int):
        super().__init__()
        self.model = model
        self.scale = float(scale)
        shape = (1, -1) + (1,) * (ndim - 1)
        self.register_buffer("mean", torch.tensor(mean or [0.0]).reshape(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std or [1.0]).reshape(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.model((x.float() / self.scale - self.mean) / self.std)


def _onnx(model: nn.Module | None, state: dict, path: Path, weights, shared, meta: dict | None = None,
          with_preprocess: bool = False, reads: tuple = ((), ())) -> ExportResult:
    """``reads``: the command's (inputs, input_dirs), never written over (``files.check_output``)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort  # noqa: F401
    except ImportError:
        raise UsageError("ONNX export needs the onnx extra: pip install 'nnctl[onnx]'") from None
    if model is None:
        raise UsageError("ONNX export needs the model")

    model = model.float().eval().cpu()
    shape = tuple(state.get("input_shape") or state["config"]["model"]["input_shape"])
    notes = []
    if with_preprocess:

        pre = Preprocessing.from_dict(state.get("preprocessing"))
        if pre is None:
            raise UsageError("--with-preprocess needs the checkpoint's preprocessing record, and this checkpoint "
                             "was written before records existed; retrain, or export without it")
        scale = pre.image_scale if pre.is_image else (pre.scale or 1.0)
        model = WithPreprocess(model, scale, pre.mean, pre.std, len(shape)).eval()
        notes.append(f"the graph takes raw values: divided by {scale:g}"
                     + (", then normalised with the recorded mean/std" if pre.mean else ""))
    dummy = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))

    with tempfile.TemporaryDirectory() as scratch:
        onnx_file = Path(scratch) / "model.onnx"
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:  # the torch.export-based exporter (PyTorch's default since 2.9)
                    torch.onnx.export(model, (dummy,), str(onnx_file), input_names=["input"],
                                      output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                      dynamo=True, verbose=False, external_data=False)
                except Exception:  # models torch.export cannot trace: the TorchScript exporter
                    torch.onnx.export(model, (dummy,), str(onnx_file), input_names=["input"],
                                      output_names=["output"], dynamo=False,
                                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        except Exception as exc:
            raise NnctlError(f"ONNX export failed: {' '.join(str(exc).split())[:300]}") from None
        if meta:
            import onnx

            proto = onnx.load(str(onnx_file))
            for key, value in meta.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = f"nnctl.{key}", str(value)
            onnx.save(proto, str(onnx_file))
        atomic_write(path, lambda fh: fh.write(onnx_file.read_bytes()), reads[0], input_dirs=reads[1])
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    diff = float(np.max(np.abs(got - want))) if want.size else 0.0
    return ExportResult(str(path), "onnx", len(weights), path.stat().st_size, shared, diff, notes)

"""Prediction: inputs -> the recorded preprocessing -> batched inference -> answers.

Inputs are image files (PNG, JPEG, BMP, GIF, WebP, TIFF through PIL, decoded by
``nnctl.data.decode.decode_image``, the decoder training uses), folders of them (recursively, sorted, never
following a folder link, ``glob`` to choose), tensors files (``.pt`` read with
weights_only, ``.npz`` without pickle, ``.safetensors``: key ``x``, or the only tensor), and,
from Python, tensors. ``inputs`` is one input (a ``str``, an ``os.PathLike``, a tensor or a
numpy array) or an iterable of them: a path is never iterated character by character.

Scaling (``Preprocessing.from_raw``), the rule training follows:

- an image file's 0..255 pixels are divided by the record's ``image_scale`` (255) only when
  the record is an image source (``color_mode`` L or RGB: digits, mnist, cifar, image_folder);
  for any other record (``tensors``, ``synthetic``, a checkpoint without a record) an image's
  uint8 pixels are raw values like a uint8 tensor's: divided by the record's ``scale``, or 1
  (a ``tensors`` source trains on its values as they are, uint8 included);
- uint8 tensors are raw values, divided by the record's ``scale`` (16 for digits), or 1;
- float tensors are on the model's scale already (float64 and float16 become float32);
- other integer tensors (int64 from ``torch.randint`` without a dtype, ...) and bool are
  refused, per input: their scale is ambiguous. Give uint8 raw values or float32 values.

Shapes: with a record (or a config's ``input_shape``) a tensor is one sample of the input
shape or a batch ``(N, *input_shape)``, and an image must decode to the input shape
(``[C, H, W]``, C = 1 or 3). Without an input shape (a plain ``nn.Module``) a tensor of 2 or
more dimensions is a batch as given, a 1-dimension tensor one sample, and an image cannot be
an input (the colour mode and size are unknown).

Every input that cannot be used (missing, unreadable, a FIFO or other non-regular file, a
dangling link, inside a folder too; the wrong shape or type; no samples; non-finite values)
becomes one row with the reason; the others are still predicted.

Memory: a tensors file stays one tensor; batches are slices of it, results are kept per
file (top-k as tensors), and a row (``Prediction``) with its ``file.pt[i]`` name is only made
when it is read.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from nnctl.data.record import Preprocessing, missing_note
from nnctl.errors import UsageError
from nnctl.files import json_ready
from nnctl.tasks import Task, loss_name, task_named, task_of_config
from nnctl.training.distributed import select_device
from nnctl.use import source as api
from nnctl.use.inputs import _Group, gather

_ROWS_PER_CHUNK = 65_536  # rows converted to Python lists at a time when iterating


@dataclass(slots=True)
class Prediction:
    """One input's answer: top-k classes with names and probabilities, or regression values."""

    input: str
    classes: list[int] | None = None
    names: list[str] | None = None
    probabilities: list[float] | None = None
    values: list[float] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"input": self.input}
        if self.error is not None:
            d["error"] = self.error
        elif self.classes is not None:
            d.update(classes=self.classes, names=self.names, probabilities=self.probabilities)
        else:
            d["values"] = self.values
        return d


def jsonl_line(row: Prediction) -> str:
    """A row as one line of ``nnctl predict --format jsonl`` (strict JSON, ``files.json_ready``): what
    ``nnctl serve`` answers for the same input, the same bytes."""
    return json.dumps(json_ready(row.to_dict()), allow_nan=False) + "\n"


class Rows(Sequence):
    """The rows of a Predictions, one an input sample, made on demand (a read-only sequence)."""

    def __init__(self, preds: "Predictions"):
        self._p = preds
        self._starts: list[int] = []
        total = 0
        for g in preds._groups:
            self._starts.append(total)
            total += g.n
        self._len = total

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        i = index + self._len if index < 0 else index
        if not 0 <= i < self._len:
            raise IndexError("row index out of range")
        k = bisect.bisect_right(self._starts, i) - 1
        g = self._p._groups[k]
        j = i - self._starts[k]
        return next(self._p._group_rows(g, j, j + 1))

    def __iter__(self) -> Iterator[Prediction]:
        for g in self._p._groups:
            yield from self._p._group_rows(g, 0, g.n)

    def __repr__(self) -> str:
        return f"<{self._len} prediction rows>"


# a sample whose output holds NaN or infinity: no class or value is an answer (the model overflowed on it)
NOT_FINITE = ("the model's output for this sample is not finite (NaN or infinity): its input is probably far outside "
              "the range the model was trained on")


class Predictions:
    """The answers of ``predict``, in input order.

    ``rows`` (a sequence of ``Prediction``, iterate or index it), ``failed`` (the rows with an
    error), ``task`` (an ``nnctl.tasks.Task``, equal to its name: ``"classification"``, ...; how the
    rows answer: top-k classes with probabilities, or ``values``: a sigmoid probability per label for
    multilabel, the raw outputs for regression and reconstruction), ``top_k``, ``notes`` (what was skipped and why), ``files`` (every file
    read or tried, folder contents included, and the data files the model was trained on: what an
    output must never replace), ``input_dirs`` (the folders of that training data: nothing is written
    inside them), ``outputs``
    (the raw model outputs of the predicted samples, in order, or None).
    """

    def __init__(self, groups: list[_Group], task: Task, top_k: int, notes: list[str], files: list[str],
                 class_name: Callable[[int], str]):
        self._groups = groups
        self.task = task
        self.top_k = top_k
        self.notes = notes
        self.files = files
        self.input_dirs: list[str] = []
        self._class_name = class_name
        self.rows = Rows(self)

    def _group_rows(self, g: _Group, start: int, stop: int) -> Iterator[Prediction]:
        if g.error is not None:
            yield Prediction(g.name, error=g.error)
            return
        bad = set(g.bad)
        for a in range(start, stop, _ROWS_PER_CHUNK):
            b = min(stop, a + _ROWS_PER_CHUNK)
            if g.top_i is not None:
                names = [self._class_name(v) for v in range(g.out.shape[1])]
                idx, prob = g.top_i[a:b].tolist(), g.top_p[a:b].tolist()
                for i, (c, p) in enumerate(zip(idx, prob), a):
                    yield Prediction(g.row_name(i), error=NOT_FINITE) if i in bad else \
                        Prediction(g.row_name(i), classes=c, names=[names[v] for v in c], probabilities=p)
            else:
                vals = (g.out if g.values is None else g.values)[a:b].reshape(b - a, -1).tolist()
                for i, v in enumerate(vals, a):
                    yield Prediction(g.row_name(i), error=NOT_FINITE) if i in bad else Prediction(g.row_name(i), values=v)

    @property
    def failed(self) -> list[Prediction]:
        """The inputs that could not be used, and the samples whose output is not finite."""
        out = []
        for g in self._groups:
            if g.error is not None:
                out.append(Prediction(g.name, error=g.error))
            out += [Prediction(g.row_name(i), error=NOT_FINITE) for i in g.bad]
        return out

    @property
    def outputs(self) -> torch.Tensor | None:
        outs = [g.out for g in self._groups if g.error is None and g.out is not None]
        return torch.cat(outs) if outs else None

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"<Predictions: {len(self)} rows, {len(self.failed)} failed, task {self.task}>"


# --- predicting ----------------------------------------------------------------------------

def _record_for(model, cfg_dict: dict | None) -> tuple[Preprocessing, Task, list[str]]:
    """The model's preprocessing record and its task: the recorded config decides the task (a record
    of an older nnctl says regression for a multilabel run); the record's name where there is no config."""
    meta = getattr(model, "nnctl_meta", None) or {}
    pre = meta.get("preprocessing")
    notes: list[str] = []
    cfg = meta.get("config") or cfg_dict or {}
    if not isinstance(pre, Preprocessing):
        pre = Preprocessing.from_dict(pre) if isinstance(pre, dict) else None
    task = task_of_config(cfg) if cfg.get("train") is not None or pre is None else task_named(pre.task)
    if pre is None:
        notes.append(missing_note(meta.get("checkpoint") or "this model"))
        shape = list(((cfg.get("model") or {}).get("input_shape")) or [])
        pre = Preprocessing(task=str(task), input_shape=shape, scale=None, image_scale=255.0)
    return pre, task, notes




@dataclass
class Predictor:
    """The model side of prediction: a trained model in eval mode on its device, its preprocessing record, its
    task and loss (how an output becomes an answer). ``predict`` answers through it, and so does ``nnctl serve``
    (its batches mix the samples of several requests: ``forward`` once, then ``deliver`` each request's slice)."""

    model: torch.nn.Module
    pre: Preprocessing
    task: Task
    loss: str
    notes: list[str]
    config: dict
    device: torch.device

    @classmethod
    def load(cls, model_or_run: Any, *, which: str = "best", device: str = "cpu", needs: str = "predict") -> "Predictor":
        """A model (an ``nn.Module``), a run folder or a checkpoint -> its Predictor; a config or a weights-only
        export is refused, saying what ``needs`` (the command) needs."""
        if isinstance(model_or_run, torch.nn.Module):
            model = model_or_run.to(select_device(device)).eval()
        else:
            problem = api.untrained_source_problem(model_or_run, needs)
            if problem is not None:
                raise UsageError(problem)
            model = api.load(model_or_run, which=which, device=device)
        pre, task, notes = _record_for(model, None)
        cfg = (getattr(model, "nnctl_meta", None) or {}).get("config") or {}
        loss = loss_name((cfg.get("train") or {}).get("loss", "cross_entropy"))
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        return cls(model, pre, task, loss, notes, cfg, dev)

    def forward(self, pieces: list[tuple[_Group, int, int]]) -> torch.Tensor:
        """One forward pass over (group, start, stop) slices of the groups' raw samples, scaled by the record
        (``Preprocessing.from_raw``; consecutive slices of one dtype and kind together: it is elementwise, the
        same values as one at a time, in a few tensor operations instead of a few a slice): the outputs,
        float32 on the CPU. Call it under inference_mode."""
        scaled = []
        for (_, image), run in itertools.groupby(pieces, key=lambda p: (p[0].x.dtype, p[0].image)):
            raw = [g.x[a:b] for g, a, b in run]
            scaled.append(self.pre.from_raw((raw[0] if len(raw) == 1 else torch.cat(raw)).to(self.device),
                                            image=image))
        out = self.model(scaled[0] if len(scaled) == 1 else torch.cat(scaled))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().cpu()

    def deliver(self, pieces: list[tuple[_Group, int, int]], out: torch.Tensor, top_k: int) -> None:
        """The outputs of ``forward`` (rows in the pieces' order) back to their groups; a group whose last
        piece this is gets its answers (``_finish``: top-k classes, a sigmoid per label, or the values; the
        groups wholly in this pass together, ``_finish_whole``)."""
        at, whole = 0, []
        for g, a, b in pieces:
            if a == 0 and b == g.n:
                whole.append((g, at, at + b))
            else:
                g.outs.append(out[at:at + b - a])
                if b == g.n:  # the group is complete: keep its results, drop its raw samples
                    _finish(g, self.task, self.loss, top_k)
            at += b - a
        if whole:
            _finish_whole(whole, out, self.task, self.loss, top_k)

    def answers(self, groups: list[_Group], top_k: int, notes: list[str] = (), files: list[str] = ()) -> Predictions:
        return Predictions(groups, self.task, top_k, list(self.notes) + list(notes), list(files), self.pre.class_name)


def predict(model_or_run: Any, inputs: Iterable[Any] | Any, *, which: str = "best", device: str = "cpu",
            batch_size: int = 256, top_k: int = 5, glob: str | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> Predictions:

    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if top_k < 1:
        raise UsageError("--top-k must be at least 1")
    predictor = Predictor.load(model_or_run, which=which, device=device)
    groups, walk_notes, files = gather(inputs, predictor.pre, glob)
    scaled = scale_notes(groups, predictor.pre)  # before the loop: answered groups drop their raw samples
    total = sum(g.n for g in groups if g.error is None)
    done = 0
    with torch.inference_mode():
        for pieces in batches(groups, batch_size):
            out = predictor.forward(pieces)
            predictor.deliver(pieces, out, top_k)
            done += len(out)
            if on_progress is not None:
                on_progress(done, total)
    preds = predictor.answers(groups, top_k, walk_notes + scaled, files)
    data_files, preds.input_dirs = api.record_read_paths(predictor.config)  # the training data: never written over or into
    preds.files.extend(data_files)
    return preds


def scale_notes(groups: list[_Group], pre: Preprocessing, limit: int = 4096) -> list[str]:
    """A note when tensor inputs are far from the training data's scale (issue 24: inputs on another scale
    are answered with confidence, silently): after the record's scaling and normalisation the training data
    has a mean near 0 and a standard deviation near 1; inputs whose mean is beyond 5 or whose deviation is
    beyond 10 (or under 0.05) were most likely not scaled as it was. Looked at on up to ``limit`` samples."""
    if pre.mean is None or pre.std is None:
        return []
    tensors = [g for g in groups if g.error is None and not g.image and g.x is not None]
    if not tensors:
        return []
    with torch.inference_mode():
        x = torch.cat([pre.from_raw(g.x[:limit]).float().flatten() for g in tensors])[: limit * 1024]
    mean, std = float(x.mean()), float(x.std()) if x.numel() > 1 else 0.0
    if abs(mean) <= 5 and 0.05 <= std <= 10:
        return []
    scale = f" (the training data's values were divided by {pre.scale:g})" if pre.scale not in (None, 1, 1.0) else ""
    return [f"{len(tensors)} tensor input{'s' if len(tensors) > 1 else ''}: values far from the training data's: "
            f"after the recorded scaling and normalisation their mean is {mean:.3g} and standard deviation "
            f"{std:.3g}, where the training data's are about 0 and 1; were they scaled as the training data "
            f"was{scale}?"]


def batches(groups: list[_Group], batch_size: int) -> Iterator[list[tuple[_Group, int, int]]]:
    """Batches of at most batch_size samples, as (group, start, stop) slices of the groups' samples."""
    pieces: list[tuple[_Group, int, int]] = []
    size = 0
    for g in groups:
        if g.error is not None:
            continue
        start = 0
        while start < g.n:
            take = min(batch_size - size, g.n - start)
            pieces.append((g, start, start + take))
            size += take
            start += take
            if size == batch_size:
                yield pieces
                pieces, size = [], 0
    if pieces:
        yield pieces


def _finish(g: _Group, task: Task, loss: str, top_k: int) -> None:
    """The group's outputs -> its answers, as the task says (``Task.answer``): the top-k classes with
    their probabilities, a sigmoid probability per label, or the raw values."""
    g.out = g.outs[0] if len(g.outs) == 1 else torch.cat(g.outs)
    g.outs = []
    g.x = None
    finite = torch.isfinite(g.out.reshape(len(g.out), -1)).all(dim=1)
    g.bad = (~finite).nonzero().flatten().tolist()
    if task.answer == "classes" and g.out.dim() == 2:
        probs = g.out.exp() if loss == "nll" else torch.softmax(g.out, dim=1)
        g.top_p, g.top_i = probs.topk(min(top_k, probs.shape[1]), dim=1)
    elif task.answer == "labels":
        g.values = torch.sigmoid(g.out)


def _finish_whole(whole: list[tuple[_Group, int, int]], out: torch.Tensor, task: Task, loss: str, top_k: int) -> None:
    """Groups wholly in one pass's outputs (rows ``start:stop`` each), finished as ``_finish`` finishes each,
    with what does not depend on the other rows done once for the pass (a row's finiteness, softmax and
    top-k: bit for bit the same); the elementwise exp (an ``nll`` model's probabilities) and sigmoid of a row
    can depend on where it lies (vectorised or not), so they stay per group."""
    if task.answer != "classes" or out.dim() != 2:
        for g, start, stop in whole:
            g.outs.append(out[start:stop])
            _finish(g, task, loss, top_k)
        return
    bad = (~torch.isfinite(out).all(dim=1)).nonzero().flatten().tolist()
    k = min(top_k, out.shape[1])
    top = None if loss == "nll" else torch.softmax(out, dim=1).topk(k, dim=1)
    for g, start, stop in whole:
        g.out, g.outs, g.x = out[start:stop], [], None
        g.top_p, g.top_i = g.out.exp().topk(k, dim=1) if top is None else (top[0][start:stop], top[1][start:stop])
        g.bad = [i - start for i in bad if start <= i < stop]

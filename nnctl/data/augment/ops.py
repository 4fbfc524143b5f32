"""Image augmentation of training batches (``data.augment``), vectorised over the batch.

``data.augment`` is a list of torchvision ``transforms.v2`` class names, each alone or
with a mapping of its arguments, applied in order (as ``transforms.v2.Compose`` would)::

    data:
      augment:
        - RandomCrop: {size: 32, padding: 4}
        - RandomHorizontalFlip
        - ColorJitter: {brightness: 0.4, contrast: 0.4, saturation: 0.4}

Decisions (the lead's design, and what was decided while building it):

* **A closed list.** Only the classes in ``SUPPORTED`` can be named, by their exact
  torchvision name; everything else is refused by ``nnctl check`` at its line, with a
  did-you-mean. Argument names and defaults come from
  ``inspect.signature(torchvision.transforms.v2.<Name>)``; the arguments are then
  handed to torchvision's own constructor, so its range checks apply, and nnctl reads
  the normalised values back from the transform object (``ColorJitter(brightness=0.4)``
  -> ``brightness = (0.6, 1.4)``). A few arguments that would change the sample's
  shape or that the batch implementation does not do are refused with the reason
  (``RandomRotation.expand``, ``RandomResizedCrop.antialias``, ``RandomErasing.inplace``,
  ``padding_mode: symmetric``, interpolation other than nearest / bilinear).
* **The pipeline keeps the sample shape.** Validation batches are not augmented, so a
  crop must give the model's ``input_shape`` (``RandomCrop: {size: 32, padding: 4}``
  on 32x32 images, ``RandomResizedCrop`` to the image's own size).
* **Per sample, no Python loop over samples.** ``Augment.__call__(x, generator)`` takes a
  float batch (N, C, H, W) and draws every parameter for all N samples at once as
  tensors of shape [N] (or [N, 10] for the 10 tries of RandomResizedCrop and
  RandomErasing); they are applied with tensor ops: a flat ``gather`` for crops (exact,
  integer offsets), a separable bilinear ``gather`` for resized crops (what
  ``F.interpolate`` computes), ``affine_grid`` + ``grid_sample`` for rotations and affine
  maps (torchvision's own grid and fill formulas, batched), ``torch.where`` masks for
  flips, erasing and grayscale, and per-sample factors for colour.
* **Same distributions as torchvision.** Each parameter is drawn from torchvision's
  distribution for that transform (``make_params`` of v2): integer crop offsets uniform
  over the valid range, RandomResizedCrop's 10 tries with its centre-crop fallback,
  RandomAffine's translation rounded to whole pixels, ColorJitter's random order of its
  four operations (per sample), RandomErasing's 10 tries. Known differences:
  RandomResizedCrop does not antialias when the crop is larger than the output (a
  downscale; torchvision's default antialias=True does); RandomErasing ``value:
  random`` draws its normal noise for the whole image and keeps the erased box.
* **Where it runs.** On ``[0, 1]`` images (uint8 scaled, digits /16), before
  normalisation, as torchvision pipelines run (augment, then Normalize): fills, erasing
  values and ColorJitter's clamping are in pixel units. Preloaded data: on the training
  device, in ``data.Batches._finish``. Streamed data: in the DataLoader workers (the
  batch sampler tags each index list with (epoch, step); ``data._collate`` scales and
  augments there). Training batches only: validation, ``nnctl eval`` and ``predict``
  never augment, and the checkpoint's preprocessing record does not mention it (the
  resolved config does).
* **Randomness from (seed, epoch, step, rank).** A CPU ``torch.Generator`` seeded by
  ``seeds.derive(seed, epoch, step, rank, 0xA06)`` draws the parameters, which then move to
  the batch's device: a resumed run (mid-epoch too) draws the same numbers, the global
  RNG (dropout) is untouched, and the preloaded and streamed paths, on any device, get
  the same parameters (so, on the CPU, identical batches).
* **ColorJitter's hue** converts to HSV and back, once a sample, with nnctl's own batched
  ``_rgb_to_hsv`` / ``_hsv_to_rgb``: torchvision's formulas in the same float operations,
  equal to ``adjust_hue`` bit for bit (tested). torchvision keeps its batched pair private,
  and its public ``adjust_hue`` takes one factor a call: a loop over the samples, 6-7x
  slower on a batch of 128 (measured). Hue costs about 3x brightness, contrast and
  saturation together (25 against 6 ms a batch of 128 3x32x32 images on one CPU thread,
  measured with torchvision's pair, which runs the same operations); leave it out when
  speed matters. Saturation and hue leave one-channel images unchanged, as torchvision does.
* **target: input** (autoencoders, denoisers): the target is the augmented image, and
  ``noise`` is added after augmentation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# --- the batch implementation -----------------------------------------------------------------

def _uniform(g: torch.Generator, shape, lo: float, hi: float) -> Tensor:
    """Uniform in [lo, hi) in float64 (as torch.empty(1).uniform_(lo, hi), per sample)."""
    return torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo


def _randint(g: torch.Generator, high: Tensor) -> Tensor:
    """Uniform integers in [0, high) (high >= 1, a tensor), per element."""
    return (torch.rand(high.shape, generator=g, dtype=torch.float64) * high).floor().long().clamp_max(high - 1)


def _gray(x: Tensor) -> Tensor:
    """torchvision's rgb_to_grayscale of float images: (N, 1, H, W)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _fill_tensor(fill: Any, c: int, x: Tensor) -> Tensor:
    vals = list(fill) if isinstance(fill, list | tuple) else [0.0 if fill is None else float(fill)]
    if len(vals) == 1:
        vals = vals * c
    return torch.tensor(vals, dtype=x.dtype, device=x.device).view(1, c, 1, 1)


def _crop(x: Tensor, top: Tensor, left: Tensor, h: int, w: int) -> Tensor:
    """Per-sample integer crops (N,) of size h x w, as one gather."""
    n, c, hp, wp = x.shape
    rows = top.view(n, 1, 1) + torch.arange(h, device=x.device).view(1, h, 1)
    cols = left.view(n, 1, 1) + torch.arange(w, device=x.device).view(1, 1, w)
    index = (rows * wp + cols).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, hp * wp).gather(2, index).view(n, c, h, w)


def _random_crop(tv, x: Tensor, g: torch.Generator) -> Tensor:
    n, c, h, w = x.shape
    ch, cw = tv.size
    left, right, top, bottom = tv.padding if tv.padding is not None else (0, 0, 0, 0)
    ph, pw = h + top + bottom, w + left + right
    if tv.pad_if_needed:
        if ph < ch:
            diff = ch - ph
            top, bottom, ph = top + diff, bottom + diff, ph + 2 * diff
        if pw < cw:
            diff = cw - pw
            left, right, pw = left + diff, right + diff, pw + 2 * diff
    if ph < ch or pw < cw:
        raise ValueError(f"RandomCrop: the padded image ({ph}x{pw}) is smaller than the crop ({ch}x{cw})")
    if any((left, right, top, bottom)):
        mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[tv.padding_mode]
        fill = tv.fill
        if mode == "constant" and isinstance(fill, tuple | list) and len(set(fill)) > 1:
            padded = F.pad(x, (left, right, top, bottom))
            inside = torch.zeros((1, 1, ph, pw), dtype=torch.bool, device=x.device)
            inside[..., top:top + h, left:left + w] = True
            x = torch.where(inside, padded, _fill_tensor(fill, c, x))
        elif mode == "constant":
            value = float(fill[0] if isinstance(fill, tuple | list) else (fill or 0))
            x = F.pad(x, (left, right, top, bottom), value=value)
        else:
            x = F.pad(x, (left, right, top, bottom), mode=mode)
    tops = _randint(g, torch.full((n,), ph - ch + 1)).to(x.device)
    lefts = _randint(g, torch.full((n,), pw - cw + 1)).to(x.device)
    return _crop(x, tops, lefts, ch, cw)


def _flip(tv, x: Tensor, g: torch.Generator, dim: int) -> Tensor:
    flip = (torch.rand(len(x), generator=g) < tv.p).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(dim), x)


def _first(ok: Tensor) -> tuple[Tensor, Tensor]:
    """The first True of each row of ok (N, tries), and whether there is one."""
    found = ok.any(1)
    return ok.to(torch.int8).argmax(1), found


def _resize_axis(start: Tensor, length: Tensor, out: int, bilinear: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices (i0, i1) and the weight of i1 for resizing [start, start + length) to `out` pixels,
    as F.interpolate computes them (align_corners=False); (N, out) each."""
    scale = (length.to(torch.float32) / out).view(-1, 1)
    dst = torch.arange(out, dtype=torch.float32).view(1, -1)
    if not bilinear:
        i0 = torch.minimum((dst * scale).floor().long(), (length - 1).view(-1, 1))
        return start.view(-1, 1) + i0, start.view(-1, 1) + i0, torch.zeros_like(dst * scale)
    src = (scale * (dst + 0.5) - 0.5).clamp_min(0)
    i0 = src.floor().long()
    i1 = torch.minimum(i0 + 1, (length - 1).view(-1, 1))
    lam = src - i0.to(torch.float32)
    return start.view(-1, 1) + i0, start.view(-1, 1) + i1, lam


def _resized_crop(x: Tensor, top: Tensor, left: Tensor, hs: Tensor, ws: Tensor, oh: int, ow: int,
                  bilinear: bool) -> Tensor:
    """Per-sample crops (top, left, height, width: (N,) CPU int64) resized to oh x ow: separable gathers."""
    n, c, h, w = x.shape
    dev = x.device
    r0, r1, ly = (t.to(dev) for t in _resize_axis(top, hs, oh, bilinear))
    c0, c1, lx = (t.to(dev) for t in _resize_axis(left, ws, ow, bilinear))

    def rows(r: Tensor) -> Tensor:  # (N, C, oh, W)
        return x.gather(2, r.view(n, 1, oh, 1).expand(n, c, oh, w))

    def cols(t: Tensor, col: Tensor) -> Tensor:  # (N, C, oh, ow)
        return t.gather(3, col.view(n, 1, 1, ow).expand(n, c, oh, ow))

    if not bilinear:
        return cols(rows(r0), c0)
    top_rows, bottom_rows = rows(r0), rows(r1)
    wx1 = lx.view(n, 1, 1, ow).to(x.dtype)
    wx0 = 1 - wx1
    wy1 = ly.view(n, 1, oh, 1).to(x.dtype)
    wy0 = 1 - wy1
    return wy0 * (wx0 * cols(top_rows, c0) + wx1 * cols(top_rows, c1)) + \
        wy1 * (wx0 * cols(bottom_rows, c0) + wx1 * cols(bottom_rows, c1))


def _box_candidates(tv, g: torch.Generator, n: int, area: int) -> tuple[Tensor, Tensor]:
    """torchvision's 10 candidate boxes a sample, as RandomResizedCrop and RandomErasing draw them: an
    area from ``scale`` and a log-uniform aspect from ``ratio``. Returns (sqrt(area x aspect),
    sqrt(area / aspect)), rounded; each caller names them (width, height) or (height, width) as its
    torchvision class does."""
    log_ratio = (math.log(tv.ratio[0]), math.log(tv.ratio[1]))
    target = area * _uniform(g, (n, 10), tv.scale[0], tv.scale[1])
    aspect = torch.exp(_uniform(g, (n, 10), log_ratio[0], log_ratio[1]))
    return torch.sqrt(target * aspect).round().long(), torch.sqrt(target / aspect).round().long()


def _random_resized_crop(tv, x: Tensor, g: torch.Generator) -> Tensor:
    n, _, height, width = x.shape
    ws, hs = _box_candidates(tv, g, n, height * width)
    ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    k, found = _first(ok)
    h = hs.gather(1, k.view(-1, 1)).squeeze(1)
    w = ws.gather(1, k.view(-1, 1)).squeeze(1)
    u = torch.rand((n, 2), generator=g, dtype=torch.float64)
    # the fallback: the central crop of torchvision
    in_ratio = float(width) / float(height)
    if in_ratio < min(tv.ratio):
        fw, fh = width, int(round(width / min(tv.ratio)))
    elif in_ratio > max(tv.ratio):
        fw, fh = int(round(height * max(tv.ratio))), height
    else:
        fw, fh = width, height
    h = torch.where(found, h, torch.full_like(h, fh)).clamp(1, height)
    w = torch.where(found, w, torch.full_like(w, fw)).clamp(1, width)
    i = torch.where(found, (u[:, 0] * (height - h + 1)).floor().long().clamp_max(height - h), (height - h) // 2)
    j = torch.where(found, (u[:, 1] * (width - w + 1)).floor().long().clamp_max(width - w), (width - w) // 2)
    return _resized_crop(x, i, j, h, w, tv.size[0], tv.size[1], _mode(tv) != "nearest")


def _inverse_affine(center: Tensor | None, angle: Tensor, tx: Tensor, ty: Tensor, scale: Tensor,
                    shear_x: Tensor, shear_y: Tensor, width: int, height: int) -> Tensor:
    """torchvision's _get_inverse_affine_matrix, for N samples at once (float64): (N, 2, 3)."""
    if center is None:
        cx = cy = torch.zeros_like(angle)
    else:
        cx = torch.full_like(angle, float(center[0]) - width * 0.5)
        cy = torch.full_like(angle, float(center[1]) - height * 0.5)
    rot = torch.deg2rad(angle)
    sx, sy = torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    cos_sy, tan_sx = torch.cos(sy), torch.tan(sx)
    a = torch.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([m0, m1, m2, m3, m4, m5], 1).view(-1, 2, 3)


def _grid_transform(x: Tensor, matrix: Tensor, mode: str, fill: Any) -> Tensor:
    """torchvision's _affine_grid + _apply_grid_transform, with one matrix a sample."""
    n, c, h, w = x.shape
    dev, dtype = x.device, x.dtype
    theta = matrix.to(dtype=dtype).to(dev)
    base = torch.empty(1, h, w, 3, dtype=dtype, device=dev)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * w, 0.5 * h], dtype=dtype, device=dev))
    grid = base.view(1, h * w, 3).expand(n, h * w, 3).bmm(rescaled).view(n, h, w, 2)
    fills = list(fill) if isinstance(fill, list | tuple) else [fill]
    if fill is None or all(float(v) == 0 for v in fills):
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    both = F.grid_sample(torch.cat((x, torch.ones((n, 1, h, w), dtype=dtype, device=dev)), 1), grid, mode=mode,
                         padding_mode="zeros", align_corners=False)
    out, mask = both[:, :c], both[:, c:].expand(n, c, h, w)
    fill_img = _fill_tensor(fill, c, x)
    if mode == "nearest":
        return torch.where(mask < 0.5, fill_img.expand_as(out), out)
    return out.sub_(fill_img).mul_(mask).add_(fill_img)


def _mode(tv) -> str:
    """nearest or bilinear (torchvision keeps a string, or an InterpolationMode in some versions)."""
    return str(getattr(tv.interpolation, "value", tv.interpolation)).lower()


def _fill_of(tv) -> Any:
    fill = tv._fill.get("others", 0) if isinstance(getattr(tv, "_fill", None), dict) else tv.fill
    return fill


def _random_rotation(tv, x: Tensor, g: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    angle = _uniform(g, n, tv.degrees[0], tv.degrees[1])
    zero = torch.zeros_like(angle)
    # rotate() turns by -angle in affine's convention (torchvision's own remark)
    m = _inverse_affine(tv.center, -angle, zero, zero, torch.ones_like(angle), zero, zero, w, h)
    return _grid_transform(x, m, _mode(tv), _fill_of(tv))


def _random_affine(tv, x: Tensor, g: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    angle = _uniform(g, n, tv.degrees[0], tv.degrees[1])
    zero = torch.zeros_like(angle)
    tx = ty = zero
    if tv.translate is not None:
        max_dx, max_dy = float(tv.translate[0] * w), float(tv.translate[1] * h)
        tx = _uniform(g, n, -max_dx, max_dx).round()
        ty = _uniform(g, n, -max_dy, max_dy).round()
    scale = _uniform(g, n, tv.scale[0], tv.scale[1]) if tv.scale is not None else torch.ones_like(angle)
    shear_x = shear_y = zero
    if tv.shear is not None:
        shear_x = _uniform(g, n, tv.shear[0], tv.shear[1])
        if len(tv.shear) == 4:
            shear_y = _uniform(g, n, tv.shear[2], tv.shear[3])
    m = _inverse_affine(tv.center, angle, tx, ty, scale, shear_x, shear_y, w, h)
    return _grid_transform(x, m, _mode(tv), _fill_of(tv))


def _random_erasing(tv, x: Tensor, g: torch.Generator) -> Tensor:
    n, c, height, width = x.shape
    if tv.value is not None and len(tv.value) not in (1, c):
        raise ValueError(f"RandomErasing.value has {len(tv.value)} values; the images have {c} channels")
    erase = torch.rand(n, generator=g) < tv.p
    hs, ws = _box_candidates(tv, g, n, height * width)
    ok = (hs < height) & (ws < width)
    k, found = _first(ok)
    h = hs.gather(1, k.view(-1, 1)).squeeze(1).clamp_max(height)
    w = ws.gather(1, k.view(-1, 1)).squeeze(1).clamp_max(width)
    u = torch.rand((n, 2), generator=g, dtype=torch.float64)
    i = (u[:, 0] * (height - h + 1)).floor().long().clamp_max(height - h)
    j = (u[:, 1] * (width - w + 1)).floor().long().clamp_max(width - w)
    erase &= found  # no try fitted: torchvision leaves the image alone
    if tv.value is None:
        value = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
    else:
        value = _fill_tensor(tv.value, c, x)
    dev = x.device
    i, j, h, w, erase = i.to(dev), j.to(dev), h.to(dev), w.to(dev), erase.to(dev)
    rows = torch.arange(height, device=dev).view(1, height)
    cols = torch.arange(width, device=dev).view(1, width)
    in_rows = (rows >= i.view(-1, 1)) & (rows < (i + h).view(-1, 1))
    in_cols = (cols >= j.view(-1, 1)) & (cols < (j + w).view(-1, 1))
    mask = (in_rows.view(n, 1, height, 1) & in_cols.view(n, 1, 1, width)) & erase.view(n, 1, 1, 1)
    return torch.where(mask, value, x)


def _horizontal_flip(tv, x: Tensor, g: torch.Generator) -> Tensor:
    return _flip(tv, x, g, -1)


def _vertical_flip(tv, x: Tensor, g: torch.Generator) -> Tensor:
    return _flip(tv, x, g, -2)

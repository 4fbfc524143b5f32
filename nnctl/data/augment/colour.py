"""The colour augmentations, vectorised over the batch: ColorJitter (torchvision's HSV hue shift) and
RandomGrayscale (the draws and the helpers they share are in nnctl.data.augment.ops)."""

from __future__ import annotations

import torch
from torch import Tensor

from nnctl.data.augment.ops import _gray, _uniform

# torchvision's adjust_hue converts with private helpers (transforms.v2.functional._color); its public
# adjust_hue takes one factor a call (a Python loop over the samples). These are the same formulas
# (Pillow's Convert.c, as torchvision writes them), in the same float operations, over a batch.
_HSV_SELECT = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))  # sector -> R, G, B of (v, p, q, t)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(N, 3, H, W) RGB in [0, 1] -> hue, saturation, value, each (N, H, W), hue in [0, 1)."""
    r, g, _ = x.unbind(dim=1)
    minc, maxc = torch.aminmax(x, dim=1)
    eqc = maxc == minc  # grey: hue and saturation 0 (no division by zero)
    span = maxc - minc
    s = span / torch.where(eqc, 1.0, maxc)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / torch.where(eqc, 1.0, span).unsqueeze(1)).unbind(dim=1)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, rc + 2.0 - bc, gc + 4.0 - rc))
    return h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0), s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Hue, saturation, value (N, H, W) -> (N, 3, H, W) RGB."""
    h6 = h * 6
    i = h6.floor()
    f = h6 - i
    sf, one_minus_s = s * f, 1.0 - s
    q = (1.0 - sf).mul_(v).clamp_(0.0, 1.0)
    t = (sf + one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = (one_minus_s * v).clamp_(0.0, 1.0)
    sector = i.long().remainder_(6)
    select = torch.tensor(_HSV_SELECT, device=h.device)[:, sector].movedim(0, 1)  # (N, 3, H, W) into (v, p, q, t)
    return torch.stack((v, p, q, t), dim=1).gather(1, select)


def _hue(x: Tensor, factor: Tensor) -> Tensor:
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + factor.view(-1, 1, 1)).remainder_(1.0), s, v)


def _color_jitter(tv, x: Tensor, g: torch.Generator) -> Tensor:
    """ColorJitter per sample: each sample's own random order of its four operations and its own factors.

    Brightness, contrast and saturation are each a blend ``x * f + base * (1 - f)`` clamped to [0, 1] (base:
    0, the grey image's mean, the grey image), so at each of the four positions one blend serves every
    sample, with the base and factor of the operation that sample does there; hue (HSV and back) runs at
    each position on the samples that do it there only, so once a sample.
    """
    n, c = x.shape[:2]
    order = torch.rand((n, 4), generator=g).argsort(1)  # a uniform random permutation a sample
    ranges = (tv.brightness, tv.contrast, tv.saturation, tv.hue)
    drawn = [None if r is None else _uniform(g, n, r[0], r[1]).to(torch.float32) for r in ranges]
    enabled = [r is not None and not (op >= 2 and c == 1) for op, r in enumerate(ranges)]  # 1 channel: no S, H
    if not any(enabled):
        return x
    factors = torch.stack([f if f is not None else torch.ones(n) for f in drawn], 1)  # (N, 4)
    dev = x.device
    cpu_order, order, factors = order, order.to(dev), factors.to(dev, x.dtype)
    blend_ops = torch.tensor(enabled[:3] + [False], device=dev)
    for pos in range(4):
        op = order[:, pos]
        if any(enabled[:3]):
            active = blend_ops[op].view(n, 1, 1, 1)
            f = factors.gather(1, op.view(n, 1)).view(n, 1, 1, 1)
            base = torch.zeros((), dtype=x.dtype, device=dev)
            if enabled[1] or enabled[2]:
                gray = _gray(x)
                if enabled[1]:
                    base = torch.where((op == 1).view(n, 1, 1, 1), gray.mean(dim=(-3, -2, -1), keepdim=True), base)
                if enabled[2]:
                    base = torch.where((op == 2).view(n, 1, 1, 1), gray, base)
            x = torch.where(active, torch.lerp(base.expand(x.shape), x, f).clamp_(0, 1), x)
        if enabled[3]:  # HSV is costly: only the samples whose operation here is hue (chosen on the CPU)
            chosen = (cpu_order[:, pos] == 3).nonzero().flatten()
            if len(chosen):
                chosen = chosen.to(dev)
                x = x.index_copy(0, chosen, _hue(x.index_select(0, chosen), factors[chosen, 3]))
    return x


def _random_grayscale(tv, x: Tensor, g: torch.Generator) -> Tensor:
    chosen = (torch.rand(len(x), generator=g) < tv.p).to(x.device)
    if x.shape[1] == 1:
        return x
    return torch.where(chosen.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)

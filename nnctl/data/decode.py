"""The one image decoder: a file (or its bytes) -> uint8 (C, H, W), for training, the cache, eval and predict.

``decode_image(source, mode, size)`` is the only place nnctl turns an image into pixels:
training's preloaded and streamed paths (``store._Store.sample``), the decoded cache's build
(which decodes through the same store), ``eval`` (through the data loading) and ``predict``
all call it, so a file predicted on is decoded exactly as the files a model was trained on.
``image_size(path)`` reads only a file's header, through the same opener.

- A path is opened with ``nnctl.files.open_input``: only regular files, never a hang on a
  FIFO or a device. Bytes (or a bytearray / memoryview) are decoded as given.
- PIL opens it (PNG, JPEG, BMP, GIF, WebP, TIFF, PPM/PGM, ...); an animated image gives its
  first frame; EXIF orientation is not applied (as torchvision's ImageFolder). A decompression
  bomb (more pixels than PIL's ``MAX_IMAGE_PIXELS``, whether PIL warns or raises) is refused.
- The pixels become 8-bit by one rule (``_eight_bit``), before the colour mode:

  * 16-bit grayscale (PIL ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): scaled by value,
    ``round(v * 255 / 65535)``: 65535 -> 255, 32768 -> 128, an 8-bit value v stored as
    v * 257 -> v. (PIL's own ``convert`` saturates every value above 255 to white.)
  * 32-bit integer (``I``, e.g. TIFF): the 16-bit rule when every value is within 0..65535;
    otherwise the image's own range is stretched, ``round((v - min) * 255 / (max - min))``
    (a constant image outside 0..65535 is clipped to it first: all 0 or all 255).
  * 32-bit float (``F``): refused, naming the file; its range (0..1? 0..255? any?) is not
    defined by the format, and guessing would train on silently wrong pixels.
  * palette (``P``, ``PA``) -> RGBA -> RGB; ``RGBA``/``RGBa``/``RGBX`` -> RGB (alpha dropped,
    not composited); ``CMYK``, ``YCbCr``, ``HSV``, ``LAB`` -> RGB (PIL's conversions);
    ``LA``/``La`` -> L (alpha dropped); ``1`` (1-bit) -> L as 0 / 255.
  * Colour images with 16 bits per channel are reduced to 8 bits by PIL's decoder itself
    (the high byte), before nnctl sees them: within 1 of the rule above.

  Then ``L`` -> ``RGB`` repeats the channel and ``RGB`` -> ``L`` is PIL's ITU-R 601-2 luma.
- When ``size`` (H, W) is given and differs, PIL's bilinear resize (as torchvision's
  ImageFolder pipeline used here); ``RESIZE`` names it in the cache key.
- PIL's warnings (a palette image's transparency, EXIF, ...) never reach stderr.
- A file that is empty, truncated, not an image or otherwise unreadable raises one
  ``UsageError`` line naming the file (``cannot read image <file>: ...``), never a traceback,
  never the repr of an in-memory buffer. A stop signal raised while reading (an
  ``NnctlError`` that is not the file's fault) passes through unchanged.

``DECODER_VERSION`` changes whenever a file's decoded pixels change; the decoded cache puts it
(with PIL's version, as ``DECODER``) in its key, so entries written by an older decoder are
rebuilt, never reused.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from contextlib import contextmanager
from typing import Iterator, Union

import numpy as np
import PIL
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from nnctl.errors import NnctlError, UsageError
from nnctl.files import open_input

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

MODES = ("L", "RGB")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
RESIZE = "PIL.Image.BILINEAR"
# 2: one decoder for every path; 16/32-bit integer images scaled by value (1: PIL's convert, saturating)
# the files the decoder reads, by suffix (lower case): image_folder's scan, the decoded cache and predict
# all use this one list (a .gif read by predict and dropped by training was a defect, issue 20)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DECODER_VERSION = 2
DECODER = f"nnctl {DECODER_VERSION}, PIL {PIL.__version__}"  # what decides the pixels: in the cache's key

_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _clean(exc: BaseException, name: str) -> str:
    """An exception's text on one line, with any ``<... object at 0x...>`` replaced by the file's name."""
    text = " ".join(_OBJECT_REPR.sub(name, str(exc)).split())
    return text[:200]


@contextmanager
def _opened(source: ImageSource, label: str) -> Iterator[Image.Image]:
    """PIL's image of a regular file or of bytes; every failure one UsageError line naming ``label``.

    Covers the body of the ``with`` too (decoding happens there, lazily), so a truncated file
    found while converting is reported like one found while opening.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's notes (palette transparency, EXIF, ...) are not the user's concern
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        nbytes = 0
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                fh = io.BytesIO(bytes(source))
                nbytes = len(fh.getbuffer())
            else:
                fh = open_input(source, "image file")
                nbytes = os.fstat(fh.fileno()).st_size
            with fh:
                if nbytes == 0:
                    raise UsageError(f"cannot read {label}: an empty file, not an image")
                with Image.open(fh) as img:
                    yield img
        except NnctlError:  # a refused file (FIFO, device), ours, or a stop signal: passed as they are
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UsageError(f"{label}: refused as a possible decompression bomb: {_clean(exc, label)}") from None
        except UnidentifiedImageError:
            raise UsageError(f"cannot read {label}: not a readable image (not a format PIL recognises; "
                             f"{nbytes:,} bytes)") from None
        except Exception as exc:  # OSError, SyntaxError (broken PNG), ValueError, zlib.error, struct.error, ...
            raise UsageError(f"cannot read {label}: not a readable image ({type(exc).__name__}: "
                             f"{_clean(exc, label)}; a corrupt or truncated image file)") from None


def _label(source: ImageSource, name: str | None) -> str:
    if name:
        return f"image {name}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "image data"
    return f"image {os.fspath(source)}"


def _scale_integers(arr: np.ndarray) -> np.ndarray:
    """16/32-bit integer pixels -> uint8 by value (see the module docstring)."""
    v = arr.astype(np.int64, copy=False)
    lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
    if lo < 0 or hi > 65535:
        if hi == lo:  # a constant image outside 0..65535: clipped, then the 16-bit rule
            v = np.clip(v, 0, 65535)
        else:  # the image's own range stretched to 0..255, rounded half up
            span = hi - lo
            return (((v - lo) * 510 + span) // (2 * span)).astype(np.uint8)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535); never a tie (65535 = 255 * 257)


def _eight_bit(img: Image.Image, label: str) -> Image.Image:
    """Any PIL image -> an 8-bit ``L`` or ``RGB`` image, by the rule of the module docstring."""
    m = img.mode
    if m in SIXTEEN_BIT_MODES or m == "I":
        return Image.fromarray(_scale_integers(np.asarray(img)), "L")
    if m == "F":
        raise UsageError(f"{label}: a 32-bit floating-point image (PIL mode F), refused: its pixel range is not "
                         "defined; save it with 8 or 16 bits per channel")
    if m in ("1", "L"):
        return img.convert("L")
    if m in ("LA", "La"):
        return (img.convert("LA") if m == "La" else img).convert("L")
    if m in ("P", "PA"):
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def decode_image(source: ImageSource, mode: str, size: tuple[int, int] | list[int] | None = None, *,
                 name: str | None = None, facts: dict | None = None) -> Tensor:
    """An image (a file's path, or its bytes) -> uint8 tensor (C, H, W), C = 1 for ``L``, 3 for ``RGB``.

    ``size`` is (H, W): an image of another size is resized with PIL's bilinear filter. ``name``
    names the image in messages (default: the path, or ``image data`` for bytes). Raises
    ``UsageError`` (one line) for anything that is not a readable image. ``facts``, when given, receives
    the image as it was: ``mode`` (PIL's) and ``size`` (H, W), so a caller can say what it converted.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'L' or 'RGB', not {mode!r}")
    label = _label(source, name)
    with _opened(source, label) as img:
        if facts is not None:
            facts.update(mode=img.mode, size=(img.height, img.width))
        img = _eight_bit(img, label)
        if img.mode != mode:
            img = img.convert(mode)
        if size is not None and (img.height, img.width) != (int(size[0]), int(size[1])):
            img = img.resize((int(size[1]), int(size[0])), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """An image file's (H, W), read from its header only; the same opener and errors as ``decode_image``."""
    label = _label(path, None)
    with _opened(path, label) as img:
        return img.height, img.width

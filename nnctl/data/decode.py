"""One image decoder for training and prediction: bytes or a file -> uint8 (C, H, W).

``decode_image(data_or_path, mode, size)`` is what every image nnctl reads goes through,
so that a file predicted on is decoded exactly as the files a model was trained on:

- a path is read with ``nnctl.files.read_input``: only regular files, never a hang on a
  FIFO or a device; bytes (or a bytearray / memoryview) are decoded as given;
- PIL opens it (PNG, JPEG, BMP, GIF, WebP, TIFF, PPM/PGM, ...); a decompression bomb
  (more pixels than PIL's ``MAX_IMAGE_PIXELS``, whether PIL warns or raises) is refused;
- 16-bit images (PIL modes ``I;16``, ``I;16B``, ``I;16L``, ``I``) are reduced to 8 bits by
  keeping the high byte, ``value >> 8`` (values outside 0..65535 clipped first), before the
  colour conversion; PIL's own ``convert`` would saturate every value above 255. An 8-bit
  picture saved as 16 bits (each value v stored as v * 257) decodes to the same pixels;
- ``convert(mode)`` to ``L`` (one channel) or ``RGB``, then, when ``size`` (H, W) is given
  and differs, PIL's bilinear resize;
- PIL's warnings (a palette image's transparency, ...) never reach stderr;
- a file that is empty, truncated, not an image or otherwise unreadable raises one
  ``UsageError`` line naming the file (or ``name``): never a traceback, never the repr of an
  in-memory buffer. A stop signal raised while reading (an ``NnctlError`` that is not the
  file's fault) passes through unchanged.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Union
import numpy as np
import torch
from nnctl.errors import NnctlError, UsageError
from contextlib import contextmanager
from torch import Tensor
from nnctl.files import open_input

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

MODES = ("L", "RGB")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _clean(exc: BaseException, name: str) -> str:
    """An exception's text on one line, with any ``<... object at 0x...>`` replaced by the file's name."""
    text = " ".join(_OBJECT_REPR.sub(name, str(exc)).split())
    return text[:200]


def _to_8_bit(img):
    """A 16-bit (or 32-bit integer) PIL image -> an 8-bit ``L`` image: value >> 8, after clipping to 0..65535."""
    from PIL import Image

    arr = np.asarray(img)
    arr = np.clip(arr.astype(np.int64, copy=False), 0, 65535) >> 8
    return Image.fromarray(arr.astype(np.uint8), "L")


def decode_image(data_or_path: ImageSource, mode: str, size: tuple[int, int] | list[int] | None = None, *,
                 name: str | None = None) -> torch.Tensor:
    """An image (a file's path, or its bytes) -> uint8 tensor (C, H, W), C = 1 for ``L``, 3 for ``RGB``.

    ``size`` is (H, W): an image of another size is resized with PIL's bilinear filter. ``name``
    names the image in messages (default: the path, or ``image data`` for bytes). Raises
    ``UsageError`` (one line) for anything that is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    if mode not in MODES:
        raise ValueError(f"mode must be 'L' or 'RGB', not {mode!r}")
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        data = bytes(data_or_path)
        label = name or "image data"
    else:
        from nnctl.files import read_input

        label = name or os.fspath(data_or_path)
        data = read_input(data_or_path, "image file")
    if not data:
        raise UsageError(f"{label}: an empty file, not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's notes (palette transparency, EXIF, ...) are not the user's concern
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.mode in SIXTEEN_BIT_MODES:
                    img = _to_8_bit(img)
                img = img.convert(mode)
                if size is not None and (img.height, img.width) != (int(size[0]), int(size[1])):
                    img = img.resize((int(size[1]), int(size[0])), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except NnctlError:  # a stop signal while decoding: not the file's fault
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UsageError(f"{label}: refused as a possible decompression bomb: {_clean(exc, label)}") from None
        except UnidentifiedImageError:
            raise UsageError(f"{label}: not a readable image (not a format PIL recognises; "
                             f"{len(data):,} bytes)") from None
        except Exception as exc:  # OSError, SyntaxError (broken PNG), ValueError, zlib.error, struct.error, ...
            raise UsageError(f"{label}: not a readable image ({type(exc).__name__}: {_clean(exc, label)}; "
                             "a corrupt or truncated image file)") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()

@contextmanager
def _open_image(path: str):
    """PIL's image of a regular file (never a FIFO or device), or a one-line UsageError naming the file.

    A decompression bomb (more pixels than PIL's MAX_IMAGE_PIXELS, whether PIL warns or raises) is
    refused. A stop signal raised while reading (an NnctlError that is not a UsageError) passes
    through: it is not the file's fault.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with open_input(path, "image file") as fh, Image.open(fh) as img:
                yield img
        except NnctlError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UsageError(f"image {path}: refused as a possible decompression bomb: "
                             f"{' '.join(str(exc).split())[:200]}") from None
        except Exception as exc:  # OSError, SyntaxError (broken PNG), ValueError, zlib.error, struct.error, ...
            text = " ".join(str(exc).split())[:200]
            raise UsageError(f"cannot read image {path}: {type(exc).__name__}: {text} "
                             "(a corrupt or truncated image file)") from None


def _decode_image(path: str, mode: str, size: tuple[int, int] | None) -> Tensor:
    """One image file -> uint8 (C, H, W)."""
    from PIL import Image

    with _open_image(path) as img:
        img = img.convert(mode)
        if size is not None and (img.height, img.width) != tuple(size):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()

"""Image decoding and geometry: any image file to the square 8-bit grayscale the nets see.

Shared by ingest (which stores the result as records) and the report and notebooks (which
show originals beside what ingest made of them).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterator

import numpy as np

# Images with more pixels than this are bad files (``data.max_pixels``): PIL's own threshold
# (``PIL.Image.MAX_IMAGE_PIXELS``), far above any plankton photograph, far below what a small
# file that claims a huge size (a decompression bomb) would take to decode.
MAX_PIXELS = 89_478_485


def to_gray8(image: "Image.Image", background: int) -> np.ndarray:  # noqa: F821
    """8-bit grayscale of any PIL image: RGB(A), palette, 16-bit, float, bilevel.

    Transparent pixels are composited onto the background (not black), and 16-bit images are
    scaled by their type's range (>> 8), not clipped.
    """
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.int64)
        if mode == "I" and arr.max(initial=0) > 65535:
            arr = arr * 255 // max(1, int(arr.max()))
            return arr.clip(0, 255).astype(np.uint8)
        return (arr.clip(0, 65535) >> 8).astype(np.uint8)
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    if mode == "P" or "A" in mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background,) * 3 + (255,))
        image = Image.alpha_composite(canvas, rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def decode(path: str, background: int, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Decode a file to an HxW uint8 array; raise ValueError saying why it is bad.

    The size is taken from the file's header and checked against ``max_pixels`` before any
    pixel is decoded, so a decompression bomb (a small file claiming a huge size) is refused
    without allocating it. ``None`` means no limit.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"unreadable ({exc.strerror or exc})") from None
    return decode_bytes(data, background, max_pixels)


def decode_bytes(data: bytes, background: int, max_pixels: int | None = MAX_PIXELS
                 ) -> np.ndarray:
    """:func:`decode` of an image file's bytes (an archive's member, say)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("zero-byte file")
    try:
        with _header_only():
            image = Image.open(io.BytesIO(data))  # reads the header, decodes nothing yet
    except UnidentifiedImageError:
        raise ValueError("not an image (unrecognised format)") from None
    except MemoryError:
        raise
    except Exception as exc:  # a damaged header: PIL raises all kinds (struct.error, ...)
        raise ValueError(f"corrupt or truncated image ({_why(exc)})") from None
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(f"too large: {width} x {height} = {width * height:,} pixels, over "
                             f"the limit of {max_pixels:,} (data.max_pixels)")
        try:
            image.load()  # raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES is off)
        except MemoryError:
            raise
        except Exception as exc:  # damaged data: OSError, SyntaxError, EOFError, struct.error...
            raise ValueError(f"corrupt or truncated image ({_why(exc)})") from None
        try:
            gray = to_gray8(image, background)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"corrupt or truncated image ({_why(exc)})") from None
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise ValueError(f"unexpected decoded shape {gray.shape}")
    return gray


def _why(exc: BaseException) -> str:
    return str(exc).strip().replace("\n", " ") or type(exc).__name__


@contextlib.contextmanager
def _header_only() -> Iterator[None]:
    """PIL's own decompression-bomb check off while a header is read.

    PIL refuses (or warns about) large images in ``Image.open`` with its own exception and
    limit, without naming the file; :func:`decode` checks the header's size against its
    ``max_pixels`` instead, before anything is decoded.
    """
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


# Below this border median the border is mostly organism, not background: leave it alone.
WHITEN_MIN_LEVEL = 100


def whiten(gray: np.ndarray, background: int) -> np.ndarray:
    """Scale intensities so the median border pixel maps to ``background`` (dark stays dark).

    A no-op on NDSB's images (their borders are already white); an image whose border is
    mostly organism (median below ``WHITEN_MIN_LEVEL``) is left as it is.
    """
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    level = float(np.median(border))
    if level < WHITEN_MIN_LEVEL:
        return gray
    return np.clip(np.rint(gray * (background / level)), 0, 255).astype(np.uint8)


def fit_square(gray: np.ndarray, size: int, background: int) -> np.ndarray:
    """Resize the longer side to ``size`` keeping the aspect ratio; centre on a square."""
    import cv2

    h, w = gray.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    # INTER_AREA averages when shrinking (no aliasing); cubic when enlarging small organisms.
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(gray, (nw, nh), interpolation=interp) if scale != 1 else gray
    out = np.full((size, size), background, dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out

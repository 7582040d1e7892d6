"""Image input a service can trust: load whatever a user sends, refuse what cannot be used with a
message that names the image and the fix, and turn images into the vision tower's input tensor.

Every loader returns a fully decoded PIL image in mode "RGB" that holds no file handle, or raises
`ImageError`. The conversion to RGB, after EXIF orientation is applied and the first frame of an
animation is taken:

* RGB: unchanged. "1" (bilevel), "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX": Pillow's own
  conversion ("1" -> black/white, "L" -> gray on all three channels, cyan CMYK -> (0, 255, 255)).
  Embedded ICC profiles are not applied: pixel values are taken as sRGB.
* Anything with alpha - "RGBA", "RGBa", "LA", "La", "PA", a "P" image with an RGBA palette, and
  "P"/"L"/"RGB" with a `transparency` entry - is alpha-composited over WHITE: transparent pixels
  become (255, 255, 255), opaque ones keep their colour, partial alpha blends. Dropping alpha would
  expose whatever colour the transparent pixels happen to store.
* "I;16", "I;16B", "I;16L", "I;16N" (16-bit gray): v -> round(v * 255 / 65535). Pillow's own
  conversion clips everything above 255 to white.
* "I" (32-bit int): values all <= 255 are 8-bit already (negatives clip to 0); else, if they fit
  0..65535, the 16-bit rule; else min-max stretched to 0..255 (a constant image maps to 0).
* "F" (float): values all within [0, 1] are multiplied by 255; otherwise they are read as 0..255
  and clipped; NaN -> 0; then rounded.

Metadata (EXIF, ICC profile, comments) is dropped from the result: it is pixels only.

Refused, with `ImageError`: missing paths, directories, empty input, data Pillow cannot identify,
formats outside `ACCEPTED_FORMATS` (Pillow knows more, but EPS, for one, runs Ghostscript on
untrusted input), truncated or corrupt data (decoding is forced here, never deferred), zero-size
images, and images over `max_pixels` - checked from the header, before any pixel is decoded - or
over Pillow's own `Image.MAX_IMAGE_PIXELS` checks (read here, never changed).
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
import warnings
from functools import partial
from typing import IO, Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: above almost any photo, far below a decompression bomb

ACCEPTED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM", "AVIF")
_FIX_FORMAT = "save it as PNG or JPEG and send it again"

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], Image.Image, torch.Tensor, np.ndarray]

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_TENSOR_RULE = ("accepted: a uint8 (C,H,W) tensor with values 0..255 or a float (C,H,W) tensor with values "
                "in [0, 1], C in {1, 3, 4}; normalized (CLIP mean/std) pixel tensors go to the model's "
                "encode_image, not here")


class ImageError(ValueError):
    """An image that cannot be used.

    `.source` names it (a path, '<bytes>', '<data URI>', '<PIL image>', '<tensor>', a file object's
    name); `.index` is its 0-based position when it came from `load_images`/`preprocess`, else None;
    `.reason` is the message without the name.
    """

    def __init__(self, reason: str, *, source: str = "<image>", index: int | None = None,
                 total: int | None = None) -> None:
        self.reason, self.source, self.index, self.total = reason, source, index, total
        where = source if index is None else f"image {index + 1} of {total} ({source})"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # keyword-only fields survive pickling (worker processes, queues)
        return partial(ImageError, source=self.source, index=self.index, total=self.total), (self.reason,)


def load_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """One image from a path, a base64 `data:image/...` URI, bytes, a binary file object, a PIL
    image, a torch tensor (see `_TENSOR_RULE`) or a uint8 numpy array (H,W[,C]), as a loaded
    RGB PIL image. Raises ImageError for anything unusable, including images over `max_pixels`."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(src, Image.Image):
        return _from_pil(src, max_pixels)
    if isinstance(src, torch.Tensor):
        return _from_tensor(src, max_pixels)
    if isinstance(src, np.ndarray):
        return _from_array(src, max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _from_bytes(src, "<bytes>", max_pixels)
    if isinstance(src, str) and src[:5].lower() == "data:":
        return _from_bytes(_data_uri_payload(src), "<data URI>", max_pixels)
    if isinstance(src, (str, os.PathLike)):
        return _from_path(src, max_pixels)
    if hasattr(src, "read"):
        return _from_file(src, max_pixels)
    raise ImageError(f"cannot use a {type(src).__name__} as an image; pass a path, a data:image/...;base64 URI, "
                     "bytes, a binary file object, a PIL image or a (C,H,W) tensor",
                     source=f"<{type(src).__name__}>")


def load_images(srcs: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """`load_image` on each item; a single image (not a list) is treated as a list of one.
    The first failure raises ImageError with `.index` set: "image 2 of 4 (cat.png): ..."."""
    items = _as_list(srcs)
    out = []
    for i, s in enumerate(items):
        try:
            out.append(load_image(s, max_pixels=max_pixels))
        except ImageError as e:
            raise ImageError(e.reason, source=e.source, index=i, total=len(items)) from e
    return out


def preprocess(images: Any, size: int = IMAGE_SIZE, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """(B, 3, size, size) float32: upstream XComposer's vis_processor - BICUBIC resize to (size, size)
    ignoring aspect ratio, ToTensor, Normalize(CLIP_MEAN, CLIP_STD) - run with torchvision's own
    functions on PIL images, so the numbers are torchvision's."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    pics = load_images(images, max_pixels=max_pixels)
    if not pics:
        raise ImageError("no images given; pass at least one image", source="<empty list>")
    out = torch.empty(len(pics), 3, size, size, dtype=torch.float32)
    for i, pic in enumerate(pics):
        pic = TF.resize(pic, [size, size], interpolation=InterpolationMode.BICUBIC)
        out[i] = TF.normalize(TF.to_tensor(pic), CLIP_MEAN, CLIP_STD)
    return out


def to_data_uri(image: ImageSource, *, max_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """"data:image/png;base64,..." of `load_image(image)`; PNG is lossless, so loading it back gives
    the same pixels. `max_side` shrinks (never enlarges) so the longer side is at most that."""
    img = load_image(image, max_pixels=max_pixels)
    if max_side is not None:
        if max_side <= 0:
            raise ValueError(f"max_side must be positive, got {max_side!r}")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # in place on our own copy
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def unnormalize(pixels: torch.Tensor) -> torch.Tensor:
    """Normalized (3, H, W) CLIP pixels back to a [0, 1] image tensor (what `to_data_uri` takes)."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (pixels.detach().float().cpu() * std + mean).clamp(0, 1)


# --- sources ---------------------------------------------------------------------------------

def _as_list(srcs: Any) -> list:
    single = (str, bytes, bytearray, memoryview, os.PathLike, Image.Image, torch.Tensor, np.ndarray)
    if isinstance(srcs, single) or hasattr(srcs, "read"):
        return [srcs]
    try:
        return list(srcs)
    except TypeError:
        return [srcs]  # load_image says what it accepts


def open_user_file(path: str, kind: str = "image", error=None) -> IO[bytes]:
    """Open a file a user named, for reading its bytes: URLs, missing files, directories, FIFOs and
    devices, empty files and unreadable ones are refused with `error(reason, source=path)` (ImageError
    by default), each message naming the fix. `kind` words the messages ("image", "video")."""
    error = error or ImageError
    a = "an" if kind[:1] in "aeiou" else "a"
    scheme = path.split("://", 1)[0]
    if "://" in path and len(scheme) > 1 and scheme.isalpha():  # not a Windows drive letter
        raise error(f"{scheme} URLs are not fetched; download the {kind} and pass its bytes or path", source=path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"no such file; check the path (relative paths start at {os.getcwd()})", source=path) from None
    except OSError as e:
        raise error(f"cannot access the file ({e.strerror}); check the path and its permissions",
                    source=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"is a directory, not {a} {kind} file; pass the path of {a} {kind} file", source=path)
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device could block or never end
        raise error(f"is not a regular file; pass the path of {a} {kind} file", source=path)
    if st.st_size == 0:
        raise error(f"the file is empty (0 bytes); the upload or save did not finish, send the {kind} again",
                    source=path)
    try:
        return open(path, "rb")
    except OSError as e:
        raise error(f"cannot open the file ({e.strerror}); check its permissions", source=path) from None


def _from_path(src: str | os.PathLike, max_pixels: int) -> Image.Image:
    path = os.fsdecode(os.fspath(src))
    with open_user_file(path) as f:
        return _decode(f, path, max_pixels)


def _from_file(f: Any, max_pixels: int) -> Image.Image:
    name = getattr(f, "name", None) or getattr(f, "filename", None)
    source = name if isinstance(name, str) and name else "<file object>"
    data = f.read()  # read it whole: upload streams need not be seekable
    if isinstance(data, str):
        raise ImageError("the file object is open in text mode; open it with 'rb'", source=source)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"read() returned {type(data).__name__}, not bytes; pass a binary file object", source=source)
    return _from_bytes(data, source, max_pixels)


def _from_bytes(data: bytes | bytearray | memoryview, source: str, max_pixels: int) -> Image.Image:
    if len(data) == 0:
        raise ImageError("no image data (0 bytes); the upload did not finish, send the image again", source=source)
    return _decode(io.BytesIO(data), source, max_pixels)


def _data_uri_payload(uri: str) -> bytes:
    source = "<data URI>"
    header, comma, payload = uri.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ImageError("not a base64 data URI; expected 'data:image/<type>;base64,<data>'", source=source)
    media = header[5:].split(";", 1)[0].strip().lower()
    if media and not media.startswith("image/"):
        raise ImageError(f"media type is {media!r}, not image/...; send an image", source=source)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the payload is not valid base64 ({e}); encode the image bytes with base64",
                         source=source) from None


def _from_pil(im: Image.Image, max_pixels: int) -> Image.Image:
    source = "<PIL image>"
    _check_size(im.size, source, max_pixels)
    try:
        frame = im.tell() if getattr(im, "is_animated", False) else 0
        if frame:
            im.seek(0)
        try:
            im.load()  # a lazily opened image fails here, not later in the model
            return _to_rgb(im, source)
        finally:
            if frame:
                im.seek(frame)  # give the caller's image back as it was
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"the image cannot be decoded ({type(e).__name__}: {e}); it is truncated, corrupt or "
                         "closed: pass an open image of a complete file", source=source) from e


def _from_tensor(t: torch.Tensor, max_pixels: int) -> Image.Image:
    source = "<tensor>"
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise ImageError(f"a tensor of shape {tuple(t.shape)} is not an image; {_TENSOR_RULE}", source=source)
    c, h, w = t.shape
    _check_size((w, h), source, max_pixels)
    t = t.detach().cpu()
    if t.is_floating_point():
        f = t.float()
        lo, hi = float(f.min()), float(f.max())
        if not bool(torch.isfinite(f).all()) or lo < 0 or hi > 1:
            raise ImageError(f"float tensor values span [{lo:.4g}, {hi:.4g}], not [0, 1]; {_TENSOR_RULE}",
                             source=source)
        t = (f * 255).round().to(torch.uint8)  # round, not truncate: exact inverse of ToTensor
    elif t.dtype != torch.uint8:
        raise ImageError(f"tensor dtype {t.dtype} is not accepted; {_TENSOR_RULE}", source=source)
    arr = t.permute(1, 2, 0).contiguous().numpy()
    return _to_rgb(Image.fromarray(arr[:, :, 0] if c == 1 else arr), source)


def _from_array(a: np.ndarray, max_pixels: int) -> Image.Image:
    source = "<array>"
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        raise ImageError(f"a {a.dtype} array of shape {a.shape} is not accepted; pass uint8 (H,W) or (H,W,C) "
                         "with C in {1, 3, 4}", source=source)
    _check_size((a.shape[1], a.shape[0]), source, max_pixels)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return _to_rgb(Image.fromarray(np.ascontiguousarray(a)), source)


# --- decoding and conversion --------------------------------------------------------------------

def _check_size(size: tuple[int, int], source: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"the image has zero size ({w}x{h}); send an image with at least one pixel", source=source)
    if w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                         "downscale it or raise max_pixels", source=source)


def _formats() -> list[str]:
    Image.init()  # what Image.open does itself when a format is missing; a no-op after the first call
    return [f for f in ACCEPTED_FORMATS if f in Image.OPEN]


def _decode(fp: IO[bytes], source: str, max_pixels: int) -> Image.Image:
    """Open from the header, check the size, decode fully and convert, all before `fp` closes.

    Two limits apply: `max_pixels`, and Pillow's own `Image.MAX_IMAGE_PIXELS` (which we read, never set)."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    # catch_warnings restores the filters on exit (note: they are process-wide, not per thread, while it runs).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # at open, our checks below speak instead
        try:
            with Image.open(fp, formats=_formats()) as im:
                _check_size(im.size, source, max_pixels)  # header only: nothing decoded yet
                w, h = im.size
                if pil_limit is not None and w * h > pil_limit:
                    raise ImageError(f"image is {w}x{h} = {w * h:,} pixels, over Pillow's decompression-bomb limit of "
                                     f"{pil_limit:,} (PIL.Image.MAX_IMAGE_PIXELS); downscale it", source=source)
                # Pillow re-checks frame/tile/icon sizes while decoding GIF, TIFF, ICO: a warning there is a refusal.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
                return _to_rgb(im, source)
        except ImageError:
            raise
        except Image.UnidentifiedImageError:
            raise ImageError(f"not a readable image; expected one of {', '.join(ACCEPTED_FORMATS)}: {_FIX_FORMAT}",
                             source=source) from None
        except Image.DecompressionBombError as e:  # over 2x Pillow's limit: raised before we see the header
            found = re.search(r"\((\d+) pixels\)", str(e))
            n = int(found.group(1)) if found else None
            over = [f"the limit of {max_pixels:,}"] if n is None or n > max_pixels else []
            over.append(f"Pillow's hard limit of {2 * (pil_limit or 0):,}")
            count = f"{n:,}" if n is not None else "too many"
            raise ImageError(f"image has {count} pixels, over {' and '.join(over)}; downscale it",
                             source=source) from None
        except Image.DecompressionBombWarning as e:  # a frame, tile or icon inside the file is too large
            raise ImageError(f"refused by Pillow's decompression-bomb check ({e}); downscale it",
                             source=source) from None
        except MemoryError:
            raise
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, struct.error...
            raise ImageError(f"the image data is truncated or corrupt ({type(e).__name__}: {e}); "
                             "send the complete file, or re-save it", source=source) from None


def _to_rgb(im: Image.Image, source: str) -> Image.Image:
    """A new, loaded RGB image without metadata, by the rules in the module docstring; `im` is untouched."""
    rgb = _convert(im, source)
    rgb.info = {}  # our own new image: drop EXIF (GPS...), ICC, comments that came with the upload
    return rgb


def _convert(im: Image.Image, source: str) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)  # returns a copy, rotated if the EXIF says so
    except Exception:
        out = im.copy()  # unreadable EXIF: keep the pixels as stored rather than refuse the image
    mode, info = out.mode, out.info
    palette = getattr(out, "palette", None) if mode == "P" else None
    try:
        if mode.startswith("I;16") or mode in ("I", "F"):
            return _high_depth_to_rgb(out)
        if mode in _ALPHA_MODES or "transparency" in info or getattr(palette, "mode", "") == "RGBA":
            if mode == "La":
                out = out.convert("LA")  # Pillow has no La -> RGBA
            rgba = out if out.mode == "RGBA" else out.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return out if mode == "RGB" else out.convert("RGB")
    except ValueError as e:
        raise ImageError(f"image mode {mode!r} cannot be converted to RGB ({e}); save it as an 8-bit RGB PNG or JPEG",
                         source=source) from None


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    raw = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255
        out = np.clip(np.rint(a), 0, 255)
    else:
        a = raw.astype(np.int64)
        lo, hi = int(a.min()), int(a.max())
        if im.mode == "I" and hi <= 255:
            out = np.clip(a, 0, 255)
        elif lo >= 0 and hi <= 65535:
            out = (a + 128) // 257  # == round(v * 255 / 65535); no ties occur for integers
        else:
            out = np.rint((a - lo) * 255.0 / max(hi - lo, 1))
    out = out.astype(np.uint8)
    trns = im.info.get("transparency")
    if isinstance(trns, int) and im.mode != "F":
        out[raw == trns] = 255  # the one transparent gray value, composited over white
    return Image.fromarray(out).convert("RGB")

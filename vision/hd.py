"""InternLM-XComposer-2.5's image geometry and video front end: high-resolution tiling of an image
into 560-px crops, the token count that tiling costs, and video -> one composite image.

The facts come from upstream's remote code for internlm/internlm-xcomposer2d5-7b, `ixc_utils.py`
(`Image_transform`, `padding_336`, `Video_transform`, `frame2img`, `load_video`) and the token
layout of `build_mlp`/`img2emb` in its modeling code. Resizing and padding go through the same
torchvision calls on PIL images, so the pixels equal upstream's; the code here is our own.

Image tiling (`hd_transform`, upstream `Image_transform`; chat() passes hd_num=24, 6 when one
prompt holds several images):

* A portrait image (width < height) is transposed first and transposed back at the end, so the
  rules below always see width >= height. ratio = width / height.
* scale = the largest s with s * ceil(s / ratio) <= hd_num, then min(ceil(width / 560), scale):
  at most hd_num crops, and never upscaled past the next multiple of 560.
* Resize (torchvision, bilinear with antialias) to width scale*560 and height int(width / ratio),
  then pad the BOTTOM with white to the next multiple of 560 (`padding_336(img, 560)`).
* The result is cols x rows crops of 560 x 560 px; `hd_grid` gives (cols, rows) by arithmetic
  alone, and `hd_tokens(cols, rows) = (rows*cols + 1) * 400 + 1 + (rows + 1) * 20` is what the
  image costs in the prompt: 400 tokens per crop after 2x2 merging of the 40x40 patch grid, the
  global 560x560 view, one `glb_GN` separator, and one `sub_GN` token ending each of the 20 token
  rows of the global view and each of the rows*20 token rows of the sub-crops.
* `hd_pixels` then applies ToTensor and Normalize(CLIP_MEAN, CLIP_STD) (upstream vis_processor).

Video (`video_to_image` = `load_video` -> `frame2img` -> `video_transform`):

* `load_video` (upstream: decord) takes one frame per second by INDEX: stride =
  int(round(fps)) with fps the stream's average frame rate, positions 0, stride, 2*stride, ... <
  n_frames; if more than max_frames remain, step = len / (max_frames + 1) and position number
  int(i * step) is kept for i < max_frames. Frames are RGB PIL images.
* `frame2img` scales each frame so its longer side is 1120 px and lays the frames out on a white
  canvas, each under a 40-px strip holding the label "<IMAGE i>", 10 px apart with a black 2-px
  line between neighbours: stacked top to bottom when the LAST frame is landscape (w > h: upstream
  reads its loop variable after the loop), else side by side.
* `video_transform` (upstream `Video_transform`; it ignores hd_num) scales the composite so its
  short side is 560 and pads its long side with white (right or bottom) to a multiple of 560. The
  model encodes that composite as is (no second `hd_transform`): `grid_of` gives its crop grid.

Departures from upstream, all on inputs where upstream crashes or cannot run here:

* decord is replaced by PyAV; frames are decoded in order, not seeked, and only the selected ones
  are kept. n_frames is the stream's frame count, or its count of video packets where the
  container does not record one (WebM/MKV). stride is at least 1 (upstream's range() raises on a
  stride of 0, i.e. below 0.5 fps). Only the containers of VIDEO_EXTENSIONS are opened (FFmpeg's
  format whitelist), paths are opened by Python (no FFmpeg protocols, URLs or playlists).
* Font: upstream draws the labels with SimHei.ttf (size 40) downloaded from the hub; here the
  default is Pillow's bundled font `ImageFont.load_default(size=40)` - same text and layout,
  different glyph shapes. Pass `font=` (a .ttf/.otf path or an ImageFont) to use another.
* A side that upstream would resize to 0 px (extreme aspect ratios, e.g. 1 x 10000 with hd_num 6,
  where int(new_w / ratio) == 0) is resized to 1 px instead: upstream raises there.
* Refusals instead of crashes or unbounded work: hd_num outside 1..100, max_frames outside
  1..256, videos longer than max_duration_s, frames over max_pixels, composites over max_crops
  crops, and unreadable input, each with a message that names the input and the fix (`VideoError`,
  `vision.image.ImageError`, or ValueError for a bad argument).
* `hd_transform` defaults to hd_num=24 (what chat() uses) rather than `Image_transform`'s unused 25.
"""
from __future__ import annotations

import io
import math
import os
from functools import partial
from typing import IO, Any, Iterable, Sequence, Union

import torch
from PIL import Image, ImageDraw, ImageFont

from .image import CLIP_MEAN, CLIP_STD, DEFAULT_MAX_PIXELS, ImageError, load_image, open_user_file

__all__ = [
    "VideoError", "HD_CROP", "VIDEO_EXTENSIONS", "hd_grid", "hd_tokens", "hd_token_count", "hd_transform",
    "hd_pixels", "grid_of", "load_video", "frame2img", "video_transform", "video_to_image", "is_video_path",
]

HD_CROP = 560  # side of one crop (the CLIP ViT-L/14 at 560 px: 40x40 patches -> 20x20 = 400 tokens after 2x2 merge)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".wmv", ".webm", ".gif")

_HD_NUM_DEFAULT = 24
_HD_NUM_MAX = 100
_TOKENS_PER_CROP = 400  # (560 / 14 / 2) ** 2
_TOKEN_ROWS = 20  # token rows per crop; each ends with one sub_GN token
_FRAME_SIDE = 2 * HD_CROP  # frame2img: longer side of every frame
_LABEL_H = 40  # frame2img: label strip above each frame
_GAP = 10  # frame2img: space between frames; the separator line sits at its middle
_FONT_SIZE = 40
_WHITE = [255, 255, 255]
_TRANSPOSE = Image.Transpose.TRANSPOSE

_MAX_FRAMES_MAX = 256
_MAX_CROPS_DEFAULT = 64
_DEFAULT_MAX_DURATION_S = 600.0
# FFmpeg demuxers for VIDEO_EXTENSIONS; anything else (playlists, concat lists, image pipes...) is never probed in
_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,asf,gif"
_CONTAINERS = "MP4/MOV, MKV/WebM, AVI, WMV, GIF"
_FIX_VIDEO = "re-encode it as H.264 MP4 (e.g. `ffmpeg -i in.xxx -c:v libx264 out.mp4`) and send it again"

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes]]


# --- image tiling ---------------------------------------------------------------------------

def _tf():
    from torchvision.transforms import functional as TF  # deferred like vision.image: torchvision is heavy

    return TF


def _check_hd_num(hd_num: Any) -> None:
    if isinstance(hd_num, bool) or not isinstance(hd_num, int) or not 1 <= hd_num <= _HD_NUM_MAX:
        raise ValueError(f"hd_num must be an int in 1..{_HD_NUM_MAX} (the most 560-px crops per image; chat uses 24, "
                         f"6 when a prompt holds several images), got {hd_num!r}")


def _check_side(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int (pixels), got {v!r}")


def _hd_plan(width: int, height: int, hd_num: int) -> tuple[bool, int, int, int]:
    """(transposed, resized long side, resized short side, padded short side) of `hd_transform`."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:  # math.ceil == np.ceil on these floats
        scale += 1
    scale = min(math.ceil(width / HD_CROP), scale - 1)
    new_w = scale * HD_CROP
    new_h = max(1, int(new_w / ratio))  # upstream: int(new_w / ratio), which can be 0 (then it raises)
    return transposed, new_w, new_h, math.ceil(new_h / HD_CROP) * HD_CROP


def hd_grid(width: int, height: int, hd_num: int = _HD_NUM_DEFAULT) -> tuple[int, int]:
    """(cols, rows) of 560-px crops `hd_transform` makes of a width x height image; no pixel is touched."""
    _check_side("width", width)
    _check_side("height", height)
    _check_hd_num(hd_num)
    transposed, long_side, _, short_padded = _hd_plan(width, height, hd_num)
    cols, rows = long_side // HD_CROP, short_padded // HD_CROP
    return (rows, cols) if transposed else (cols, rows)


def hd_tokens(cols: int, rows: int) -> int:
    """Prompt tokens of an image tiled into cols x rows crops (upstream build_mlp, h=rows, w=cols):
    (rows*cols + 1) * 400 + 1 + (rows + 1) * 20."""
    _check_side("cols", cols)
    _check_side("rows", rows)
    return (rows * cols + 1) * _TOKENS_PER_CROP + 1 + (rows + 1) * _TOKEN_ROWS


def hd_token_count(width: int, height: int, hd_num: int = _HD_NUM_DEFAULT) -> int:
    """Prompt tokens of a width x height image after `hd_transform(..., hd_num)`, for budgets before loading."""
    return hd_tokens(*hd_grid(width, height, hd_num))


def _as_rgb(img: Any) -> Image.Image:
    """An RGB PIL image is used as is (pixels exactly as given); anything else goes through load_image."""
    if isinstance(img, Image.Image) and img.mode == "RGB":
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError(f"the image has zero size ({w}x{h}); send an image with at least one pixel",
                             source="<PIL image>")
        return img
    return load_image(img)


def hd_transform(img: Any, hd_num: int = _HD_NUM_DEFAULT) -> Image.Image:
    """Upstream `Image_transform`: resize and white-pad `img` to cols*560 x rows*560 px with
    (cols, rows) == hd_grid(width, height, hd_num). `img` is an RGB PIL image, or anything
    `vision.image.load_image` accepts (loaded and converted first). Returns a new RGB PIL image."""
    _check_hd_num(hd_num)
    img = _as_rgb(img)
    transposed, new_w, new_h, padded_h = _hd_plan(*img.size, hd_num)
    TF = _tf()
    if transposed:
        img = img.transpose(_TRANSPOSE)
    img = TF.resize(img, [new_h, new_w])
    img = TF.pad(img, [0, 0, 0, padded_h - new_h], fill=_WHITE)  # [left, top, right, bottom]
    return img.transpose(_TRANSPOSE) if transposed else img


def grid_of(img: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(cols, rows) of an already tiled image (a PIL image, or a tensor whose last two dims are H, W):
    its width and height must be multiples of 560."""
    if isinstance(img, Image.Image):
        w, h = img.size
    elif isinstance(img, torch.Tensor) and img.ndim >= 2:
        h, w = int(img.shape[-2]), int(img.shape[-1])
    else:
        raise TypeError(f"grid_of takes a PIL image or a (..., H, W) tensor, got {type(img).__name__}")
    if w <= 0 or h <= 0 or w % HD_CROP or h % HD_CROP:
        raise ValueError(f"the image is {w}x{h} px, not a multiple of {HD_CROP} in both sides; tile it first with "
                         "hd_transform (images) or video_transform (video composites)")
    return w // HD_CROP, h // HD_CROP


def hd_pixels(img: Any, hd_num: int | None = _HD_NUM_DEFAULT) -> torch.Tensor:
    """(1, 3, H, W) float32 model input: `hd_transform(img, hd_num)`, ToTensor, Normalize(CLIP_MEAN,
    CLIP_STD). hd_num=None takes `img` as already tiled (a `video_to_image` composite) and only
    normalizes it; its sides must then be multiples of 560."""
    if hd_num is None:
        img = _as_rgb(img)
        grid_of(img)
    else:
        img = hd_transform(img, hd_num)
    TF = _tf()
    return TF.normalize(TF.to_tensor(img), CLIP_MEAN, CLIP_STD).unsqueeze(0)


# --- video: errors and sources -----------------------------------------------------------------

class VideoError(ValueError):
    """A video that cannot be used. `.source` names it (a path, '<bytes>', a file object's name);
    `.reason` is the message without the name."""

    def __init__(self, reason: str, *, source: str = "<video>") -> None:
        self.reason, self.source = reason, source
        super().__init__(f"{source}: {reason}")

    def __reduce__(self):  # keyword-only fields survive pickling (worker processes, queues)
        return partial(VideoError, source=self.source), (self.reason,)


def is_video_path(path: Any) -> bool:
    """True for a str/PathLike whose extension (any case) is in VIDEO_EXTENSIONS."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    try:
        name = os.fsdecode(os.fspath(path))
    except (TypeError, ValueError):
        return False
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def _check_max_frames(max_frames: Any) -> None:
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or not 1 <= max_frames <= _MAX_FRAMES_MAX:
        raise ValueError(f"max_frames must be an int in 1..{_MAX_FRAMES_MAX} (frames kept from the video, one per "
                         f"second at most; upstream uses 32), got {max_frames!r}")


def _check_limits(max_duration_s: Any, max_pixels: Any) -> None:
    if (isinstance(max_duration_s, bool) or not isinstance(max_duration_s, (int, float))
            or not math.isfinite(max_duration_s) or max_duration_s <= 0):
        raise ValueError(f"max_duration_s must be a positive number of seconds, got {max_duration_s!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


class _Input:
    """A video source as a seekable binary file that FFmpeg reads through Python (never by URL)."""

    def __init__(self, source: Any) -> None:
        self.owned = False
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.name = "<bytes>"
            if len(source) == 0:
                raise VideoError("no video data (0 bytes); the upload did not finish, send the video again",
                                 source=self.name)
            self.file: IO[bytes] = io.BytesIO(source)
        elif isinstance(source, str) and source[:5].lower() == "data:":
            raise VideoError("data URIs are not read as video; base64-decode the payload and pass the bytes",
                             source="<data URI>")
        elif isinstance(source, (str, os.PathLike)):
            self.name = _source_name(source)
            self.file = self._open_path(self.name)
            self.owned = True
        elif hasattr(source, "read"):
            self.name = _source_name(source)
            self.file = self._wrap_file(source)
        else:
            raise VideoError(f"cannot use a {type(source).__name__} as a video; pass a path, bytes or a binary "
                             "file object", source=f"<{type(source).__name__}>")

    @staticmethod
    def _open_path(path: str) -> IO[bytes]:
        return open_user_file(path, "video", VideoError)

    def _wrap_file(self, f: Any) -> IO[bytes]:
        try:
            seekable = bool(f.seekable()) and f.tell() == 0
        except Exception:
            seekable = False
        if seekable:
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
            probe = b"" if size == 0 else f.read(1)
            f.seek(0)
        else:  # upload streams need not be seekable; FFmpeg must seek (MP4 index at the end): read it whole
            probe = f.read()
        if isinstance(probe, str):
            raise VideoError("the file object is open in text mode; open it with 'rb'", source=self.name)
        if not isinstance(probe, (bytes, bytearray, memoryview)):
            raise VideoError(f"read() returned {type(probe).__name__}, not bytes; pass a binary file object",
                             source=self.name)
        if len(probe) == 0:
            raise VideoError("no video data (0 bytes); the upload did not finish, send the video again",
                             source=self.name)
        return f if seekable else io.BytesIO(probe)

    def open(self):
        """A fresh PyAV container reading from the start of the data."""
        import av

        self.file.seek(0)
        try:
            return av.open(self.file, mode="r", container_options={"format_whitelist": _DEMUXERS},
                           metadata_errors="replace")
        except av.error.ArgumentError:  # the probed format is not on the whitelist
            raise VideoError(f"is not a video in a supported container ({_CONTAINERS}); {_FIX_VIDEO}",
                             source=self.name) from None
        except av.error.FFmpegError as e:
            raise _decode_error(e, self.name) from None

    def close(self) -> None:
        if self.owned:
            self.file.close()

    def __enter__(self) -> "_Input":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _source_name(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(os.fspath(source))
    name = getattr(source, "name", None) or getattr(source, "filename", None)
    return name if isinstance(name, str) and name else "<file object>"


def _decode_error(e: Exception, source: str) -> VideoError:
    import av

    detail = getattr(e, "strerror", None) or str(e)
    if isinstance(e, av.error.EOFError):
        return VideoError(f"cannot be decoded as video: the data ends early ({detail}); it is truncated: send the "
                          f"complete file, or {_FIX_VIDEO}", source=source)
    return VideoError(f"cannot be decoded as video ({type(e).__name__}: {detail}): it is not a video file, or it is "
                      f"truncated or corrupt; {_FIX_VIDEO}", source=source)


# --- video: frames ----------------------------------------------------------------------------

def _select(n_frames: int, stride: int, max_frames: int) -> list[int]:
    """Frame indices upstream's load_video keeps of n_frames: every stride-th, then max_frames of them."""
    positions = range(0, n_frames, stride)
    if len(positions) > max_frames:
        step = len(positions) / (max_frames + 1)
        return [positions[int(i * step)] for i in range(max_frames)]
    return list(positions)


def _too_long(seconds: float, max_duration_s: float, source: str) -> VideoError:
    return VideoError(f"the video lasts {seconds:.1f} s, over the limit of max_duration_s={max_duration_s:g}; "
                      "cut it shorter or raise max_duration_s", source=source)


def _too_large(w: int, h: int, max_pixels: int, source: str) -> VideoError:
    return VideoError(f"frames are {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                      "downscale the video or raise max_pixels", source=source)


def _probe(inp: _Input, max_duration_s: float, max_pixels: int) -> tuple[int, float, int]:
    """(video stream index, fps, n_frames), refusing what cannot be used before anything is decoded."""
    import av

    with inp.open() as c:
        if not c.streams.video:
            raise VideoError("has no video stream (an audio-only or empty file?); send a file with video",
                             source=inp.name)
        stream = c.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate is not None else 0.0
        if not (math.isfinite(fps) and fps > 0):
            raise VideoError(f"the video stream has no usable frame rate ({rate!r}); {_FIX_VIDEO}", source=inp.name)
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels:
            raise _too_large(w, h, max_pixels, inp.name)
        duration = None
        if c.duration is not None and c.duration > 0:
            duration = c.duration / av.time_base
        elif stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        if duration is not None and duration > max_duration_s:
            raise _too_long(duration, max_duration_s, inp.name)
        n_frames = stream.frames if stream.frames and stream.frames > 0 else None
        if n_frames is None:  # not recorded (WebM/MKV): count the stream's packets, without decoding
            n_frames, first = 0, None
            try:
                for packet in c.demux(stream):
                    if not packet.size:
                        continue  # the demuxer's end-of-stream flush packet
                    n_frames += 1
                    if packet.pts is not None and packet.time_base:
                        t = float(packet.pts * packet.time_base)
                        first = t if first is None else min(first, t)
                        if t - first > max_duration_s:
                            raise _too_long(t - first, max_duration_s, inp.name)
            except av.error.FFmpegError as e:
                raise _decode_error(e, inp.name) from None
        if n_frames == 0:
            raise VideoError(f"the video stream has no frames; {_FIX_VIDEO}", source=inp.name)
        if duration is None and n_frames / fps > max_duration_s:
            raise _too_long(n_frames / fps, max_duration_s, inp.name)
        return stream.index, fps, n_frames


def _decode(inp: _Input, stream_index: int, wanted: list[int], max_duration_s: float,
            max_pixels: int) -> tuple[dict[int, Image.Image], int]:
    """Decode in order up to the last wanted index; ({index: RGB frame}, frames decoded)."""
    import av

    want, last = set(wanted), wanted[-1]
    got: dict[int, Image.Image] = {}
    count, first = 0, None
    with inp.open() as c:
        stream = c.streams[stream_index]
        stream.thread_type = "AUTO"  # frame threads: same frames, in the same order, sooner
        try:
            for frame in c.decode(stream):
                i, count = count, count + 1
                if frame.width * frame.height > max_pixels:
                    raise _too_large(frame.width, frame.height, max_pixels, inp.name)
                t = frame.time
                if t is not None:
                    first = t if first is None else min(first, t)
                    if t - first > max_duration_s:
                        raise _too_long(t - first, max_duration_s, inp.name)
                if i in want:
                    got[i] = frame.to_image()  # rgb24, a new image that holds no decoder memory
                if i >= last:
                    break
        except VideoError:
            raise
        except av.error.FFmpegError as e:
            raise _decode_error(e, inp.name) from None
    return got, count


def load_video(source: VideoSource, *, max_frames: int = 32, max_duration_s: float = _DEFAULT_MAX_DURATION_S,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """Upstream `load_video`: one frame per second (by index: every int(round(fps))-th frame), at most
    `max_frames` of them spread as upstream does, as RGB PIL images in order. `source` is a path, bytes
    or a binary file object. Raises VideoError for anything unusable; ValueError for bad arguments."""
    _check_max_frames(max_frames)
    _check_limits(max_duration_s, max_pixels)
    with _Input(source) as inp:
        stream_index, fps, n_frames = _probe(inp, max_duration_s, max_pixels)
        stride = max(1, int(round(fps)))  # upstream: int(round(float(fps) / int(1))); range() refuses 0
        wanted = _select(n_frames, stride, max_frames)
        got, count = _decode(inp, stream_index, wanted, max_duration_s, max_pixels)
        if len(got) < len(wanted) and count > 0:  # fewer frames than the container claims: plan again on the truth
            wanted = _select(count, stride, max_frames)
            got, count = _decode(inp, stream_index, wanted, max_duration_s, max_pixels)
        if not got:
            raise VideoError(f"no frame of the video could be decoded; {_FIX_VIDEO}", source=inp.name)
        return [got[i] for i in wanted if i in got]


# --- video: composite ---------------------------------------------------------------------------

def _frame_size(w: int, h: int) -> tuple[int, int]:
    """frame2img's size for a w x h frame: longer side 1120 (the other side at least 1: upstream raises at 0)."""
    if w > h:
        return _FRAME_SIDE, max(1, int(_FRAME_SIDE / (w / h)))
    return max(1, int(_FRAME_SIDE * (w / h))), _FRAME_SIDE


def _layout(sizes: Sequence[tuple[int, int]]) -> tuple[bool, list[tuple[int, int]], tuple[int, int]]:
    """(stacked top to bottom?, resized frame sizes, canvas size) of frame2img for frames of `sizes`."""
    resized = [_frame_size(w, h) for w, h in sizes]
    w, h = sizes[-1]
    vertical = w > h  # the last frame decides, as upstream's loop variable does
    if vertical:
        canvas = (max(rw for rw, _ in resized), sum(rh + _GAP + _LABEL_H for _, rh in resized))
    else:
        canvas = (sum(rw + _GAP for rw, _ in resized), max(rh for _, rh in resized) + _LABEL_H)
    return vertical, resized, canvas


def _video_transform_size(w: int, h: int) -> tuple[int, int]:
    long_side, short_side = (h, w) if w < h else (w, h)
    padded = math.ceil(int(HD_CROP * (long_side / short_side)) / HD_CROP) * HD_CROP
    return (HD_CROP, padded) if w < h else (padded, HD_CROP)


def _font(font: Any) -> Any:
    if font is None:
        return ImageFont.load_default(size=_FONT_SIZE)  # a new object per call: FreeType faces are not thread-safe
    if isinstance(font, (ImageFont.ImageFont, ImageFont.FreeTypeFont, ImageFont.TransposedFont)):
        return font
    if isinstance(font, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(font))
        try:
            return ImageFont.truetype(path, size=_FONT_SIZE)
        except OSError as e:
            raise ValueError(f"font {path}: cannot be loaded as a TrueType/OpenType font ({e}); pass the path of a "
                             ".ttf/.otf file, or font=None for Pillow's bundled font") from None
    raise TypeError(f"font must be None, a font file path or a PIL ImageFont, got {type(font).__name__}")


def frame2img(frames: Iterable[Image.Image], font: Any = None) -> Image.Image:
    """Upstream `frame2img`: the frames, each scaled to a longer side of 1120 px and labelled
    "<IMAGE i>", on one white RGB canvas (layout in the module docstring). `font`: None (Pillow's
    bundled font at size 40), a .ttf/.otf path (loaded at size 40) or a PIL ImageFont."""
    frames = list(frames)
    if not frames:
        raise ValueError("frame2img needs at least one frame; got none")
    for k, f in enumerate(frames):
        if not isinstance(f, Image.Image) or f.width <= 0 or f.height <= 0:
            raise ValueError(f"frame {k} is not a non-empty PIL image ({type(f).__name__}); pass PIL images")
    font = _font(font)
    vertical, resized_sizes, canvas_size = _layout([f.size for f in frames])
    TF = _tf()
    resized = [TF.resize(f if f.mode == "RGB" else f.convert("RGB"), [rh, rw])
               for f, (rw, rh) in zip(frames, resized_sizes)]
    canvas = Image.new("RGB", canvas_size, "white")
    draw = ImageDraw.Draw(canvas)
    cw, ch = canvas_size
    offset = 0
    for idx, im in enumerate(resized):
        w, h = im.size
        last = idx + 1 == len(resized)
        if vertical:
            canvas.paste(im, (0, _LABEL_H + offset))
            draw.text((0, offset), f"<IMAGE {idx}>", font=font, fill="black")
            if not last:
                y = _LABEL_H + offset + h + _GAP // 2
                draw.line([(0, y), (cw, y)], fill="black", width=2)
            offset += h + _GAP + _LABEL_H
        else:
            canvas.paste(im, (offset, _LABEL_H))
            draw.text((offset, 0), f"<IMAGE {idx}>", font=font, fill="black")
            if not last:
                x = offset + w + _GAP // 2
                draw.line([(x, 0), (x, ch)], fill="black", width=2)
            offset += w + _GAP
    return canvas


def video_transform(img: Any) -> Image.Image:
    """Upstream `Video_transform`: scale so the short side is 560 px (long side int(560 * long/short)),
    then pad the long side with white (bottom, or right for a wide image) to a multiple of 560."""
    img = _as_rgb(img)
    TF = _tf()
    w, h = img.size
    transposed = w < h
    if transposed:
        img = img.transpose(_TRANSPOSE)
        w, h = h, w
    new_w = int(HD_CROP * (w / h))
    img = TF.resize(img, [HD_CROP, new_w]).transpose(_TRANSPOSE)  # now HD_CROP wide, new_w tall
    img = TF.pad(img, [0, 0, 0, math.ceil(new_w / HD_CROP) * HD_CROP - new_w], fill=_WHITE)
    return img if transposed else img.transpose(_TRANSPOSE)


def video_to_image(source: VideoSource, *, max_frames: int = 32, max_duration_s: float = _DEFAULT_MAX_DURATION_S,
                   max_pixels: int = DEFAULT_MAX_PIXELS, max_crops: int = _MAX_CROPS_DEFAULT,
                   font: Any = None) -> Image.Image:
    """The one image the model encodes for a video: load_video -> frame2img -> video_transform.
    Its sides are multiples of 560 (`grid_of` gives the crop grid); encode it without hd_transform.
    Refuses (VideoError, before drawing) a composite of more than `max_crops` crops."""
    if isinstance(max_crops, bool) or not isinstance(max_crops, int) or max_crops <= 0:
        raise ValueError(f"max_crops must be a positive int, got {max_crops!r}")
    frames = load_video(source, max_frames=max_frames, max_duration_s=max_duration_s, max_pixels=max_pixels)
    sizes = [f.size for f in frames]

    def crops(k: int) -> tuple[int, int]:
        cols, rows = _video_transform_size(*_layout(sizes[:k])[2])
        return cols // HD_CROP, rows // HD_CROP

    cols, rows = crops(len(sizes))
    if cols * rows > max_crops:
        fits = max((k for k in range(1, len(sizes)) if math.prod(crops(k)) <= max_crops), default=0)
        hint = f"lower max_frames to {fits} or less" if fits else "use a video with fewer or smaller frames"
        raise VideoError(f"its {len(frames)} frames make a composite of {cols}x{rows} = {cols * rows} crops of "
                         f"{HD_CROP} px, over max_crops={max_crops}; {hint}, or raise max_crops",
                         source=_source_name(source))
    return video_transform(frame2img(frames, font))

"""vision.image: every input kind, every pixel mode, every refusal. All images are made here with PIL."""
from __future__ import annotations

import base64
import io
import pickle
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision.image import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    IMAGE_SIZE,
    ImageError,
    load_image,
    load_images,
    preprocess,
    to_data_uri,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def px(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def photo(w: int = 40, h: int = 20) -> Image.Image:
    """Blue with a red 10x10 marker in the top-left corner."""
    im = Image.new("RGB", (w, h), BLUE)
    im.paste(RED, (0, 0, 10, 10))
    return im


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A ~70-byte PNG whose header says w x h: a decompression bomb that costs nothing to make."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", w, h)  # IHDR payload starts at byte 16
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def refused(src, *words: str, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(src, **kw)
    msg = str(info.value)
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    return info.value


# --- inputs ---------------------------------------------------------------------------------

def test_every_input_kind_gives_the_same_rgb_pixels(tmp_path: Path) -> None:
    p = tmp_path / "photo.png"
    photo().save(p)
    want = arr(photo())
    data = p.read_bytes()
    with open(p, "rb") as f:
        from_file = load_image(f)
    srcs = [str(p), p, data, bytearray(data), memoryview(data), io.BytesIO(data), photo(),
            torch.from_numpy(want.copy()).permute(2, 0, 1), want.copy()]
    for src in [*srcs, from_file]:
        img = src if isinstance(src, Image.Image) and src is from_file else load_image(src)
        assert img.mode == "RGB" and img.size == (40, 20)
        np.testing.assert_array_equal(arr(img), want)


def test_pil_input_is_not_modified_and_result_is_a_copy() -> None:
    src = photo()
    out = load_image(src)
    out.putpixel((0, 0), (1, 2, 3))
    assert src.getpixel((0, 0)) == RED and src.mode == "RGB"


def test_tensor_uint8_and_float_inputs() -> None:
    u8 = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(arr(load_image(u8)), u8.permute(1, 2, 0).numpy())
    # ToTensor's v/255 comes back exactly (rounded, not truncated), in every float dtype
    for dt in (torch.float32, torch.float64, torch.float16):
        np.testing.assert_array_equal(arr(load_image(u8.to(dt) / 255)), u8.permute(1, 2, 0).numpy())
    gray = load_image(torch.full((1, 2, 2), 0.5))
    assert px(gray, (1, 1)) == (128, 128, 128)
    rgba = torch.zeros(4, 1, 2)
    rgba[:, 0, 0] = torch.tensor([1.0, 0, 0, 1])  # opaque red
    rgba[:, 0, 1] = torch.tensor([0.2, 0.9, 0.1, 0])  # transparent, garbage colour
    out = load_image(rgba)
    assert px(out, (0, 0)) == RED and px(out, (1, 0)) == WHITE


@pytest.mark.parametrize("t, words", [
    (torch.zeros(2, 4, 4, dtype=torch.uint8), ["(2, 4, 4)", "uint8 (C,H,W)", "encode_image"]),
    (torch.zeros(1, 3, 4, 4), ["(1, 3, 4, 4)", "C in {1, 3, 4}"]),
    (torch.zeros(4, 4), ["(4, 4)", "(C,H,W)"]),
    (torch.zeros(3, 4, 4, dtype=torch.int64), ["torch.int64", "uint8"]),
    (torch.full((3, 4, 4), -1.8), ["-1.8", "[0, 1]", "normalized", "encode_image"]),
    (torch.full((3, 4, 4), float("nan")), ["[0, 1]"]),
])
def test_tensor_refusals_say_what_is_accepted(t: torch.Tensor, words: list[str]) -> None:
    e = refused(t, "<tensor>", *words)
    assert e.source == "<tensor>" and e.index is None


def test_numpy_refusal_and_other_types() -> None:
    refused(np.zeros((4, 4), np.float32), "<array>", "uint8")
    refused(12, "<int>", "path", "bytes", "tensor")
    refused(io.StringIO("abc"), "text mode", "'rb'")


def test_data_uri_round_trip_is_pixel_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (9, 13, 4), dtype=np.uint8))
    uri = to_data_uri(rgba)
    assert uri.startswith("data:image/png;base64,")
    np.testing.assert_array_equal(arr(load_image(uri)), arr(load_image(rgba)))
    p = tmp_path / "p.jpg"
    photo().save(p, quality=80)
    np.testing.assert_array_equal(arr(load_image(to_data_uri(p))), arr(load_image(p)))
    # whitespace/newlines in the payload are tolerated; max_side shrinks keeping the aspect ratio
    assert load_image(uri[:40] + "\n" + uri[40:]).size == (13, 9)
    assert load_image(to_data_uri(photo(), max_side=10)).size == (10, 5)


@pytest.mark.parametrize("uri, words", [
    ("data:text/plain;base64,aGVsbG8=", ["<data URI>", "text/plain", "image"]),
    ("data:image/png,rawbytes", ["<data URI>", "base64"]),
    ("data:image/png;base64,@@@@", ["<data URI>", "not valid base64"]),
    ("data:image/png;base64,", ["<data URI>", "0 bytes"]),
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", ["<data URI>", "not a readable image", "PNG"]),
])
def test_bad_data_uris(uri: str, words: list[str]) -> None:
    refused(uri, *words)


# --- modes ----------------------------------------------------------------------------------

def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (10, 200, 30, 0))  # transparent, garbage colour underneath
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (255, 0, 0, 128))
    p = tmp_path / "rgba.png"
    im.save(p)
    out = load_image(p)
    assert px(out, (0, 0)) == WHITE and px(out, (1, 0)) == RED
    assert close(px(out, (2, 0)), (255, 127, 127), 1)  # 50% red over white


def test_la_and_pa_are_composited_over_white(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (7, 0))
    la.putpixel((1, 0), (50, 255))
    la.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert px(out, (0, 0)) == WHITE and px(out, (1, 0)) == (50, 50, 50)

    p = Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    pa = p.convert("PA")
    pa.putpixel((0, 0), (0, 255))  # opaque red
    pa.putpixel((1, 0), (1, 0))  # transparent blue
    pa.putpixel((2, 0), (1, 128))  # half blue
    out = load_image(pa)
    assert px(out, (0, 0)) == RED and px(out, (1, 0)) == WHITE
    assert close(px(out, (2, 0)), (127, 127, 255), 1)

    la_pre = la.convert("La")  # premultiplied, Pillow-internal
    assert px(load_image(la_pre), (0, 0)) == WHITE


def test_transparency_entries_of_p_l_and_rgb(tmp_path: Path) -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([10, 20, 30, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert px(out, (0, 0)) == WHITE and px(out, (1, 0)) == RED

    g = Image.new("L", (2, 1), 0)
    g.putpixel((1, 0), 100)
    g.save(tmp_path / "l.png", transparency=0)
    out = load_image(tmp_path / "l.png")
    assert px(out, (0, 0)) == WHITE and px(out, (1, 0)) == (100, 100, 100)

    rgb = Image.new("RGB", (2, 1), (1, 2, 3))
    rgb.putpixel((1, 0), (9, 9, 9))
    rgb.save(tmp_path / "rgb.png", transparency=(1, 2, 3))
    out = load_image(tmp_path / "rgb.png")
    assert px(out, (0, 0)) == WHITE and px(out, (1, 0)) == (9, 9, 9)

    q = Image.new("P", (2, 1))  # a palette that carries alpha itself
    q.putpalette([0, 255, 0, 0, 0, 0, 255, 255] + [0] * 1016, "RGBA")
    q.putpixel((1, 0), 1)
    out = load_image(q)
    assert px(out, (0, 0)) == WHITE and px(out, (1, 0)) == BLUE


def test_plain_palette_bilevel_and_gray(tmp_path: Path) -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([0, 128, 0, 1, 2, 3] + [0] * 762)
    p.putpixel((1, 0), 1)
    out = load_image(p)
    assert px(out, (0, 0)) == (0, 128, 0) and px(out, (1, 0)) == (1, 2, 3)

    bw = Image.new("1", (2, 1), 0)
    bw.putpixel((1, 0), 1)
    bw.save(tmp_path / "bw.png")
    with Image.open(tmp_path / "bw.png") as src:
        assert src.mode == "1"
    out = load_image(tmp_path / "bw.png")
    assert px(out, (0, 0)) == (0, 0, 0) and px(out, (1, 0)) == WHITE

    g = Image.new("L", (1, 1), 77)
    g.save(tmp_path / "g.jpg")  # an 8-bit gray JPEG
    assert close(px(load_image(tmp_path / "g.jpg"), (0, 0)), (77, 77, 77), 1)
    assert px(load_image(g), (0, 0)) == (77, 77, 77)


def test_cmyk(tmp_path: Path) -> None:
    im = Image.new("CMYK", (4, 1))
    for x, c in enumerate([(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)]):
        im.putpixel((x, 0), c)
    im.save(tmp_path / "cmyk.tif")
    out = load_image(tmp_path / "cmyk.tif")
    assert [px(out, (x, 0)) for x in range(4)] == [(0, 255, 255), (255, 0, 255), (0, 0, 0), WHITE]
    im.save(tmp_path / "cmyk.jpg", quality=95)  # Adobe-style CMYK JPEG
    assert close(px(load_image(tmp_path / "cmyk.jpg"), (0, 0)), (0, 255, 255), 40)


def test_16_bit_gray_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    v = np.array([[0, 128, 129, 1000, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as src:
        assert src.mode.startswith("I")  # really a 16-bit image on the way in
        assert src.convert("RGB").getpixel((3, 0)) == WHITE  # what Pillow alone does: 1000 -> clipped to white
    out = arr(load_image(tmp_path / "g16.png"))[0, :, 0]
    want = [round(int(x) * 255 / 65535) for x in v[0]]
    assert out.tolist() == want == [0, 0, 1, 4, 100, 255]


def test_16_bit_byte_orders_in_memory() -> None:
    v = [0, 1000, 65535]
    for mode, fmt in [("I;16B", ">3H"), ("I;16L", "<3H"), ("I;16", "<3H")]:
        im = Image.frombytes(mode, (3, 1), struct.pack(fmt, *v))
        assert arr(load_image(im))[0, :, 1].tolist() == [0, 4, 255], mode
    with_trns = Image.frombytes("I;16", (3, 1), struct.pack("<3H", *v))
    with_trns.info["transparency"] = 1000  # what a 16-bit PNG with a tRNS chunk opens as
    assert arr(load_image(with_trns))[0, :, 0].tolist() == [0, 255, 255]


def test_32_bit_int_and_float_rules() -> None:
    def gray(mode: str, values: list) -> list[int]:
        dtype = np.int32 if mode == "I" else np.float32
        im = Image.fromarray(np.array([values], dtype=dtype))
        assert im.mode == mode
        return arr(load_image(im))[0, :, 0].tolist()

    assert gray("I", [0, 7, 255]) == [0, 7, 255]  # fits 8 bits: as is
    assert gray("I", [-5, 7, 200]) == [0, 7, 200]  # 8-bit, negatives clip
    assert gray("I", [0, 1000, 65535]) == [0, 4, 255]  # 16-bit rule
    assert gray("I", [-100, 0, 100000]) == [0, 0, 255]  # min-max
    assert gray("I", [0, 50000, 100000]) == [0, 128, 255]
    assert gray("F", [0.0, 0.5, 1.0]) == [0, 128, 255]  # [0, 1] -> x255
    assert gray("F", [-5.0, 100.4, 300.0]) == [0, 100, 255]  # read as 0..255, clipped
    assert gray("F", [float("nan"), 2.0, 3.0]) == [0, 2, 3]


def test_ycbcr_lab_hsv_rgbx() -> None:
    src = Image.new("RGB", (1, 1), (200, 30, 60))
    for mode in ("YCbCr", "LAB", "HSV"):
        assert close(px(load_image(src.convert(mode)), (0, 0)), (200, 30, 60), 6), mode
    assert close(px(load_image(Image.new("LAB", (1, 1), (255, 128, 128))), (0, 0)), WHITE, 2)
    assert px(load_image(src.convert("RGBX")), (0, 0)) == (200, 30, 60)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(tmp_path: Path, fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / f"rot.{fmt.lower()}"
    photo(40, 20).save(p, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt != "PNG" else {}))
    with Image.open(p) as src:
        assert src.getexif().get(0x0112) == 6
    out = load_image(p)
    assert out.size == (20, 40)  # width and height swapped
    tol = 0 if fmt == "PNG" else 40
    assert close(px(out, (15, 4)), RED, tol) and close(px(out, (4, 4)), BLUE, tol)  # marker moved top-left -> top-right
    assert close(px(out, (4, 30)), BLUE, tol)


def test_metadata_is_dropped() -> None:
    exif = Image.Exif()
    exif[0x010F] = "SomeCamera"  # Make; GPS would travel the same way
    buf = io.BytesIO()
    photo().save(buf, "JPEG", exif=exif.tobytes(), icc_profile=b"not-a-real-profile", comment=b"hi")
    with Image.open(io.BytesIO(buf.getvalue())) as src:
        assert {"exif", "icc_profile"} <= set(src.info)
    assert load_image(buf.getvalue()).info == {}
    with Image.open(io.BytesIO(base64.b64decode(to_data_uri(buf.getvalue()).split(",", 1)[1]))) as back:
        assert "exif" not in back.info and "icc_profile" not in back.info

def test_animated_gif_gives_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in (RED, BLUE, (0, 255, 0))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert px(load_image(p), (1, 1)) == RED
    with Image.open(p) as im:
        assert im.n_frames == 3
        im.seek(2)
        assert px(load_image(im), (1, 1)) == RED and im.tell() == 2  # the caller's frame position is kept
    apng = tmp_path / "anim.png"
    frames[1].save(apng, save_all=True, append_images=[frames[0]], duration=50)
    assert px(load_image(apng), (0, 0)) == BLUE


def test_gif_transparency_becomes_white(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "t.gif", transparency=1)
    out = load_image(tmp_path / "t.gif")
    assert px(out, (0, 0)) == RED and px(out, (1, 0)) == WHITE


# --- refusals -------------------------------------------------------------------------------

def test_missing_path_directory_and_empty_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    e = refused(missing, str(missing), "no such file", "check the path")
    assert e.source == str(missing)
    refused(tmp_path, str(tmp_path), "is a directory", "path of an image file")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    refused(empty, str(empty), "empty (0 bytes)", "send the image again")
    refused(b"", "<bytes>", "0 bytes", "send the image again")
    refused(io.BytesIO(b""), "0 bytes")
    refused("https://example.com/cat.png", "https", "download")


def test_text_file_is_not_a_readable_image(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n" * 10)
    refused(p, str(p), "not a readable image", "PNG", "JPEG", "save it as PNG or JPEG")
    with open(p, "rb") as f:
        refused(f, str(p), "not a readable image")
    refused(b"%!PS-Adobe-3.0 EPSF-3.0\n", "not a readable image")  # EPS would run Ghostscript: never opened


@pytest.mark.parametrize("fmt", ["EPS", "PCX", "SGI"])
def test_formats_outside_the_allowlist_are_refused(fmt: str) -> None:
    buf = io.BytesIO()
    photo().save(buf, fmt)  # Pillow itself would open these (EPS by running Ghostscript)
    refused(buf.getvalue(), "not a readable image", "PNG, JPEG")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_are_refused_at_load_time(tmp_path: Path, fmt: str) -> None:
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    full = tmp_path / f"full.{fmt.lower()}"
    noise.save(full, fmt)
    half = tmp_path / f"half.{fmt.lower()}"
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with Image.open(half) as lazy:  # Pillow alone opens it lazily without complaint...
        refused(lazy, "<PIL image>", "truncated")  # ...we decode and refuse
    refused(half, str(half), "truncated or corrupt", "send the complete file")
    refused(half.read_bytes(), "<bytes>", "truncated")


def test_corrupt_png_data_is_refused() -> None:
    data = bytearray(png_bytes(photo()))
    idat = data.index(b"IDAT")
    data[idat + 8: idat + 20] = b"\x00" * 12  # scramble compressed pixels
    refused(bytes(data), "<bytes>", "corrupt")


def test_zero_size_images() -> None:
    refused(Image.new("RGB", (0, 5)), "<PIL image>", "zero size (0x5)", "at least one pixel")
    refused(torch.zeros(3, 0, 4, dtype=torch.uint8), "<tensor>", "zero size")
    refused(png_claiming(0, 5), "<bytes>")  # Pillow rejects the header itself


def test_pixel_cap_is_checked_from_the_header(tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    p.write_bytes(png_claiming(10000, 8000))  # 80 Mpx, < 100 bytes on disk
    assert p.stat().st_size < 100 and DEFAULT_MAX_PIXELS < 80_000_000
    refused(p, str(p), "image is 10000x8000 = 80,000,000 pixels, over the limit of 64,000,000",
            "downscale it or raise max_pixels")
    refused(png_claiming(20000, 20000), "<bytes>", "400,000,000 pixels", "downscale")
    refused(photo(), "<PIL image>", "40x20 = 800 pixels, over the limit of 799", max_pixels=799)
    refused(png_bytes(photo()), "<bytes>", "over the limit of 100", max_pixels=100)
    refused(torch.zeros(3, 40, 20, dtype=torch.uint8), "<tensor>", "over the limit", max_pixels=100)
    assert load_image(photo(), max_pixels=800).size == (40, 20)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(photo(), max_pixels=0)


def test_pillow_bomb_limits_are_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # restored after the test
    refused(png_bytes(Image.new("L", (40, 40))), "1,600 pixels", "Pillow", "downscale")  # over the warning level
    refused(png_bytes(Image.new("L", (50, 50))), "2,500 pixels", "Pillow's hard limit of 2,000")  # Pillow's error
    assert load_image(png_bytes(Image.new("L", (30, 30)))).size == (30, 30)


def test_no_file_handle_is_left_open(tmp_path: Path) -> None:
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        pytest.skip("needs /proc")
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    photo().save(good)
    bad.write_bytes(good.read_bytes()[:60])
    before = len(os.listdir(fd_dir))
    for _ in range(20):
        load_image(good)
        with pytest.raises(ImageError):
            load_image(bad)
    assert len(os.listdir(fd_dir)) == before


# --- batches and preprocessing ------------------------------------------------------------------

def test_load_images_reports_which_one_failed(tmp_path: Path) -> None:
    good = tmp_path / "dog.png"
    photo().save(good)
    bad = tmp_path / "cat.png"
    bad.write_text("meow")
    with pytest.raises(ImageError) as info:
        load_images([good, photo(), bad, good])
    e = info.value
    assert str(e).startswith(f"image 3 of 4 ({bad}): ") and "not a readable image" in str(e)
    assert e.index == 2 and e.source == str(bad)
    again = pickle.loads(pickle.dumps(e))  # e.g. raised in a worker process
    assert (str(again), again.source, again.index, again.reason) == (str(e), e.source, e.index, e.reason)
    out = load_images([good, photo().convert("L"), to_data_uri(good)])
    assert [im.mode for im in out] == ["RGB"] * 3
    assert len(load_images(good)) == 1 and load_images([]) == []


def test_preprocess_matches_torchvision_exactly(tmp_path: Path) -> None:
    from torchvision import transforms as T

    reference = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize(CLIP_MEAN, CLIP_STD)])
    rng = np.random.default_rng(2)
    wide = Image.fromarray(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8))
    big = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    x = preprocess(wide)
    assert x.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert torch.equal(x[0], reference(wide))
    p = tmp_path / "big.png"
    big.save(p)
    batch = preprocess([p, wide, big.convert("RGBA")])
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.float32
    for got, im in zip(batch, [big, wide, big]):
        assert torch.equal(got, reference(im))
    assert preprocess(wide, size=32).shape == (1, 3, 32, 32)


def test_preprocess_refusals(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no images"):
        preprocess([])
    with pytest.raises(ImageError, match=r"image 2 of 2 \(<tensor>\).*encode_image"):
        preprocess([photo(), torch.zeros(1, 3, 224, 224)])

"""vision.hd image geometry: hd_transform against upstream's Image_transform written out here from its
description (numpy + torchvision, as ixc_utils.py does), hd_grid/hd_tokens arithmetic, hd_pixels, refusals."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from vision.hd import HD_CROP, grid_of, hd_grid, hd_pixels, hd_token_count, hd_tokens, hd_transform
from vision.image import CLIP_MEAN, CLIP_STD, ImageError


def upstream_image_transform(img: Image.Image, hd_num: int, *, min_side: int = 0) -> Image.Image:
    """Image_transform + padding_336(., 560) of internlm-xcomposer2d5-7b, step by step. min_side=1 adds our
    one departure (a side that would be resized to 0 px becomes 1 px); 0 keeps upstream's behaviour."""
    w, h = img.size
    flipped = w < h
    if flipped:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        w, h = img.size
    r = w / h
    s = 1
    while s * np.ceil(s / r) <= hd_num:
        s += 1
    s -= 1
    s = min(np.ceil(w / 560), s)  # may be a numpy float, as upstream
    tw = int(s * 560)
    th = max(min_side, int(tw / r))
    img = transforms.functional.resize(img, [th, tw])
    target = int(np.ceil(th / 560) * 560)
    img = transforms.functional.pad(img, [0, 0, 0, target - th], fill=[255, 255, 255])
    return img.transpose(Image.Transpose.TRANSPOSE) if flipped else img


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7919 * w + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


CASES = [  # (width, height, hd_num)
    (1000, 600, 24), (600, 1000, 24), (560, 560, 24), (1120, 1120, 24), (10, 7, 24), (1, 1, 24),
    (3, 500, 24), (1000, 600, 1), (600, 1000, 6), (1000, 600, 55), (1300, 700, 6), (4000, 3000, 24),
    (4000, 3000, 6), (3000, 4000, 55), (1, 10000, 24), (10000, 1, 24), (2000, 200, 1), (561, 560, 24),
    (7, 20000, 24),  # scale min(ceil(20000/560) = 36, 24) = 24: 13440 x int(13440 * 7 / 20000) = 4 px, no clamp
]


@pytest.mark.parametrize("w,h,hd_num", CASES)
def test_matches_upstream_pixels(w, h, hd_num):
    img = noise(w, h)
    ours = hd_transform(img, hd_num)
    ref = upstream_image_transform(img, hd_num)
    assert ours.mode == "RGB" and ours.size == ref.size
    assert ours.width % HD_CROP == 0 and ours.height % HD_CROP == 0
    assert np.array_equal(np.asarray(ours), np.asarray(ref))
    assert hd_grid(w, h, hd_num) == (ours.width // HD_CROP, ours.height // HD_CROP) == grid_of(ours)
    cols, rows = hd_grid(w, h, hd_num)
    assert cols * rows <= hd_num
    assert hd_token_count(w, h, hd_num) == hd_tokens(cols, rows) == (rows * cols + 1) * 400 + 1 + (rows + 1) * 20
    assert img.size == (w, h)  # the input is not modified


@pytest.mark.parametrize("w,h,hd_num,size", [
    (1, 10000, 6, (560, 3360)),  # transposed: ratio 10000, scale 6 -> 3360 x int(0.336) = 0 rows upstream
    (10000, 1, 6, (3360, 560)),
    (1, 1000, 1, (560, 560)),  # hd_num 1: scale 1 -> 560 x int(0.56) = 0
])
def test_zero_side_is_clamped_to_one_pixel(w, h, hd_num, size):
    img = noise(w, h)
    with pytest.raises(ValueError):  # upstream crashes on these (PIL refuses a 0-px side)
        upstream_image_transform(img, hd_num)
    ours = hd_transform(img, hd_num)
    assert ours.size == size
    assert np.array_equal(np.asarray(ours), np.asarray(upstream_image_transform(img, hd_num, min_side=1)))
    assert hd_grid(w, h, hd_num) == (size[0] // 560, size[1] // 560)


def test_hand_computed_geometry():
    # 1000x600, hd 24: ratio 5/3, largest s with s*ceil(3s/5) <= 24 is 6 (6*4); min(ceil(1000/560)=2, 6) = 2;
    # 1120 x int(1120 / (5/3)) = 672 -> padded to 1120: 2x2 crops
    assert hd_grid(1000, 600, 24) == (2, 2) and hd_grid(600, 1000, 24) == (2, 2)
    assert hd_token_count(1000, 600, 24) == 5 * 400 + 1 + 3 * 20 == 2061
    # 4000x3000: s*ceil(3s/4) <= 24 -> 5 (5*4=20; 6*5=30), min(8, 5) = 5; 2800 x 2100 -> 2240: 5 cols, 4 rows
    assert hd_grid(4000, 3000, 24) == (5, 4) and hd_grid(3000, 4000, 24) == (4, 5)
    # hd 6: s=2 -> 2*ceil(1.5) = 4 <= 6, s=3 -> 3*ceil(2.25) = 9 > 6: scale 2, 1120 x 840 -> 1120: 2x2
    assert hd_grid(4000, 3000, 6) == (2, 2)
    assert hd_grid(1, 10000, 24) == (1, 18)  # scale min(ceil(10000/560) = 18, 24)
    assert hd_grid(1, 1, 24) == (1, 1) and hd_grid(560, 560, 1) == (1, 1)


def test_tokens_use_rows_for_the_newline_term():
    assert hd_tokens(1, 1) == 2 * 400 + 1 + 2 * 20 == 841
    assert hd_tokens(3, 1) == 4 * 400 + 1 + 2 * 20 == 1641  # 3 crops side by side: 20 token rows of sub-crops
    assert hd_tokens(1, 3) == 4 * 400 + 1 + 4 * 20 == 1681  # 3 crops stacked: 60 token rows


def test_hd_pixels_shape_and_normalization():
    colour = (10, 128, 250)
    t = hd_pixels(Image.new("RGB", (560, 560), colour), 24)  # 560x560 is kept as is: resize to its own size
    assert t.shape == (1, 3, 560, 560) and t.dtype == torch.float32
    for c in range(3):
        assert t[0, c, 17, 300].item() == pytest.approx((colour[c] / 255 - CLIP_MEAN[c]) / CLIP_STD[c], abs=1e-6)
    t = hd_pixels(Image.new("RGB", (1000, 600), colour), 24)  # 1120 x 672 + 448 white rows at the bottom
    assert t.shape == (1, 3, 1120, 1120)
    for c in range(3):
        assert t[0, c, 1119, 5].item() == pytest.approx((1 - CLIP_MEAN[c]) / CLIP_STD[c], abs=1e-6)
        assert t[0, c, 300, 500].item() == pytest.approx((colour[c] / 255 - CLIP_MEAN[c]) / CLIP_STD[c], abs=1e-6)
    tiled = hd_transform(noise(700, 300), 6)
    assert torch.equal(hd_pixels(tiled, None), transforms.Normalize(CLIP_MEAN, CLIP_STD)(
        transforms.ToTensor()(tiled)).unsqueeze(0))
    with pytest.raises(ValueError, match="multiple of 560"):
        hd_pixels(noise(700, 300), None)


def test_other_inputs_go_through_load_image():
    rgba = Image.new("RGBA", (300, 200), (255, 0, 0, 0))  # fully transparent: composited over white
    out = hd_transform(rgba, 6)
    assert out.mode == "RGB" and out.size == (560, 560) and out.getpixel((10, 10)) == (255, 255, 255)
    gray = Image.new("L", (300, 200), 77)
    assert hd_transform(gray, 6).getpixel((10, 10)) == (77, 77, 77)
    with pytest.raises(ImageError, match="zero size"):
        hd_transform(Image.new("RGB", (0, 5)), 6)


def test_grid_of():
    assert grid_of(Image.new("RGB", (1120, 560))) == (2, 1)
    assert grid_of(torch.zeros(1, 3, 560, 1680)) == (3, 1)
    with pytest.raises(ValueError, match="561x560 px, not a multiple of 560"):
        grid_of(Image.new("RGB", (561, 560)))
    with pytest.raises(TypeError):
        grid_of(np.zeros((560, 560)))


@pytest.mark.parametrize("bad", [0, 101, -1, 2.5, True, "24", None])
def test_hd_num_refused(bad):
    img = Image.new("RGB", (100, 100))
    pattern = r"hd_num must be an int in 1\.\.100.*got " + re.escape(repr(bad))
    for call in (lambda: hd_transform(img, bad), lambda: hd_grid(100, 100, bad),
                 lambda: hd_token_count(100, 100, bad)):
        with pytest.raises(ValueError, match=pattern):
            call()
    if bad is not None:
        with pytest.raises(ValueError, match="hd_num"):
            hd_pixels(img, bad)


@pytest.mark.parametrize("args", [(0, 10), (10, 0), (10.0, 10), (True, 10)])
def test_bad_sizes_refused(args):
    with pytest.raises(ValueError, match="positive int"):
        hd_grid(*args, 24)
    with pytest.raises(ValueError, match="positive int"):
        hd_tokens(*args)


def test_grid_never_exceeds_hd_num_and_agrees_with_ceil():
    # pure arithmetic over many shapes: the crop count stays within hd_num and hd_grid is consistent
    for w in (1, 2, 5, 50, 333, 559, 560, 561, 1119, 1121, 2048, 4096, 8000):
        for h in (1, 3, 77, 560, 999, 1500, 6000):
            for hd in (1, 4, 6, 9, 24, 25, 55, 100):
                cols, rows = hd_grid(w, h, hd)
                assert 1 <= cols * rows <= hd
                assert max(cols, rows) <= max(1, math.ceil(max(w, h) / 560))

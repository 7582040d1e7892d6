"""vision.hd video front end: frame selection (checked by colour on videos made here with PyAV and PIL),
the frame2img layout, video_transform against upstream's Video_transform written out here, refusals."""
from __future__ import annotations

import io
import math
import pickle

import av
import numpy as np
import pytest
from PIL import Image, ImageFont
from torchvision import transforms

from vision.hd import (
    HD_CROP,
    VIDEO_EXTENSIONS,
    VideoError,
    frame2img,
    grid_of,
    is_video_path,
    load_video,
    video_to_image,
    video_transform,
)

LEVELS = (16, 72, 128, 184, 240)  # 125 colours 56 apart: lossy codecs move a flat colour by a few units


def colour(i: int) -> tuple[int, int, int]:
    return LEVELS[i % 5], LEVELS[(i // 5) % 5], LEVELS[(i // 25) % 5]


def frame_index(img: Image.Image) -> int:
    """Which made-up frame this is: the palette colour nearest to the frame's centre pixel."""
    px = np.asarray(img.getpixel((img.width // 2, img.height // 2)), dtype=float)
    dist = [np.abs(px - colour(i)).max() for i in range(125)]
    best = int(np.argmin(dist))
    assert dist[best] < 20, (px, colour(best))
    return best


def encoder(*names: str) -> str | None:
    for name in names:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    return None


def write_video(path, codec: str, n: int, fps: int = 5, size=(64, 48)) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            a = np.empty((size[1], size[0], 3), np.uint8)
            a[:] = colour(i)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    mp4_codec = encoder("libx264", "mpeg4")
    out = {"dir": d}
    write_video(d / "4s.mp4", mp4_codec, 20)  # 4 s at 5 fps, frame i has colour(i)
    write_video(d / "10s.mp4", mp4_codec, 50)  # 10 s at 5 fps
    write_video(d / "portrait.mp4", mp4_codec, 10, size=(48, 64))
    frames = [Image.new("RGB", (64, 48), colour(i)) for i in range(20)]
    frames[0].save(d / "4s.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    frames[0].save(d / "slow.gif", save_all=True, append_images=frames[1:10], duration=400, loop=0)  # 2.5 fps
    vp = encoder("libvpx", "libvpx-vp9")
    if vp:
        write_video(d / "4s.webm", vp, 20)
    out["webm_codec"] = vp
    (d / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    (d / "empty.mp4").write_bytes(b"")
    (d / "trunc.mp4").write_bytes((d / "4s.mp4").read_bytes()[:200])
    Image.new("RGB", (30, 20), "red").save(d / "still.png")
    return out


def picked(frames) -> list[int]:
    return [frame_index(f) for f in frames]


# --- frame selection ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["4s.mp4", "4s.gif", "4s.webm"])
def test_one_frame_per_second(videos, name):
    if name.endswith(".webm") and not videos["webm_codec"]:
        pytest.skip("this PyAV build has no libvpx encoder to make a WebM")
    frames = load_video(videos["dir"] / name)
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    assert picked(frames) == [0, 5, 10, 15]  # stride int(round(5 fps)) = 5


def test_subsampling_matches_upstream_formula(videos):
    path = videos["dir"] / "10s.mp4"
    assert picked(load_video(path)) == list(range(0, 50, 5))  # 10 positions <= 32: all kept
    # more positions than max_frames: step = 10 / (max_frames + 1), positions int(i * step)
    assert picked(load_video(path, max_frames=4)) == [5 * int(i * 10 / 5) for i in range(4)] == [0, 10, 20, 30]
    assert picked(load_video(path, max_frames=3)) == [5 * int(i * 2.5) for i in range(3)] == [0, 10, 25]
    assert picked(load_video(path, max_frames=1)) == [0]
    assert picked(load_video(path, max_frames=9)) == [5 * int(i * 10 / 10) for i in range(9)]


def test_fractional_fps_rounds_like_python(videos):
    # 2.5 fps: int(round(2.5)) == 2 (round half to even), so every 2nd frame
    assert picked(load_video(videos["dir"] / "slow.gif")) == [0, 2, 4, 6, 8]


def test_bytes_and_file_objects(videos):
    path = videos["dir"] / "4s.mp4"
    data = path.read_bytes()
    assert picked(load_video(data)) == [0, 5, 10, 15]
    assert picked(load_video(bytearray(data))) == [0, 5, 10, 15]
    assert picked(load_video(io.BytesIO(data))) == [0, 5, 10, 15]
    with open(path, "rb") as f:
        assert picked(load_video(f)) == [0, 5, 10, 15]
        assert not f.closed  # the caller's file stays the caller's

    class Upload:  # read() only, like some upload streams
        name = "upload.mp4"

        def __init__(self):
            self._b = io.BytesIO(data)

        def read(self, n=-1):
            return self._b.read(n)

    assert picked(load_video(Upload())) == [0, 5, 10, 15]
    with pytest.raises(VideoError, match="text mode"):
        load_video(io.StringIO("abc"))


# --- composite ----------------------------------------------------------------------------------

def test_frame2img_landscape_stacks_vertically():
    frames = [Image.new("RGB", (64, 48), colour(i)) for i in range(3)]
    img = frame2img(frames)
    # each frame 1120 x int(1120 / (64/48)) = 840; canvas 1120 wide, 3 * (840 + 10 + 40) tall
    assert img.mode == "RGB" and img.size == (1120, 3 * (840 + 10 + 40))
    a = np.asarray(img)
    for k in range(3):
        top = k * 890
        strip = a[top:top + 40]
        assert (strip[:, :200].max(axis=2) < 100).any()  # "<IMAGE k>" drawn in black at the left
        assert (strip[:, 600:] == 255).all()  # the rest of the strip is white
        assert tuple(a[top + 40 + 420, 560]) == colour(k) and tuple(a[top + 40 + 839, 1119]) == colour(k)
        if k < 2:
            assert (a[top + 40 + 840 + 5, :] == 0).all()  # the 2-px separator line at the middle of the gap
            assert (a[top + 40 + 840 + 1, :] == 255).all() and (a[top + 40 + 840 + 8, :] == 255).all()
    assert (a[-10:] == 255).all()  # no line after the last frame


def test_frame2img_portrait_and_square_lay_out_horizontally():
    frames = [Image.new("RGB", (48, 64), colour(i)) for i in range(3)]
    img = frame2img(frames)
    # each 840 x 1120; canvas 3 * (840 + 10) wide, 1120 + 40 tall
    assert img.size == (3 * 850, 1160)
    a = np.asarray(img)
    for k in range(3):
        left = k * 850
        assert (a[:40, left:left + 200].max(axis=2) < 100).any()
        assert tuple(a[40 + 560, left + 420]) == colour(k)
        if k < 2:
            assert (a[:, left + 840 + 5] == 0).all()
            assert (a[:, left + 840 + 1] == 255).all()
    square = frame2img([Image.new("RGB", (50, 50), colour(i)) for i in range(2)])
    assert square.size == (2 * 1130, 1160)


def test_frame2img_last_frame_decides_layout():
    land, port = Image.new("RGB", (64, 48), colour(1)), Image.new("RGB", (48, 64), colour(2))
    assert frame2img([land, port]).size == ((1120 + 10) + (840 + 10), 1120 + 40)
    assert frame2img([port, land]).size == (1120, (1120 + 50) + (840 + 50))
    # an extreme frame: upstream would resize 1 x 5000 to int(1120 / 5000) = 0 px wide; we keep 1 px
    assert frame2img([Image.new("RGB", (1, 5000))]).size == (1 + 10, 1160)


def test_frame2img_font_argument(tmp_path):
    frames = [Image.new("RGB", (64, 48), colour(0))]
    a = frame2img(frames)
    b = frame2img(frames, font=ImageFont.load_default(size=40))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="nope.ttf.*cannot be loaded"):
        frame2img(frames, font=str(tmp_path / "nope.ttf"))
    with pytest.raises(ValueError, match="at least one frame"):
        frame2img([])


def upstream_video_transform(img: Image.Image) -> Image.Image:
    """Video_transform of internlm-xcomposer2d5-7b, written out: short side to 560, long side padded."""
    w, h = img.size
    flipped = w < h
    if flipped:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        w, h = img.size
    img = transforms.functional.resize(img, [560, int(560 * (w / h))])
    img = img.transpose(Image.Transpose.TRANSPOSE)
    w, h = img.size
    img = transforms.functional.pad(img, [0, 0, 0, int(np.ceil(h / 560) * 560) - h], fill=[255, 255, 255])
    return img if flipped else img.transpose(Image.Transpose.TRANSPOSE)


@pytest.mark.parametrize("size,expected", [
    ((1120, 2670), (560, 1680)),  # 3 landscape frames stacked: 560 x int(560 * 2670/1120) = 1335 -> 1680
    ((2550, 1160), (1680, 560)),  # 3 portrait frames side by side: int(560 * 2550/1160) = 1231 -> 1680
    ((560, 560), (560, 560)),
    ((1130, 1160), (560, 1120)),  # portrait-ish: 560 x int(560 * 1160/1130) = 574 -> 1120
    ((700, 300), (1680, 560)),
])
def test_video_transform_matches_upstream(size, expected):
    rng = np.random.default_rng(size[0] * 10007 + size[1])
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = video_transform(img)
    ref = upstream_video_transform(img)
    assert out.size == ref.size == expected
    assert min(out.size) == HD_CROP and max(out.size) % HD_CROP == 0
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_video_to_image_end_to_end(videos):
    for name in ("4s.mp4", "4s.gif"):
        img = video_to_image(videos["dir"] / name)
        # 4 landscape frames: 1120 x 4*890 = 3560 -> 560 x int(560 * 3560/1120) = 1780 -> 2240
        assert img.mode == "RGB" and img.size == (560, 2240) and grid_of(img) == (1, 4)
        assert frame_index(img.crop((0, 20, 560, 440))) == 0  # the first frame right below its label
    img = video_to_image(videos["dir"] / "portrait.mp4")  # 2 frames 840x1120 side by side: 1700 x 1160
    assert img.size == (math.ceil(int(560 * 1700 / 1160) / 560) * 560, 560) == (1120, 560)
    img = video_to_image((videos["dir"] / "4s.mp4").read_bytes(), max_frames=2)
    assert img.size == (560, 1120)


def test_max_crops(videos):
    path = videos["dir"] / "10s.mp4"  # 10 landscape frames: 1120 x 8900 -> 560 x 4450 -> 8 crops
    assert grid_of(video_to_image(path)) == (1, 8)
    with pytest.raises(VideoError, match=r"10 frames make a composite of 1x8 = 8 crops.*max_crops=4; "
                                          r"lower max_frames to 5 or less") as e:
        video_to_image(path, max_crops=4)
    assert e.value.source == str(path)
    # 5 frames: 1120 x 4450 -> 560 x int(560 * 4450 / 1120) = 2225 -> 2240: 4 crops, the hint holds
    assert grid_of(video_to_image(path, max_frames=5, max_crops=4)) == (1, 4)
    with pytest.raises(ValueError, match="max_crops"):
        video_to_image(path, max_crops=0)


# --- refusals ---------------------------------------------------------------------------------

def test_missing_path(videos):
    missing = videos["dir"] / "nope.mp4"
    with pytest.raises(VideoError, match="no such file; check the path") as e:
        load_video(missing)
    assert str(missing) in str(e.value) and e.value.source == str(missing)


@pytest.mark.parametrize("name,pattern", [
    ("text.mp4", "cannot be decoded as video.*re-encode it as H.264 MP4"),
    ("trunc.mp4", "cannot be decoded as video.*re-encode it as H.264 MP4"),
    ("empty.mp4", r"empty \(0 bytes\).*send the video again"),
    ("still.png", "not a video in a supported container.*re-encode it as H.264 MP4"),
])
def test_unusable_files(videos, name, pattern):
    path = videos["dir"] / name
    with pytest.raises(VideoError, match=pattern) as e:
        load_video(path)
    assert str(e.value).startswith(str(path) + ": ")
    assert isinstance(e.value, ValueError)
    with pytest.raises(VideoError) as e:
        load_video(path.read_bytes())
    assert e.value.source == "<bytes>"


def test_truncated_after_index(videos, tmp_path):
    # moov first (faststart), data cut: the container promises 20 frames that cannot be decoded
    path = tmp_path / "cut.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream(encoder("libx264", "mpeg4"), rate=5)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            a = np.empty((48, 64, 3), np.uint8)
            a[:] = colour(i)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = path.read_bytes()
    path.write_bytes(data[:data.find(b"mdat") + 8])
    with pytest.raises(VideoError, match=str(path) + ": cannot be decoded as video"):
        load_video(path)


def test_overstated_frame_count_is_planned_again(videos, monkeypatch):
    # a container that claims 40 frames but holds 20: plan [0, 5, ..., 35] reaches the end at 20 frames,
    # so the selection is made again on the 20 frames really there (upstream's formula on the true count)
    import vision.hd as hd

    real = hd._probe
    monkeypatch.setattr(hd, "_probe", lambda *a: (lambda idx, fps, n: (idx, fps, 2 * n))(*real(*a)))
    assert picked(load_video(videos["dir"] / "4s.mp4")) == [0, 5, 10, 15]
    assert picked(load_video(videos["dir"] / "10s.mp4", max_frames=4)) == [0, 10, 20, 30]


def test_no_video_stream(tmp_path):
    if not encoder("aac"):
        pytest.skip("no AAC encoder in this PyAV build")
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=8000)
        for i in range(4):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 8000, i * 1024
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(VideoError, match="has no video stream.*send a file with video"):
        load_video(path)


def test_limits(videos):
    path = videos["dir"] / "4s.mp4"
    with pytest.raises(VideoError, match=r"lasts 4\.0 s, over the limit of max_duration_s=1; cut it shorter"):
        load_video(path, max_duration_s=1)
    with pytest.raises(VideoError, match=r"lasts 4\.0 s"):
        load_video(videos["dir"] / "4s.gif", max_duration_s=1.5)
    assert len(load_video(path, max_duration_s=4)) == 4
    with pytest.raises(VideoError, match="64x48 = 3,072 pixels, over the limit of 3,000; downscale"):
        load_video(path, max_pixels=3000)


@pytest.mark.parametrize("bad", [0, 257, -1, True, 2.5, "32", None])
def test_max_frames_refused(videos, bad):
    with pytest.raises(ValueError, match=r"max_frames must be an int in 1\.\.256"):
        load_video(videos["dir"] / "4s.mp4", max_frames=bad)


@pytest.mark.parametrize("kw", [{"max_duration_s": 0}, {"max_duration_s": float("nan")}, {"max_duration_s": True},
                                {"max_pixels": 0}, {"max_pixels": 1.5}])
def test_bad_limits_refused(videos, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        load_video(videos["dir"] / "4s.mp4", **kw)


def test_other_sources_refused(videos):
    with pytest.raises(VideoError, match="https URLs are not fetched"):
        load_video("https://example.com/v.mp4")
    with pytest.raises(VideoError, match="directory"):
        load_video(videos["dir"])
    with pytest.raises(VideoError, match=r"0 bytes"):
        load_video(b"")
    with pytest.raises(VideoError, match=r"0 bytes"):
        load_video(io.BytesIO())
    with pytest.raises(VideoError, match="cannot use a int"):
        load_video(3)
    with pytest.raises(VideoError, match="base64-decode"):
        load_video("data:video/mp4;base64,AAAA")


def test_video_error_pickles():
    e = VideoError("bad", source="clip.mp4")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.reason, e2.source, str(e2)) == ("bad", "clip.mp4", "clip.mp4: bad")


def test_is_video_path():
    assert VIDEO_EXTENSIONS == (".mp4", ".avi", ".mkv", ".mov", ".wmv", ".webm", ".gif")
    assert is_video_path("a/b/Clip.MP4") and is_video_path("x.webm") and is_video_path("anim.gif")
    assert not is_video_path("photo.png") and not is_video_path("mp4") and not is_video_path(b"x.mp4")
    assert not is_video_path(None)

"""Material for trying the product without weights or a photo collection: a tiny random model in
the upstream checkpoint layout and a small image library.

Used by `web_demo.py --demo` and `examples/build_demo_library.py`. The photographs are the sample
images bundled with scikit-image (the optional `demo` extra); without scikit-image, simple drawn
pictures stand in so the demo still runs anywhere. The tiny model's output is noise: it exists to
exercise every step of the real code, not to write anything readable.
"""
from __future__ import annotations

import sys
from pathlib import Path

# scikit-image loader function -> file name (a subject word the captions can be compared to)
PHOTOS = {
    "astronaut": "astronaut", "camera": "cameraman", "chelsea": "cat_chelsea", "coffee": "coffee_cup",
    "coins": "coins", "hubble_deep_field": "hubble_deep_field", "immunohistochemistry": "immunohistochemistry",
    "moon": "moon_surface", "rocket": "rocket_launch", "page": "text_page", "text": "text_on_sign",
    "grass": "grass", "gravel": "gravel", "brick": "brick_wall", "retina": "retina", "clock": "clock",
    "stereo_motorcycle": "motorcycle",
}

# drawn stand-ins: name -> (background, shape colour, shape)
DRAWN = {
    "red_circle": ((250, 240, 220), (200, 30, 30), "ellipse"),
    "blue_square": ((230, 240, 250), (30, 60, 190), "rectangle"),
    "green_triangle": ((235, 250, 235), (30, 150, 60), "triangle"),
    "orange_sun": ((120, 180, 240), (250, 160, 20), "ellipse"),
    "purple_diamond": ((245, 235, 250), (120, 40, 160), "diamond"),
    "grey_stripes": ((250, 250, 250), (90, 90, 90), "stripes"),
}


def save_photos(folder: str | Path) -> list[Path]:
    """Write scikit-image's sample photos as PNG into `folder`; returns the files written (none if
    scikit-image is not installed). A photo this scikit-image version lacks is left out."""
    try:
        import skimage.data as data
    except ImportError:
        return []
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for func, name in PHOTOS.items():
        try:
            pixels = getattr(data, func)()
        except Exception as e:  # renamed, or moved to an optional download, in some versions
            print(f"skipping {func}: {e}", file=sys.stderr)
            continue
        if isinstance(pixels, tuple):  # stereo pairs: keep the left view
            pixels = pixels[0]
        path = folder / f"{name}.png"
        Image.fromarray(pixels).save(path)
        written.append(path)
    return written


def draw_pictures(folder: str | Path, size: int = 160) -> list[Path]:
    """Write a few simple drawn pictures (a shape on a background) as PNG into `folder`."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (bg, fg, shape) in DRAWN.items():
        im = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(im)
        a, b = size // 5, size - size // 5
        if shape == "ellipse":
            d.ellipse((a, a, b, b), fill=fg)
        elif shape == "rectangle":
            d.rectangle((a, a, b, b), fill=fg)
        elif shape == "triangle":
            d.polygon([(size // 2, a), (b, b), (a, b)], fill=fg)
        elif shape == "diamond":
            d.polygon([(size // 2, a), (b, size // 2), (size // 2, b), (a, size // 2)], fill=fg)
        else:
            for x in range(0, size, size // 8):
                d.rectangle((x, 0, x + size // 16, size), fill=fg)
        path = folder / f"{name}.png"
        im.save(path)
        written.append(path)
    return written


def demo_images(folder: str | Path) -> list[Path]:
    """scikit-image's photos if available, otherwise the drawn pictures."""
    return save_photos(folder) or draw_pictures(folder)


def build_demo_library(out: str | Path, *, tiny_clip: bool = True, model: str | None = None,
                       pretrained: str | None = None):
    """Images in `out/images`, the library in `out/library` (reused when already built there).

    `tiny_clip=True` embeds with a tiny random CLIP written to `out/tiny_clip` (offline; rankings
    are noise); otherwise `model`/`pretrained` name an open_clip model (the default downloads once).
    """
    from .compose.library import DEFAULT_MODEL, DEFAULT_PRETRAINED, ImageLibrary

    out = Path(out)
    images = out / "images"
    if not images.is_dir() or not any(images.iterdir()):
        demo_images(images)
    config = None
    model, pretrained = model or DEFAULT_MODEL, pretrained or DEFAULT_PRETRAINED
    if tiny_clip:
        from .tiny import write_tiny_clip

        model, config, weights = write_tiny_clip(out / "tiny_clip")
        pretrained = str(weights)
    if (out / "library" / "library.json").is_file():  # built before: embed only what changed
        lib = ImageLibrary.open(out / "library")
        lib.update()
        return lib
    return ImageLibrary.build(images, out / "library", model=model, pretrained=pretrained, model_config=config)


def build_demo_model(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random internlm-xcomposer checkpoint in the upstream layout (written once, reused)."""
    from .tiny import write_tiny_xcomposer

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.model").is_file():
        return folder
    return write_tiny_xcomposer(folder, seed=seed)


def build_demo_model2d5(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random internlm-xcomposer2d5 checkpoint in the upstream layout (written once, reused)."""
    from .tiny import write_tiny_xcomposer2d5

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.model").is_file():
        return folder
    return write_tiny_xcomposer2d5(folder, seed=seed, max_position_embeddings=8192)


def build_demo_model2(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random internlm-xcomposer2 checkpoint in the upstream layout (written once, reused)."""
    from .tiny import write_tiny_xcomposer2

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.model").is_file():
        return folder
    return write_tiny_xcomposer2(folder, seed=seed)

"""Build a small image library from the photographs bundled with scikit-image.

    python examples/build_demo_library.py --out demo_library             # ViT-B-32 (network once)
    python examples/build_demo_library.py --out demo_library --tiny-clip # offline, random weights

Writes the photos as PNG to OUT/images/ and the library to OUT/library/, then runs a few searches.
With --tiny-clip the model is a tiny random CLIP: every step runs, but the rankings are noise.
Needs scikit-image: pip install -e ".[demo]".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# photographs shipped inside scikit-image's wheel (no download): name -> file name
PHOTOS = {
    "astronaut": "astronaut", "camera": "cameraman", "chelsea": "cat_chelsea", "coffee": "coffee_cup",
    "coins": "coins", "hubble_deep_field": "hubble_deep_field", "immunohistochemistry": "immunohistochemistry",
    "moon": "moon_surface", "rocket": "rocket_launch", "page": "text_page", "text": "text_on_sign",
    "grass": "grass", "gravel": "gravel", "brick": "brick_wall", "retina": "retina", "clock": "clock",
    "stereo_motorcycle": "motorcycle",
}
QUERIES = ("a cat", "a cup of coffee", "a rocket launch", "an astronaut")


def main(argv: list[str] | None = None) -> int:
    from xcomposer.library import DEFAULT_MODEL, DEFAULT_PRETRAINED

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_library", help="output folder (default demo_library)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED, help="open_clip tag or local weights file")
    parser.add_argument("--tiny-clip", action="store_true", help="tiny random CLIP: offline, rankings are noise")
    args = parser.parse_args(argv)

    try:
        import skimage.data
    except ImportError:
        print('error: the demo needs scikit-image: pip install -e ".[demo]"', file=sys.stderr)
        return 2

    from xcomposer.library import ImageLibrary, LibraryError

    out = Path(args.out)
    images = out / "images"
    written = save_photos(skimage.data, images)
    print(f"{len(written)} photos in {images}", file=sys.stderr)

    model, pretrained, config = args.model, args.pretrained, None
    if args.tiny_clip:
        from xcomposer.tiny_clip import write_tiny_clip

        model, config, weights = write_tiny_clip(out / "tiny_clip")
        pretrained = str(weights)
    try:
        lib = ImageLibrary.build(images, out / "library", model=model, pretrained=pretrained, model_config=config)
    except LibraryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"library {lib.path}: {len(lib)} images ({lib.last_report})", file=sys.stderr)
    for query in QUERIES:
        for best in lib.search(query, k=1):  # none when every photo was skipped
            print(f"{query!r}: {best.id} ({best.score:.3f})")
    return 0


def save_photos(data, folder: Path) -> list[Path]:
    """Save each bundled photo in PHOTOS as PNG; a photo this scikit-image lacks is left out."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for func, name in PHOTOS.items():
        try:
            pixels = getattr(data, func)()
        except Exception as e:  # renamed or moved to an optional download in some version
            print(f"skipping {func}: {e}", file=sys.stderr)
            continue
        if isinstance(pixels, tuple):  # stereo pairs: keep the left view
            pixels = pixels[0]
        path = folder / f"{name}.png"
        Image.fromarray(pixels).save(path)
        written.append(path)
    return written


if __name__ == "__main__":
    raise SystemExit(main())

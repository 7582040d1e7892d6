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

QUERIES = ("a cat", "a cup of coffee", "a rocket launch", "an astronaut")


def main(argv: list[str] | None = None) -> int:
    from xcomposer.compose.library import DEFAULT_MODEL, DEFAULT_PRETRAINED

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_library", help="output folder (default demo_library)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED, help="open_clip tag or local weights file")
    parser.add_argument("--tiny-clip", action="store_true", help="tiny random CLIP: offline, rankings are noise")
    args = parser.parse_args(argv)

    from xcomposer.demo import build_demo_library
    from xcomposer.compose.library import LibraryError

    try:
        import skimage.data  # noqa: F401
    except ImportError:
        print('error: the demo needs scikit-image: pip install -e ".[demo]"', file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        lib = build_demo_library(out, tiny_clip=args.tiny_clip, model=args.model, pretrained=args.pretrained)
    except LibraryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(lib)} photos in {out / 'images'}", file=sys.stderr)
    print(f"library {lib.path}: {len(lib)} images ({lib.last_report})", file=sys.stderr)
    for query in QUERIES:
        for best in lib.search(query, k=1):  # none when every photo was skipped
            print(f"{query!r}: {best.id} ({best.score:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

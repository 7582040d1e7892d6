"""Compose an article end to end and print the time of each stage.

    python benchmarks/bench_compose.py                                    # tiny random model + tiny CLIP, CPU
    python benchmarks/bench_compose.py --folder MODEL --library LIB --device cuda   # a real checkpoint

Stages (xcomposer/compose/pipeline.py): text, spotting, captions, retrieval, selection. With the tiny
model the text is noise and most answers fall back (recorded), so its figures only show the
pipeline's own overhead; with a real checkpoint they are the user-visible costs. Every figure is the
median over --repeats articles of the same title (greedy decoding, so every repeat does the same work).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_decoder import device_name  # shared with the decoder benchmark (same folder)

STAGES = ("text", "spotting", "captions", "retrieval", "selection")


def tiny_setup(work: Path):
    from PIL import Image

    from xcomposer import XComposer
    from xcomposer.compose.library import ImageLibrary
    from xcomposer.tiny import write_tiny_xcomposer
    from xcomposer.tiny import write_tiny_clip

    model = XComposer.from_pretrained(write_tiny_xcomposer(work / "model"))
    photos = work / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photos / f"{i:02d}.png")
    name, cfg, weights = write_tiny_clip(work / "clip")
    library = ImageLibrary.build(photos, work / "library", model=name, pretrained=str(weights), model_config=str(cfg))
    return model, library


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", help="XComposer checkpoint (default: a tiny random one)")
    ap.add_argument("--library", help="ImageLibrary folder (default: a tiny one of random pictures)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--title", default="春天的西湖")
    ap.add_argument("--num-images", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="article length (default 1000; 120 tiny)")
    ap.add_argument("--num-beams", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from xcomposer import XComposer
    from xcomposer.compose.pipeline import Composer
    from xcomposer.compose.library import ImageLibrary

    work = Path(tempfile.mkdtemp(prefix="bench-compose-"))
    if args.folder:
        model = XComposer.from_pretrained(args.folder, device=args.device)
        library = ImageLibrary.open(args.library, device=args.device) if args.library else None
        length = args.max_new_tokens or 1000
    else:
        model, library = tiny_setup(work)
        length = args.max_new_tokens or 120
    composer = Composer(model, library)
    times = {s: [] for s in STAGES + ("total",)}
    article = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for ev in composer.run(args.title, num_images=args.num_images, max_new_tokens=length,
                               num_beams=args.num_beams):
            article = ev.article or article
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times["total"].append(time.perf_counter() - t0)
        for s in STAGES:
            times[s].append(article.meta["timings"][s])
    print(f"date {datetime.date.today().isoformat()}  device {device_name(args.device)}  "
          f"torch {torch.__version__}  model {args.folder or 'tiny random'}  "
          f"library {len(library) if library is not None else 0} images")
    print(f"title {args.title!r}  num_images {args.num_images}  article max_new_tokens {length}  "
          f"beams {args.num_beams}  median of {args.repeats}")
    print(f"last article: {len(article.paragraphs)} paragraphs, {len(article.slots)} slots, "
          f"{len(article.fallbacks)} fallbacks recorded\n")
    print("| stage | median (s) |")
    print("|---|---:|")
    for s in STAGES + ("total",):
        print(f"| {s} | {statistics.median(times[s]):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The three scenarios of upstream XComposer's example_chat.py, on our implementation.

    python examples/example_chat.py --folder /path/to/internlm-xcomposer-7b --image einstein.jpg
    python examples/example_chat.py --folder internlm/internlm-xcomposer-vl-7b     # hub id (needs network)
    python examples/example_chat.py --tiny      # a random tiny checkpoint: checks the set-up, prints noise

1. single-turn text-only dialogue (`model.generate(text)`),
2. single-turn text-image dialogue (`model.generate(text, image)`),
3. multi-turn text-image dialogue (`model.chat(text, image, history)`, three turns, streamed).

Without `--image` a picture is drawn on the fly. `--history-out FILE` saves the multi-turn history
as JSON (it can be passed back with `history=json.load(...)`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def _drawn_picture(folder: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 240), (135, 206, 235))  # sky
    d = ImageDraw.Draw(img)
    d.rectangle([0, 170, 320, 240], fill=(34, 139, 34))  # grass
    d.ellipse([240, 20, 290, 70], fill=(255, 215, 0))  # sun
    d.rectangle([60, 110, 160, 180], fill=(178, 34, 34))  # house
    d.polygon([(50, 110), (110, 60), (170, 110)], fill=(105, 105, 105))  # roof
    path = folder / "drawn.png"
    img.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="internlm-xcomposer-7b / -vl-7b checkpoint folder or hub id")
    src.add_argument("--tiny", action="store_true", help="write a random tiny checkpoint and use it")
    ap.add_argument("--image", help="picture for scenarios 2 and 3 (default: one drawn on the fly)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: float16 on GPU, float32 on CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--num-beams", type=int, default=5, help="upstream's default is 5")
    ap.add_argument("--history-out", help="write the multi-turn history here as JSON")
    args = ap.parse_args(argv)

    from xcomposer import XComposer
    from xcomposer.llm.checkpoint import CheckpointError
    from vision.image import ImageError

    work = Path(tempfile.mkdtemp(prefix="xcomposer-example-"))
    folder = args.folder
    if args.tiny:
        from xcomposer.tiny import write_tiny_xcomposer

        folder = write_tiny_xcomposer(work / "tiny-xcomposer")
        print(f"[tiny random model in {folder}: its answers are noise]", file=sys.stderr)
    image = args.image or str(_drawn_picture(work))
    try:
        model = XComposer.from_pretrained(folder, device=args.device, dtype=args.dtype)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)

    try:
        print("== 1. single-turn, text only")
        text = "Please introduce Einstein."
        print(f"User: {text}\nBot: {model.generate(text, **gen)}\n")

        print("== 2. single-turn, text and image")
        text = "Please introduce the picture in detail."
        print(f"User: {text} [{image}]\nBot: {model.generate(text, image=image, **gen)}\n")

        print("== 3. multi-turn, text and image (streamed)")
        history = None
        for text, img in (("What is in the picture?", image), ("What colours does it use?", None),
                          ("Write a title for it.", None)):
            print(f"User: {text}" + (f" [{img}]" if img else ""))
            print("Bot: ", end="", flush=True)
            stream = model.stream_chat(text, image=img, history=history, **gen)
            for piece in stream:
                print(piece, end="", flush=True)
            print()
            history = stream.history
    except (ImageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.history_out:
        Path(args.history_out).write_text(json.dumps(history, ensure_ascii=False, indent=2), encoding="utf-8")
        print(f"[history written to {args.history_out}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

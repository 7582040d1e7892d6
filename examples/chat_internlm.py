"""Text chat with an InternLM chat checkpoint, as InternLM's README shows it.

    python examples/chat_internlm.py --folder /path/to/internlm-chat-7b          # interactive
    python examples/chat_internlm.py --folder internlm/internlm-chat-7b --prompt "hello"
    python examples/chat_internlm.py --tiny --prompt "hello"   # random tiny model: checks the set-up, prints noise

Interactive commands: `clear` forgets the history, `exit` quits.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from xcomposer import InternLM
from xcomposer.llm.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="checkpoint folder or hub id (internlm-chat-7b layout)")
    src.add_argument("--tiny", action="store_true", help="build a random tiny checkpoint and chat with it")
    ap.add_argument("--prompt", action="append", help="ask this (repeat for several turns) instead of reading stdin")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: float16 on GPU, float32 on CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--greedy", action="store_true", help="greedy decoding instead of InternLM's sampling defaults")
    ap.add_argument("--num-beams", type=int, default=1)
    args = ap.parse_args(argv)

    folder = args.folder
    if args.tiny:
        from xcomposer.tiny import write_tiny_internlm

        folder = write_tiny_internlm(tempfile.mkdtemp(prefix="tiny-internlm-"))
        print(f"[tiny random model in {folder}: its replies are noise]", file=sys.stderr)
    try:
        model = InternLM.from_pretrained(folder, device=args.device, dtype=args.dtype)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = model.tokenizer
    if tokenizer is None:
        print(f"error: no tokenizer.model in {folder}", file=sys.stderr)
        return 2
    options = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    if args.greedy:
        options["do_sample"] = False

    history: list[tuple[str, str]] = []
    prompts = iter(args.prompt) if args.prompt else None
    while True:
        if prompts is not None:
            query = next(prompts, None)
            if query is None:
                return 0
            print(f"User: {query}")
        else:
            try:
                query = input("User: ")
            except EOFError:
                return 0
            if query.strip() == "exit":
                return 0
            if query.strip() == "clear":
                history = []
                continue
        print("Bot: ", end="", flush=True)
        shown = 0
        try:
            for response, history in model.stream_chat(tokenizer, query, history=history, **options):
                print(response[shown:], end="", flush=True)
                shown = len(response)
        except ValueError as e:  # empty or over-long question, bad option: say so and keep going
            print(f"\n[error: {e}]", flush=True)
            continue
        print()


if __name__ == "__main__":
    sys.exit(main())

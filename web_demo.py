"""InternLM-XComposer web demo: article composition and multimodal chat in the browser (for a text-only
InternLM folder: chat and questions about documents).

    python web_demo.py --num_gpus 1 --port 6006                          # internlm/internlm-xcomposer-7b
    python web_demo.py --folder /path/to/internlm-xcomposer-7b --library lib/
    python web_demo.py --folder /path/to/internlm-chat-7b                # chat + documents
    python web_demo.py --folder internlm/internlm2_5-7b-chat-1m --max-context 262144
    python web_demo.py --demo-text                                        # the text-only page, tiny model
    python web_demo.py --demo                                             # tiny random model, any machine
    python web_demo.py --demo-xcomposer2                                  # the same with a tiny XComposer2
    python web_demo.py --demo-xcomposer2d5                                # ... a tiny XComposer2.5 (web pages too)

The server listens on 127.0.0.1 unless `--host` says otherwise (use `--host 0.0.0.0` to expose it
on purpose). Articles and uploads are written under `--out`, one folder per browser session.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

DEFAULT_FOLDER = "internlm/internlm-xcomposer-7b"
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    from xcomposer.serve.options import add_quantization_arguments
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=DEFAULT_FOLDER,
                   help=f"local checkpoint folder or hub id (default {DEFAULT_FOLDER})")
    p.add_argument("--num_gpus", "--num-gpus", dest="num_gpus", type=int, default=1,
                   help="GPUs to shard the model over (default 1; 0 runs on the CPU)")
    p.add_argument("--port", type=int, default=6006, help="port to listen on (default 6006)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--library", default=None, help="image library folder for composition "
                   "(built with `python -m xcomposer library build DIR --out LIB`)")
    p.add_argument("--out", default="web_demo_output", help="folder for articles and uploads (default "
                   "web_demo_output)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="weights dtype (default: float16 on GPU, float32 on CPU)")
    add_quantization_arguments(p)
    p.add_argument("--max-concurrency", "--max_concurrency", dest="max_concurrency", type=int, default=1,
                   help="model jobs running at once; the rest wait in the queue (default 1)")
    p.add_argument("--cuda-graphs", "--cuda_graphs", dest="cuda_graphs", action="store_true",
                   help="replay each decode step from a CUDA graph (xcomposer.llm.fast_decode; one GPU only)")
    p.add_argument("--variant", default=None, choices=["7b", "vl-7b"],
                   help="internlm-xcomposer-7b (meta instruction, 500 new tokens) or -vl-7b; default: read from the "
                        "folder's modeling_InternLM_XComposer.py, else from its name")
    p.add_argument("--max-batch-size", "--max_batch_size", dest="max_batch_size", type=int, default=4,
                   help="one-beam chats of up to this many sessions run together in the batching engine "
                        "(default 4; its KV cache holds this many full-context rows); 1 answers one at a time")
    p.add_argument("--adapter", default=None, metavar="PATH",
                   help="a LoRA adapter folder (peft, upstream's module names; python -m xcomposer finetune writes "
                        "one) merged into the decoder's weights at load time (InternLM, XComposer2 / 2.5)")
    p.add_argument("--max-context", "--max_context", dest="max_context", type=int, default=None,
                   help="text-only models: the context window in tokens (prompt plus reply; default the "
                        "checkpoint's max_position_embeddings; dynamic NTK lets InternLM2 go past it)")
    p.add_argument("--demo-text", action="store_true",
                   help="the text-only page (chat and documents) on a tiny random InternLM2 built on the fly")
    p.add_argument("--demo", action="store_true",
                   help="tiny random model and demo library built on the fly: try the interface anywhere "
                        "(its output is noise)")
    p.add_argument("--demo-xcomposer2", action="store_true",
                   help="--demo with a tiny random XComposer2 (its composition takes an instruction and your images)")
    p.add_argument("--demo-xcomposer2d5", action="store_true",
                   help="--demo with a tiny random XComposer2.5 (high-resolution images, video, web pages)")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.num_gpus < 0:
        raise SystemExit(f"error: --num_gpus {args.num_gpus} must be 0 (CPU) or more")
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"error: --port {args.port} is not a port number (0-65535)")
    if args.max_concurrency < 1:
        raise SystemExit(f"error: --max-concurrency {args.max_concurrency} must be at least 1")
    if args.max_batch_size < 1:
        raise SystemExit(f"error: --max-batch-size {args.max_batch_size} must be at least 1")
    if args.max_context is not None and args.max_context < 2:
        raise SystemExit(f"error: --max-context {args.max_context} must be at least 2 tokens")


_FOLDER_HELP = ("Pass --folder with a local internlm-xcomposer-7b (or -vl-7b) folder, or a text-only InternLM chat "
                "folder, holding config.json, tokenizer.model and the weights, or a hub id that can be downloaded; "
                "or run with --demo to try the interface on a tiny random model.")


def load_model(args: argparse.Namespace):
    """The model for the demo; on failure exit with what was tried and what to pass instead."""
    import torch

    from xcomposer import InternLM, XComposer
    from xcomposer.llm.checkpoint import CheckpointError, checkpoint_folder
    from xcomposer.llm.internlm import InsufficientMemoryError
    from xcomposer.llm.quant import QuantizationError
    from xcomposer.serve.options import quantization_options
    from xcomposer.models.xcomposer import is_xcomposer_config
    from xcomposer.parallel.sharding import ShardingError

    device = "cuda" if args.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    if args.num_gpus > 0 and device == "cpu":
        print(f"warning: --num_gpus {args.num_gpus} but no CUDA device is visible; running on the CPU "
              f"(slow for the 7B model)", file=sys.stderr)
    try:
        folder, cfg_file = checkpoint_folder(args.folder, "model")
        vision = is_xcomposer_config(json.loads(cfg_file.read_text(encoding="utf-8")))
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: could not load the model from --folder {args.folder!r}: {e}\n{_FOLDER_HELP}") from None
    try:
        kwargs = {"device": device, "dtype": args.dtype, **quantization_options(args)}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if kwargs.keys() - {"device", "dtype"} and args.num_gpus > 1:
        raise SystemExit("error: 8-bit / 4-bit weights load on one GPU: drop --num_gpus (a 4-bit 7B model needs about "
                         "a quarter of the 16-bit memory)")
    if vision:
        kwargs["variant"] = args.variant
        if args.num_gpus > 1 and device == "cuda":
            kwargs["num_gpus"] = args.num_gpus
        if args.adapter:
            kwargs["adapter"] = args.adapter  # XComposer2 / 2.5 merge it; XComposer 1.0 refuses
    else:  # a text-only InternLM: the page offers chat and documents
        kwargs["max_context"] = args.max_context
        if args.adapter:
            kwargs["adapter"] = args.adapter
        if args.num_gpus > 1:
            print(f"warning: --num_gpus {args.num_gpus} splits XComposer models only; the text model loads on one "
                  f"device", file=sys.stderr)
        if args.variant:
            print("warning: --variant applies to InternLM-XComposer checkpoints; ignored", file=sys.stderr)
    try:
        model = (XComposer if vision else InternLM).from_pretrained(args.folder, **kwargs)
    except (ShardingError, InsufficientMemoryError) as e:
        raise SystemExit(f"error: --num_gpus {args.num_gpus}: {e}") from None
    except QuantizationError as e:
        raise SystemExit(f"error: {e}") from None
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: could not load the model from --folder {args.folder!r}: {e}\n{_FOLDER_HELP}") from None
    if args.cuda_graphs:
        if device != "cuda" or args.num_gpus > 1:
            print("warning: --cuda-graphs needs the model on one CUDA GPU; decoding eagerly", file=sys.stderr)
        else:
            from xcomposer.llm.fast_decode import use_cuda_graphs
            use_cuda_graphs(model)
    return model


def load_library(path: str | None):
    if path is None:
        return None
    from xcomposer.compose.library import ImageLibrary, LibraryError

    try:
        return ImageLibrary.open(path)
    except LibraryError as e:
        raise SystemExit(f"error: --library {path!r}: {e}") from None


def demo_setup(args: argparse.Namespace):
    """A tiny random model (XComposer 1.0, or XComposer2 with --demo-xcomposer2) and the demo
    library, cached in a temporary folder."""
    from xcomposer import XComposer
    from xcomposer.demo import build_demo_library, build_demo_model, build_demo_model2, build_demo_model2d5

    cache = Path(tempfile.gettempdir()) / "xcomposer-web-demo"
    if args.demo_xcomposer2d5:
        model = XComposer.from_pretrained(build_demo_model2d5(cache / "model2d5"))
    elif args.demo_xcomposer2:
        model = XComposer.from_pretrained(build_demo_model2(cache / "model2"))
    else:
        model = XComposer.from_pretrained(build_demo_model(cache / "model"))
    library = load_library(args.library) if args.library else build_demo_library(cache / "library")
    return model, library


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    from xcomposer.serve.webui import CHAT_DEFAULTS, DEMO_BANNER, DemoApp, launch

    if args.demo_text:
        from xcomposer import InternLM
        from xcomposer.tiny import write_tiny_internlm2

        folder = Path(tempfile.gettempdir()) / "xcomposer-web-demo" / "text-model"
        if not (folder / "config.json").is_file():
            write_tiny_internlm2(folder)
        model = InternLM.from_pretrained(folder, max_context=args.max_context)
        app = DemoApp(model, None, args.out, banner=DEMO_BANNER, max_concurrency=args.max_concurrency,
                      max_batch_size=args.max_batch_size, chat_defaults={"max_new_tokens": 48})
        launch(app, host=args.host, port=args.port)
        return 0
    if args.demo or args.demo_xcomposer2 or args.demo_xcomposer2d5:
        model, library = demo_setup(args)
        app = DemoApp(model, library, args.out, banner=DEMO_BANNER, max_concurrency=args.max_concurrency,
                      max_batch_size=args.max_batch_size, compose_defaults=dict(max_new_tokens=200, num_beams=1, num_images=3),
                      chat_defaults={**CHAT_DEFAULTS, "max_new_tokens": 64, "num_beams": 1})
    else:
        library = load_library(args.library)  # a bad library fails before the long model load
        model = load_model(args)
        app = DemoApp(model, library, args.out, max_concurrency=args.max_concurrency,
                      max_batch_size=args.max_batch_size)
    if library is None and app.vision:
        print("note: no --library given: articles get captions but no pictures", file=sys.stderr)
    launch(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

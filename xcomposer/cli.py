"""Command line: `python -m xcomposer <group> <command> ...`.

Each command group registers itself through an `add_<group>_commands(subparsers)` function and sets
`func` on its parsers; `main` parses, calls `func(args)`, and turns expected failures into
`error: ...` on stderr with exit status 2. Heavy imports (torch models, open_clip) happen inside
the command functions, so `--help` and argument errors stay fast.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

EXIT_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):  # a group named without a command: show that group's help
        (getattr(args, "group_parser", None) or parser).print_help(sys.stderr)
        return EXIT_ERROR
    from vision.image import ImageError

    from .llm.checkpoint import CheckpointError
    from .compose.library import LibraryError

    try:
        return args.func(args)
    except (LibraryError, ImageError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xcomposer", description="InternLM-XComposer tools.")
    groups = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_library_commands(groups)
    add_compose_commands(groups)
    add_webpage_commands(groups)
    add_serve_commands(groups)
    add_quantize_commands(groups)
    add_finetune_commands(groups)
    add_merge_commands(groups)
    return parser


# --- serve --------------------------------------------------------------------------------------

def add_serve_commands(groups: argparse._SubParsersAction) -> None:
    from .serve.options import add_serve_arguments  # light: no torch for --help

    s = groups.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                          description="Continuous batching behind /v1/chat/completions, /v1/completions, "
                                      "/v1/models, /health and /metrics (docs/serving.md).")
    add_serve_arguments(s)
    s.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from .serve.options import resolve_serve_arguments
    try:
        resolve_serve_arguments(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .serve.api import serve

    return serve(args)


# --- quantize -----------------------------------------------------------------------------------

def add_quantize_commands(groups: argparse._SubParsersAction) -> None:
    q = groups.add_parser("quantize", help="write a 4-bit / 8-bit GPTQ checkpoint of a 16-bit folder",
                          description="GPTQ (gptqmodel's algorithm and packer, run layer by layer on this decoder) "
                                      "into the published auto_gptq / gptqmodel layout under the checkpoint's own "
                                      "keys: InternLM v1, InternLM2 / 2.5, InternLM-XComposer2 / 2.5 "
                                      "(docs/quantization-formats.md, 'Quantizing your own checkpoint'). Needs "
                                      "`pip install --no-deps -r requirements-quantize.txt`.")
    q.add_argument("--folder", required=True, metavar="MODEL", help="the 16-bit checkpoint folder")
    q.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    q.add_argument("--method", default="gptq", choices=["gptq", "awq"], help="gptq (default); awq is refused with "
                   "the reason")
    q.add_argument("--bits", type=int, default=4, help="4 (default) or 8")
    q.add_argument("--group-size", type=int, default=128,
                   help="inputs per quantization group, -1 for one group (default 128, as upstream's exports)")
    q.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False,
                   help="act-order: quantize inputs by decreasing Hessian diagonal (default off)")
    q.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="symmetric zero points (default on, as auto_gptq); --no-sym writes checkpoint_format gptq_v2")
    q.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text file (paragraphs) or JSONL of {\"text\"} / {\"messages\"} records "
                        "(default: the built-in set, xcomposer/data/calibration.jsonl)")
    q.add_argument("--calib-samples", type=int, default=128, help="records used (default 128)")
    q.add_argument("--calib-seq-len", type=int, default=512, help="tokens kept of each record (default 512)")
    q.add_argument("--damp-percent", type=float, default=None, help="Hessian dampening (default gptqmodel's, 0.05)")
    q.add_argument("--device", default=None, help="device running the layers and GPTQ (default cuda when available)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new folder is complete")
    q.set_defaults(func=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize_checkpoint

    report = quantize_checkpoint(args.folder, args.out, method=args.method, bits=args.bits, group_size=args.group_size,
                                 desc_act=args.desc_act, sym=args.sym, calib=args.calib,
                                 calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                                 device=args.device, damp_percent=args.damp_percent, overwrite=args.overwrite)
    print(report.out)
    return 0


# --- finetune -----------------------------------------------------------------------------------

def add_finetune_commands(groups: argparse._SubParsersAction) -> None:
    f = groups.add_parser("finetune", help="train a LoRA adapter (peft) on chat data",
                          description="LoRA fine-tuning of an InternLM2 / 2.5 or InternLM v1 chat checkpoint on "
                                      "OpenAI-style chat JSONL or upstream XComposer's JSON (text records); the "
                                      "adapter is written in peft's format with upstream's module names "
                                      "(docs/finetune.md). Defaults are upstream finetune.py / finetune_lora.sh's.")
    f.add_argument("--folder", required=True, metavar="MODEL", help="the base checkpoint folder")
    f.add_argument("--data", required=True, metavar="FILE", help=".jsonl ({\"messages\": [...]} or XComposer "
                   "records, one a line) or a .json list of records")
    f.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write")
    f.add_argument("--lora-r", type=int, default=64, help="LoRA rank (default 64)")
    f.add_argument("--lora-alpha", type=float, default=64, help="LoRA alpha (default 64)")
    f.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    f.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="upstream module names (default: attention.wqkv attention.wo feed_forward.w1 "
                        "feed_forward.w2 feed_forward.w3 for InternLM2; q/k/v/o/gate/up/down_proj for v1)")
    f.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    f.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    f.add_argument("--warmup-ratio", type=float, default=0.01, help="share of steps warming up (default 0.01)")
    f.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    f.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    f.add_argument("--batch-size", type=int, default=1, help="records per micro-batch (default 1)")
    f.add_argument("--grad-accum", type=int, default=8, help="micro-batches per optimizer step (default 8)")
    f.add_argument("--max-length", type=int, default=4096, help="longer records are reported and skipped")
    f.add_argument("--eval-fraction", type=float, default=0.0, help="held-out share for evaluation loss")
    f.add_argument("--eval-every", type=int, default=0, help="optimizer steps between evaluations (0: at the end)")
    f.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward pass")
    f.add_argument("--pack", action="store_true",
                   help="pack several records into each row of --max-length tokens (each attends only to itself) "
                        "instead of padding rows to their longest record")
    f.add_argument("--train-vision", action="store_true",
                   help="XComposer2.5: train the vision tower in full beside the LoRA (upstream's --fix_vit False); "
                        "written to OUT/vision_trainables.safetensors")
    f.add_argument("--train-projector", action="store_true",
                   help="XComposer2.5: train the projector (vision_proj) in full (upstream's --fix_sampler False)")
    f.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    f.add_argument("--dtype", default=None, help="base weights: float32 (CPU default) or bfloat16 (GPU default)")
    f.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA)")
    f.add_argument("--seed", type=int, default=0)
    q = f.add_mutually_exclusive_group()
    q.add_argument("--load-in-4bit", "--load_in_4bit", dest="quantization", action="store_const", const="nf4",
                   help="QLoRA: train over a 4-bit base (NF4 with double quantization, as XTuner's InternLM2.5 "
                        "QLoRA config)")
    q.add_argument("--quantization", dest="quantization", choices=["nf4", "fp4", "int8"], default=None,
                   help="the base's bitsandbytes format for QLoRA (--load-in-4bit is nf4)")
    f.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="write OUT/checkpoint-STEP every STEPS optimizer steps (adapter + trainer state)")
    f.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from a checkpoint-STEP folder (or 'latest': the newest under --out), same settings")
    f.add_argument("--strict", action="store_true", help="refuse the data file on any bad record")
    f.add_argument("--log-every", type=int, default=1, help="optimizer steps between progress lines")
    f.set_defaults(func=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    from .train import FinetuneConfig, finetune

    names = ("folder", "data", "out", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr", "weight_decay",
             "warmup_ratio", "epochs", "max_steps", "batch_size", "grad_accum", "max_length", "eval_fraction",
             "eval_every", "gradient_checkpointing", "device", "dtype", "bf16", "seed", "strict", "log_every",
             "quantization", "save_every", "resume", "train_vision", "train_projector", "pack")
    result = finetune(FinetuneConfig(**{n: getattr(args, n) for n in names}))
    print(result.out)
    return 0


def add_merge_commands(groups: argparse._SubParsersAction) -> None:
    m = groups.add_parser("merge", help="merge a LoRA adapter into its base checkpoint (a new folder)",
                          description="W + (alpha/r) B A into the base's weights, written in the upstream layout "
                                      "and the dtype of its config.json, tokenizer and other files copied "
                                      "(docs/finetune.md). Quantize the result with `xcomposer quantize`.")
    m.add_argument("--folder", required=True, metavar="MODEL", help="the base checkpoint folder (16-bit)")
    m.add_argument("--adapter", required=True, metavar="DIR", help="the peft adapter folder (from `finetune`)")
    m.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new folder is complete")
    m.set_defaults(func=_merge)


def _merge(args: argparse.Namespace) -> int:
    from .train import merge_checkpoint

    report = merge_checkpoint(args.folder, args.adapter, args.out, overwrite=args.overwrite)
    print(f"{report.out} ({report.tensors} tensors, {report.dtype}; {report.note})")
    return 0


# --- library ------------------------------------------------------------------------------------

def add_library_commands(groups: argparse._SubParsersAction) -> None:
    from .compose.library import DEFAULT_MODEL, DEFAULT_PRETRAINED  # constants only: open_clip loads lazily

    group = groups.add_parser("library", help="build, update and search a local image library",
                              description="A local image library searched by caption (open_clip).")
    group.set_defaults(group_parser=group)
    commands = group.add_subparsers(title="library commands", metavar="COMMAND")

    build = commands.add_parser("build", help="embed every image under DIR into a new library LIB")
    build.add_argument("folder", metavar="DIR", help="folder of images (searched recursively)")
    build.add_argument("--out", required=True, metavar="LIB", help="folder to write the library to")
    build.add_argument("--model", default=None,
                       help=f"open_clip model name (default {DEFAULT_MODEL}, or the --model-config file's stem)")
    build.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                       help=f"open_clip tag (needs the network once) or a local weights file (default "
                            f"{DEFAULT_PRETRAINED})")
    build.add_argument("--model-config", default=None, metavar="JSON",
                       help="open_clip model-config JSON for a model open_clip does not ship")
    build.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    build.add_argument("--batch-size", type=int, default=32, help="images per encoder batch (default 32)")
    build.set_defaults(func=_library_build)

    update = commands.add_parser("update", help="embed new and changed images, drop deleted ones")
    update.add_argument("library", metavar="LIB")
    update.add_argument("--device", default="cpu")
    update.add_argument("--pretrained", default=None, help="new location of the library's weights file")
    update.set_defaults(func=_library_update)

    search = commands.add_parser("search", help="the images closest to a caption")
    search.add_argument("library", metavar="LIB")
    search.add_argument("text", help="caption to search for")
    search.add_argument("-k", type=int, default=4, help="number of hits (default 4)")
    search.add_argument("--device", default="cpu")
    search.add_argument("--pretrained", default=None, help="new location of the library's weights file")
    search.set_defaults(func=_library_search)


def _library_build(args: argparse.Namespace) -> int:
    from .compose.library import ImageLibrary

    with _Progress("embedding") as progress:
        lib = ImageLibrary.build(args.folder, args.out, model=args.model, pretrained=args.pretrained,
                                 model_config=args.model_config, device=args.device,
                                 batch_size=args.batch_size, progress=progress)
    print(f"built {lib.path}: {len(lib)} images ({lib.last_report}) with {lib.model_name} / {lib.pretrained}",
          file=sys.stderr)
    return 0


def _library_update(args: argparse.Namespace) -> int:
    from .compose.library import ImageLibrary

    lib = ImageLibrary.open(args.library, device=args.device, pretrained=args.pretrained)
    with _Progress("embedding") as progress:
        report = lib.update(progress=progress)
    print(f"updated {lib.path}: {len(lib)} images ({report})", file=sys.stderr)
    return 0


def _library_search(args: argparse.Namespace) -> int:
    from .compose.library import ImageLibrary

    lib = ImageLibrary.open(args.library, device=args.device, pretrained=args.pretrained)
    hits = lib.search(args.text, k=args.k)
    if not hits:
        print("no images in the library", file=sys.stderr)
    for rank, hit in enumerate(hits, 1):
        print(f"{rank}\t{hit.score:.4f}\t{hit.path}")
    return 0


# --- compose ------------------------------------------------------------------------------------

def add_compose_commands(groups: argparse._SubParsersAction) -> None:
    c = groups.add_parser("compose", help="write an illustrated article from a title (XComposer2: an instruction)",
                          description="Text, image spots, captions, library search and the model's choice, with "
                                      "the prompts of the checkpoint's generation: XComposer 1.0 writes from a "
                                      "title; XComposer2 (internlm-xcomposer2-7b) from a free-form instruction, "
                                      "optionally with reference images (docs/composition.md).")
    c.add_argument("title", help="the article's title (XComposer2: the instruction, material included)")
    c.add_argument("--folder", required=True, help="XComposer or XComposer2 checkpoint folder or hub id")
    c.add_argument("--library", default=None, metavar="LIB",
                   help="image library (python -m xcomposer library build); without it slots get captions only")
    c.add_argument("--out", required=True, metavar="DIR", help="folder for article.md/.html/.json and images/")
    c.add_argument("--num-images", type=int, default=None, help="how many images (default: the model decides)")
    c.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="XComposer2: a reference image (repeat, at most 10); the model sees them while writing "
                        "and places them (no captions, no library)")
    c.add_argument("--with-meta", action="store_true", help="XComposer2: upstream's system turn (its 'With Meta')")
    c.add_argument("--seed", type=int, default=None, help="seed of every sampled step (reproducible runs)")
    c.add_argument("--max-new-tokens", type=int, default=None,
                   help="article length in tokens (default: upstream's, 1000 for 1.0, 4096 for XComposer2)")
    c.add_argument("--num-beams", type=int, default=None, help="beams of the article (default: upstream's, 5 / 1)")
    c.add_argument("--repetition-penalty", type=float, default=None,
                   help="the article's repetition penalty (default: upstream's, 5.0 / 1.005)")
    c.add_argument("--sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample the text (default: upstream's, beam search for 1.0, sampling for XComposer2)")
    c.add_argument("--no-select", action="store_true", help="take each slot's first candidate (no model choice)")
    c.add_argument("--lang", default="zh", choices=["zh", "en"],
                   help="prompt language (upstream's: zh; XComposer2 has zh only)")
    c.add_argument("--device", default=None, help="torch device (default cuda when available)")
    c.add_argument("--dtype", default=None, help="float16, bfloat16 or float32")
    c.add_argument("--zip", action="store_true", help="also write DIR.zip")
    c.set_defaults(func=_compose)


def _compose(args: argparse.Namespace) -> int:
    import torch

    from .compose.pipeline import Composer
    from .compose.library import ImageLibrary
    from .models.xcomposer import XComposer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = XComposer.from_pretrained(args.folder, device=device, dtype=args.dtype)
    library = ImageLibrary.open(args.library, device=device) if args.library else None
    composer = Composer(model, library, lang=args.lang)
    gen = {k: v for k, v in dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                 repetition_penalty=args.repetition_penalty, do_sample=args.sample).items()
           if v is not None}
    article, bars = None, {}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        tqdm = None
    for ev in composer.run(args.title, num_images=args.num_images, select=not args.no_select,
                           images=args.image or None, with_meta=args.with_meta, seed=args.seed, **gen):
        if ev.kind == "text":
            print(ev.text, end="", flush=True)
        elif ev.kind == "stage" and ev.stage != "text" and ev.total:
            if tqdm is None:
                print(f"{ev.stage}: {ev.done}/{ev.total}", file=sys.stderr)
                continue
            bar = bars.get(ev.stage) or bars.setdefault(ev.stage, tqdm(total=ev.total, desc=ev.stage, file=sys.stderr))
            bar.update(ev.done - bar.n)
            if ev.done == ev.total:
                bar.close()
        elif ev.kind == "stage" and ev.stage == "text" and ev.done:
            print(file=sys.stderr)
        elif ev.kind == "done":
            article = ev.article
    out = article.save_zip(args.out) if args.zip else article.save(args.out)
    for note in article.fallbacks:
        print(f"note: {note}", file=sys.stderr)
    placed = sum(1 for s in article.slots if s.chosen is not None)
    print(f"wrote {out}: {len(article.paragraphs)} paragraphs, {placed} images", file=sys.stderr)
    return 0


# --- webpage (XComposer2.5) -----------------------------------------------------------------------

def add_webpage_commands(groups: argparse._SubParsersAction) -> None:
    w = groups.add_parser("webpage", help="write a web page (HTML) with XComposer2.5",
                          description="Upstream XComposer2.5's write_webpage (from an instruction), resume_2_webpage "
                                      "(--resume FILE.md) or screen_2_webpage (--screenshot IMAGE), with its web LoRA "
                                      "and settings (2 beams, sampling, repetition penalty 3.0, up to 4800 tokens). "
                                      "The page is written atomically to --out.")
    w.add_argument("instruction", nargs="?", default="",
                   help="what the page should be (not used with --resume or --screenshot)")
    w.add_argument("--folder", required=True, help="internlm-xcomposer2d5-7b checkpoint folder or hub id")
    w.add_argument("--out", required=True, metavar="FILE.html", help="where to write the page")
    src = w.add_mutually_exclusive_group()
    src.add_argument("--resume", metavar="FILE.md", help="a resume in markdown: a personal page from it")
    src.add_argument("--screenshot", metavar="IMAGE", help="a screenshot of a page: its HTML (Tailwind CSS)")
    w.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image the instruction refers to (repeat)")
    w.add_argument("--seed", type=int, default=None, help="seed of the sampling (reproducible pages)")
    w.add_argument("--max-new-tokens", type=int, default=None, help="page length in tokens (default 4800)")
    w.add_argument("--num-beams", type=int, default=None, help="beams (default 2)")
    w.add_argument("--device", default=None, help="torch device (default cuda when available)")
    w.add_argument("--dtype", default=None, help="float16, bfloat16 or float32")
    w.set_defaults(func=_webpage)


def _webpage(args: argparse.Namespace) -> int:
    import torch

    from .models.xcomposer import XComposer
    from .models.xcomposer2d5 import XComposer2d5, save_html

    if not (args.instruction.strip() or args.resume or args.screenshot):
        raise ValueError("give an instruction, --resume FILE.md or --screenshot IMAGE")
    if not str(args.out).lower().endswith((".html", ".htm")):
        raise ValueError(f"--out {args.out}: name an .html file")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = XComposer.from_pretrained(args.folder, device=device, dtype=args.dtype)
    if not isinstance(model, XComposer2d5):
        raise ValueError(f"{args.folder} is not an InternLM-XComposer2.5 checkpoint: web pages need "
                         f"internlm/internlm-xcomposer2d5-7b")
    gen = {k: v for k, v in dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams).items()
           if v is not None}
    seed = -1 if args.seed is None else args.seed
    if args.screenshot:
        page = model.screen_2_webpage(image=[args.screenshot], seed=seed, **gen)
    elif args.resume:
        page = model.resume_2_webpage(args.resume, args.image or None, seed=seed, **gen)
    else:
        page = model.write_webpage(args.instruction, args.image or None, seed=seed, **gen)
    out = save_html(page, args.out)
    print(f"wrote {out} ({len(page):,} characters)", file=sys.stderr)
    return 0


class _Progress:
    """A `progress(done, total, message)` callback drawing a tqdm bar on stderr (plain lines when
    tqdm is missing); messages about skipped files are always printed."""

    def __init__(self, label: str) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self._tqdm = tqdm
        self.label = label
        self._bar = None
        self._last_percent = -1

    def __enter__(self) -> Callable[[int, int, str], None]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def __call__(self, done: int, total: int, message: str) -> None:
        if self._tqdm is None:
            self._plain(done, total, message)
            return
        if self._bar is None:
            self._bar = self._tqdm(total=total, desc=self.label, unit="img", file=sys.stderr)
        if message.startswith("skipped "):
            self._bar.write(message, file=sys.stderr)
        self._bar.update(done - self._bar.n)

    def _plain(self, done: int, total: int, message: str) -> None:
        if message.startswith("skipped "):
            print(message, file=sys.stderr)
        percent = 100 * done // max(total, 1)
        if percent // 10 != self._last_percent // 10 or done == total:  # a line per 10%, not per image
            print(f"{self.label}: {done}/{total}", file=sys.stderr)
            self._last_percent = percent

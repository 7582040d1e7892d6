"""The server's command-line options and defaults (light: `--help` imports no torch)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_PORT = 23333
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 64
DEFAULT_PREFILL_CHUNK = 256
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024


def add_serve_arguments(p) -> None:
    p.add_argument("model_path", nargs="?", default=None,
                   help="checkpoint folder or hub id, as LMDeploy's `api_server PATH` (or --folder)")
    p.add_argument("--folder", default=None, help="checkpoint folder (InternLM chat or XComposer) or hub id")
    p.add_argument("--host", "--server-name", dest="host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 for all; --server-name as LMDeploy)")
    p.add_argument("--port", "--server-port", dest="port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}, LMDeploy's; 0 picks a free one; --server-port as LMDeploy)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--adapter", "--adapters", "--lora-modules", dest="adapters", nargs="+", action="extend",
                   default=None, metavar="NAME=PATH",
                   help="a LoRA adapter (peft folder) served beside the base: requests whose model field is NAME "
                        "run with it; repeat or list several (LMDeploy's --adapters, vLLM's --lora-modules). The "
                        "adapters stay beside the weights, so requests of different adapters share a batch")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"sequences decoded together; the KV pool does not grow with it (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests waiting for a row before 429 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--session-len", type=int, default=None,
                   help="most tokens of one sequence, prompt plus reply (default: the model's context window)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help=f"prompts are cut into chunks of this many positions (fixed boundaries; default "
                        f"{DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--max-prefill-token-num", type=int, default=None,
                   help="prompt tokens one step may prefill, over all sequences (LMDeploy's name; default 8192 on "
                        "a GPU, 256 on a CPU)")
    p.add_argument("--block-size", "--cache-block-seq-len", dest="block_size", type=int, default=64,
                   help="tokens per KV block (default 64, as LMDeploy's --cache-block-seq-len)")
    p.add_argument("--cache-max-entry-count", type=float, default=0.8,
                   help="fraction of the device memory free after loading that the KV pool takes (LMDeploy's "
                        "name and meaning; default 0.8)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV pool size in GiB instead (on a CPU the default is the smaller of 1 GiB and max(4, --max-batch-size) sessions)")
    p.add_argument("--quant-policy", type=quant_policy_arg, default=0, metavar="{0,8}",
                   help="KV cache: 0 keeps K/V in the model's dtype, 8 stores them as int8 with a scale and zero "
                        "point per token and head (about 2x the tokens in the same memory; LMDeploy's flag; "
                        "4, int4, is refused: docs/serving.md)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV blocks of shared prefixes (on by default)")
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="LMDeploy's flag: prefix caching is on by default here, so it changes nothing")
    p.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="InternLM2: the dynamic-NTK factor, overriding config.json (LMDeploy's flag; e.g. 2.5 with "
                        "--session-len 1048576 for internlm2_5-7b-chat-1m)")
    p.add_argument("--tool-call-parser", default=None, metavar="internlm",
                   help="LMDeploy's flag: InternLM2 / 2.5 chat models parse tool calls in their <|plugin|> format "
                        "whether or not it is given; 'internlm' (LMDeploy's name for that format) is the only "
                        "value, and it makes the server refuse to start on a model without that format")
    p.add_argument("--api-key", "--api-keys", dest="api_key", nargs="+", default=None,
                   help="require 'Authorization: Bearer KEY', one of these keys (or set XCOMPOSER_API_KEY; "
                        "--api-keys as LMDeploy)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="allow image_url file paths under DIR (default: none)")
    p.add_argument("--allow-fetch", action="store_true", help="allow http(s) image URLs (public addresses only)")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES)
    p.add_argument("--max-video-bytes", type=int, default=64 * 1024 * 1024,
                   help="largest video a video_url part may send (XComposer2.5)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--device", default=None, help="torch device (default cuda when available)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32")
    add_quantization_arguments(p)
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: rank 0 serves HTTP, all run each step (default 1; under torchrun "
                        "every rank runs this command)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay decode steps as CUDA graphs (GPU)")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds SIGTERM waits for running requests (default 300)")
    p.add_argument("--log-level", default="info")


QUANTIZATIONS = ("int8", "nf4", "fp4")


def add_quantization_arguments(p) -> None:
    """8-bit / 4-bit weights through bitsandbytes, in transformers' words (server, web demo, CLI)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--load-in-8bit", "--load_in_8bit", dest="load_in_8bit", action="store_true",
                   help="quantize the decoder's projections to int8 (bitsandbytes LLM.int8(); about half the "
                        "16-bit weight memory)")
    g.add_argument("--load-in-4bit", "--load_in_4bit", dest="load_in_4bit", action="store_true",
                   help="quantize them to 4 bits (transformers' meaning: fp4; --quantization nf4 for NF4 with "
                        "double quantization, the QLoRA setting)")
    g.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="int8, nf4 (with double quantization) or fp4, computing in the load dtype. GPTQ / AWQ "
                        "checkpoints (the published -4bit folders) need no flag: they load as they are")
    p.add_argument("--quantize-vision", action="store_true",
                   help="with 8/4-bit: quantize the vision tower's linears too (default: 16-bit tower)")


def quantization_options(args) -> dict:
    """`from_pretrained` keywords for the quantization flags (empty for 16-bit weights)."""
    out = {}
    if getattr(args, "load_in_8bit", False):
        out["load_in_8bit"] = True
    elif getattr(args, "load_in_4bit", False):
        out["load_in_4bit"] = True
    elif getattr(args, "quantization", None):
        out["quantization"] = args.quantization
    if getattr(args, "quantize_vision", False):
        if not out:
            raise ValueError("--quantize-vision needs --load-in-8bit, --load-in-4bit or --quantization")
        out["quantize_vision"] = True
    return out


def quant_policy_arg(text: str) -> int:
    """--quant-policy: 0 or 8 (LMDeploy's numbers; its names none / int8 too). 4 (int4) is refused here
    with the reason, as the engine refuses it (xcomposer.engine.engine.check_serving_quant_policy)."""
    import argparse
    value = {"none": 0, "int8": 8, "int4": 4}.get(text.strip().lower(), text.strip())
    if value in ("0", "8", "4"):
        value = int(value)
    if value == 4:
        raise argparse.ArgumentTypeError("4 (int4 K/V) is not served: its error on our test models was an order of "
                                         "magnitude above int8's (docs/serving.md, \"KV cache quantization\"); "
                                         "use 8 or 0")
    if value not in (0, 8):
        raise argparse.ArgumentTypeError(f"{text!r} is not a KV cache setting: use 0 (K/V in the model's dtype) or "
                                         f"8 (int8)")
    return value


# LMDeploy's --tool-call-parser name for InternLM2's <|action_start|><|plugin|> format (its
# lmdeploy/serve/openai/tool_parser/internlm2_parser.py registers "internlm", and "intern-s1" for
# another model this server does not load)
TOOL_CALL_PARSERS = ("internlm",)


def resolve_serve_arguments(args) -> None:
    """The checkpoint is the positional PATH or --folder (exactly one); the quantization flags agree
    with each other and with --tp. Raises ValueError otherwise."""
    if (args.model_path is None) == (args.folder is None):
        raise ValueError("give the checkpoint once: `serve PATH` or `serve --folder PATH`")
    args.folder = args.folder or args.model_path
    if quantization_options(args) and (getattr(args, "tp", 1) or 1) > 1:
        raise ValueError("8-bit / 4-bit weights are not combined with --tp yet: serve the quantized model with "
                         "--tp 1 (a 4-bit 7B model fits one 8 GB GPU), or drop the quantization flag")
    if isinstance(args.api_key, str):
        args.api_key = [args.api_key]
    parser = getattr(args, "tool_call_parser", None)
    if parser is not None and parser.strip().lower() not in TOOL_CALL_PARSERS:
        raise ValueError(f"--tool-call-parser {parser!r}: this server parses InternLM2 / 2.5's tool-call format only, "
                         f"LMDeploy's 'internlm' parser: pass --tool-call-parser internlm, or leave it out")
    args.adapters = parse_adapters(getattr(args, "adapters", None) or [])
    if args.adapters and (getattr(args, "tp", 1) or 1) > 1:
        raise ValueError("--adapter is not combined with --tp yet: serve the adapters with --tp 1, or merge one "
                         "into the checkpoint (python -m xcomposer merge)")


def parse_adapters(items) -> list[tuple[str, str]]:
    """NAME=PATH items (a bare PATH is named after its folder) -> [(name, path)], names unique."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep:
            name, path = Path(str(item).rstrip("/")).name, str(item)
        name = name.strip()
        if not name.isidentifier():
            raise ValueError(f"--adapter {item!r}: the name {name!r} must be letters, digits and underscores "
                             f"(NAME=PATH)")
        if name in out:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        if not Path(path).is_dir():
            raise ValueError(f"--adapter {item!r}: {path} is not a folder (a peft adapter folder with "
                             f"adapter_config.json)")
        out[name] = path
    return list(out.items())


__all__ = ["add_serve_arguments", "resolve_serve_arguments", "parse_adapters", "quant_policy_arg", "add_quantization_arguments", "quantization_options",
           "QUANTIZATIONS", "DEFAULT_PORT", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_QUEUE", "DEFAULT_PREFILL_CHUNK",
           "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_IMAGE_BYTES"]

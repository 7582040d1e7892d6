"""The server's command-line options and defaults (light: `--help` imports no torch)."""
from __future__ import annotations

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
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV blocks of shared prefixes (on by default)")
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="LMDeploy's flag: prefix caching is on by default here, so it changes nothing")
    p.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="InternLM2: the dynamic-NTK factor, overriding config.json (LMDeploy's flag; e.g. 2.5 with "
                        "--session-len 1048576 for internlm2_5-7b-chat-1m)")
    p.add_argument("--api-key", "--api-keys", dest="api_key", nargs="+", default=None,
                   help="require 'Authorization: Bearer KEY', one of these keys (or set XCOMPOSER_API_KEY; "
                        "--api-keys as LMDeploy)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="allow image_url file paths under DIR (default: none)")
    p.add_argument("--allow-fetch", action="store_true", help="allow http(s) image URLs (public addresses only)")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES)
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--device", default=None, help="torch device (default cuda when available)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: rank 0 serves HTTP, all run each step (default 1; under torchrun "
                        "every rank runs this command)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay decode steps as CUDA graphs (GPU)")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds SIGTERM waits for running requests (default 300)")
    p.add_argument("--log-level", default="info")


def resolve_serve_arguments(args) -> None:
    """The checkpoint is the positional PATH or --folder (exactly one); raises ValueError otherwise."""
    if (args.model_path is None) == (args.folder is None):
        raise ValueError("give the checkpoint once: `serve PATH` or `serve --folder PATH`")
    args.folder = args.folder or args.model_path
    if isinstance(args.api_key, str):
        args.api_key = [args.api_key]


__all__ = ["add_serve_arguments", "resolve_serve_arguments", "DEFAULT_PORT", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_QUEUE", "DEFAULT_PREFILL_CHUNK",
           "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_IMAGE_BYTES"]

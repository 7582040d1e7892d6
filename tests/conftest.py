"""Shared tiny models. Sizes are small enough for CPU but keep the real architecture."""
from __future__ import annotations

import os

# nothing in the tests may try to leave the machine: gradio's analytics stay off in every process
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# ... nor the Hugging Face hub: bitsandbytes' CPU backend asks `kernels` for a hub kernel on import
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from xcomposer import InternLMConfig, InternLMForCausalLM  # noqa: E402

VOCAB = 1000


def tiny_config(**kw) -> InternLMConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256)
    base.update(kw)
    return InternLMConfig(**base)


def tiny_model(seed: int = 0, std: float = 0.2, **kw) -> InternLMForCausalLM:
    g = torch.Generator().manual_seed(seed)
    m = InternLMForCausalLM(tiny_config(**kw)).eval()
    m.init_weights(std=std, generator=g)  # a large std gives peaked, decisive logits
    return m


def hf_twin(model: InternLMForCausalLM):
    """transformers' Llama with attention biases: InternLM v1's math, code we did not write."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                     num_key_value_heads=c.num_attention_heads, max_position_embeddings=c.max_position_embeddings,
                     rms_norm_eps=c.rms_norm_eps, attention_bias=True, rope_theta=c.rope_base,
                     tie_word_embeddings=c.tie_word_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf = LlamaForCausalLM(hc).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


# the decoder as the loaders leave it (fused, transposed on CPU), the plain upstream layout, and
# the fused decoder running the fixed-shape decode step of xcomposer.llm.fast_decode (on CPU that
# step runs eagerly: the same math a CUDA graph replays)
DECODER_VARIANTS = ["plain", "fused", "fused+static"]


def apply_variant(m: InternLMForCausalLM, variant: str) -> InternLMForCausalLM:
    from xcomposer.llm.fast_decode import use_cuda_graphs
    if variant != "plain":
        m.fuse_projections()
    if variant == "fused+static":
        use_cuda_graphs(m)
    return m


@pytest.fixture(scope="module", params=DECODER_VARIANTS)
def pair(request):
    """(our tiny decoder in one of DECODER_VARIANTS, transformers' twin with the same weights)."""
    m = tiny_model()
    hf = hf_twin(m)
    return apply_variant(m, request.param), hf


def make_text_pdf(path, pages: list[str]) -> None:
    """Write a small valid PDF with one line of text per page (Helvetica, ASCII), with a correct xref
    table: a real text layer for pypdf to extract, made without a PDF library."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", None]
    kids = []
    font = 3 + 2 * len(pages)
    for i, text in enumerate(pages):
        page, content = 3 + 2 * i, 4 + 2 * i
        kids.append(f"{page} 0 R")
        safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 14 Tf 20 100 Td ({safe}) Tj ET".encode("latin-1")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 400 144] /Contents {content} 0 R "
                       f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode()
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    with open(path, "wb") as f:
        f.write(bytes(out))


class FedTokens:
    """The token ids a decoder was fed, by position, seen by a forward pre-hook: `generate()`'s calls
    and the serving engine's packed steps alike (one sequence at a time). `prompt(n)` is what
    positions 0..n-1 received; `first_call` the ids of the first call after `clear()` (a whole
    prompt in `generate()`)."""

    def __init__(self, model):
        self.by_pos: dict[int, int] = {}
        self.first_call: list[int] | None = None
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("position_ids")
        if ids is None or pos is None:
            return
        ids, pos = ids.flatten().tolist(), pos.flatten().tolist()
        if self.first_call is None:
            self.first_call = ids
        self.by_pos.update(zip(pos, ids))

    def prompt(self, n: int) -> list[int]:
        return [self.by_pos[p] for p in range(n)]

    def clear(self) -> None:
        self.by_pos, self.first_call = {}, None

    def remove(self) -> None:
        self.handle.remove()


def torchrun_xcomposer(args: list[str], nproc: int = 2, timeout: float = 300):
    """`torchrun --nproc_per_node N -m xcomposer ARGS` on a free port (gloo on the CPU, one thread a
    process, offline): the CompletedProcess, output captured."""
    import socket
    import subprocess
    import sys
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "xcomposer", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})

"""The InternLM v1 decoder: RMSNorm, rotary embeddings, biased attention, SwiGLU MLP.

Module names follow the upstream checkpoint (`model.layers.N.self_attn.q_proj` ...) so a
state dict loads without renaming. Two ways to run it:

* without caches: `model(input_ids, attention_mask=...)` attends among the given tokens
  (left padding allowed), as a plain causal LM does;
* with static caches (`setup_caches`): the generation engine passes the cache positions to
  write and a boolean mask over the first L cache slots; attention reads only those L slots.
  A mask over the whole cache keeps shapes fixed between decode steps, which is what CUDA
  graphs and `torch.compile` need; the eager engine passes masks over the filled prefix only,
  so a step does not read (and mask out) the empty tail of the cache.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import InternLMConfig


# scaled_dot_product_attention(enable_gqa=True) exists from torch 2.5
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 whatever the activation dtype, like the reference implementations
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim: int, length: int, base: float, max_position: int, dynamic: bool,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim) in fp32.

    With dynamic NTK scaling, a table longer than the trained window uses a larger base,
    base * (length / max_position) ** (d / (d - 2)), so positions past the window stay in the
    frequency range the model saw in training.
    """
    if dynamic and length > max_position:
        base = base * (length / max_position) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    t = torch.arange(length, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rope_from_positions(position_ids: torch.Tensor, cfg: InternLMConfig,
                        seq_len: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, T, head_dim) in fp32 for the InternLM2 family, computed from the positions of
    this forward call (no table), with its `rope_scaling`:

    * "linear": every frequency divided by the factor (positions / factor, as upstream writes it);
    * "dynamic" (NTK): the base depends on the length of *this call*, `seq_len`, by default the
      largest position + 1 of each row: base * ((f * n / max_pos) - (f - 1)) ** (d / (d - 2)) with
      n = max(seq_len, max_pos); `seq_len` may also be (B, T), one length per token (the paged engine
      packs several sequences' tokens into one row). A prefill uses the base for the prompt's length, each decode
      step the base for its own position + 1; keys already in the cache keep the rotation they
      were written with. Upstream's `InternLM2DynamicNTKScalingRotaryEmbedding` and transformers'
      "dynamic" rope do the same. Everything stays on the device (no host sync), so the
      fixed-shape decode step can be captured as a CUDA graph.
    """
    d = cfg.head_dim
    exps = torch.arange(0, d, 2, dtype=torch.int64, device=position_ids.device).float() / d
    kind, factor, base = cfg.rope_scaling_type, cfg.rope_scaling_factor, cfg.rope_base
    if kind == "dynamic":
        # per row: a sequence's rotation never depends on the other rows of its batch (the serving
        # engine batches unrelated requests); for one sequence this is upstream's rule exactly
        if seq_len is None:
            n = position_ids.amax(dim=-1) + 1
        else:
            n = torch.as_tensor(seq_len, dtype=torch.int64, device=position_ids.device)
            if n.dim() < 2:  # one length per row (or one for all); (B, T) is one per token
                n = n.expand(position_ids.shape[0])
        per_token = n.dim() == 2  # the paged engine packs several sequences into one row
        n = torch.clamp_min(n, cfg.max_position_embeddings).float()
        n = n[..., None] if per_token else n[:, None, None]
        base = base * ((factor * n / cfg.max_position_embeddings) - (factor - 1)) ** (d / (d - 2))
        inv_freq = 1.0 / (base ** exps)  # (B, T, d/2) per token, else (B, 1, d/2)
    else:
        inv_freq = 1.0 / (base ** exps)
    if kind == "linear":
        inv_freq = inv_freq / factor
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, D) already in x's dtype."""
    return x * cos + _rotate_half(x) * sin


class KVCache(nn.Module):
    """Preallocated (B, H, S, D) key/value buffers for one layer (H: the layer's kv heads)."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v

    def reorder(self, index: torch.Tensor, length: int | None = None) -> None:
        """Beam search: row i takes the cache of row index[i] (only slots [0, length) if given)."""
        k, v = (self.k, self.v) if length is None else (self.k[:, :, :length], self.v[:, :, :length])
        index = index.to(k.device)  # the cache may sit on another GPU than the generation bookkeeping
        k.copy_(k.index_select(0, index))
        v.copy_(v.index_select(0, index))


class PackedLinear(nn.Module):
    """One or more linear maps of the same input in one matrix product, optionally stored transposed.

    `fuse_projections` packs q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (one kernel
    instead of three or two, one read of the input), and may store a wide matrix as (in, out)
    rather than (out, in). On the CPU a (1, in) x (in, out) product streams the weights about
    twice as fast as the (out, in) dot-product kernel for matrices wider than they are tall
    (docs/performance.md); on CUDA the usual layout is kept. `state_dict()` still names and
    shapes every tensor as upstream does (`q_proj.weight` ...), so a fused model saves in the
    checkpoint layout.
    """

    def __init__(self, parts: dict[str, nn.Linear], transposed: bool = False):
        super().__init__()
        linears = list(parts.values())
        if len({m.in_features for m in linears}) != 1 or len({m.bias is None for m in linears}) != 1:
            raise ValueError("packed linears must share their input size and all have (or lack) a bias")
        self.names = tuple(parts)
        self.sizes = tuple(m.out_features for m in linears)
        self.in_features, self.out_features = linears[0].in_features, sum(self.sizes)
        self.transposed = transposed
        w = torch.cat([m.weight.detach() for m in linears]) if len(linears) > 1 else linears[0].weight.detach()
        self.weight = nn.Parameter(w.t().contiguous() if transposed else w.contiguous(), requires_grad=False)
        self.bias = None
        if linears[0].bias is not None:
            self.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)
        y = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return y.view(*x.shape[:-1], self.out_features)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs of the packed maps, in packing order."""
        return y.split(self.sizes, dim=-1)

    def _upstream(self) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        w = self.weight.t().contiguous() if self.transposed else self.weight
        biases = self.bias.split(self.sizes) if self.bias is not None else [None] * len(self.sizes)
        return list(zip(self.names, w.split(self.sizes), biases))

    def unpack(self) -> dict[str, nn.Linear]:
        """The packed maps as plain `nn.Linear`s again (fresh tensors)."""
        out = {}
        for name, w, b in self._upstream():
            lin = nn.Linear(self.in_features, w.shape[0], bias=b is not None, device="meta")
            lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
            if b is not None:
                lin.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
            out[name] = lin
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # upstream keys: the parent's prefix + each packed map's own name
        parent = prefix[:prefix.rstrip(".").rfind(".") + 1]
        for name, w, b in self._upstream():
            destination[f"{parent}{name}.weight"] = w if keep_vars else w.detach()
            if b is not None:
                destination[f"{parent}{name}.bias"] = b if keep_vars else b.detach()

    def extra_repr(self) -> str:
        layout = "(in, out)" if self.transposed else "(out, in)"
        return f"{'+'.join(self.names)}: in={self.in_features}, out={list(self.sizes)}, weight {layout}"


class PartialLoRA(nn.Module):
    """XComposer2's Partial LoRA on one projection: `A` (in -> r) and `B` (r -> out), no biases,
    scale 1, added to the base projection's output only on the rows `image_mask` marks (image
    tokens), so it cannot be merged into the base weight. Text rows, and every decode step (no
    mask), get the base projection alone."""

    def __init__(self, in_features: int, rank: int, out_features: int):
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)

    def add(self, y: torch.Tensor, x: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        """y (B, T, out) = base(x) for x (B, T, in); returns y + B(A(x)) on the masked rows."""
        if image_mask is None:
            return y
        delta = self.B(self.A(x[image_mask]))
        return y.index_put((image_mask,), delta.to(y.dtype), accumulate=True)


class Causal:
    """The mask of a forward whose T queries are the first T positions, none of them padding: query
    i attends keys 0..i. Given instead of a (B, 1, T, T) boolean tensor, it lets attention run SDPA's
    causal kernels (flash attention on GPUs; on CPUs the flash kernel skips the masked half) rather
    than read a dense mask; a long prompt's prefill is the case that gains."""

    __slots__ = ("length",)

    def __init__(self, length: int):
        self.length = int(length)

    def __repr__(self) -> str:
        return f"Causal({self.length})"


class Segments:
    """The mask of an uncached forward whose rows are packed with several sequences (`segment_ids`):
    per row, the (start, end) spans of its sequences, end to end. Attention runs each span on its own
    with SDPA's causal kernels, so a row costs what its sequences cost alone (no dense T x T mask)."""

    __slots__ = ("spans",)

    def __init__(self, segment_ids: torch.Tensor):
        self.spans = []
        for row in segment_ids.tolist():
            spans, start = [], 0
            for i in range(1, len(row) + 1):
                if i == len(row) or row[i] != row[start]:
                    spans.append((start, i))
                    start = i
            self.spans.append(spans)

    def __repr__(self) -> str:
        return f"Segments({self.spans})"


class TaskLoRAState:
    """Which task LoRAs the forward running now applies: None (none), or a dict name -> None (every
    token) or a (B, T) bool mask of the tokens whose request asked for that task. Set by
    `InternLMForCausalLM.forward` for the length of one call only, so interleaved generations on one
    model (streams, the engine's rows) never see each other's choice."""

    __slots__ = ("rows",)

    def __init__(self):
        self.rows: dict[str, torch.Tensor | None] | None = None


class TaskLoRA(nn.Module):
    """XComposer2.5's task LoRAs on one projection (upstream PLoRA's `lora_web`, `lora_sft`,
    `lora_dpo`): per name an `A` (in -> r) and `B` (r -> out), no biases, scale 1, added to the
    projection's output on every token (text, image, decode) of a request that selects the task.
    Held beside the base weight, never merged: requests of different tasks share one model."""

    def __init__(self, in_features: int, out_features: int, ranks: dict[str, int], state: TaskLoRAState):
        super().__init__()
        self.loras = nn.ModuleDict({name: PartialLoRA(in_features, r, out_features) for name, r in ranks.items()})
        object.__setattr__(self, "state", state)  # shared with the model, not a submodule

    def add(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rows = self.state.rows
        if not rows:
            return y
        for name, mask in rows.items():
            lora = self.loras[name] if name in self.loras else None
            if lora is None:
                continue
            if mask is None:
                y = y + lora.B(lora.A(x)).to(y.dtype)
            else:  # no host sync on the mask: an empty selection adds nothing
                y = y.index_put((mask,), lora.B(lora.A(x[mask])).to(y.dtype), accumulate=True)
        return y


def task_active(lora: TaskLoRA) -> bool:
    return bool(lora.state.rows)


def _task(module: nn.Module, name: str, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    lora = getattr(module, name, None)
    return y if lora is None else lora.add(y, x)


def packable(*linears) -> bool:
    """True when every map is a plain float `nn.Linear` (exactly that class): quantized projections
    (bitsandbytes' `Linear8bitLt` / `Linear4bit` subclass `nn.Linear`; GPTQ / AWQ modules) keep
    one module per upstream projection and are never packed by `fuse_projections`."""
    return all(type(m) is nn.Linear and m.weight.is_floating_point() for m in linears)


def _lora(module: nn.Module, name: str, y: torch.Tensor, x: torch.Tensor, image_mask) -> torch.Tensor:
    lora = getattr(module, name, None)
    return y if lora is None else lora.add(y, x, image_mask)


class Attention(nn.Module):
    def __init__(self, cfg: InternLMConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.kv_heads  # fewer than n_heads with grouped-query attention (InternLM2)
        self.head_dim = cfg.head_dim
        h = cfg.hidden_size
        kv = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(h, h, bias=cfg.bias)
        self.k_proj = nn.Linear(h, kv, bias=cfg.bias)
        self.v_proj = nn.Linear(h, kv, bias=cfg.bias)
        # set by fuse(), which empties q/k/v_proj; registered here so state_dict order stays upstream's
        self.register_module("qkv_proj", None)
        self.o_proj = nn.Linear(h, h, bias=cfg.bias)
        self.kv_cache: KVCache | None = None

    def fuse(self, transpose: bool) -> None:
        if self.qkv_proj is None and packable(self.q_proj, self.k_proj, self.v_proj):
            parts = {"q_proj": self.q_proj, "k_proj": self.k_proj, "v_proj": self.v_proj}
            self.q_proj = self.k_proj = self.v_proj = None
            self.qkv_proj = PackedLinear(parts, transposed=transpose)

    def unfuse(self) -> None:
        if self.qkv_proj is not None:
            parts = self.qkv_proj.unpack()
            self.qkv_proj = None
            self.q_proj, self.k_proj, self.v_proj = parts["q_proj"], parts["k_proj"], parts["v_proj"]

    def forward(self, x, cos, sin, mask, cache_pos=None, image_mask=None):
        B, T, C = x.shape
        if self.qkv_proj is not None:
            qkv = _task(self, "qkv_task", self.qkv_proj(x), x)
            q, k, v = self.qkv_proj.split(_lora(self, "qkv_lora", qkv, x, image_mask))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            task = getattr(self, "qkv_task", None) is not None and task_active(self.qkv_task)
            if task or (getattr(self, "qkv_lora", None) is not None and image_mask is not None):
                qkv = _lora(self, "qkv_lora", _task(self, "qkv_task", torch.cat([q, k, v], -1), x), x, image_mask)
                q, k, v = qkv.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if getattr(self.kv_cache, "paged", False):
            # the serving engine's block pool (xcomposer.engine.model_runner): it stores this call's
            # keys/values in their blocks and attends each packed sequence over its own blocks
            y = self.kv_cache.attend(q, k, v).transpose(1, 2).reshape(B, T, -1)
            return _lora(self, "o_lora", _task(self, "o_task", self.o_proj(y), y), y, image_mask)
        if isinstance(mask, Segments):  # packed rows: each sequence attends over itself only
            y = torch.cat([torch.cat([self._sdpa(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                 {"is_causal": True}) for s, e in spans], dim=2)
                           for b, spans in enumerate(mask.spans)])
            y = y.transpose(1, 2).reshape(B, T, -1)
            return _lora(self, "o_lora", _task(self, "o_task", self.o_proj(y), y), y, image_mask)
        causal = isinstance(mask, Causal)
        if self.kv_cache is not None and cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)
            filled = mask.length if causal else mask.shape[-1]
            if filled < k.shape[2]:  # the mask covers the filled prefix: skip the empty tail
                k, v = k[:, :, :filled], v[:, :, :filled]
        y = self._sdpa(q, k, v, {"is_causal": True} if causal else {"attn_mask": mask})
        # -1, not C: under tensor parallelism this rank holds n_heads * head_dim < C features
        y = y.transpose(1, 2).reshape(B, T, -1)
        return _lora(self, "o_lora", _task(self, "o_task", self.o_proj(y), y), y, image_mask)

    def _sdpa(self, q, k, v, attn: dict):
        if self.n_kv_heads != self.n_heads and _SDPA_GQA:  # grouped-query attention: kv head i // g
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **attn)
        if self.n_kv_heads != self.n_heads:  # torch < 2.5: repeat each kv head for its query group
            g = self.n_heads // self.n_kv_heads
            return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), **attn)
        return F.scaled_dot_product_attention(q, k, v, **attn)


class MLP(nn.Module):
    def __init__(self, cfg: InternLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.register_module("gate_up_proj", None)  # set by fuse(), which empties gate/up_proj
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def fuse(self, transpose: bool) -> None:
        if self.gate_up_proj is None and packable(self.gate_proj, self.up_proj):
            parts = {"gate_proj": self.gate_proj, "up_proj": self.up_proj}
            self.gate_proj = self.up_proj = None
            self.gate_up_proj = PackedLinear(parts, transposed=transpose)

    def unfuse(self) -> None:
        if self.gate_up_proj is not None:
            parts = self.gate_up_proj.unpack()
            self.gate_up_proj = None
            self.gate_proj, self.up_proj = parts["gate_proj"], parts["up_proj"]

    def forward(self, x, image_mask=None):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate, up = _task(self, "gate_task", gate, x), _task(self, "up_task", up, x)
        if image_mask is not None:
            gate = _lora(self, "gate_lora", gate, x, image_mask)
            up = _lora(self, "up_lora", up, x, image_mask)
        h = F.silu(gate) * up
        return _lora(self, "down_lora", _task(self, "down_task", self.down_proj(h), h), h, image_mask)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: InternLMConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache_pos=None, image_mask=None):
        if image_mask is None:  # the plain decoder's call, unchanged
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos, image_mask)
        return x + self.mlp(self.post_attention_layernorm(x), image_mask)


class InternLMModel(nn.Module):
    def __init__(self, cfg: InternLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=None)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class InternLMForCausalLM(nn.Module):
    """Decoder plus LM head. State-dict keys equal the upstream checkpoint's."""

    def __init__(self, cfg: InternLMConfig):
        super().__init__()
        self.config = cfg
        self.model = InternLMModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # the longest sequence generation may build; dynamic rotary scaling allows going past
        # max_position_embeddings when a caller raises it
        self.context_window = cfg.max_position_embeddings
        self._rope_len = 0
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.cache_batch = 0
        self.cache_len = 0
        self.fused: dict | None = None  # {"transpose": bool} once fuse_projections() ran
        # bumped whenever caches or rotary tables are reallocated: a captured CUDA graph that
        # points at the old buffers is then stale (xcomposer.llm.fast_decode)
        self.cache_generation = 0
        self.static_decode = None  # fast_decode.StaticDecode when use_cuda_graphs() is on
        self._decode_step = None
        self.task_state = TaskLoRAState()  # XComposer2.5's task LoRAs (add_task_loras) read it
        self.task_lora_names: tuple[str, ...] = ()

    # -- buffers ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def setup_rope(self, length: int) -> None:
        """Build rotary tables covering positions [0, length)."""
        cfg = self.config
        if cfg.family == "internlm2":  # computed per forward from the positions (rope_from_positions)
            return
        length = max(length, cfg.max_position_embeddings)
        if length == self._rope_len and self.rope_cos.device == self.device:
            return
        cos, sin = rope_tables(cfg.head_dim, length, cfg.rope_base, cfg.max_position_embeddings,
                               cfg.rope_dynamic, device=self.device)
        self.rope_cos, self.rope_sin, self._rope_len = cos, sin, length
        self.cache_generation += 1

    def setup_caches(self, batch: int, length: int, dtype=None) -> None:
        """Allocate static KV caches of (batch, heads, length, head_dim) in every layer.

        Each layer's cache lives on that layer's own device (layers may be spread over several
        GPUs by a device map) and holds that layer's heads (fewer under tensor parallelism)."""
        dtype = dtype or self.dtype
        if batch == self.cache_batch and length == self.cache_len and all(
                (c := layer.self_attn.kv_cache) is not None and c.k.dtype == dtype
                and c.k.device == layer.self_attn.o_proj.weight.device for layer in self.model.layers):
            return
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.kv_cache = None  # free the old buffers before allocating the new ones
            attn.kv_cache = KVCache(batch, attn.n_kv_heads, length, attn.head_dim, dtype, attn.o_proj.weight.device)
        self.cache_batch, self.cache_len = batch, length
        self.cache_generation += 1
        self.setup_rope(length)

    def clear_caches(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.cache_batch = self.cache_len = 0
        self.cache_generation += 1
        self._decode_step = None

    def reorder_caches(self, index: torch.Tensor, length: int | None = None) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache.reorder(index, length)

    # -- Partial LoRA (XComposer2) ---------------------------------------------------------
    def add_partial_lora(self, rank: int) -> "InternLMForCausalLM":
        """Give every projection (q/k/v together, o, gate, up, down) a `PartialLoRA` of `rank`
        (XComposer2's Plora on wqkv, wo, w1, w3, w2); forward applies them where `image_mask` is
        True. The qkv LoRA's B rows are in our q | k | v order (upstream's wqkv layout is mapped at
        load and save, llm/internlm2.py)."""
        cfg = self.config
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Partial LoRA rank={rank!r} must be a positive integer")
        h, kv, inter = cfg.hidden_size, cfg.kv_heads * cfg.head_dim, cfg.intermediate_size
        dev, dt = self.device, self.dtype
        for layer in self.model.layers:
            layer.self_attn.qkv_lora = PartialLoRA(h, rank, h + 2 * kv).to(dev, dt)
            layer.self_attn.o_lora = PartialLoRA(h, rank, h).to(dev, dt)
            layer.mlp.gate_lora = PartialLoRA(h, rank, inter).to(dev, dt)
            layer.mlp.up_lora = PartialLoRA(h, rank, inter).to(dev, dt)
            layer.mlp.down_lora = PartialLoRA(inter, rank, h).to(dev, dt)
        self.partial_lora_rank = rank
        return self

    # -- task LoRAs (XComposer2.5) ---------------------------------------------------------
    def add_task_loras(self, ranks: dict[str, int]) -> "InternLMForCausalLM":
        """Give every projection a `TaskLoRA` holding one LoRA per name in `ranks` (XComposer2.5's
        `lora_web` / `lora_sft` / `lora_dpo`: ranks read from the checkpoint's shapes). A forward
        applies the ones its `task_loras` names; none by default."""
        if not ranks:
            return self
        for name, r in ranks.items():
            if not name.isidentifier() or isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"task LoRA {name!r}: rank {r!r} must be a positive integer")
        cfg = self.config
        h, kv, inter = cfg.hidden_size, cfg.kv_heads * cfg.head_dim, cfg.intermediate_size
        dev, dt = self.device, self.dtype
        state = self.task_state
        for layer in self.model.layers:
            layer.self_attn.qkv_task = TaskLoRA(h, h + 2 * kv, ranks, state).to(dev, dt)
            layer.self_attn.o_task = TaskLoRA(h, h, ranks, state).to(dev, dt)
            layer.mlp.gate_task = TaskLoRA(h, inter, ranks, state).to(dev, dt)
            layer.mlp.up_task = TaskLoRA(h, inter, ranks, state).to(dev, dt)
            layer.mlp.down_task = TaskLoRA(inter, h, ranks, state).to(dev, dt)
        self.task_lora_names = tuple(ranks)
        return self

    def _task_rows(self, task_loras, B: int, T: int, device) -> dict[str, torch.Tensor | None] | None:
        """`task_loras` -> TaskLoRAState.rows: names (every token) or name -> (B, T) bool mask."""
        if not task_loras:
            return None
        known = getattr(self, "task_lora_names", ())
        items = task_loras.items() if isinstance(task_loras, dict) else ((n, None) for n in task_loras)
        rows = {}
        for name, mask in items:
            if name not in known:
                raise ValueError(f"task LoRA {name!r} is not in this model (it has {list(known) or 'none'})")
            if mask is not None:
                if tuple(mask.shape) != (B, T):
                    raise ValueError(f"task LoRA {name!r} mask must be (batch, tokens) = {(B, T)}, "
                                     f"got {tuple(mask.shape)}")
                mask = mask.to(device, torch.bool)
            rows[name] = mask
        return rows

    # -- fused layout ----------------------------------------------------------------------
    @torch.no_grad()
    def fuse_projections(self, transpose: bool | None = None) -> "InternLMForCausalLM":
        """Pack q/k/v and gate/up into one matrix each, once, after loading (the loaders do it).

        `transpose` (default: True when the weights are on the CPU) also stores the matrices wider
        than they are tall (qkv, gate/up, lm_head) as (in, out), the layout CPU kernels stream
        fastest at batch 1. Results equal the unfused model's up to float rounding; `state_dict()`
        keeps the upstream names and shapes. `unfuse_projections()` undoes it.
        """
        if transpose is None:
            transpose = self.lm_head.weight.device.type == "cpu"
        if self.fused is not None:
            if self.fused["transpose"] == transpose:
                return self
            self.unfuse_projections()
        for layer in self.model.layers:
            layer.self_attn.fuse(transpose)
            layer.mlp.fuse(transpose)
        head = self.lm_head
        if transpose and not self.config.tie_word_embeddings and packable(head):
            self.lm_head = PackedLinear({"lm_head": head}, transposed=True)
        self.fused = {"transpose": transpose}
        return self

    @torch.no_grad()
    def unfuse_projections(self) -> "InternLMForCausalLM":
        """Back to one `nn.Linear` per upstream projection (what tensor parallelism and
        `load_state_dict` work on)."""
        for layer in self.model.layers:
            layer.self_attn.unfuse()
            layer.mlp.unfuse()
        if isinstance(self.lm_head, PackedLinear):
            self.lm_head = self.lm_head.unpack()["lm_head"]
        self.fused = None
        return self

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Upstream's keys and shapes: v1's as they are; InternLM2's renamed, with q/k/v packed
        back into one `attention.wqkv` per layer in upstream's kv-group layout."""
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.config.family == "internlm2":
            from .internlm2 import to_internlm2_state_dict
            to_internlm2_state_dict(sd, self.config, prefix)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Upstream keys load into a fused model too: it is unfused, loaded and fused again."""
        if self.config.family == "internlm2":
            from .internlm2 import from_internlm2_state_dict
            state_dict = from_internlm2_state_dict(state_dict, self.config)
        fused = self.fused
        if fused is not None:
            self.unfuse_projections()
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            if fused is not None:
                self.fuse_projections(**fused)

    # -- forward ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        cache_pos: torch.Tensor | None = None,
        kv_mask: torch.Tensor | None = None,
        last_only: bool = False,
        rope_seq_len: int | torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        logits_rows: torch.Tensor | None = None,
        task_loras: Sequence[str] | dict[str, torch.Tensor | None] | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) with `last_only`.

        Without `cache_pos`: attention among the T given tokens; `attention_mask` (B, T) marks
        real tokens (0 for left padding; without it, SDPA's causal kernels run). With `cache_pos` (T,)
        and `kv_mask` (B, 1, T, L) (or `Causal(L)` when the T queries are cache slots 0..T-1 of unpadded rows),
        L <= cache length: keys/values are written to the static caches at `cache_pos` and
        queries attend over the first L cache slots where `kv_mask` is True; `position_ids`
        (B, T) must be given. `rope_seq_len` is the sequence length dynamic rotary scaling
        (InternLM2) sizes its base for, when it is not this call's largest position + 1: a chunked
        prefill passes the whole prompt's length. `image_mask` (B, T) bool marks image-token
        positions, where a model with Partial LoRA (`add_partial_lora`, XComposer2) adds it; None
        (text, every decode step) runs the base projections only. `task_loras` (a model with
        `add_task_loras`, XComposer2.5): names of task LoRAs applied to every token, or name ->
        (B, T) bool mask of the tokens they apply to (the engine's rows of several requests).
        `segment_ids` (B, T) int (uncached calls, instead of `attention_mask`): rows packed with several
        sequences (fine-tuning's `pack`; a padded row is one sequence and its padding), each numbered
        from 1 and 0 for padding; a token attends only to its own sequence's earlier tokens (SDPA's
        causal kernel span by span: `Segments`) and positions restart at 0 for each, so every sequence
        gives the logits it gives alone.

        The serving engine (`xcomposer.engine.model_runner`) installs its paged KV pool in the layers
        and calls with one packed row (1, T) of several sequences' tokens, each at its own position
        (`rope_seq_len` (1, T) per token), no `kv_mask` (the pool knows each sequence's blocks), and
        `logits_rows` (R,): the logits (R, vocab) of those rows only.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if segment_ids is not None:
            if cache_pos is not None or attention_mask is not None:
                raise ValueError("segment_ids packs sequences in an uncached forward: without attention_mask "
                                 "or cache_pos")
            if segment_ids.shape != (B, T):
                raise ValueError(f"segment_ids must be (batch, tokens) = {(B, T)}, got {tuple(segment_ids.shape)}")
            seg = segment_ids.to(x.device)
            idx = torch.arange(T, device=x.device)
            if position_ids is None:  # each sequence from 0: index minus its first index
                starts = torch.ones_like(seg, dtype=torch.bool)
                starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
                first = torch.where(starts, idx[None], torch.zeros_like(seg)).cummax(-1).values
                position_ids = idx[None] - first
            mask = Segments(seg)
        elif cache_pos is None and attention_mask is None:  # no padding: SDPA's causal kernels
            if position_ids is None:
                position_ids = torch.arange(T, device=x.device)[None].expand(B, T)
            mask = Causal(T)
        elif cache_pos is None:
            valid = attention_mask.bool()
            if position_ids is None:
                position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0)
            idx = torch.arange(T, device=x.device)
            causal = idx[None, :] <= idx[:, None]
            mask = causal[None] & valid[:, None, :]
            mask = (mask | torch.eye(T, dtype=torch.bool, device=x.device)[None])[:, None]
        else:
            paged = getattr(self.model.layers[0].self_attn.kv_cache, "paged", False)
            if position_ids is None or (kv_mask is None and not paged):
                raise ValueError("cached forward needs position_ids and kv_mask")
            mask = kv_mask
        if self.config.family == "internlm2":
            cos, sin = rope_from_positions(position_ids, self.config, rope_seq_len)
            cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
        elif logits_rows is not None:
            pass  # the engine built the table for its whole session (ModelRunner): no host sync here
        elif cache_pos is None or self.cache_len == 0 or self._rope_len < self.cache_len \
                or self.rope_cos.device != x.device:
            # uncached calls size the table to their own length (dynamic scaling depends on it);
            # cached calls use the table that setup_caches built for the whole generation (a
            # position never exceeds its cache slot), so decode steps skip this host sync
            needed = int(position_ids.max()) + 1 if position_ids.numel() else 0
            if cache_pos is None or needed > self._rope_len or self.rope_cos.device != x.device:
                self.setup_rope(needed)
        if self.config.family != "internlm2":
            cos = self.rope_cos[position_ids].to(x.dtype)[:, None]
            sin = self.rope_sin[position_ids].to(x.dtype)[:, None]
        home = x.device
        if image_mask is not None:
            if image_mask.shape != (B, T):
                raise ValueError(f"image_mask must be (batch, tokens) = {(B, T)}, got {tuple(image_mask.shape)}")
            image_mask = image_mask.to(x.device, torch.bool)
            if getattr(self, "partial_lora_rank", 0) == 0 or not bool(image_mask.any()):
                image_mask = None
        rows = self._task_rows(task_loras, B, T, x.device)
        self.task_state.rows = rows
        try:
            for layer in self.model.layers:
                x = layer(x, cos, sin, mask, cache_pos) if image_mask is None else \
                    layer(x, cos, sin, mask, cache_pos, image_mask.to(x.device))
        finally:
            self.task_state.rows = None
        if logits_rows is not None:
            x = x[0, logits_rows.to(x.device)]
        elif last_only:
            x = x[:, -1:]
        # with layers spread over GPUs (xcomposer.parallel.sharding) the head sits on the last one: hand the
        # logits back where the inputs came from, next to the generation loop's bookkeeping
        return self.lm_head(self.model.norm(x)).to(home)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation: normal(0, std) for matrices and biases, ones for norms."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or ".input_layernorm." in name or ".post_attention_layernorm." in name:
                p.fill_(1.0)
            else:  # biases too: random biases exercise the bias paths in parity tests
                p.normal_(0.0, std, generator=generator)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def kv_cache_bytes(cfg: InternLMConfig, batch: int, length: int, dtype=torch.float16) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * batch * length * cfg.kv_heads * cfg.head_dim * elem


__all__ = ["InternLMForCausalLM", "PackedLinear", "PartialLoRA", "TaskLoRA", "TaskLoRAState", "Causal", "Segments", "RMSNorm", "KVCache", "rope_tables", "rope_from_positions",
           "apply_rope", "kv_cache_bytes",
           "num_parameters"]

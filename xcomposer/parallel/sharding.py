"""Placing XComposer on several GPUs, and what it needs in memory on each.

A pipeline split at decoder-layer boundaries, run by `accelerate` hooks (docs/sharding.md):

* device 0 holds the vision tower, the perceive sampler, the token embeddings and the first
  decoder layers (images and the prompt are embedded where the decoder starts);
* the decoder layers are cut into contiguous runs, one per device, so that every device's bytes
  (weights + its layers' share of the KV cache + a fixed reserve) are as balanced as the
  budgets allow;
* the final norm and the LM head go with the last layers.

Byte counts come from the model itself, built on the `meta` device (no memory, exact shapes),
never from hand formulas. Everything here is a pure function of the config: no GPU is needed to
plan, report or test a placement. Upstream's `auto_configure_device_map` (InternLM-XComposer,
examples/utils.py) counts the vision tower as 4 "layers" and keeps norm and lm_head on GPU 0;
we weigh real bytes and put the head with the last layers instead.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence, Union

import torch
from torch import nn

from ..llm.config import InternLMConfig
from ..llm.decoder import InternLMForCausalLM
from ..llm.quant import describe_quantization, is_projection_weight, linear_weight_bytes, vision_linears

GiB = 1 << 30
# held back on every device for what weights and caches do not count: the CUDA context and its
# kernels (~0.5 GiB), allocator slack, activations of a 2k-token prefill (the MLP's 2048 x 11008
# intermediate, attention workspace) and the vision tower's activations. An estimate, not measured.
DEFAULT_RESERVE = 1 * GiB
# upstream's default generation runs 5 beams: the cache holds 5 rows per prompt
DEFAULT_KV_BATCH = 5


class PlacedConfig(Protocol):
    """What a vision-language model's config offers the planner: its decoder config and a way to
    build the whole model on the meta device. The planner never imports the model class it plans
    for (models sit above parallel); the config, which lives beside its model, builds it."""

    llm: InternLMConfig

    def meta_model(self) -> tuple[nn.Module, str, list[str]]:
        """(the model on the meta device, its decoder's module prefix such as "llm.", the modules
        that sit on device 0 before the token embeddings, such as ["vision", "sampler"])"""
        ...


AnyConfig = Union[PlacedConfig, InternLMConfig]


class ShardingError(RuntimeError):
    """The model does not fit the devices, or the placement request is invalid; the message says
    how many bytes are needed and available and what to change."""


# -- sizes from a meta-device model ------------------------------------------------------------

@dataclass(frozen=True)
class _Part:
    name: str  # module path in the model, as accelerate's device_map expects it
    params: int  # parameter elements
    buffer_bytes_fp32: tuple[tuple[int, int, bool], ...]  # (numel, element size, floating) per buffer
    # (in, out) of the decoder projections in this part (what 8/4-bit loading quantizes), and of the
    # vision tower's linears that quantize_vision=True quantizes
    projections: tuple[tuple[int, int], ...] = ()
    vision_linears: tuple[tuple[int, int], ...] = ()


def _build_meta(config: AnyConfig) -> tuple[nn.Module, str, list[str]]:
    """The model on the meta device, the prefix of its decoder ("llm." or "") and the modules placed
    before the embeddings."""
    if isinstance(config, InternLMConfig):
        with torch.device("meta"):
            return InternLMForCausalLM(config), "", []
    if not callable(getattr(config, "meta_model", None)) or not isinstance(getattr(config, "llm", None),
                                                                          InternLMConfig):
        raise TypeError(f"cannot plan a placement for a {type(config).__name__}: pass an InternLMConfig or a "
                        f"model config with .llm and .meta_model() (e.g. XComposerConfig)")
    return config.meta_model()


_SIZES: dict[str, tuple[list[_Part], list[_Part], list[_Part]]] = {}


def _parts(config: AnyConfig) -> tuple[list[_Part], list[_Part], list[_Part]]:
    """(head parts for device 0, one part per decoder layer, tail parts for the last device)."""
    key = repr(config)
    if key not in _SIZES:
        model, p, first = _build_meta(config)

        vision = {id(lin) for _, _, lin in vision_linears(model)} if p else set()

        def part(name: str) -> _Part:
            if isinstance(getattr(model, name, None), nn.Parameter):  # a top-level tensor (XComposer2.5's GN)
                return _Part(name, getattr(model, name).numel(), (), (), ())
            mod = model.get_submodule(name)
            params = sum(t.numel() for t in mod.parameters())
            bufs = tuple((b.numel(), b.element_size(), b.is_floating_point()) for b in mod.buffers())
            lins = [(n, m) for n, m in mod.named_modules() if isinstance(m, nn.Linear)]
            proj = tuple((m.in_features, m.out_features) for n, m in lins
                         if is_projection_weight(f"{name}.{n}.weight"))
            vis = tuple((m.in_features, m.out_features) for _, m in lins if id(m) in vision)
            return _Part(name, params, bufs, proj, vis)

        llm = model if not p else model.llm
        head = [part(name) for name in first] + [part(f"{p}model.embed_tokens")]
        layers = [part(f"{p}model.layers.{i}") for i in range(len(llm.model.layers))]
        tail = [part(f"{p}model.norm"), part(f"{p}lm_head")]
        if llm.config.tie_word_embeddings:  # one tensor: the embeddings already count it
            tail[-1] = dataclasses.replace(tail[-1], params=0)
        covered = sum(x.params for x in head + layers + tail)
        if covered != sum(t.numel() for t in model.parameters()):
            raise AssertionError("the placement parts do not cover every parameter of the model")
        _SIZES[key] = (head, layers, tail)
    return _SIZES[key]


def _elem(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _param_bytes(part: _Part, dtype: torch.dtype, quantization=None) -> int:
    """Parameter bytes in `dtype`; with `quantization` (bitsandbytes' `BnbQuantization` or a GPTQ /
    AWQ spec: anything with `weight_bytes(in, out)`) the decoder projections (and, when it says
    `quantize_vision`, the tower's linears) count at their stored quantized bytes."""
    total = part.params * _elem(dtype)
    if quantization is None:
        return total
    lins = part.projections + (part.vision_linears if getattr(quantization, "quantize_vision", False) else ())
    return total + sum(linear_weight_bytes(i, o, dtype, quantization) - i * o * _elem(dtype) for i, o in lins)


def _buffer_bytes(part: _Part, dtype: torch.dtype) -> int:
    # floating buffers are converted to the model dtype at load time like the weights
    return sum(n * (_elem(dtype) if floating else size) for n, size, floating in part.buffer_bytes_fp32)


def _llm_config(config: AnyConfig) -> InternLMConfig:
    return config if isinstance(config, InternLMConfig) else config.llm


# LMDeploy's `quant_policy` values for the KV cache: 0 keeps K/V in the model's dtype, 8 stores
# them as int8 and 4 as int4 (two per byte), each with a scale and a zero point per (token, kv head)
KV_QUANT_POLICIES = (0, 8, 4)


def check_quant_policy(value) -> int:
    """`value` if it is one of KV_QUANT_POLICIES, else a ValueError naming the allowed values."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in KV_QUANT_POLICIES:
        raise ValueError(f"quant_policy={value!r} is not a KV cache setting: use 0 (K/V in the model's dtype), "
                         f"8 (int8) or 4 (int4), LMDeploy's values")
    return value


def kv_scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a quantized cache's scales and zero points: float16 for a float16 model (as
    LMDeploy keeps them in the model's dtype), float32 otherwise (bfloat16's 8-bit mantissa would
    round a scale by up to half a quantization step, and float16 cannot hold bfloat16's range)."""
    return torch.float16 if dtype == torch.float16 else torch.float32


def kv_head_bytes(head_dim: int, dtype: torch.dtype, quant_policy: int = 0) -> int:
    """Bytes of one token's key (or value) in one kv head: `head_dim` elements of the model's dtype,
    or of `quant_policy` bits plus a scale and a zero point."""
    if check_quant_policy(quant_policy) == 0:
        return head_dim * _elem(dtype)
    if quant_policy == 4 and head_dim % 2:
        raise ValueError(f"quant_policy=4 packs two elements per byte: head_dim {head_dim} must be even")
    return head_dim * quant_policy // 8 + 2 * _elem(kv_scale_dtype(dtype))


def kv_cache_dtype_name(dtype: torch.dtype, quant_policy: int = 0) -> str:
    """How the KV cache stores K/V, for printed plans: "float16", "int8 + float16 scale/zero"."""
    if check_quant_policy(quant_policy) == 0:
        return str(dtype).replace("torch.", "")
    return f"int{quant_policy} + {str(kv_scale_dtype(dtype)).replace('torch.', '')} scale/zero per token and head"


def kv_bytes_per_layer(config: AnyConfig, batch: int, cache_len: int, dtype: torch.dtype,
                       quant_policy: int = 0) -> int:
    """Keys + values of one decoder layer for `batch` rows of `cache_len` tokens (the kv heads only:
    with grouped-query attention, InternLM2's 8 of 32); `quant_policy` 8 / 4: int8 / int4 elements
    plus a scale and a zero point per (token, kv head) (`kv_head_bytes`)."""
    c = _llm_config(config)
    return 2 * batch * cache_len * c.kv_heads * kv_head_bytes(c.head_dim, dtype, quant_policy)


# -- the serving engine's KV block pool -----------------------------------------------------------

DEFAULT_BLOCK_SIZE = 64  # tokens per KV block (LMDeploy's default)
DEFAULT_CACHE_MAX_ENTRY_COUNT = 0.8  # LMDeploy's: fraction of free device memory after the weights
DEFAULT_CPU_KV_GIB = 1.0  # on a CPU the pool takes at most this much ...
DEFAULT_CPU_SESSIONS = 4  # ... and never more than this many full sessions


@dataclass
class KVPoolPlan:
    """The engine's KV pool: `num_blocks` blocks of `block_size` tokens (one of them reserved),
    `bytes_per_block` over all layers of this rank."""

    num_blocks: int
    block_size: int
    bytes_per_block: int
    session_len: int
    source: str  # how the budget was chosen, for the printed plan
    kv_dtype: str = ""  # how K/V are stored ("float16", "int8 + float16 scale/zero ..."), for the printed plan
    quant_policy: int = 0

    @property
    def tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def full_sessions(self) -> int:
        """How many sequences of `session_len` tokens fit at once."""
        return self.tokens // self.session_len

    def describe(self) -> str:
        kind = f" ({self.kv_dtype})" if self.kv_dtype else ""
        return (f"KV pool{kind}: {self.num_blocks - 1} blocks x {self.block_size} tokens = {self.tokens} tokens, "
                f"{_gib(self.bytes)} ({self.bytes_per_block // self.block_size // 1024} KiB per token; {self.source}); "
                f"{self.full_sessions} full session(s) of {self.session_len} tokens fit at once")


class PoolTooSmallError(ShardingError):
    """Not even one `session_len` sequence fits the KV budget."""


def kv_pool_plan(config: AnyConfig, *, session_len: int, dtype: torch.dtype = torch.float16,
                 block_size: int = DEFAULT_BLOCK_SIZE, free_bytes: int | None = None,
                 cache_max_entry_count: float = DEFAULT_CACHE_MAX_ENTRY_COUNT, kv_cache_gib: float | None = None,
                 num_blocks: int | None = None, kv_split: int = 1, max_batch_size: int = 1,
                 quant_policy: int = 0) -> KVPoolPlan:
    """Size the serving engine's KV pool, by the first of: `num_blocks`; `kv_cache_gib` (an absolute
    budget); `cache_max_entry_count` x `free_bytes` (LMDeploy's rule: the fraction of the device
    memory still free once the weights are loaded); on a CPU (`free_bytes` None) the smaller of
    DEFAULT_CPU_KV_GIB and max(DEFAULT_CPU_SESSIONS, `max_batch_size`) full sessions. `kv_split` tensor-parallel ranks
    share the kv heads. `quant_policy` 8 / 4 (LMDeploy's): K/V stored as int8 / int4 plus a scale and
    a zero point per (token, kv head), so the same budget holds about 2x / 4x the tokens. The pool
    does not depend on the batch size: sequences hold only the blocks they have filled. Refuses
    (PoolTooSmallError, both numbers named) when one `session_len` sequence does not fit."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive number of tokens")
    c = _llm_config(config)
    per_token = kv_bytes_per_layer(config, 1, 1, dtype, quant_policy) * c.num_hidden_layers // kv_split
    per_block = per_token * block_size
    need_blocks = -(-session_len // block_size) + 1  # + the reserved block
    if num_blocks is not None:
        n, source = int(num_blocks), f"{num_blocks} blocks asked"
    elif kv_cache_gib is not None:
        if not kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib={kv_cache_gib!r} must be a positive number of GiB")
        n, source = int(kv_cache_gib * (1 << 30)) // per_block, f"--kv-cache-gib {kv_cache_gib:g}"
    elif free_bytes is not None:
        if not 0 < cache_max_entry_count <= 1:
            raise ValueError(f"cache_max_entry_count={cache_max_entry_count!r} must be in (0, 1]: the fraction of "
                             f"free device memory the KV pool takes")
        n = int(free_bytes * cache_max_entry_count) // per_block
        source = f"--cache-max-entry-count {cache_max_entry_count:g} of {_gib(free_bytes)} free"
    else:
        cap = int(DEFAULT_CPU_KV_GIB * (1 << 30)) // per_block
        sessions = max(DEFAULT_CPU_SESSIONS, max_batch_size)
        n = min(cap, sessions * (need_blocks - 1) + 1)
        source = f"CPU default: at most {DEFAULT_CPU_KV_GIB:g} GiB or {sessions} sessions"
    plan = KVPoolPlan(max(n, 0), block_size, per_block, session_len, source,
                      kv_cache_dtype_name(dtype, quant_policy), quant_policy)
    if plan.num_blocks < need_blocks:
        raise PoolTooSmallError(
            f"the KV pool ({source}) holds {max(plan.num_blocks - 1, 0) * block_size} tokens but one sequence of "
            f"--session-len {session_len} needs {(need_blocks - 1) * block_size} ({_gib(need_blocks * per_block)}): "
            f"lower --session-len, raise --cache-max-entry-count or --kv-cache-gib, or use more GPUs (--tp)")
    return plan


# -- the report --------------------------------------------------------------------------------

@dataclass
class DeviceMemory:
    """What one device holds."""

    index: int
    modules: list[str]
    layers: range  # decoder layers on this device
    param_bytes: int
    buffer_bytes: int
    kv_bytes: int
    reserve_bytes: int
    budget: int | None = None  # bytes available on the device, when known

    @property
    def total(self) -> int:
        return self.param_bytes + self.buffer_bytes + self.kv_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget


@dataclass
class MemoryReport:
    """Parameter and KV-cache bytes per device for one placement; `str()` is a readable table."""

    devices: list[DeviceMemory]
    dtype: torch.dtype
    batch: int
    cache_len: int
    device_map: dict[str, int] = field(repr=False)
    kv_bytes_per_token: int = 0  # all layers, one row
    quantization: object = None  # the weights' quantization (xcomposer.llm.quant), None for 16-bit

    @property
    def num_gpus(self) -> int:
        return len(self.devices)

    @property
    def param_bytes(self) -> int:
        return sum(d.param_bytes for d in self.devices)

    @property
    def kv_bytes(self) -> int:
        return sum(d.kv_bytes for d in self.devices)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        if self.quantization is not None:
            dt += f" weights with projections in {describe_quantization(self.quantization)}"
        else:
            dt += " weights"
        lines = [f"memory plan: {self.num_gpus} device(s), {dt}, KV cache for {self.batch} row(s) x "
                 f"{self.cache_len} tokens ({_size(self.kv_bytes_per_token * self.batch)} per token position)",
                 f"{'device':>6}  {'layers':>9}  {'params':>10}  {'buffers':>10}  {'KV cache':>10}  "
                 f"{'reserve':>10}  {'total':>10}  {'budget':>10}  holds"]
        for d in self.devices:
            extra = [m for m in d.modules if ".layers." not in m]
            layers = f"{d.layers.start}-{d.layers.stop - 1}" if len(d.layers) else "-"
            budget = _gib(d.budget) if d.budget is not None else "?"
            flag = "" if d.fits else "  OVER BUDGET"
            lines.append(f"{d.index:>6}  {layers:>9}  {_gib(d.param_bytes):>10}  {_gib(d.buffer_bytes):>10}  "
                         f"{_gib(d.kv_bytes):>10}  {_gib(d.reserve_bytes):>10}  {_gib(d.total):>10}  "
                         f"{budget:>10}  {', '.join(extra) or 'layers only'}{flag}")
        lines.append(f"{'all':>6}  {'':>9}  {_gib(self.param_bytes):>10}  "
                     f"{_gib(sum(d.buffer_bytes for d in self.devices)):>10}  {_gib(self.kv_bytes):>10}  "
                     f"{_gib(sum(d.reserve_bytes for d in self.devices)):>10}  {_gib(self.total):>10}")
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# -- placement ---------------------------------------------------------------------------------

def _split(fixed: list[int], layer_cost: list[int], weight: list[float]) -> list[int]:
    """Cut points (len N+1) of the layers into N non-empty contiguous runs minimising first the
    largest per-device load / weight, then (among those) the sum of squared loads / weight: a
    placement as flat as the largest-load optimum allows. Exact dynamic programming."""
    n, L = len(fixed), len(layer_cost)
    pre = [0]
    for c in layer_cost:
        pre.append(pre[-1] + c)

    def load(d: int, i: int, j: int) -> float:  # device d holds layers [i, j)
        return (fixed[d] + pre[j] - pre[i]) / weight[d]

    inf = math.inf
    # pass 1: the smallest achievable maximum
    best = [[inf] * (L + 1) for _ in range(n)]
    for j in range(1, L - n + 2):
        best[0][j] = load(0, 0, j)
    for d in range(1, n):
        for j in range(d + 1, L - (n - 1 - d) + 1):
            best[d][j] = min(max(best[d - 1][i], load(d, i, j)) for i in range(d, j))
    cap = best[n - 1][L] * (1 + 1e-12)
    # pass 2: the flattest placement whose maximum stays at that optimum
    sq = [[inf] * (L + 1) for _ in range(n)]
    arg = [[0] * (L + 1) for _ in range(n)]
    for j in range(1, L - n + 2):
        if load(0, 0, j) <= cap:
            sq[0][j] = load(0, 0, j) ** 2
    for d in range(1, n):
        for j in range(d + 1, L - (n - 1 - d) + 1):
            for i in range(d, j):
                x = load(d, i, j)
                if x <= cap and sq[d - 1][i] + x * x < sq[d][j]:
                    sq[d][j], arg[d][j] = sq[d - 1][i] + x * x, i
    cuts = [L]
    for d in range(n - 1, 0, -1):
        cuts.append(arg[d][cuts[-1]])
    cuts.append(0)
    return cuts[::-1]


def _check_request(config: AnyConfig, num_gpus, batch, cache_len, budgets) -> list[int] | None:
    layers = _llm_config(config).num_hidden_layers
    if not isinstance(num_gpus, int) or num_gpus < 1:
        raise ShardingError(f"num_gpus={num_gpus!r} must be an integer >= 1")
    if num_gpus > layers:
        raise ShardingError(f"num_gpus={num_gpus} but the decoder has only {layers} layers to split (every device "
                            f"gets at least one): use num_gpus <= {layers}")
    if not isinstance(batch, int) or batch < 1 or not isinstance(cache_len, int) or cache_len < 0:
        raise ShardingError(f"batch={batch!r} and cache_len={cache_len!r} must be integers >= 1 and >= 0")
    if budgets is None:
        return None
    budgets = list(budgets)
    if len(budgets) != num_gpus:
        raise ShardingError(f"{len(budgets)} memory budget(s) given for num_gpus={num_gpus}: give one per device")
    if any(not isinstance(b, int) or b <= 0 for b in budgets):
        raise ShardingError(f"memory budgets must be positive byte counts, got {budgets}")
    return budgets


def memory_report(config: AnyConfig, num_gpus: int = 1, dtype: torch.dtype = torch.float16, batch: int = 1,
                  cache_len: int | None = None, budgets: Sequence[int] | None = None, *,
                  reserve: int = DEFAULT_RESERVE, quantization=None) -> MemoryReport:
    """Parameter, buffer and KV-cache bytes per device for the balanced placement over `num_gpus`.

    `config` is an `XComposerConfig` (or an `InternLMConfig` for the decoder alone); `batch` is the
    number of cache rows (prompts x beams), `cache_len` the cache length in tokens (default: the
    context window; every image takes `tokens_per_image` of them); `budgets` the bytes available
    per device. `reserve` bytes are added on every device for activations and the CUDA context.
    `quantization` (8/4-bit weights: `xcomposer.llm.quant.resolve_quantization(...)` or a GPTQ / AWQ
    spec) counts the quantized projections at their stored bytes. Never raises for lack of memory: `report.fits` says whether it fits (`placement` raises).
    """
    cache_len = _llm_config(config).max_position_embeddings if cache_len is None else cache_len
    budgets = _check_request(config, num_gpus, batch, cache_len, budgets)
    head, layers, tail = _parts(config)
    kv = kv_bytes_per_layer(config, batch, cache_len, dtype)
    w = lambda parts: sum(_param_bytes(p, dtype, quantization) + _buffer_bytes(p, dtype) for p in parts)  # noqa: E731
    fixed = [reserve] * num_gpus
    fixed[0] += w(head)
    fixed[-1] += w(tail)
    cost = [w([p]) + kv for p in layers]
    cuts = _split(fixed, cost, [float(b) for b in budgets] if budgets else [1.0] * num_gpus)

    devices, device_map = [], {}
    for d in range(num_gpus):
        run = layers[cuts[d]:cuts[d + 1]]
        parts = (head if d == 0 else []) + run + (tail if d == num_gpus - 1 else [])
        for p in parts:
            device_map[p.name] = d
        devices.append(DeviceMemory(
            index=d, modules=[p.name for p in parts], layers=range(cuts[d], cuts[d + 1]),
            param_bytes=sum(_param_bytes(p, dtype, quantization) for p in parts),
            buffer_bytes=sum(_buffer_bytes(p, dtype) for p in parts),
            kv_bytes=kv * len(run), reserve_bytes=reserve, budget=budgets[d] if budgets else None))
    per_token = kv_bytes_per_layer(config, 1, 1, dtype) * len(layers)
    return MemoryReport(devices, dtype, batch, cache_len, device_map, per_token, quantization)


def gpus_needed(config: AnyConfig, gpu_bytes: int, *, dtype: torch.dtype = torch.float16, batch: int = 1,
                cache_len: int | None = None, reserve: int = DEFAULT_RESERVE,
                quantization=None) -> tuple[int, MemoryReport]:
    """The fewest GPUs of `gpu_bytes` each that hold the model plus a `batch` x `cache_len` KV cache
    in the balanced placement, and that placement's report; `ShardingError` when even one GPU per
    decoder layer is not enough. E.g. a 1M-token session of internlm2_5-7b-chat-1m:
    `gpus_needed(internlm2_5_7b_chat_1m_config(), 141 * 10**9, cache_len=1 << 20)`."""
    if not isinstance(gpu_bytes, int) or gpu_bytes <= 0:
        raise ShardingError(f"gpu_bytes={gpu_bytes!r} must be a positive byte count")
    layers = _llm_config(config).num_hidden_layers
    for n in range(1, layers + 1):
        report = memory_report(config, n, dtype, batch, cache_len, [gpu_bytes] * n, reserve=reserve,
                               quantization=quantization)
        if report.fits:
            return n, report
    raise ShardingError(f"even {layers} GPUs of {_gib(gpu_bytes)} (one decoder layer each) cannot hold the model "
                        f"and its KV cache:\n{report}\nshorten the cache (cache_len, batch) or use larger GPUs")


def placement(config: AnyConfig, num_gpus: int = 1, *, dtype: torch.dtype = torch.float16, batch: int = 1,
              cache_len: int | None = None, budgets: Sequence[int] | None = None,
              reserve: int = DEFAULT_RESERVE, quantization=None) -> dict[str, int]:
    """Module name -> device index for `accelerate.dispatch_model`; see `memory_report` for the
    arguments. Raises `ShardingError` (bytes needed vs available, and what to change) if the
    balanced placement exceeds a budget."""
    report = memory_report(config, num_gpus, dtype, batch, cache_len, budgets, reserve=reserve,
                           quantization=quantization)
    check_fits(report, config, reserve=reserve)
    return report.device_map


def check_fits(report: MemoryReport, config: AnyConfig, *, reserve: int = DEFAULT_RESERVE) -> None:
    """Raise `ShardingError` naming the shortfall and the fixes when `report` exceeds a budget."""
    if report.fits:
        return
    over = [d for d in report.devices if not d.fits]
    budgets = [d.budget for d in report.devices]
    dt = str(report.dtype).replace("torch.", "")
    worst = max(over, key=lambda d: d.total - d.budget)
    fixes = []
    layers = _llm_config(config).num_hidden_layers
    per_device = min(budgets)
    for n in range(report.num_gpus + 1, min(layers, 16) + 1):
        r = memory_report(config, n, report.dtype, report.batch, report.cache_len, [per_device] * n, reserve=reserve,
                          quantization=report.quantization)
        if r.fits:
            fixes.append(f"use more GPUs (num_gpus={n} with {_gib(per_device)} each fits)")
            break
    else:
        fixes.append("use more GPUs")
    per_tok = report.kv_bytes_per_token * report.batch
    fixes.append(f"shorten the KV cache (it takes {_size(per_tok)} per token position for {report.batch} row(s): "
                 f"fewer beams, a shorter context or fewer images, {_tokens_per_image(config)} tokens each)")
    if report.dtype == torch.float32:
        fixes.append("load in float16 or bfloat16 (half the bytes of float32)")
    if report.quantization is None:
        fixes.append("load the weights in 4-bit (load_in_4bit=True / --load-in-4bit) or 8-bit")
    raise ShardingError(
        f"the model does not fit: {dt} weights ({_gib(report.param_bytes)}) + KV cache ({_gib(report.kv_bytes)} for "
        f"{report.batch} x {report.cache_len} tokens) + {_gib(reserve)} reserve per device need "
        f"{_gib(report.total)} in all, the {report.num_gpus} device(s) have {_gib(sum(budgets))}; the best "
        f"placement needs {_gib(worst.total)} on device {worst.index} which has {_gib(worst.budget)} "
        f"({_gib(worst.total - worst.budget)} short). To fix: " + "; or ".join(fixes) + f".\n{report}")


def _tokens_per_image(config: AnyConfig) -> int:
    return getattr(config, "tokens_per_image", 0) or 66


# -- dispatching a loaded model -----------------------------------------------------------------

def device_of(name: str, device_map: dict[str, object]):
    """The device a tensor called `name` belongs on: the entry of its longest mapped prefix."""
    best = None
    for prefix, dev in device_map.items():
        if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, dev)
    if best is None:
        raise KeyError(f"{name!r} is not covered by the device map")
    return best[1]


def dispatch(model: nn.Module, device_map: dict[str, object], *, main_device=None, force_hooks: bool = False):
    """Attach `accelerate`'s device hooks so each mapped module runs on its device (moving its weights
    there if they are not yet); inputs are moved between devices at module boundaries."""
    from accelerate import dispatch_model
    if main_device is None:
        main_device = device_of(next(iter(device_map)), device_map)
    return dispatch_model(model, device_map=device_map, main_device=main_device, force_hooks=force_hooks)


def cuda_budgets(num_gpus: int) -> list[int]:
    """Free bytes on cuda:0 .. cuda:num_gpus-1 now."""
    return [int(torch.cuda.mem_get_info(i)[0]) for i in range(num_gpus)]


def require_gpus(num_gpus: int) -> None:
    """Refuse `num_gpus` > the visible CUDA devices, before anything is read."""
    if not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"num_gpus={num_gpus!r} must be an integer >= 1 (1 loads on `device`)")
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < num_gpus:
        raise ShardingError(
            f"num_gpus={num_gpus} but torch.cuda.device_count()=={have}: this machine shows {have} CUDA GPU(s) "
            f"(check CUDA_VISIBLE_DEVICES and the driver); use num_gpus={max(have, 1)}"
            + (" with device='cpu'" if have == 0 else "") + f", or run on a machine with {num_gpus} GPUs")


__all__ = ["ShardingError", "KVPoolPlan", "kv_pool_plan", "PoolTooSmallError", "DEFAULT_BLOCK_SIZE",
           "DEFAULT_CACHE_MAX_ENTRY_COUNT", "DeviceMemory", "MemoryReport", "memory_report", "placement", "check_fits", "gpus_needed",
           "kv_bytes_per_layer", "KV_QUANT_POLICIES", "check_quant_policy", "kv_scale_dtype", "kv_head_bytes",
           "kv_cache_dtype_name", "dispatch", "device_of", "cuda_budgets", "require_gpus",
           "DEFAULT_RESERVE", "DEFAULT_KV_BATCH"]

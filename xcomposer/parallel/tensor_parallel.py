"""Tensor parallelism for the InternLM decoder over a `torch.distributed` process group.

Megatron-style split of every decoder layer across the W ranks of a group (docs/sharding.md):

* q/k/v and gate/up are column-parallel: rank r keeps rows [r*n/W, (r+1)*n/W) of each weight
  (and of the q/k/v biases), so it computes its own H/W attention heads and its own slice of the
  MLP's intermediate features without talking to anyone. With grouped-query attention (InternLM2)
  the same cut gives rank r kv heads [r*KV/W, (r+1)*KV/W) and exactly the query heads that share
  them (query head i uses kv head i // (H/KV)), so W must divide the kv heads too;
* o_proj and down_proj are row-parallel: rank r keeps the matching input columns, computes a
  partial product, and an `all_reduce` (sum) makes the full output on every rank; the bias is
  added once, after the reduce;
* embeddings, the norms and lm_head are replicated: every rank computes the same full logits, so
  the unchanged generation loop makes the same choices on every rank (two all-reduces per layer,
  no gather of logits). This costs the embedding and head weights on every rank (2 x 0.8 GiB at
  7B fp16); a vocab-parallel head would save that at the price of an all_gather per step.
* the KV cache of a rank holds only its own heads (`setup_caches` reads each attention's
  `n_heads`), so cache memory divides by W as well.

Every rank must run the same calls with the same inputs. Sampling draws random numbers: pass a
`seed` generation option (or seed every rank's global generator alike) so all ranks draw the same.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..llm.config import InternLMConfig
from ..llm.decoder import InternLMForCausalLM


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r @ W_r^T) + b, where x_r / W_r are this rank's slice of the input features."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y if self.bias is None else y + self.bias


def check_shardable(cfg: InternLMConfig, world_size: int) -> None:
    """Raise ValueError unless heads and MLP features split evenly over `world_size` ranks."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an integer >= 1")
    if cfg.num_attention_heads % world_size:
        ok = [w for w in range(1, cfg.num_attention_heads + 1) if cfg.num_attention_heads % w == 0
              and cfg.intermediate_size % w == 0]
        raise ValueError(f"num_attention_heads={cfg.num_attention_heads} cannot be split evenly over "
                         f"{world_size} ranks (each rank computes whole heads): use a world size among {ok}")
    if cfg.intermediate_size % world_size:
        raise ValueError(f"intermediate_size={cfg.intermediate_size} cannot be split evenly over {world_size} "
                         f"ranks: use a world size that divides it")
    if cfg.kv_heads % world_size:  # grouped-query attention (InternLM2): each rank keeps whole kv heads
        ok = [w for w in range(1, cfg.kv_heads + 1) if cfg.kv_heads % w == 0 and cfg.intermediate_size % w == 0]
        raise ValueError(f"num_key_value_heads={cfg.kv_heads} cannot be split evenly over {world_size} ranks (each "
                         f"rank keeps whole key/value heads and the query heads that share them): use a world size "
                         f"among {ok}")


def _rows(t: torch.Tensor | None, rank: int, world: int) -> torch.Tensor | None:
    if t is None:
        return None
    n = t.shape[0] // world
    return t.detach().narrow(0, rank * n, n).clone()  # clone: the full tensor can be freed


def _column(linear: nn.Linear, rank: int, world: int) -> nn.Linear:
    w, b = _rows(linear.weight, rank, world), _rows(linear.bias, rank, world)
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    out.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        out.bias = nn.Parameter(b, requires_grad=False)
    return out


def _row(linear: nn.Linear, rank: int, world: int, group) -> RowParallelLinear:
    n = linear.weight.shape[1] // world
    w = linear.weight.detach().narrow(1, rank * n, n).clone()
    b = None if linear.bias is None else linear.bias.detach().clone()
    return RowParallelLinear(w, b, group)


def shard_decoder(model: InternLMForCausalLM, group=None) -> InternLMForCausalLM:
    """Split `model` (fully loaded, identical on every rank) in place across `group` (default: the
    world) and return it. Call on every rank; afterwards `model(...)`, `generate(model, ...)` and
    the chat methods work as before, with the same results on every rank."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tensor parallelism needs an initialised torch.distributed process group: call "
                           "torch.distributed.init_process_group(...) on every rank first (e.g. under torchrun)")
    if getattr(model, "tp_world_size", 1) != 1:
        raise RuntimeError("this decoder is already split for tensor parallelism")
    quant = getattr(model, "quantization", None)
    if quant is not None:
        raise ValueError(f"tensor parallelism does not split quantized projections ({quant.describe()}) yet: serve "
                         f"the model with --tp 1 (a 4-bit 7B model fits one 8 GB GPU), or load it in 16-bit")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    check_shardable(model.config, world)
    model.clear_caches()  # caches sized for all heads
    fused = model.fused
    model.unfuse_projections()  # split the upstream projections, then pack this rank's slices again
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = (_column(m, rank, world) for m in (attn.q_proj, attn.k_proj,
                                                                                     attn.v_proj))
        attn.o_proj = _row(attn.o_proj, rank, world, group)
        attn.n_heads = model.config.num_attention_heads // world
        attn.n_kv_heads = model.config.kv_heads // world  # rank r: kv heads [r*KV/W, ...) and their query groups
        mlp.gate_proj, mlp.up_proj = _column(mlp.gate_proj, rank, world), _column(mlp.up_proj, rank, world)
        mlp.down_proj = _row(mlp.down_proj, rank, world, group)
    model.tp_group, model.tp_rank, model.tp_world_size = group, rank, world
    if fused is not None:
        model.fuse_projections(**fused)
    return model


_COLUMN = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "mlp.gate_proj.", "mlp.up_proj.")
_ROW = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def rank_slicer(model: InternLMForCausalLM):
    """For a decoder split by `shard_decoder` while still on the meta device: a function giving, for
    a checkpoint tensor loaded under the model's parameter `name`, this rank's part of it (the rows
    of a column-parallel projection, the input columns of a row-parallel one, anything else whole),
    as a fresh tensor, so the full tensor is not kept (`load_checkpoint_into(select=...)`)."""
    rank, world = model.tp_rank, model.tp_world_size

    def select(name: str, t: torch.Tensor) -> torch.Tensor:
        if any(part in name for part in _COLUMN):
            return _rows(t, rank, world)
        if name.endswith(_ROW):
            n = t.shape[1] // world
            return t.detach().narrow(1, rank * n, n).clone()
        return t
    return select


def sharded_loading(group=None):
    """A `before_load` hook for `InternLM.from_pretrained`: split the decoder, still on the meta
    device, over `group`, and read only this rank's slice of every split weight. Each rank then
    holds its share from the start, so `--tp N` serves a model larger than one device."""
    def before_load(model: InternLMForCausalLM):
        shard_decoder(model, group)
        return rank_slicer(model)
    return before_load


def tensor_parallel(model: nn.Module, group=None) -> nn.Module:
    """`shard_decoder` for an `InternLMForCausalLM` (or `InternLM`), or for the decoder of an
    `XComposer` (`model.llm`; the vision tower and sampler stay whole on every rank)."""
    if isinstance(model, InternLMForCausalLM):
        return shard_decoder(model, group)
    llm = getattr(model, "llm", None)
    if isinstance(llm, InternLMForCausalLM):
        shard_decoder(llm, group)
        return model
    raise TypeError(f"tensor_parallel expects an InternLMForCausalLM or an XComposer, got {type(model).__name__}")


__all__ = ["RowParallelLinear", "check_shardable", "shard_decoder", "tensor_parallel", "rank_slicer", "sharded_loading"]

"""The decode step with fixed shapes, replayed as a CUDA graph.

At batch 1 a 7B decode step is a few milliseconds of weight reads, but launching its ~600
kernels one by one from Python takes longer than that: the GPU waits on the host
(../shared/PERFORMANCE-NOTES.md: 26-31 ms per step eagerly, 6.2 ms replayed as a graph). A CUDA
graph records the kernels of one step once and replays them with one launch. It needs every
tensor the step touches to keep its address and shape, so the static step:

* feeds one token per row through fixed input buffers (token, rotary position, cache slot, and a
  boolean mask over *all* S cache slots, not just the filled prefix as the eager engine does);
* writes keys and values into the per-layer static caches with `index_copy_` at a slot held in a
  device tensor, so no step depends on a Python integer;
* returns a copy of the logits (the next replay overwrites the graph's output).

The cache length S is rounded up to a multiple of `bucket` tokens so one graph serves many
prompt and reply lengths; a new batch size or bucket allocates new caches and captures again
(each capture of the 7B decoder records one step: well under a second). Beam reordering copies
within the same cache tensors, so a graph survives it.

`use_cuda_graphs(model)` switches a decoder to this path. Off CUDA (or with `graph=False`) the
same fixed-shape step runs eagerly: that is how its math is tested on the CPU against the eager
engine. `compile=True` also passes the step through `torch.compile` before capture (fuses the
norm, rotary and activation kernels). A model spread over several GPUs by `accelerate` keeps the
eager path: its hooks move tensors between devices inside the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_BUCKET = 256


@dataclass
class StaticDecode:
    """How a decoder runs its decode steps (`model.static_decode`)."""

    graph: bool = True  # capture a CUDA graph when the model is on CUDA
    compile: bool = False  # torch.compile the step (before capture)
    bucket: int = DEFAULT_BUCKET  # cache lengths are rounded up to a multiple of this


def use_cuda_graphs(model: nn.Module, enabled: bool = True, *, compile: bool = False,
                    bucket: int = DEFAULT_BUCKET, graph: bool = True) -> nn.Module:
    """Run `model`'s decode steps (an `InternLMForCausalLM`, or the decoder of an `XComposer`) as
    fixed-shape steps replayed from a CUDA graph. `enabled=False` goes back to the eager engine.
    Returns `model`."""
    from .decoder import InternLMForCausalLM
    llm = model if isinstance(model, InternLMForCausalLM) else getattr(model, "llm", None)
    if not isinstance(llm, InternLMForCausalLM):
        raise TypeError(f"use_cuda_graphs expects an InternLMForCausalLM or an XComposer, got {type(model).__name__}")
    if not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket={bucket!r} must be a positive number of tokens")
    llm.static_decode = StaticDecode(graph=graph, compile=compile, bucket=bucket) if enabled else None
    llm._decode_step = None
    return model


def static_cache_length(needed: int, window: int, bucket: int) -> int:
    """`needed` slots rounded up to a multiple of `bucket`, but never past max(needed, window)."""
    rounded = -(-needed // bucket) * bucket
    return max(needed, min(rounded, window))


def is_dispatched(model: nn.Module) -> bool:
    """Spread over devices by accelerate (hooks run inside forward)."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def _fingerprint(model: nn.Module) -> tuple:
    """Addresses a captured step reads: moving the model (`.to`, `.half()`) changes them."""
    layers = model.model.layers
    caches = [layers[i].self_attn.kv_cache for i in (0, -1)]
    return (model.model.embed_tokens.weight.data_ptr(), model.lm_head.weight.data_ptr(),
            layers[0].self_attn.o_proj.weight.data_ptr(), model.rope_cos.data_ptr(),
            *(c.k.data_ptr() if c is not None else None for c in caches))


class DecodeStep:
    """One decode step of `model` for `batch` rows over its current `length`-slot caches."""

    def __init__(self, model: nn.Module, batch: int, length: int, settings: StaticDecode):
        self.model, self.batch, self.length = model, batch, length
        self.cache_generation = model.cache_generation
        self.fingerprint = _fingerprint(model)
        dev = model.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=dev)
        self.mask[..., 0] = True  # warm-up rows attend to one slot: no all-masked NaN rows
        self.fn = torch.compile(model, dynamic=False) if settings.compile else model
        self.graph = None
        if settings.graph and dev.type == "cuda" and not is_dispatched(model):
            self._capture()

    def _forward(self) -> torch.Tensor:
        return self.fn(self.tokens, position_ids=self.pos, cache_pos=self.cache_pos, kv_mask=self.mask)

    def _capture(self) -> None:
        # warm-up on a side stream (allocator pools, cuBLAS workspaces, compilation), then record.
        # The warm-up writes slot 0 of every cache: callers capture before the prefill, which
        # rewrites every slot it uses.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    def valid_for(self, model: nn.Module, batch: int, length: int) -> bool:
        return (model is self.model and batch == self.batch and length == self.length
                and model.cache_generation == self.cache_generation and _fingerprint(model) == self.fingerprint)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, cache_pos: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        """tokens/pos (N, 1), cache_pos (1,), mask (N, 1, 1, S) -> logits (N, 1, V), a fresh tensor."""
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        self.cache_pos.copy_(cache_pos)
        self.mask.copy_(mask)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits.clone()


def decode_step_for(model: nn.Module, batch: int, length: int) -> DecodeStep:
    """The model's static step for these shapes, captured anew when the shapes or caches changed.
    Call after `setup_caches(batch, length)` and before the prefill."""
    step = getattr(model, "_decode_step", None)
    if step is None or not step.valid_for(model, batch, length):
        model._decode_step = None  # release the old graph's memory pool first
        step = model._decode_step = DecodeStep(model, batch, length, model.static_decode)
    return step


__all__ = ["StaticDecode", "use_cuda_graphs", "static_cache_length", "DecodeStep", "decode_step_for",
           "is_dispatched", "DEFAULT_BUCKET"]

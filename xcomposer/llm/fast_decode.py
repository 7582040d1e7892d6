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

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

DEFAULT_BUCKET = 256


class CudaGraphBackend:
    """Captures a function as a CUDA graph: `capture(fn)` -> (replay, output).

    `fn` runs three times on a side stream first (allocator pools, cuBLAS workspaces, compilation
    settle there), then once under capture. `replay()` reruns the recorded kernels, which rewrite
    `output` in place: copy it before the next replay."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = fn()
        return graph.replay, output


class CapturedCall:
    """`fn(*inputs)` for inputs of fixed shapes, replayed by `backend` (a CUDA graph).

    The inputs are copied into buffers allocated once (a graph reads fixed addresses) and the
    result is copied out of the graph's output (the next replay overwrites it)."""

    def __init__(self, fn: Callable[..., torch.Tensor], example_inputs: Sequence[torch.Tensor], backend):
        self.inputs = [t.detach().clone() for t in example_inputs]
        self.replay, self.output = backend.capture(lambda: fn(*self.inputs))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buf, x in zip(self.inputs, inputs):
            buf.copy_(x)
        self.replay()
        return self.output.clone()


@dataclass
class StaticDecode:
    """How a decoder runs its decode steps (`model.static_decode`)."""

    graph: bool = True  # capture a CUDA graph when the model is on CUDA
    compile: bool = False  # torch.compile the step (before capture)
    bucket: int = DEFAULT_BUCKET  # cache lengths are rounded up to a multiple of this
    # what captures and replays: None = CudaGraphBackend on CUDA (and no capture elsewhere); the
    # tests put a CPU stand-in here to drive the capture path without a GPU
    backend: object | None = None

    def backend_for(self, device: torch.device):
        if not self.graph:
            return None
        if self.backend is not None:
            return self.backend
        return CudaGraphBackend() if device.type == "cuda" else None


def use_cuda_graphs(model: nn.Module, enabled: bool = True, *, compile: bool = False,
                    bucket: int = DEFAULT_BUCKET, graph: bool = True, vision: bool = True) -> nn.Module:
    """Run `model`'s decode steps (an `InternLMForCausalLM`, or the decoder of an `XComposer`) as
    fixed-shape steps replayed from a CUDA graph; for an `XComposer` with `vision`, also replay
    image encoding (vision tower + sampler) from one graph per batch size. `enabled=False` goes
    back to the eager paths. Returns `model`."""
    from .decoder import InternLMForCausalLM
    llm = model if isinstance(model, InternLMForCausalLM) else getattr(model, "llm", None)
    if not isinstance(llm, InternLMForCausalLM):
        raise TypeError(f"use_cuda_graphs expects an InternLMForCausalLM or an XComposer, got {type(model).__name__}")
    if not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket={bucket!r} must be a positive number of tokens")
    if enabled and graph and getattr(getattr(llm, "quantization", None), "method", None) in ("int8", "nf4", "fp4"):
        raise ValueError("CUDA graphs are not used with bitsandbytes' 8-bit / 4-bit projections (LLM.int8() picks "
                         "its outlier columns anew every step, so no fixed graph can replay it): run without "
                         "--cuda-graphs, or load in 16-bit")
    settings = StaticDecode(graph=graph, compile=compile, bucket=bucket) if enabled else None
    llm.static_decode = settings
    llm._decode_step = None
    if llm is not model and hasattr(model, "vision_graphs"):
        model.vision_graphs = ImageEncoderGraphs(model, settings) if enabled and vision and graph else None
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
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        cache_pos = torch.zeros(1, dtype=torch.long, device=dev)
        mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=dev)
        mask[..., 0] = True  # warm-up rows attend to one slot: no all-masked NaN rows
        fn = torch.compile(model, dynamic=False) if settings.compile else model
        self.forward = lambda t, p, c, m: fn(t, position_ids=p, cache_pos=c, kv_mask=m)  # noqa: E731
        backend = settings.backend_for(dev) if not is_dispatched(model) else None
        # capturing runs the step (warm-up), which writes scratch into cache slot 0: callers
        # capture before the prefill, which rewrites every slot it uses
        self.captured = CapturedCall(self.forward, (tokens, pos, cache_pos, mask), backend) if backend else None

    def valid_for(self, model: nn.Module, batch: int, length: int) -> bool:
        return (model is self.model and batch == self.batch and length == self.length
                and model.cache_generation == self.cache_generation and _fingerprint(model) == self.fingerprint)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, cache_pos: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        """tokens/pos (N, 1), cache_pos (1,), mask (N, 1, 1, S) -> logits (N, 1, V), a fresh tensor."""
        if self.captured is None:
            return self.forward(tokens, pos, cache_pos, mask)
        return self.captured(tokens, pos, cache_pos, mask)


def decode_step_for(model: nn.Module, batch: int, length: int) -> DecodeStep:
    """The model's static step for these shapes, captured anew when the shapes or caches changed.
    Call after `setup_caches(batch, length)` and before the prefill."""
    step = getattr(model, "_decode_step", None)
    if step is None or not step.valid_for(model, batch, length):
        model._decode_step = None  # release the old graph's memory pool first
        step = model._decode_step = DecodeStep(model, batch, length, model.static_decode)
    return step


class ImageEncoderGraphs:
    """Image encoding (vision tower + sampler) of an XComposer replayed from one captured call per
    batch size (at most `MAX_SIZES`, least recently used dropped). At batch 1 the EVA ViT-g's
    ~600 kernels are launch-bound eagerly (timm's Eva: 18 ms for one image on an H100 in the probe,
    19 ms for eight)."""

    MAX_SIZES = 4

    def __init__(self, model: nn.Module, settings: StaticDecode):
        self.model, self.settings = model, settings
        self.calls: "OrderedDict[tuple, CapturedCall]" = OrderedDict()
        self.fingerprint: tuple | None = None  # weight addresses the captures read

    def _fingerprint(self) -> tuple:
        firsts = (next(self.model.vision.parameters()), next(self.model.sampler.parameters()))
        return tuple((p.data_ptr(), p.dtype) for p in firsts)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """The embeddings of `pixels` from a captured call, or None where none applies (not on CUDA,
        or the model is spread over devices): the caller then encodes eagerly."""
        backend = self.settings.backend_for(pixels.device)
        if backend is None or is_dispatched(self.model):
            return None
        fingerprint = self._fingerprint()
        if fingerprint != self.fingerprint:  # moved or cast: every capture is stale
            self.calls.clear()
            self.fingerprint = fingerprint
        key = (tuple(pixels.shape), pixels.dtype, pixels.device)
        call = self.calls.get(key)
        if call is None:
            while len(self.calls) >= self.MAX_SIZES:
                self.calls.popitem(last=False)
            encode = lambda px: self.model.sampler(self.model.vision(px))  # noqa: E731
            call = self.calls[key] = CapturedCall(encode, (pixels,), backend)
        self.calls.move_to_end(key)
        return call(pixels)


__all__ = ["StaticDecode", "CudaGraphBackend", "CapturedCall", "ImageEncoderGraphs", "use_cuda_graphs", "static_cache_length", "DecodeStep", "decode_step_for",
           "is_dispatched", "DEFAULT_BUCKET"]

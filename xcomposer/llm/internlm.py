"""`InternLM`: the decoder with checkpoint loading and the chat API of InternLM's README.

    from xcomposer import InternLM, load_tokenizer
    model = InternLM.from_pretrained("internlm/internlm-chat-7b", device="cuda", dtype=torch.float16)
    tokenizer = load_tokenizer(folder)           # or model.tokenizer
    response, history = model.chat(tokenizer, "hello", history=[])
    for response, history in model.stream_chat(tokenizer, "and then?", history=history): ...
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from .chat import Turn, chat_template_of, check_history, check_template
from .chat_format import CHAT_DEFAULTS, InternLMChatFormat
from .checkpoint import CheckpointError, checkpoint_folder, load_checkpoint_into
from .config import InternLMConfig, config_from_json
from .decoder import InternLMForCausalLM, kv_cache_bytes
from .internlm2 import apply_overrides, checkpoint_options
from .quant import (QuantizationError, checkpoint_quantization, model_weight_bytes, planned_quantization,
                    prepare_packed_kernels, quantize_model_, quantized_target, resolve_quantization)
from .generation import GenerationConfig, generate, stream_generate
from .tokenizer import IncrementalDecoder, InternLMTokenizer, load_tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device, config_dtype: str | None) -> torch.dtype:
    """An explicit dtype wins; otherwise the checkpoint's dtype on a GPU and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if device.type == "cpu":
            return torch.float32
        dtype = config_dtype or "float16"
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def check_device(device: torch.device) -> None:
    """Refuse a CUDA device that this machine does not show, before any weight is read."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (device.index is not None and device.index >= count):
        raise ValueError(f"device={str(device)!r} but this machine shows {count} CUDA GPU(s) (check the driver and "
                         f"CUDA_VISIBLE_DEVICES): load with device='cpu'" + (f" or one of cuda:0..cuda:{count - 1}"
                                                                            if count else ""))


class InsufficientMemoryError(RuntimeError):
    """The model and one session's KV cache do not fit the device; the message has the numbers."""


# held back for the CUDA context, allocator slack and prefill activations (as parallel.sharding's)
RESERVE_BYTES = 1 << 30


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def check_fits_device(model, dtype: torch.dtype, free_bytes: int, device: str = "the device",
                      kv_split: int = 1, quantization: Any = None) -> None:
    """Refuse (before any weight is read) a model, built on the meta device, whose weights plus the
    KV cache of one session of `model.context_window` tokens plus a reserve exceed `free_bytes`.
    `kv_split` ranks share the cache (tensor parallelism after loading: each rank first loads every
    weight, then keeps 1/W of them and of the kv heads). `quantization` (bitsandbytes' or a GPTQ /
    AWQ spec) counts the projections at their quantized bytes."""
    cfg = model.config
    weights = model_weight_bytes(model, dtype, quantization)
    window = model.context_window
    per_token = kv_cache_bytes(cfg, 1, 1, dtype) // kv_split
    need = weights + per_token * window + RESERVE_BYTES
    if need <= free_bytes:
        return
    room = (free_bytes - weights - RESERVE_BYTES) // per_token
    fix = (f"load with max_context={int(room)} or less (the most that fits), " if room >= 2 else "")
    raise InsufficientMemoryError(
        f"the model does not fit {device}: {str(dtype).replace('torch.', '')} weights"
        f"{f' ({quantization.describe()})' if quantization is not None else ''} {_gib(weights)} + KV cache "
        f"for one {window}-token session {_gib(per_token * window)} ({per_token // 1024} KiB per token"
        f"{f' on each of {kv_split} tensor-parallel ranks' if kv_split > 1 else ''}) + "
        f"{_gib(RESERVE_BYTES)} reserve = {_gib(need)}, but {device} has {_gib(free_bytes)} free. To fix: {fix}"
        f"split it over GPUs (xcomposer.parallel.sharding.gpus_needed(config, gpu_bytes, cache_len={window}) says "
        f"how many; tensor_parallel splits the KV heads across ranks), or free GPU memory")


class InternLM(InternLMForCausalLM):
    """InternLM chat model, either family (InternLM v1 in the internlm-chat-7b layout, InternLM2 /
    InternLM2.5 in upstream's internlm2 layout), with InternLM's `chat`/`stream_chat`."""

    tokenizer: InternLMTokenizer | None = None
    chat_template: str = "2023-12"  # llm/chat.py: "2023-07", "2023-12" (v1) or "chatml" (InternLM2), set on loading

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, fuse: bool = True, rope_scaling: Any = "config",
                        rope_scaling_factor: float | None = None, max_context: int | None = None,
                        template: str | None = None, before_load=None, load_in_8bit: bool = False,
                        load_in_4bit: bool = False, quantization: Any = None, quantization_config: Any = None,
                        bnb_4bit_quant_type: str | None = None, bnb_4bit_compute_dtype: Any = None,
                        bnb_4bit_use_double_quant: bool | None = None,
                        llm_int8_threshold: float | None = None, adapter: str | os.PathLike | None = None) -> "InternLM":
        """Load a local folder or hub id of either family, strictly: InternLM v1 (internlm-chat-7b
        layout) or InternLM2 / InternLM2.5 (`model_type` "internlm2" in config.json).

        The model is built on the meta device and filled shard by shard, so memory peaks at
        the model plus one shard. `fuse` packs q/k/v and gate/up once loaded
        (`fuse_projections`). InternLM2 only: `rope_scaling` ({"type": "dynamic" | "linear",
        "factor": f} or None) and `rope_scaling_factor` override config.json's rotary scaling.
        `max_context` sets the context window (prompt plus reply; default max_position_embeddings),
        e.g. 1048576 for internlm2_5-7b-chat-1m with dynamic NTK. On a GPU, a model whose weights
        plus the KV cache of one `max_context` session do not fit is refused before any weight is read.
        InternLM v1 only: `template` ("2023-07" or "2023-12") overrides the chat template read from
        the folder's `modeling_internlm.py` (llm/chat.py, `chat_template_of`); InternLM2 uses chatml.
        What decided the template is printed and kept in `model.load_notes`.
        `before_load(model)` runs on the meta-device model before any weight is read and may return
        a `select(name, tensor)` for the loader (`parallel.tensor_parallel.sharded_loading(group)`:
        each tensor-parallel rank splits the model first and reads only its own slices).
        `load_in_8bit` / `load_in_4bit` (and `quantization="int8" | "nf4" | "fp4"`, a transformers
        `BitsAndBytesConfig` as `quantization_config`, or its `bnb_4bit_*` / `llm_int8_threshold`
        words) quantize the decoder's projections with bitsandbytes as transformers does
        (xcomposer.llm.quant; docs/quantization.md); the memory check counts the quantized bytes.
        `adapter` (a peft LoRA folder, upstream's module names; docs/finetune.md) is merged into the
        weights once they are read, before fusing or quantizing (xcomposer.llm.adapter).
        """
        if template is not None:
            check_template(template)
        folder, cfg_file = checkpoint_folder(path_or_hub_id, "InternLM")
        cfg = apply_overrides(config_from_json(cfg_file), rope_scaling=rope_scaling,
                              rope_scaling_factor=rope_scaling_factor, max_context=max_context)
        if cfg.family == "internlm2" and template is not None:
            raise ValueError(f"template={template!r} applies to InternLM v1 (internlm-chat-7b); InternLM2 checkpoints "
                             f"use the chatml template")
        quant = resolve_quantization(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, quantization=quantization,
                                     quantization_config=quantization_config, bnb_4bit_quant_type=bnb_4bit_quant_type,
                                     bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
                                     bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
                                     llm_int8_threshold=llm_int8_threshold)
        if quant is not None and before_load is not None:
            raise QuantizationError("8-bit / 4-bit weights are not combined with tensor parallelism yet: serve the "
                                    "quantized model with --tp 1 (a 4-bit 7B model fits one 8 GB GPU)")
        packed = checkpoint_quantization(folder, quant)  # a GPTQ / AWQ folder: its own 4-bit tensors
        device = torch.device(device)
        check_device(device)
        dtype = resolve_dtype(dtype, device, cfg.torch_dtype)
        with torch.device("meta"):
            model = cls(cfg)
        if max_context is not None:
            model.context_window = max_context
        select = before_load(model) if before_load is not None else None
        if device.type == "cuda":  # under torch.distributed, tensor_parallel will split the cache over the ranks
            ranks = torch.distributed.get_world_size() if torch.distributed.is_available() \
                and torch.distributed.is_initialized() else 1
            # a model split before loading (before_load) counts only its own share of the weights
            check_fits_device(model, dtype, int(torch.cuda.mem_get_info(device)[0]), str(device), kv_split=ranks,
                              quantization=planned_quantization(quant, packed, device))
        if adapter is not None and (packed is not None or select is not None):
            raise ValueError("adapter= merges into float weights: not with a GPTQ / AWQ folder or tensor "
                             "parallelism yet (merge the adapter into a 16-bit checkpoint first)")
        # quantized: the projections are read onto the CPU and quantized as they move to the device
        load_checkpoint_into(model, folder, device=quantized_target(device, quant), dtype=dtype, select=select,
                             **checkpoint_options(cfg))
        adapter_note = None
        if adapter is not None:  # merged into the float weights: the decoder stays plain
            from .adapter import merge_adapter_
            adapter_note = merge_adapter_(model, adapter)
        if quant is not None:
            quantize_model_(model, quant, device)
        if packed is not None:
            prepare_packed_kernels(model)
            model.quantization = packed
        model.setup_rope(cfg.max_position_embeddings)
        if fuse:
            model.fuse_projections()
        model.eval()
        if (folder / "tokenizer.model").is_file():
            model.tokenizer = load_tokenizer(folder)
        model.source = Path(folder)
        if cfg.family == "internlm2":
            model.chat_template, why = "chatml", "config.json model_type internlm2"
        elif template is not None:
            model.chat_template, why = template, "template= given"
        else:
            model.chat_template, why = chat_template_of(folder)
        model.load_notes = [f"chat template {model.chat_template} ({why})"] + ([adapter_note] if adapter_note else [])
        if quant is not None or packed is not None:
            model.load_notes.append((quant or packed).describe())
        print(f"InternLM {folder.name}: " + "; ".join(model.load_notes), file=sys.stderr)
        return model

    # -- transformers-style generate ---------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids, attention_mask=None, **options: Any) -> torch.Tensor:
        """`model.generate(input_ids, attention_mask=None, max_new_tokens=..., do_sample=..., num_beams=...)`
        as transformers users call it: a (B, T) LongTensor batch in (left padding marked by
        `attention_mask`), the prompt plus the new tokens out, (B, T + n), finished rows filled
        with the pad id as transformers does. Options are `GenerationConfig`'s; the stop and pad
        ids default to config.json's. The engine is `xcomposer.generate` (which takes and returns
        lists of ids, unpadded)."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a (batch, length) LongTensor of token ids with length >= 1, got "
                             f"shape {tuple(ids.shape)} and dtype {ids.dtype}")
        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            mask = torch.as_tensor(attention_mask).to(ids.device).bool()
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}: "
                                 f"give one 0/1 entry per token")
            if (mask.long().diff(dim=1) < 0).any():
                raise ValueError("attention_mask marks padding after real tokens: pad on the left "
                                 "(tokenizer.padding_side = 'left'), as generation needs")
        options.setdefault("eos_token_id", self.config.eos_token_id)
        options.setdefault("pad_token_id", self.config.pad_token_id)
        rows = [r[m].tolist() for r, m in zip(ids.cpu(), mask.cpu())]
        out = generate(self, rows, **options)
        pad = int(options["pad_token_id"])
        width = max((len(t) for t in out.tokens), default=0)
        new = torch.full((ids.shape[0], width), pad, dtype=ids.dtype)
        for i, t in enumerate(out.tokens):
            new[i, :len(t)] = torch.tensor(t, dtype=ids.dtype)
        return torch.cat([ids, new.to(ids.device)], dim=1)

    # -- chat --------------------------------------------------------------------------------
    @property
    def chat_format(self) -> InternLMChatFormat:
        """This model's chat format (llm/chat_format.py): its prompts, defaults, stop tokens and history
        rules, as `chat()` uses them and the server, the web demo and `pipeline` call them."""
        return InternLMChatFormat(self)

    @torch.inference_mode()
    def chat(self, tokenizer: InternLMTokenizer, query: str, history: list[Turn] | None = None,
             streamer=None, meta_instruction: str | None = None, **options: Any) -> tuple[str, list[Turn]]:
        """One chat turn: `(response, history + [(query, response)])`.

        `options` are generation options (transformers' names); defaults are InternLM's
        (sampling at temperature 0.8, top_p 0.8, up to 1024 new tokens). `streamer`, if given,
        receives token tensors through `put()` and `end()` like a transformers streamer.
        `meta_instruction` replaces the system text of InternLM2's chatml template and of
        internlm-chat-7b's 2023-12 template ("" leaves the system turn out; the July 2023 template
        has none).
        """
        history = check_history(history)
        fmt = InternLMChatFormat(self, tokenizer=tokenizer)
        cfg = fmt.generation_config(options)
        ids = fmt.ids(query, history, cfg, meta_instruction)[0]
        if streamer is not None:
            streamer.put(torch.tensor([ids]))
            tokens: list[int] = []
            for piece in stream_generate(self, ids, config=cfg):
                tokens += piece
                streamer.put(torch.tensor(piece))
            streamer.end()
        else:
            tokens = generate(self, [ids], config=cfg).tokens[0]
        response = tokenizer.decode(tokens, skip_special_tokens=True)
        return response, history + [(query, response)]

    def stream_chat(self, tokenizer: InternLMTokenizer, query: str, history: list[Turn] | None = None,
                    meta_instruction: str | None = None, **options: Any) -> Iterator[tuple[str, list[Turn]]]:
        """Yield `(response_so_far, history + [(query, response_so_far)])` as text arrives.

        Text is released only in whole characters; the last yield equals `chat()`'s answer.
        """
        history = check_history(history)
        fmt = InternLMChatFormat(self, tokenizer=tokenizer)
        cfg = fmt.generation_config(options)
        ids = fmt.ids(query, history, cfg, meta_instruction)[0]
        text = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        response = ""
        for piece in stream_generate(self, ids, config=cfg):
            new = text.push(piece)
            if new:
                response += new
                yield response, history + [(query, response)]
        response += text.flush()
        yield response, history + [(query, response)]


__all__ = ["InternLM", "load_tokenizer", "CHAT_DEFAULTS", "resolve_dtype", "check_device", "check_fits_device",
           "InsufficientMemoryError"]

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

from .chat import Turn, build_chat_ids, chat_template_of, check_history, check_template
from .checkpoint import CheckpointError, checkpoint_folder, load_checkpoint_into
from .config import InternLMConfig
from .decoder import InternLMForCausalLM
from .generation import GenerationConfig, generate, stream_generate
from .tokenizer import IncrementalDecoder, InternLMTokenizer, load_tokenizer

# InternLM's own chat defaults (its modeling code): sample at temperature 0.8, nucleus 0.8
CHAT_DEFAULTS = dict(max_new_tokens=1024, do_sample=True, temperature=0.8, top_p=0.8)

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


class InternLM(InternLMForCausalLM):
    """InternLM v1 chat model (internlm-chat-7b layout) with InternLM's `chat`/`stream_chat`."""

    tokenizer: InternLMTokenizer | None = None
    chat_template: str = "2023-12"  # llm/chat.py: "2023-07" or "2023-12", set by from_pretrained

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, fuse: bool = True,
                        template: str | None = None) -> "InternLM":
        """Load a local folder or hub id in the internlm-chat-7b layout, strictly.

        The model is built on the meta device and filled shard by shard, so memory peaks at
        the model plus one shard. `fuse` packs q/k/v and gate/up once loaded
        (`fuse_projections`). `template` ("2023-07" or "2023-12") overrides the chat template
        read from the folder's `modeling_internlm.py` (llm/chat.py, `chat_template_of`); what
        decided it is printed and kept in `model.load_notes`.
        """
        if template is not None:
            check_template(template)
        folder, cfg_file = checkpoint_folder(path_or_hub_id, "InternLM")
        cfg = InternLMConfig.from_json(cfg_file)
        device = torch.device(device)
        check_device(device)
        dtype = resolve_dtype(dtype, device, cfg.torch_dtype)
        with torch.device("meta"):
            model = cls(cfg)
        load_checkpoint_into(model, folder, device=device, dtype=dtype)
        model.setup_rope(cfg.max_position_embeddings)
        if fuse:
            model.fuse_projections()
        model.eval()
        if (folder / "tokenizer.model").is_file():
            model.tokenizer = load_tokenizer(folder)
        model.source = Path(folder)
        if template is not None:
            model.chat_template, why = template, "template= given"
        else:
            model.chat_template, why = chat_template_of(folder)
        model.load_notes = [f"chat template {model.chat_template} ({why})"]
        print(f"InternLM {folder.name}: " + "; ".join(model.load_notes), file=sys.stderr)
        return model

    # -- chat --------------------------------------------------------------------------------
    def _chat_config(self, tokenizer: InternLMTokenizer, options: dict[str, Any]) -> GenerationConfig:
        merged = {**CHAT_DEFAULTS, **options}
        stop = [tokenizer.eos_token_id, tokenizer.eoa_token_id]
        return GenerationConfig(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id).replace(**merged)

    def _chat_prompt(self, tokenizer, query: str, history, cfg: GenerationConfig,
                     meta_instruction: str | None) -> list[int]:
        ids, _dropped = build_chat_ids(tokenizer, query, history, self.context_window, cfg.max_new_tokens,
                                       self.chat_template, meta_instruction)
        return ids

    @torch.inference_mode()
    def chat(self, tokenizer: InternLMTokenizer, query: str, history: list[Turn] | None = None,
             streamer=None, meta_instruction: str | None = None, **options: Any) -> tuple[str, list[Turn]]:
        """One chat turn: `(response, history + [(query, response)])`.

        `options` are generation options (transformers' names); defaults are InternLM's
        (sampling at temperature 0.8, top_p 0.8, up to 1024 new tokens). `streamer`, if given,
        receives token tensors through `put()` and `end()` like a transformers streamer.
        `meta_instruction` replaces the 2023-12 template's system text ("" leaves the system turn out).
        """
        history = check_history(history)
        cfg = self._chat_config(tokenizer, options)
        ids = self._chat_prompt(tokenizer, query, history, cfg, meta_instruction)
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
        cfg = self._chat_config(tokenizer, options)
        ids = self._chat_prompt(tokenizer, query, history, cfg, meta_instruction)
        text = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        response = ""
        for piece in stream_generate(self, ids, config=cfg):
            new = text.push(piece)
            if new:
                response += new
                yield response, history + [(query, response)]
        response += text.flush()
        yield response, history + [(query, response)]


__all__ = ["InternLM", "load_tokenizer", "CHAT_DEFAULTS", "resolve_dtype", "check_device"]

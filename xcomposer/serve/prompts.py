"""From chat messages and completion prompts to what the engine feeds the decoder, per model.

Every prompt comes from the model's chat format (`model.chat_format`: llm/chat_format.py for
InternLM, next to each XComposer model for theirs), the one owner of each family's template, defaults,
stop tokens, history rules and token budget; the server, the web demo and `pipeline` reach it only
through `ServedModel`, which adds what belongs to serving: the model's served name, LoRA adapters
held beside the weights, and the engine's `Prompt`.

Messages reach here already checked by the HTTP layer: (role, text, image references) with roles
user/assistant alternating and ending with a user turn.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

from torch import nn

from ..llm.chat_format import ChatFormatError, ChatPrompt, Message
from ..llm.generation import GenerationConfig
from ..llm.internlm import InternLM
from ..models.vl_prompt import IMAGE_PLACEHOLDER
from ..models.xcomposer import XComposer
from ..models.xcomposer2 import XComposer2
from .engine import Prompt

# a request the model's template cannot express (`param` names the field): the chat format's error
PromptError = ChatFormatError


def engine_prompt(prompt: ChatPrompt) -> Prompt:
    """The engine's Prompt of a chat format's ChatPrompt (`dropped` travels beside it)."""
    return Prompt(ids=prompt.ids, build=prompt.build, length=prompt.length if prompt.build is not None else 0,
                  task_loras=tuple(prompt.task_loras))


class ServedModel:
    """One loaded model behind the API: its chat format under the served name, and its adapters."""

    def __init__(self, model: nn.Module, name: str, adapters: dict[str, str] | None = None):
        if not isinstance(model, (InternLM, XComposer, XComposer2)):
            raise TypeError(f"the server serves InternLM, XComposer and XComposer2 models, got {type(model).__name__}")
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer: load it with from_pretrained from a folder holding "
                             "tokenizer.model")
        self.model, self.name = model, name
        # LoRA adapters held beside the weights (llm/adapter.attach_adapter_): name -> folder; a request
        # whose `model` names one runs with it (`for_adapter`)
        self.adapters = dict(adapters or {})
        self.adapter: str | None = None  # set on the view `for_adapter` returns
        self.base_name = name
        self.tokenizer = model.tokenizer
        self.format = model.chat_format.named(name)
        self.vision = self.format.takes_images
        self.xcomposer2d5 = self.format.takes_video  # high-resolution tiling, video, task LoRAs

    def for_adapter(self, model_field: str | None) -> "ServedModel":
        """The served model a request's `model` field names: this one (None, or the base's name), or a
        view that answers under an adapter's name and adds its LoRA to every prompt (`with_adapter`)."""
        if model_field in (None, self.base_name):
            return self
        if model_field not in self.adapters:
            raise KeyError(model_field)
        view = copy.copy(self)
        view.name, view.adapter = model_field, model_field
        view.format = self.format.named(model_field)
        return view

    def with_adapter(self, prompt: Prompt) -> Prompt:
        """`prompt` with this view's adapter among its task LoRAs."""
        if self.adapter is None:
            return prompt
        return dataclasses.replace(prompt, task_loras=tuple(prompt.task_loras) + (self.adapter,))

    # -- options -----------------------------------------------------------------------------
    def config(self, options: dict[str, Any], completion: bool = False) -> GenerationConfig:
        """The model's own defaults and stop tokens (its chat format) with `options` (GenerationConfig
        names) applied and checked; one beam unless asked (XComposer's default of 5 beams cannot share
        a batch); `ignore_eos` drops the stop tokens."""
        options = dict(options)
        options.setdefault("num_beams", 1)
        ignore_eos = options.pop("ignore_eos", False)
        cfg = self.format.generation_config(options, completion=completion)
        return cfg.replace(eos_token_id=None) if ignore_eos else cfg

    # -- prompts -----------------------------------------------------------------------------
    @property
    def tool_format(self) -> bool:
        """InternLM2/2.5 chat models are trained for tool calls (llm/chat.py's plugin format)."""
        return self.format.tool_calls

    def tool_prompt(self, messages: Sequence[Message], functions, reply_prefix: str = "") -> Prompt:
        return engine_prompt(self.format.tool_prompt(messages, functions, reply_prefix))

    def chat_prompt(self, messages: Sequence[Message], cfg: GenerationConfig, *, hd_num: int | None = None,
                    infer_mode: str | None = None, budget: int | None = None) -> Prompt:
        """The engine's prompt for `messages`; `hd_num` / `infer_mode`: XComposer2.5's request fields.
        `budget`: the tokens a sequence holds (the engine's session_len): the oldest exchanges that do
        not fit are left out (`dropped_turns` says how many)."""
        return self.chat_prompt_dropped(messages, cfg, hd_num=hd_num, infer_mode=infer_mode, budget=budget)[0]

    def chat_prompt_dropped(self, messages: Sequence[Message], cfg: GenerationConfig, *, hd_num: int | None = None,
                            infer_mode: str | None = None, budget: int | None = None) -> tuple[Prompt, int]:
        """`chat_prompt` and how many of the oldest exchanges it left out."""
        request = {"hd_num": hd_num, "infer_mode": infer_mode}
        made = self.format.prompt(messages, cfg, budget=budget, **request)
        return engine_prompt(made), made.dropped

    def turn_prompt(self, query: str, refs: list[str], history: list, cfg: GenerationConfig,
                    budget: int | None = None, keep_first: bool = False):
        """One chat turn from the model's own history format (what `chat()` takes and returns), for a
        front door that keeps that history (the web demo): (the engine's Prompt, a function of the
        reply giving the history `chat()` would return, how many of the oldest exchanges were left out)."""
        made = self.format.turn(query, refs, history, cfg, budget=budget, keep_first=keep_first)
        return engine_prompt(made), made.history, made.dropped

    def completion_prompt(self, text: str, cfg: GenerationConfig) -> Prompt:
        return engine_prompt(self.format.completion_prompt(text, cfg))


def layout_text(parts: Sequence[tuple[str, str]]) -> tuple[str, str | None]:
    """(plain text, text with an image placeholder at each image part) of ("text"|"image", str) parts."""
    plain = "".join(v for kind, v in parts if kind == "text")
    if not any(kind == "image" for kind, _ in parts):
        return plain, None
    return plain, "".join(v if kind == "text" else IMAGE_PLACEHOLDER for kind, v in parts)


__all__ = ["ServedModel", "Message", "PromptError", "layout_text", "engine_prompt"]

"""From chat messages and completion prompts to what the engine feeds the decoder, per model.

Every prompt is built by the model's own Python API, so the server sends the decoder exactly the
ids (or embeddings) that `chat()` would, and template fixes in the models reach the server:

* InternLM (`llm/internlm.py`): `_chat_config` (its defaults and stop tokens) and `_chat_prompt`
  (`llm/chat.py`'s template, dropping the oldest turns that do not fit);
* XComposer (`models/xcomposer.py`): `_gen_config`, `_prepare` (turns and image references) and
  `build_prompt` (`models/vl_prompt.py`'s layout, images encoded once), the last one run in the
  engine's thread when the request is admitted.

Messages reach here already checked by the HTTP layer: (role, text, image references) with roles
user/assistant alternating and ending with a user turn.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from ..llm.generation import GenerationConfig
from ..llm.internlm import InternLM
from ..models.vl_prompt import IMAGE_PLACEHOLDER, bot_turn
from ..models.xcomposer import XComposer
from ..models.xcomposer2 import XComposer2
from ..models.vl_prompt import multi_image_label, place_images
from ..models.xcomposer2d5 import INFER_MODES, XComposer2d5, check_hd_num, is_video_ref
from .engine import Prompt


class PromptError(ValueError):
    """A request that this model's template cannot express; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    text: str
    images: list[str] = field(default_factory=list)  # references load_image takes: data URIs, absolute paths
    # where each image sat among the text parts: the text with IMAGE_PLACEHOLDER at those places
    layout: str | None = None
    tool_calls: list[tuple[str, dict]] | None = None  # an assistant turn's calls: (name, parameters)


class ServedModel:
    """One loaded model behind the API: its prompts, options and stop tokens."""

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
        self.vision = isinstance(model, XComposer)
        self.xcomposer2 = isinstance(model, XComposer2)  # chatml with a system turn, images with a LoRA mask
        self.xcomposer2d5 = isinstance(model, XComposer2d5)  # high-resolution tiling, video, task LoRAs
        # a system message becomes the template's system turn (meta_instruction) where there is one:
        # internlm-chat-7b's 2023-12 template and InternLM2's chatml; not the July 2023 one, nor XComposer's
        self.has_system_turn = self.xcomposer2 or (
            not self.vision and getattr(model, "chat_template", None) in ("2023-12", "chatml"))

    def for_adapter(self, model_field: str | None) -> "ServedModel":
        """The served model a request's `model` field names: this one (None, or the base's name), or a
        view that answers under an adapter's name and adds its LoRA to every prompt (`with_adapter`)."""
        if model_field in (None, self.base_name):
            return self
        if model_field not in self.adapters:
            raise KeyError(model_field)
        import copy
        view = copy.copy(self)
        view.name, view.adapter = model_field, model_field
        return view

    def with_adapter(self, prompt: Prompt) -> Prompt:
        """`prompt` with this view's adapter among its task LoRAs."""
        if self.adapter is None:
            return prompt
        import dataclasses
        return dataclasses.replace(prompt, task_loras=tuple(prompt.task_loras) + (self.adapter,))

    # -- options -----------------------------------------------------------------------------
    def config(self, options: dict[str, Any], completion: bool = False) -> GenerationConfig:
        """The model's own defaults with `options` (GenerationConfig names) applied and checked."""
        options = dict(options)
        options.setdefault("num_beams", 1)  # XComposer's default of 5 beams cannot share a batch
        ignore_eos = options.pop("ignore_eos", False)
        if self.xcomposer2:  # XComposer2.chat()'s defaults and stops (eos, [UNUSED_TOKEN_145])
            cfg = self.model.gen_config(options)
            return cfg.replace(eos_token_id=None) if ignore_eos else cfg
        if self.vision:  # completions stop on <eoh> too, as XComposer.complete() does
            cfg = self.model._completion_config(options) if completion else self.model._gen_config(options)
        else:
            cfg = self.model._chat_config(self.tokenizer, options)
        tok = self.tokenizer
        if self.vision and not ignore_eos:
            # XComposer's answers end at <eoh> too (its `_answer` cuts there): stop generating there
            cfg = cfg.replace(eos_token_id=list(dict.fromkeys(cfg.stop_ids + [tok.eoh_token_id])))
        if ignore_eos:
            cfg = cfg.replace(eos_token_id=None)
        return cfg

    # -- prompts -----------------------------------------------------------------------------
    @property
    def tool_format(self) -> bool:
        """InternLM2/2.5 chat models are trained for tool calls (llm/chat.py's plugin format)."""
        return not self.vision and getattr(self.model, "chat_template", None) == "chatml"

    def tool_prompt(self, messages: Sequence[Message], functions, reply_prefix: str = "") -> Prompt:
        """An InternLM2 prompt with tools: the function list in a <|plugin|> system turn, assistant
        turns with their calls, tool results as the environment turn (llm/chat.py)."""
        if not self.tool_format:
            raise PromptError(f"model {self.name!r} has no tool-call format (its chat template is "
                              f"{getattr(self.model, 'chat_template', 'XComposer')!r}): tools work with InternLM2 / "
                              f"InternLM2.5 chat models", "tools")
        from ..llm.chat import INTERNLM2_META_INSTRUCTION, format_chatml_tool_prompt
        meta = INTERNLM2_META_INSTRUCTION
        if messages and messages[0].role == "system":
            meta, messages = messages[0].text, messages[1:]
        for i, m in enumerate(messages):
            if m.role == "system":
                raise PromptError("only the first message may be a system message", f"messages[{i}].role")
            if m.images:
                raise PromptError(f"model {self.name!r} is a text model and takes no images", f"messages[{i}].content")
        tok = self.tokenizer
        for name in ("<|action_start|>", "<|action_end|>", "<|plugin|>", "<|im_start|>", "<|im_end|>"):
            tok.chat_token_id(name)
        text = format_chatml_tool_prompt([(m.role, m.text, m.tool_calls) for m in messages], meta, functions,
                                         reply_prefix)
        return Prompt(ids=tok.encode(text, add_bos=True))

    def chat_prompt(self, messages: Sequence[Message], cfg: GenerationConfig, *, hd_num: int | None = None,
                    infer_mode: str | None = None, budget: int | None = None) -> Prompt:
        """`hd_num` / `infer_mode`: XComposer2.5's chat() options (request fields of those names).
        `budget`: the tokens a sequence holds (the engine's session_len): a text model's oldest turns
        that do not fit it are left out (as `chat()` leaves out those that do not fit the context
        window); an XComposer2.5 prompt whose images make it longer is refused here, with each image's
        share, before anything is encoded."""
        if not self.xcomposer2d5:
            for name, value in (("hd_num", hd_num), ("infer_mode", infer_mode)):
                if value is not None:
                    raise PromptError(f"{name} applies to InternLM-XComposer2.5 checkpoints; model {self.name!r} is "
                                      f"not one: leave {name} out", name)
            for i, m in enumerate(messages):
                if any(is_video_ref(r) for r in m.images):
                    raise PromptError(f"model {self.name!r} takes no video: video_url parts need an "
                                      f"InternLM-XComposer2.5 checkpoint", f"messages[{i}].content")
        if any(m.role == "tool" or m.tool_calls for m in messages):  # a tool conversation without tools now
            return self.tool_prompt(messages, None)
        system = None
        for i, m in enumerate(messages):
            if m.role != "system":
                continue
            if i != 0:
                raise PromptError("only the first message may be a system message", f"messages[{i}].role")
            if m.images:
                raise PromptError("a system message takes text only", f"messages[{i}].content")
            system = m.text
        if system is not None:
            messages = messages[1:]
            if not self.has_system_turn:
                # the template has no system turn (internlm-chat-7b's July 2023 one, XComposer 1.0): the
                # instruction opens the first user message, as a client sending a system prompt expects
                first = messages[0]
                joined = lambda t: f"{system}\n{t}" if system else t  # noqa: E731
                messages = [Message(first.role, joined(first.text), first.images,
                                    None if first.layout is None else joined(first.layout))] + list(messages[1:])
                system = None
        if self.xcomposer2d5:
            return self._xcomposer2d5_prompt(messages, system, hd_num, infer_mode or "base", budget)
        if self.xcomposer2:
            return self._xcomposer2_prompt(messages, cfg, system)
        if not self.vision:
            for i, m in enumerate(messages):
                if m.images:
                    raise PromptError(f"model {self.name!r} is a text model and takes no images: send text parts "
                                      f"only, or serve an XComposer checkpoint", f"messages[{i}].content")
            history = [(messages[k].text, messages[k + 1].text) for k in range(0, len(messages) - 1, 2)]
            query = messages[-1].text
            if not query.strip():
                raise PromptError("the last user message is empty: send a question", f"messages[{len(messages) - 1}]"
                                                                                   ".content")
            # no system message: the model's default system text, as its chat() uses; the oldest turns
            # that do not fit the engine's session (budget) are left out, as chat() leaves out those
            # that do not fit the context window
            return Prompt(ids=self.model._chat_prompt(self.tokenizer, query, history, cfg, system, window=budget))
        history: list[dict[str, Any]] = []
        for k in range(0, len(messages) - 1, 2):
            user, bot = messages[k], messages[k + 1]
            history += [{"role": "user", "text": user.layout or user.text, "images": list(user.images)},
                        bot_turn(bot.text)]
        last = messages[-1]
        text = last.layout if last.layout is not None else last.text
        try:
            turns, fresh, _ = self.model._prepare(text, last.images or None, history, {})
        except ValueError as e:
            raise PromptError(str(e), "messages") from e
        model = self.model
        return Prompt(build=lambda: model.build_prompt(turns, cfg, fresh)[0])

    def _xcomposer2_prompt(self, messages: Sequence[Message], cfg: GenerationConfig, system: str | None) -> Prompt:
        """Upstream's (query, response) history with the placeholders where each image sat, and the
        images of every user message in order (upstream passes earlier turns' images again)."""
        def text_of(m: Message) -> str:
            return m.layout if m.layout is not None else m.text

        history = [(text_of(messages[k]), messages[k + 1].text) for k in range(0, len(messages) - 1, 2)]
        images = [ref for m in messages if m.role == "user" for ref in m.images]
        query = text_of(messages[-1])
        if not query.strip() and not images:
            raise PromptError("the last user message is empty: send a question", f"messages[{len(messages) - 1}]"
                                                                               ".content")
        model = self.model
        placeholders = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in history) + query.count(IMAGE_PLACEHOLDER)
        if placeholders not in (0, len(images)):
            raise PromptError(f"the messages hold {len(images)} image(s) but {placeholders} {IMAGE_PLACEHOLDER} "
                              f"place(s): send each image as an image part of a user message", "messages")
        return Prompt(build=lambda: model.build_inputs(query, images or None, history, system))

    def _xcomposer2d5_prompt(self, messages: Sequence[Message], system: str | None, hd_num: int | None,
                             infer_mode: str, budget: int | None = None) -> Prompt:
        """XComposer2.5.chat()'s prompt: each user message's text as written (an image part's place
        among the text parts is not used: upstream's rules put a lone image before the prompt and
        label several `Image1 <ImageHere>; ...`; `<ImageHere>` written in the text places them), its
        images kept with its turn; a system message becomes the system turn (use_meta)."""
        past = []
        for k in range(0, len(messages) - 1, 2):
            user, bot = messages[k], messages[k + 1]
            past.append((user.text, bot.text, list(user.images)) if user.images else (user.text, bot.text))
        last = messages[-1]
        if not last.text.strip() and not last.images:
            raise PromptError("the last user message is empty: send a question", f"messages[{len(messages) - 1}]"
                                                                               ".content")
        model = self.model
        try:  # the cheap checks now (placeholders, hd_num), with a 400; images are encoded when admitted
            model._check_loras(INFER_MODES[infer_mode])
            if hd_num is not None:
                check_hd_num(hd_num)
            place_images(past, last.text, list(last.images), label=multi_image_label)
        except ValueError as e:
            raise PromptError(str(e), "infer_mode" if "infer_mode" in str(e) else "messages") from e
        meta = {"use_meta": True, "meta_instruction": system} if system is not None else {}
        counted = model.prompt_length(last.text, list(last.images) or None, past, hd_num=hd_num, **meta)
        if counted is not None and budget is not None and counted[0] >= budget:
            total, per_image = counted
            shares = ", ".join(f"{n:,}" for n in per_image) or "none"
            raise PromptError(f"the prompt is {total:,} tokens (images: {shares}) but a sequence holds {budget:,} "
                              f"(prompt plus reply; --session-len): lower hd_num (each 560-px crop is 400 tokens), "
                              f"send fewer or smaller images, or shorten the conversation", "messages")
        return Prompt(build=lambda: model.prepare_chat(last.text, list(last.images) or None, past, hd_num=hd_num,
                                                       **meta)[0],
                      length=0 if counted is None else counted[0], task_loras=INFER_MODES[infer_mode])

    def turn_prompt(self, query: str, refs: list[str], history: list, cfg: GenerationConfig,
                    budget: int | None = None):
        """One chat turn from the model's own history format (what `chat()` takes and returns: pairs
        or triples for InternLM and XComposer2 / 2.5, turn dicts for XComposer 1.0), for a front door
        that keeps that history (the web demo): (the engine's Prompt, a function of the reply giving
        the history `chat()` would return). The same model calls as `chat_prompt` makes."""
        model = self.model
        if self.xcomposer2:
            pairs = [tuple(t) for t in history]
            turn: dict[str, Any] = {}

            def build():
                inputs, turn["finish"] = model.prepare_chat(query, refs or None, pairs)
                return inputs
            prompt = Prompt(build=build)
            # a 2.5 turn in the base mode; the history keeps each turn's images
            return prompt, lambda reply: [list(t) for t in turn["finish"](reply)]
        if self.vision:
            turns, fresh, _ = model._prepare(query, refs or None, history, {})
            return (Prompt(build=lambda: model.build_prompt(turns, cfg, fresh)[0]),
                    lambda reply: turns + [bot_turn(reply)])
        pairs = [tuple(t) for t in history]
        return (Prompt(ids=model._chat_prompt(self.tokenizer, query, pairs, cfg, window=budget)),
                lambda reply: [list(t) for t in pairs] + [[query, reply]])

    def completion_prompt(self, text: str, cfg: GenerationConfig) -> Prompt:
        if self.xcomposer2:  # a complete prompt string: text only, its ids as the tokenizer gives them
            if IMAGE_PLACEHOLDER in text:
                raise PromptError(f"/v1/completions takes text only; send images through /v1/chat/completions "
                                  f"(the prompt contains {IMAGE_PLACEHOLDER})", "prompt")
            return Prompt(ids=self.tokenizer.encode(text, add_bos=True))
        if self.vision:
            if IMAGE_PLACEHOLDER in text:
                raise PromptError(f"/v1/completions takes text only; send images through /v1/chat/completions "
                                  f"(the prompt contains {IMAGE_PLACEHOLDER})", "prompt")
            model = self.model
            return Prompt(build=lambda: model.raw_prompt(text, None, 0))
        return Prompt(ids=self.tokenizer.encode(text, add_bos=True))


def layout_text(parts: Sequence[tuple[str, str]]) -> tuple[str, str | None]:
    """(plain text, text with an image placeholder at each image part) of ("text"|"image", str) parts."""
    plain = "".join(v for kind, v in parts if kind == "text")
    if not any(kind == "image" for kind, _ in parts):
        return plain, None
    return plain, "".join(v if kind == "text" else IMAGE_PLACEHOLDER for kind, v in parts)


__all__ = ["ServedModel", "Message", "PromptError", "layout_text"]

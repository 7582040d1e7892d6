"""Offline batches through the batching engine, in the style of LMDeploy's `pipeline`:

    from xcomposer import pipeline
    pipe = pipeline("internlm/internlm-chat-7b")            # or a local folder, or an XComposer
    responses = pipe(["Hi, pls intro yourself", "Shanghai is"])
    print(responses[0].text)
    pipe([("Describe the picture", "cat.jpg")])             # XComposer: (prompt, image(s))

Each prompt is one chat turn with the model's own template and defaults (`chat()`'s), or a whole
conversation as OpenAI-style messages; all prompts run together in the engine's batch, and the
answers come back in the prompts' order. LMDeploy's words work too (InternLM's README runs its
models with them):

    from xcomposer import pipeline, TurbomindEngineConfig, GenerationConfig
    pipe = pipeline("internlm/internlm2_5-7b-chat-1m",
                    backend_config=TurbomindEngineConfig(rope_scaling_factor=2.5, session_len=1048576))
    pipe(prompt, gen_config=GenerationConfig(max_new_tokens=1024))
    for r in pipe.stream_infer(["Hi", "Shanghai is"]): print(r.index, r.text, end="")
"""
from __future__ import annotations

import os
import queue
from dataclasses import dataclass, field
from typing import Any, Sequence

from vision.image import load_image, to_data_uri

from ..engine.engine import check_serving_quant_policy
from .engine import Engine, EngineError
from .prompts import Message, ServedModel, layout_text


@dataclass
class Response:
    """LMDeploy's field names: the text, token counts, and why it ended ("stop" or "length");
    `index` is the prompt's place in the batch (stream_infer's pieces say which prompt they are of)."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None
    token_ids: list[int]
    index: int = 0
    # ours, beyond LMDeploy's fields: the oldest exchanges of a conversation the prompt left out to fit
    # the session length (the chat format's budget)
    dropped_turns: int = 0


@dataclass
class EngineConfig:
    """The engine settings of LMDeploy's `TurbomindEngineConfig` / `PytorchEngineConfig`, under their
    names and meanings (both names are this class here). `tp` > 1 needs a server (`serve --tp N`);
    `quant_policy` 8 stores the KV cache as int8 (LMDeploy's value; 4, int4, is refused: docs/serving.md,
    "KV cache quantization")."""

    session_len: int | None = None
    max_batch_size: int = 8
    cache_max_entry_count: float = 0.8
    rope_scaling_factor: float | None = None
    tp: int = 1
    cache_block_seq_len: int = 64
    max_prefill_token_num: int | None = None
    enable_prefix_caching: bool = True
    quant_policy: int = 0
    # LMDeploy's "hf" | "awq" | "gptq": a GPTQ / AWQ folder is recognised from its own config, so
    # this only checks that the folder is what the caller says (None: any)
    model_format: str | None = None

    def check_model_format(self, model) -> None:
        if self.model_format in (None, "hf"):
            packed = getattr(model, "quantization", None)
            if self.model_format == "hf" and getattr(packed, "method", None) in ("gptq", "awq"):
                raise ValueError(f"model_format='hf' but the checkpoint is {packed.describe()}: pass "
                                 f"model_format='{packed.method}' or leave it unset")
            return
        if self.model_format not in ("awq", "gptq"):
            raise ValueError(f"model_format={self.model_format!r}: use 'hf', 'awq' or 'gptq' (LMDeploy's words) or "
                             f"leave it unset")
        method = getattr(getattr(model, "quantization", None), "method", None)
        if method != self.model_format:
            raise ValueError(f"model_format={self.model_format!r} but the checkpoint is "
                             f"{'not quantized' if method is None else method.upper()}: its config.json says "
                             f"what it is; pass the matching model_format or leave it unset")

    def engine_kwargs(self) -> dict[str, Any]:
        if self.tp != 1:
            raise ValueError(f"tp={self.tp}: pipeline() runs in one process; for tensor parallelism run "
                             f"`python -m xcomposer serve PATH --tp {self.tp}` and send it requests")
        return dict(max_batch_size=self.max_batch_size, session_len=self.session_len,
                    cache_max_entry_count=self.cache_max_entry_count, block_size=self.cache_block_seq_len,
                    max_prefill_tokens=self.max_prefill_token_num, prefix_caching=self.enable_prefix_caching,
                    quant_policy=check_serving_quant_policy(self.quant_policy))


TurbomindEngineConfig = PytorchEngineConfig = EngineConfig

# LMDeploy's GenerationConfig names -> ours (transformers'); the rest are the same words
_LMDEPLOY_GEN = {"random_seed": "seed", "stop_words": None, "skip_special_tokens": None, "n": None,
                 "stop_token_ids": None, "bad_words": None, "bad_token_ids": None, "min_p": None,
                 "logprobs": None, "response_format": None, "logits_processors": None, "output_logits": None,
                 "output_last_hidden_state": None, "include_stop_str_in_output": None, "spaces_between_special_tokens":
                 None, "migration_request": None, "with_cache": None, "preserve_cache": None}


def _gen_options(gen_config) -> tuple[dict[str, Any], list[str]]:
    """Options and stop strings from a generation config: ours, LMDeploy's (any object with its field
    names), or a dict of either's names."""
    if gen_config is None:
        return {}, []
    if isinstance(gen_config, dict):
        fields = dict(gen_config)
    elif hasattr(gen_config, "__dataclass_fields__"):
        fields = {k: getattr(gen_config, k) for k in gen_config.__dataclass_fields__}
    else:
        fields = dict(vars(gen_config))
    stop = list(fields.pop("stop_words", None) or [])
    from ..llm.generation import GenerationConfig as Ours
    known = set(Ours.__dataclass_fields__) | {"ignore_eos"}
    options = {}
    for k, v in fields.items():
        k = _LMDEPLOY_GEN.get(k, k) if k in _LMDEPLOY_GEN else k
        if k is None or v is None or k in ("eos_token_id", "pad_token_id"):
            continue
        if k not in known:
            raise ValueError(f"unknown generation option {k!r}; known: {sorted(known)}")
        options[k] = v
    return options, stop


@dataclass
class Session:
    """One `Pipeline.chat` conversation: (prompt, reply) pairs in `history`, the last `response`."""

    history: list = field(default_factory=list)
    response: "Response | None" = None
    prompt: Any = None


def _user_message(prompt) -> dict:
    """A chat prompt (a string, or XComposer's (text, image or images) pair) as an OpenAI message."""
    if isinstance(prompt, str):
        return {"role": "user", "content": prompt}
    if isinstance(prompt, tuple) and len(prompt) == 2:
        text, images = prompt
        images = [images] if not isinstance(images, (list, tuple)) else list(images)
        return {"role": "user", "content": [{"type": "image_url", "image_url": i} for i in images]
                + [{"type": "text", "text": text}]}
    raise TypeError(f"a chat prompt is a string or a (text, image) pair, got {type(prompt).__name__}")


def _image_ref(item) -> str:
    """An image of a prompt as a reference the models keep: a path or data URI as given, a picture
    (PIL as LMDeploy's `load_image` returns it, bytes, an array) as a PNG data URI."""
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else to_data_uri(load_image(item))


def _is_conversation(item) -> bool:
    return isinstance(item, list) and bool(item) and all(isinstance(m, dict) for m in item)


class Pipeline:
    def __init__(self, model, *, max_batch_size: int = 8, session_len: int | None = None, name: str = "model",
                 backend_config: EngineConfig | None = None):
        if backend_config is not None:
            backend_config.check_model_format(model)
        self.served = ServedModel(model, name)
        kw = backend_config.engine_kwargs() if backend_config is not None else dict(
            max_batch_size=max_batch_size, session_len=session_len)
        self.engine = Engine(model, max_queue=1 << 20, **kw)

    def _messages(self, item) -> list[Message]:
        if _is_conversation(item):  # OpenAI-style messages: text content (and image_url parts for XComposer)
            out = []
            for m in item:
                content = m.get("content")
                if isinstance(content, str):
                    out.append(Message(m["role"], content))
                    continue
                parts = [("text", p["text"]) if p.get("type") == "text" else
                         ("image", p["image_url"]["url"] if isinstance(p["image_url"], dict) else p["image_url"])
                         for p in content]
                parts = [(k, _image_ref(v) if k == "image" else v) for k, v in parts]
                plain, layout = layout_text(parts)
                out.append(Message(m["role"], plain, [v for k, v in parts if k == "image"], layout))
            return out
        text, images = (item if isinstance(item, tuple) else (item, []))
        # one image or a list: paths, data URIs, or pictures (PIL, as LMDeploy's `load_image` returns,
        # bytes, arrays), the latter kept as PNG data URIs
        images = list(images) if isinstance(images, (list, tuple)) else [] if images is None else [images]
        images = [_image_ref(i) for i in images]
        parts = [("image", i) for i in images] + [("text", text)]
        plain, layout = layout_text(parts)
        return [Message("user", plain, images, layout)]

    def _submit(self, prompts, gen_config, stop, options):
        single = isinstance(prompts, (str, tuple)) or _is_conversation(prompts)
        items = [prompts] if single else list(prompts)
        gen_options, gen_stop = _gen_options(gen_config)
        cfg = self.served.config({**gen_options, **options})
        queues, dropped = [], []
        for item in items:
            prompt, n = self.served.chat_prompt_dropped(self._messages(item), cfg, budget=self.engine.session_len)
            q: "queue.Queue" = queue.Queue()
            self.engine.submit(prompt, cfg, q.put, list(stop) + gen_stop)
            queues.append(q)
            dropped.append(n)
        return single, queues, dropped

    def __call__(self, prompts, gen_config=None, *, stop: Sequence[str] = (), **options: Any) -> list[Response] | Response:
        """Answer one prompt or a list; `gen_config` (ours or LMDeploy's `GenerationConfig`, or a dict)
        and `options` (transformers' names, `ignore_eos` too) apply to every prompt. A prompt is a
        string, a list of OpenAI-style messages (one conversation), or for XComposer a (text, image
        or list of images) pair."""
        single, queues, dropped = self._submit(prompts, gen_config, stop, options)
        out = []
        for i, q in enumerate(queues):
            text = []
            while True:
                ev = q.get()
                if ev.kind == "text":
                    text.append(ev.text)
                elif ev.kind == "error":
                    raise EngineError(ev.text)
                else:
                    out.append(Response("".join(text), ev.completion_tokens, ev.prompt_tokens, ev.finish_reason,
                                        ev.tokens, i, dropped[i]))
                    break
        return out[0] if single else out

    def stream_infer(self, prompts, gen_config=None, *, stop: Sequence[str] = (), **options: Any):
        """LMDeploy's `stream_infer`: Responses as text arrives, each naming its prompt (`index`), all
        prompts decoding together; the last one of each prompt carries its finish reason and counts."""
        _, queues, dropped = self._submit(prompts, gen_config, stop, options)
        merged: "queue.Queue" = queue.Queue()
        import threading

        def pump(i, q):
            while True:
                ev = q.get()
                merged.put((i, ev))
                if ev.kind != "text":
                    return
        for i, q in enumerate(queues):
            threading.Thread(target=pump, args=(i, q), daemon=True).start()
        left = len(queues)
        while left:
            i, ev = merged.get()
            if ev.kind == "text":
                yield Response(ev.text, 0, 0, None, [], i)
            elif ev.kind == "error":
                raise EngineError(ev.text)
            else:
                left -= 1
                yield Response("", ev.completion_tokens, ev.prompt_tokens, ev.finish_reason, ev.tokens, i, dropped[i])

    # LMDeploy's other pipeline words
    def infer(self, prompts, gen_config=None, **options: Any):
        """LMDeploy's `Pipeline.infer`: the same as calling the pipeline."""
        return self(prompts, gen_config, **options)

    batch_infer = infer  # LMDeploy's older name

    def session(self) -> "Session":
        """A new conversation for `chat` (LMDeploy's `pipe.session()`)."""
        return Session()

    def chat(self, prompt, session: "Session | None" = None, gen_config=None, stream_response: bool = False,
             **options: Any):
        """LMDeploy's `Pipeline.chat`: one turn of a multi-turn conversation. `prompt` is a string or,
        for XComposer, a (text, image or images) pair; `session` (from `session()` or an earlier call)
        carries the history as (prompt, reply) pairs. Returns the session with `.response` set and the
        turn appended to `.history`; with `stream_response` an iterator of Responses, the session
        updated when it ends."""
        session = session if session is not None else Session()
        if not isinstance(session, Session):
            raise TypeError(f"session must be a Session from pipe.session() or an earlier chat(), got "
                            f"{type(session).__name__}")
        conversation = []
        for past, reply in session.history:
            conversation += [_user_message(past), {"role": "assistant", "content": reply}]
        conversation.append(_user_message(prompt))
        session.prompt, session.response = prompt, None

        def finish(response: Response) -> None:
            session.response = response
            session.history.append((prompt, response.text))

        if not stream_response:
            finish(self(conversation, gen_config, **options))
            return session

        def pieces():
            text, last = [], None
            for r in self.stream_infer(conversation, gen_config, **options):
                text.append(r.text)
                last = r
                yield r
            finish(Response("".join(text), last.generate_token_len, last.input_token_len, last.finish_reason,
                            last.token_ids, 0, last.dropped_turns))
        return pieces()

    def get_ppl(self, input_ids) -> list[float]:
        """LMDeploy's `get_ppl`: for each token-id sequence (a list of ids, or a list of such lists),
        the mean cross-entropy of tokens 2..n given those before them, without the exponential (as
        LMDeploy returns it). The model's own log-softmax, through the engine's prompt logprobs."""
        if not isinstance(input_ids, (list, tuple)) or not input_ids:
            raise ValueError("get_ppl takes a list of token ids or a list of such lists")
        batch = [list(input_ids)] if all(isinstance(t, int) for t in input_ids) else [list(x) for x in input_ids]
        from ..engine.request import Prompt
        queues = []
        for ids in batch:
            if len(ids) < 2 or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("each sequence for get_ppl needs at least two integer token ids")
            q: "queue.Queue" = queue.Queue()
            cfg = self.served.config({"max_new_tokens": 1})
            self.engine.submit(Prompt(ids=ids), cfg, q.put, prompt_logprobs=0, prompt_only=True)
            queues.append(q)
        out = []
        for q in queues:
            while True:
                ev = q.get()
                if ev.kind == "error":
                    raise EngineError(ev.text)
                if ev.kind == "done":
                    scores = [lp for _, lp, _ in ev.prompt_logprobs]
                    out.append(-sum(scores) / len(scores))
                    break
        return out

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pipeline(model_or_path, backend_config: EngineConfig | None = None, *, device: str | None = None,
             dtype: str | None = None, max_batch_size: int = 8, session_len: int | None = None,
             **quantization) -> Pipeline:
    """A `Pipeline` over a loaded model, or over the checkpoint at a folder / hub id. `backend_config`
    (LMDeploy's `TurbomindEngineConfig` / `PytorchEngineConfig` names) sets the engine; its
    `rope_scaling_factor`, and a `session_len` past the checkpoint's window, apply when loading.
    `quantization`: `from_pretrained`'s 8/4-bit keywords (`load_in_4bit=True`, `quantization="nf4"`,
    ...); a GPTQ / AWQ checkpoint needs none."""
    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        from pathlib import Path

        from .api import load_model, loader_kwargs
        name = Path(str(model_or_path).rstrip("/")).name
        cfg = backend_config
        extra = loader_kwargs(str(model_or_path), cfg.session_len if cfg else session_len,
                              cfg.rope_scaling_factor if cfg else None)
        model_or_path = load_model(str(model_or_path), device, dtype, **extra, **quantization)
    else:
        name = "model"
        if quantization:
            raise ValueError(f"{', '.join(quantization)} apply when pipeline() loads the checkpoint: pass its path, "
                             f"or load the model with from_pretrained(..., load_in_4bit=True)")
        if backend_config is not None and backend_config.rope_scaling_factor is not None:
            raise ValueError("rope_scaling_factor applies when pipeline() loads the checkpoint: pass its path, or "
                             "load the model with InternLM.from_pretrained(..., rope_scaling_factor=...)")
    return Pipeline(model_or_path, max_batch_size=max_batch_size, session_len=session_len, name=name,
                    backend_config=backend_config)


__all__ = ["pipeline", "Pipeline", "Response", "Session", "EngineConfig", "TurbomindEngineConfig", "PytorchEngineConfig"]

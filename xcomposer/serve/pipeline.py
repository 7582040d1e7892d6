"""Offline batches through the batching engine, in the style of LMDeploy's `pipeline`:

    from xcomposer import pipeline
    pipe = pipeline("internlm/internlm-chat-7b")            # or a local folder, or an XComposer
    responses = pipe(["Hi, pls intro yourself", "Shanghai is"])
    print(responses[0].text)
    pipe([("Describe the picture", "cat.jpg")])             # XComposer: (prompt, image(s))

Each prompt is one chat turn with the model's own template and defaults (`chat()`'s), all
prompts run together in the engine's batch, and the answers come back in the prompts' order.
"""
from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any, Sequence

from .engine import Engine, EngineError
from .prompts import Message, ServedModel, layout_text


@dataclass
class Response:
    """LMDeploy's field names: the text, token counts, and why it ended ("stop" or "length")."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str
    token_ids: list[int]


class Pipeline:
    def __init__(self, model, *, max_batch_size: int = 8, session_len: int | None = None, name: str = "model"):
        self.served = ServedModel(model, name)
        self.engine = Engine(model, max_batch_size=max_batch_size, session_len=session_len,
                             max_queue=1 << 20)

    def __call__(self, prompts, *, stop: Sequence[str] = (), **options: Any) -> list[Response] | Response:
        """Answer one prompt or a list; `options` are generation options (transformers' names,
        `ignore_eos` too) applied to every prompt. A prompt is a string, or for XComposer a
        (text, image or list of images) pair."""
        single = isinstance(prompts, (str, tuple))
        items = [prompts] if single else list(prompts)
        cfg = self.served.config(options)
        queues = []
        for item in items:
            text, images = (item if isinstance(item, tuple) else (item, []))
            images = [images] if isinstance(images, str) else list(images or [])
            parts = [("image", i) for i in images] + [("text", text)]
            plain, layout = layout_text(parts)
            prompt = self.served.chat_prompt([Message("user", plain, images, layout)], cfg)
            q: "queue.Queue" = queue.Queue()
            self.engine.submit(prompt, cfg, q.put, stop)
            queues.append(q)
        out = []
        for q in queues:
            text = []
            while True:
                ev = q.get()
                if ev.kind == "text":
                    text.append(ev.text)
                elif ev.kind == "error":
                    raise EngineError(ev.text)
                else:
                    out.append(Response("".join(text), ev.completion_tokens, ev.prompt_tokens, ev.finish_reason,
                                        ev.tokens))
                    break
        return out[0] if single else out

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pipeline(model_or_path, *, device: str | None = None, dtype: str | None = None, max_batch_size: int = 8,
             session_len: int | None = None) -> Pipeline:
    """A `Pipeline` over a loaded model, or over the checkpoint at a folder / hub id."""
    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        from pathlib import Path

        from .api import load_model
        name = Path(str(model_or_path).rstrip("/")).name
        model_or_path = load_model(str(model_or_path), device, dtype)
    else:
        name = "model"
    return Pipeline(model_or_path, max_batch_size=max_batch_size, session_len=session_len, name=name)


__all__ = ["pipeline", "Pipeline", "Response"]

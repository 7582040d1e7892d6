"""InternLM-chat's conversation template and history handling (facts and sources: docs/chat-template.md).

    <s><|User|>:{query}<eoh>\\n<|Bot|>:{reply}<eoa>\\n<|User|>:{query}<eoh>\\n<|Bot|>:

The tokenizer adds `<s>` once at the start; `<eoh>`/`<eoa>` are resolved from the loaded
tokenizer by piece (XComposer's vocabulary names the same slots `<TOKENS_UNUSED_0/1>`).
Generation stops on `</s>` or `<eoa>`.
"""
from __future__ import annotations

from typing import Sequence

from .generation import PromptTooLongError

USER, BOT = "<|User|>", "<|Bot|>"

Turn = tuple[str, str]


def format_turn(tokenizer, query: str, reply: str | None) -> str:
    text = f"{USER}:{query}{tokenizer.eoh}\n{BOT}:"
    if reply is not None:
        text += f"{reply}{tokenizer.eoa}\n"
    return text


def format_prompt(tokenizer, query: str, history: Sequence[Turn] = ()) -> str:
    return "".join(format_turn(tokenizer, q, r) for q, r in history) + format_turn(tokenizer, query, None)


def check_query(query) -> str:
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty: type a question or instruction")
    return query


def check_history(history) -> list[Turn]:
    if history is None:
        return []
    turns = []
    for i, turn in enumerate(history):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(s, str) for s in turn)):
            raise ValueError(f"history[{i}] must be a (query, reply) pair of strings, got {turn!r}")
        turns.append((turn[0], turn[1]))
    return turns


def build_chat_ids(tokenizer, query: str, history: Sequence[Turn], window: int,
                   reply_room: int) -> tuple[list[int], int]:
    """Token ids of the prompt and how many of the oldest turns were left out.

    Oldest turns are dropped from the *prompt* until the prompt plus `reply_room` new tokens
    fit the context window (the caller's history list is never modified). If the question alone
    leaves no room for a reply it is an error: the question itself is never cut.
    """
    query = check_query(query)
    history = check_history(history)
    for dropped in range(len(history) + 1):
        ids = tokenizer.encode(format_prompt(tokenizer, query, history[dropped:]), add_bos=True)
        if len(ids) + reply_room <= window:
            return ids, dropped
    if len(ids) < window:
        return ids, len(history)  # generation shortens the reply to what fits
    raise PromptTooLongError(
        f"the question is {len(ids)} tokens with the chat template but the context window is {window}: "
        f"shorten the question"
    )


# -- InternLM2 / InternLM2.5: chatml (facts and sources: docs/chat-template.md) ---------------
#
#     <s><|im_start|>system\n{meta}<|im_end|>\n
#     <|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>\n   (each past turn)
#     <|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n
#
# The system block is left out when the meta instruction is empty (upstream's `build_inputs`).
# `<|im_start|>` / `<|im_end|>` are resolved from the tokenizer (tokenizer_config.json names
# them over `[UNUSED_TOKEN_146/145]`); generation stops on `</s>` or `<|im_end|>`.

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# upstream modeling_internlm2.py's default `meta_instruction` for chat()
INTERNLM2_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such "
    "as English and 中文."
)


def check_meta_instruction(meta_instruction) -> str:
    if meta_instruction is None:
        return ""
    if not isinstance(meta_instruction, str):
        raise TypeError(f"meta_instruction must be a string (or None for no system block), "
                        f"got {type(meta_instruction).__name__}")
    return meta_instruction


def format_chatml_prompt(query: str, history: Sequence[Turn] = (), meta_instruction: str = "") -> str:
    """The chatml text after `<s>` (the tokenizer adds `<s>`)."""
    text = f"{IM_START}system\n{meta_instruction}{IM_END}\n" if meta_instruction else ""
    for q, r in history:
        text += f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{r}{IM_END}\n"
    return text + f"{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"


def chatml_stop_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id, tokenizer.chat_token_id(IM_END)]


def build_chatml_ids(tokenizer, query: str, history: Sequence[Turn], window: int, reply_room: int,
                     meta_instruction: str | None = INTERNLM2_META_INSTRUCTION) -> tuple[list[int], int]:
    """Token ids of an InternLM2 chat prompt and how many of the oldest turns were left out; the
    same fitting rules as `build_chat_ids` (the system block is always kept)."""
    query = check_query(query)
    history = check_history(history)
    meta = check_meta_instruction(meta_instruction)
    for name in (IM_START, IM_END):
        tokenizer.chat_token_id(name)  # a tokenizer without them would spell the markers out
    for dropped in range(len(history) + 1):
        ids = tokenizer.encode(format_chatml_prompt(query, history[dropped:], meta), add_bos=True)
        if len(ids) + reply_room <= window:
            return ids, dropped
    if len(ids) < window:
        return ids, len(history)
    raise PromptTooLongError(
        f"the question is {len(ids)} tokens with the chat template (system block included) but the context "
        f"window is {window}: shorten the question or the meta instruction"
    )

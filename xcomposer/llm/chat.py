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

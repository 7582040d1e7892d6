"""InternLM-chat's conversation templates and history handling (facts and sources: docs/chat-template.md).

internlm-chat-7b changed its template with its December 2023 weight update; both revisions:

    2023-07:  <s><|User|>:{query}<eoh>\\n<|Bot|>:{reply}<eoa>\\n<|User|>:{query}<eoh>\\n<|Bot|>:
    2023-12:  <s><|System|>:{meta_instruction}\\n<|User|>:{query}\\n<|Bot|>:{reply}<eoa>\\n<|User|>:{query}\\n<|Bot|>:

`<s>` comes once, from the tokenizer; `<eoh>`/`<eoa>` are resolved from the loaded tokenizer by
piece (XComposer's vocabulary names the same slots `<TOKENS_UNUSED_0/1>`). The 2023-12 system
turn is left out when the meta instruction is empty. Generation stops on `</s>` or `<eoa>`.
Which revision a checkpoint folder holds is read from its `modeling_internlm.py`
(`chat_template_of`): only the 2023-12 code knows a meta instruction.
"""
from __future__ import annotations

import json

from pathlib import Path
from typing import Sequence

from .checkpoint import remote_code_defines
from .generation import PromptTooLongError
from .tokenizer import check_text

USER, BOT, SYSTEM = "<|User|>", "<|Bot|>", "<|System|>"

Turn = tuple[str, str]

JULY_2023, DECEMBER_2023 = "2023-07", "2023-12"
TEMPLATES = (JULY_2023, DECEMBER_2023)
# the 2023-12 remote code's default `meta_instruction` (InternLM's modeling_internlm.py, chat())
INTERNLM_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文.")
REMOTE_CODE_FILE = "modeling_internlm.py"


def check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}: use {JULY_2023!r} (internlm-chat-7b of July 2023, "
                         f"<eoh> after each question) or {DECEMBER_2023!r} (the December 2023 update, "
                         f"<|System|> turn, no <eoh>)")
    return template


def chat_template_of(folder: Path) -> tuple[str, str]:
    """(template, what decided it) for an internlm-chat checkpoint folder."""
    code = Path(folder) / REMOTE_CODE_FILE
    if code.is_file():
        if remote_code_defines(code, "meta_instruction"):
            return DECEMBER_2023, f"{REMOTE_CODE_FILE} defines meta_instruction (the 2023-12 revision)"
        return JULY_2023, f"{REMOTE_CODE_FILE} has no meta_instruction (the July 2023 revision)"
    return DECEMBER_2023, (f"no {REMOTE_CODE_FILE} in the folder; assuming the current hub revision (2023-12); "
                           f"pass template='2023-07' for weights of July 2023")


def format_turn(tokenizer, query: str, reply: str | None, template: str = DECEMBER_2023) -> str:
    eoh = tokenizer.eoh if check_template(template) == JULY_2023 else ""
    text = f"{USER}:{query}{eoh}\n{BOT}:"
    if reply is not None:
        text += f"{reply}{tokenizer.eoa}\n"
    return text


def format_prompt(tokenizer, query: str, history: Sequence[Turn] = (), template: str = DECEMBER_2023,
                  meta_instruction: str | None = None) -> str:
    """The prompt text (without `<s>`, which the tokenizer adds). `meta_instruction` None means the
    template's default (InternLM's for 2023-12; the July template has no system turn)."""
    system = ""
    if check_template(template) == DECEMBER_2023:
        meta = INTERNLM_META_INSTRUCTION if meta_instruction is None else check_text(meta_instruction,
                                                                                     "meta_instruction")
        system = f"{SYSTEM}:{meta}\n" if meta else ""
    elif meta_instruction:
        raise ValueError("the 2023-07 internlm-chat template has no system turn: leave meta_instruction unset, or "
                         "use template='2023-12'")
    turns = "".join(format_turn(tokenizer, q, r, template) for q, r in history)
    return system + turns + format_turn(tokenizer, query, None, template)


def check_query(query) -> str:
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    check_text(query, "the query")
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
        check_text(turn[0], f"history[{i}][0]")
        check_text(turn[1], f"history[{i}][1]")
        turns.append((turn[0], turn[1]))
    return turns


def kept_turns(turns: Sequence, dropped: int, keep_first: bool = False) -> list:
    """`turns` with `dropped` of the oldest left out; with `keep_first` the first turn stays (a
    document conversation's documents) and the ones after it go."""
    turns = list(turns)
    if keep_first and turns:
        return turns[:1] + turns[1 + dropped:]
    return turns[dropped:]


def fit_turns(turns: Sequence, measure, window: int, reply_room: int, too_long, keep_first: bool = False):
    """Leave out the oldest turns until the prompt plus `reply_room` new tokens fit `window`:
    `measure(kept)` gives (prompt length or None when it cannot be known before building, what was
    built). Returns (what was built, how many turns were left out, the length). With nothing left to
    leave out, a prompt shorter than the window is accepted (generation shortens the reply); one that
    is not raises PromptTooLongError(`too_long(length)`). The question itself is never cut."""
    most = max(len(turns) - 1, 0) if keep_first else len(turns)
    for dropped in range(most + 1):
        length, built = measure(kept_turns(turns, dropped, keep_first))
        if length is None or length + reply_room <= window:
            return built, dropped, length
    if length < window:
        return built, most, length
    raise PromptTooLongError(too_long(length))


def build_chat_ids(tokenizer, query: str, history: Sequence[Turn], window: int, reply_room: int,
                   template: str = DECEMBER_2023, meta_instruction: str | None = None,
                   keep_first: bool = False) -> tuple[list[int], int]:
    """Token ids of the prompt and how many of the oldest turns were left out.

    Oldest turns are dropped from the *prompt* until the prompt plus `reply_room` new tokens
    fit the context window (the caller's history list is never modified); the system turn stays
    (`fit_turns`; `keep_first` keeps the first turn too). If the question alone leaves no room for
    a reply it is an error: the question itself is never cut.
    """
    query = check_query(query)
    history = check_history(history)

    def measure(kept):
        ids = tokenizer.encode(format_prompt(tokenizer, query, kept, template, meta_instruction), add_bos=True)
        return len(ids), ids
    ids, dropped, _ = fit_turns(history, measure, window, reply_room, keep_first=keep_first, too_long=lambda n: (
        f"the question is {n} tokens with the chat template{' and the first turn' if keep_first else ''} but the "
        f"context window is {window}: shorten the question"))
    return ids, dropped


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
                     meta_instruction: str | None = INTERNLM2_META_INSTRUCTION,
                     keep_first: bool = False) -> tuple[list[int], int]:
    """Token ids of an InternLM2 chat prompt and how many of the oldest turns were left out; the
    same fitting rules as `build_chat_ids` (the system block is always kept)."""
    query = check_query(query)
    history = check_history(history)
    meta = check_meta_instruction(meta_instruction)
    for name in (IM_START, IM_END):
        tokenizer.chat_token_id(name)  # a tokenizer without them would spell the markers out

    def measure(kept):
        ids = tokenizer.encode(format_chatml_prompt(query, kept, meta), add_bos=True)
        return len(ids), ids
    ids, dropped, _ = fit_turns(history, measure, window, reply_room, keep_first=keep_first, too_long=lambda n: (
        f"the question is {n} tokens with the chat template (system block{' and first turn' if keep_first else ''} "
        f"included) but the context window is {window}: shorten the question or the meta instruction"))
    return ids, dropped


# -- InternLM2 tool calls (facts and sources: docs/chat-template.md, "Tool calls") ----------------
#
#     <s><|im_start|>system\n{meta}<|im_end|>\n
#     <|im_start|>system name=<|plugin|>\n{json list of the functions}<|im_end|>\n
#     <|im_start|>user\n{q}<|im_end|>\n
#     <|im_start|>assistant\n{text}<|action_start|><|plugin|>\n{"name": .., "parameters": {..}}<|action_end|><|im_end|>\n
#     <|im_start|>environment name=<|plugin|>\n{tool result}<|im_end|>\n
#     <|im_start|>assistant\n

ACTION_START, ACTION_END, PLUGIN = "<|action_start|>", "<|action_end|>", "<|plugin|>"


def tool_call_text(name: str, parameters) -> str:
    """One call as the model writes it (and as a history turn repeats it)."""
    return f"{ACTION_START}{PLUGIN}\n{json.dumps({'name': name, 'parameters': parameters}, ensure_ascii=False)}{ACTION_END}"


def format_chatml_tool_prompt(turns: Sequence[tuple], meta_instruction: str = "", functions=None,
                              reply_prefix: str = "") -> str:
    """The chatml text after `<s>` for a conversation with tools. `turns` are (role, text, calls)
    with role "user", "assistant" (calls: [(name, parameters)]) or "tool" (its result); `functions`
    the tool descriptions (OpenAI's `function` objects), written as one JSON list in a system turn
    named <|plugin|>; `reply_prefix` opens the reply (a forced call)."""
    text = f"{IM_START}system\n{meta_instruction}{IM_END}\n" if meta_instruction else ""
    if functions:
        text += f"{IM_START}system name={PLUGIN}\n{json.dumps(list(functions), ensure_ascii=False)}{IM_END}\n"
    for role, content, calls in turns:
        if role == "user":
            text += f"{IM_START}user\n{content}{IM_END}\n"
        elif role == "assistant":
            body = (content or "") + "".join(tool_call_text(n, p) for n, p in calls or ())
            text += f"{IM_START}assistant\n{body}{IM_END}\n"
        elif role == "tool":
            text += f"{IM_START}environment name={PLUGIN}\n{content}{IM_END}\n"
        else:
            raise ValueError(f"unknown role {role!r} in a tool conversation: use user, assistant or tool")
    return text + f"{IM_START}assistant\n" + reply_prefix


def parse_tool_calls(tokenizer, ids: Sequence[int], reply_prefix: str = "") -> tuple[str, list[tuple[str, dict]]]:
    """Split a reply into its text and the calls it makes: each `<|action_start|><|plugin|>` ...
    `<|action_end|>` holds {"name", "parameters"} (or "arguments") JSON. The special tokens are read
    as ids (the text a client sees never shows them). A call that is not such JSON stays in the
    text. `reply_prefix` is what the prompt forced the reply to start with."""
    start, plugin, end = (tokenizer.chat_token_id(t) for t in (ACTION_START, PLUGIN, ACTION_END))
    stops = set(chatml_stop_ids(tokenizer))
    ids = [i for i in ids if i not in stops]
    if reply_prefix:
        ids = tokenizer.encode(reply_prefix, add_bos=False) + ids
    text_parts, calls, i = [], [], 0
    while i < len(ids):
        try:
            a = ids.index(start, i)
        except ValueError:
            text_parts.append(tokenizer.decode(ids[i:]))
            break
        text_parts.append(tokenizer.decode(ids[i:a]))
        b = ids.index(end, a) if end in ids[a:] else len(ids)
        body = ids[a + 2:b] if a + 1 < len(ids) and ids[a + 1] == plugin else None
        call = None
        if body is not None:
            try:
                obj = json.loads(tokenizer.decode(body).strip())
                name = obj.get("name") if isinstance(obj, dict) else None
                params = obj.get("parameters", obj.get("arguments", {})) if isinstance(obj, dict) else None
                if isinstance(params, str):
                    params = json.loads(params)
                if isinstance(name, str) and isinstance(params, dict):
                    call = (name, params)
            except ValueError:
                call = None
        if call is None:
            text_parts.append(tokenizer.decode(ids[a:b + 1], skip_special_tokens=False))
        else:
            calls.append(call)
        i = b + 1
    return "".join(text_parts), calls

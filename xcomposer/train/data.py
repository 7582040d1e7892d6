"""Fine-tuning data: records in, (input ids, labels) out, with the chat format inference uses.

Two record shapes, one per line of a `.jsonl` file or as items of a `.json` list:

* OpenAI chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`;
* upstream XComposer's finetune data: `{"id": ..., "conversations": [{"from": "human"|"bot", "value": "..."}]}`
  (for text models; XComposer2.5 checkpoints read upstream's image records: train/vl_data.py).

A conversation is (system or None, [(user, assistant), ...]). Its ids are the prompt of each turn
exactly as `InternLM.chat` builds it (xcomposer.llm.chat: `format_chatml_prompt` for InternLM2,
`format_prompt` / `format_turn` for InternLM v1), each reply's tokens and the reply's end token
(`<|im_end|>` / `<eoa>`). Labels are -100 everywhere except on the reply tokens and their end token.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..llm.chat import (IM_END, INTERNLM2_META_INSTRUCTION, check_meta_instruction, format_chatml_prompt,
                        format_prompt, format_turn)

IGNORE = -100
Conversation = tuple[str | None, list[tuple[str, str]]]


class DataError(ValueError):
    """A data file that cannot be trained on; the message names the bad records."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str  # "train.jsonl line 3": for messages about it
    # XComposer2.5 records: (start position, image path) of each image; its tokens replace the ids there
    images: list = field(default_factory=list)
    # a packed row (trainer.pack_examples): the lengths of the records it holds, in order
    segments: list[int] | None = None


@dataclass
class DataReport:
    examples: list[Example] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "line 3: why"


def _text(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: text only
        parts = []
        for p in value:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise ValueError(f"{where}: content part of type {kind!r}: only text parts are trained on for now")
            parts.append(p["text"])
        return "".join(parts)
    raise ValueError(f"{where}: content must be a string, got {type(value).__name__}")


def tool_conversation(record) -> tuple[str | None, list, list[tuple[str, str, list]]] | None:
    """An OpenAI chat record with tools (`tools`, assistant `tool_calls`, `tool` results) -> (system,
    functions, [(role, text, calls)]) as `format_chatml_tool_prompt` takes them; None for a record
    without tools. ValueError with the reason for a bad one."""
    if not isinstance(record, dict) or "messages" not in record:
        return None
    msgs = record["messages"]
    tools = record.get("tools")
    uses = isinstance(msgs, list) and any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool")
                                          for m in msgs)
    if not tools and not uses:
        return None
    if uses and not tools:
        raise ValueError("has tool calls but no 'tools' list: give the functions the calls could choose from")
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and isinstance(t["function"].get("name"), str) for t in tools):
        raise ValueError("'tools' must be a list of {'type': 'function', 'function': {'name', ...}}")
    functions = [t["function"] for t in tools]
    system, turns = None, []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] needs a 'role'")
        role = m["role"]
        if role == "system" and i == 0:
            system = _text(m.get("content"), f"messages[{i}]")
            continue
        calls = []
        for j, c in enumerate(m.get("tool_calls") or []):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f"messages[{i}].tool_calls[{j}] needs function.name")
            args = fn.get("arguments", "{}")
            try:
                params = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError as e:
                raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON ({e.msg})") from None
            calls.append((fn["name"], params))
        if role not in ("user", "assistant", "tool") or (calls and role != "assistant"):
            raise ValueError(f"messages[{i}] has role {role!r}: a tool conversation takes user, assistant (with "
                             f"tool_calls) and tool messages after an optional first system message")
        content = m.get("content")
        text = "" if content is None else _text(content, f"messages[{i}]")
        turns.append((role, text, calls))
    if not turns or turns[-1][0] != "assistant":
        raise ValueError("a tool conversation must end with an assistant message")
    return system, functions, turns


def tool_segments(system: str | None, functions: list, turns: Sequence[tuple]) -> list[tuple[str, bool]]:
    """(text, is_reply) pieces of a tool conversation whose concatenation is what the server's tool
    prompt (`format_chatml_tool_prompt`) writes for it (checked): every assistant message (its text and
    its calls, as the model writes them) is a reply, the rest prompt."""
    from ..llm.chat import IM_START, format_chatml_tool_prompt, tool_call_text

    meta = INTERNLM2_META_INSTRUCTION if system is None else check_meta_instruction(system)
    head = format_chatml_tool_prompt([], meta, functions)[:-len(f"{IM_START}assistant\n")]
    pieces: list[tuple[str, bool]] = [(head, False)]
    for role, text, calls in turns:
        if role == "assistant":
            body = text + "".join(tool_call_text(n, p) for n, p in calls)
            pieces += [(f"{IM_START}assistant\n", False), (body + IM_END, True), ("\n", False)]
        else:
            one = format_chatml_tool_prompt([(role, text, [])])
            pieces.append((one[:-len(f"{IM_START}assistant\n")], False))
    whole = format_chatml_tool_prompt(turns[:-1], meta, functions) + pieces[-2][0] + "\n"
    if "".join(p for p, _ in pieces) != whole:
        raise AssertionError("training pieces differ from the server's tool prompt")
    return pieces[:-1]


def parse_record(record) -> Conversation:
    """One record -> (system, turns); ValueError with the reason for a bad one."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if "image" in record or "images" in record:
        raise ValueError("has an image: this is a text model; image records train XComposer2.5 checkpoints")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        system = None
        roles = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] needs 'role' and 'content'")
            if m.get("tool_calls") or m["role"] == "tool":
                raise ValueError(f"messages[{i}]: a tool call needs the record's 'tools' list")
            roles.append((m["role"], _text(m["content"], f"messages[{i}]")))
        if roles[0][0] == "system":
            system = roles.pop(0)[1]
        return system, _pairs(roles, "user", "assistant", "messages")
    if "conversations" in record:
        conv = record["conversations"]
        if not isinstance(conv, list) or not conv:
            raise ValueError("'conversations' must be a non-empty list")
        roles = []
        for i, m in enumerate(conv):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise ValueError(f"conversations[{i}] needs 'from' and 'value'")
            value = _text(m["value"], f"conversations[{i}]")
            if "<ImageHere>" in value:
                raise ValueError(f"conversations[{i}] holds <ImageHere>: this is a text model; image records train "
                                 f"XComposer2.5 checkpoints")
            roles.append((m["from"], value))
        return None, _pairs(roles, "human", "bot", "conversations")
    raise ValueError("has neither 'messages' (OpenAI chat) nor 'conversations' (XComposer) ")


def _pairs(roles: list[tuple[str, str]], user: str, bot: str, field_name: str) -> list[tuple[str, str]]:
    if len(roles) % 2:
        raise ValueError(f"{field_name} must alternate {user}/{bot} and end with {bot}; got {len(roles)} turns")
    turns = []
    for i in range(0, len(roles), 2):
        (r1, q), (r2, a) = roles[i], roles[i + 1]
        if r1 != user or r2 != bot:
            raise ValueError(f"{field_name}[{i}], [{i + 1}] have roles {r1!r}, {r2!r}: expected {user!r} then {bot!r}")
        turns.append((q, a))
    return turns


def chat_segments(tokenizer, family: str, template: str, system: str | None,
                  turns: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The conversation as (text, is_reply) pieces whose concatenation is what inference's format
    functions write for the whole conversation (checked): prompt pieces, then each reply with its
    end token. `system` None means inference's default system text."""
    pieces: list[tuple[str, bool]] = []
    if family == "internlm2":
        meta = INTERNLM2_META_INSTRUCTION if system is None else check_meta_instruction(system)
        for i, (q, a) in enumerate(turns):
            pieces.append((format_chatml_prompt(q, (), meta if i == 0 else ""), False))
            pieces += [(a + IM_END, True), ("\n", False)]
        whole = format_chatml_prompt(turns[-1][0], turns[:-1], meta) + turns[-1][1] + IM_END + "\n"
    else:
        eoa = tokenizer.eoa
        for i, (q, a) in enumerate(turns):
            prompt = format_prompt(tokenizer, q, (), template, system) if i == 0 else format_turn(tokenizer, q, None,
                                                                                                 template)
            pieces += [(prompt, False), (a + eoa, True), ("\n", False)]
        whole = format_prompt(tokenizer, turns[-1][0], turns[:-1], template, system) + turns[-1][1] + eoa + "\n"
    if "".join(p for p, _ in pieces) != whole:  # train and serve prompts must not drift
        raise AssertionError("training pieces differ from the inference chat format")
    return pieces[:-1]  # the last turn's trailing newline is never generated


def encode_conversation(tokenizer, family: str, template: str, system: str | None,
                        turns: Sequence[tuple[str, str]], pieces=None) -> tuple[list[int], list[int]]:
    """(input_ids, labels): each piece encoded on its own (a prompt exactly as inference encodes it,
    a reply as the tokens the model must generate after it), labels only on the reply pieces.
    `pieces` (a tool conversation's `tool_segments`) replace the chat pieces."""
    ids: list[int] = []
    labels: list[int] = []
    # a piece after the first continues the text: encoded after a special token (which ends the
    # tokenizer's start-of-text state, so no dummy-prefix space is added), that token dropped
    end = IM_END if family == "internlm2" else tokenizer.eoa
    if pieces is None:
        pieces = chat_segments(tokenizer, family, template, system, turns)
    for i, (text, reply) in enumerate(_merge_prompts(pieces)):
        piece = tokenizer.encode(text, add_bos=True) if i == 0 else tokenizer.encode(end + text, add_bos=False)[1:]
        ids += piece
        labels += piece if reply else [IGNORE] * len(piece)
    return ids, labels


def _merge_prompts(pieces):
    """The newline after a reply belongs to the next prompt's text (one encode call, as in history)."""
    out: list[tuple[str, bool]] = []
    for text, reply in pieces:
        if out and not reply and not out[-1][1]:
            out[-1] = (out[-1][0] + text, False)
        else:
            out.append((text, reply))
    return out


def read_records(path: str | Path) -> list[tuple[str, object]]:
    """(where, record or a JSON error) for each record of a .jsonl (by line) or .json list (by item)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name}: not valid JSON ({e}); give a JSON list of records or a .jsonl file")
        if not isinstance(items, list):
            items = [items]
        return [(f"{path.name} item {i}", r) for i, r in enumerate(items)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path.name} line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((f"{path.name} line {n}", ValueError(f"not valid JSON ({e.msg})")))
    return out


def load_examples(path: str | Path, tokenizer, family: str, template: str, max_length: int,
                  strict: bool = False, log=None, encode=None) -> DataReport:
    """Tokenized examples of a data file. Bad records (bad JSON, missing fields, wrong roles, images
    for a text model, missing image files, longer than `max_length` tokens) are reported by line and
    skipped, or refused with `strict`. `encode(record, data folder) -> Example` replaces the chat
    encoding (XComposer2.5's image records: train/vl_data.encode_vl_record)."""
    report = DataReport()
    log = log or sys.stderr
    for where, record in read_records(path):
        try:
            if isinstance(record, Exception):
                raise record
            if encode is not None:
                example = encode(record, Path(path).parent)
                example.where = where
            elif (tool := tool_conversation(record)) is not None:
                if family != "internlm2":
                    raise ValueError("has tool calls: only InternLM2 / 2.5 chat models have a tool-call format")
                example = Example(*encode_conversation(tokenizer, family, template, None, (),
                                                       pieces=tool_segments(*tool)), where)
            else:
                system, turns = parse_record(record)
                example = Example(*encode_conversation(tokenizer, family, template, system, turns), where)
            if len(example.input_ids) > max_length:
                raise ValueError(f"{len(example.input_ids)} tokens, over max_length {max_length} (not truncated: "
                                 f"shorten it or raise --max-length)")
        except (ValueError, OSError) as e:
            report.skipped.append(f"{where}: {e}")
            continue
        report.examples.append(example)
    if report.skipped:
        if strict:
            raise DataError(f"{len(report.skipped)} bad record(s) (--strict):\n  " + "\n  ".join(report.skipped))
        for s in report.skipped:
            print(f"data: skipped {s}", file=log)
    if not report.examples:
        raise DataError(f"{Path(path).name}: no usable records ({len(report.skipped)} skipped)")
    return report


__all__ = ["IGNORE", "DataError", "Example", "DataReport", "parse_record", "chat_segments", "encode_conversation",
           "tool_conversation", "tool_segments",
           "read_records", "load_examples"]

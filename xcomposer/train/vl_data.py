"""XComposer2.5 training records with images, encoded as upstream's finetune does.

Upstream (InternLM/InternLM-XComposer, `finetune/data_mix.py` and the 2.5 remote code's training
`interleav_wrap` / `mask_human_targets`), facts carried over:

* a record is `{"id", "conversations": [{"from": "human"|"user"|..., "value"}], "image": path or [paths]}`
  (no image: a text record); `conv2text`: each turn `[UNUSED_TOKEN_146]user\\n{value.strip()}[UNUSED_TOKEN_145]\\n`
  or `[UNUSED_TOKEN_146]assistant\\n{value.strip()}[UNUSED_TOKEN_145]\\n` ("human"/"user" are the user, any
  other `from` the assistant), no system turn, and `</s>` at the end;
* one image and no `<ImageHere>` in the text: the image goes first; the text is split at `<ImageHere>`,
  every **non-empty** part tokenized on its own, `<s>` on the first of them only (so an image at the
  very start comes before `<s>`), image k after part k; image positions carry no label;
* pictures: `R560_HD18_Identity_transform` (hd 18, scale `min(ceil(width * 1.5 / 560), ...)`, centred
  padding), which is the 2.5 composition demo's tiling (`models.xcomposer2d5.composition_tile`);
* labels (`mask_human_targets` over the whole sequence, images included): at each `[UNUSED_TOKEN_145]`
  ending a user turn (even count) positions `[last_eoa, i + 6)` get no label (the user turn and the
  next six positions: the assistant's header, as upstream counts it), at one ending an assistant turn
  `last_eoa = i + 1`; after the first `</s>` nothing is labelled (the `</s>` itself is); a sequence cut
  before its `</s>` ending on a user turn drops everything after `last_eoa`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from ..models.vl_prompt import IMAGE_PLACEHOLDER
from .data import IGNORE, Example

IM_START, IM_END = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
USER_FROMS = ("human", "user")


def conv2text(conversations: Sequence[dict]) -> str:
    """Upstream's conversation text (see the module docstring)."""
    text = ""
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversations[{i}] needs 'from' and 'value' strings")
        role = "user" if turn["from"].lower() in USER_FROMS else "assistant"
        text += f"{IM_START}{role}\n{turn['value'].strip()}{IM_END}\n"
    return text + "</s>"


def mask_human_targets(ids: Sequence[int], eoa: int, eos: int) -> list[int]:
    """Upstream's labels of one sequence (`IGNORE` where no loss); `ids` holds IGNORE at image positions."""
    targets = list(ids)
    end_count, last_eoa, temp = 0, 0, None
    for i, temp in enumerate(ids):
        if temp == eoa:
            if end_count % 2 == 0:
                targets[last_eoa:i + 6] = [IGNORE] * len(targets[last_eoa:i + 6])
            else:
                last_eoa = i + 1
            end_count += 1
        elif temp == eos:
            targets[i + 1:] = [IGNORE] * len(targets[i + 1:])
            break
    if temp != eos and end_count % 2 == 0:
        targets[last_eoa + 1:] = [IGNORE] * len(targets[last_eoa + 1:])
    return targets


def resolve_images(record: dict, base: Path) -> list[str]:
    """The record's image paths (absolute): as written if they exist, else next to the data file."""
    raw = record.get("image", record.get("images"))
    if raw is None:
        return []
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
        raise ValueError("'image' must be a path or a list of paths")
    out = []
    for p in items:
        path = Path(os.path.expanduser(p))
        if not path.is_absolute() and not path.is_file():
            path = base / path
        if not path.is_file():
            raise ValueError(f"image {p!r} not found (looked as given and next to the data file)")
        out.append(str(path.absolute()))
    return out


def encode_vl_record(tokenizer, record, base: Path, image_len: Callable[[str], int]) -> Example:
    """One record -> an `Example` whose `input_ids` hold the pad id at image positions and whose
    `images` list (start, path) where each image's tokens go; labels as upstream's."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError("needs 'conversations': a non-empty list of {'from', 'value'} (upstream XComposer's format)")
    images = resolve_images(record, base)
    text = conv2text(conv)
    if len(images) == 1 and IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER + text
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(images):
        raise ValueError(f"{len(parts) - 1} {IMAGE_PLACEHOLDER} but {len(images)} image(s): write one per image "
                         f"(or none with a single image)")
    eoa, eos, pad = tokenizer.token_to_id(IM_END), tokenizer.eos_token_id, tokenizer.pad_token_id
    seq: list[int] = []  # token ids, IGNORE at image positions (what mask_human_targets reads)
    spans: list[tuple[int, str]] = []
    need_bos = True
    for k, part in enumerate(parts):
        if part:
            seq += tokenizer.encode(part, add_bos=need_bos)
            need_bos = False
        if k < len(images):
            spans.append((len(seq), images[k]))
            seq += [IGNORE] * image_len(images[k])
    labels = mask_human_targets(seq, eoa, eos)
    ids = [pad if t == IGNORE else t for t in seq]
    return Example(ids, labels, "", images=spans)


__all__ = ["conv2text", "mask_human_targets", "resolve_images", "encode_vl_record"]

"""XComposer's prompt layout and a chat history that can be stored as JSON.

One user turn, as upstream's `wrap_prompt` builds it (each piece tokenized on its own):

    <s>{meta} <|User|>:  [image embeddings]  {text}  \\n<eoh> <|Bot|>:

where {meta} is internlm-xcomposer-7b's meta instruction on the first turn (empty for -vl-7b).

`<s>` only at the start of the whole prompt. Images go right after the user tag (upstream puts
its single image there), or at `<ImageHere>` placeholders written in the text, one per image.
A finished turn continues with the reply and `<eoa>`, and the next turn follows directly:

    ... <|Bot|>:{reply}<eoa> <|User|>: ...

so turn 2's prompt is exactly turn 1's prompt, the reply, `<eoa>` and the new turn. (Upstream's
remote code instead rebuilds earlier turns without `<eoh>`/`<eoa>` and with a second `<s>` before
each reply; see docs/checkpoint-format.md.)

History is a list of plain dicts, alternating

    {"role": "user", "text": "...", "images": ["/abs/path.jpg" or "data:image/png;base64,..."]}
    {"role": "bot", "text": "..."}

which `json.dumps` stores and `json.loads` gives back unchanged; images are references a later
process can load again, never tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence, Union

from ..llm.tokenizer import IncrementalDecoder, check_text

IMAGE_PLACEHOLDER = "<ImageHere>"
USER_TAG = " <|User|>:"
BOT_TAG = " <|Bot|>:"


@dataclass(frozen=True)
class ImageSlot:
    """Where image number `index` of the prompt's image list goes."""

    index: int


Segment = Union[list, ImageSlot]  # token ids or an image slot


def user_turn(text: str, images: Sequence[str] = ()) -> dict[str, Any]:
    """A checked user turn. `images` are stored references (paths or data URIs)."""
    check_text(text, "the question")
    images = list(images)
    if not text.strip() and not images:
        raise ValueError("the question is empty and no image was given: type a question or pass an image")
    n = text.count(IMAGE_PLACEHOLDER)
    if n and n != len(images):
        raise ValueError(f"the text has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) were "
                         f"given: write one {IMAGE_PLACEHOLDER} per image, or none to put the images right "
                         f"after the user tag")
    return {"role": "user", "text": text, "images": images}


def bot_turn(text: str) -> dict[str, Any]:
    return {"role": "bot", "text": text}


def check_history(history) -> list[dict[str, Any]]:
    """A copy of `history` after checking its shape; the message names the bad entry."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list of turns (dicts), got {type(history).__name__}")
    if len(history) % 2:
        raise ValueError(f"history has {len(history)} entries; it must alternate user and bot turns and end "
                         f"with a bot turn")
    out = []
    for i, turn in enumerate(history):
        want = "user" if i % 2 == 0 else "bot"
        if not isinstance(turn, dict) or turn.get("role") != want or not isinstance(turn.get("text"), str):
            raise ValueError(f"history[{i}] must be a {{'role': '{want}', 'text': str, ...}} dict, got {turn!r}")
        if want == "user":
            images = turn.get("images", [])
            if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
                raise ValueError(f"history[{i}]['images'] must be a list of path or data-URI strings, "
                                 f"got {images!r}")
            try:
                out.append(user_turn(turn["text"], images))
            except (TypeError, ValueError) as e:
                raise ValueError(f"history[{i}]: {e}") from e
        else:
            out.append(bot_turn(turn["text"]))
    return out


def turn_segments(tokenizer, turn: dict[str, Any], first_image: int, at_start: bool,
                  meta_instruction: str = "") -> list[Segment]:
    """Token pieces and image slots of one user turn (up to and including the bot tag). At the start
    of the prompt a meta instruction goes right before the user tag, in one piece with it."""
    head = meta_instruction + USER_TAG if at_start else USER_TAG
    segs: list[Segment] = [tokenizer.encode(head, add_bos=at_start)]
    text, images = turn["text"], turn["images"]
    if IMAGE_PLACEHOLDER in text:
        parts = text.split(IMAGE_PLACEHOLDER)
        for k, part in enumerate(parts):
            if part:
                segs.append(tokenizer.encode(part, add_bos=False))
            if k < len(parts) - 1:
                segs.append(ImageSlot(first_image + k))
    else:
        segs += [ImageSlot(first_image + k) for k in range(len(images))]
        if text:
            segs.append(tokenizer.encode(text, add_bos=False))
    segs.append(tokenizer.encode(f"\n{tokenizer.eoh}{BOT_TAG}", add_bos=False))
    return segs


def reply_segment(tokenizer, reply: str) -> list[int]:
    return tokenizer.encode(reply, add_bos=False) + [tokenizer.eoa_token_id]


def prompt_segments(tokenizer, turns: Sequence[dict[str, Any]],
                    meta_instruction: str = "") -> tuple[list[Segment], list[str]]:
    """Segments of a whole prompt (history + the new user turn) and its image references in order;
    `meta_instruction` (internlm-xcomposer-7b's) opens the prompt once, whatever the history."""
    segs: list[Segment] = []
    images: list[str] = []
    for i, turn in enumerate(turns):
        if turn["role"] == "user":
            segs += turn_segments(tokenizer, turn, len(images), at_start=(i == 0), meta_instruction=meta_instruction)
            images += turn["images"]
        else:
            segs.append(reply_segment(tokenizer, turn["text"]))
    return segs, images


class ChatStream:
    """The text pieces of a streamed reply (XComposer and XComposer2 `stream_chat`); `reply` and
    `history` (in the model's own history format) are set once it is exhausted."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.reply: str | None = None
        self.history: list | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._pieces


def text_until_stop(tokenizer, chunks: Iterable[list[int]], stops: set[int]) -> Iterator[str]:
    """Text pieces of streamed token-id chunks (whole characters only, special tokens skipped),
    ended at the first stop id."""
    dec = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    for ids in chunks:
        cut = next((i for i, t in enumerate(ids) if t in stops), None)
        new = dec.push(ids if cut is None else ids[:cut])
        if new:
            yield new
        if cut is not None:
            break
    tail = dec.flush()
    if tail:
        yield tail


def normalize_history(history) -> list[tuple]:
    """Upstream's (query, response) pairs, or ours (query, response, [image references]) triples."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list of (query, response) pairs, got {type(history).__name__}")
    out = []
    for i, turn in enumerate(history):
        ok = isinstance(turn, (list, tuple)) and len(turn) in (2, 3) and all(isinstance(s, str) for s in turn[:2])
        if ok and len(turn) == 3:
            ok = isinstance(turn[2], (list, tuple)) and all(isinstance(s, str) for s in turn[2])
        if not ok:
            raise ValueError(f"history[{i}] must be a (query, response) pair or a (query, response, [image "
                             f"references]) triple of strings, got {turn!r}")
        q, r = check_text(turn[0], f"history[{i}] query"), check_text(turn[1], f"history[{i}] response")
        out.append((q, r, list(turn[2])) if len(turn) == 3 else (q, r))
    return out


@dataclass
class PlacedPrompt:
    texts: list[str]  # each turn's query as the prompt shows it (history turns, then the new query)
    images: list  # every image of the prompt, in prompt order (references or items)
    turn_images: list[list]  # per turn (history, then new) the images it holds
    front: bool  # upstream's lone-image rule: the image goes before the whole prompt


def place_images(past: Sequence[tuple], query: str, given: Sequence, *, label, front_rule: bool = True,
                 ref=None) -> PlacedPrompt:
    """Which image goes where. History triples bring their own images; a history pair with k
    `<ImageHere>` takes the next k given images (upstream: all images are passed every turn); the
    new query takes the rest. A turn with images but no placeholder gets `label(first, n)` in front
    of its text, except (with `front_rule`, XComposer2.5) upstream's lone-image case: one image in
    all and no placeholder anywhere, which `front` marks. Given images that begin with exactly the
    images the history triples store (compared by `ref`, the stored reference of an item) are those
    again, passed the upstream way, and are not added a second time."""
    given = list(given)
    stored = [im for turn in past if len(turn) == 3 for im in turn[2]]
    if stored and ref is not None and len(given) >= len(stored):
        try:
            again = [ref(g) for g in given[:len(stored)]] == stored
        except (TypeError, ValueError, OSError):
            again = False
        if again:
            given = given[len(stored):]
    texts, turn_images = [], []
    for i, turn in enumerate(past):
        q = turn[0]
        n = q.count(IMAGE_PLACEHOLDER)
        if len(turn) == 3 and turn[2]:
            imgs = list(turn[2])
            if n not in (0, len(imgs)):
                raise ValueError(f"history[{i}] has {n} {IMAGE_PLACEHOLDER} but {len(imgs)} stored images")
        else:
            if n > len(given):
                raise ValueError(f"history[{i}] has {n} {IMAGE_PLACEHOLDER} placeholder(s) but only {len(given)} "
                                 f"image(s) are left to fill them: pass the images of earlier turns again (upstream's "
                                 f"way) or pass the history chat() returned, which keeps them")
            imgs, given = given[:n], given[n:]
        texts.append(q)
        turn_images.append(imgs)
    n = query.count(IMAGE_PLACEHOLDER)
    if n and n != len(given):
        raise ValueError(f"the query has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(given)} image(s) were "
                         f"given for it: write one {IMAGE_PLACEHOLDER} per image, or none")
    texts.append(query)
    turn_images.append(given)
    total = sum(len(t) for t in turn_images)
    front = front_rule and total == 1 and not any(IMAGE_PLACEHOLDER in t for t in texts)
    if not front:
        first = 0
        for k, (t, imgs) in enumerate(zip(texts, turn_images)):
            if imgs and IMAGE_PLACEHOLDER not in t:
                texts[k] = label(first, len(imgs)) + t
            first += len(imgs)
    images = [im for t in turn_images for im in t]
    return PlacedPrompt(texts, images, turn_images, front)


def multi_image_label(first: int, n: int) -> str:
    """Upstream's multi-image layout: `Image1 <ImageHere>; Image2 <ImageHere>; ` (its README examples)."""
    return "".join(f"Image{first + k + 1} {IMAGE_PLACEHOLDER}; " for k in range(n))


def segments_length(segs: Sequence[Segment], tokens_per_image: int) -> int:
    return sum(tokens_per_image if isinstance(s, ImageSlot) else len(s) for s in segs)


__all__ = ["normalize_history", "PlacedPrompt", "place_images", "multi_image_label", "IMAGE_PLACEHOLDER", "ChatStream", "text_until_stop", "USER_TAG", "BOT_TAG", "ImageSlot", "user_turn", "bot_turn", "check_history",
           "turn_segments", "reply_segment", "prompt_segments", "segments_length"]

"""Reading the model's answers in the composition steps, robustly.

Each parser returns its result and a fallback note: None when the answer was usable, otherwise a
short reason, which the pipeline records on the article. Upstream facts (web_demo.py): the
article is split on newlines after collapsing runs of them, at most 60 sections; sections are
shown to the model as `<Seg{i}> {text}\\n`; spotting answers list `<Seg{k}>` tags; captions end at
the closing quote, the paragraph's last 50 characters otherwise; the selection answer's first
letter is A-D, the first candidate otherwise.
"""
from __future__ import annotations

import re
import unicodedata

MAX_PARAGRAPHS = 60
MAX_CAPTION = 200
LETTERS = "ABCDEFGHIJ"  # A-D for retrieved candidates; up to J for XComposer2's 10 reference images
# NFKC first turns full-width ＜Ｓｅｇ３＞ into <Seg3>; the brackets are optional so that
# `Seg 3`, `seg3` and 【Seg3】 count too
_SEG = re.compile(r"<?\s*seg\s*(\d+)\s*>?", re.IGNORECASE)
_CLOSE_QUOTES = '"”」』＂'  # ＂ is full-width "
_OPEN_QUOTES = '"“「『＂'
# decoded special tokens end a caption too (they should be stripped, but a raw decode may keep them)
_SPECIAL = re.compile(r"<eoa>|<eoh>|</s>|<TOKENS_UNUSED_\d+>|<\|(?:User|Bot)\|>")


def split_paragraphs(text: str, max_paragraphs: int = MAX_PARAGRAPHS) -> list[str]:
    """Non-empty, stripped paragraphs of `text`, at most `max_paragraphs` (text without any
    non-space character gives [])."""
    if max_paragraphs < 1:
        raise ValueError(f"max_paragraphs={max_paragraphs} must be at least 1")
    text = re.sub(r"\r\n?", "\n", text or "")
    text = re.sub(r"(\n[ \t]*)+", "\n", text)  # upstream: runs of (blank) lines are one break
    parts = (p.strip() for p in text.split("\n"))
    return [p for p in parts if p][:max_paragraphs]


def indexed_sections(paragraphs: list[str]) -> list[str]:
    """Upstream's numbering of the article for the spotting and caption prompts."""
    return [f"<Seg{i}> {p}\n" for i, p in enumerate(paragraphs)]


def evenly_spaced(n_paragraphs: int, n: int) -> list[int]:
    """`n` distinct paragraph indices (at most `n_paragraphs`) spread over the article: the k-th
    image goes after the middle paragraph of the k-th of n equal shares. 10 paragraphs, 3 images ->
    [1, 5, 8]; as many images as paragraphs -> every paragraph."""
    if n_paragraphs < 0 or n < 0:
        raise ValueError(f"evenly_spaced({n_paragraphs}, {n}): counts must be >= 0")
    n = min(n, n_paragraphs)
    # the share's middle (k + 0.5) * step is below n_paragraphs, and step >= 1 keeps indices distinct
    return [int((k + 0.5) * n_paragraphs / n) for k in range(n)]


def default_image_count(n_paragraphs: int) -> int:
    """When the model decides the count but its answer is unusable: one image per ~3 paragraphs."""
    return max(1, min(n_paragraphs, round(n_paragraphs / 3))) if n_paragraphs > 0 else 0


def parse_spotting(text: str, n_paragraphs: int, n_wanted: int | None) -> tuple[list[int], str | None]:
    """Paragraph indices from an answer like `适合插入图像的行是<Seg2>,<Seg5>,<Seg9>`, sorted.

    Tags are read in the answer's order; out-of-range ones and repeats are dropped; with `n_wanted`
    the first `n_wanted` are kept. Fallbacks (the note says what happened):
    - no usable tag: evenly spaced positions, `n_wanted` of them, or `default_image_count` when
      the model was to decide;
    - fewer than `n_wanted` tags: the found ones, plus unused paragraphs up to `n_wanted` (the
      user asked for that many images), each the one farthest from those placed (ties: earliest).
    `n_wanted` above `n_paragraphs` means one image per paragraph.
    """
    if n_paragraphs < 0 or (n_wanted is not None and n_wanted < 0):
        raise ValueError(f"parse_spotting: n_paragraphs={n_paragraphs} and n_wanted={n_wanted} must be >= 0")
    if n_paragraphs == 0 or n_wanted == 0:
        return [], None
    raw = text or ""
    found: list[int] = []
    for m in _SEG.finditer(unicodedata.normalize("NFKC", raw)):
        k = int(m.group(1))
        if k < n_paragraphs and k not in found:
            found.append(k)
    if n_wanted is not None:
        found = found[:n_wanted]
    if not found:
        want = default_image_count(n_paragraphs) if n_wanted is None else min(n_wanted, n_paragraphs)
        spots = evenly_spaced(n_paragraphs, want)
        return spots, f"could not parse {_clip(raw)}; used evenly spaced paragraphs {spots}"
    want = len(found) if n_wanted is None else min(n_wanted, n_paragraphs)
    if len(found) < want:
        # spread the rest: each time the unused paragraph farthest from every placed one (ties: earliest)
        fill: list[int] = []
        while len(found) + len(fill) < want:
            placed = found + fill
            fill.append(max((p for p in range(n_paragraphs) if p not in placed),
                            key=lambda p: (min(abs(p - q) for q in placed), -p)))
        return sorted(found + fill), (f"the answer {_clip(raw)} named {len(found)} of {want} paragraphs; "
                                      f"added paragraphs {sorted(fill)}, spread among them")
    return sorted(found), None


def parse_caption(text: str, last_quote: bool = False) -> tuple[str, str | None]:
    """The caption: the answer up to its closing quote (or a special token), whitespace collapsed,
    at most MAX_CAPTION characters. `last_quote` (XComposer2.5's demo: `'"'.join(text.split('"')[:-1])`):
    up to the last `"` instead of the first, so quotes inside the caption stay. Empty -> ("", reason):
    use `fallback_caption`."""
    raw = text or ""
    body = raw.lstrip().lstrip(_OPEN_QUOTES)  # the prompt opened the quote; a model may open it again
    special = _SPECIAL.search(body)
    if last_quote:
        end = special.start() if special else len(body)
        cut = max(body.rfind('"', 0, end), 0)  # no quote: nothing (upstream's join of no parts)
    else:
        cut = min([i for i in (body.find(q) for q in _CLOSE_QUOTES) if i >= 0]
                  + [special.start() if special else len(body)])
    caption = " ".join(body[:cut].split())[:MAX_CAPTION].strip()
    if not caption:
        return "", f"empty caption in the answer {_clip(raw)}"
    return caption, None


def fallback_caption(paragraph: str) -> str:
    """Upstream's caption when captioning fails: the paragraph's last 50 characters."""
    return " ".join(paragraph.split())[-50:].strip()


def parse_choice(text: str, n_candidates: int) -> tuple[int, str | None]:
    """Index of the chosen candidate from the answer after `最合适的图是` / `The best image is`.

    Upstream reads the first character after a leading space. We read the first capital letter
    standing alone within the answer's opening (`A`, ` B`, `C.`, `(D)`, `图C`, full-width `Ｂ`),
    or a letter of either case after `option`/`image`/`图`/`选` (`Option b`). Only the opening
    counts, so a word later in a sentence is not taken for a choice. The letters read are A-D, or
    as many as there are candidates beyond four (XComposer2's reference images: up to J).
    Unparseable or out of range -> (0, reason): the first candidate, as upstream.
    """
    if not 1 <= n_candidates <= len(LETTERS):
        raise ValueError(f"parse_choice: n_candidates={n_candidates} must be between 1 and {len(LETTERS)}")
    raw = text or ""
    head = unicodedata.normalize("NFKC", raw).strip()[:16]
    last = LETTERS[max(4, n_candidates) - 1]
    big, small = f"A-{last}", f"a-{last.lower()}"
    m = (re.match(rf"[\W_]*([{big}])(?![A-Za-z])", head)  # the letter opens the answer: `B`, `(D)`, `C.`
         or re.fullmatch(rf"[\W_]*([{small}])[\W_]*", head)  # a lone small letter; `a dog` is no choice
         or re.search(rf"(?:option|image|picture|图|选)\s*[:：]?\s*([{small}{big}])(?![A-Za-z])", head,
                      re.IGNORECASE)
         or re.search(rf"(?<![A-Za-z])([{big}])(?![A-Za-z])", head))
    if m is None:
        return 0, f"no candidate letter in the answer {_clip(raw)}"
    letter = m.group(1).upper()
    letters = LETTERS[:n_candidates]
    if letter not in letters:
        valid = f"A-{letters[-1]}" if len(letters) > 1 else "A"
        return 0, f"the answer {_clip(raw)} chose {letter}, but the candidates are {valid}"
    return letters.index(letter), None


def _clip(text: str, n: int = 80) -> str:
    """An answer quoted for a note, shortened."""
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[:n] + "...")


__all__ = ["split_paragraphs", "indexed_sections", "evenly_spaced", "default_image_count", "parse_spotting",
           "parse_caption", "fallback_caption", "parse_choice", "MAX_PARAGRAPHS", "MAX_CAPTION"]

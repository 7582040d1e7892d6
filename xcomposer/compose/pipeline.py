"""Writing an illustrated article from a title, in upstream XComposer's steps.

1. text: the model writes the article (streamed), split into paragraphs;
2. spotting: the model picks the paragraphs after which an image fits;
3. captions: the model writes a caption for each spot, seeing the captions before it;
4. retrieval: each caption searches the user's image library (open_clip) for 4 candidates,
   never reusing an image already placed;
5. selection: the model picks one candidate per spot, seeing the text and the images chosen so far.

The prompts are the model generation's own (`prompts.style_for`): XComposer 1.0 writes from a
title; XComposer2 (internlm-xcomposer2-7b) from a free-form instruction, optionally with reference
images, which the model sees while writing and spotting and which then fill the spots in place of
captions and retrieval (upstream's `model_select_imagebase`). Both offer upstream XComposer2's
paragraph edits (`edit_paragraph`).

An answer that cannot be parsed falls back (evenly spaced spots, the paragraph's tail as caption,
the first candidate) and the article records that it happened. `Composer.run` yields events as
the work proceeds (text pieces, stage progress) and ends with the finished `Article`; `compose`
wraps it with callbacks. Stage timings go to `article.meta["timings"]`.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..llm.generation import PromptTooLongError
from ..llm.tokenizer import check_text
from .article import Article, Candidate, ImageSlot
from .parse import (evenly_spaced, fallback_caption, indexed_sections, parse_caption, parse_choice,
                    parse_spotting, split_paragraphs)
from .prompts import EDIT_KINDS, EDIT_NEEDS_INSTRUCTION, LETTERS, edit_request, style_for

PLACEHOLDER = "<ImageHere>"
MAX_REFERENCES = 10  # upstream's demo takes at most 10 reference images
TITLE_CHARS = 80     # an XComposer2 article's title: its instruction's first line, cut to this

STAGES = ("text", "spotting", "captions", "retrieval", "selection")


@dataclass
class Event:
    """One step of progress: kind is "text" (a piece of the article), "stage" (done/total of a stage)
    or "done" (article is final)."""

    kind: str
    stage: str = ""
    done: int = 0
    total: int = 0
    text: str = ""
    article: Article | None = None


class Composer:
    """Runs the composition steps with one model and (optionally) one image library."""

    def __init__(self, model, library=None, *, lang: str = "zh", candidates: int = 4):
        self.model = model
        self.library = library
        self.style = style_for(model, lang)
        self.lang = lang
        if not 1 <= candidates <= len(LETTERS):
            raise ValueError(f"candidates={candidates} must be between 1 and {len(LETTERS)}")
        self.candidates = candidates

    def _opts(self, step: str, article: Article | None = None, refs: bool = False, **gen: Any) -> dict[str, Any]:
        """Generation options of a step: the style's, the article's seed, then the caller's."""
        opts = dict(self.style.gen[step])
        if getattr(self.style, "penalize_prompt", {}).get(step) and not refs:
            opts["penalize_prompt"] = True  # upstream sends this step as input_ids (XComposer2 only)
        seed = article.meta.get("seed") if article is not None else None
        if seed is not None and step != "edit":  # an edit asked again should give another draw
            opts["seed"] = seed
        if "max_new_tokens" in gen:
            opts.pop("max_length", None)
        return {**opts, **gen}

    def _meta(self, article: Article) -> bool:
        return bool(article.meta.get("with_meta", False))

    # -- the whole pipeline ------------------------------------------------------------------
    def run(self, title: str, *, num_images: int | None = None, select: bool = True, images=None,
            with_meta: bool = False, seed: int | None = None, **gen: Any) -> Iterator[Event]:
        """Yield progress events; the last one is `Event("done", article=...)`.

        `title` is the article's title (XComposer 1.0) or the free-form instruction (XComposer2:
        "根据以下标题：…创作长文章…", material included). `num_images=None` lets the model decide how
        many. `images` (XComposer2 only, at most 10 paths) are reference images: the model sees them
        while writing and spotting, and they fill the spots (no captions, no retrieval). `with_meta`
        (XComposer2) adds upstream's system turn; `seed` makes every sampled step reproducible.
        `gen` overrides the article's generation options (upstream's defaults: 1.0: 5 beams,
        repetition penalty 5.0, up to 1000 new tokens; XComposer2: sampling, top-p 0.8, top-k 40,
        penalty 1.005, up to 4096 new tokens, as many as the context window has room for).
        """
        if not isinstance(title, str) or not title.strip():
            raise ValueError("the title is empty: give the article a title" if self.style.name == "xcomposer"
                             else "the instruction is empty: say what to write (a title, material, length)")
        title = check_text(title.strip(), "the title")
        if PLACEHOLDER in title:
            raise ValueError(f"the title holds {PLACEHOLDER}, the image slot of the prompts: remove it (reference "
                             f"images go in `images=`)")
        if num_images is not None and (not isinstance(num_images, int) or isinstance(num_images, bool)
                                       or num_images < 0):
            raise ValueError(f"num_images={num_images!r} must be a whole number >= 0, or None to let the model decide")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed={seed!r} must be a whole number, or None")
        refs = self._references(images)
        timings: dict[str, float] = {}
        v2 = self.style.name in ("xcomposer2", "xcomposer2d5")
        meta = {"style": self.style.name, "num_images": num_images, "model": str(getattr(self.model, "source", "")),
                "timings": timings, "seed": seed}
        if v2:
            meta.update(instruction=title, with_meta=bool(with_meta), references=refs)
        opts = {**self.style.gen["article"], **({"seed": seed} if seed is not None else {}), **gen}
        meta["generation"] = opts
        t0 = time.perf_counter()
        text = ""
        yield Event("stage", "text", 0, 1)
        prompt = self.style.article(title, len(refs), bool(with_meta))
        for piece in self.model.stream_complete(prompt, image=refs or None, **opts):
            text += piece
            yield Event("text", "text", text=piece)
        paragraphs = split_paragraphs(text)
        if not paragraphs:
            paragraphs = [short_title(title) if v2 else title]
        article = Article(title=short_title(title) if v2 else title, paragraphs=paragraphs, lang=self.lang, meta=meta)
        timings["text"] = time.perf_counter() - t0
        yield Event("stage", "text", 1, 1)

        for ev in self._illustrate(article, num_images, select, timings, refs):
            yield ev
        yield Event("done", article=article)

    def _references(self, images) -> list[str]:
        if images is None:
            return []
        items = [images] if isinstance(images, (str, bytes)) or hasattr(images, "__fspath__") else list(images)
        if not items:
            return []
        if not self.style.references:
            raise ValueError("reference images need XComposer2 (internlm-xcomposer2-7b): XComposer 1.0's "
                             "composition has no such input; leave `images` out")
        if len(items) > MAX_REFERENCES:
            raise ValueError(f"{len(items)} reference images given; upstream takes at most {MAX_REFERENCES}: "
                             f"pass fewer")
        out = []
        for k, item in enumerate(items):
            if not isinstance(item, (str, bytes)) and not hasattr(item, "__fspath__"):
                raise TypeError(f"reference image {k + 1}: expected a file path, got {type(item).__name__}")
            path = os.path.abspath(os.fsdecode(item))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"reference image {k + 1}: no file at {path}; check the path")
            out.append(path)
        return out

    def _illustrate(self, article: Article, num_images: int | None, select: bool,
                    timings: dict[str, float], refs: list[str] = ()) -> Iterator[Event]:
        t = time.perf_counter()
        yield Event("stage", "spotting", 0, 1)
        if refs:  # upstream: the count is capped at the number of references, which "automatic" means too
            if num_images is not None and num_images > len(refs):
                article.fallbacks.append(f"spotting: {num_images} images were asked for but {len(refs)} reference "
                                         f"image(s) were given: placing at most {len(refs)}")
            num_images = len(refs) if num_images is None else min(num_images, len(refs))
        positions = self.spot(article, num_images, refs)
        timings["spotting"] = time.perf_counter() - t
        yield Event("stage", "spotting", 1, 1)

        if refs:  # the references fill the spots in order, each chosen by the model among those left
            timings["captions"] = timings["retrieval"] = 0.0
            t = time.perf_counter()
            for i, slot in enumerate(list(article.slots)):
                self.place_reference(article, slot.paragraph, refs, select=select)
                yield Event("stage", "selection", i + 1, len(positions))
            timings["selection"] = time.perf_counter() - t
            return

        t = time.perf_counter()
        for i, _ in enumerate(self.caption_iter(article, positions)):
            yield Event("stage", "captions", i + 1, len(positions))
        timings["captions"] = time.perf_counter() - t

        t = time.perf_counter()
        for i, slot in enumerate(article.slots):
            self.retrieve(article, slot.paragraph)
            yield Event("stage", "retrieval", i + 1, len(article.slots))
        timings["retrieval"] = time.perf_counter() - t

        t = time.perf_counter()
        if select:
            for i, slot in enumerate(article.slots):
                self.select(article, slot.paragraph)
                yield Event("stage", "selection", i + 1, len(article.slots))
        timings["selection"] = time.perf_counter() - t

    # -- steps -------------------------------------------------------------------------------
    def spot(self, article: Article, num_images: int | None, refs: list[str] = ()) -> list[int]:
        """Ask the model where images go (seeing the reference images, if any); replaces the
        article's slots (captions come next)."""
        n_par = len(article.paragraphs)
        if num_images == 0:
            article.slots = []
            return []
        wanted = None if num_images is None else min(num_images, n_par)
        if num_images is not None and num_images > n_par:
            article.fallbacks.append(f"spotting: {num_images} images were asked for but the article has "
                                     f"{n_par} paragraph(s), at most one image each: placing {n_par}")
        sections = "".join(indexed_sections([_text(p) for p in article.paragraphs]))
        prompt, opening = self.style.spotting(sections, wanted, len(refs), self._meta(article))
        try:
            answer = opening + self.model.complete(prompt, image=list(refs) or None,
                                                   **self._opts("spotting", article, refs=bool(refs)))
        except PromptTooLongError as e:
            answer, note = "", f"spotting: prompt too long ({e})"
            article.fallbacks.append(note)
        positions, why = parse_spotting(answer, n_par, wanted)
        if why:
            article.fallbacks.append(f"spotting: {why}")
        article.slots = [ImageSlot(paragraph=p, caption="") for p in positions]
        return positions

    def caption_iter(self, article: Article, positions: list[int]) -> Iterator[str]:
        """Caption each spot in order, each prompt listing the captions before it (upstream)."""
        sections = indexed_sections([_text(p) for p in article.paragraphs])
        done: list[tuple[int, str]] = []
        for pos in positions:
            caption, source = self._caption(article, sections, pos, done)
            slot = article.slot_at(pos)
            slot.caption, slot.caption_source = caption, source
            done.append((pos, caption))
            yield caption

    def _caption(self, article: Article, sections: list[str], pos: int,
                 before: list[tuple[int, str]]) -> tuple[str, str]:
        prompt = self.style.caption("".join(sections[:pos + 2]), before, pos, self._meta(article))
        try:
            caption, why = parse_caption(self.model.complete(prompt, **self._opts("caption", article)),
                                         last_quote=getattr(self.style, "caption_quote", "first") == "last")
        except PromptTooLongError as e:
            caption, why = "", f"prompt too long ({e})"
        if why or not caption:
            article.fallbacks.append(f"caption for paragraph {pos}: {why or 'empty'}; used the paragraph's end")
            return fallback_caption(article.paragraphs[pos]), "fallback"
        return caption, "model"

    def retrieve(self, article: Article, paragraph: int) -> list[Candidate]:
        """Search the library with the slot's caption, skipping images used by other slots."""
        slot = article.slot_at(paragraph)
        if slot is None:
            raise IndexError(f"paragraph {paragraph} has no image slot")
        if self.library is None:
            article.set_candidates(paragraph, [], chosen=None)
            return []
        used = [c.id or c.path for s in article.slots if s is not slot and (c := article.chosen_image(s.paragraph))]
        query = slot.caption.strip() or fallback_caption(article.paragraphs[paragraph])
        hits = self.library.search(query, k=self.candidates, exclude=used)
        found = [Candidate(path=h.path, score=float(h.score), id=h.id) for h in hits]
        article.set_candidates(paragraph, found, chosen=0 if found else None)
        if not found:
            article.fallbacks.append(f"retrieval for paragraph {paragraph}: the library returned no candidates")
        return found

    def select(self, article: Article, paragraph: int) -> int | None:
        """Let the model choose among a slot's candidates, given the text and earlier images."""
        slot = article.slot_at(paragraph)
        if slot is None or not slot.candidates:
            return None
        if len(slot.candidates) == 1:
            article.choose(paragraph, 0, by="first")
            return 0
        context, images = "", []
        start = 0
        for s in article.slots:
            if s.paragraph >= paragraph:
                break
            chosen = article.chosen_image(s.paragraph)
            if chosen is None:
                continue
            context += "".join(_text(p) + "\n" for p in article.paragraphs[start:s.paragraph + 1]) + PLACEHOLDER
            images.append(chosen.path)
            start = s.paragraph + 1
        context += "".join(_text(p) + "\n" for p in article.paragraphs[start:paragraph + 1])
        n = len(slot.candidates)
        prompt = self.style.select(context, n, self._meta(article))
        images += [c.path for c in slot.candidates]
        try:
            index, why = parse_choice(self.model.complete(prompt, image=images, **self._opts("select", article)), n)
        except PromptTooLongError as e:
            index, why = 0, f"prompt too long ({e})"
        if why:
            article.fallbacks.append(f"selection for paragraph {paragraph}: {why}; used the first candidate")
        article.choose(paragraph, index, by="fallback" if why else "model")
        return index

    def place_reference(self, article: Article, paragraph: int, refs: list[str], select: bool = True) -> int | None:
        """Fill the slot at `paragraph` from the reference images not placed yet (upstream's
        `model_select_imagebase`): the model picks one, seeing the text and the images placed so far;
        with one left it is taken; with none left the slot is dropped (recorded)."""
        slot = article.slot_at(paragraph)
        if slot is None:
            raise IndexError(f"paragraph {paragraph} has no image slot")
        used = {c.path for s in article.slots if s is not slot and (c := article.chosen_image(s.paragraph))}
        left = [r for r in refs if r not in used]
        if not left:
            article.remove_image(paragraph)
            article.fallbacks.append(f"selection for paragraph {paragraph}: every reference image is placed already; "
                                     f"no image here")
            return None
        article.set_candidates(paragraph, [Candidate(path=r) for r in left], chosen=0)
        return self.select(article, paragraph) if select else 0

    # -- editing (upstream's demo allows these) ------------------------------------------------
    def regenerate_paragraph(self, article: Article, index: int, **gen: Any) -> str:
        """Write paragraph `index` again, continuing the article text before it (sampled, so the
        new paragraph differs; pass `do_sample=False` for beam search)."""
        if not 0 <= index < len(article.paragraphs):
            raise IndexError(f"paragraph {index} does not exist: the article has {len(article.paragraphs)}")
        before = "".join(_text(p) + "\n" for p in article.paragraphs[:index])
        prompt = self.style.paragraph(article.meta.get("instruction") or article.title, self._meta(article)) + before
        opts = {**self.style.gen["article"], "num_beams": 1, "do_sample": True, "top_p": 0.8, "temperature": 0.8,
                "max_new_tokens": 300, **gen}
        text = self.model.complete(prompt, **opts)
        new = next((p for p in split_paragraphs(text)), "")
        if not new:
            raise RuntimeError(f"the model wrote no text for paragraph {index}; try again (sampling gives "
                               f"another draw) or edit it by hand")
        article.set_paragraph(index, new)
        return new

    def propose_edit(self, article: Article, index: int, kind: str, instruction: str = "", **gen: Any) -> str:
        """Upstream XComposer2's paragraph edit: the model's new text for paragraph `index`
        (`kind` one of "rewrite", "expand", "abbreviate", "insert_before", "insert_after"; the
        inserts need `instruction`, an outline; the others take it as material). Nothing changes
        until `apply_edit`."""
        article._check_paragraph(index)
        if kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit {kind!r}: use one of {', '.join(EDIT_KINDS)}")
        if not isinstance(instruction, str):
            raise TypeError(f"the edit instruction must be a string, got {type(instruction).__name__}")
        instruction = check_text(instruction.strip(), "the edit instruction")
        if kind in EDIT_NEEDS_INSTRUCTION and not instruction:
            raise ValueError(f"{kind.replace('_', ' ')} needs an instruction: the outline of the new paragraph")
        paragraphs = [_text(p) for p in article.paragraphs]
        prompt = self.style.edit(edit_request(self.style.edits, kind, paragraphs, index, _text(instruction)),
                                 self._meta(article))
        text = self.model.complete(prompt, **self._opts("edit", article, **gen)).strip()
        if not text:
            raise RuntimeError(f"the model wrote no text for the {kind.replace('_', ' ')} of paragraph {index}; "
                               f"try again (sampling gives another draw)")
        return text

    def apply_edit(self, article: Article, index: int, kind: str, text: str) -> int | None:
        """Put an edit's text in (upstream's "Done"): line breaks become spaces; rewrite, expand and
        abbreviate replace paragraph `index`, the inserts add a paragraph before or after it (an
        image stays with the paragraph it follows); empty text deletes paragraph `index`. Returns
        the index of the changed or new paragraph (None when deleted). Upstream deletes on empty
        text whatever the edit; an empty insert is refused here instead (nothing to insert)."""
        if kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit {kind!r}: use one of {', '.join(EDIT_KINDS)}")
        if not isinstance(text, str):
            raise TypeError(f"the edited text must be a string, got {type(text).__name__}")
        text = re.sub(r"\n+", " ", check_text(text, "the edited text")).strip()
        if not text and kind in EDIT_NEEDS_INSTRUCTION:
            raise ValueError(f"nothing to insert {'before' if kind == 'insert_before' else 'after'} paragraph {index}: "
                             f"write the new paragraph (an empty rewrite deletes a paragraph)")
        if not text:
            article.delete_paragraph(index)
            return None
        if kind == "insert_before":
            article.insert_paragraph(index, text)
            return index
        if kind == "insert_after":
            article.insert_paragraph(index + 1, text)
            return index + 1
        article.set_paragraph(index, text)
        return index

    def edit_paragraph(self, article: Article, index: int, kind: str, instruction: str = "", **gen: Any) -> int | None:
        """`propose_edit`, then `apply_edit`."""
        return self.apply_edit(article, index, kind, self.propose_edit(article, index, kind, instruction, **gen))

    def set_caption(self, article: Article, paragraph: int, caption: str) -> list[Candidate]:
        """A user caption for a slot, then a new search with it (without a library the caption is
        set and the slot's candidates stay)."""
        article.set_caption(paragraph, caption, source="user")
        if self.library is None:
            return list(article.slot_at(paragraph).candidates)
        return self.retrieve(article, paragraph)

    def add_image(self, article: Article, paragraph: int) -> ImageSlot:
        """A new slot after `paragraph`: the model captions it, the library fills it."""
        article.add_slot(paragraph, caption="", source="model")
        sections = indexed_sections([_text(p) for p in article.paragraphs])
        before = [(s.paragraph, s.caption) for s in article.slots if s.paragraph != paragraph and
                  s.paragraph < paragraph + 2 and s.caption]
        caption, source = self._caption(article, sections, paragraph, before)
        article.set_caption(paragraph, caption, source=source)
        self.retrieve(article, paragraph)
        return article.slot_at(paragraph)


def short_title(instruction: str) -> str:
    """An XComposer2 article's title: the instruction's first line, at most TITLE_CHARS characters."""
    line = next((ln.strip() for ln in instruction.splitlines() if ln.strip()), instruction.strip())
    return line if len(line) <= TITLE_CHARS else line[:TITLE_CHARS - 1].rstrip() + "…"


def _text(s: str) -> str:
    """Text going into a prompt next to image slots: a literal placeholder in it would be read as one."""
    return s.replace(PLACEHOLDER, "<Image Here>")


def compose(model, title: str, *, library=None, num_images: int | None = None, lang: str = "zh",
            select: bool = True, images=None, with_meta: bool = False, seed: int | None = None,
            on_text: Callable[[str], None] | None = None,
            progress: Callable[[str, int, int], None] | None = None, **gen: Any) -> Article:
    """Run the whole pipeline; `on_text` receives the article text as it is written and `progress`
    (stage, done, total) each stage's advance."""
    composer = Composer(model, library, lang=lang)
    article = None
    for ev in composer.run(title, num_images=num_images, select=select, images=images, with_meta=with_meta,
                           seed=seed, **gen):
        if ev.kind == "text" and on_text is not None:
            on_text(ev.text)
        elif ev.kind == "stage" and progress is not None:
            progress(ev.stage, ev.done, ev.total)
        elif ev.kind == "done":
            article = ev.article
    return article


__all__ = ["Composer", "Event", "compose", "STAGES", "evenly_spaced", "short_title", "MAX_REFERENCES"]

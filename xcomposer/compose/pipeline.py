"""Writing an illustrated article from a title, in upstream XComposer's steps.

1. text: the model writes the article (streamed), split into paragraphs;
2. spotting: the model picks the paragraphs after which an image fits;
3. captions: the model writes a caption for each spot, seeing the captions before it;
4. retrieval: each caption searches the user's image library (open_clip) for 4 candidates,
   never reusing an image already placed;
5. selection: the model picks one candidate per spot, seeing the text and the images chosen so far.

An answer that cannot be parsed falls back (evenly spaced spots, the paragraph's tail as caption,
the first candidate) and the article records that it happened. `Composer.run` yields events as
the work proceeds (text pieces, stage progress) and ends with the finished `Article`; `compose`
wraps it with callbacks. Stage timings go to `article.meta["timings"]`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..llm.generation import PromptTooLongError
from .article import Article, Candidate, ImageSlot
from .parse import (evenly_spaced, fallback_caption, indexed_sections, parse_caption, parse_choice,
                    parse_spotting, split_paragraphs)
from .prompts import (ARTICLE_GEN, CAPTION_GEN, LETTERS, SELECT_GEN, SPOTTING_GEN, past_captions, prompts_for)

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
        self.prompts = prompts_for(lang)
        self.lang = lang
        if not 1 <= candidates <= len(LETTERS):
            raise ValueError(f"candidates={candidates} must be between 1 and {len(LETTERS)}")
        self.candidates = candidates

    @property
    def eoh(self) -> str:
        return self.model.tokenizer.eoh

    # -- the whole pipeline ------------------------------------------------------------------
    def run(self, title: str, *, num_images: int | None = None, select: bool = True,
            **gen: Any) -> Iterator[Event]:
        """Yield progress events; the last one is `Event("done", article=...)`.

        `num_images=None` lets the model decide how many; `gen` overrides the article's generation
        options (upstream's defaults: 5 beams, repetition penalty 5.0, up to 1000 new tokens).
        """
        if not isinstance(title, str) or not title.strip():
            raise ValueError("the title is empty: give the article a title")
        if num_images is not None and (not isinstance(num_images, int) or num_images < 0):
            raise ValueError(f"num_images={num_images!r} must be a whole number >= 0, or None to let the model decide")
        title = title.strip()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        text = ""
        yield Event("stage", "text", 0, 1)
        for piece in self.model.stream_complete(self.prompts.article.format(title=title, eoh=self.eoh),
                                                **{**ARTICLE_GEN, **gen}):
            text += piece
            yield Event("text", "text", text=piece)
        paragraphs = split_paragraphs(text)
        if not paragraphs:
            paragraphs = [title]
        article = Article(title=title, paragraphs=paragraphs, lang=self.lang,
                          meta={"generation": {**ARTICLE_GEN, **gen}, "num_images": num_images,
                                "model": str(getattr(self.model, "source", "")), "timings": timings})
        timings["text"] = time.perf_counter() - t0
        yield Event("stage", "text", 1, 1)

        for ev in self._illustrate(article, num_images, select, timings):
            yield ev
        yield Event("done", article=article)

    def _illustrate(self, article: Article, num_images: int | None, select: bool,
                    timings: dict[str, float]) -> Iterator[Event]:
        t = time.perf_counter()
        yield Event("stage", "spotting", 0, 1)
        positions = self.spot(article, num_images)
        timings["spotting"] = time.perf_counter() - t
        yield Event("stage", "spotting", 1, 1)

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
    def spot(self, article: Article, num_images: int | None) -> list[int]:
        """Ask the model where images go; replaces the article's slots (captions come next)."""
        n_par = len(article.paragraphs)
        if num_images == 0:
            article.slots = []
            return []
        wanted = None if num_images is None else min(num_images, n_par)
        if num_images is not None and num_images > n_par:
            article.fallbacks.append(f"spotting: {num_images} images were asked for but the article has "
                                     f"{n_par} paragraph(s), at most one image each: placing {n_par}")
        sections = "".join(indexed_sections(article.paragraphs))
        prompt = self.prompts.spotting.format(article=sections, n="" if wanted is None else wanted, eoh=self.eoh)
        try:
            answer = self.prompts.spotting_answer + self.model.complete(prompt, **SPOTTING_GEN)
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
        sections = indexed_sections(article.paragraphs)
        done: list[tuple[int, str]] = []
        for pos in positions:
            caption, source = self._caption(article, sections, pos, done)
            slot = article.slot_at(pos)
            slot.caption, slot.caption_source = caption, source
            done.append((pos, caption))
            yield caption

    def _caption(self, article: Article, sections: list[str], pos: int,
                 before: list[tuple[int, str]]) -> tuple[str, str]:
        prompt = self.prompts.caption.format(article="".join(sections[:pos + 2]), past=past_captions(self.prompts, before),
                                             pos=pos, eoh=self.eoh)
        try:
            caption, why = parse_caption(self.model.complete(prompt, **CAPTION_GEN))
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
            context += "".join(p + "\n" for p in article.paragraphs[start:s.paragraph + 1]) + "<ImageHere>"
            images.append(chosen.path)
            start = s.paragraph + 1
        context += "".join(p + "\n" for p in article.paragraphs[start:paragraph + 1])
        letters = LETTERS[:len(slot.candidates)]
        options = "\n".join(self.prompts.option.format(letter=ch) for ch in letters)
        prompt = self.prompts.select.format(context=context, options=options, eoh=self.eoh)
        images += [c.path for c in slot.candidates]
        try:
            index, why = parse_choice(self.model.complete(prompt, image=images, **SELECT_GEN), len(letters))
        except PromptTooLongError as e:
            index, why = 0, f"prompt too long ({e})"
        if why:
            article.fallbacks.append(f"selection for paragraph {paragraph}: {why}; used the first candidate")
        article.choose(paragraph, index, by="fallback" if why else "model")
        return index

    # -- editing (upstream's demo allows these) ------------------------------------------------
    def regenerate_paragraph(self, article: Article, index: int, **gen: Any) -> str:
        """Write paragraph `index` again, continuing the article text before it (sampled, so the
        new paragraph differs; pass `do_sample=False` for beam search)."""
        if not 0 <= index < len(article.paragraphs):
            raise IndexError(f"paragraph {index} does not exist: the article has {len(article.paragraphs)}")
        before = "".join(p + "\n" for p in article.paragraphs[:index])
        prompt = self.prompts.paragraph.format(title=article.title, eoh=self.eoh) + before
        opts = {**ARTICLE_GEN, "num_beams": 1, "do_sample": True, "top_p": 0.8, "temperature": 0.8,
                "max_new_tokens": 300, **gen}
        text = self.model.complete(prompt, **opts)
        new = next((p for p in split_paragraphs(text)), "")
        if not new:
            raise RuntimeError(f"the model wrote no text for paragraph {index}; try again (sampling gives "
                               f"another draw) or edit it by hand")
        article.set_paragraph(index, new)
        return new

    def set_caption(self, article: Article, paragraph: int, caption: str) -> list[Candidate]:
        """A user caption for a slot, then a new search with it."""
        article.set_caption(paragraph, caption, source="user")
        return self.retrieve(article, paragraph)

    def add_image(self, article: Article, paragraph: int) -> ImageSlot:
        """A new slot after `paragraph`: the model captions it, the library fills it."""
        article.add_slot(paragraph, caption="", source="model")
        sections = indexed_sections(article.paragraphs)
        before = [(s.paragraph, s.caption) for s in article.slots if s.paragraph != paragraph and
                  s.paragraph < paragraph + 2 and s.caption]
        caption, source = self._caption(article, sections, paragraph, before)
        article.set_caption(paragraph, caption, source=source)
        self.retrieve(article, paragraph)
        return article.slot_at(paragraph)


def compose(model, title: str, *, library=None, num_images: int | None = None, lang: str = "zh",
            select: bool = True, on_text: Callable[[str], None] | None = None,
            progress: Callable[[str, int, int], None] | None = None, **gen: Any) -> Article:
    """Run the whole pipeline; `on_text` receives the article text as it is written and `progress`
    (stage, done, total) each stage's advance."""
    composer = Composer(model, library, lang=lang)
    article = None
    for ev in composer.run(title, num_images=num_images, select=select, **gen):
        if ev.kind == "text" and on_text is not None:
            on_text(ev.text)
        elif ev.kind == "stage" and progress is not None:
            progress(ev.stage, ev.done, ev.total)
        elif ev.kind == "done":
            article = ev.article
    return article


__all__ = ["Composer", "Event", "compose", "STAGES", "evenly_spaced"]

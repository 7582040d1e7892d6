"""The composition prompts, per step: two styles, one per XComposer generation.

XComposer 1.0 (`XComposerStyle`): the Chinese strings are upstream's, read from
InternLM-XComposer-1.0/examples/web_demo.py (`generate_text`, `generate_loc`, `generate_cap`,
`generate_insert_cap`, `model_select_image`). XComposer was trained on those instructions and upstream
uses them for English titles too, so "zh" is the default; the English set is our translation, for
users who prefer English instructions. `{eoh}` is filled from the tokenizer.

XComposer2 (`XComposer2Style`, internlm-xcomposer2-7b): upstream's
InternLM-XComposer-2.0/examples/gradio_demo_composition.py (`text2instruction`, `generate_article`,
`generate_loc`, `generate_cap`, `model_select_image`, `model_select_imagebase`, `paragraph_edit`):
a free-form instruction instead of a title, chatml turns, optional reference images, and five
paragraph edits. Its image slot is upstream's `<image>`, written here as `<ImageHere>` (the
placeholder the models split at; it is never tokenized, so the ids are the same).

docs/composition.md lists every string with its source. Every prompt ends inside the bot's turn,
so the model continues the answer's opening words.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Prompts:
    article: str          # {title}
    spotting: str         # {article} (indexed sections), {n} (count or "")
    spotting_answer: str  # the bot's opening words, prepended to the answer before parsing
    caption: str          # {article}, {past}, {pos}
    past_first: str       # {pos}, {caption}
    past_next: str        # {pos}, {caption}
    past_end: str         # replaces the trailing separator of the last past caption
    select: str           # {context} (text with <ImageHere> for earlier chosen images), {options}
    option: str           # {letter}
    paragraph: str        # {title}: the article prompt; the bot's text so far follows it


ZH = Prompts(
    article=" <|User|>:根据给定标题写一个图文并茂，不重复的文章：{title}\n{eoh} <|Bot|>:",
    spotting=" <|User|>:给定文章\"{article}\" 根据上述文章，选择适合插入图像的{n}行 \n{eoh} <|Bot|>:适合插入图像的行是",
    spotting_answer="适合插入图像的行是",
    caption=" <|User|>: 给定文章\"{article}\" {past}给出适合在<Seg{pos}>后插入的图像对应的标题。 \n{eoh} <|Bot|>: 标题是\"",
    past_first="现在<Seg{pos}>后插入图像对应的标题是\"{caption}\"， ",
    past_next="<Seg{pos}>后插入图像对应的标题是\"{caption}\"， ",
    past_end="。",
    select=" <|User|>:根据给定上下文和候选图像，选择合适的配图：{context}\n\n候选图像包括: {options}\n\n{eoh} <|Bot|>:最合适的图是",
    option="{letter}.<ImageHere>",
    paragraph=" <|User|>:根据给定标题写一个图文并茂，不重复的文章：{title}\n{eoh} <|Bot|>:",
)

EN = Prompts(
    article=" <|User|>:Write an illustrated, non-repetitive article with the given title: {title}\n{eoh} <|Bot|>:",
    spotting=" <|User|>:Given the article \"{article}\", choose the {n} lines of the article above where an image "
             "fits best. \n{eoh} <|Bot|>:The lines where an image fits are ",
    spotting_answer="The lines where an image fits are ",
    caption=" <|User|>: Given the article \"{article}\" {past}give the caption of an image that fits after "
            "<Seg{pos}>. \n{eoh} <|Bot|>: The caption is \"",
    past_first="The image inserted after <Seg{pos}> has the caption \"{caption}\", ",
    past_next="the image inserted after <Seg{pos}> has the caption \"{caption}\", ",
    past_end=". ",
    select=" <|User|>:Choose the image that fits the given context best among the candidates: {context}\n\n"
           "The candidate images are: {options}\n\n{eoh} <|Bot|>:The best image is ",
    option="{letter}.<ImageHere>",
    paragraph=" <|User|>:Write an illustrated, non-repetitive article with the given title: {title}\n{eoh} <|Bot|>:",
)

PROMPTS = {"zh": ZH, "en": EN}
LETTERS = "ABCD"


def prompts_for(lang: str) -> Prompts:
    if lang not in PROMPTS:
        raise ValueError(f"unknown prompt language {lang!r}: use one of {sorted(PROMPTS)}")
    return PROMPTS[lang]


def past_captions(p: Prompts, captions: list[tuple[int, str]]) -> str:
    """Upstream's running list of the captions chosen so far, ended with `past_end`."""
    if not captions:
        return ""
    text = "".join((p.past_first if i == 0 else p.past_next).format(pos=pos, caption=cap)
                   for i, (pos, cap) in enumerate(captions))
    return text[:-2] + p.past_end  # drop the last "， " (or ", ") separator


# Upstream's generation settings per step (web_demo.py defaults)
ARTICLE_GEN = dict(num_beams=5, do_sample=False, repetition_penalty=5.0, max_new_tokens=1000)
SPOTTING_GEN = dict(num_beams=5, do_sample=False, repetition_penalty=1.0, max_new_tokens=300)
CAPTION_GEN = dict(num_beams=1, do_sample=False, repetition_penalty=5.0, max_new_tokens=100)
SELECT_GEN = dict(num_beams=5, do_sample=False, repetition_penalty=1.0, max_new_tokens=10)

# -- paragraph edits -----------------------------------------------------------------------------
# kinds, in upstream's order ("rewrite", "expand", "abbreviate", "insert a paragraph before",
# "insert a paragraph after"); the two inserts need an outline from the user
EDIT_KINDS = ("rewrite", "expand", "abbreviate", "insert_before", "insert_after")
EDIT_NEEDS_INSTRUCTION = ("insert_before", "insert_after")

# upstream's edit instructions (gradio_demo_composition.py `paragraph_edit`): {text} the paragraph,
# {instruction} the user's material or outline, {first}/{second} the paragraphs around an insert
EDITS_ZH = {
    "expand": "扩写以下段落：{text}\n基于以下素材：{instruction}",
    "rewrite": "改写以下段落：{text}\n基于以下素材：{instruction}",
    "abbreviate": "缩写以下段落：{text}",
    "insert": "在以下两段中插入一段。\n第一段：{first}\n第二段：{second}\n插入段的大纲：{instruction}",
}
# our translation, for XComposer 1.0's English prompt set
EDITS_EN = {
    "expand": "Expand the following paragraph: {text}\nBased on the following material: {instruction}",
    "rewrite": "Rewrite the following paragraph: {text}\nBased on the following material: {instruction}",
    "abbreviate": "Shorten the following paragraph: {text}",
    "insert": "Insert a paragraph between the following two.\nFirst paragraph: {first}\nSecond paragraph: {second}\n"
              "Outline of the inserted paragraph: {instruction}",
}


def edit_request(edits: dict[str, str], kind: str, paragraphs: list[str], index: int, instruction: str) -> str:
    """The user text of an edit of paragraph `index` (upstream: an insert before the first paragraph,
    or after the last, has an empty neighbour)."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit {kind!r}: use one of {', '.join(EDIT_KINDS)}")
    text = paragraphs[index]
    if kind == "insert_before":
        before = paragraphs[index - 1] if index > 0 else ""
        return edits["insert"].format(first=before, second=text, instruction=instruction)
    if kind == "insert_after":
        after = paragraphs[index + 1] if index + 1 < len(paragraphs) else ""
        return edits["insert"].format(first=text, second=after, instruction=instruction)
    return edits[kind].format(text=text, instruction=instruction)


# -- the two styles ------------------------------------------------------------------------------
class XComposerStyle:
    """XComposer 1.0's composition prompts (a title; `<|User|>`/`<|Bot|>` turns with `{eoh}`)."""

    name = "xcomposer"
    references = False  # no reference images in upstream's 1.0 demo
    letters = LETTERS

    def __init__(self, lang: str, eoh: str):
        self.p, self.lang, self.eoh = prompts_for(lang), lang, eoh
        self.edits = EDITS_ZH if lang == "zh" else EDITS_EN
        self.gen = {"article": ARTICLE_GEN, "spotting": SPOTTING_GEN, "caption": CAPTION_GEN, "select": SELECT_GEN,
                    "edit": dict(ARTICLE_GEN, num_beams=1, do_sample=True, top_p=0.8, temperature=0.8,
                                 repetition_penalty=1.005, max_new_tokens=300)}

    def article(self, title: str, n_refs: int = 0, meta: bool = False) -> str:
        return self.p.article.format(title=title, eoh=self.eoh)

    def spotting(self, sections: str, n: int | None, n_refs: int = 0, meta: bool = False) -> tuple[str, str]:
        return (self.p.spotting.format(article=sections, n="" if n is None else n, eoh=self.eoh),
                self.p.spotting_answer)

    def caption(self, sections: str, before: list[tuple[int, str]], pos: int, meta: bool = False) -> str:
        return self.p.caption.format(article=sections, past=past_captions(self.p, before), pos=pos, eoh=self.eoh)

    def select(self, context: str, n: int, meta: bool = False) -> str:
        options = "\n".join(self.p.option.format(letter=ch) for ch in self.letters[:n])
        return self.p.select.format(context=context, options=options, eoh=self.eoh)

    def paragraph(self, title: str, meta: bool = False) -> str:
        return self.p.paragraph.format(title=title, eoh=self.eoh)

    def edit(self, request: str, meta: bool = False) -> str:
        """Ours for 1.0 (its demo has no paragraph edits): XComposer2's edit requests in a 1.0 turn."""
        return f" <|User|>:{request}\n{self.eoh} <|Bot|>:"


IM_START, IM_END = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"

# gradio_demo_composition.py's `meta_instruction` (not the chat one: no image sentence), used when
# its "With Meta" box is ticked (off by default); the trailing newline is upstream's
XCOMPOSER2_COMPOSE_META = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文.\n"
)

# upstream's sampling for every step (`generate`, `generate_with_emb`, the streaming article and edits,
# the selections): top-p 0.8, top-k 40, temperature 1.0, repetition penalty 1.005; one beam (its
# streaming article ignores the beam slider)
_SAMPLE2 = dict(do_sample=True, num_beams=1, temperature=1.0, top_p=0.8, top_k=40, repetition_penalty=1.005,
                length_penalty=1.0)
ARTICLE2_GEN = dict(_SAMPLE2, max_new_tokens=4096)   # "Max output tokens" slider default
SPOTTING2_GEN = dict(_SAMPLE2, max_new_tokens=200)
CAPTION2_GEN = dict(_SAMPLE2, max_new_tokens=200)
SELECT2_GEN = dict(_SAMPLE2, max_new_tokens=10)
EDIT2_GEN = dict(_SAMPLE2, max_length=500)           # upstream: max_length=500 - prompt tokens new ones
SEED2 = 8909                                         # the demo's "Random Seed" default


class XComposer2Style:
    """internlm-xcomposer2-7b's composition prompts: `text2instruction` turns (an optional system turn
    with `XCOMPOSER2_COMPOSE_META`), the user's instruction as is, reference images as `<image>` slots
    before it, up to 10 candidates lettered A.. (reference images), upstream's paragraph edits."""

    name = "xcomposer2"
    references = True
    letters = "ABCDEFGHIJ"  # upstream caps reference images at 10
    lang = "zh"
    edits = EDITS_ZH
    gen = {"article": ARTICLE2_GEN, "spotting": SPOTTING2_GEN, "caption": CAPTION2_GEN, "select": SELECT2_GEN,
           "edit": EDIT2_GEN}
    # which steps upstream tokenizes as input_ids (the repetition penalty then counts the prompt's
    # text) rather than embeddings (only new tokens count): spotting without references and captions
    penalize_prompt = {"spotting": True, "caption": True}

    def __init__(self, lang: str = "zh"):
        if lang != "zh":
            raise ValueError(f"lang={lang!r}: XComposer2's composition prompts are upstream's Chinese ones (lang='zh'); "
                             f"the instruction itself may be written in any language")

    @staticmethod
    def turn(text: str, meta: bool = False) -> str:
        """Upstream's `text2instruction`."""
        system = f"{IM_START}system\n{XCOMPOSER2_COMPOSE_META}{IM_END}\n" if meta else ""
        return f"{system}{IM_START}user\n{text}{IM_END}\n{IM_START}assistant\n"

    def article(self, instruction: str, n_refs: int = 0, meta: bool = False) -> str:
        return self.turn(("<ImageHere> " * n_refs).strip() + instruction, meta)

    def spotting(self, sections: str, n: int | None, n_refs: int = 0, meta: bool = False) -> tuple[str, str]:
        answer = "适合插入图像的行是"
        text = "<ImageHere> " * n_refs + f'给定文章"{sections}" 根据上述文章，选择适合插入图像的{"" if n is None else n}行'
        return self.turn(text, meta) + answer, answer

    def caption(self, sections: str, before: list[tuple[int, str]], pos: int, meta: bool = False) -> str:
        past = past_captions(ZH, before)
        return self.turn(f'给定文章"{sections}" {past}给出适合在<Seg{pos}>后插入的图像对应的标题。', meta) + '标题是"'

    def select(self, context: str, n: int, meta: bool = False) -> str:
        options = "\n".join(f"{ch}.<ImageHere>" for ch in self.letters[:n])
        return self.turn(f"根据给定上下文和候选图像，选择合适的配图：{context}候选图像包括: {options}", meta) + "最合适的图是"

    def paragraph(self, instruction: str, meta: bool = False) -> str:
        return self.article(instruction, 0, meta)

    def edit(self, request: str, meta: bool = False) -> str:
        return self.turn(request, meta)


# InternLM-XComposer's gradio_demo/gradio_demo_composition.py (the 2.5 demo at the repository root):
# the caption step's system text and its one-shot example (`caption_meta_instruction`,
# `text2instruction_caption`), the UI's defaults (1 image, seed 1234, up to 8192 tokens)
CAPTION25_META = "请严格按照示例的<input> <output>格式，根据给定的文章，给出适合在某一段后插入的图像对应的标题。"
CAPTION25_EXAMPLE = (
    '<input>\n给定文章"<Seg0> 大多数的车友们在选车、购车时都会格外关注续航\n<Seg1> 甚至还有要求电动滑板车跑一百公里的\n'
    '<Seg2> 但这真的是你所需要的吗?\n<Seg3> 据报告，一线城市上班族通勤半径均在10公里以内\n'
    '<Seg4> 所以大多数通勤出行RND的续航完全可以满足\n<Seg5> 可能会有人说，续航短导致一天一充或两充很麻烦\n" '
    '给出适合在<Seg4>后插入的图像对应的标题。</input>\n<output>\n标题是"一个人正站在充电桩前给电动滑板车充电，面容看上去有些疲惫"'
    '</output>\n'
)
ARTICLE25_GEN = dict(_SAMPLE2, max_new_tokens=8192)
SEED25 = 1234


class XComposer2d5Style(XComposer2Style):
    """internlm-xcomposer2d5-7b's composition: XComposer2's steps and prompts, every step with the write
    LoRAs (the model's `composition_task_loras`), the caption step as a one-shot `<input>/<output>`
    turn under its own system text, the caption read up to the last quote, up to 8192 tokens."""

    name = "xcomposer2d5"
    gen = {**XComposer2Style.gen, "article": ARTICLE25_GEN}
    caption_quote = "last"

    def caption(self, sections: str, before: list[tuple[int, str]], pos: int, meta: bool = False) -> str:
        past = past_captions(ZH, before)
        inst = f'给定文章"{sections}" {past}给出适合在<Seg{pos}>后插入的图像对应的标题。'
        return (f"{IM_START}system\n{CAPTION25_META}{IM_END}\n{IM_START}user\n{CAPTION25_EXAMPLE}<input>\n{inst}"
                f"</input><output>{IM_END}\n{IM_START}assistant\n标题是\"")


def style_for(model: Any, lang: str = "zh"):
    """The prompt style of `model`'s generation, from its `composition_style` attribute ("xcomposer2"
    on XComposer2, "xcomposer2d5" on XComposer2.5; XComposer 1.0 otherwise)."""
    style = getattr(model, "composition_style", "xcomposer")
    if style == "xcomposer2d5":
        return XComposer2d5Style(lang)
    if style == "xcomposer2":
        return XComposer2Style(lang)
    return XComposerStyle(lang, model.tokenizer.eoh)


__all__ = ["Prompts", "ZH", "EN", "PROMPTS", "LETTERS", "prompts_for", "past_captions", "ARTICLE_GEN",
           "SPOTTING_GEN", "CAPTION_GEN", "SELECT_GEN", "EDIT_KINDS", "EDIT_NEEDS_INSTRUCTION", "EDITS_ZH", "EDITS_EN",
           "edit_request", "XComposerStyle", "XComposer2Style", "XCOMPOSER2_COMPOSE_META", "ARTICLE2_GEN",
           "SPOTTING2_GEN", "CAPTION2_GEN", "SELECT2_GEN", "EDIT2_GEN", "SEED2", "style_for", "XComposer2d5Style",
           "CAPTION25_META", "CAPTION25_EXAMPLE", "ARTICLE25_GEN", "SEED25"]

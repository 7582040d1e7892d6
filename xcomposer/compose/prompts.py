"""The composition prompts, per step, in Chinese (upstream's) and English (ours).

The Chinese strings are upstream's, read from InternLM-XComposer-1.0/examples/web_demo.py
(`generate_text`, `generate_loc`, `generate_cap`, `generate_insert_cap`, `model_select_image`);
docs/composition.md lists them with their sources. XComposer was trained on those instructions
and upstream uses them for English titles too, so "zh" is the default; the English set is our
translation, for users who prefer English instructions. `{eoh}` is filled from the tokenizer.
Every prompt ends inside the bot's turn, so the model continues the answer's opening words.
"""
from __future__ import annotations

from dataclasses import dataclass


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

__all__ = ["Prompts", "ZH", "EN", "PROMPTS", "LETTERS", "prompts_for", "past_captions", "ARTICLE_GEN",
           "SPOTTING_GEN", "CAPTION_GEN", "SELECT_GEN"]

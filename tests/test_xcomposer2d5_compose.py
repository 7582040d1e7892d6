"""Composition on XComposer2.5: upstream's root gradio_demo/gradio_demo_composition.py steps (XComposer2's
prompts, every step with infer_mode='write', the one-shot caption turn, the caption read up to its
last quote, R560_HD18_Identity_transform for the pictures), written out here on their own."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from test_xcomposer2_compose import Recorder, library, photos  # noqa: F401  (fixtures)
from test_xcomposer2d5 import ckpt, model  # noqa: F401  (fixtures)
from vl_util import Capture
from xcomposer.compose.parse import parse_caption
from xcomposer.compose.pipeline import Composer
from xcomposer.compose.prompts import XComposer2d5Style
from xcomposer.models.xcomposer2d5 import composition_tile

S, E = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
CAPTION_META = "请严格按照示例的<input> <output>格式，根据给定的文章，给出适合在某一段后插入的图像对应的标题。"
EXAMPLE = ('<input>\n给定文章"<Seg0> 大多数的车友们在选车、购车时都会格外关注续航\n<Seg1> 甚至还有要求电动滑板车跑一百公里的\n'
           '<Seg2> 但这真的是你所需要的吗?\n<Seg3> 据报告，一线城市上班族通勤半径均在10公里以内\n'
           '<Seg4> 所以大多数通勤出行RND的续航完全可以满足\n<Seg5> 可能会有人说，续航短导致一天一充或两充很麻烦\n" '
           '给出适合在<Seg4>后插入的图像对应的标题。</input>\n<output>\n标题是"一个人正站在充电桩前给电动滑板车充电，面容看上去'
           '有些疲惫"</output>\n')


def text2instruction_caption(inst: str) -> str:
    return (f"{S}system\n{CAPTION_META}{E}\n{S}user\n{EXAMPLE}<input>\n{inst}</input><output>{E}\n{S}assistant\n"
            f'标题是"')


def r560_hd18(img):
    """The demo's R560_HD18_Identity_transform, written out (its random scale has equal bounds)."""
    w, h = img.size
    trans = w < h
    if trans:
        img = img.transpose(Image.TRANSPOSE)
        w, h = img.size
    ratio = w / h
    scale = 1
    while scale * np.ceil(scale / ratio) <= 18:
        scale += 1
    scale -= 1
    scale = int(min(np.ceil(w * 1.5 / 560), scale))
    new_w = int(scale * 560)
    new_h = int(new_w / ratio)
    img = TF.resize(img, [new_h, new_w])
    tar = int(np.ceil(new_h / 560) * 560)
    top = int((tar - new_h) / 2)
    img = TF.pad(img, [0, top, 0, tar - new_h - top], fill=[255, 255, 255])
    return img.transpose(Image.TRANSPOSE) if trans else img


@pytest.mark.parametrize("size", [(900, 500), (500, 900), (300, 300), (2000, 400)])
def test_composition_tile_is_the_demos(size):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    got, want = composition_tile(img), r560_hd18(img)
    assert got.size == want.size and got.size[0] % 560 == 0 and got.size[1] % 560 == 0
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_caption_prompt_quote_and_write_loras(model, library):  # noqa: F811
    paras = ["第一段文字", "第二段文字", "第三段文字"]
    rec = Recorder(model)
    composer = Composer(rec, library)
    assert isinstance(composer.style, XComposer2d5Style) and composer.style.gen["article"]["max_new_tokens"] == 8192
    from xcomposer.compose import Article
    article = Article(title="t", paragraphs=list(paras), meta={"style": "xcomposer2d5"})
    cap = Capture(model.llm)
    try:
        positions = composer.spot(article, 1)
        list(composer.caption_iter(article, positions))
    finally:
        cap.close()
    po = positions[0]
    full = "".join(f"<Seg{i}> {p}\n" for i, p in enumerate(paras[:po + 2]))
    want = text2instruction_caption(f'给定文章"{full}" 给出适合在<Seg{po}>后插入的图像对应的标题。')
    assert rec.calls[-1][0] == want
    prefills = [c for c in cap.calls if "inputs_embeds" in c]  # decode steps pass input_ids
    emb = model.llm.model.embed_tokens.weight
    ids = model.tokenizer.encode(want, add_bos=True)
    torch.testing.assert_close(prefills[-1]["inputs_embeds"][0], emb[torch.tensor(ids)], rtol=0, atol=0)
    assert all(c["task_loras"] == ("sft", "dpo") for c in cap.calls)  # every step, every token: write mode
    assert parse_caption('一个"好"人"</output>', last_quote=True) == ('一个"好"人', None)
    assert parse_caption('一个"好"人"</output>') == ("一个", None)
    assert parse_caption("no quote", last_quote=True)[0] == ""


def test_compose_runs_on_2_5(model, library):  # noqa: F811
    article = model.compose("写一篇关于茶的短文", num_images=1, library=library, seed=3, max_new_tokens=40)
    assert article.meta["style"] == "xcomposer2d5" and article.paragraphs
    assert len(article.slots) <= 1
    picked = [s for s in article.slots if s.candidates]
    for slot in picked:  # candidates went through the demo's tiling
        pic = Image.open(slot.candidates[0].path).convert("RGB")
        cols, rows = composition_tile(pic).size
        assert cols % 560 == 0 and rows % 560 == 0 and math.isfinite(cols)

"""Composition on XComposer2 (internlm-xcomposer2-7b's prompts) with a tiny upstream-layout checkpoint
and a tiny open_clip library: the exact decoder inputs of every step, written out here from upstream's
InternLM-XComposer-2.0/examples/gradio_demo_composition.py (`text2instruction`, `generate_article`,
`generate_loc`, `generate_cap`, `model_select_image`, `model_select_imagebase`, `paragraph_edit`,
`interleav_wrap`), its generation settings and stops, reference images, the edits, the CLI, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_xcomposer2 import Capture, _raw, _reference_image_tokens
from vision.image import ImageError
from xcomposer import XComposer
from xcomposer.compose import Article
from xcomposer.compose.article import ImageSlot
from xcomposer.compose.library import ImageLibrary
from xcomposer.compose.pipeline import Composer
from xcomposer.models.xcomposer2 import XComposer2, composition_stop_ids
from xcomposer.tiny import write_tiny_clip, write_tiny_xcomposer, write_tiny_xcomposer2

S, E = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
# gradio_demo_composition.py's meta_instruction, written out on its own (trailing newline included)
COMPOSE_META = ("You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
                "- InternLM-XComposer (浦语·灵笔) is a conversational language model that is developed by "
                "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
                "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen "
                "by the user such as English and 中文.\n")
UPSTREAM_SAMPLING = dict(do_sample=True, num_beams=1, temperature=1.0, top_p=0.8, top_k=40,
                         repetition_penalty=1.005)


def text2instruction(text: str, withmeta: bool = False) -> str:
    if withmeta:
        return f"{S}system\n{COMPOSE_META}{E}\n{S}user\n{text}{E}\n{S}assistant\n"
    return f"{S}user\n{text}{E}\n{S}assistant\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_xcomposer2(tmp_path_factory.mktemp("xc2c") / "ckpt")


@pytest.fixture(scope="module")
def model(ckpt):
    return XComposer2.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def raw(ckpt):
    return _raw(ckpt)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    out = []
    for i in range(7):
        p = root / f"p{i}.png"
        Image.fromarray(rng.integers(0, 256, (24 + i, 32, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def library(tmp_path_factory, photos) -> ImageLibrary:
    root = tmp_path_factory.mktemp("lib")
    name, cfg, weights = write_tiny_clip(root / "clip")
    return ImageLibrary.build(photos[0].parent, root / "index", model=name, pretrained=str(weights),
                              model_config=str(cfg))


class Recorder:
    """The real model, with every composition call's prompt, images and options noted."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.tokenizer, self.source, self.composition_style = model.tokenizer, "recorded", model.composition_style

    def complete(self, prompt, image=None, **gen):
        self.calls.append((prompt, list(image or []), gen))
        return self.model.complete(prompt, image=image, **gen)

    def stream_complete(self, prompt, image=None, **gen):
        self.calls.append((prompt, list(image or []), gen))
        return self.model.stream_complete(prompt, image=image, **gen)


def upstream_wrap(model, raw, text: str, images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream composition's `interleav_wrap`: split at `<image>`, each non-empty part tokenized on its
    own, `<s>` only on the first one; image tokens from transformers' CLIP + the projector by hand."""
    tok = model.tokenizer
    emb = raw["model.tok_embeddings.weight"]
    parts = text.split("<image>")
    assert len(parts) - 1 == len(images)
    xs, ms, need_bos = [], [], True
    for k, part in enumerate(parts):
        if part:
            ids = tok.encode(part, add_bos=need_bos)
            need_bos = False
            xs.append(emb[torch.tensor(ids)])
            ms.append(torch.zeros(len(ids), dtype=torch.bool))
        if k < len(images):
            img = _reference_image_tokens(raw, Image.open(images[k]).convert("RGB"))
            xs.append(img)
            ms.append(torch.ones(img.shape[0], dtype=torch.bool))
    return torch.cat(xs), torch.cat(ms)


def prefills(cap: Capture) -> list[dict]:
    """The first decoder call of each generation (its prompt); decode steps feed one token."""
    return [c for c in cap.calls if c.get("inputs_embeds") is not None and c["inputs_embeds"].shape[1] > 1]


def assert_inputs(call: dict, x: torch.Tensor, m: torch.Tensor) -> None:
    torch.testing.assert_close(call["inputs_embeds"][0], x, rtol=1e-5, atol=1e-5)
    got = call.get("image_mask")
    if m.any():
        assert torch.equal(got[0], m)
    else:
        assert got is None or not bool(got.any())


def check_selections(model, raw, article, calls, candidates_of) -> int:
    """Walk the article as upstream's selection loops do: for each slot, the text since the last one
    joins `pre_text_list`, and the prompt shows the images chosen so far, then the candidates
    (`candidates_of(slot, placed)`), lettered A..; returns how many prompts were checked."""
    pre_text, pre_img, pre_text_list, k = "", [], [], 0
    for i, p in enumerate(article.paragraphs):
        pre_text += p + "\n"
        slot = article.slot_at(i)
        if slot is None:
            continue
        pre_text_list.append(pre_text)
        pre_text = ""
        cands = candidates_of(slot, pre_img)
        if len(cands) > 1:
            text = ("根据给定上下文和候选图像，选择合适的配图：" + "<image>".join(pre_text_list) + "候选图像包括: "
                    + "\n".join(chr(ord("A") + j) + ".<image>" for j in range(len(cands))))
            assert_inputs(calls[k], *upstream_wrap(model, raw, text2instruction(text) + "最合适的图是", pre_img + cands))
            k += 1
        pre_img.append(article.chosen_image(i).path)
    return k


def _article(paragraphs: list[str]) -> Article:
    return Article(title="t", paragraphs=list(paragraphs), meta={"instruction": "写一篇关于海的文章"})


PARAS = ["海边的清晨。", "渔船出海了。", "午后的沙滩。", "傍晚的灯塔。"]


def test_article_prompt_plain_with_meta_and_references(model, raw, photos):
    composer = Composer(model)
    cap = Capture(model.llm)
    instruction = "根据以下标题：“海边”，创作长文章，字数不少于800字。"
    try:
        events = list(composer.run(instruction, num_images=0, max_new_tokens=8, seed=1))
        plain = prefills(cap)[0]
        cap.calls.clear()
        list(composer.run(instruction, num_images=0, with_meta=True, max_new_tokens=8, seed=1))
        meta = prefills(cap)[0]
        cap.calls.clear()
        list(composer.run(instruction, num_images=0, images=[photos[0], photos[1]], max_new_tokens=8, seed=1))
        refs = prefills(cap)[0]
    finally:
        cap.close()
    article = events[-1].article
    assert article.meta["instruction"] == instruction and article.meta["style"] == "xcomposer2"
    assert article.title == instruction  # short enough to be its own title
    x, m = upstream_wrap(model, raw, text2instruction(instruction), [])
    assert_inputs(plain, x, m)
    assert plain["inputs_embeds"].shape[1] == len(model.tokenizer.encode(text2instruction(instruction), add_bos=True))
    x, m = upstream_wrap(model, raw, text2instruction(instruction, withmeta=True), [])
    assert_inputs(meta, x, m)
    # upstream: instruction = ('<image> ' * n).strip() + instruction
    text = text2instruction(("<image> " * 2).strip() + instruction)
    x, m = upstream_wrap(model, raw, text, photos[:2])
    assert_inputs(refs, x, m)
    assert int(m.sum()) == 2 * model.config.tokens_per_image


def test_generation_settings_and_stops_are_upstreams(model, library):
    rec = Recorder(model)
    composer = Composer(rec, library)
    events = list(composer.run("写一篇关于春天的文章", num_images=2, seed=5, max_new_tokens=30))
    article = events[-1].article
    article_opts = rec.calls[0][2]
    assert {k: article_opts[k] for k in UPSTREAM_SAMPLING} == UPSTREAM_SAMPLING
    assert article_opts["max_new_tokens"] == 30 and article_opts["seed"] == 5
    assert composer.style.gen["article"]["max_new_tokens"] == 4096  # upstream's slider default
    spot = next(g for p, _, g in rec.calls if p.endswith("适合插入图像的行是"))
    assert {k: spot[k] for k in UPSTREAM_SAMPLING} == UPSTREAM_SAMPLING and spot["max_new_tokens"] == 200
    assert spot["penalize_prompt"] is True and spot["seed"] == 5  # upstream sends it as input_ids
    caps = [g for p, _, g in rec.calls if p.endswith('标题是"')]
    assert len(caps) == len(article.slots) and all(g["max_new_tokens"] == 200 and g["penalize_prompt"] for g in caps)
    for _, _, g in (c for c in rec.calls if c[0].endswith("最合适的图是")):
        assert {k: g[k] for k in UPSTREAM_SAMPLING} == UPSTREAM_SAMPLING and g["max_new_tokens"] == 10
        assert "penalize_prompt" not in g  # embeddings: only new tokens count
    tok = model.tokenizer
    stops = composition_stop_ids(tok)
    assert stops == [tok.eos_token_id, tok.token_to_id(E), tok.token_to_id("[UNUSED_TOKEN_0]")]
    assert len(set(stops)) == 3


def test_full_size_vocabulary_stops_on_upstreams_id():
    """Test double for the rare branch: a 92544-entry vocabulary without a piece named [UNUSED_TOKEN_0]
    stops on upstream's literal id 92397."""
    class NamelessVocab:
        eos_token_id, vocab_size = 2, 92544

        def token_to_id(self, name):
            return {E: 92542}.get(name)

    assert composition_stop_ids(NamelessVocab()) == [2, 92542, 92397]


def test_spotting_caption_and_selection_inputs(model, raw, library):
    composer = Composer(model, library)
    article = _article(PARAS)
    sections = "".join(f"<Seg{i}> {p}\n" for i, p in enumerate(PARAS))
    cap = Capture(model.llm)
    try:
        positions = composer.spot(article, 2)
        spot_call = prefills(cap)[0]
        cap.calls.clear()
        captions = list(composer.caption_iter(article, positions))
        cap_calls = prefills(cap)
        cap.calls.clear()
        for s in article.slots:
            composer.retrieve(article, s.paragraph)
        for s in article.slots:
            composer.select(article, s.paragraph)
        sel_calls = prefills(cap)
    finally:
        cap.close()
    text = text2instruction(f'给定文章"{sections}" 根据上述文章，选择适合插入图像的2行') + "适合插入图像的行是"
    assert_inputs(spot_call, *upstream_wrap(model, raw, text, []))
    assert len(positions) == 2 and len(cap_calls) == 2
    assert captions == [article.slot_at(po).caption for po in positions]
    pasts = ""
    for idx, (po, call) in enumerate(zip(positions, cap_calls)):
        past = pasts[:-2] + "。" if idx > 0 else pasts
        full = "".join(f"<Seg{i}> {p}\n" for i, p in enumerate(PARAS[:po + 2]))
        text = text2instruction(f'给定文章"{full}" {past}给出适合在<Seg{po}>后插入的图像对应的标题。') + '标题是"'
        assert_inputs(call, *upstream_wrap(model, raw, text, []))
        c = article.slot_at(po).caption
        pasts = (f'现在<Seg{po}>后插入图像对应的标题是"{c}"， ' if idx == 0
                 else pasts + f'<Seg{po}>后插入图像对应的标题是"{c}"， ')
    # model_select_image: the text so far, an <image> after each earlier chosen one, then the candidates
    asked = [s for s in article.slots if len(s.candidates) > 1]
    assert len(sel_calls) == len(asked) > 0
    check_selections(model, raw, article, sel_calls, lambda slot, placed: [c.path for c in slot.candidates])


def test_reference_images_fill_the_spots(model, raw, photos, library):
    refs = [str(p) for p in photos[:3]]
    rec = Recorder(model)
    composer = Composer(rec, library)
    article = _article(PARAS)
    article.meta["references"] = refs
    sections = "".join(f"<Seg{i}> {p}\n" for i, p in enumerate(PARAS))
    cap = Capture(model.llm)
    try:
        positions = composer.spot(article, 3, refs)
        spot_call = prefills(cap)[0]
        cap.calls.clear()
        for p in positions:
            composer.place_reference(article, p, refs)
        sel_calls = prefills(cap)
    finally:
        cap.close()
    # generate_loc with upimages: '<image> ' * n before the request, the images in the prompt
    text = text2instruction("<image> " * 3 + f'给定文章"{sections}" 根据上述文章，选择适合插入图像的3行') + "适合插入图像的行是"
    assert_inputs(spot_call, *upstream_wrap(model, raw, text, refs))
    assert "penalize_prompt" not in rec.calls[0][2]  # sent as embeddings upstream
    chosen = [article.chosen_image(p).path for p in positions]
    assert sorted(chosen) == sorted(refs)  # each reference once, no library image
    assert [len(article.slot_at(p).candidates) for p in positions] == [3, 2, 1]
    assert article.slot_at(positions[-1]).chosen_by == "first"  # one left: taken without asking
    assert all(article.slot_at(p).caption == "" for p in positions)  # upstream writes no captions here
    # model_select_imagebase: candidates are the references not placed yet, lettered A..
    asked = check_selections(model, raw, article, sel_calls, lambda slot, placed: [r for r in refs if r not in placed])
    assert asked == len(sel_calls) == 2


def test_run_with_references_skips_captions_and_library(model, photos, library, tmp_path):
    rec = Recorder(model)
    refs = [str(p) for p in photos[:2]]
    events = list(Composer(rec, library).run("写一篇关于海的文章", images=refs, max_new_tokens=40, seed=2))
    article = events[-1].article
    assert not [c for c in rec.calls if c[0].endswith('标题是"')]
    stages = {e.stage for e in events if e.kind == "stage"}
    assert "captions" not in stages and "retrieval" not in stages
    placed = [article.chosen_image(s.paragraph).path for s in article.slots]
    assert set(placed) <= set(refs) and len(placed) == min(2, len(article.paragraphs))
    assert article.meta["references"] == refs
    out = article.save(tmp_path / "a")
    assert len(list((out / "images").iterdir())) == len(placed)
    assert Article.load(out).to_dict() == article.to_dict()


@pytest.mark.parametrize("kind", ["rewrite", "expand", "abbreviate", "insert_before", "insert_after"])
def test_edit_prompts_are_upstreams(model, raw, kind):
    composer = Composer(model)
    article = _article(PARAS)
    inst = "加入海鸥" if kind != "abbreviate" else ""
    i = 1
    upstream = {
        "expand": f"扩写以下段落：{PARAS[i]}\n基于以下素材：{inst}",
        "rewrite": f"改写以下段落：{PARAS[i]}\n基于以下素材：{inst}",
        "abbreviate": f"缩写以下段落：{PARAS[i]}",
        "insert_before": f"在以下两段中插入一段。\n第一段：{PARAS[i - 1]}\n第二段：{PARAS[i]}\n插入段的大纲：{inst}",
        "insert_after": f"在以下两段中插入一段。\n第一段：{PARAS[i]}\n第二段：{PARAS[i + 1]}\n插入段的大纲：{inst}",
    }[kind]
    cap = Capture(model.llm)
    try:
        text = composer.propose_edit(article, i, kind, inst, seed=3)
        call = prefills(cap)[0]
    finally:
        cap.close()
    x, m = upstream_wrap(model, raw, text2instruction(upstream), [])
    assert_inputs(call, x, m)
    assert isinstance(text, str) and text and article.paragraphs == PARAS  # nothing applied yet
    # upstream: max_length = 500 - prompt tokens, sampled as every step
    _, _, _, cfg = model._completion(text2instruction(upstream), None, composer._opts("edit", article))
    assert cfg.max_new_tokens == 500 - x.shape[0] and (cfg.top_k, cfg.top_p, cfg.do_sample) == (40, 0.8, True)


def test_apply_edit_moves_images_with_their_paragraphs(model):
    composer = Composer(model)
    article = _article(PARAS)
    article.slots = [ImageSlot(paragraph=1, caption="a"), ImageSlot(paragraph=2, caption="b")]
    assert composer.apply_edit(article, 1, "insert_after", "新段\n第二行") == 2
    assert article.paragraphs[2] == "新段 第二行"  # upstream joins the lines
    assert [s.paragraph for s in article.slots] == [1, 3]  # the image stays after the paragraph it followed
    assert composer.apply_edit(article, 1, "insert_before", "前段") == 1
    assert [s.paragraph for s in article.slots] == [2, 4] and article.paragraphs[1] == "前段"
    assert composer.apply_edit(article, 0, "rewrite", "新的清晨。") == 0 and article.paragraphs[0] == "新的清晨。"
    assert composer.apply_edit(article, 2, "abbreviate", "") is None  # empty: the paragraph goes, its image too
    assert [s.paragraph for s in article.slots] == [3] and "渔船出海了。" not in article.paragraphs
    with pytest.raises(ValueError, match="nothing to insert"):
        composer.apply_edit(article, 0, "insert_before", " \n")
    with pytest.raises(ValueError, match="needs an instruction"):
        composer.propose_edit(article, 0, "insert_after", "  ")
    with pytest.raises(ValueError, match="unknown edit"):
        composer.propose_edit(article, 0, "translate")
    with pytest.raises(IndexError):
        composer.propose_edit(article, 99, "rewrite")
    with pytest.raises(ValueError, match="surrogate"):
        composer.propose_edit(article, 0, "expand", "\ud800")
    one = _article(["只有一段。"])
    with pytest.raises(ValueError, match="only paragraph"):
        composer.apply_edit(one, 0, "rewrite", "")


def test_bad_input_is_named(model, photos, tmp_path):
    composer = Composer(model)
    with pytest.raises(ValueError, match="instruction is empty"):
        list(composer.run("  "))
    with pytest.raises(ValueError, match="<ImageHere>"):
        list(composer.run("写<ImageHere>文章"))
    with pytest.raises(ValueError, match="at most 10"):
        list(composer.run("写文章", images=[photos[0]] * 11))
    with pytest.raises(FileNotFoundError, match="reference image 2"):
        list(composer.run("写文章", images=[photos[0], tmp_path / "missing.png"]))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError):
        list(composer.run("写文章", images=[photos[0], bad]))
    with pytest.raises(ValueError, match="lang='zh'"):
        Composer(model, lang="en")
    with pytest.raises(ValueError, match="seed"):
        list(composer.run("写文章", seed=1.5))
    article = [e for e in composer.run("写文章", num_images=0, max_new_tokens=4)][-1].article  # still serving
    assert article.paragraphs


def test_xcomposer_1_refuses_reference_images(tmp_path, photos):
    v1 = XComposer.from_pretrained(write_tiny_xcomposer(tmp_path / "v1"))
    with pytest.raises(ValueError, match="reference images need XComposer2"):
        list(Composer(v1).run("海边", images=[photos[0]]))


def test_model_compose_and_cli(ckpt, model, library, photos, tmp_path):
    article = model.compose("写一篇关于海的文章", num_images=1, library=library, max_new_tokens=30, seed=4)
    assert article.meta["style"] == "xcomposer2" and len(article.slots) <= 1
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "xcomposer", "compose", "写一篇关于海的文章", "--folder", str(ckpt),
                        "--out", str(out), "--image", str(photos[0]), "--image", str(photos[1]),
                        "--max-new-tokens", "30", "--seed", "7", "--with-meta"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "article.json").read_text(encoding="utf-8"))
    assert saved["meta"]["with_meta"] is True and saved["meta"]["seed"] == 7
    assert saved["meta"]["references"] == [str(photos[0]), str(photos[1])]
    assert "wrote" in r.stderr
    r = subprocess.run([sys.executable, "-m", "xcomposer", "compose", "写文章", "--folder", str(ckpt),
                        "--out", str(tmp_path / "x"), "--image", str(tmp_path / "nope.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "reference image 1" in r.stderr and "Traceback" not in r.stderr

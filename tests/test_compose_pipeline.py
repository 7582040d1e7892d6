"""The composition pipeline end to end on the tiny XComposer and a tiny open_clip library, plus the
exact prompts it sends (recorded around the real model) and the parse-success branches (driven by a
scripted stand-in for the model's answers)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xcomposer import XComposer
from xcomposer.compose import Article
from xcomposer.compose.pipeline import Composer
from xcomposer.compose.prompts import ZH
from xcomposer.compose.library import ImageLibrary
from xcomposer.tiny import write_tiny_clip, write_tiny_xcomposer

GEN = dict(max_new_tokens=60, num_beams=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> XComposer:
    return XComposer.from_pretrained(write_tiny_xcomposer(tmp_path_factory.mktemp("xc")))


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> ImageLibrary:
    root = tmp_path_factory.mktemp("lib")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (24 + i, 32, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    name, cfg, weights = write_tiny_clip(root / "clip")
    return ImageLibrary.build(photos, root / "index", model=name, pretrained=str(weights), model_config=str(cfg))


class Recorder:
    """Wraps the real model and records every prompt the pipeline sends (the answers stay real)."""

    def __init__(self, model):
        self.model, self.prompts = model, []
        self.tokenizer, self.source = model.tokenizer, "recorded"

    def complete(self, prompt, image=None, **gen):
        self.prompts.append((prompt, list(image or [])))
        return self.model.complete(prompt, image=image, **{**gen, "max_new_tokens": min(gen["max_new_tokens"], 20)})

    def stream_complete(self, prompt, image=None, **gen):
        self.prompts.append((prompt, list(image or [])))
        return self.model.stream_complete(prompt, image=image, **gen)


class ScriptedAnswers(Recorder):
    """Test double: returns well-formed answers, to drive the branches where parsing succeeds."""

    def complete(self, prompt, image=None, **gen):
        self.prompts.append((prompt, list(image or [])))
        if "适合插入图像的行是" in prompt:
            return "<Seg2>,<Seg0>,<Seg2>,<Seg9>"  # a duplicate and an out-of-range index
        if "标题是" in prompt:
            return f'caption {len(self.prompts)}" and more'
        return " B"

    def stream_complete(self, prompt, image=None, **gen):
        self.prompts.append((prompt, list(image or [])))
        yield from ["第一段，海风。\n\n", "第二段：沙滩。\n", "  \n第三段，灯塔。\n", "第四段。"]


def test_full_pipeline_on_tiny_model(model, library, tmp_path):
    pieces, stages = [], []
    article = model.compose("山间小路", num_images=2, library=library, on_text=pieces.append,
                            progress=lambda s, d, t: stages.append((s, d, t)), **GEN)
    assert isinstance(article, Article) and article.paragraphs
    assert "".join(pieces).strip()  # the text streamed
    assert [s for s, _, _ in stages if s] and {s for s, _, _ in stages} >= {"text", "spotting", "captions"}
    placed = [s for s in article.slots if s.chosen is not None]
    assert len(placed) == min(2, len(article.paragraphs))
    if len(article.paragraphs) < 2:  # fewer images than asked: the article says why
        assert any("2 images were asked for" in f for f in article.fallbacks)
    for slot in article.slots:
        assert slot.caption and len(slot.candidates) <= 4
        assert all(Path(c.path).is_file() for c in slot.candidates)
    chosen = [article.chosen_image(s.paragraph).path for s in placed]
    assert len(set(chosen)) == len(chosen)  # no image used twice
    assert set(article.meta["timings"]) >= {"text", "spotting", "captions", "retrieval", "selection"}

    out = article.save(tmp_path / "article")
    md = (out / "article.md").read_text(encoding="utf-8")
    html = (out / "article.html").read_text(encoding="utf-8")
    links_md = re.findall(r"!\[(?:\\.|[^\]\\])*\]\(([^)]+)\)", md)
    links_html = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert links_md == links_html and len(links_md) == len(placed)
    for link in links_md:
        assert not Path(link).is_absolute() and (out / link).is_file()
    for p in article.paragraphs:
        assert p.strip()[:20] in md
    again = Article.load(out)
    assert again.to_dict() == article.to_dict()
    assert json.loads(json.dumps(article.to_dict())) == article.to_dict()


def test_prompts_sent_are_upstreams(model, library):
    rec = Recorder(model)
    composer = Composer(rec, library)
    events = list(composer.run("春天的公园", num_images=2, **GEN))
    article = events[-1].article
    prompts = [p for p, _ in rec.prompts]
    assert prompts[0] == ZH.article.format(title="春天的公园", eoh=model.tokenizer.eoh)
    spotting = prompts[1]
    sections = "".join(f"<Seg{i}> {p}\n" for i, p in enumerate(article.paragraphs))
    assert spotting == ZH.spotting.format(article=sections, n=min(2, len(article.paragraphs)),
                                          eoh=model.tokenizer.eoh)
    captions = [p for p in prompts if p.endswith('标题是"')]
    assert len(captions) == len(article.slots)
    if len(captions) > 1:
        assert "现在<Seg" in captions[1] and "后插入图像对应的标题是" in captions[1]
    selects = [(p, imgs) for p, imgs in rec.prompts if p.endswith("最合适的图是")]
    for p, imgs in selects:
        assert p.count("<ImageHere>") == len(imgs) and "候选图像包括: A.<ImageHere>" in p


def test_parsed_answers_drive_the_steps(model, library):
    script = ScriptedAnswers(model)
    composer = Composer(script, library)
    article = [e for e in composer.run("海边", num_images=2, **GEN)][-1].article
    assert article.paragraphs == ["第一段，海风。", "第二段：沙滩。", "第三段，灯塔。", "第四段。"]
    assert [s.paragraph for s in article.slots] == [0, 2]
    assert not [f for f in article.fallbacks if f.startswith("spotting")]
    assert all(s.caption.startswith("caption") and s.caption_source == "model" for s in article.slots)
    assert all(s.chosen == 1 and s.chosen_by == "model" for s in article.slots if len(s.candidates) > 1)
    # the second selection prompt shows the first slot's chosen image before the candidates
    selects = [imgs for p, imgs in script.prompts if p.endswith("最合适的图是")]
    assert len(selects[-1]) == 1 + len(article.slots[-1].candidates)
    assert selects[-1][0] == article.chosen_image(0).path


def test_more_images_than_paragraphs_places_one_each_and_says_so(model, library):
    composer = Composer(ScriptedAnswers(model), library)
    article = [e for e in composer.run("海边", num_images=9, **GEN)][-1].article
    assert [s.paragraph for s in article.slots] == [0, 1, 2, 3]
    assert any("9 images were asked for" in f and "4 paragraph" in f for f in article.fallbacks)


def test_editing_a_saved_article(model, library, tmp_path):
    composer = Composer(model, library)
    article = [e for e in composer.run("城市夜景", num_images=1, **GEN)][-1].article
    folder = article.save(tmp_path / "a")
    article = Article.load(folder)
    p = article.slots[0].paragraph if article.slots else 0
    if not article.slots:
        composer.add_image(article, p)
    # choose another candidate, re-caption and search again, remove, add back with a model caption
    slot = article.slot_at(p)
    if len(slot.candidates) > 1:
        article.choose(p, 1)
        assert article.chosen_image(p) == slot.candidates[1]
    found = composer.set_caption(article, p, "a red house under a blue sky")
    assert article.slot_at(p).caption_source == "user" and len(found) == min(4, len(library))
    article.remove_image(p)
    assert article.slot_at(p) is None
    slot = composer.add_image(article, p)
    assert slot.caption and slot.candidates
    new = composer.regenerate_paragraph(article, 0, max_new_tokens=30, seed=1)
    assert article.paragraphs[0] == new
    article.save(folder)
    assert Article.load(folder).to_dict() == article.to_dict()


def test_bad_requests_are_refused(model, library):
    composer = Composer(model, library)
    with pytest.raises(ValueError, match="title"):
        list(composer.run("   "))
    with pytest.raises(ValueError, match="num_images"):
        list(composer.run("ok", num_images=-1))
    with pytest.raises(ValueError, match="language"):
        Composer(model, library, lang="fr")
    article = [e for e in composer.run("无图", num_images=0, **GEN)][-1].article
    assert article.slots == []


def test_without_library_the_slots_have_captions_only(model):
    article = model.compose("雨后", num_images=1, library=None, **GEN)
    assert all(not s.candidates and s.chosen is None for s in article.slots)


def test_cli_compose_with_the_demo_library(tmp_path):
    pytest.importorskip("skimage")
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "examples" / "build_demo_library.py"), "--out",
                        str(tmp_path / "demo"), "--tiny-clip"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    folder = write_tiny_xcomposer(tmp_path / "model")
    out = tmp_path / "article"
    r = subprocess.run([sys.executable, "-m", "xcomposer", "compose", "海边的灯塔", "--folder", str(folder),
                        "--library", str(tmp_path / "demo" / "library"), "--out", str(out), "--max-new-tokens", "60",
                        "--num-beams", "1", "--num-images", "2", "--zip"], capture_output=True, text=True,
                       timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr
    article = Article.load(out)
    md = (out / "article.md").read_text(encoding="utf-8")
    for slot in article.slots:
        if slot.chosen is not None:
            assert Path(slot.candidates[slot.chosen].path).parent == tmp_path / "demo" / "images"
    for link in re.findall(r"\]\((images/[^)]+)\)", md):
        assert (out / link).is_file()
    assert (tmp_path / "article.zip").is_file()
    r = subprocess.run([sys.executable, "-m", "xcomposer", "compose", "t", "--folder", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 2 and "error:" in r.stderr

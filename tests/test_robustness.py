"""Bad input that a careless or hostile caller sends gets a clear error that names the problem and
the fix, and the model keeps answering afterwards (issue: six robustness holes)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision.image import ImageError
from xcomposer import InternLM, XComposer
from xcomposer.compose.article import Article, Candidate
from xcomposer.compose.tempfiles import remove_stale, temp_prefix
from xcomposer.llm.generation import GenerationConfig
from xcomposer.tiny import write_tiny_internlm, write_tiny_xcomposer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return InternLM.from_pretrained(write_tiny_internlm(tmp_path_factory.mktemp("lm"), revision="2023-12"))


@pytest.fixture(scope="module")
def xc(tmp_path_factory):
    return XComposer.from_pretrained(write_tiny_xcomposer(tmp_path_factory.mktemp("xc"), variant="vl-7b"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(path)
    return path


# -- images ------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["https://example.com/cat.jpg", "http://127.0.0.1:8000/a.png", "ftp://host/x.png"])
def test_a_url_is_refused_as_a_url_not_mangled_into_a_path(xc, url):
    with pytest.raises(ImageError) as e:
        xc.chat("What is it?", image=url)
    assert "URLs are not fetched" in str(e.value) and e.value.source == url
    assert os.getcwd() not in str(e.value)  # no local path was made of it


@pytest.mark.parametrize("shape", [(1, 4, 28, 28), (1, 1, 28, 28), (1, 3, 20, 28)])
def test_a_pixel_tensor_of_the_wrong_shape_is_named(xc, shape):
    with pytest.raises(ValueError, match=r"expects (preprocessed pixels of shape \(B, 3, H, W\)|28x28 pixels)"):
        xc.chat("What is it?", image=torch.zeros(shape))


def test_non_finite_pixels_are_refused(xc):
    px = torch.zeros(1, 3, 28, 28)
    px[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        xc.chat("What is it?", image=px)


# -- generation options ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["temperature", "repetition_penalty", "top_p", "length_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_numeric_option_must_be_finite(name, value):
    with pytest.raises(ValueError, match=rf"{name}=.*must be a finite number"):
        GenerationConfig().replace(**{name: value})


@pytest.mark.parametrize("options,why", [({"temperature": "hot"}, "finite number"), ({"max_new_tokens": 2.5}, "integer"),
                                         ({"top_k": True}, "integer"), ({"do_sample": "yes"}, "True or False"),
                                         ({"seed": 1.5}, "integer"), ({"num_beams": None}, "integer")])
def test_options_of_the_wrong_type_are_named(options, why):
    with pytest.raises(ValueError, match=why):
        GenerationConfig().replace(**options)


def test_nan_options_are_refused_by_both_models_which_keep_working(lm, xc):
    tok = lm.tokenizer
    with pytest.raises(ValueError, match="temperature=nan"):
        lm.chat(tok, "hi", temperature=float("nan"))
    with pytest.raises(ValueError, match="repetition_penalty=nan"):
        xc.chat("hi", repetition_penalty=float("nan"))
    assert isinstance(lm.chat(tok, "hi", do_sample=False, max_new_tokens=3)[0], str)
    assert isinstance(xc.generate("hi", num_beams=1, max_new_tokens=3), str)


# -- text that is not valid Unicode --------------------------------------------------------------

def test_lone_surrogates_are_named_at_every_entry_point(lm, xc):
    tok = lm.tokenizer
    with pytest.raises(ValueError, match=r"the query is not valid Unicode.*U\+D800 at character 3"):
        lm.chat(tok, "abc\ud800", history=[])
    with pytest.raises(ValueError, match=r"history\[0\]\[1\] is not valid Unicode"):
        lm.chat(tok, "hi", history=[("fine", "bad\udfff")])
    with pytest.raises(ValueError, match=r"meta_instruction is not valid Unicode"):
        lm.chat(tok, "hi", meta_instruction="\ud83d")
    with pytest.raises(ValueError, match=r"the question is not valid Unicode"):
        xc.chat("\ud800?")
    with pytest.raises(ValueError, match=r"history\[0\]: the question is not valid Unicode"):
        xc.chat("hi", history=[{"role": "user", "text": "\ud800", "images": []}, {"role": "bot", "text": "x"}])
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode("x\udc80y")
    with pytest.raises(ValueError, match="not valid Unicode"):
        xc.complete("a\ud800")
    # a well-formed astral character is fine, and both models still answer
    assert tok.encode("😀") and isinstance(lm.chat(tok, "😀", do_sample=False, max_new_tokens=2)[0], str)
    assert isinstance(xc.generate("ok", num_beams=1, max_new_tokens=2), str)


# -- interrupted saves ---------------------------------------------------------------------------

def _article(tmp_path: Path) -> Article:
    pic = tmp_path / "pic.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(pic)
    a = Article(title="Kill test", paragraphs=["one", "two"])
    a.add_slot(0, "red")
    a.set_candidates(0, [Candidate(str(pic), 0.9)], chosen=0, chosen_by="model")
    return a


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from xcomposer.compose import article as mod
    a = mod.Article.from_dict(__import__("json").loads(sys.argv[1]))
    def die(tmp, folder):  # the copy is assembled; the process dies before the swap
        os.kill(os.getpid(), signal.SIGKILL)
    mod._swap_in = die
    a.save(sys.argv[2])
""")


def test_a_killed_save_leaves_hidden_folders_that_the_next_save_removes(tmp_path):
    import json
    a = _article(tmp_path)
    out = tmp_path / "out" / "article"
    a.save(out)
    first = (out / "article.json").read_text()
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, json.dumps(a.to_dict()), str(out)],
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == -signal.SIGKILL
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(".article.tmp-")]
    assert len(leftovers) == 2 and all(p.is_dir() for p in leftovers)
    assert (out / "article.json").read_text() == first  # the killed saves changed nothing
    # a temporary of a process that is still running is not stale, nor are other files
    live = out.parent / f"{temp_prefix('article')}keep"
    live.mkdir()
    other = out.parent / ".article.notes"
    other.write_text("mine")
    a.paragraphs[1] = "two, edited"
    a.save(out)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["article", live.name, other.name])
    assert "two, edited" in (out / "article.md").read_text()


def test_stale_temporaries_of_a_library_are_removed_on_open(tmp_path):
    # a dead pid: a child that has exited
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(child.stdout)
    for name in (f".library.json.tmp-{dead}-abc.tmp", f".embeddings.tmp-{dead}-def.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / f".library.json.tmp-{os.getpid()}-live.tmp").write_bytes(b"being written")
    removed = {p.name for p in remove_stale(tmp_path, "library.json", ".tmp") + remove_stale(tmp_path, "embeddings",
                                                                                            ".tmp")}
    assert removed == {f".library.json.tmp-{dead}-abc.tmp", f".embeddings.tmp-{dead}-def.tmp"}
    assert [p.name for p in tmp_path.iterdir()] == [f".library.json.tmp-{os.getpid()}-live.tmp"]

"""Bad images and prompts sent to XComposer2, as for XComposer 1.0 (tests/test_robustness.py): each gets
a clear error naming the problem, the model (and the HTTP server, which answers 400, never 500) keeps
answering afterwards."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from vision.image import ImageError, to_data_uri
from xcomposer.compose.pipeline import Composer
from xcomposer.llm.generation import PromptTooLongError
from xcomposer.models.xcomposer2 import XComposer2
from xcomposer.tiny import write_tiny_xcomposer2

OK = dict(do_sample=False, max_new_tokens=3)


@pytest.fixture(scope="module")
def xc2(tmp_path_factory):
    return XComposer2.from_pretrained(write_tiny_xcomposer2(tmp_path_factory.mktemp("xc2r") / "m", max_length=1024))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(path)
    return path


def _still_answers(model, photo):
    reply, history = model.chat("<ImageHere>What is it?", image=photo, **OK)
    assert isinstance(reply, str) and len(history) == 1


@pytest.mark.parametrize("url", ["https://example.com/cat.jpg", "ftp://host/x.png"])
def test_a_url_is_refused_as_a_url(xc2, photo, url):
    with pytest.raises(ImageError, match="URLs are not fetched"):
        xc2.chat("<ImageHere>What is it?", image=url, **OK)
    _still_answers(xc2, photo)


def test_corrupt_truncated_missing_and_huge_images_are_named(xc2, photo, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(huge)  # 72 million pixels, over the 64 million cap
    for bad, why in [(corrupt, "corrupt.png"), (truncated, "truncated.jpg"), (tmp_path / "nope.png", "nope.png"),
                     (huge, "pixels")]:
        with pytest.raises(ImageError, match=why):
            xc2.chat("<ImageHere>What is it?", image=str(bad), **OK)
    # the second of two images is bad: the error says which one
    with pytest.raises(ImageError, match="2"):
        xc2.chat("<ImageHere><ImageHere>Compare", image=[photo, str(corrupt)], **OK)
    _still_answers(xc2, photo)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_other_image_modes_are_converted(xc2, tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    picture = rgb.convert("L").convert("I;16") if mode == "I;16" else rgb.convert(mode)
    path = tmp_path / f"m.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    picture.save(path)
    reply, _ = xc2.chat("<ImageHere>What is it?", image=str(path), **OK)
    assert isinstance(reply, str)


@pytest.mark.parametrize("shape", [(1, 4, 28, 28), (1, 3, 20, 28), (2, 3, 28, 28)])
def test_pixel_tensors_of_the_wrong_shape_are_named(xc2, shape):
    with pytest.raises(ValueError, match=r"\(B, 3, 28, 28\)|one image"):
        xc2.chat("<ImageHere>What is it?", image=torch.zeros(shape), **OK)


def test_non_finite_pixels_are_refused(xc2):
    px = torch.zeros(1, 3, 28, 28)
    px[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        xc2.chat("<ImageHere>What is it?", image=px, **OK)


@pytest.mark.parametrize("options, name", [({"temperature": float("nan")}, "temperature"),
                                           ({"top_p": float("inf")}, "top_p"),
                                           ({"repetition_penalty": "high"}, "repetition_penalty"),
                                           ({"max_new_tokens": 0}, "max_new_tokens")])
def test_bad_options_are_named(xc2, photo, options, name):
    with pytest.raises(ValueError, match=name):
        xc2.chat("<ImageHere>What is it?", image=photo, **{**OK, **options})
    with pytest.raises(ValueError, match=name):
        xc2.complete("hello", **{**OK, **options})
    _still_answers(xc2, photo)


def test_lone_surrogates_are_named_at_every_entry_point(xc2, photo):
    for call in (lambda: xc2.chat("bad \ud800", **OK),
                 lambda: xc2.chat("hi", history=[("ok", "bad \udfff")], **OK),
                 lambda: xc2.chat("hi", meta_instruction="\ud83d", **OK),
                 lambda: list(xc2.stream_chat("x\ud800", **OK)),
                 lambda: xc2.complete("\ud800", **OK),
                 lambda: list(Composer(xc2).run("写\ud800文章"))):
        with pytest.raises(ValueError, match="surrogate"):
            call()
    _still_answers(xc2, photo)


def test_over_long_and_wrongly_typed_prompts(xc2, photo):
    with pytest.raises(PromptTooLongError, match="context window"):
        xc2.chat("长" * 1200, **OK)
    with pytest.raises(PromptTooLongError, match="context window"):
        xc2.complete("长" * 1200, **OK)
    with pytest.raises(TypeError, match="string"):
        xc2.chat(query=123, **OK)
    with pytest.raises(ValueError, match="placeholder"):
        xc2.complete("<ImageHere> and <ImageHere>", image=photo, **OK)
    _still_answers(xc2, photo)


def test_the_server_answers_bad_images_and_long_prompts_with_400(xc2, photo):
    from test_serve_api import LiveServer
    from xcomposer.serve.api import ServerState
    from xcomposer.serve.engine import Engine
    from xcomposer.serve.prompts import ServedModel

    state = ServerState()
    state.served = ServedModel(xc2, "tiny-xc2")
    state.engine = Engine(xc2, metrics=state.metrics, max_batch_size=2, session_len=1024)
    server = LiveServer(state)

    def ask(content, **extra):
        body = {"model": "tiny-xc2", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": content}], **extra}
        return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)

    try:
        bad = "data:image/png;base64," + "aGVsbG8="  # "hello": not an image
        for content in ([{"type": "image_url", "image_url": {"url": bad}}, {"type": "text", "text": "What?"}],
                        "长" * 1200):
            r = ask(content)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"]
        r = ask([{"type": "image_url", "image_url": {"url": to_data_uri(photo)}}, {"type": "text", "text": "What?"}])
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    finally:
        server.close()

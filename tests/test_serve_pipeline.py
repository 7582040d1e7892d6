"""`from xcomposer import pipeline`: offline batches through the serving engine give what `chat()`
gives for each prompt alone."""
from __future__ import annotations

import torch

from xcomposer import InternLM
from xcomposer.tiny import write_tiny_internlm, write_tiny_xcomposer


def test_pipeline_over_a_folder_equals_chat(tmp_path):
    from xcomposer import pipeline
    folder = write_tiny_internlm(tmp_path / "lm")
    model = InternLM.from_pretrained(folder)
    prompts = ["Hi, pls intro yourself", "Shanghai is", "今天天气很好"]
    with pipeline(str(folder), device="cpu", max_batch_size=2) as pipe:  # 3 prompts, 2 rows: one waits
        out = pipe(prompts, do_sample=False, max_new_tokens=12)
        one = pipe("Shanghai is", do_sample=False, max_new_tokens=12)
    for p, r in zip(prompts, out):
        ref, _ = model.chat(model.tokenizer, p, do_sample=False, max_new_tokens=12)
        assert r.text == ref
        assert r.finish_reason in ("stop", "length") and r.generate_token_len == len(r.token_ids) <= 12
    assert one.text == out[1].text and one.input_token_len == out[1].input_token_len


def test_pipeline_with_images(tmp_path):
    from xcomposer import XComposer, pipeline
    from vision.image import to_data_uri
    model = XComposer.from_pretrained(write_tiny_xcomposer(tmp_path / "xc"))
    img = to_data_uri(torch.rand(3, 30, 30))
    with pipeline(model, max_batch_size=2) as pipe:
        r = pipe([("Describe it", img), "No image here"], max_new_tokens=8)
    ref, _ = model.chat("Describe it", image=img, num_beams=1, max_new_tokens=8)
    ref2, _ = model.chat("No image here", num_beams=1, max_new_tokens=8)
    assert [x.text for x in r] == [ref, ref2]

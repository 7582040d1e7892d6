"""Generation engine: token-identical to transformers' generate, streaming, options, bad input."""
import pytest
import torch

from xcomposer.llm.generation import GenerationConfig, PromptTooLongError, apply_repetition_penalty, generate, stream_generate

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]


def hf_generate(hf, prompts, stop, **kw):
    """transformers on a left-padded batch; returns the generated part of each row."""
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=stop, pad_token_id=0, **kw)
    return out[:, T:].tolist()


def same_as_hf(ours_rows, hf_rows, stop):
    # transformers fills finished rows with the pad id (or, when that is 0, with the first stop id)
    fill = {0} | ({stop[0]} if stop else set())
    return all(h[: len(o)] == o and set(h[len(o):]) <= fill for o, h in zip(ours_rows, hf_rows))


def stop_from_output(model, which):
    """A stop id that the tiny model really emits, so the finishing paths run."""
    base = generate(model, PROMPTS, max_new_tokens=32, num_beams=3).tokens
    return [base[which[0]][which[1]], 2]


def test_greedy_32_tokens_identical_to_transformers(pair):
    ours, hf = pair
    r = generate(ours, PROMPTS, max_new_tokens=32)
    assert [len(t) for t in r.tokens] == [32, 32]
    assert same_as_hf(r.tokens, hf_generate(hf, PROMPTS, None, max_new_tokens=32), None)


@pytest.mark.parametrize("which", [(0, 3), (1, 6)])
@pytest.mark.parametrize("kw", [
    dict(num_beams=1),
    dict(num_beams=3),
    dict(num_beams=4, length_penalty=0.5),
    dict(num_beams=3, early_stopping=True),
    dict(num_beams=3, early_stopping="never", length_penalty=2.0),
    dict(num_beams=3, min_new_tokens=8),
])
def test_stop_tokens_and_beams_identical_to_transformers(pair, which, kw):
    ours, hf = pair
    stop = stop_from_output(ours, which)
    r = generate(ours, PROMPTS, max_new_tokens=32, eos_token_id=stop, **kw)
    assert same_as_hf(r.tokens, hf_generate(hf, PROMPTS, stop, max_new_tokens=32, **kw), stop)
    for toks, fin in zip(r.tokens, r.finished):
        assert fin == (toks[-1] in stop)
        assert len(toks) >= kw.get("min_new_tokens", 0)


def test_beam_search_3_beams_with_repetition_penalty_identical(pair):
    ours, hf = pair
    for p in PROMPTS:  # one prompt at a time: transformers also penalises the pad id in a batch
        r = generate(ours, [p], max_new_tokens=32, num_beams=3, repetition_penalty=1.5)
        assert same_as_hf(r.tokens, hf_generate(hf, [p], None, max_new_tokens=32, num_beams=3,
                                                 repetition_penalty=1.5), None)
        g = generate(ours, [p], max_new_tokens=32, repetition_penalty=1.3)
        assert same_as_hf(g.tokens, hf_generate(hf, [p], None, max_new_tokens=32, repetition_penalty=1.3), None)


def test_beam_search_stops_are_exercised(pair):
    ours, _ = pair
    stop = stop_from_output(ours, (0, 3))
    r = generate(ours, PROMPTS, max_new_tokens=32, eos_token_id=stop, num_beams=4, length_penalty=0.5)
    assert any(r.finished)  # the test above is only meaningful if hypotheses do finish


def test_batched_rows_equal_single_prompts(pair):
    ours, _ = pair
    both = generate(ours, PROMPTS, max_new_tokens=20).tokens
    for p, t in zip(PROMPTS, both):
        assert generate(ours, [p], max_new_tokens=20).tokens[0] == t


def test_inputs_embeds_equal_input_ids(pair):
    ours, _ = pair
    a = generate(ours, PROMPTS, max_new_tokens=12, num_beams=2).tokens
    emb = [ours.embed(torch.tensor(p)).detach() for p in PROMPTS]
    b = generate(ours, inputs_embeds=emb, max_new_tokens=12, num_beams=2, penalty_ids=PROMPTS).tokens
    assert a == b


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3), dict(num_beams=5, length_penalty=0.5),
                                dict(do_sample=True, seed=7, temperature=0.9, top_p=0.8)])
def test_stream_concatenates_to_generate(pair, kw):
    ours, _ = pair
    stop = stop_from_output(ours, (0, 3))
    full = generate(ours, [PROMPTS[0]], max_new_tokens=24, eos_token_id=stop, **kw).tokens[0]
    pieces = list(stream_generate(ours, PROMPTS[0], max_new_tokens=24, eos_token_id=stop, **kw))
    assert sum(pieces, []) == full
    if kw.get("num_beams", 1) == 1:
        assert all(len(p) == 1 for p in pieces)  # one token per step


def test_sampling_is_seeded_and_respects_top_k(pair):
    ours, _ = pair
    a = generate(ours, PROMPTS, max_new_tokens=16, do_sample=True, seed=3, temperature=1.5).tokens
    b = generate(ours, PROMPTS, max_new_tokens=16, do_sample=True, seed=3, temperature=1.5).tokens
    c = generate(ours, PROMPTS, max_new_tokens=16, do_sample=True, seed=4, temperature=1.5).tokens
    assert a == b and a != c
    # top_k=1 sampling is greedy
    assert generate(ours, PROMPTS, max_new_tokens=16, do_sample=True, top_k=1, seed=5).tokens == \
        generate(ours, PROMPTS, max_new_tokens=16).tokens
    # temperature 0 means greedy
    assert generate(ours, PROMPTS, max_new_tokens=8, do_sample=True, temperature=0.0).tokens == \
        generate(ours, PROMPTS, max_new_tokens=8).tokens


def test_top_p_keeps_the_nucleus():
    from xcomposer.llm.generation import _filter_top_p
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_top_p(scores, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(_filter_top_p(scores, 0.01)).sum() == 1  # the best token always survives


def test_repetition_penalty_semantics():
    scores = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    hist = torch.tensor([[0, 1, 1, 3]])
    seen = torch.tensor([[True, True, True, False]])
    out = apply_repetition_penalty(scores.clone(), hist, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]  # token 3 is not real history


def test_min_new_tokens_blocks_stop(pair):
    ours, _ = pair
    stop = stop_from_output(ours, (0, 3))
    r = generate(ours, [PROMPTS[0]], max_new_tokens=20, eos_token_id=stop, min_new_tokens=10)
    assert all(t not in stop for t in r.tokens[0][:10])


@pytest.mark.parametrize("opt,value", [("num_beams", 0), ("temperature", -0.1), ("top_p", 1.5), ("top_p", 0.0),
                                       ("max_new_tokens", 0), ("top_k", -1), ("repetition_penalty", 0.0),
                                       ("min_new_tokens", -2), ("early_stopping", "sometimes")])
def test_invalid_options_name_the_option(pair, opt, value):
    ours, _ = pair
    with pytest.raises(ValueError, match=f"{opt}={value!r}"):
        generate(ours, PROMPTS, **{opt: value})


def test_unknown_option_is_an_error(pair):
    with pytest.raises(ValueError, match="unknown generation option.*num_beam"):
        GenerationConfig().replace(num_beam=2)


def test_empty_and_too_long_prompts(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(ours, [[1, 2], []])
    with pytest.raises(ValueError, match="no prompt"):
        generate(ours, [])
    window = ours.context_window
    with pytest.raises(PromptTooLongError, match=f"is {window + 5} tokens but the context window is {window}"):
        generate(ours, [[3] * (window + 5)])


def test_reply_is_cut_to_fit_the_window(pair):
    ours, _ = pair
    window = ours.context_window
    r = generate(ours, [[3] * (window - 4)], max_new_tokens=50)
    assert r.truncated and r.max_new_tokens == 4 and len(r.tokens[0]) == 4


@pytest.mark.parametrize("chunk", [1, 3, 5, 11, 64])
def test_chunked_prefill_equals_one_pass(pair, chunk):
    ours, _ = pair
    from xcomposer.llm.generation import _Batch
    with torch.inference_mode():
        whole = _Batch(ours, PROMPTS, None, GenerationConfig(max_new_tokens=4)).prefill()
        parts = _Batch(ours, PROMPTS, None, GenerationConfig(max_new_tokens=4, prefill_chunk_size=chunk)).prefill()
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=1e-4)
    for kw in (dict(), dict(num_beams=3)):
        assert generate(ours, PROMPTS, max_new_tokens=16, prefill_chunk_size=chunk, **kw).tokens == \
            generate(ours, PROMPTS, max_new_tokens=16, **kw).tokens
    emb = [ours.embed(torch.tensor(p)).detach() for p in PROMPTS]
    assert generate(ours, inputs_embeds=emb, max_new_tokens=8, prefill_chunk_size=chunk).tokens == \
        generate(ours, PROMPTS, max_new_tokens=8).tokens


def test_prefill_chunk_size_is_validated(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="prefill_chunk_size=0"):
        generate(ours, PROMPTS, max_new_tokens=2, prefill_chunk_size=0)

"""lm-evaluation-harness as a real client of the OpenAI-compatible API: its `local-completions` model
(token-id prompts, `echo`, `logprobs`, `max_tokens` 1, batched and concurrent) runs a local multiple-choice
task and a perplexity (`loglikelihood_rolling`) task against a tiny InternLM2 on a real uvicorn server.
The log-likelihoods lm-eval logs must equal one full forward of the same model, and its accuracy the one
those numbers give. Everything is local: the tasks are YAML + JSONL in a temporary folder, the tokenizer
a transformers folder built from the checkpoint's own tokenizer.model, the hub and datasets offline."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

# nothing may leave the machine: datasets and the hub read these when first imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from xcomposer import InternLM  # noqa: E402
from xcomposer.tiny import write_tiny_internlm2  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_serve_api import _serve  # noqa: E402

lm_eval = pytest.importorskip("lm_eval", reason="pip install -e '.[test]' installs lm_eval")
pytest.importorskip("aiohttp", reason="lm_eval's API models need aiohttp, tenacity and requests")

NAME = "tiny-lm2"
MAX_LENGTH = 32  # lm-eval's max_length: 31 tokens a request, so the perplexity documents span several windows
# (question, continuations after "Answer:", gold); the fixture adds the model's own greedy continuation to the
# fourth, so lm-eval's is_greedy is seen true as well as false
ITEMS = [
    ("What color is the sea?", [" blue", " red", " green"], 0),
    ("Which animal says meow?", [" a dog", " a cat", " two blue birds"], 1),
    ("Where do students learn?", [" at school", " in the sea", " on the road", " at night"], 0),
    ("What does the artist do?", [" paints", " sleeps"], 0),
    ("今天天气怎么样？", [" 很好", " 不好"], 0),
    ("Who reads the letter?", [" my friend", " the old man", " nobody"], 2),
]
DOCS = [
    "The cat writes a short article every day. She reads the picture with great care, and then rests. "
    "Our team builds the city at night! Zebras quickly jog over lazy foxes; quirky wizards vex the jumbled mob.",
    "我们一起去公园散步，山上的风景非常美丽。In 1937 there were 370 people, 42.5% more than before. "
    "Ein kleiner Hund läuft über die Wiese — très bien! 🐱🚀",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    folder = write_tiny_internlm2(root / "model", max_position_embeddings=2048)
    # a tokenizer lm-eval can load without trust_remote_code: transformers' Llama BPE converted from the
    # same sentencepiece model (InternLM2's has no dummy prefix: add_prefix_space false)
    hf = root / "hf_tokenizer"
    hf.mkdir()
    shutil.copy(folder / "tokenizer.model", hf / "tokenizer.model")
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_prefix_space": False, "legacy": False, "add_bos_token": True,
        "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    model = InternLM.from_pretrained(folder)
    items = [(q, list(c), a) for q, c, a in ITEMS]
    items[3][1].append(_greedy_continuation(model, f"Question: {items[3][0]}\nAnswer:"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                            for q, c, a in items), encoding="utf-8")
    (tasks / "ppl.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS),
                                     encoding="utf-8")
    cache = json.dumps(str(root / "datasets_cache"))
    (tasks / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {json.dumps(str(tasks / "mc.jsonl"))}}}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""", encoding="utf-8")
    (tasks / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files: {{test: {json.dumps(str(tasks / "ppl.jsonl"))}}}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""", encoding="utf-8")
    server = _serve(model, NAME, max_batch_size=4, session_len=1536)
    yield model, hf, tasks, items, server
    server.close()


def _greedy_continuation(model, context: str) -> str:
    """The model's greedy next tokens after context, as text that encodes back to the same ids."""
    tok = model.tokenizer
    ids, gen = tok.encode(context, add_bos=False), []
    with torch.no_grad():
        for _ in range(3):
            gen.append(int(model(torch.tensor([ids + gen]))[0, -1].argmax()))
    for n in (3, 2, 1):
        text = tok.decode(gen[:n])
        if text and not text[0].isspace() and tok.encode(context + text, add_bos=False) == ids + gen[:n]:
            return text
    pytest.fail(f"no greedy continuation of {context!r} survives a decode/encode round trip: the is_greedy check "
                f"needs one; pick another context")


def _scored(model, ids: list[int], n_scored: int) -> tuple[float, bool]:
    """Sum of log-softmax of the last n_scored tokens of ids, each given all before it, from one full forward,
    and whether each of them is the argmax (lm-eval's is_greedy)."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)
    span = range(len(ids) - n_scored, len(ids))
    return sum(float(lp[p - 1, ids[p]]) for p in span), all(int(lp[p - 1].argmax()) == ids[p] for p in span)


def test_lm_eval_local_completions_scores_as_a_full_forward(setup):
    model, hf, tasks, items, server = setup
    from transformers import AutoTokenizer
    from lm_eval.tasks import TaskManager

    tok = model.tokenizer
    hf_tok = AutoTokenizer.from_pretrained(hf)
    texts = [f"Question: {q}\nAnswer:" for q, _, _ in items] + [f"Question: {q}\nAnswer:{c}"
                                                               for q, cs, _ in items for c in cs] + DOCS
    # lm-eval tokenizes on its side and sends ids: they must be the ids our server's tokenizer makes
    assert [hf_tok(t, add_special_tokens=False).input_ids for t in texts] == [tok.encode(t, add_bos=False)
                                                                             for t in texts]
    assert hf_tok.bos_token_id == tok.bos_token_id

    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=dict(model=NAME, base_url=server.url + "/v1/completions", tokenizer=str(hf),
                        tokenizer_backend="huggingface", tokenized_requests=True, num_concurrent=2,
                        max_retries=1, batch_size=4, max_length=MAX_LENGTH, timeout=60),
        tasks=["tiny_mc", "tiny_ppl"], task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True, bootstrap_iters=0, random_seed=0)

    # multiple choice: each choice's log-likelihood given "Question: ...\nAnswer:" (no BOS: lm-eval's default)
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    correct = correct_norm = 0
    greedy = []
    for s, (q, choices, gold) in zip(samples, items):
        ctx = f"Question: {q}\nAnswer:"
        ctx_ids = tok.encode(ctx, add_bos=False)
        refs = []
        greedy.append([])
        for c in choices:
            whole = tok.encode(ctx + c, add_bos=False)
            assert whole[:len(ctx_ids)] == ctx_ids and len(whole) < MAX_LENGTH  # no left truncation
            ll, is_greedy = _scored(model, whole, len(whole) - len(ctx_ids))
            refs.append(ll)
            greedy[-1].append(is_greedy)
        got = [r[0] for r in s["filtered_resps"]]
        assert [r[0][0] for r in s["resps"]] == got and len(got) == len(choices)
        assert max(abs(a - b) for a, b in zip(got, refs)) < 1e-4, (q, got, refs)
        assert [bool(r[1]) for r in s["filtered_resps"]] == greedy[-1]
        correct += max(range(len(refs)), key=refs.__getitem__) == gold
        norm = [r / len(c) for r, c in zip(refs, choices)]  # acc_norm: per character of the choice
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == gold
        assert s["acc"] == float(max(range(len(refs)), key=refs.__getitem__) == gold)
    res = out["results"]["tiny_mc"]
    assert res["acc,none"] == pytest.approx(correct / len(items))
    assert res["acc_norm,none"] == pytest.approx(correct_norm / len(items))
    assert greedy[3][-1] and not all(g for gs in greedy for g in gs)  # the model's own continuation, and others

    # perplexity: each document rolled in windows of MAX_LENGTH - 2 predicted tokens, BOS before the first,
    # every later window with a full context; summed, as one full forward per window gives it
    span = MAX_LENGTH - 2
    samples = sorted(out["samples"]["tiny_ppl"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    refs = []
    for s, doc in zip(samples, DOCS):
        seq = [tok.bos_token_id] + tok.encode(doc, add_bos=False)
        n = len(seq) - 1
        assert n > 2 * span  # three windows at least
        ref = sum(_scored(model, seq[max(0, e - span):e + 1], e - b)[0]
                  for b, e in ((b, min(b + span, n)) for b in range(0, n, span)))
        assert abs(s["resps"][0][0] - ref) < 1e-4, (doc, s["resps"], ref)
        refs.append(ref)
    words, n_bytes = sum(len(d.split()) for d in DOCS), sum(len(d.encode("utf-8")) for d in DOCS)
    res = out["results"]["tiny_ppl"]
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-sum(refs) / words), rel=1e-4)
    assert res["byte_perplexity,none"] == pytest.approx(math.exp(-sum(refs) / n_bytes), rel=1e-4)
    assert res["bits_per_byte,none"] == pytest.approx(-sum(refs) / n_bytes / math.log(2), rel=1e-4)

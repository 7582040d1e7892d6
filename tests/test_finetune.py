"""LoRA fine-tuning (xcomposer.train) on tiny upstream-layout checkpoints: the loop learns, only LoRA
trains, our LoRA equals peft on transformers' Llama, adapters save in upstream's names and reload
to the same logits, labels cover exactly the replies, bad data is reported by line, the CLI runs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from internlm2_util import hf_llama, to_llama
from xcomposer import InternLM
from xcomposer.llm.adapter import AdapterError
from xcomposer.llm.chat import build_chatml_ids
from xcomposer.tiny import write_tiny_internlm, write_tiny_internlm2
from xcomposer.train import DataError, FinetuneConfig, finetune, load_examples
from xcomposer.train.data import IGNORE, encode_conversation
from xcomposer.train.lora import lora_model

TASK = [("What is the code word?", "banana split"), ("Which colour is the sky?", "blue, mostly")]


def _write_task(path, copies=8):
    rows = [{"messages": [{"role": "system", "content": ""}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for _ in range(copies) for q, a in TASK]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _ask(model, q):
    return model.chat(model.tokenizer, q, meta_instruction="", do_sample=False, max_new_tokens=8)[0]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    folder = write_tiny_internlm2(root / "base")
    data = _write_task(root / "task.jsonl")
    cfg = FinetuneConfig(folder=str(folder), data=str(data), out=str(root / "adapter"), lora_r=8, lora_alpha=16,
                         lora_dropout=0.0, lr=1e-2, weight_decay=0.0, max_steps=30, batch_size=4, grad_accum=1,
                         eval_fraction=0.25, log_every=10)
    result = finetune(cfg)
    return folder, root / "adapter", result


def test_loss_decreases_and_the_tuned_model_answers(tuned):
    folder, adapter, result = tuned
    assert result.steps == 30 and result.losses[-1] < 0.1 * result.losses[0], result.losses
    assert result.eval_losses and result.eval_losses[-1][1] < 0.1 * result.losses[0]
    assert result.tokens_per_s > 0
    base = InternLM.from_pretrained(folder)
    tuned_model = InternLM.from_pretrained(folder, adapter=adapter)
    for q, a in TASK:
        assert _ask(tuned_model, q) == a
        assert _ask(base, q) != a


def test_gradients_reach_only_lora(tuned):
    folder, _, _ = tuned
    model = InternLM.from_pretrained(folder, fuse=False)
    peft_model = lora_model(model, ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                    "feed_forward.w3"], 4, 8, 0.0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give A a gradient too
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.tensor([model.tokenizer.encode("hello there, what is it")])
    peft_model(input_ids=ids).float().logsumexp(-1).sum().backward()
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    got = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert got == trained
    assert len(trained) == 2 * 5 * model.config.num_hidden_layers


def test_lora_equals_peft_on_transformers_llama_and_reload(tuned):
    from peft import LoraConfig, get_peft_model

    folder, adapter, result = tuned
    base = InternLM.from_pretrained(folder, fuse=False)
    cfg = base.config
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    conf = json.loads((adapter / "adapter_config.json").read_text())
    hf = hf_llama(cfg, dict(base.state_dict()))
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    hf = get_peft_model(hf, LoraConfig(r=conf["r"], lora_alpha=conf["lora_alpha"], target_modules=names,
                                       lora_dropout=0.0))
    lora = {}
    for key, t in sd.items():  # upstream names -> Llama's, wqkv's B rows split head by head (to_llama)
        stem, ab = key.removeprefix("base_model.model.").split(".lora_")
        ab = ab[0]
        if stem.endswith("attention.wqkv"):
            if ab == "A":
                for p in "qkv":
                    lora[f"{stem[:-len('attention.wqkv')]}self_attn.{p}_proj.lora_A"] = t
            else:
                for k, v in to_llama({stem + ".weight": t}, cfg).items():
                    lora[k.removesuffix(".weight") + ".lora_B"] = v
        else:
            k = next(iter(to_llama({stem + ".weight": t}, cfg)))
            lora[k.removesuffix(".weight") + f".lora_{ab}"] = t
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for k, t in lora.items():
            params[f"base_model.model.{k}.default.weight"].copy_(t)
    assert sum("lora_" in n for n in params) == len(lora)
    ids = torch.tensor([base.tokenizer.encode("What is the code word? banana split")])
    with torch.no_grad():
        ours = result.model(input_ids=ids)
        theirs = hf(input_ids=ids).logits
        reloaded = InternLM.from_pretrained(folder, adapter=adapter)(input_ids=ids)
        plain = base(input_ids=ids)
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reloaded, ours, atol=1e-4, rtol=1e-4)


def test_saved_adapter_has_upstream_names_and_shapes(tuned):
    folder, adapter, _ = tuned
    cfg = InternLM.from_pretrained(folder, fuse=False).config
    h, qkv, inter, r = cfg.hidden_size, (cfg.num_attention_heads + 2 * cfg.kv_heads) * cfg.head_dim, \
        cfg.intermediate_size, 8
    shapes = {"attention.wqkv": (h, qkv), "attention.wo": (h, h), "feed_forward.w1": (h, inter),
              "feed_forward.w3": (h, inter), "feed_forward.w2": (inter, h)}
    want = {}
    for i in range(cfg.num_hidden_layers):
        for m, (fin, fout) in shapes.items():
            want[f"base_model.model.model.layers.{i}.{m}.lora_A.weight"] = (r, fin)
            want[f"base_model.model.model.layers.{i}.{m}.lora_B.weight"] = (fout, r)
    got = {k: tuple(v.shape) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    assert got == want
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 8 and conf["lora_alpha"] == 16
    assert sorted(conf["target_modules"]) == sorted(shapes) and conf["task_type"] == "CAUSAL_LM"


def test_bad_adapters_are_refused(tuned, tmp_path):
    folder, adapter, _ = tuned
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    conf = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "rank").mkdir()
    (tmp_path / "rank" / "adapter_config.json").write_text(json.dumps({**conf, "r": 16}))
    save_file(sd, str(tmp_path / "rank" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="rank 8"):
        InternLM.from_pretrained(folder, adapter=tmp_path / "rank")
    other = write_tiny_internlm2(tmp_path / "wide", hidden_size=32, num_attention_heads=4)
    with pytest.raises(AdapterError, match="another base model"):
        InternLM.from_pretrained(other, adapter=adapter)
    with pytest.raises(AdapterError, match="adapter_config.json"):
        InternLM.from_pretrained(folder, adapter=tmp_path)


def test_labels_cover_exactly_the_replies_two_turns(tuned):
    folder, _, _ = tuned
    tok = InternLM.from_pretrained(folder).tokenizer
    (q1, a1), (q2, a2) = ("hi there", "hello you"), ("and then?", "nothing more")
    ids, labels = encode_conversation(tok, "internlm2", "chatml", "", [(q1, a1), (q2, a2)])
    end = tok.chat_token_id("<|im_end|>")
    # the prompts are exactly what InternLM.chat feeds at each turn
    p1 = build_chatml_ids(tok, q1, [], 4096, 0, "")[0]
    p2 = build_chatml_ids(tok, q2, [(q1, a1)], 4096, 0, "")[0]
    r1 = tok.encode(a1, add_bos=False) + [end]
    r2 = tok.encode(a2, add_bos=False) + [end]
    assert ids == p2 + r2 and ids[:len(p1) + len(r1)] == p1 + r1
    want = [IGNORE] * len(p1) + r1 + [IGNORE] * (len(p2) - len(p1) - len(r1)) + r2
    assert labels == want
    assert tok.decode([t for t in labels if t != IGNORE], skip_special_tokens=False) == \
        f"{a1}<|im_end|>{a2}<|im_end|>"


def test_xcomposer_records_and_messages_give_the_same_ids(tuned, tmp_path):
    folder, _, _ = tuned
    tok = InternLM.from_pretrained(folder).tokenizer
    msgs = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    xc = [{"id": 0, "conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}]
    (tmp_path / "a.jsonl").write_text(json.dumps(msgs) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(xc))
    a = load_examples(tmp_path / "a.jsonl", tok, "internlm2", "chatml", 4096).examples[0]
    b = load_examples(tmp_path / "b.json", tok, "internlm2", "chatml", 4096).examples[0]
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    # no system message: InternLM.chat's default system text, as inference uses it
    assert a.input_ids[:-3] == build_chatml_ids(tok, "hi", [], 4096, 0)[0][:len(a.input_ids) - 3]


def test_bad_records_reported_by_line(tuned, tmp_path, capsys):
    folder, _, _ = tuned
    tok = InternLM.from_pretrained(folder).tokenizer
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": [{"role": "user"}]}),
             json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}),
             json.dumps({"id": 1, "image": ["a.jpg"], "conversations": []}),
             json.dumps({"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]}),
             "", json.dumps(good)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    report = load_examples(tmp_path / "d.jsonl", tok, "internlm2", "chatml", 400)
    assert [e.where for e in report.examples] == ["d.jsonl line 1", "d.jsonl line 8"]
    assert [s.split(":")[0] for s in report.skipped] == [f"d.jsonl line {n}" for n in (2, 3, 4, 5, 6)]
    text = "\n".join(report.skipped)
    for why in ("not valid JSON", "needs 'role' and 'content'", "expected 'user' then 'assistant'", "image",
                "over max_length 400"):
        assert why in text
    assert "skipped d.jsonl line 2" in capsys.readouterr().err
    with pytest.raises(DataError, match="line 6"):
        load_examples(tmp_path / "d.jsonl", tok, "internlm2", "chatml", 400, strict=True)


def test_internlm_v1_adapter_round_trip(tmp_path):
    folder = write_tiny_internlm(tmp_path / "v1")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    result = finetune(FinetuneConfig(folder=str(folder), data=str(data), out=str(tmp_path / "a"), lora_r=4,
                                     lora_alpha=8, lr=1e-2, max_steps=2, grad_accum=1, weight_decay=0.0))
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 7 * 2
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    with torch.no_grad():
        torch.testing.assert_close(InternLM.from_pretrained(folder, adapter=tmp_path / "a")(input_ids=ids),
                                   result.model(input_ids=ids), atol=1e-4, rtol=1e-4)


def test_cli_end_to_end(tuned, tmp_path):
    folder, _, _ = tuned
    data = _write_task(tmp_path / "task.jsonl", copies=2)
    out = tmp_path / "cli-adapter"
    run = subprocess.run([sys.executable, "-m", "xcomposer", "finetune", "--folder", str(folder), "--data", str(data),
                          "--out", str(out), "--max-steps", "2", "--lora-r", "4", "--grad-accum", "2",
                          "--gradient-checkpointing", "--eval-fraction", "0.25"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "step 2/2 loss" in run.stderr and "tok/s" in run.stderr and "eval loss" in run.stderr
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    bad = subprocess.run([sys.executable, "-m", "xcomposer", "finetune", "--folder", str(folder), "--data",
                          str(tmp_path / "missing.jsonl"), "--out", str(out)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr


def test_an_adapter_is_merged_before_8bit_quantization(tuned):
    """`adapter=` with `load_in_8bit=True`: the adapter goes into the float weights first, then the
    projections are quantized (the tuned answers survive int8)."""
    from xcomposer.llm.quant import quantized_linears

    folder, adapter, _ = tuned
    q = InternLM.from_pretrained(folder, adapter=adapter, load_in_8bit=True)
    assert len(quantized_linears(q)) == 7 * q.config.num_hidden_layers
    tuned_fp = InternLM.from_pretrained(folder, adapter=adapter)
    ids = torch.tensor([q.tokenizer.encode(TASK[0][0])])
    base = InternLM.from_pretrained(folder)
    with torch.no_grad():
        a, b, c = q(ids), tuned_fp(ids), base(ids)
    assert (a - b).abs().max() < 0.25 * (b - c).abs().max()  # int8 error far below the adapter's effect
    assert _ask(q, TASK[0][0]) == _ask(tuned_fp, TASK[0][0])


def test_merge_writes_an_upstream_checkpoint_equal_to_the_adapter_model(tuned, tmp_path):
    """`python -m xcomposer merge`: the merged folder has the base's keys, shapes and dtype, loads as
    an ordinary checkpoint and answers as the base with the adapter does; a quantized source and an
    --out inside the source are refused."""
    from xcomposer.llm.checkpoint import iter_shards

    folder, adapter, _ = tuned
    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "xcomposer", "merge", "--folder", str(folder), "--adapter", str(adapter),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    base = {k: v for _, sd in iter_shards(folder) for k, v in sd.items()}
    merged = {k: v for _, sd in iter_shards(out) for k, v in sd.items()}
    assert {k: (v.shape, v.dtype) for k, v in merged.items()} == {k: (v.shape, v.dtype) for k, v in base.items()}
    assert not torch.equal(merged["model.layers.0.attention.wqkv.weight"], base["model.layers.0.attention.wqkv.weight"])
    assert torch.equal(merged["model.tok_embeddings.weight"], base["model.tok_embeddings.weight"])  # not adapted
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith((".safetensors", ".json"))) == \
        sorted(p.name for p in folder.iterdir() if not p.name.endswith((".safetensors", ".json")))  # tokenizer too
    m = InternLM.from_pretrained(out)
    a = InternLM.from_pretrained(folder, adapter=adapter)
    ids = torch.tensor([a.tokenizer.encode(TASK[0][0])])
    with torch.no_grad():
        torch.testing.assert_close(m(ids), a(ids), rtol=1e-5, atol=1e-5)
    assert _ask(m, TASK[1][0]) == _ask(a, TASK[1][0])
    again = subprocess.run([sys.executable, "-m", "xcomposer", "merge", "--folder", str(folder), "--adapter",
                            str(adapter), "--out", str(folder / "inside")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "lies in the source folder" in again.stderr
    from xcomposer.train import merge_checkpoint
    with pytest.raises(FileExistsError, match="not empty"):
        merge_checkpoint(folder, adapter, out)


def test_qlora_trains_over_a_4bit_base_and_the_adapter_serves_on_it(tmp_path):
    """QLoRA (--load-in-4bit): the base projections are bitsandbytes NF4 modules under peft's LoRA,
    only the LoRA trains, the loss falls; the adapter, held beside an NF4 load of the same base (the
    serving path), answers the task as the trained model does."""
    import bitsandbytes as bnb

    from xcomposer.llm.adapter import attach_adapter_

    # bitsandbytes CPU 4-bit needs output rows in multiples of 32 (the served load quantizes k and v alone)
    folder = write_tiny_internlm2(tmp_path / "base", intermediate_size=192, num_key_value_heads=4)
    data = _write_task(tmp_path / "task.jsonl")
    cfg = FinetuneConfig(folder=str(folder), data=str(data), out=str(tmp_path / "adapter"), lora_r=8, lora_alpha=16,
                         lora_dropout=0.0, lr=1e-2, weight_decay=0.0, max_steps=30, batch_size=4, grad_accum=1,
                         log_every=10, quantization="nf4")
    result = finetune(cfg)
    base = result.model.get_base_model()
    layer = base.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj.wqkv.base_layer, bnb.nn.Linear4bit)
    assert isinstance(layer.mlp.down_proj.base_layer, bnb.nn.Linear4bit)
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert result.losses[-1] < result.losses[0] / 4
    served = InternLM.from_pretrained(folder, quantization="nf4")
    attach_adapter_(served, "tuned", tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    result.model.eval()  # bitsandbytes' CPU 4-bit runs another kernel in training mode
    with torch.no_grad():
        got = served(input_ids=ids, task_loras=("tuned",))
        want = result.model(input_ids=ids)
    # NF4 of the same weights, but double quantization groups the packed wqkv's block scales (training)
    # and q / k / v's (serving) differently: close, not equal
    assert (got - want).abs().mean() < 0.05 * want.abs().mean(), ((got - want).abs().mean(), want.abs().mean())
    q, a = TASK[0]
    tok = served.tokenizer
    prompt = build_chatml_ids(tok, q, [], served.context_window, 8, meta_instruction="")[0]
    from xcomposer.llm.generation import generate
    cfg_gen = served.chat_format.generation_config({"do_sample": False, "max_new_tokens": 8})
    tuned = tok.decode(generate(served, [prompt], config=cfg_gen, task_loras=("tuned",)).tokens[0],
                       skip_special_tokens=True)
    assert a in tuned


def test_two_processes_give_the_single_process_adapter(tmp_path):
    """torchrun --nproc_per_node 2 (gloo on the CPU, accelerate's DDP): each step's 4 micro-batches shared
    out 2 and 2 give the adapter one process gives running all 4."""
    folder = write_tiny_internlm2(tmp_path / "base")
    data = _write_task(tmp_path / "task.jsonl", copies=4)
    common = dict(folder=str(folder), data=str(data), lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=1e-2,
                  weight_decay=0.0, max_steps=3, batch_size=2, grad_accum=4, seed=3)
    finetune(FinetuneConfig(out=str(tmp_path / "one"), **common))
    from conftest import torchrun_xcomposer
    r = torchrun_xcomposer(["finetune", "--folder", str(folder), "--data", str(data), "--out", str(tmp_path / "two"),
                            "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--lr", "1e-2",
                            "--weight-decay", "0", "--max-steps", "3", "--batch-size", "2", "--grad-accum", "4",
                            "--seed", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2 processes)" in r.stderr
    one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    assert any((one[k] != 0).any() for k in one if "lora_B" in k)  # it trained


def test_resume_from_a_checkpoint_gives_the_uninterrupted_adapter(tmp_path):
    """--save-every writes checkpoint-STEP (adapter + trainer state); a new run resuming from step 3 of 6
    writes the adapter one uninterrupted run writes (dropout on: the random state is restored too)."""
    folder = write_tiny_internlm2(tmp_path / "base")
    data = _write_task(tmp_path / "task.jsonl", copies=4)
    common = dict(folder=str(folder), data=str(data), lora_r=4, lora_alpha=8, lora_dropout=0.1, lr=1e-2,
                  weight_decay=0.0, max_steps=6, batch_size=2, grad_accum=2, seed=5)
    straight = finetune(FinetuneConfig(out=str(tmp_path / "straight"), **common))
    finetune(FinetuneConfig(out=str(tmp_path / "saved"), save_every=3, **common))
    ckpt = tmp_path / "saved" / "checkpoint-3"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file() and (ckpt / "trainer_state.pt").is_file()
    assert not (tmp_path / "saved" / "checkpoint-6").exists()  # the final adapter is the run's output
    resumed = finetune(FinetuneConfig(out=str(tmp_path / "saved"), resume="latest", **common))
    assert resumed.losses == straight.losses
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lora_r=4"):
        finetune(FinetuneConfig(out=str(tmp_path / "saved"), resume=str(ckpt), **{**common, "lora_r": 8}))
    with pytest.raises(FileNotFoundError, match="trainer_state.pt"):
        finetune(FinetuneConfig(out=str(tmp_path / "x"), resume=str(tmp_path), **common))


def test_tool_call_records_train_with_the_servers_tool_prompt(tmp_path):
    """OpenAI records with tools: the prompt before each assistant message is the server's tool prompt
    (`format_chatml_tool_prompt`) to the token, and the labels cover exactly the assistant messages (text
    and calls as the model writes them) and their end token; a few steps train on them."""
    from xcomposer.llm.chat import INTERNLM2_META_INSTRUCTION, format_chatml_tool_prompt, tool_call_text

    folder = write_tiny_internlm2(tmp_path / "base")
    tok = InternLM.from_pretrained(folder).tokenizer
    fn = {"name": "get_weather", "description": "weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    record = {"tools": [{"type": "function", "function": fn}], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"celsius": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."}]}
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(record) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"}]}) + "\n", encoding="utf-8")
    report = load_examples(data, tok, "internlm2", "chatml", 4096, strict=True)
    ex = report.examples[0]
    turns = [("user", "Weather in Paris?", []), ("assistant", "", [("get_weather", {"city": "Paris"})]),
             ("tool", '{"celsius": 21}', []), ("assistant", "It is 21 degrees.", [])]
    meta = INTERNLM2_META_INSTRUCTION
    first = tok.encode(format_chatml_tool_prompt(turns[:1], meta, [fn]), add_bos=True)
    assert ex.input_ids[:len(first)] == first and all(lab == -100 for lab in ex.labels[:len(first)])
    call = tok.encode("[UNUSED_TOKEN_145]" + tool_call_text("get_weather", {"city": "Paris"}) + "[UNUSED_TOKEN_145]",
                      add_bos=False)[1:]
    assert ex.input_ids[len(first):len(first) + len(call)] == call
    assert ex.labels[len(first):len(first) + len(call)] == call  # the call and its end token are learnt
    second = tok.encode(format_chatml_tool_prompt(turns[:3], meta, [fn]), add_bos=True)
    assert ex.input_ids[:len(second)] == second  # the serving prompt of the final answer, to the token
    tail = [t for t, lab in zip(ex.input_ids[len(second):], ex.labels[len(second):]) if lab != -100]
    assert tok.decode(tail, skip_special_tokens=False).startswith("It is 21 degrees.")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": record["messages"]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="no 'tools' list"):
        load_examples(bad, tok, "internlm2", "chatml", 4096, strict=True)
    result = finetune(FinetuneConfig(folder=str(folder), data=str(data), out=str(tmp_path / "a"), lora_r=4,
                                     lora_alpha=8, lr=1e-2, max_steps=2, grad_accum=1, weight_decay=0.0))
    assert result.steps == 2 and result.examples == 2


@pytest.mark.parametrize("writer", [write_tiny_internlm2, write_tiny_internlm])
def test_packed_rows_give_each_record_the_loss_it_has_alone(writer, tmp_path):
    """--pack: records end to end in rows of max_length, each attending only to itself (the decoder's
    segment_ids, positions from 0 per record): the summed loss and its token count equal the padded
    batch's, and each record's logits equal its own forward."""
    from xcomposer.train.trainer import collate, loss_sum, pack_examples, segment_ids
    import random
    model = InternLM.from_pretrained(writer(tmp_path / "m"), fuse=False)
    family = model.config.family
    report = load_examples(_write_task(tmp_path / "t.jsonl", copies=3), model.tokenizer, family,
                           model.chat_template, 4096, strict=True)
    examples = report.examples
    longest = max(len(e.input_ids) for e in examples)
    rows = pack_examples(examples, 3 * longest, random.Random(0))
    assert len(rows) < len(examples) and sorted(n for r in rows for n in r.segments) == sorted(
        len(e.input_ids) for e in examples)
    assert all(len(r.input_ids) <= 3 * longest for r in rows)
    pad = model.tokenizer.pad_token_id
    with torch.no_grad():
        ids, mask, labels = collate(examples, pad, "cpu")
        want, n_want = loss_sum(model, ids, mask, labels, False)
        ids, mask, labels = collate(rows, pad, "cpu")
        seg = segment_ids(rows, ids.shape[1], "cpu")
        got, n_got = loss_sum(model, ids, mask, labels, False, segments=seg)
        assert n_got == n_want
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        row = rows[0]
        logits = model(input_ids=torch.tensor([row.input_ids]), segment_ids=segment_ids([row], len(row.input_ids), "cpu"))
        at = 0
        for n in row.segments:
            alone = model(input_ids=torch.tensor([row.input_ids[at:at + n]]))
            torch.testing.assert_close(logits[:, at:at + n], alone, rtol=1e-4, atol=1e-4)
            at += n


def test_a_packed_run_learns_the_task(tmp_path):
    folder = write_tiny_internlm2(tmp_path / "base")
    data = _write_task(tmp_path / "task.jsonl")
    result = finetune(FinetuneConfig(folder=str(folder), data=str(data), out=str(tmp_path / "a"), lora_r=8,
                                     lora_alpha=16, lora_dropout=0.0, lr=1e-2, weight_decay=0.0, max_steps=30,
                                     batch_size=1, grad_accum=1, max_length=256, pack=True, log_every=0))
    assert result.examples < 16  # 16 records in fewer rows
    assert result.losses[-1] < result.losses[0] / 5, result.losses
    model = InternLM.from_pretrained(folder, adapter=tmp_path / "a")
    for q, a in TASK:
        assert _ask(model, q) == a

"""Several LoRA adapters served beside one base (issue 23, "adapters served"): an adapter held as the
decoder's task LoRA equals the same adapter merged (InternLM2's fused wqkv LoRA and v1's separate
q/k/v ones); base and adapter requests decode in one engine batch, each equal to its model alone;
the official openai client picks them by `model`, /v1/models lists them, an unknown name is a 404."""
import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from safetensors.torch import save_file

from test_serve_api import LiveServer
from xcomposer import InternLM
from xcomposer.llm.adapter import AdapterError, attach_adapter_
from xcomposer.llm.generation import generate
from xcomposer.serve.api import ServerState
from xcomposer.serve.engine import Engine, Prompt
from xcomposer.serve.options import parse_adapters
from xcomposer.serve.prompts import ServedModel
from xcomposer.tiny import write_tiny_internlm, write_tiny_internlm2

INTERNLM2_TARGETS = {"attention.wqkv": ("qkv", "h"), "attention.wo": ("h", "h"), "feed_forward.w1": ("inter", "h"),
                     "feed_forward.w3": ("inter", "h"), "feed_forward.w2": ("h", "inter")}
V1_TARGETS = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("h", "h"), "self_attn.v_proj": ("h", "h"),
              "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("inter", "h"), "mlp.up_proj": ("inter", "h"),
              "mlp.down_proj": ("h", "inter")}


def write_adapter(folder, cfg, targets, r, alpha, seed, layers=None):
    """A random peft LoRA adapter folder in upstream's module names (B non-zero: it changes the output)."""
    g = torch.Generator().manual_seed(seed)
    dims = {"h": cfg.hidden_size, "inter": cfg.intermediate_size,
            "qkv": cfg.hidden_size + 2 * cfg.kv_heads * cfg.head_dim}
    sd = {}
    for i in range(cfg.num_hidden_layers if layers is None else layers):
        for module, (out_f, in_f) in targets.items():
            stem = f"base_model.model.model.layers.{i}.{module}"
            sd[f"{stem}.lora_A.weight"] = torch.randn(r, dims[in_f], generator=g) * 0.2
            sd[f"{stem}.lora_B.weight"] = torch.randn(dims[out_f], r, generator=g) * 0.2
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted({m.split(".")[-1] for m in targets}),
         "bias": "none", "lora_dropout": 0.0}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    folder = write_tiny_internlm2(root / "base")
    base = InternLM.from_pretrained(folder)
    a1 = write_adapter(root / "a1", base.config, INTERNLM2_TARGETS, r=4, alpha=8, seed=1)
    a2 = write_adapter(root / "a2", base.config, {k: v for k, v in INTERNLM2_TARGETS.items() if "w" in k[-3:]},
                       r=2, alpha=2, seed=2, layers=1)  # fewer modules and layers: the rest stay base
    served = InternLM.from_pretrained(folder)
    for name, path in (("a1", a1), ("a2", a2)):
        attach_adapter_(served, name, path)
    return folder, {"a1": a1, "a2": a2}, served


def test_held_adapter_equals_merged(setup):
    folder, adapters, served = setup
    ids = torch.tensor([[1, 5, 9, 30, 7, 44, 3]])
    with torch.no_grad():
        plain = InternLM.from_pretrained(folder)(input_ids=ids)
        torch.testing.assert_close(served(input_ids=ids), plain, rtol=0, atol=0)  # no adapter chosen: the base
        for name, path in adapters.items():
            merged = InternLM.from_pretrained(folder, adapter=path)(input_ids=ids)
            held = served(input_ids=ids, task_loras=(name,))
            torch.testing.assert_close(held, merged, rtol=1e-4, atol=1e-4)
            assert (held - plain).abs().amax() > 1e-3


def test_v1_separate_qkv_loras_equal_merged(tmp_path):
    folder = write_tiny_internlm(tmp_path / "v1")
    model = InternLM.from_pretrained(folder)
    path = write_adapter(tmp_path / "a", model.config, V1_TARGETS, r=3, alpha=6, seed=3)
    attach_adapter_(model, "tuned", path)
    ids = torch.tensor([[1, 8, 2, 50, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, task_loras=("tuned",)),
                                   InternLM.from_pretrained(folder, adapter=path)(input_ids=ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(AdapterError, match="new name"):
        attach_adapter_(model, "tuned", path)


def test_engine_batches_base_and_adapters_each_as_alone(setup):
    folder, adapters, served = setup
    tok = served.tokenizer
    prompts = [tok.encode(t, add_bos=True) for t in ("hello there", "tell me a story", "one two three")]
    want = {None: InternLM.from_pretrained(folder)}
    want.update({n: InternLM.from_pretrained(folder, adapter=p) for n, p in adapters.items()})
    jobs = [(name, ids) for name in (None, "a1", "a2") for ids in prompts]
    cfg = served.chat_format.generation_config({"do_sample": False, "max_new_tokens": 8, "repetition_penalty": 1.0})
    with Engine(served, max_batch_size=len(jobs), session_len=256, prefill_chunk=4) as eng:
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(eng.generate, Prompt(ids=ids, task_loras=(name,) if name else ()), cfg, (), 60)
                       for name, ids in jobs]
            got = [f.result()[1].tokens for f in futures]
    for (name, ids), tokens in zip(jobs, got):
        ref = generate(want[name], [ids], config=cfg).tokens[0]
        assert tokens == ref, name


def test_openai_client_picks_adapters_by_model(setup):
    folder, adapters, served_model = setup
    state = ServerState()
    state.served = ServedModel(served_model, "base", {n: str(p) for n, p in adapters.items()})
    state.engine = Engine(served_model, metrics=state.metrics, max_batch_size=4, session_len=512)
    server = LiveServer(state)
    try:
        listed = {m.id: m for m in server.client.models.list().data}
        assert set(listed) == {"base", "a1", "a2"}
        assert listed["a1"].model_dump()["parent"] == "base" and listed["a1"].model_dump()["root"] == str(adapters["a1"])
        merged = InternLM.from_pretrained(folder, adapter=adapters["a1"])
        r = server.client.chat.completions.create(model="a1", max_tokens=8, temperature=0,
                                                  messages=[{"role": "user", "content": "hi"}])
        assert r.model == "a1"
        assert r.choices[0].message.content == merged.chat(merged.tokenizer, "hi", do_sample=False,
                                                           max_new_tokens=8)[0]
        c = server.client.completions.create(model="a2", prompt="once upon", max_tokens=5, temperature=0)
        assert c.model == "a2"
        with pytest.raises(openai.NotFoundError, match="'a3' does not exist"):
            server.client.chat.completions.create(model="a3", messages=[{"role": "user", "content": "hi"}])
        assert server.client.models.retrieve("a2").id == "a2"
    finally:
        server.close()


def test_adapter_arguments(tmp_path):
    (tmp_path / "x").mkdir()
    assert parse_adapters([f"sql={tmp_path / 'x'}", str(tmp_path / "x")]) == [("sql", str(tmp_path / "x")),
                                                                          ("x", str(tmp_path / "x"))]
    for bad, why in (([f"a-b={tmp_path}"], "letters"), ([f"a={tmp_path}", f"a={tmp_path}"], "twice"),
                     ([f"a={tmp_path / 'missing'}"], "not a folder")):
        with pytest.raises(ValueError, match=why):
            parse_adapters(bad)


def test_web_demo_adapter_merges_into_a_text_model(setup, tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import web_demo

    folder, adapters, _ = setup
    args = web_demo.build_parser().parse_args(["--folder", str(folder), "--adapter", str(adapters["a1"]),
                                               "--num_gpus", "0"])
    model = web_demo.load_model(args)
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids),
                                   InternLM.from_pretrained(folder, adapter=adapters["a1"])(input_ids=ids))
    bad = web_demo.build_parser().parse_args(["--folder", str(folder), "--adapter", str(tmp_path), "--num_gpus", "0"])
    with pytest.raises(SystemExit, match="adapter_config.json"):
        web_demo.load_model(bad)


def test_xcomposer2d5_adapter_merged_or_held(tmp_path):
    """An adapter on XComposer2.5's decoder (upstream finetune.py's targets): merged by from_pretrained(adapter=)
    or held beside the weights (the server's way), the same logits, the Partial LoRA untouched."""
    from xcomposer import XComposer
    from xcomposer.tiny import write_tiny_xcomposer2d5

    ckpt = write_tiny_xcomposer2d5(tmp_path / "xc25")
    base = XComposer.from_pretrained(ckpt)
    path = write_adapter(tmp_path / "a", base.config.llm, INTERNLM2_TARGETS, r=4, alpha=8, seed=9)
    merged = XComposer.from_pretrained(ckpt, adapter=path)
    assert any("merged" in n for n in merged.load_notes)
    attach_adapter_(base.llm, "mine", path)
    x = torch.randn(1, 12, base.config.llm.hidden_size) * 0.1
    image = torch.zeros(1, 12, dtype=torch.bool)
    image[0, 3:7] = True
    with torch.no_grad():
        torch.testing.assert_close(base.llm(inputs_embeds=x, image_mask=image, task_loras=("mine",)),
                                   merged.llm(inputs_embeds=x, image_mask=image), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(base.llm.model.layers[0].self_attn.qkv_lora.A.weight,
                                   merged.llm.model.layers[0].self_attn.qkv_lora.A.weight)
    from xcomposer.tiny import write_tiny_xcomposer
    with pytest.raises(ValueError, match="XComposer 1.0"):
        XComposer.from_pretrained(write_tiny_xcomposer(tmp_path / "v1"), adapter=path)


def test_text_turns_are_dropped_to_the_engines_session_not_the_window(setup):
    """The served prompt of a long text conversation leaves out the oldest turns that do not fit the
    engine's session length (the budget), where chat() sizes them to the context window."""
    folder, _, _ = setup
    model = InternLM.from_pretrained(folder)
    served = ServedModel(model, "base")
    cfg = served.config({"max_new_tokens": 16})
    from xcomposer.serve.prompts import Message
    long = [Message("system", "")]
    for k in range(12):
        long += [Message("user", f"question number {k} " * 6), Message("assistant", f"answer {k} " * 6)]
    long.append(Message("user", "last?"))
    full = served.chat_prompt(long, cfg)
    cut = served.chat_prompt(long, cfg, budget=200)
    assert len(cut.ids) + 16 <= 200 < len(full.ids) + 16
    assert cut.ids[-20:] == full.ids[-20:]  # the newest turn is kept

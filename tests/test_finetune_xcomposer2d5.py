"""LoRA fine-tuning of XComposer2.5 on upstream XComposer's image records: the exact ids, image spans and
labels of upstream's finetune (conv2text, the training interleav_wrap, mask_human_targets) written out
here on their own; the loop learns an image-dependent answer; only the LoRA trains; the adapter saved in
upstream's names loads with from_pretrained(adapter=) to the trained model's logits."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from xcomposer import XComposer
from xcomposer.models.xcomposer2d5 import composition_tile, hd_tokens
from xcomposer.tiny import write_tiny_xcomposer2d5
from xcomposer.train import FinetuneConfig, finetune, load_examples
from xcomposer.train.data import IGNORE
from xcomposer.train.trainer import vl_inputs

S, E = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"


def _photo(path, colour, size=(300, 200)):
    rng = np.random.default_rng(sum(colour))
    arr = np.clip(np.array(colour)[None, None] + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def upstream_ids_and_labels(tok, record_text: str, n_images: int, image_len: list[int]):
    """finetune's interleav_wrap (non-empty parts only, <s> on the first) and mask_human_targets."""
    eoa, eos = tok.token_to_id(E), tok.eos_token_id
    if n_images == 1 and "<ImageHere>" not in record_text:
        record_text = "<ImageHere>" + record_text
    tokens, need_bos = [], True
    for idx, part in enumerate(record_text.split("<ImageHere>")):
        if len(part) > 0:
            tokens += tok.encode(part, add_bos=need_bos)
            need_bos = False
        if idx < n_images:
            tokens += [-100] * image_len[idx]
    targets = list(tokens)
    end_count, last_eoa = 0, 0
    for i, t in enumerate(tokens):
        if t == eoa:
            if end_count % 2 == 0:
                for j in range(last_eoa, min(i + 6, len(targets))):
                    targets[j] = -100
            else:
                last_eoa = i + 1
            end_count += 1
        elif t == eos:
            for j in range(i + 1, len(targets)):
                targets[j] = -100
            break
    if t != eos and end_count % 2 == 0:
        for j in range(last_eoa + 1, len(targets)):
            targets[j] = -100
    return tokens, targets


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft25")
    ckpt = write_tiny_xcomposer2d5(root / "ckpt", max_position_embeddings=8192)
    red, blue = _photo(root / "red.png", (220, 30, 30)), _photo(root / "blue.png", (30, 30, 220))
    rows = []
    for _ in range(6):
        for pic, answer in ((red.name, "red apple"), (blue.name, "blue sky")):
            rows.append({"id": "x", "image": pic, "conversations": [
                {"from": "human", "value": "What colour is it?"}, {"from": "bot", "value": answer}]})
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    result = finetune(FinetuneConfig(folder=str(ckpt), data=str(data), out=str(root / "adapter"), lora_r=8,
                                     lora_alpha=16, lora_dropout=0.0, lr=2e-2, weight_decay=0.0, max_steps=40,
                                     batch_size=2, grad_accum=1, log_every=8))
    return root, ckpt, data, result


def test_ids_spans_and_labels_are_upstreams(setup, tmp_path):
    root, ckpt, _, _ = setup
    model = XComposer.from_pretrained(ckpt)
    tok = model.tokenizer
    a, b = _photo(tmp_path / "a.png", (10, 200, 10), (900, 500)), _photo(tmp_path / "b.png", (10, 10, 10))
    lens = [hd_tokens(*(s // 560 for s in composition_tile(Image.open(p).convert("RGB")).size)) for p in (a, b)]
    records = [
        ({"conversations": [{"from": "human", "value": " Describe it "}, {"from": "gpt", "value": "A green field."}],
          "image": str(a)}, 1),
        ({"conversations": [{"from": "user", "value": "Image1 <ImageHere>; Image2 <ImageHere>; Compare."},
                            {"from": "bot", "value": "Both are dark."}, {"from": "human", "value": "Sure?"},
                            {"from": "bot", "value": "Yes."}], "image": [str(a), str(b)]}, 2),
        ({"conversations": [{"from": "human", "value": "hello"}, {"from": "bot", "value": "hi there"}]}, 0),
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r, _ in records) + "\n", encoding="utf-8")
    from xcomposer.train.vl_data import encode_vl_record
    image_len = {str(a): lens[0], str(b): lens[1]}
    report = load_examples(data, tok, "internlm2", "chatml", 100000, strict=True,
                           encode=lambda r, base: encode_vl_record(tok, r, base, image_len.__getitem__))
    for (record, n), ex in zip(records, report.examples):
        text = "".join(f"{S}{'user' if t['from'] in ('human', 'user') else 'assistant'}\n{t['value'].strip()}{E}\n"
                       for t in record["conversations"]) + "</s>"
        want_ids, want_labels = upstream_ids_and_labels(tok, text, n, lens[:n] if n != 1 else lens[:1])
        assert ex.labels == want_labels
        assert [tok.pad_token_id if t == -100 else t for t in want_ids] == ex.input_ids
        spans = [i for i, t in enumerate(want_ids) if t == -100 and (i == 0 or want_ids[i - 1] != -100)]
        assert [s for s, _ in ex.images] == spans
        assert any(lab != IGNORE for lab in ex.labels)  # the replies are learnt
    one = report.examples[0]
    assert one.images[0][0] == 0 and one.input_ids[lens[0]] == tok.bos_token_id  # image first, then <s>


def test_training_learns_and_only_the_lora_trains(setup):
    root, ckpt, data, result = setup
    assert result.losses[-1] < result.losses[0] / 5, result.losses
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_adapter_loads_with_from_pretrained_and_answers(setup):
    root, ckpt, data, result = setup
    tuned = XComposer.from_pretrained(ckpt, adapter=root / "adapter")
    tok = tuned.tokenizer
    from xcomposer.train.trainer import collate, vl_encoder
    report = load_examples(data, tok, "internlm2", "chatml", 100000, strict=True, encode=vl_encoder(tuned))
    batch = report.examples[:2]
    ids, mask, _ = collate(batch, tok.pad_token_id, torch.device("cpu"))
    result.model.eval()
    with torch.no_grad():
        got = tuned.llm(**vl_inputs(tuned, batch, ids), attention_mask=mask)
        want = result.model(**vl_inputs(tuned, batch, ids), attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the tuned model continues each training prompt, from its first labelled position, with the reply
    # that image asks for (the two records differ only in their picture)
    from xcomposer.llm.generation import generate
    for ex in batch:
        cut = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
        end = ex.input_ids.index(tok.token_to_id(E), cut) + 1
        inputs = vl_inputs(tuned, [ex], torch.tensor([ex.input_ids]))
        x, m = inputs["inputs_embeds"][0, :cut], inputs["image_mask"][0, :cut]
        out = generate(tuned.llm, inputs_embeds=[x], image_mask=[m], do_sample=False, max_new_tokens=end - cut)
        assert out.tokens[0][:end - cut] == ex.input_ids[cut:end]
    assert batch[0].input_ids != batch[1].input_ids or batch[0].images[0][1] != batch[1].images[0][1]


def test_the_tower_and_projector_train_in_full_when_asked_and_reload(setup, tmp_path):
    """--train-vision / --train-projector (upstream's fix_vit / fix_sampler False): the tower (but its
    unused post_layernorm) and the projector train beside the LoRA, are written under upstream's keys
    to vision_trainables.safetensors, reload with from_pretrained(adapter=) to the trained model's
    logits, and are refused as a served adapter held beside a shared tower."""
    from safetensors.torch import load_file
    from xcomposer.llm.adapter import VISION_FILE, AdapterError, attach_adapter_
    root, ckpt, data, _ = setup
    out = tmp_path / "vision-adapter"
    result = finetune(FinetuneConfig(folder=str(ckpt), data=str(data), out=str(out), lora_r=4, lora_alpha=8,
                                     lora_dropout=0.0, lr=1e-2, weight_decay=0.0, max_steps=4, batch_size=2,
                                     grad_accum=1, log_every=0, train_vision=True, train_projector=True))
    base = XComposer.from_pretrained(ckpt)
    vl = result.vl
    trained = {n for n, p in vl.named_parameters() if p.requires_grad and not n.startswith("llm.")}
    assert trained and all(n.startswith(("vit.", "vision_proj.")) and "post_layernorm" not in n for n in trained)
    assert {n for n, _ in vl.vision_proj.named_parameters()} <= {n[len("vision_proj."):] for n in trained}
    before, after = dict(base.named_parameters()), dict(vl.named_parameters())
    changed = {n for n in trained if not torch.equal(before[n], after[n])}
    assert any(n.startswith("vit.") for n in changed) and any(n.startswith("vision_proj.") for n in changed)
    assert all(torch.equal(before[n], after[n]) for n in after if "post_layernorm" in n)
    saved = load_file(str(out / VISION_FILE))
    assert set(saved) == {vl.checkpoint_name(n) for n in trained}
    assert all(k.startswith(("vit.vision_tower.vision_model.", "vision_proj.")) for k in saved)

    tuned = XComposer.from_pretrained(ckpt, adapter=out)
    assert any(VISION_FILE in note for note in tuned.load_notes)
    from xcomposer.train.trainer import collate, vl_encoder
    report = load_examples(data, tuned.tokenizer, "internlm2", "chatml", 100000, strict=True, encode=vl_encoder(tuned))
    batch = report.examples[:2]
    ids, mask, _ = collate(batch, tuned.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        got = tuned.llm(**vl_inputs(tuned, batch, ids), attention_mask=mask)
        want = result.model(**vl_inputs(vl, batch, ids, trained=True), attention_mask=mask)
        frozen = base.llm(**vl_inputs(base, batch, ids), attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, frozen, atol=1e-3)
    with pytest.raises(AdapterError, match=VISION_FILE):
        attach_adapter_(base.llm, "tuned", out)


def test_training_the_tower_of_a_text_model_is_refused(tmp_path):
    from xcomposer.tiny import write_tiny_internlm2
    folder = write_tiny_internlm2(tmp_path / "lm2")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="--train-vision / --train-projector apply to XComposer2.5"):
        finetune(FinetuneConfig(folder=str(folder), data=str(data), out=str(tmp_path / "o"), train_projector=True))


def test_resuming_a_run_that_trains_the_projector_equals_running_straight(setup, tmp_path):
    root, ckpt, data, _ = setup
    kw = dict(folder=str(ckpt), data=str(data), lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=1e-2,
              weight_decay=0.0, max_steps=4, batch_size=2, grad_accum=1, log_every=0, train_projector=True)
    straight = finetune(FinetuneConfig(out=str(tmp_path / "straight"), **kw))
    finetune(FinetuneConfig(out=str(tmp_path / "cut"), save_every=2, **{**kw, "max_steps": 4}))
    resumed = finetune(FinetuneConfig(out=str(tmp_path / "cut"), resume=str(tmp_path / "cut" / "checkpoint-2"), **kw))
    assert resumed.losses == straight.losses
    a, b = straight.vl.vision_trainables(), resumed.vl.vision_trainables()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from peft import get_peft_model_state_dict
    la, lb = get_peft_model_state_dict(straight.model), get_peft_model_state_dict(resumed.model)
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_two_processes_train_the_projector_as_one_does(setup, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, accelerate's DDP around the decoder): the projector, which
    runs outside DDP, gets its gradients averaged over the ranks, so the LoRA and the projector equal
    one process's running the same global batch."""
    from conftest import torchrun_xcomposer
    from safetensors.torch import load_file
    from xcomposer.llm.adapter import VISION_FILE
    root, ckpt, data, _ = setup
    finetune(FinetuneConfig(folder=str(ckpt), data=str(data), out=str(tmp_path / "one"), lora_r=4, lora_alpha=8,
                            lora_dropout=0.0, lr=1e-2, weight_decay=0.0, max_steps=2, batch_size=1, grad_accum=2,
                            seed=3, log_every=0, train_projector=True))
    r = torchrun_xcomposer(["finetune", "--folder", str(ckpt), "--data", str(data), "--out", str(tmp_path / "two"),
                            "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--lr", "1e-2",
                            "--weight-decay", "0", "--max-steps", "2", "--batch-size", "1", "--grad-accum", "2",
                            "--seed", "3", "--log-every", "0", "--train-projector"])
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("adapter_model.safetensors", VISION_FILE):
        one, two = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert one.keys() == two.keys() and one
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)


def test_packed_image_records_give_the_padded_loss(setup):
    """--pack on image records: each image's tokens land at its span in the packed row, the Partial LoRA
    reads them there, and the summed loss equals the padded batch's."""
    import random
    from xcomposer.train.trainer import collate, loss_sum, pack_examples, segment_ids, vl_encoder
    root, ckpt, data, result = setup
    model = XComposer.from_pretrained(ckpt, fuse=False)
    report = load_examples(data, model.tokenizer, "internlm2", "chatml", 100000, strict=True,
                           encode=vl_encoder(model))
    examples = report.examples[:4]
    rows = pack_examples(examples, 2 * max(len(e.input_ids) for e in examples), random.Random(0))
    assert len(rows) < len(examples) and sum(len(r.images) for r in rows) == sum(len(e.images) for e in examples)
    pad = model.tokenizer.pad_token_id
    with torch.no_grad():
        ids, mask, labels = collate(examples, pad, "cpu")
        want, n_want = loss_sum(model.llm, ids, mask, labels, False, **vl_inputs(model, examples, ids))
        ids, mask, labels = collate(rows, pad, "cpu")
        got, n_got = loss_sum(model.llm, ids, mask, labels, False, **vl_inputs(model, rows, ids),
                              segments=segment_ids(rows, ids.shape[1], "cpu"))
    assert n_got == n_want
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_merge_writes_an_xcomposer2d5_checkpoint_equal_to_the_adapter_model(setup, tmp_path):
    """`python -m xcomposer merge` on XComposer2.5: the LoRA merged into the decoder, the Partial LoRA and
    task LoRAs kept, the tower / projector an adapter trained written in; the merged folder loads to the
    adapter model's logits; XComposer 1.0 is refused by name."""
    from xcomposer.train import merge_checkpoint
    from xcomposer.train.trainer import collate, vl_encoder
    root, ckpt, data, _ = setup
    adapter = tmp_path / "adapter"
    finetune(FinetuneConfig(folder=str(ckpt), data=str(data), out=str(adapter), lora_r=4, lora_alpha=8,
                            lora_dropout=0.0, lr=1e-2, weight_decay=0.0, max_steps=2, batch_size=2, grad_accum=1,
                            log_every=0, train_projector=True))
    report = merge_checkpoint(ckpt, adapter, tmp_path / "merged")
    assert "vision" in report.note
    merged = XComposer.from_pretrained(tmp_path / "merged")
    held = XComposer.from_pretrained(ckpt, adapter=adapter)
    assert type(merged).__name__ == "XComposer2d5" and merged.config.task_lora_ranks == held.config.task_lora_ranks
    rep = load_examples(data, held.tokenizer, "internlm2", "chatml", 100000, strict=True, encode=vl_encoder(held))
    batch = rep.examples[:2]
    ids, mask, _ = collate(batch, held.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        for loras in ((), ("web",)):
            got = merged.llm(**vl_inputs(merged, batch, ids), attention_mask=mask, task_loras=loras)
            want = held.llm(**vl_inputs(held, batch, ids), attention_mask=mask, task_loras=loras)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    from xcomposer.tiny import write_tiny_xcomposer
    with pytest.raises(ValueError, match="XComposer 1.0"):
        merge_checkpoint(write_tiny_xcomposer(tmp_path / "v1"), adapter, tmp_path / "m1")

"""ImageReward and VQAScore (rewards.py): tiny random models of the real classes, written in the authors' original
file layouts by tiny_rewards.tiny_blip_t5, loaded back through the real loaders. Offline (HF_HUB_OFFLINE=1).

The tokenizers are built offline: a BERT WordPiece vocab.txt folder (the bert-base-uncased layout) and a T5 unigram
tokenizer.json made from a hand-written piece list (transformers' tokenizers backend; no sentencepiece needed).
The original computations are re-implemented here independently (plain torch for ImageReward's timm ViT + BLIP
BERT + head; t2v_metrics' prompt splicing and cross-entropy for VQAScore) and compared with the rewards.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer

import rewards
import tiny_rewards

CAPTIONS = ["a red cat", "two blue squares on the left of a big dog and a small green circle", "photo"]


@pytest.fixture(scope="module", autouse=True)
def offline(monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_rewards.tiny_blip_t5(tmp_path_factory.mktemp("blip_t5"))


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 40, 60, generator=g)  # landscape: exercises the crop (ImageReward) and the pad (VQA)


def clip_normalize(x: torch.Tensor) -> torch.Tensor:
    """torchvision Normalize with OpenAI CLIP's mean and std, as both originals' transforms end."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_constants_pinned():
    assert rewards.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert rewards.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert (rewards.IMAGEREWARD_MEAN, rewards.IMAGEREWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    assert (rewards.IMAGEREWARD_SIZE, rewards.IMAGEREWARD_MAX_TOKENS) == (224, 35)
    assert rewards.IMAGEREWARD_VIT_L == dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                             num_attention_heads=16, image_size=224, patch_size=16,
                                             layer_norm_eps=1e-6, hidden_act="gelu")
    assert rewards.VQA_QUESTION.format("x") == 'Does this figure show "x"? Please answer yes or no.'
    assert rewards.VQA_ANSWER == "Yes" and rewards.VQA_CONTEXT == 2048
    assert rewards.VQA_SYSTEM.startswith("A chat between a curious user") and rewards.VQA_SYSTEM.endswith("questions.")
    assert [round(c * 255) for c in rewards.VQA_PAD_COLOR] == [122, 116, 104]
    assert rewards.VQASCORE_REPOS == {"xxl": ("zhiqiulin/clip-flant5-xxl", "google/flan-t5-xxl"),
                                      "xl": ("zhiqiulin/clip-flant5-xl", "google/flan-t5-xl")}
    assert rewards.REWARDS["imagereward"] is rewards.imagereward_reward
    assert rewards.REWARDS["vqascore"] is rewards.vqascore_reward


# ------------------------------------------------------------------------------------------------------------------
# ImageReward

def imagereward_original_keys(vit_depth: int, bert_depth: int) -> set[str]:
    """The keys of THUDM's ImageReward.pt, written from the original modules (BLIP's timm-style ViT, med.py's BERT
    with cross-attention and no pooler, the MLP head)."""
    wb = ("weight", "bias")
    keys = {"blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed"}
    keys |= {f"blip.visual_encoder.{m}.{p}" for m in ("patch_embed.proj", "norm") for p in wb}
    keys |= {f"blip.visual_encoder.blocks.{i}.{m}.{p}" for i in range(vit_depth) for p in wb
             for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")}
    t = "blip.text_encoder."
    keys |= {t + "embeddings.word_embeddings.weight", t + "embeddings.position_embeddings.weight"}
    keys |= {t + f"embeddings.LayerNorm.{p}" for p in wb}
    keys |= {f"{t}encoder.layer.{i}.{a}.{m}.{p}" for i in range(bert_depth) for p in wb
             for a in ("attention", "crossattention")
             for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")}
    keys |= {f"{t}encoder.layer.{i}.{m}.{p}" for i in range(bert_depth) for p in wb
             for m in ("intermediate.dense", "output.dense", "output.LayerNorm")}
    keys |= {f"mlp.layers.{j}.{p}" for j in (0, 2, 4, 6, 7) for p in wb}
    return keys


def imagereward_reference(sd: dict, pixels, ids, mask, vit_heads: int, bert_heads: int) -> torch.Tensor:
    """The original ImageReward.score in plain torch on the original state dict: BLIP ViT (pre-LN, eps 1e-6, exact
    GELU, final norm) -> BERT (post-LN, eps 1e-12) with cross-attention to all image tokens -> [CLS] -> linear MLP
    -> (r - mean) / std."""
    def ln(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

    def attend(q, k, v, heads, bias=None):
        b, n, d = q.shape
        q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        w = (q @ k.transpose(-1, -2) / math.sqrt(d // heads))
        if bias is not None:
            w = w + bias
        return (w.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)

    v = "blip.visual_encoder."
    w = sd[v + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, sd[v + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), -1, -1), x], 1) + sd[v + "pos_embed"]
    i = 0
    while f"{v}blocks.{i}.norm1.weight" in sd:
        b = f"{v}blocks.{i}."
        h = ln(x, b + "norm1", 1e-6)
        q, k, val = lin(h, b + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, val, vit_heads), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
        i += 1
    image = ln(x, v + "norm", 1e-6)

    t = "blip.text_encoder."
    x = sd[t + "embeddings.word_embeddings.weight"][ids]
    x = x + sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = ln(x, t + "embeddings.LayerNorm", 1e-12)
    pad = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    i = 0
    while f"{t}encoder.layer.{i}.attention.self.query.weight" in sd:
        b = f"{t}encoder.layer.{i}."
        for a, kv, bias in (("attention", x, pad), ("crossattention", image, None)):
            s = b + a + ".self."
            out = attend(lin(x, s + "query"), lin(kv, s + "key"), lin(kv, s + "value"), bert_heads, bias)
            x = ln(x + lin(out, b + a + ".output.dense"), b + a + ".output.LayerNorm", 1e-12)
        x = ln(x + lin(F.gelu(lin(x, b + "intermediate.dense")), b + "output.dense"), b + "output.LayerNorm", 1e-12)
        i += 1
    r = x[:, 0]
    for j in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{j}")
    return (r[:, 0] - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_remap_is_a_bijection_on_the_original_keys(tiny):
    med, vit = tiny_rewards.TINY_MED_CONFIG, tiny_rewards.TINY_BLIP_VISION
    original = imagereward_original_keys(vit["num_hidden_layers"], med["num_hidden_layers"])
    with torch.device("meta"):
        model = rewards.ImageRewardModel(*rewards.imagereward_configs(med, vit))
    ours = set(model.state_dict())
    mapped, skipped = rewards._remap(dict.fromkeys(original), rewards.IMAGEREWARD_RULES)
    assert set(mapped) == ours and len(mapped) == len(original) and not skipped  # onto and one-to-one
    assert {rewards._rename(k, rewards.IMAGEREWARD_RULES, reverse=True) for k in ours} == original
    file_keys = set(torch.load(tiny["imagereward"]["checkpoint"], weights_only=True))
    extras = file_keys - original
    assert extras == {"blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight", "blip.vision_proj.bias",
                      "blip.text_proj.weight", "blip.text_proj.bias"}
    _, skipped = rewards.load_imagereward(tiny["imagereward"]["checkpoint"], med, vit)
    assert set(skipped) == extras  # reported, deliberately unused


def test_imagereward_tokenizer_matches_blip(tiny):
    tok = rewards.imagereward_tokenizer(tiny["imagereward"]["tokenizer"])
    assert tok.bos_token == "[DEC]" and "[ENC]" in tok.all_special_tokens
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(tok) - 2, len(tok) - 1]  # appended, as 30522/30523
    t = tok(["a red cat", " ".join(["dog"] * 50)], padding="max_length", truncation=True, max_length=35)
    assert all(len(ids) == 35 for ids in t["input_ids"])
    assert [ids[0] for ids in t["input_ids"]] == [tok.cls_token_id] * 2  # [CLS] at position 0, never [ENC]
    assert t["input_ids"][0][:5] == tok.convert_tokens_to_ids(["[CLS]", "a", "red", "cat", "[SEP]"])
    assert t["attention_mask"][0] == [1] * 5 + [0] * 30 and t["input_ids"][1][-1] == tok.sep_token_id


def test_imagereward_equals_the_original_computation(tiny, images):
    o = tiny["imagereward"]
    reward = rewards.load_reward("imagereward", **o)
    assert reward.caption_field == "short_caption" and reward.ragged
    sd = torch.load(o["checkpoint"], weights_only=True)
    tok = rewards.imagereward_tokenizer(o["tokenizer"])
    t = tok(CAPTIONS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    pixels = clip_normalize(rewards.resize_center_crop(images, 224))  # Resize(224, bicubic) + CenterCrop(224)
    heads = (tiny_rewards.TINY_BLIP_VISION["num_attention_heads"], tiny_rewards.TINY_MED_CONFIG["num_attention_heads"])
    raw = imagereward_reference(sd, pixels, t["input_ids"], t["attention_mask"], *heads)
    stored = reward(images, CAPTIONS)
    assert stored.dtype == torch.float32 and stored.shape == (3,)
    torch.testing.assert_close(stored, (raw + 2) / 4, atol=1e-5, rtol=1e-5)
    # the tiny model reacts to its inputs, the pixels included: the comparisons above mean something
    assert stored.std() > 0.01 and (reward(images.flip(-1), CAPTIONS) - stored).abs().min() > 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_imagereward_runs_in_half_precision(tiny, images, dtype):
    """dtype=bfloat16|float16 (documented options) run, with the tiny MLP head kept in fp32, and give the float32
    scores up to half-precision rounding."""
    reference = rewards.load_reward("imagereward", **tiny["imagereward"])(images, CAPTIONS)
    reward = rewards.load_reward("imagereward", **tiny["imagereward"], dtype=dtype)
    model = reward.fn.args[0]
    assert model.vision.embeddings.patch_embedding.weight.dtype == getattr(torch, dtype)
    assert {p.dtype for p in model.mlp.parameters()} == {torch.float32}
    stored = reward(images, CAPTIONS)
    assert stored.dtype == torch.float32
    torch.testing.assert_close(stored, reference, atol=0.01, rtol=0)


def test_imagereward_pairs_image_i_with_caption_i(tiny, images):
    reward = rewards.load_reward("imagereward", **tiny["imagereward"])
    s = reward(images, CAPTIONS)
    perm = [2, 0, 1]
    assert torch.equal(reward(images[perm], [CAPTIONS[i] for i in perm]), s[perm])
    one = torch.stack([reward(images[i:i + 1], CAPTIONS[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(one, s, atol=1e-6, rtol=0)
    ragged = reward([images[0], images[1][:, :30, :50]], CAPTIONS[:2])  # a list of sizes: each resized its own way
    assert ragged[0] == pytest.approx(s[0].item(), abs=1e-6) and ragged[1] != pytest.approx(s[1].item(), abs=1e-4)


def test_imagereward_loading_is_strict(tiny, tmp_path):
    o = tiny["imagereward"]
    med, vit = tiny_rewards.TINY_MED_CONFIG, tiny_rewards.TINY_BLIP_VISION
    sd = torch.load(o["checkpoint"], weights_only=True)
    cases = {"missing": {k: v for k, v in sd.items() if k != "blip.visual_encoder.blocks.1.attn.qkv.bias"},
             "extra": {**sd, "blip.text_decoder.cls.predictions.bias": torch.zeros(3)},
             "shape": {**sd, "mlp.layers.7.weight": torch.zeros(1, 17)}}
    for name, state in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match="qkv.bias|text_decoder|mlp.7.weight"):
            rewards.load_imagereward(tmp_path / f"{name}.pt", med, vit)
    with pytest.raises(ValueError, match="unknown option"):
        rewards.load_reward("imagereward", **o, checkpont="typo")
    with pytest.raises(ValueError, match="add_cross_attention"):
        rewards.imagereward_configs({**med, "add_cross_attention": False}, vit)


# ------------------------------------------------------------------------------------------------------------------
# VQAScore

def clip_t5_original_keys(t5_layers: int, vit_layers: int) -> set[str]:
    """Keys of a CLIPT5ForConditionalGeneration state dict (T5 names, LLaVA's tower and projector names)."""
    keys = {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "embed_tokens.weight",
            "lm_head.weight", "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"}
    ff = ("DenseReluDense.wi_0.weight", "DenseReluDense.wi_1.weight", "DenseReluDense.wo.weight", "layer_norm.weight")
    for side, n_layer in (("encoder", 2), ("decoder", 3)):
        for i in range(t5_layers):
            b = f"{side}.block.{i}.layer."
            keys |= {f"{b}0.SelfAttention.{m}.weight" for m in "qkvo"} | {f"{b}0.layer_norm.weight"}
            keys |= {f"{b}{n_layer - 1}.{m}" for m in ff}
            if side == "decoder":
                keys |= {f"{b}1.EncDecAttention.{m}.weight" for m in "qkvo"} | {f"{b}1.layer_norm.weight"}
        keys.add(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    v = "vision_tower.vision_tower.vision_model."
    keys |= {v + k for k in ("embeddings.class_embedding", "embeddings.patch_embedding.weight",
                             "embeddings.position_embedding.weight")}
    keys |= {f"{v}{m}.{p}" for m in ("pre_layrnorm", "post_layernorm") for p in ("weight", "bias")}
    keys |= {f"{v}encoder.layers.{i}.{m}.{p}" for i in range(vit_layers) for p in ("weight", "bias")
             for m in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                       "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")}
    return keys | {f"mm_projector.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}


def vqascore_original(model, tokenizer, image, caption) -> float:
    """t2v_metrics' CLIPT5Model.forward for one (image, caption): PIL expand2square with the 8-bit CLIP mean, the
    t5_chat prompt tokenized chunk by chunk around <image> (-200), image features spliced in, labels = "Yes</s>",
    score = exp(-mean cross-entropy) over the logits of the first len(tokenizer) rows: its loader's
    resize_token_embeddings(len(tokenizer)) keeps those rows of the untied lm_head. (Calling resize here would not
    do: transformers 5 forces T5's tie_word_embeddings on, and resize then ties the head to the embedding.)"""
    pil = Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())
    w, h = pil.size
    square = Image.new("RGB", (max(w, h),) * 2, (122, 116, 104))
    square.paste(pil, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    x = torch.from_numpy(np.array(square)).permute(2, 0, 1).float() / 255
    pixels = clip_normalize(rewards.resize_center_crop(x[None], model.vision.config.image_size))
    prompt = rewards.VQA_SYSTEM + " USER: <image>\n" + rewards.VQA_QUESTION.format(caption) + " ASSISTANT: "
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    ids = torch.tensor(chunks[0] + [-200] + chunks[1])
    at = int((ids == -200).nonzero())
    embed = model.t5.get_input_embeddings()
    hidden = model.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    inputs = torch.cat([embed(ids[:at]), model.projector(hidden)[0], embed(ids[at + 1:])])[None]
    labels = torch.tensor([tokenizer("Yes").input_ids])
    logits = model.t5(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2]), labels=labels).logits
    logits = logits[..., :len(tokenizer)]
    return torch.nn.CrossEntropyLoss()(logits[0], labels[0]).neg().exp().item()


def test_vqascore_remap_is_a_bijection_on_the_original_keys(tiny):
    folder = tiny["vqascore"]["checkpoint"]
    index = json.loads(open(f"{folder}/pytorch_model.bin.index.json").read())
    original = clip_t5_original_keys(t5_layers=2, vit_layers=3)
    assert set(index["weight_map"]) == original  # the tiny folder holds exactly an original state dict
    model, skipped = rewards.load_vqascore(folder)
    assert not skipped
    ours = set(model.state_dict())
    state = rewards._read_hf_weights(Path(folder))
    mapped, _ = rewards.remap_vqascore(state, tied_lm_head=False)
    assert set(mapped) == ours
    # one-to-one apart from the tied embedding: its 4 names in the file fill T5's 3 tied slots
    singles = original - {"embed_tokens.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    assert {rewards._rename(k, rewards.VQASCORE_RULES) for k in singles} == ours - {
        "t5.encoder.embed_tokens.weight", "t5.decoder.embed_tokens.weight"}
    assert model.t5.lm_head.weight.data_ptr() != model.t5.shared.weight.data_ptr()  # FlanT5: untied head
    assert not model.t5.config.scale_decoder_outputs  # ... and no d_model**-0.5 rescaling of the decoder output
    assert model.t5.encoder.embed_tokens.weight.data_ptr() == model.t5.shared.weight.data_ptr()


def test_vqascore_prompt_layout(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["vqascore"]["tokenizer"])
    prefix, suffixes, answer = rewards.vqascore_prompts(tok, ["a red cat", "a dog"])
    assert answer == [tok.convert_tokens_to_ids("▁Yes"), tok.eos_token_id]  # "Yes" + </s>: two label tokens
    assert prefix[-1] == tok.eos_token_id and all(s[-1] == tok.eos_token_id for s in suffixes)  # chunk-wise </s>
    assert tok.convert_ids_to_tokens(prefix[-3:-1]) == ["▁USER", ":"]
    assert tok.convert_ids_to_tokens(suffixes[1][:4]) == ["▁Does", "▁this", "▁figure", "▁show"]
    long = rewards.vqascore_prompts(tok, [" ".join(["dog"] * 3000)])[1][0]
    assert len(prefix) + 1 + len(long) == rewards.VQA_CONTEXT  # cut like input_ids[:, :CONTEXT_LEN]


def test_vqascore_equals_the_original_computation(tiny, images):
    o = tiny["vqascore"]
    reward = rewards.load_reward("vqascore", **o, batch="2")  # batches of 2: padding and a batch boundary
    assert reward.caption_field == "caption" and reward.ragged
    model, _ = rewards.load_vqascore(o["checkpoint"])
    tok = AutoTokenizer.from_pretrained(o["tokenizer"])
    assert model.t5.config.vocab_size > len(tok)  # spare embedding rows, like FlanT5's 32128 vs 32100
    x = (images * 255).round() / 255  # 8-bit pixels, so the PIL padding of the reference is exact
    expected = torch.tensor([vqascore_original(model, tok, x[i], c) for i, c in enumerate(CAPTIONS)])
    stored = reward(x, CAPTIONS)
    assert stored.dtype == torch.float32 and ((stored > 0) & (stored < 1)).all()
    torch.testing.assert_close(stored, expected, atol=1e-6, rtol=1e-5)
    perm = [1, 2, 0]
    torch.testing.assert_close(reward(x[perm], [CAPTIONS[i] for i in perm]), stored[perm], atol=1e-6, rtol=1e-5)
    swapped = reward(x, CAPTIONS[::-1])
    assert not torch.allclose(swapped, stored, atol=1e-5)  # the caption matters


def test_pad_to_square_matches_expand2square():
    x = torch.rand(3, 5, 8)
    sq = rewards.pad_to_square([x, x.transpose(1, 2), torch.rand(3, 4, 4)])
    assert [tuple(s.shape) for s in sq] == [(3, 8, 8), (3, 8, 8), (3, 4, 4)]
    assert torch.equal(sq[0][:, 1:6], x) and torch.equal(sq[1][:, :, 1:6], x.transpose(1, 2))  # offsets floored
    assert torch.equal(sq[0][:, 0, 0], torch.tensor(rewards.VQA_PAD_COLOR)) and torch.equal(sq[0][:, 7], sq[0][:, 6])


def test_vqascore_checkpoint_layouts_and_strictness(tiny, images, tmp_path):
    from safetensors.torch import save_file
    o = tiny["vqascore"]
    base = rewards.load_reward("vqascore", **o)(images, CAPTIONS)
    state = rewards._read_hf_weights(Path(o["checkpoint"]))
    config = json.loads(open(f"{o['checkpoint']}/config.json").read())

    def folder(name, st, fmt="safetensors"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        if fmt == "safetensors":
            save_file({k: v.clone().contiguous() for k, v in st.items()}, d / "model.safetensors")
        elif fmt == "bin":
            torch.save(st, d / "pytorch_model.bin")
        return str(d)

    # one safetensors file with only shared.weight (safetensors drops tied copies), old position_ids buffers
    single = {k: v for k, v in state.items() if "embed_tokens" not in k}
    single["vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    same = rewards.load_reward("vqascore", **{**o, "checkpoint": folder("single", single)})(images, CAPTIONS)
    torch.testing.assert_close(same, base, atol=0, rtol=0)
    # no tower in the checkpoint: it comes from the CLIP folder that mm_vision_tower names, as in the original
    no_tower = {k: v for k, v in state.items() if not k.startswith("vision_tower.")}
    same = rewards.load_reward("vqascore", **{**o, "checkpoint": folder("no_tower", no_tower, "bin")})(images, CAPTIONS)
    torch.testing.assert_close(same, base, atol=0, rtol=0)

    bad = {"missing": ({k: v for k, v in state.items() if k != "mm_projector.2.bias"}, "projector.2.bias"),
           "extra": ({**state, "model.image_newline": torch.zeros(2)}, "image_newline"),
           "untied": ({**state, "embed_tokens.weight": torch.zeros_like(state["shared.weight"])}, "tied")}
    for name, (st, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            rewards.load_vqascore(folder(name, st, "bin"))
    with pytest.raises(ValueError, match="variant"):
        rewards.load_reward("vqascore", **o, variant="xxxl")
    with pytest.raises(FileNotFoundError):
        rewards.load_vqascore(folder("empty", {}, "none"))

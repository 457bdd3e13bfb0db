"""Tiny random reward models of the real classes, written in the original file layouts and read back through
rewards.py's real loaders (no weights can be downloaded in CI). Scores are meaningless."""
import json
from pathlib import Path

import torch

from rewards import (AestheticHead, CLIPFlanT5, IMAGEREWARD_RULES, ImageRewardModel, VQASCORE_RULES,
                     imagereward_configs, _rename)


# Tiny random models of the same classes, saved in the original layouts.
TINY_OPEN_CLIP = {"embed_dim": 768,  # 768 like ViT-L/14, so the LAION head fits on top
                  "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 56},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def tiny_hf_clip():
    """A tiny random transformers CLIPModel (224 px, 77 tokens) and a CLIPTokenizer built offline from open_clip's
    bundled BPE (the same vocabulary and merges as OpenAI's CLIP tokenizer)."""
    import open_clip
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    bpe = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip's spelling
    tokenizer = CLIPTokenizer(vocab={names.get(k, k): v for k, v in bpe.encoder.items()},
                              merges=sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get))
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(tower, image_size=224, patch_size=56), projection_dim=16)
    return CLIPModel(config).eval(), tokenizer


def tiny_clip_family(out_dir, seed: int = 0) -> dict[str, dict]:
    """Write tiny random versions of clip, aesthetic, hpsv2, pickscore and sciscore into out_dir, each in its
    original file layout; returns {name: options} for load_reward(name, **options). Scores are meaningless."""
    import open_clip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "tiny-open-clip.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.save(open_clip.create_model(config.stem, force_quick_gelu=True).state_dict(), out / "clip.pt")
        torch.save({"state_dict": open_clip.create_model(config.stem).state_dict()}, out / "hpsv2.pt")
        torch.save(AestheticHead().state_dict(), out / "aesthetic.pth")
        for name in ("pickscore", "sciscore"):
            model, tokenizer = tiny_hf_clip()
            model.save_pretrained(out / name)
            tokenizer.save_pretrained(out / name)
    common = dict(model_config=str(config))
    return {"clip": dict(common, checkpoint=str(out / "clip.pt")),
            "aesthetic": dict(common, checkpoint=str(out / "clip.pt"), head=str(out / "aesthetic.pth")),
            "hpsv2": dict(common, checkpoint=str(out / "hpsv2.pt")),
            "pickscore": dict(checkpoint=str(out / "pickscore")),
            "sciscore": dict(checkpoint=str(out / "sciscore"))}


# Tiny random ImageReward and CLIP-FlanT5 models, written in the original layouts.
TINY_BLIP_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                        image_size=224, patch_size=56, layer_norm_eps=1e-6, hidden_act="gelu")
TINY_MED_CONFIG = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                       vocab_size=64, max_position_embeddings=64, hidden_act="gelu", layer_norm_eps=1e-12,
                       pad_token_id=0, add_cross_attention=True, encoder_width=24, model_type="bert")
TINY_WORDS = ("a an the of on in and with to is photo red green blue yellow cat dog square circle triangle left "
              "right above below small large big two three").split()
TINY_T5_PIECES = ["<pad>", "</s>", "<unk>", "▁", "▁Yes", ":", ".", "?", '"', ",", "'", "s", "▁USER", "▁ASSISTANT",
                  *dict.fromkeys("▁" + w for w in "Does this figure show Please answer yes or no A chat between "
                                                  "curious user artificial intelligence The gives helpful detailed "
                                                  "polite answers questions".split() + TINY_WORDS)]


def _tiny_spread(model: torch.nn.Module) -> torch.nn.Module:
    """Variance-preserving weights (N(0, 1/fan_in)) for every Linear and Conv2d: with the usual 0.02 init, a tiny
    random model barely reacts to its inputs and all scores agree to four digits, which would hide pairing mistakes.
    BLIP's ViT initialises its patch, class and position embeddings with std 1e-10 (BlipVisionConfig's
    initializer_range): left so, its image tokens are all alike and the scores hardly depend on the pixels."""
    from transformers.models.blip.modeling_blip import BlipVisionEmbeddings
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
        if isinstance(m, BlipVisionEmbeddings):
            torch.nn.init.normal_(m.class_embedding, std=0.02)
            torch.nn.init.normal_(m.position_embedding, std=0.02)
    return model


def tiny_blip_t5(out_dir, seed: int = 0) -> dict[str, dict]:
    """Write tiny random ImageReward and CLIP-FlanT5 models into out_dir in their original layouts (a flat .pt
    with BLIP's names and med_config.json; a sharded pytorch_model.bin folder with CLIPT5's names and config.json
    fields, beside a CLIP vision folder) plus offline tokenizers (a BERT vocab.txt; a T5 unigram tokenizer.json
    over TINY_WORDS). Returns {name: options} for load_reward(name, **options). Scores are meaningless."""
    from transformers import CLIPConfig, CLIPModel, T5Config, T5Tokenizer
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # ImageReward: BERT vocabulary (special tokens first, as in bert-base-uncased) + the model + BLIP's extras.
        (out / "bert").mkdir(exist_ok=True)
        (out / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS,
                                                           '"', "?", "."]) + "\n")
        (out / "med_config.json").write_text(json.dumps(TINY_MED_CONFIG))
        (out / "blip_vision.json").write_text(json.dumps(TINY_BLIP_VISION))
        model = _tiny_spread(ImageRewardModel(*imagereward_configs(TINY_MED_CONFIG, TINY_BLIP_VISION)))
        state = {_rename(k, IMAGEREWARD_RULES, reverse=True): v for k, v in model.state_dict().items()}
        text_width, vision_width = TINY_MED_CONFIG["hidden_size"], TINY_BLIP_VISION["hidden_size"]
        state.update({"blip.text_encoder.embeddings.position_ids": torch.arange(64)[None],
                      "blip.vision_proj.weight": torch.randn(16, vision_width), "blip.text_proj.weight":
                      torch.randn(16, text_width), "blip.vision_proj.bias": torch.zeros(16),
                      "blip.text_proj.bias": torch.zeros(16)})
        torch.save(state, out / "ImageReward.pt")

        # CLIP-FlanT5: a CLIP folder like openai/clip-vit-large-patch14-336 (a whole CLIPModel; mm_vision_tower
        # names it), a FlanT5-style T5 (untied head), the projector; the checkpoint holds the same tower.
        tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2)
        clip = _tiny_spread(CLIPModel(CLIPConfig(
            vision_config=dict(tower, image_size=56, patch_size=14), projection_dim=16, text_config=dict(
                tower, vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))))
        clip.save_pretrained(out / "clip-vision")
        vision = clip.config.vision_config
        t5 = T5Config(vocab_size=len(TINY_T5_PIECES) + 6,  # spare rows, as FlanT5 has 32128 for 32100 tokens
                      d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3, feed_forward_proj="gated-gelu",
                      decoder_start_token_id=0, tie_word_embeddings=False)
        model = _tiny_spread(CLIPFlanT5(t5, vision, "mlp2x_gelu", -2))
        model.vision.load_state_dict({k.removeprefix("vision_model."): v for k, v in clip.state_dict().items()
                                      if k.startswith("vision_model.")})
        state = {_rename(k, VQASCORE_RULES, reverse=True): v for k, v in model.state_dict().items()}
        state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"]) / 24  # FlanT5's head is not tied
        state["embed_tokens.weight"] = state["shared.weight"]               # CLIPT5's alias of the embedding
        folder = out / "clip-flant5"
        folder.mkdir(exist_ok=True)
        names = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        for file, keys in shards.items():
            torch.save({k: state[k].clone() for k in keys}, folder / file)
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
        config = {k: v for k, v in t5.to_dict().items() if k != "scale_decoder_outputs"}  # not in 2023 files
        config |= {"tie_word_embeddings": False, "architectures": ["CLIPT5ForConditionalGeneration"],
                  "model_type": "clip_t5", "mm_vision_tower": str(out / "clip-vision"), "mm_hidden_size": 32,
                  "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
                  "mm_vision_select_feature": "patch", "use_mm_proj": True}
        (folder / "config.json").write_text(json.dumps(config))
    pieces = [(piece, -float(i)) for i, piece in enumerate(TINY_T5_PIECES)]  # unigram log-probabilities
    T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(out / "t5")
    return {"imagereward": dict(checkpoint=str(out / "ImageReward.pt"), med_config=str(out / "med_config.json"),
                                vision_config=str(out / "blip_vision.json"), tokenizer=str(out / "bert")),
            "vqascore": dict(checkpoint=str(folder), tokenizer=str(out / "t5"))}

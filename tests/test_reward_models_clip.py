"""The CLIP-family reward models (clip, aesthetic, hpsv2, pickscore, sciscore), offline.

Tiny random models of the real classes (open_clip CLIP, transformers CLIPModel, the LAION MLP) are saved in each
model's original file layout, loaded back through the real loaders (`load_reward(name, checkpoint=...)`), and must
give exactly the in-memory model's scores, with the paper's normalisation to stored values.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that tried to reach the hub fails instead of downloading

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import rewards
import tiny_rewards

REAL_AESTHETIC_HEAD = (Path(__file__).resolve().parents[2] / "shared" / "weights" / "laion-aesthetic"
                       / "sac+logos+ava1-l14-linearMSE.pth")  # ../shared beside the repo (read-only)
CAPTIONS = ["a red circle left of a blue square", "two cats on a mat", "a photo", "an ugly, blurry picture"]
OPEN_CLIP_REWARDS = ("clip", "aesthetic", "hpsv2")
HF_REWARDS = ("pickscore", "sciscore")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(len(CAPTIONS), 3, 48, 64, generator=g)


@pytest.fixture(scope="module")
def family_options(tmp_path_factory):
    """tiny_rewards.tiny_clip_family: every reward's tiny checkpoint on disk, in its original layout."""
    return tiny_rewards.tiny_clip_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def family(family_options):
    return {name: rewards.load_reward(name, **o) for name, o in family_options.items()}


@pytest.fixture(scope="module")
def tiny_config(family_options):
    """The tiny open_clip architecture (224 px, 77 tokens, 768-d embeddings), registered under its file stem."""
    return Path(family_options["clip"]["model_config"])


def unit(x):
    return F.normalize(x.float(), dim=-1)


# ---- preprocessing ---------------------------------------------------------------------------------------------

def test_preprocessing_constants_match_both_libraries():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from transformers import CLIPImageProcessor
    assert rewards.CLIP_MEAN == tuple(OPENAI_DATASET_MEAN) == (0.48145466, 0.4578275, 0.40821073)
    assert rewards.CLIP_STD == tuple(OPENAI_DATASET_STD) == (0.26862954, 0.26130258, 0.27577711)
    p = CLIPImageProcessor()  # OpenAI's / laion ViT-H-14's settings: 224 shortest edge, 224 crop, bicubic
    assert (p.size["shortest_edge"], p.crop_size["height"], p.crop_size["width"], p.resample) == (224, 224, 224, 3)
    assert tuple(p.image_mean) == rewards.CLIP_MEAN and tuple(p.image_std) == rewards.CLIP_STD
    for arch in ("ViT-L-14", "ViT-H-14"):  # the real architectures: 224 px, 77 tokens
        cfg = open_clip.get_model_config(arch)
        assert (cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]) == (224, 77)


def test_clip_pixels_is_bicubic_resize_centre_crop_normalise():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 300, 200, generator=g)  # portrait: width -> 224, height -> 336, crop rows 56..280
    expect = F.interpolate(x[None], size=(336, 224), mode="bicubic", antialias=True, align_corners=False)
    expect = expect[:, :, 56:280, :].clamp(0, 1)
    mean, std = torch.tensor(rewards.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(rewards.CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(rewards.clip_pixels([x]), (expect - mean) / std)


def test_resize_center_crop_is_torchvisions_resize_then_center_crop():
    """Exactly torchvision's Resize(224) + CenterCrop(224) on a float tensor (open_clip's and BLIP's eval geometry):
    the longer side truncated to int(224 * long / short), the crop offset rounded (375x500 -> 298.67 -> 298;
    225x301 -> 299, offset 37.5 -> 38)."""
    import torchvision.transforms.functional as TF
    g = torch.Generator().manual_seed(3)
    for h, w in [(300, 400), (480, 640), (1000, 333), (375, 500), (225, 301), (64, 80), (224, 224), (500, 224)]:
        x = torch.rand(3, h, w, generator=g)
        ref = TF.center_crop(TF.resize(x, 224, TF.InterpolationMode.BICUBIC, antialias=True), 224).clamp(0, 1)
        torch.testing.assert_close(rewards.resize_center_crop([x], 224)[0], ref, rtol=0, atol=1e-6)


def _smooth_photo(g, h, w):
    """A smooth random image exactly representable in uint8, as a tensor and as a PIL image."""
    from PIL import Image
    x = F.interpolate(torch.rand(1, 3, 12, 16, generator=g), size=(h, w), mode="bilinear")[0]
    x = (x * 255).round() / 255
    return x, Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy())


def test_clip_pixels_agree_with_open_clip_and_the_transformers_processor():
    """Same pixels as open_clip's eval transform and CLIPImageProcessor on the PIL image, up to PIL's bicubic vs
    torch's and uint8 rounding, on square and non-square images (upscaled and downscaled). CLIPImageProcessor floors
    the crop offset where torchvision rounds it: at 225x301 (offset 37.5) the two are a pixel apart, so it is
    compared with open_clip only."""
    from transformers import CLIPImageProcessor
    transform = open_clip.image_transform(224, is_train=False, mean=rewards.CLIP_MEAN, std=rewards.CLIP_STD)
    g = torch.Generator().manual_seed(2)
    for h, w in [(120, 180), (400, 600), (300, 400), (480, 640), (1000, 333), (375, 500), (225, 301), (512, 512)]:
        x, pil = _smooth_photo(g, h, w)
        ours = rewards.clip_pixels(x[None])
        refs = [transform(pil)[None]]
        if (h, w) != (225, 301):
            refs.append(CLIPImageProcessor()(pil, return_tensors="pt")["pixel_values"])
        for ref in refs:
            assert ours.shape == ref.shape == (1, 3, 224, 224)
            # normalised units (1/255 = 0.015); a crop one pixel off gives a mean difference of ~0.03 here
            assert (ours - ref).abs().mean() < 0.01 and (ours - ref).abs().max() < 0.05, (h, w)


def test_hpsv2_letterbox_is_the_hpsv2_packages_transform():
    """resize_letterbox is ResizeMaxSize as the hpsv2 package runs it (on the ToTensor output: torchvision's tensor
    resize of the longer side to 224, the other round(side * scale), zero padding, left/top floored), exactly; and
    matches open_clip's own longest-side eval transform on the PIL image up to PIL's bicubic and uint8 rounding."""
    import torchvision.transforms.functional as TF
    transform = open_clip.image_transform(224, is_train=False, mean=rewards.CLIP_MEAN, std=rewards.CLIP_STD,
                                          resize_mode="longest", fill_color=0)
    g = torch.Generator().manual_seed(4)
    for h, w in [(300, 400), (1000, 333), (48, 64), (225, 301), (224, 100)]:
        x, pil = _smooth_photo(g, h, w)
        scale = 224 / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        resized = TF.resize(x, [nh, nw], TF.InterpolationMode.BICUBIC, antialias=True) if (nh, nw) != (h, w) else x
        left, top = (224 - nw) // 2, (224 - nh) // 2
        ref = TF.pad(resized, [left, top, 224 - nw - left, 224 - nh - top])
        ours = rewards.resize_letterbox([x], 224)[0]
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
        assert ours[:, :, :left].eq(0).all() and ours[:, :top].eq(0).all() and (left or top)  # black bars
        pixels = rewards.clip_pixels(x[None], resize=rewards.resize_letterbox)
        assert (pixels - transform(pil)[None]).abs().mean() < 0.01, (h, w)


# ---- round trips in the original layouts, strict keys, normalisation ------------------------------------------

def _open_clip_round_trip(name, tmp_path, config):
    """In-memory tiny model + reward loaded from its file in the original layout (+ the MLP for aesthetic)."""
    model = open_clip.create_model(config.stem, force_quick_gelu=name != "hpsv2").eval()  # OpenAI CLIP: QuickGELU
    options = dict(model_config=str(config), checkpoint=str(tmp_path / f"{name}.pt"))
    head = None
    if name == "hpsv2":
        torch.save({"state_dict": model.state_dict()}, tmp_path / "hpsv2.pt")  # HPS_v2.1_compressed.pt's layout
    else:
        torch.save(model.state_dict(), tmp_path / f"{name}.pt")  # an open_clip state dict
    if name == "aesthetic":
        head = rewards.AestheticHead().eval()
        torch.save(head.state_dict(), tmp_path / "head.pth")  # keys layers.{0,2,4,6,7}.{weight,bias}
        options["head"] = str(tmp_path / "head.pth")
    return model, head, options


@pytest.mark.parametrize("name", OPEN_CLIP_REWARDS)
def test_open_clip_rewards_round_trip_and_stored_values(name, tmp_path, tiny_config, images):
    model, head, options = _open_clip_round_trip(name, tmp_path, tiny_config)
    reward = rewards.load_reward(name, **options)

    def expected(resize):
        with torch.no_grad():
            img = unit(model.encode_image(rewards.clip_pixels(images, resize=resize)))
            txt = unit(model.encode_text(open_clip.get_tokenizer(tiny_config.stem)(CAPTIONS)))
            # stored values: clip and hpsv2 the raw cosine (= logits / 100), aesthetic the MLP's rating / 10
            return head(img) / 10 if name == "aesthetic" else (img * txt).sum(-1)
    # HPSv2 scores the whole image, letterboxed (the hpsv2 package's transform); the others a centre crop
    resize, other = rewards.resize_center_crop, rewards.resize_letterbox
    if name == "hpsv2":
        resize, other = other, resize
    scores = reward(images, CAPTIONS)
    assert scores.dtype == torch.float32 and scores.shape == (len(CAPTIONS),)
    torch.testing.assert_close(scores, expected(resize), rtol=0, atol=1e-6)
    assert (scores - expected(other)).abs().max() > 1e-5  # 10x the tolerance: on 48x64 images the two differ
    if name == "aesthetic":  # the head really is the LAION MLP: purely linear, so one affine map
        img = unit(model.encode_image(rewards.clip_pixels(images))).detach()
        w = head.layers[7].weight @ head.layers[6].weight @ head.layers[4].weight @ head.layers[2].weight \
            @ head.layers[0].weight
        torch.testing.assert_close(head(img), (img @ w.T).squeeze(-1) + head(torch.zeros(1, 768)), atol=1e-5, rtol=0)


def test_clip_and_aesthetic_use_quick_gelu_hpsv2_plain_gelu(family):
    """OpenAI's weights need QuickGELU (open_clip's ViT-L-14 config says GELU and only warns); laion's ViT-H-14
    (HPSv2) uses GELU."""
    from open_clip.transformer import QuickGELU
    assert isinstance(family["clip"].fn.__self__.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not isinstance(family["hpsv2"].fn.__self__.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def _tiny_hf_folder(folder, logit_scale=30.0):
    model, tokenizer = tiny_rewards.tiny_hf_clip()
    with torch.no_grad():
        model.logit_scale.fill_(torch.log(torch.tensor(logit_scale)))  # not CLIP's 1/0.07, so the scale is checked
    model.save_pretrained(folder)  # the hub layout: config.json + model.safetensors (+ tokenizer files)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.mark.parametrize("name", HF_REWARDS)
def test_hf_clip_rewards_round_trip_and_stored_values(name, tmp_path, images):
    model, tokenizer = _tiny_hf_folder(tmp_path / name)
    reward = rewards.load_reward(name, checkpoint=str(tmp_path / name))
    tokens = tokenizer(CAPTIONS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():  # the model's own full forward: logits = logit_scale.exp() * cosine
        logits = model(pixel_values=rewards.clip_pixels(images), **tokens).logits_per_image
    scores = reward(images, CAPTIONS)
    assert scores.dtype == torch.float32 and scores.shape == (len(CAPTIONS),)
    torch.testing.assert_close(scores, logits.diagonal() / 100, rtol=0, atol=1e-6)  # stored: logits / 100
    assert scores.abs().max() < 0.3  # |cosine| <= 1 times scale 30 / 100


def test_hf_tokenizer_built_offline_matches_open_clip_bpe():
    _, tokenizer = tiny_rewards.tiny_hf_clip()
    ids = tokenizer(CAPTIONS + ["word " * 100], padding="max_length", truncation=True, max_length=77,
                    return_tensors="pt")["input_ids"]
    ref = open_clip.tokenizer.SimpleTokenizer()(CAPTIONS + ["word " * 100])
    mask = ref != 0
    assert torch.equal(ids[mask], ref[mask]) and ids[-1, -1] == 49407  # truncated captions still end with EOS


def _strip_or_add(state: dict, mode: str) -> dict:
    state = dict(state)
    if mode == "missing":
        state.pop(sorted(state)[0])
    else:
        state["extra.weight"] = torch.zeros(1)
    return state


@pytest.mark.parametrize("mode", ["missing", "unexpected"])
@pytest.mark.parametrize("name", OPEN_CLIP_REWARDS)
def test_open_clip_loaders_are_strict(name, mode, tmp_path, tiny_config):
    model, head, options = _open_clip_round_trip(name, tmp_path, tiny_config)
    if name == "aesthetic":  # a broken head: the CLIP under it is fine
        torch.save(_strip_or_add(head.state_dict(), mode), options["head"])
    elif name == "hpsv2":
        torch.save({"state_dict": _strip_or_add(model.state_dict(), mode)}, options["checkpoint"])
    else:
        torch.save(_strip_or_add(model.state_dict(), mode), options["checkpoint"])
    with pytest.raises(ValueError, match=f"[1-9] {mode}"):
        rewards.load_reward(name, **options)


@pytest.mark.parametrize("mode", ["missing", "unexpected"])
def test_hf_loader_is_strict(mode, tmp_path):
    from safetensors.torch import load_file, save_file
    _tiny_hf_folder(tmp_path)
    weights = tmp_path / "model.safetensors"
    save_file(_strip_or_add(load_file(weights), mode), weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{mode}_keys"):
        rewards.load_reward("pickscore", checkpoint=str(tmp_path))


# ---- the reward interface -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPEN_CLIP_REWARDS + HF_REWARDS)
def test_image_i_is_paired_with_caption_i(name, family, images):
    reward = family[name]
    scores = reward(images, CAPTIONS)
    perm = [2, 0, 3, 1]
    # permuting the pairs permutes the scores
    torch.testing.assert_close(reward(images[perm], [CAPTIONS[i] for i in perm]), scores[perm], atol=1e-5, rtol=0)
    # permuting only the captions scores image i against caption perm[i]: the diagonal of the full matrix
    one_by_one = torch.cat([reward(images[i:i + 1], [CAPTIONS[perm[i]]]) for i in range(len(perm))])
    torch.testing.assert_close(reward(images, [CAPTIONS[i] for i in perm]), one_by_one, atol=1e-5, rtol=0)
    if name == "aesthetic":
        torch.testing.assert_close(one_by_one, scores)  # image-only
    else:
        assert not torch.allclose(one_by_one, scores)


@pytest.mark.parametrize("name", OPEN_CLIP_REWARDS + HF_REWARDS)
def test_ragged_images_and_caption_fields(name, family, images):
    reward = family[name]
    assert reward.ragged and reward.caption_field == ("caption" if name == "aesthetic" else "short_caption")
    ragged = [images[0], images[1, :, :40, :40], torch.rand(3, 300, 224)]
    scores = reward(ragged, CAPTIONS[:3])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores[:1], reward(images[:1], CAPTIONS[:1]), atol=1e-5, rtol=0)


def test_option_errors_are_clear_and_offline(tmp_path, tiny_config):
    with pytest.raises(ValueError, match="unknown option.*known: checkpoint"):
        rewards.load_reward("pickscore", chekpoint="x")
    with pytest.raises(ValueError, match="non-commercial.*trust_remote_code=1"):
        rewards.load_reward("clip", backend="jina")
    with pytest.raises(ValueError, match="backend must be openai or jina, got 'siglip'"):
        rewards.load_reward("clip", backend="siglip")
    with pytest.raises(ValueError, match="version must be 2.1 or 2.0"):
        rewards.load_reward("hpsv2", version="3")
    with pytest.raises(FileNotFoundError):
        rewards.load_reward("hpsv2", checkpoint=str(tmp_path / "missing.pt"), model_config=str(tiny_config))
    with pytest.raises(FileNotFoundError):
        rewards.load_reward("aesthetic", head=str(tmp_path / "missing.pth"), model_config=str(tiny_config),
                            checkpoint=str(tmp_path / "missing.pt"))
    for name in OPEN_CLIP_REWARDS:  # a tiny architecture never falls back to downloading real weights
        with pytest.raises(ValueError, match="needs checkpoint"):
            rewards.load_reward(name, model_config=str(tiny_config))
    _, _, options = _open_clip_round_trip("clip", tmp_path, tiny_config)
    with pytest.raises(ValueError, match="precision"):
        rewards.load_reward("clip", precision="fp16", **options)


def test_unreadable_weight_files_are_one_line_errors(tmp_path):
    """A torn or foreign weights file (a training checkpoint holding numpy scalars, a list) is a ValueError of one
    line naming the file, which the CLIs print as their error."""
    (tmp_path / "torn.safetensors").write_bytes(b"xx")
    torch.save({"epoch": np.int64(3), "weight": torch.zeros(2)}, tmp_path / "numpy.pth")  # not weights-only
    (tmp_path / "torn.pth").write_bytes((tmp_path / "numpy.pth").read_bytes()[:64])
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    for name, message in [("torn.safetensors", "(truncated, or not safetensors): Error while deserializing header"),
                          ("numpy.pth", "WeightsUnpickler error: Unsupported global: GLOBAL numpy"),
                          ("torn.pth", "(truncated, or not a torch checkpoint)"),
                          ("list.pth", "it holds a list, not a state dict")]:
        with pytest.raises(ValueError) as error:
            rewards.load_aesthetic_head(tmp_path / name)
        assert message in str(error.value) and str(tmp_path / name) in str(error.value)
        assert "\n" not in str(error.value) and "Please use" not in str(error.value)


def test_hpsv2_version_20_names_the_v2_file():
    assert rewards.HPSV2_FILES == {"2.1": "HPS_v2.1_compressed.pt", "2.0": "HPS_v2_compressed.pt"}


# ---- the real LAION aesthetic head -----------------------------------------------------------------------------

@pytest.mark.skipif(not REAL_AESTHETIC_HEAD.is_file(), reason="real LAION aesthetic head not present")
def test_real_aesthetic_head_loads_strictly_and_scores_deterministically(tmp_path, tiny_config, images):
    state = torch.load(REAL_AESTHETIC_HEAD, map_location="cpu", weights_only=True)
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    head = rewards.load_aesthetic_head(REAL_AESTHETIC_HEAD)
    g = torch.Generator().manual_seed(0)
    emb = unit(torch.randn(8, 768, generator=g))  # fixed L2-normalised embeddings
    out = head(emb)
    assert torch.isfinite(out).all() and torch.equal(out, rewards.load_aesthetic_head(REAL_AESTHETIC_HEAD)(emb))
    assert out.std() > 0 and ((out > 1) & (out < 10)).all()  # LAION's 1-10 ratings (4.6 to 6.4 here)
    assert abs(head(torch.zeros(1, 768)).item() - 5.2366) < 1e-3  # the bias path of this very file
    # through the reward, on a tiny 768-d CLIP: the stored value is the rating / 10
    model, _, options = _open_clip_round_trip("clip", tmp_path, tiny_config)
    reward = rewards.load_reward("aesthetic", head=str(REAL_AESTHETIC_HEAD), **options)
    scores = reward(images, CAPTIONS)
    with torch.no_grad():
        expect = head(unit(model.encode_image(rewards.clip_pixels(images)))) / 10
    torch.testing.assert_close(scores, expect, rtol=0, atol=1e-6)
    assert torch.equal(scores, reward(images, CAPTIONS))

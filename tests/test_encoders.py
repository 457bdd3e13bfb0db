"""Frozen text encoders, the SDXL VAE and their caches, through the real loaders on tiny random models.

Each tiny model is of the real class, saved in the original layout (a full T5ForConditionalGeneration checkpoint
and its tokenizer.json, an open_clip state dict + JSON config, an AutoencoderKL folder) and loaded back by the
same code that loads google/flan-t5-xl, ViT-L-14/openai and stabilityai/sdxl-vae. The T5 tokenizer is a
tokenizers-backed T5Tokenizer built from a tiny Unigram vocabulary (no sentencepiece needed); CLIP's BPE ships
with open_clip. The tiny models are built by conftest.py's fixtures.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import model as M

CAPTIONS = ["a photo of two red cats", "a blue dog", "", "three green squares on the left of a circle " * 3]
from conftest import WORDS


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def t5(t5_dir):
    return M.load_text_encoder("t5", source=str(t5_dir), max_length=12)


@pytest.fixture(scope="module")
def vae(vae_dir):
    return M.SDXLVAE(source=str(vae_dir))


def _tiny_miro(dim, **overrides):
    return M.MIRO(M.get_config("tiny", vocab_size=0, text_dim=dim, **overrides))


# ---- text encoders ----------------------------------------------------------------------------------------------

def test_t5_encoder_features_mask_and_freezing(t5, t5_dir):
    from transformers import T5EncoderModel
    features, mask = t5(CAPTIONS)
    assert features.shape == (4, 12, 16) and features.dtype == torch.float32 and mask.dtype == torch.bool
    ids = t5.tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    assert torch.equal(mask, ids["attention_mask"].bool())
    assert mask.sum(1).tolist()[2] == 1 and mask[3].all()  # "" is just </s>; the long caption is truncated
    assert (features[~mask] == 0).all()  # padded positions are zero
    reference = T5EncoderModel.from_pretrained(t5_dir).eval()(**ids).last_hidden_state  # run over all 12 tokens
    torch.testing.assert_close(features[mask], reference[mask])  # the encoder's own hidden states
    alone, alone_mask = t5(CAPTIONS[1:2])  # run over 4 tokens only: the same features
    assert torch.equal(alone_mask, mask[1:2])
    torch.testing.assert_close(alone, features[1:2])
    assert t5.dim == 16 and t5.max_length == 12 and not t5.model.training
    assert not any(p.requires_grad for p in t5.model.parameters())


def test_clip_encoder_per_token_states_pool_to_clip_text_features(clip_files):
    clip = M.load_text_encoder("clip", **clip_files)
    features, mask = clip(CAPTIONS)
    assert features.shape == (4, 77, 24) and clip.dim == 24 and clip.max_length == 77
    tokens = clip.tokenizer(CAPTIONS)
    lengths = [len(clip.tokenizer.encode(c)) + 2 for c in CAPTIONS]  # SOT + BPE tokens + EOT
    assert torch.equal(mask, torch.arange(77)[None] < torch.tensor(lengths)[:, None])  # a prefix of each row
    assert (features[~mask] == 0).all()
    # The state at the end-of-text token, projected, is exactly CLIP's pooled text feature.
    pooled = features[torch.arange(4), mask.sum(1) - 1] @ clip.model.text_projection
    torch.testing.assert_close(pooled, clip.model.encode_text(tokens), rtol=1e-5, atol=1e-5)
    assert not hasattr(clip.model, "visual") and not any(p.requires_grad for p in clip.model.parameters())


def test_load_text_encoder_names_and_options(t5_dir):
    assert M.load_text_encoder("builtin") is None  # the model's trainable WordTokenizer path
    with pytest.raises(ValueError, match="unknown text encoder"):
        M.load_text_encoder("bert")
    with pytest.raises(ValueError, match="text encoder t5"):
        M.load_text_encoder("t5", source=str(t5_dir), max_len=77)
    with pytest.raises(ValueError, match="precision"):
        M.load_text_encoder("t5", source=str(t5_dir), precision="fp16")
    for bad in ("0", "-3", "many"):  # a cache of zero-length features otherwise
        with pytest.raises(ValueError, match=f"t5: max_length must be a positive integer, got '{bad}'"):
            M.load_text_encoder("t5", source=str(t5_dir), max_length=bad)


# ---- the generator on frozen features ---------------------------------------------------------------------------

def test_padding_is_invisible_to_the_model(t5):
    torch.manual_seed(0)
    model = _tiny_miro(t5.dim).eval()
    for block in model.blocks:  # leave adaLN-Zero's identity init, so the text reaches the output
        torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.2)
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.2)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.2)
    features, mask = t5(CAPTIONS[:3])
    x, t, rewards = torch.randn(3, 3, 16, 16), torch.rand(3), torch.rand(3, 2)
    out = model(x, t, features, mask, rewards)
    garbage = features + 100 * torch.randn_like(features) * (~mask[..., None])  # change padded positions only
    torch.testing.assert_close(model(x, t, garbage, mask, rewards), out, rtol=0, atol=1e-5)
    assert not torch.allclose(model(x, t, garbage, None, rewards), out, atol=1e-3)  # without the mask it changes
    short, short_mask = M.trim_padding(features, mask)
    assert short.shape[1] == int(mask.sum(1).max()) < features.shape[1]
    torch.testing.assert_close(model(x, t, short, short_mask, rewards), out, rtol=1e-5, atol=1e-5)


def test_miro_trains_on_frozen_encoder_features(t5):
    torch.manual_seed(0)
    model = _tiny_miro(t5.dim)
    for block in model.blocks:  # non-zero cross-attention output, so the text path gets gradients at step 1
        torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.2)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.2)
    frozen = {k: v.clone() for k, v in t5.model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    features, mask = t5(CAPTIONS)
    assert not features.requires_grad
    x0, eps, t = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.rand(4)
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    before = model.text_embedder.proj.weight.detach().clone()
    loss = torch.nn.functional.mse_loss(model(xt, t, features, mask, torch.rand(4, 2)), eps - x0)
    loss.backward()
    assert model.text_embedder.proj.weight.grad.abs().sum() > 0  # the projection of the frozen features learns
    opt.step()
    assert not torch.equal(model.text_embedder.proj.weight, before)
    assert all(p.grad is None for p in t5.model.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in t5.model.state_dict().items())


# ---- caches -----------------------------------------------------------------------------------------------------

def test_text_cache_equals_on_the_fly_and_resumes(t5, tmp_path):
    records = [(f"k{i}", CAPTIONS[i % 4] + " " + WORDS[i]) for i in range(11)]
    root = tmp_path / "t5cache"
    written = [M.precompute_text_embeddings(root, records, t5, rank=r, world_size=2, batch_size=2, chunk_size=3)
               for r in (1, 0)]  # two ranks' share, rank 0 last: it merges the index
    assert sum(written) == 12  # 11 captions + the empty caption
    cache = M.TextEmbeddingCache(root)
    assert len(cache.cache) == 12 and (cache.name, cache.dim, cache.max_length) == (t5.name, 16, 12)
    keys = ["k7", "k0", M.EMPTY_CAPTION_KEY, "k10", "k3"]
    captions = [dict(records)[k] if k else "" for k in keys]
    features, mask = cache(keys)
    expected, expected_mask = t5(captions)
    assert torch.equal(mask, expected_mask)
    # fp16 storage; float32 features differ in their last bits between batches padded to other lengths (other
    # matmul shapes), so not even the fp16 rounding is bit-identical
    torch.testing.assert_close(features, expected, rtol=2e-3, atol=1e-3)
    for batch in (keys, [M.EMPTY_CAPTION_KEY, "k1"], [M.EMPTY_CAPTION_KEY]):  # training's reads: trim_padding's
        trimmed = cache(batch, trim=True)                                   # cut, never built at full width
        assert all(torch.equal(a, b) for a, b in zip(trimmed, M.trim_padding(*cache(batch))))
    assert trimmed[0].shape[1] < cache.max_length and trimmed[0].is_contiguous()
    # Resume: a lost chunk (and a torn .tmp) is redone, nothing else; a stale index is refused until merged.
    lost = sorted(root.glob("chunk-2x0001-*.safetensors"))[-1]
    lost_keys = M._chunk_keys(lost)
    lost.unlink()
    (root / "chunk-2x0001-000009.safetensors.tmp").write_bytes(b"torn")
    with pytest.raises(ValueError, match="index"):
        M.TextEmbeddingCache(root)
    assert M.precompute_text_embeddings(root, records, t5, rank=0, world_size=1, chunk_size=3) == len(lost_keys)
    torch.testing.assert_close(M.TextEmbeddingCache(root)(keys)[0], features, rtol=0, atol=0)
    with pytest.raises(KeyError, match="nope"):
        cache(["nope"])
    with pytest.raises(ValueError, match="another cache"):  # other settings never mix into one folder
        M.precompute_text_embeddings(root, records, t5, dtype=torch.bfloat16)
    # A lost chunk in the middle: the rerun writes after the last one, never over a good one.
    middle = sorted(root.glob("chunk-2x0000-*.safetensors"))[0]
    lost_keys = M._chunk_keys(middle)
    middle.unlink()
    assert M.precompute_text_embeddings(root, records, t5, rank=0, world_size=2, chunk_size=3) == len(lost_keys)
    assert len(M.TextEmbeddingCache(root).cache) == 12
    meta = json.loads((root / "meta.json").read_text())  # a cache of an older model.py, keyed without the captions
    (root / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "keys"}))
    with pytest.raises(ValueError, match="text cache of an older model.py .* run model.py precompute again"):
        M.TextEmbeddingCache(root)


def test_cache_keeps_one_copy_of_a_duplicated_key_and_bounds_open_chunks(tmp_path, capsys):
    """Keys not unique across a dataset's shards reach two ranks: the index keeps the first chunk's copy (rank 0's
    here) with a warning, the same on every run; a reader holds at most MAX_OPEN chunk files open."""
    records = [("a", 1.0), ("dup", 2.0), ("dup", 3.0), ("b", 4.0), ("c", 5.0), ("d", 6.0)]
    encode = lambda keys, items: [torch.full((1, 2), x) for x in items]  # noqa: E731
    for rank in (1, 0):  # rank 0 takes a, dup=3, c; rank 1 dup=2, b, d; both at once, as under torchrun
        M.precompute_cache(tmp_path / f"rank{rank}", records, encode, {"kind": "test"}, rank=rank, world_size=2,
                           chunk_size=1)
    for chunk in [*tmp_path.glob("rank1/chunk-*"), *tmp_path.glob("rank0/*")]:
        shutil.copy(chunk, tmp_path)
    assert M.merge_cache_index(tmp_path) == 1 and "1 key(s) stored twice (e.g. 'dup')" in capsys.readouterr().out
    cache = M.ArrayCache(tmp_path)
    assert len(cache) == 5 and cache.items(["dup"])[0].tolist() == [[3.0, 3.0]]
    cache.MAX_OPEN = 2
    values = cache.items(["a", "b", "c", "d", "dup", "a"])
    assert [v[0, 0].item() for v in values] == [1.0, 4.0, 5.0, 6.0, 3.0, 1.0] and len(cache._open) == 2


def test_load_vae_names_and_options(vae_dir):
    assert M.load_vae("none") is None  # pixel space
    assert isinstance(M.load_vae("sdxl", source=str(vae_dir)), M.SDXLVAE)
    with pytest.raises(ValueError, match="unknown VAE"):
        M.load_vae("sd15")
    with pytest.raises(ValueError, match="VAE sdxl"):
        M.load_vae("sdxl", source=str(vae_dir), scale=0.18215)


def test_vae_normalisation_is_the_method_constants_and_inverts(vae):
    mean, std = torch.tensor(M.LATENT_MEAN).view(1, 4, 1, 1), torch.tensor(M.LATENT_STD).view(1, 4, 1, 1)
    z = mean + std * torch.randn(3, 4, 5, 5, dtype=torch.float64)
    z_n = vae.normalize(z)
    torch.testing.assert_close(z_n, (z - mean) / std * 0.5)
    torch.testing.assert_close(vae.denormalize(z_n), z, rtol=1e-12, atol=1e-12)
    assert vae.normalize(mean.expand(1, 4, 2, 2)).abs().max() < 1e-6
    torch.testing.assert_close(vae.normalize(mean + std), torch.full((1, 4, 1, 1), 0.5))


def test_vae_encode_samples_the_posterior_reproducibly_and_decode_inverts(vae):
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    gens = lambda: [M.key_generator(k, seed=0) for k in ("a", "b", "c")]  # noqa: E731
    z = vae.encode(images, gens())
    assert z.shape == (3, 4, 8, 8)  # 16 px / 8 per latent pixel, 4 channels
    assert torch.equal(vae.encode(images, gens()), z)  # seeded
    assert not torch.allclose(vae.encode(images, [M.key_generator(k, seed=1) for k in "abc"]), z)
    torch.testing.assert_close(vae.encode(images[1:2], gens()[1:2]), z[1:2])  # per image, not per batch
    posterior = vae.model.encode(images).latent_dist  # a sample: mean + std * eps, eps from the key's generator
    eps = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens()])
    torch.testing.assert_close(z, vae.normalize(posterior.mean + posterior.std * eps))
    decoded = vae.decode(z)
    assert decoded.shape == images.shape
    torch.testing.assert_close(decoded, vae.model.decode(vae.denormalize(z)).sample)


def test_latent_cache_equals_on_the_fly(vae, tmp_path):
    torch.manual_seed(1)
    records = [(f"img{i}", torch.rand(3, 16, 16) * 2 - 1) for i in range(7)]
    root = tmp_path / "latents"
    for r in (1, 0):
        M.precompute_latents(root, records, vae, image_size=16, seed=3, rank=r, world_size=2, batch_size=2,
                             chunk_size=2)
    cache = M.LatentCache(root)
    assert len(cache.cache) == 7 and cache.seed == 3 and cache.image_size == 16
    keys = ["img5", "img0", "img3"]
    expected = vae.encode(torch.stack([dict(records)[k] for k in keys]), [M.key_generator(k, 3) for k in keys])
    torch.testing.assert_close(cache(keys), expected, rtol=2e-3, atol=1e-3)
    with pytest.raises(ValueError, match="16x16"):
        M.precompute_latents(tmp_path / "bad", [("x", torch.zeros(3, 8, 8))], vae, image_size=16)
    meta = json.loads((root / "meta.json").read_text())  # latents of other normalisation constants
    (root / "meta.json").write_text(json.dumps({**meta, "std": [1.0, 1.0, 1.0, 1.0]}))
    with pytest.raises(ValueError, match="normalised with mean, std, scale .* precompute again"):
        M.LatentCache(root)


def test_loaders_are_strict(vae_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil
    broken = tmp_path / "vae"
    shutil.copytree(vae_dir, broken)
    weights = load_file(broken / "diffusion_pytorch_model.safetensors")
    weights.pop(next(k for k in weights if k.startswith("decoder.")))
    save_file(weights, broken / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="do not match AutoencoderKL"):
        M.SDXLVAE(source=str(broken))


def test_a_file_as_source_is_a_one_line_error(t5_dir, vae_dir, tmp_path, capsys):
    """source= names a hub-layout folder or a hub id: a file (a config.json, a weights file) failed deep inside
    from_pretrained (KeyError for the VAE, UnpicklingError for T5)."""
    for load, file in ((lambda f: M.load_text_encoder("t5", source=f), t5_dir / "config.json"),
                       (lambda f: M.load_vae("sdxl", source=f), vae_dir / "config.json"),
                       (lambda f: M.SDXLVAE(source=f), vae_dir / "diffusion_pytorch_model.safetensors")):
        with pytest.raises(ValueError) as e:
            load(str(file))
        assert str(e.value) == f"source={file}: a folder in the hub layout (or a hub id), not a file"
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "0.png")
    (images / "0.txt").write_text("a photo")
    for flags in (["--vae", "sdxl", "--vae-option", f"source={vae_dir / 'config.json'}"],
                  ["--text-encoder", "t5", "--text-encoder-option", f"source={t5_dir / 'config.json'}"]):
        with pytest.raises(SystemExit) as e:
            M.main(["precompute", "--data", str(images), "--out", str(tmp_path / "cache"), *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "not a file" in err.splitlines()[-1] and "Traceback" not in err, err


# ---- train.py / sample.py with frozen parts ---------------------------------------------------------------------

def test_train_resume_and_sample_with_frozen_t5_and_sdxl_vae(t5_dir, vae_dir, tmp_path):
    """--text-encoder t5 --vae sdxl through train.py (the model takes T5 features and 4-channel latents), the
    checkpoint records the frozen parts, --resume alone reloads them, and sample.py decodes to pixels."""
    import sample
    import train
    from conftest import tiny_train_args
    runs, run = tmp_path / "runs", tmp_path / "runs" / "miro"
    frozen = ["--text-encoder", "t5", "--text-encoder-option", f"source={t5_dir}",
              "--text-encoder-option", "max_length=12", "--vae", "sdxl", "--vae-option", f"source={vae_dir}"]
    train.main(tiny_train_args(runs, *frozen, "--steps", "3", "--keep-every", "0", "--log-every", "1"))
    ckpt = M.load_checkpoint(run / "ckpt.pt")
    cfg = M.ModelConfig(**ckpt["config"])
    assert (cfg.in_channels, cfg.vocab_size, cfg.text_dim, cfg.max_text_len, cfg.image_size) == (4, 0, 16, 12, 16)
    assert ckpt["frozen"] == {"text_encoder": {"name": "t5", "source": str(t5_dir), "max_length": "12"},
                              "vae": {"name": "sdxl", "source": str(vae_dir)}}
    assert not any(k.startswith(("text_embedder.words", "text_embedder.pos")) for k in ckpt["model"])
    init = M.MIRO(cfg).state_dict()  # the text projection learned from the T5 features
    assert not torch.equal(ckpt["model"]["text_embedder.proj.weight"], init["text_embedder.proj.weight"])
    log = (run / "log.txt").read_text()
    assert "loss nan" not in log and log.count("step ") >= 3

    train.main(tiny_train_args(runs, "--resume", str(run), "--steps", "4", "--keep-every", "0"))  # frozen parts: the run's
    assert M.load_checkpoint(run / "ckpt.pt")["step"] == 4
    with pytest.raises(SystemExit):  # another text encoder cannot continue this run
        train.main(tiny_train_args(runs, "--resume", str(run), "--steps", "5", "--text-encoder", "clip"))

    out = tmp_path / "grid.png"
    sample.main(["--ckpt", str(run), "--prompt", "a red cat", "--n", "2", "--steps", "2", "--out", str(out)])
    from PIL import Image
    singles = sorted((tmp_path / "grid").glob("*.png"))
    assert len(singles) == 2 and Image.open(singles[0]).size == (32, 32)  # 16x16 latents decoded by the 2x VAE

    import evaluate  # evaluation samples through the same frozen parts and judges decoded pixels
    evaluate.main(["rewards", "--ckpt", str(run), "--n-per-prompt", "1", "--steps", "2", "--min-per-task", "1",
                   "--out", str(tmp_path / "eval")])
    result = json.loads((tmp_path / "eval" / "rewards.json").read_text())["rewards"]
    assert result and all(0 <= v["mean"] <= 1 for v in result.values())


def test_precompute_cli_caches_give_the_training_batch_computed_on_the_fly(t5_dir, vae_dir, tmp_path, capsys):
    """`model.py precompute` (one process, and two torchrun ranks for the text cache) fills the caches that
    train.ModelInputs reads in place of the encoders: the same text features and latents within fp16 rounding,
    dropped captions included; then train.py trains from them."""
    import os
    import subprocess
    import sys

    import data
    import train
    from conftest import tiny_train_args
    runs = tmp_path / "runs"
    world = data.build_shapes_dataset(data.WorldConfig(image_size=32, num_train=48), tmp_path / "data")  # train's
    text_flags = ["--text-encoder", "t5", "--text-encoder-option", f"source={t5_dir}",
                  "--text-encoder-option", "max_length=12"]
    vae_flags = ["--vae", "sdxl", "--vae-option", f"source={vae_dir}"]
    for run in ("first", "rerun"):  # the rerun finds everything cached
        M.main(["precompute", "--data", str(world), "--out", str(tmp_path / "cache"), *text_flags, *vae_flags,
                "--image-size", "32", "--batch-size", "5"])
    assert "rank 0: 0 images encoded" in capsys.readouterr().out
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(M.__file__), "precompute", "--data", str(world), "--out", str(tmp_path / "two"),
                          *text_flags, "--batch-size", "5"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]

    samples = data.ImageTextSamples(world)
    images, captions, _, sources = data.collate([data.MiroDataset(samples)[i] for i in (3, 0, 17, 40)])
    keep = torch.tensor([True, False, True, True])
    text_encoder, vae = M.load_frozen(train.frozen_spec("t5", text_flags[3::2], "sdxl", vae_flags[3::2]))
    live = train.ModelInputs(None, text_encoder, vae, seed=0)
    cached = train.ModelInputs(None, text_encoder, vae, seed=0, text_cache=tmp_path / "cache" / "text",
                               latent_cache=tmp_path / "cache" / "latents", image_size=32)
    by_two = train.ModelInputs(None, text_encoder, vae, seed=0, text_cache=tmp_path / "two" / "text")
    (f, m), (fc, mc), (f2, m2) = (x.text(captions, sources, keep) for x in (live, cached, by_two))
    assert torch.equal(m, mc) and torch.equal(m, m2) and m[1].sum() == 1  # the dropped caption is "" (just </s>)
    torch.testing.assert_close(fc, f, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(f2, fc, rtol=2e-3, atol=1e-3)  # two ranks cached what one process cached
    torch.testing.assert_close(cached.images(images, sources), live.images(images, sources), rtol=2e-3, atol=2e-3)
    assert len(M.TextEmbeddingCache(tmp_path / "two" / "text").cache) == 49  # 48 captions + the empty one
    edited = ["a photo of a purple square", *captions[1:]]  # another caption under the same key: a miss, not a feed
    with pytest.raises(SystemExit, match=f"'{samples.keys[3]}#[0-9a-f]{{12}}' is not in the cache"):
        cached.text(edited, sources, keep)

    caches = ["--text-cache", str(tmp_path / "cache" / "text"), "--latent-cache", str(tmp_path / "cache" / "latents")]
    train.main(tiny_train_args(runs, *text_flags, *vae_flags, *caches, "--steps", "2", "--keep-every", "0"))
    assert M.load_checkpoint(runs / "miro" / "ckpt.pt")["step"] == 2
    with pytest.raises(SystemExit):  # a latent cache of another posterior seed is refused
        train.main(tiny_train_args(runs, *text_flags, *vae_flags, *caches, "--seed", "1", "--name", "other"))


def test_a_latent_cache_that_lacks_the_runs_images_is_a_one_line_error(vae, vae_dir, tmp_path, capsys):
    """A cache made for other data stops the run at the first image it lacks (one line, the last checkpoint kept),
    and one made with a larger --min-image-size than the run's is refused before training starts."""
    import data
    import train
    from conftest import tiny_train_args
    runs = tmp_path / "runs"
    world = data.build_shapes_dataset(data.WorldConfig(image_size=32, num_train=48), tmp_path / "data")
    samples = data.ImageTextSamples(world)
    vae_flags = ["--vae", "sdxl", "--vae-option", f"source={vae_dir}"]
    pixels = lambda i: torch.from_numpy(np.array(samples.images[i])).permute(2, 0, 1).float() / 127.5 - 1
    M.precompute_latents(tmp_path / "part", [(samples.keys[i], pixels(i)) for i in range(10)], vae, image_size=32)
    with pytest.raises(SystemExit, match="is not in the cache .*part.*last checkpoint is kept"):
        train.main(tiny_train_args(runs, *vae_flags, "--latent-cache", str(tmp_path / "part")))
    assert not (runs / "miro" / "ckpt.pt").exists()  # it stopped at its first batch, before any step
    other = data.build_shapes_dataset(data.WorldConfig(image_size=16, num_train=48), tmp_path / "data16")
    M.main(["precompute", "--data", str(other), "--out", str(tmp_path / "c16"), *vae_flags, "--image-size", "32"])
    capsys.readouterr()  # a 16-px world upscaled to 32 px, under the same keys as the run's 32-px world
    with pytest.raises(SystemExit):
        train.main(tiny_train_args(runs, *vae_flags, "--latent-cache", str(tmp_path / "c16" / "latents"),
                                   "--name", "other"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"holds the images of {other.resolve()}, not of {(tmp_path / 'data').resolve()}" in err

    folder = tmp_path / "folder"  # a real format (the built-in world's images are not screened by size)
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.asarray(samples.images[i])).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(samples.captions[i])
    M.main(["precompute", "--data", str(folder), "--out", str(tmp_path / "big"), *vae_flags, "--image-size", "32",
            "--min-image-size", "33"])  # every 32-px image is below the minimum: nothing is cached
    assert len(M.LatentCache(tmp_path / "big" / "latents").cache) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(["--preset", "tiny", "--runs-dir", str(runs), "--name", "small", "--data", str(folder),
                    "--no-rewards", *vae_flags, "--latent-cache", str(tmp_path / "big" / "latents")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds only images of at least 33 px: train with --min-image-size 33" in err
    assert "step " not in (runs / "small" / "log.txt").read_text()  # refused before training

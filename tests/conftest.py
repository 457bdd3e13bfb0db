"""Make the flat top-level modules importable however pytest is launched."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import string

import pytest
import torch


def tiny_train_args(runs_dir, *extra):
    """Flags of a seconds-long training run: tiny preset, a 48-sample built-in world shared by the session
    (6 steps per epoch, so 8 steps and a resume at step 4 cross an epoch boundary)."""
    data_dir = Path(runs_dir).parent / "data"
    return ["--preset", "tiny", "--runs-dir", str(runs_dir), "--data-dir", str(data_dir), "--num-train", "48",
            "--steps", "8", "--ckpt-every", "4", "--keep-every", "4", *extra]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """A tiny MIRO run (runs/miro, 8 steps, checkpoints kept at 4 and 8) and a tiny baseline (runs/baseline)."""
    import train
    runs = tmp_path_factory.mktemp("shared") / "runs"
    train.main(tiny_train_args(runs))
    train.main(tiny_train_args(runs, "--no-rewards", "--keep-every", "0"))
    return runs


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long multi-process test (CI runs it; -m 'not slow' skips it)")


# Tiny frozen parts of the real classes, saved in the original layouts (tests/test_encoders.py says more).
WORDS = "a photo of red blue green cat dog two three circle square squares on the left right".split()


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory):
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -3.0) for w in WORDS]
    vocab += [(c, -5.0) for c in string.ascii_lowercase] + [("▁" + c, -5.5) for c in string.ascii_lowercase]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=1,
                   num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                   decoder_start_token_id=0)  # FLAN-T5's layout, tiny
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("t5")
    T5ForConditionalGeneration(cfg).save_pretrained(out)  # encoder + decoder + lm_head, as on the hub
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=16)  # the SDXL VAE's class, downsampling by 2
    out = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def clip_files(tmp_path_factory):
    import open_clip
    out = tmp_path_factory.mktemp("clip")
    config = out / "tiny-clip-text.json"
    config.write_text(json.dumps({
        "embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 2}}))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(config.stem, force_quick_gelu=True).state_dict(), out / "clip.pt")
    return dict(checkpoint=str(out / "clip.pt"), model_config=str(config))

"""HunyuanVideo 1.5 on the command line: the offline demos (--model tiny15, tiny15-i2v) end to end, their files in
the real layout (diffusers and transformers load every component with no key missing or left over), and 1.5's
refusals in one sentence."""

import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as iio
import numpy as np
import pytest
from PIL import Image

import HunyuanVideo_Apple as H

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "HUNYUAN_APPLE_CACHE": str(tmp_path_factory.mktemp("cache"))}


def run(env, cwd, *args):
    return subprocess.run([sys.executable, str(ROOT / "hunyuan_apple.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("model", ["tiny15", "tiny15-i2v"])
def test_the_demo_writes_a_video(env, tmp_path, model):
    image = []
    if model == "tiny15-i2v":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 200, 3), np.uint8)).save(tmp_path / "in.png")
        image = ["--image", "in.png"]
    r = run(env, tmp_path, "--model", model, "--prompt", 'a shop under a sign that says "OPEN"', *image,
            "--seed", "3", "--output", "out.mp4")
    assert r.returncode == 0, r.stderr
    frames = np.stack(list(iio.mimread(tmp_path / "out.mp4", memtest=False)))
    assert frames.shape == (H.TINY_DEMO["frames"], H.TINY_DEMO["height"], H.TINY_DEMO["width"], 3)
    assert frames.std() > 1  # random weights: noise, not a blank clip
    phases = {"text encoders", "denoise", "decode"} | ({"image encoder"} if image else set())
    assert all(f"{p} " in r.stdout + r.stderr for p in phases), r.stdout + r.stderr  # the plan and the timings


def test_the_demo_files_are_in_the_real_layout(env, monkeypatch):
    """Each component of tiny15-i2v loads in the reference's classes with nothing missing or unexpected."""
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import AutoTokenizer, Qwen2_5_VLTextModel, SiglipVisionModel, T5EncoderModel
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", env["HUNYUAN_APPLE_CACHE"])
    folder = H.tiny_checkpoint("tiny15-i2v")
    for cls, name in ((HunyuanVideo15Transformer3DModel, "transformer"), (AutoencoderKLHunyuanVideo15, "vae")):
        _, info = cls.from_pretrained(folder / name, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (name, info)
    for cls, name in ((Qwen2_5_VLTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2"),
                      (SiglipVisionModel, "image_encoder")):
        _, info = cls.from_pretrained(folder / name, output_loading_info=True)
        # the LLM's final norm is in the file and unused by the DiT's encoder; T5's shared embedding is tied
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    assert AutoTokenizer.from_pretrained(folder / "tokenizer")("<|im_start|>a cat")["input_ids"][0] == \
        AutoTokenizer.from_pretrained(folder / "tokenizer").convert_tokens_to_ids("<|im_start|>")


def test_refusals_are_one_sentence(env, tmp_path):
    Image.fromarray(np.zeros((96, 160, 3), np.uint8)).save(tmp_path / "in.png")  # the video's size: no warning
    for args, words in [(["--guidance", "6"], "--guidance 6.0: HunyuanVideo 1.5 embeds no guidance scale"),
                        (["--image", "in.png"], "tiny15 is a text-to-video checkpoint, which takes no image"),
                        (["--frames", "8"], "--frames"), (["--resolution", "100", "160"], "16")]:
        r = run(env, tmp_path, "--model", "tiny15", "--prompt", "a cat", *args, "--output", "x.mp4")
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and words in lines[0], r.stderr
        assert not (tmp_path / "x.mp4").exists()

"""Text to video end to end against diffusers' HunyuanVideoPipeline, run live: a tiny random checkpoint built
with diffusers and transformers (real vocabularies), saved in the diffusers layout, read by our
from_pretrained, and both pipelines started from the same initial latents. float32, and the default precisions.

Tolerances: final latents, relative error (max |ours - ref| / max |ref|) 1e-3; frames, 2 levels of 255. In the
default precisions (DiT bf16, VAE and text encoders fp16, both pipelines): latents 6e-2, frames 20 levels.
The sampler alone: the scheduler's sigmas and timesteps, 1e-6 absolute.
"""

import os

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import make_clip_tokenizer, make_llama_tokenizer, randomize, rel_err
from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                       HunyuanVideoTransformer3DModel)
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

import HunyuanVideo_Apple as H

LATENT_TOL = 1e-3
FRAME_LEVELS = 2
BF16_LATENT_TOL = 6e-2
BF16_FRAME_LEVELS = 20


@pytest.mark.parametrize("steps, shift", [(50, 7.0), (6, 17.0), (1, 1.0)])
def test_sigmas_and_timesteps_match_the_scheduler(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])  # as the pipeline sets them
    ours = H.flow_sigmas(steps, shift)
    assert np.abs(ours - sched.sigmas.numpy()).max() <= 1e-6
    ts = np.array([np.array(H.timestep(s, 1))[0] for s in ours[:-1]])
    assert np.abs(ts - sched.timesteps.numpy()).max() <= 1e-6 * 1000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan")
    tok, tok2 = make_llama_tokenizer(root / "tok"), make_clip_tokenizer(root / "tok2")
    llama = randomize(LlamaModel(LlamaConfig(
        vocab_size=128256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5)), seed=0)
    clip = randomize(CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2)), seed=1)
    transformer = randomize(HunyuanVideoTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, rope_axes_dim=(4, 6, 6), num_layers=2, num_single_layers=2,
        num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=32), seed=2)
    vae = randomize(AutoencoderKLHunyuanVideo(block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                                              norm_num_groups=4), seed=3)
    pipe = HunyuanVideoPipeline(text_encoder=llama.eval(), tokenizer=tok, transformer=transformer.eval(),
                                vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=clip.eval(), tokenizer_2=tok2)
    pipe.save_pretrained(root / "HunyuanVideo")
    return root / "HunyuanVideo", pipe


def test_end_to_end_matches_diffusers(checkpoint):
    folder, ref = checkpoint
    prompt, (F, Hh, W), steps = "A red fox runs through the snow, cinematic.", (9, 48, 64), 4
    init = torch.randn(1, 16, (F - 1) // 4 + 1, Hh // 8, W // 8, generator=torch.Generator().manual_seed(5))
    kw = dict(height=Hh, width=W, num_frames=F, num_inference_steps=steps, guidance_scale=6.0)
    with torch.no_grad():
        ref_latents = ref(prompt, latents=init, output_type="latent", return_dict=False, **kw)[0]
        ref_frames = ref(prompt, latents=init, output_type="np", return_dict=False, **kw)[0][0]  # (F, H, W, 3) in [0, 1]

    ours = H.HunyuanVideoPipeline.from_pretrained(folder, dtype=mx.float32)
    mine = mx.array(init.permute(0, 2, 3, 4, 1).numpy())  # channels-last
    latents = ours(prompt, latents=mine, output_type="latent", flow_shift=7.0, **kw)
    err = rel_err(np.array(latents), ref_latents.permute(0, 2, 3, 4, 1).numpy())
    assert err <= LATENT_TOL, f"final latents: relative error {err:.2e} > {LATENT_TOL}"
    frames = ours(prompt, latents=mine, flow_shift=7.0, **kw)
    assert frames.shape == (F, Hh, W, 3) and frames.dtype == np.uint8
    levels = np.abs(frames.astype(np.float64) - ref_frames * 255).max()
    assert levels <= FRAME_LEVELS, f"frames differ by {levels:.2f} levels of 255"
    assert frames.std() > 5  # not a blank video
    assert set(ours.stats) == {"text encoders", "denoise", "decode", "work"}
    assert ours.stats["work"] | {"pflop": 0} == dict(cache=None, forwards=steps, skipped=0, pflop=0,
                                                     steps=[True] * steps)


def test_end_to_end_in_the_default_precisions_matches_diffusers(checkpoint):
    """Both pipelines in the precisions they run by default (DiT bf16, VAE and text encoders fp16), from the same
    initial latents. Bounds: final latents BF16_LATENT_TOL (measured 2.5e-2: diffusers rounds its latents to
    bf16 after every step, we keep them in float32), frames BF16_FRAME_LEVELS of 255 (measured 9.8). A slip in
    what depends on the DiT's dtype shows far above them: guidance made in float32 (6000 rather than the
    reference's bf16 6016) is 0.38 away."""
    folder, ref32 = checkpoint
    ref = HunyuanVideoPipeline.from_pretrained(folder, dtype=torch.float16)
    ref.transformer.to(torch.bfloat16)
    prompt, (F, Hh, W), steps = "A red fox runs through the snow, cinematic.", (9, 48, 64), 4
    init = torch.randn(1, 16, (F - 1) // 4 + 1, Hh // 8, W // 8, generator=torch.Generator().manual_seed(5))
    kw = dict(height=Hh, width=W, num_frames=F, num_inference_steps=steps, guidance_scale=6.0)
    with torch.no_grad():
        ref_latents = ref(prompt, latents=init.to(torch.bfloat16), output_type="latent", return_dict=False, **kw)[0]
        ref_frames = ref(prompt, latents=init.to(torch.bfloat16), output_type="np", return_dict=False, **kw)[0][0]
    ours = H.HunyuanVideoPipeline.from_pretrained(folder)
    assert ours.dtypes == {"transformer": mx.bfloat16, "vae": mx.float16, "text_encoders": mx.float16}
    mine = mx.array(init.permute(0, 2, 3, 4, 1).numpy())
    latents = ours(prompt, latents=mine, output_type="latent", **kw)
    err = rel_err(np.array(latents), ref_latents.float().permute(0, 2, 3, 4, 1).numpy())
    assert err <= BF16_LATENT_TOL, f"final latents: relative error {err:.2e} > {BF16_LATENT_TOL}"
    levels = np.abs(ours(prompt, latents=mine, **kw).astype(np.float64) - ref_frames * 255).max()
    assert levels <= BF16_FRAME_LEVELS, f"frames differ by {levels:.2f} levels of 255"


def test_seeded_runs_repeat_and_seeds_differ(checkpoint):
    ours = H.HunyuanVideoPipeline.from_pretrained(checkpoint[0], dtype=mx.float32)
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=2, output_type="latent")
    a, b, c = (np.array(ours("a cat", seed=s, **kw)) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_callback_sees_each_step_and_can_cancel(checkpoint):
    ours = H.HunyuanVideoPipeline.from_pretrained(checkpoint[0], dtype=mx.float32)
    seen = []
    ours("a cat", height=32, width=32, num_frames=5, num_inference_steps=3, output_type="latent", seed=0,
         callback=lambda i, n, x: seen.append((i, n, x.shape)))
    assert seen == [(1, 3, (1, 2, 4, 4, 16)), (2, 3, (1, 2, 4, 4, 16)), (3, 3, (1, 2, 4, 4, 16))]
    with pytest.raises(H.HunyuanVideoError, match="cancelled after step 2 of 3"):
        ours("a cat", height=32, width=32, num_frames=5, num_inference_steps=3, seed=0, callback=lambda i, n, x: i < 2)


@pytest.mark.parametrize("kw, words", [
    (dict(num_frames=12), "4n+1"), (dict(height=540), "multiples of 16"), (dict(num_inference_steps=0), "at least 1"),
    (dict(prompt=" "), "prompt is empty"), (dict(output_type="pil"), "output_type"),
    (dict(latents=mx.zeros((1, 3, 4, 4, 16))), "pass latents of shape (1, 2, 4, 4, 16)"),
])
def test_bad_requests(checkpoint, kw, words):
    ours = H.HunyuanVideoPipeline.from_pretrained(checkpoint[0], dtype=mx.float32)
    args = dict(prompt="a cat", height=32, width=32, num_frames=5, num_inference_steps=1)
    with pytest.raises(H.HunyuanVideoError) as e:
        ours(**{**args, **kw})
    assert words in str(e.value)


def test_incomplete_folder_and_offline_hub(checkpoint, tmp_path, monkeypatch):
    (tmp_path / "vae").mkdir()
    with pytest.raises(H.HunyuanVideoError, match="lacks transformer, text_encoder"):
        H.HunyuanVideoPipeline.from_pretrained(tmp_path)
    with pytest.raises(H.HunyuanVideoError, match="does not exist"):
        H.HunyuanVideoPipeline.from_pretrained(tmp_path / "nope" / "deeper")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the download must fail in one sentence
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(H.HunyuanVideoError, match="could not download someone/not-cached"):
        H.HunyuanVideoPipeline.from_pretrained("someone/not-cached")


def test_prompt_cache(tmp_path, monkeypatch):
    """A prompt seen before is read back without loading the text encoders, to the bit; a change of prompt,
    dtype, quantization or weight file misses; a damaged entry is re-encoded with a warning; a cache folder
    that cannot be written gives a warning, and the run goes on."""
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path / "cache"))
    tiny = H.build_tiny_checkpoint(tmp_path / "tiny")
    pipe = H.HunyuanVideoPipeline.from_pretrained(tiny, prompt_cache=True)
    first = pipe.encode_prompt("a cat walks on the grass")
    assert not pipe.prompt_hit and len(list((tmp_path / "cache" / "prompts").glob("*.safetensors"))) == 1
    loads = []
    real, real_clip = H.load_text_encoder, H.load_clip_text_encoder
    monkeypatch.setattr(H, "load_text_encoder", lambda *a, **k: loads.append(a) or real(*a, **k))
    monkeypatch.setattr(H, "load_clip_text_encoder", lambda *a, **k: pytest.fail("CLIP was loaded"))
    again = pipe.encode_prompt("a cat walks on the grass")
    assert pipe.prompt_hit and not loads and "text encoders" in pipe.stats
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(first, again))
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=2, seed=0)
    assert np.array_equal(np.array(pipe.denoise(*first, **kw)), np.array(pipe.denoise(*again, **kw)))

    entry = pipe._prompt_entry("a cat walks on the grass")
    prompt = "a cat walks on the grass"
    others = [pipe._prompt_entry("a dog"),
              H.HunyuanVideoPipeline.from_pretrained(tiny, dtype=mx.float32)._prompt_entry(prompt),
              H.HunyuanVideoPipeline.from_pretrained(tiny, quantization="int8")._prompt_entry(prompt)]
    weights = tiny / "text_encoder" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the file replaced
    others.append(pipe._prompt_entry("a cat walks on the grass"))
    assert len({entry, *others}) == 5
    monkeypatch.setattr(H, "load_clip_text_encoder", real_clip)
    pipe.encode_prompt("a cat walks on the grass")  # the weights changed: a miss, the encoders run
    assert not pipe.prompt_hit and loads

    entry = pipe._prompt_entry("a cat walks on the grass")
    entry.write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="is unreadable"):
        pipe.encode_prompt("a cat walks on the grass")
    assert not pipe.prompt_hit
    pipe.encode_prompt("a cat walks on the grass")
    assert pipe.prompt_hit  # stored anew

    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path / "a file"))
    with pytest.warns(UserWarning, match="the prompt cache cannot be written"):
        states, _, _ = pipe.encode_prompt("a cat walks on the grass")
    assert states.shape == first[0].shape

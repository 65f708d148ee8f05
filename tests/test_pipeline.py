"""Text to video end to end against diffusers' HunyuanVideoPipeline, run live: a tiny random checkpoint built
with diffusers and transformers (real vocabularies), saved in the diffusers layout, read by our
from_pretrained, and both pipelines started from the same initial latents. float32, and the default precisions.

Tolerances, about 2-10x what was measured on this project's Linux machine: final latents, relative error
(max |ours - ref| / max |ref|) 3e-4 (measured 2.3e-5 to 4.9e-5: text to video, with a LoRA, video to video), with
true CFG 5e-5 (3.4e-6 to 7.6e-6); frames, 2 levels of 255 (0.51). In the default precisions (DiT bf16, VAE and
text encoders fp16, both pipelines): latents 6e-2 (3.2e-2), frames 20 levels (9.8). The sampler alone: the
scheduler's sigmas and timesteps, 1e-6 absolute.
"""

import os

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import make_clip_tokenizer, make_llama_tokenizer, our_names, randomize, rel_err, run_to_end
from safetensors.torch import save_file
from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                       HunyuanVideoTransformer3DModel)
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

import HunyuanVideo_Apple as H

LATENT_TOL = 3e-4
CFG_LATENT_TOL = 5e-5
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

    pipe = H.HunyuanVideoPipeline.from_pretrained(folder, dtype=mx.float32)
    mine = mx.array(init.permute(0, 2, 3, 4, 1).numpy())  # channels-last
    latents = pipe(prompt, latents=mine, output_type="latent", shift=7.0, **our_names(kw))
    err = rel_err(np.array(latents), ref_latents.permute(0, 2, 3, 4, 1).numpy())
    assert err <= LATENT_TOL, f"final latents: relative error {err:.2e} > {LATENT_TOL}"
    frames = pipe(prompt, latents=mine, shift=7.0, **our_names(kw))
    assert frames.shape == (F, Hh, W, 3) and frames.dtype == np.uint8
    levels = np.abs(frames.astype(np.float64) - ref_frames * 255).max()
    assert levels <= FRAME_LEVELS, f"frames differ by {levels:.2f} levels of 255"
    assert frames.std() > 5  # not a blank video
    assert set(pipe.stats) == {"text encoders", "denoise", "decode", "work"}
    work = pipe.stats["work"]
    computed = {k: work.pop(k) for k in ("pflop", "attention_pflop", "linear_pflop")}
    assert work == dict(cache=None, attention="dense", matmul=None, forwards=steps, skipped=0,
                        skipped_attention_pflop=0, skipped_linear_pflop=0, steps=[True] * steps, ranks=1,
                        received_bytes=0)
    assert computed["pflop"] == pytest.approx(computed["attention_pflop"] + computed["linear_pflop"], rel=1e-12)


def test_end_to_end_in_the_default_precisions_matches_diffusers(checkpoint):
    """Both pipelines in the precisions they run by default (DiT bf16, VAE and text encoders fp16), from the same
    initial latents. Bounds: final latents BF16_LATENT_TOL (measured 2.5e-2 to 3.2e-2: diffusers rounds its latents to
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
    pipe = H.HunyuanVideoPipeline.from_pretrained(folder)
    assert pipe.dtypes == {"transformer": mx.bfloat16, "vae": mx.float16, "text_encoders": mx.float16}
    mine = mx.array(init.permute(0, 2, 3, 4, 1).numpy())
    latents = pipe(prompt, latents=mine, output_type="latent", **our_names(kw))
    err = rel_err(np.array(latents), ref_latents.float().permute(0, 2, 3, 4, 1).numpy())
    assert err <= BF16_LATENT_TOL, f"final latents: relative error {err:.2e} > {BF16_LATENT_TOL}"
    levels = np.abs(pipe(prompt, latents=mine, **our_names(kw)).astype(np.float64) - ref_frames * 255).max()
    assert levels <= BF16_FRAME_LEVELS, f"frames differ by {levels:.2f} levels of 255"


def test_seeded_runs_repeat_and_seeds_differ(checkpoint):
    pipe = H.HunyuanVideoPipeline.from_pretrained(checkpoint[0], dtype=mx.float32)
    kw = dict(height=32, width=32, frames=5, steps=2, output_type="latent")
    a, b, c = (np.array(pipe("a cat", seed=s, **kw)) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_the_stream_yields_each_step_and_stops_where_it_is_left(checkpoint, monkeypatch):
    """The events in order, a Step after each step with the latents __call__ ends with; leaving the loop after step 2
    runs no third step and no decode."""
    pipe = H.HunyuanVideoPipeline.from_pretrained(checkpoint[0], dtype=mx.float32)
    kw = dict(prompt="a cat", height=32, width=32, frames=5, steps=3, seed=0)
    events = run_to_end(pipe.generate(**kw))
    assert [type(e).__name__ for e in events] == ["Plan", "Encoded", "Step", "Step", "Step", "Denoised", "Decoded"]
    assert [(e.step, e.steps, e.latents.shape) for e in events[2:5]] == [(i, 3, (1, 2, 4, 4, 16)) for i in (1, 2, 3)]
    assert np.array_equal(np.array(events[4].latents), np.array(pipe(output_type="latent", **kw)))
    assert np.array_equal(events[-1].frames, pipe(**kw))
    monkeypatch.setattr(H.HunyuanVideoPipeline, "decode", lambda *a, **k: pytest.fail("decoded after leaving"))
    left = run_to_end(pipe.generate(**kw), stop=lambda e: isinstance(e, H.Step) and e.step == 2)
    assert [type(e).__name__ for e in left] == ["Plan", "Encoded", "Step", "Step"]
    assert pipe.stats["work"]["forwards"] == 2


@pytest.mark.parametrize("kw, words", [
    (dict(frames=12), "frames 12: the frame count must be 4n+1"), (dict(height=540), "multiples of 16"),
    (dict(steps=0), "steps 0: use 1 to 1000"), (dict(prompt=" "), "prompt is empty"),
    (dict(output_type="pil"), "output_type"), (dict(num_frames=5), "num_frames is not a setting: did you mean frames?"),
    (dict(quantization="int8"), "quantization int8: this pipeline was loaded with None"),
    (dict(latents=mx.zeros((1, 3, 4, 4, 16))), "pass latents of shape (1, 2, 4, 4, 16)"),
])
def test_bad_requests(checkpoint, kw, words):
    pipe = H.HunyuanVideoPipeline.from_pretrained(checkpoint[0], dtype=mx.float32)
    args = dict(prompt="a cat", height=32, width=32, frames=5, steps=1)
    with pytest.raises(H.HunyuanVideoError) as e:
        pipe(**{**args, **kw})
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
    kw = dict(height=32, width=32, frames=5, steps=2, seed=0, output_type="latent")
    assert np.array_equal(np.array(pipe(text=first, **kw)), np.array(pipe(text=again, **kw)))

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


# ---- true classifier-free guidance, LoRA, a fine-tune's DiT, video to video ----------------------------

PROMPT, NEGATIVE = "A red fox runs through the snow, cinematic.", "blurry, low quality"


def no_guidance_dit(folder, pipe):
    """A DiT without a guidance embedding (as SkyReels-V1 and true-CFG fine-tunes), in its own folder."""
    path = folder.parent / "no_guidance_transformer"
    if not path.exists():
        cfg = dict(pipe.transformer.config)
        dit = randomize(HunyuanVideoTransformer3DModel(**{**{k: v for k, v in cfg.items() if not k.startswith("_")},
                                                          "guidance_embeds": False}), seed=7).eval()
        dit.save_pretrained(path)
    return path


def reference_pipeline(folder, ref, transformer=None):
    if transformer is None:
        return ref
    return HunyuanVideoPipeline(text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, vae=ref.vae,
                                transformer=HunyuanVideoTransformer3DModel.from_pretrained(transformer).eval(),
                                scheduler=ref.scheduler, text_encoder_2=ref.text_encoder_2, tokenizer_2=ref.tokenizer_2)


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["guidance-embedding", "no-guidance-embedding"])
def test_true_cfg_matches_diffusers(checkpoint, guidance_embeds, monkeypatch):
    """v = v_neg + s (v - v_neg) with a negative prompt, against diffusers' true_cfg_scale/negative_prompt, from the
    same initial latents: batched (one forward of batch 2, which the plan allows here) and one branch after the
    other (the plan's choice when the budget fits only that)."""
    folder, ref = checkpoint
    transformer = None if guidance_embeds else no_guidance_dit(folder, ref)
    ref = reference_pipeline(folder, ref, transformer)
    (F, Hh, W), steps = (9, 48, 64), 3
    init = torch.randn(1, 16, (F - 1) // 4 + 1, Hh // 8, W // 8, generator=torch.Generator().manual_seed(6))
    kw = dict(height=Hh, width=W, num_frames=F, num_inference_steps=steps, guidance_scale=1.0)
    with torch.no_grad():
        ref_latents = ref(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, latents=init, output_type="latent",
                          return_dict=False, **kw)[0].permute(0, 2, 3, 4, 1).numpy()
        plain = ref(PROMPT, latents=init, output_type="latent", return_dict=False, **kw)[0]
    assert rel_err(plain.permute(0, 2, 3, 4, 1).numpy(), ref_latents) > 0.05  # the guidance matters
    ours = H.HunyuanVideoPipeline.from_pretrained(folder, dtype=mx.float32, transformer=transformer)
    mine = mx.array(init.permute(0, 2, 3, 4, 1).numpy())
    est = {mode: H.estimate_memory(folder, Hh, W, F, dtypes=ours.dtypes, steps=steps, cfg=mode,
                                   transformer=(ours.transformer, None))["denoise"]
           for mode in ("batched", "sequential")}
    assert est["batched"] > est["sequential"]
    for budget, mode in ((None, "batched"), ((est["batched"] + est["sequential"]) / 2 / 0.9, "sequential")):
        if budget:  # a machine where only one branch at a time fits (force: the tiny LLM is bigger still)
            monkeypatch.setattr(H, "available_memory", lambda: int(budget))
        assert ours.cfg_mode(Hh, W, F, steps=steps) == mode
        latents = ours(PROMPT, negative_prompt=NEGATIVE, cfg_scale=4.0, latents=mine, output_type="latent",
                       force=budget is not None, **our_names(kw))
        err = rel_err(np.array(latents), ref_latents)
        print(f"true CFG ({mode}, guidance embedding {guidance_embeds}): latents {err:.2e}")
        assert err <= CFG_LATENT_TOL, f"{mode}: final latents relative error {err:.2e} > {CFG_LATENT_TOL}"
        assert ours.stats["work"]["forwards"] == 2 * steps
    monkeypatch.undo()
    if guidance_embeds:
        with torch.no_grad():
            ref_frames = ref(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, latents=init, output_type="np",
                             return_dict=False, **kw)[0][0]
        frames = ours(PROMPT, negative_prompt=NEGATIVE, cfg_scale=4.0, latents=mine, **our_names(kw))
        levels = np.abs(frames.astype(np.float64) - ref_frames * 255).max()
        print(f"true CFG frames: {levels:.2f} levels")
        assert levels <= FRAME_LEVELS, f"frames differ by {levels:.2f} levels of 255"


def test_true_cfg_keeps_the_branches_apart(checkpoint, tmp_path, monkeypatch):
    """The prompt cache holds each branch's prompt under its own entry; a step cache runs one cache a branch (at
    threshold 0 it skips nothing and equals the uncached run to the bit); a negative prompt without effect warns; a
    true CFG scale without a negative prompt guides against the empty one."""
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path / "cache"))
    ours = H.HunyuanVideoPipeline.from_pretrained(checkpoint[0], dtype=mx.float32, prompt_cache=True)
    kw = dict(height=32, width=32, frames=5, steps=3, seed=1, output_type="latent",
              negative_prompt=NEGATIVE, cfg_scale=3.0)
    plain = ours(PROMPT, **kw)
    assert len(list((tmp_path / "cache" / "prompts").glob("*.safetensors"))) == 2 and not ours.prompt_hit
    for cache, default in H.CACHES.items():  # TaylorSeer has no threshold: interval 1 computes every step
        cached = ours(PROMPT, cache=cache, **kw, **(dict(cache_threshold=0.0) if default is not None else
                                                     dict(cache_interval=1)))
        assert ours.prompt_hit and np.array_equal(np.array(cached), np.array(plain)), cache
        assert ours.stats["work"]["forwards"] == 6
    with pytest.warns(UserWarning, match="has no effect"):
        ours(PROMPT, **{**kw, "cfg_scale": 1.0})
    empty = ours(PROMPT, **{**kw, "negative_prompt": ""})
    assert np.array_equal(np.array(ours(PROMPT, **{**kw, "negative_prompt": None})), np.array(empty))
    assert ours.stats["work"]["forwards"] == 6 and not np.array_equal(np.array(empty), np.array(plain))


def test_a_lora_in_the_pipeline_matches_diffusers(checkpoint, tmp_path):
    folder, ref = checkpoint
    g = torch.Generator().manual_seed(21)
    D, lora = 32, {}
    for name, (out, fan_in) in {"transformer_blocks.0.attn.to_q": (D, D), "transformer_blocks.1.ff.net.2": (D, 4 * D),
                                "single_transformer_blocks.0.proj_mlp": (4 * D, D),
                                "single_transformer_blocks.1.attn.to_k": (D, D)}.items():
        lora[f"transformer.{name}.lora_A.weight"] = torch.randn(4, fan_in, generator=g) / np.sqrt(fan_in)
        lora[f"transformer.{name}.lora_B.weight"] = torch.randn(out, 4, generator=g)
    save_file(lora, tmp_path / "lora.safetensors")
    (F, Hh, W), steps = (9, 48, 64), 3
    init = torch.randn(1, 16, (F - 1) // 4 + 1, Hh // 8, W // 8, generator=torch.Generator().manual_seed(8))
    kw = dict(height=Hh, width=W, num_frames=F, num_inference_steps=steps)
    ref.load_lora_weights(str(tmp_path / "lora.safetensors"), adapter_name="style")
    ref.set_adapters(["style"], [0.7])
    try:
        with torch.no_grad():
            expected = ref(PROMPT, latents=init, output_type="latent", return_dict=False, **kw)[0]
    finally:
        ref.unload_lora_weights()
    ours = H.HunyuanVideoPipeline.from_pretrained(folder, dtype=mx.float32,
                                                  loras=[(tmp_path / "lora.safetensors", 0.7)])
    latents = ours(PROMPT, latents=mx.array(init.permute(0, 2, 3, 4, 1).numpy()), output_type="latent",
                   **our_names(kw))
    err = rel_err(np.array(latents), expected.permute(0, 2, 3, 4, 1).numpy())
    print(f"pipeline with a LoRA: latents {err:.2e}")
    assert err <= LATENT_TOL, f"final latents relative error {err:.2e} > {LATENT_TOL}"
    with pytest.raises(H.HunyuanVideoError, match="matches no layer"):  # refused before anything runs
        H.HunyuanVideoPipeline.from_pretrained(folder, loras=[tmp_path / "lora.safetensors", checkpoint_file(folder)])


def checkpoint_file(folder):
    """A safetensors file that is no LoRA: the VAE's weights."""
    return next((folder / "vae").glob("*.safetensors"))


def random_video(frames, height, width, seed=0):
    g = np.random.default_rng(seed)
    base = g.integers(0, 256, (1, height // 4, width // 4, 3))
    video = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2) + np.arange(frames)[:, None, None, None] * 3
    return np.clip(video, 0, 255).astype(np.uint8)  # (F, H, W, 3): smooth enough to survive a resize


def diffusers_fit(frames, height, width):
    """Frames resized to cover height x width and cropped at the centre by diffusers' own image processor
    (VaeImageProcessor.resize, resize_mode "crop", Lanczos)."""
    from diffusers.video_processor import VideoProcessor
    from PIL import Image

    processor = VideoProcessor(vae_scale_factor=8)
    return np.stack([np.asarray(processor.resize(Image.fromarray(f), height, width, resize_mode="crop"))
                     for f in frames])


@pytest.mark.parametrize("source", [(40, 72), (72, 40), (48, 64), (30, 600), (97, 131)])
def test_video_fitting_matches_diffusers_resize_and_crop(source):
    """Cover and centre crop, wider, taller, the same size, far wider and odd sizes: equal to diffusers' frames."""
    video = random_video(3, *source)
    ours = H.fit_frames(video, 48, 64, 2)
    assert ours.shape == (2, 48, 64, 3)
    assert np.array_equal(ours, diffusers_fit(video[:2], 48, 64))


def test_video_to_video(checkpoint):
    """The encode is the VAE's tiled encoder (against diffusers' with the same tiles); the whole run equals
    diffusers' pipeline started from the noised video on the schedule's tail (its own sigmas argument); strength
    0.5 runs half the steps, 1.0 is text to video from the same noise to the bit, 0 keeps the encoded video."""
    folder, ref = checkpoint
    (F, Hh, W), steps, tile, stride = (9, 48, 64), 6, (4, 32, 32), (4, 24, 24)
    video = random_video(13, 40, 72)  # another size and aspect ratio: resized to cover, cropped at the centre
    ours = H.HunyuanVideoPipeline.from_pretrained(folder, dtype=mx.float32)
    frames = diffusers_fit(video[:F], Hh, W)  # the reference's frames, not ours
    z = ours.encode_video(video, Hh, W, F, tile=tile, stride=stride)
    x = torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] / 127.5 - 1  # (1, 3, F, H, W)
    settings = dict(vars(ref.vae))
    with torch.no_grad():
        whole = ref.vae.encode(x).latent_dist.mean * ref.vae.config.scaling_factor  # the pipeline's: one tile here
        ref.vae.enable_tiling(tile_sample_min_num_frames=tile[0], tile_sample_min_height=tile[1],
                              tile_sample_min_width=tile[2], tile_sample_stride_num_frames=stride[0],
                              tile_sample_stride_height=stride[1], tile_sample_stride_width=stride[2])
        ref_z = ref.vae.encode(x).latent_dist.mean * ref.vae.config.scaling_factor
    vars(ref.vae).update(settings)  # the fixture's VAE as it was
    print(f"video encode, tiled: {rel_err(np.array(z), ref_z.permute(0, 2, 3, 4, 1).numpy()):.2e}")
    assert rel_err(np.array(z), ref_z.permute(0, 2, 3, 4, 1).numpy()) <= 1e-5  # measured 1.3e-6
    assert rel_err(np.array(z), whole.permute(0, 2, 3, 4, 1).numpy()) > 1e-3  # the tiles did something

    kw = dict(height=Hh, width=W, num_frames=F, num_inference_steps=steps, seed=4, output_type="latent")
    events = run_to_end(ours.generate(prompt=PROMPT, video=video, strength=0.5,
                                      **our_names({k: v for k, v in kw.items() if k != "output_type"})),
                        stop=lambda e: isinstance(e, H.Denoised))
    half = events[-1].latents
    assert [e.step for e in events if isinstance(e, H.Step)] == [4, 5, 6] and ours.stats["work"]["forwards"] == 3
    first = steps - int(steps * 0.5)
    sigma = float(H.flow_sigmas(steps)[first])
    noise = mx.random.normal((1, 3, Hh // 8, W // 8, 16), key=mx.random.key(4))
    start = sigma * noise + (1 - sigma) * mx.array(whole.permute(0, 2, 3, 4, 1).numpy())
    with torch.no_grad():
        expected = ref(PROMPT, latents=torch.from_numpy(np.array(start)).permute(0, 4, 1, 2, 3),
                       sigmas=list(np.linspace(1.0, 0.0, steps + 1)[first:-1]), output_type="latent",
                       return_dict=False, **{k: v for k, v in kw.items() if k not in ("seed", "output_type")})[0]
    err = rel_err(np.array(half), expected.permute(0, 2, 3, 4, 1).numpy())
    print(f"video to video at strength 0.5: latents {err:.2e}")
    assert err <= LATENT_TOL, f"video to video: relative error {err:.2e} > {LATENT_TOL}"

    full = ours(PROMPT, video=video, strength=1.0, **our_names(kw))
    assert np.array_equal(np.array(full), np.array(ours(PROMPT, **our_names(kw))))
    kept = ours(PROMPT, video=video, strength=0.0, **our_names(kw))
    assert ours.stats["work"]["forwards"] == 0
    assert np.array_equal(np.array(kept), np.array(ours.encode_video(video, Hh, W, F)))


@pytest.mark.parametrize("kw, words", [
    (dict(video="missing.mp4"), "does not exist"), (dict(strength=1.5), "from 0"),
    (dict(video=np.zeros((3, 32, 32, 3), np.uint8)), "has 3 frames, fewer than the 5 asked: ask for 1 or fewer"),
    (dict(cfg_scale=-1.0, negative_prompt="x"), "cfg_scale -1.0: use a number of 0 or more"),
    (dict(negative_prompt=["a", "b"], cfg_scale=2.0), "2 of the negative_prompt for 1 of the prompt"),
])
def test_bad_guidance_and_video_requests(checkpoint, kw, words):
    ours = H.HunyuanVideoPipeline.from_pretrained(checkpoint[0], dtype=mx.float32)
    args = dict(prompt="a cat", height=32, width=32, frames=5, steps=1)
    if "strength" in kw:
        args["video"] = np.zeros((5, 32, 32, 3), np.uint8)
    with pytest.raises(H.HunyuanVideoError) as e:
        ours(**{**args, **kw})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_true_cfg_with_a_step_cache_resumes(checkpoint):
    """A run stopped after any step and resumed from its checkpoint state (both branches' step caches in it)
    ends where the uninterrupted run ends, to the bit, with the same ledger."""
    import json
    ours = H.HunyuanVideoPipeline.from_pretrained(checkpoint[0], dtype=mx.float32)
    text = ours.encode_prompt([PROMPT, NEGATIVE])
    kw = dict(height=32, width=32, frames=5, steps=10, seed=3, negative_prompt=NEGATIVE, cfg_scale=3.0,
              cache="teacache", cache_threshold=0.3)
    events = run_to_end(ours.generate(text=text, **kw), stop=lambda e: isinstance(e, H.Denoised))
    states = [dict(step=e.step, latents=e.latents, cache=e.cache, work=json.loads(json.dumps(e.work)), text=text)
              for e in events if isinstance(e, H.Step)]
    full, work = np.array(events[-1].latents), ours.stats["work"]
    assert 0 < work["skipped"] < 20 and work["forwards"] + work["skipped"] == 20, work
    assert any(k.startswith("uncond.") for k in states[4]["cache"][1])
    again = ours(resume=states[4], output_type="latent", **kw)
    assert np.array_equal(np.array(again), full) and ours.stats["work"] == work

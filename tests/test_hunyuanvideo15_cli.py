"""HunyuanVideo 1.5 on the command line: the offline demos (--model tiny15, tiny15-i2v) end to end, their files in
the real layout (diffusers and transformers load every component with no key missing or left over), and 1.5's
refusals in one sentence."""

import os
import shutil
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
            "--seed", "3", "--output", "out.mp4", "--preview")
    assert r.returncode == 0, r.stderr
    latents = (H.TINY_DEMO["height"] // 16, H.TINY_DEMO["width"] // 16)  # 1.5's VAE: 16x smaller; 3 latent frames
    assert iio.imread(tmp_path / "out.preview.png").shape == (latents[0], 3 * latents[1], 3)
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


def resolve(*args):
    import hunyuan_apple as cli
    return cli.resolve(cli.parse_args(["--prompt", "a cat", *args]))


def test_a_checkpoint_named_by_its_hub_id_takes_its_presets_settings(tmp_path):
    """--model with a 1.5 hub id is its --preset (Tencent's settings: the README's table checks the values); an
    image-to-video one sizes the video from the image as diffusers does (calculate_default_height_width at the
    checkpoint's target_size, run here), unless a size is given; guidance is refused before anything downloads."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor
    Image.fromarray(np.zeros((600, 450, 3), np.uint8)).save(tmp_path / "tall.png")  # 3:4, taller than wide
    for name, target in (("480p_t2v", 640), ("720p_i2v", 960), ("480p_i2v_step_distilled", 640)):
        image = ["--image", str(tmp_path / "tall.png")] if "i2v" in name else []
        by_id = resolve("--model", H.HUNYUANVIDEO15_HUB + name, "--seed", "1", *image)._asdict()
        preset = resolve("--preset", "1.5-" + name.replace("_", "-"), "--seed", "1", *image)._asdict()
        assert {**by_id, "preset": None} == {**preset, "preset": None}, name
        if image:
            sizes = HunyuanVideo15ImageProcessor(vae_scale_factor=16)
            expected = sizes.calculate_default_height_width(600, 450, target)
            assert (by_id["height"], by_id["width"]) == tuple(expected) != (600, 450), name
            with pytest.warns(H.HunyuanVideoWarning, match="the image is cropped to the video's shape"):  # 1.5's fit
                given = resolve("--model", H.HUNYUANVIDEO15_HUB + name, *image, "--resolution", "480", "640")
            assert (given.height, given.width) == (480, 640)
    with pytest.raises(H.HunyuanVideoError, match="HunyuanVideo 1.5 embeds no guidance scale"):
        resolve("--model", H.HUNYUANVIDEO15_HUB + "480p_t2v", "--guidance", "6")
    with pytest.raises(H.HunyuanVideoError, match="480p_i2v makes video from an image: give"):
        resolve("--model", H.HUNYUANVIDEO15_HUB + "480p_i2v")
    for loading in ({"model": H.HUNYUANVIDEO15_HUB + "480p_i2v"}, {"preset": "skyreels-i2v"}):  # from_pretrained's
        assert H.check_request(loading, text=True).model  # check: loading an image-to-video checkpoint needs no image
    with pytest.warns(H.HunyuanVideoWarning, match="step-distilled, made for 8 to 12 steps"):
        resolve("--preset", "1.5-480p-i2v-step-distilled", "--image", str(tmp_path / "tall.png"), "--steps", "50")


def test_step_caches_take_1_5_s_calibration():
    """TeaCache's rescaling polynomial is 13B's: on 1.5 it runs, warned; on 13B, and the other caches on 1.5, not.
    MagCache's default threshold on 1.5 is its authors' for 1.5, 0.03 (ComfyUI-MagCache's README), where 13B's is
    0.24: the page shows it, and a bad threshold's message names it (its steps and skips: test_step_caches_match_
    diffusers_hooks)."""
    import warnings

    import hunyuan_apple_ui as ui
    with pytest.warns(H.HunyuanVideoWarning, match="fitted on HunyuanVideo \\(13B\\) and none is published for 1.5"):
        assert resolve("--model", "tiny15", "--cache", "teacache").cache == "teacache"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve("--model", "tiny", "--cache", "teacache")
        on_15, on_13b = (resolve("--model", m, "--cache", "magcache", "--steps", "20") for m in ("tiny15", "tiny"))
    assert ui.used_values(on_15)["cache_threshold"] == 0.03 and ui.used_values(on_13b)["cache_threshold"] == 0.24
    with pytest.raises(H.HunyuanVideoError, match="magcache's published default is 0.03"):
        resolve("--model", "tiny15", "--cache", "magcache", "--cache-threshold", "-1")


def test_past_1_5_s_longest_clip_a_warning_in_its_terms():
    """1.5 is trained up to 121 frames (5 s at 24 fps, the reference's default), 13B up to 129: past each, a warning
    naming the model and its length; a frame count that is not 4n+1 is answered with the nearest within it."""
    with pytest.warns(H.HunyuanVideoWarning, match=r"125 is more than HunyuanVideo 1\.5's longest clip "
                                                    r"\(121\)"):
        resolve("--model", "tiny15", "--frames", "125")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve("--model", "tiny", "--frames", "125")
    with pytest.raises(H.HunyuanVideoError, match=r"4n\+1 \(1, 5, 9, ... 121\); try 121"):
        resolve("--model", "tiny15", "--frames", "124")


def test_quality_and_aspect_ratio_pick_1_5_s_buckets():
    """--quality 480p / 720p and --aspect-ratio pick 1.5's trained sizes, the reference's buckets (diffusers'
    calculate_default_height_width at 640 and 960, run here); without --quality, the checkpoint's own (a 720p preset:
    720p); 13B's 540p is refused on 1.5 in one sentence, and 13B keeps its table. The page's sizes list 1.5's, and
    its model list 1.5's checkpoints."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    import hunyuan_apple_ui as ui
    buckets = HunyuanVideo15ImageProcessor(vae_scale_factor=16)
    for ar in ("16:9", "9:16", "4:3", "3:4", "1:1"):
        w, h = (int(n) * 100 for n in ar.split(":"))
        for quality, target in (("480p", 640), ("720p", 960)):
            r = resolve("--model", "tiny15", "--quality", quality, "--aspect-ratio", ar)
            assert (r.height, r.width) == tuple(buckets.calculate_default_height_width(h, w, target)), (ar, quality)
        r = resolve("--preset", "1.5-720p-t2v", "--aspect-ratio", ar)
        assert (r.height, r.width) == tuple(buckets.calculate_default_height_width(h, w, 960)), ar
    with pytest.raises(H.HunyuanVideoError, match="--quality 540p: HunyuanVideo 1.5 is made at 480p and 720p"):
        resolve("--model", "tiny15", "--quality", "540p")
    assert (resolve("--model", "tiny", "--aspect-ratio", "9:16").height, resolve("--model", "tiny").height) == (960, 96)
    assert "480p" in ui.SIZES and H.HUNYUANVIDEO15_HUB + "720p_i2v" in ui.HUB_MODELS


def test_quality_with_from_metadata_takes_the_saved_model_s_sizes(tmp_path):
    """--from-metadata with a 1.5 run's settings (its model named there, not by a flag): --quality 480p and
    --aspect-ratio pick 1.5's bucket (diffusers' calculate_default_height_width at 640), where they were refused as
    13B's (the default model, which has no 480p)."""
    import json

    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(dict(prompt="a cat", model="tiny15", height=96, width=160, frames=9, steps=8)))
    r = resolve("--from-metadata", str(saved), "--quality", "480p", "--aspect-ratio", "4:3")
    expected = HunyuanVideo15ImageProcessor(vae_scale_factor=16).calculate_default_height_width(300, 400, 640)
    assert (r.model, r.height, r.width) == ("tiny15", *expected)


def test_a_local_folder_takes_its_own_settings(tmp_path):
    """A 1.5 folder in diffusers' layout gives its run the shift of its scheduler, the CFG scale of its guider and
    the size at its DiT's target_size (16:9, as diffusers' pipeline picks it), files written here by diffusers' own
    classes; flags given win."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor
    folder = tmp_path / "hv15-720p"
    FlowMatchEulerDiscreteScheduler(shift=9.0).save_pretrained(folder / "scheduler")
    ClassifierFreeGuidance(guidance_scale=6.0).save_pretrained(folder / "guider")
    HunyuanVideo15Transformer3DModel.from_config(dict(num_layers=1, num_refiner_layers=1, num_attention_heads=1,
                                                      attention_head_dim=8, rope_axes_dim=(2, 3, 3), text_embed_dim=8,
                                                      text_embed_2_dim=8, image_embed_dim=8, target_size=960,
                                                      task_type="t2v")).save_config(folder / "transformer")
    (folder / "model_index.json").write_text('{"_class_name": "HunyuanVideo15Pipeline"}')
    s = resolve("--model", str(folder))
    expected = HunyuanVideo15ImageProcessor(vae_scale_factor=16).calculate_default_height_width(9, 16, 960)
    assert (s.shift, s.cfg_scale, s.negative_prompt, s.frames, (s.height, s.width)) == (9.0, 6.0, "", 121,
                                                                                        tuple(expected))
    s = resolve("--model", str(folder), "--shift", "5", "--cfg-scale", "1", "--frames", "33")
    assert (s.shift, s.cfg_scale, s.negative_prompt, s.frames) == (5.0, 1.0, None, 33)


def test_the_other_models_dit_or_lora_is_refused_in_one_sentence(env, tmp_path, monkeypatch):
    """13B's DiT (or a LoRA for it) on 1.5 and the reverse: refused by name before anything runs, on the command line
    in one sentence. A 13B DiT or LoRA has single-stream blocks, a 1.5 one modules of its own or double-stream blocks
    past 13B's 20 (real LoRAs' keys, in diffusers' and kohya's layouts)."""
    import mlx.core as mx

    import HunyuanVideo15_Apple as H15
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", env["HUNYUAN_APPLE_CACHE"])
    tiny, tiny15 = H.tiny_checkpoint("tiny"), H.tiny_checkpoint("tiny15")
    lora13 = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": mx.zeros((4, 64)),
              "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": mx.zeros((64, 4))}
    lora15 = {"lora_unet_double_blocks_30_img_attn_q.lora_down.weight": mx.zeros((4, 64)),
              "lora_unet_double_blocks_30_img_attn_q.lora_up.weight": mx.zeros((64, 4))}
    for name, weights in (("for13b.safetensors", lora13), ("for15.safetensors", lora15)):
        mx.save_safetensors(str(tmp_path / name), weights)
    for args, words in [(["--transformer", str(tiny / "transformer")], "is HunyuanVideo (13B)'s DiT, and this model "
                         "is HunyuanVideo 1.5: its text encoders and VAE are HunyuanVideo (13B)'s too; give a "
                         "HunyuanVideo (13B) checkpoint as --model"),
                        (["--lora", "for13b.safetensors"], "the LoRA for13b.safetensors is for HunyuanVideo (13B)'s "
                         "DiT, and this model is HunyuanVideo 1.5: use a LoRA made for HunyuanVideo 1.5.")]:
        r = run(env, tmp_path, "--model", "tiny15", "--prompt", "a cat", *args, "--output", "x.mp4")
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and words in lines[0], r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), "--model", str(tiny15), "--transformer",
                        str(tiny / "transformer"), "--output", str(tmp_path / "x")], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()  # convert_weights.py words it with its own flags
    assert r.returncode == 2 and "(13B)'s too; give a HunyuanVideo (13B) checkpoint as --model" in lines[-1], r.stderr
    assert not (tmp_path / "x").exists()
    with pytest.raises(H.HunyuanVideoError, match="is HunyuanVideo 1.5's DiT, and this model is HunyuanVideo "
                                                  "\\(13B\\)"):
        H.load_transformer(tiny15 / "transformer")
    with pytest.raises(H.HunyuanVideoError, match="for15.safetensors is for HunyuanVideo 1.5's DiT, and this model is "
                                                  "HunyuanVideo \\(13B\\)"):
        H.HunyuanVideoPipeline.from_pretrained("tiny", loras=[str(tmp_path / "for15.safetensors")])
    assert H.load_transformer(tiny15 / "transformer", model_class=H15.HunyuanVideo15Transformer).family == \
        H15.HunyuanVideo15Transformer.family  # its own loads


def test_the_preview_maps_1_5_s_32_channels_by_comfyuis_factors():
    """The preview of 1.5's latents (32 channels) is ComfyUI's linear map for 1.5 (its HunyuanVideo15 latent format:
    factors and bias typed here from comfy/latent_formats.py), from [-1, 1] to 0..255."""
    import mlx.core as mx

    import HunyuanVideo15_Apple  # noqa: F401  (it adds 1.5's factors)
    bias, channel_9 = np.array([0.0456, -0.0202, -0.0644]), np.array([0.0393, 0.0944, 0.1131])
    x0 = mx.zeros((1, 2, 3, 4, 32))
    assert (H.latent_preview(x0) == np.round((bias + 1) / 2 * 255)).all()
    one = H.latent_preview(x0.at[..., 9].add(1.0))
    assert (one[0, 0, 0] == np.round((bias + channel_9 + 1) / 2 * 255)).all()


@pytest.mark.parametrize("model, quantization", [("tiny15-i2v", "int8"), ("tiny15", "int4")])
def test_convert_writes_a_quantized_checkpoint_that_runs_as_quantized_on_load(env, tmp_path, monkeypatch, model,
                                                                               quantization):
    """convert_weights.py on a whole 1.5 checkpoint: the same layout (byT5, SigLIP, its image processor and the guider
    copied), the DiT and Qwen stored quantized exactly as quantizing at load makes them, the memory plan counting
    what is stored, and a run of the converted folder equal, to the bit, to the original quantized at load."""
    import mlx.core as mx
    from diffusers import ClassifierFreeGuidance
    from mlx.utils import tree_flatten

    import HunyuanVideo15_Apple as H15
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", env["HUNYUAN_APPLE_CACHE"])
    src = tmp_path / "src"
    shutil.copytree(H.tiny_checkpoint(model), src)
    ClassifierFreeGuidance(guidance_scale=6.0).save_pretrained(src / "guider")  # the base checkpoints' true CFG
    r = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), "--model", str(src), "--quantization",
                        quantization, "--output", str(tmp_path / "q")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "q"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert {"guider", "text_encoder_2"} <= {p.name for p in out.iterdir()}
    assert ("image_encoder" in os.listdir(out)) == (model == "tiny15-i2v")
    for load, part in ((H15.load_transformer, "transformer"), (H15.load_text_encoder, "text_encoder")):
        stored = dict(tree_flatten(load(out / part).parameters()))
        on_load = dict(tree_flatten(load(src / part, quantization=quantization).parameters()))
        assert stored.keys() == on_load.keys() and any(k.endswith(".scales") for k in stored), part
        assert all(mx.array_equal(stored[k], on_load[k]).item() for k in stored), part
    assert H15.checkpoint_settings(out) == H15.checkpoint_settings(src)  # its guider's 6: true CFG
    dit = {f: H._components(f, only=("transformer",))["transformer"][0] for f in (out, src)}  # (shape, dtype)s
    assert H._weights_bytes(dit[out]) == H._weights_bytes(dit[src], quantization)  # the plan's stored weights
    assert H15.estimate_memory(out, 32, 48, 5)["text encoders"] == \
        H15.estimate_memory(src, 32, 48, 5, quantization)["text encoders"]
    kw = dict(height=32, width=48, frames=5, steps=2, seed=3, output_type="latent", cfg_scale=6.0,
              negative_prompt="")
    if model == "tiny15-i2v":
        kw["image"] = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8))
    a = H15.HunyuanVideo15Pipeline.from_pretrained(out)("a cat", **kw)
    b = H15.HunyuanVideo15Pipeline.from_pretrained(src, quantization=quantization)("a cat", **kw)
    assert np.array_equal(np.array(a), np.array(b))

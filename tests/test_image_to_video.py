"""Image to video against diffusers, run live: HunyuanVideo-I2V (token replace and its 33-channel latent-concat
variant) with LLaVA's vision tower, and SkyReels-V1 I2V; tiny random checkpoints built with diffusers and
transformers (a tiny LlavaForConditionalGeneration with a CLIP vision tower at 336 x 336, the real Llama-3
vocabulary with <image>), saved in the diffusers layout and read by our from_pretrained.

Tolerances (relative error = max |ours - ref| / max |ref|, float32), each about 5-10x what was measured on this
project's Linux machine: CLIP's image preprocessing 1e-6 absolute; the prompt+image states (valid positions) 5e-6
(measured 6.7e-7 to 8.5e-7), mask equal, pooled vector 2e-6 (1.8e-7); whole runs from the same initial noise:
latents per case (below, with what was measured), frames within 2 levels of 255 (0.5).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import our_names, make_clip_tokenizer, make_llama_tokenizer, randomize, rel_err
from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanSkyreelsImageToVideoPipeline,
                       HunyuanVideoImageToVideoPipeline, HunyuanVideoTransformer3DModel)
from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_skyreels_image2video as skyreels_module
from PIL import Image
from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, LlamaConfig, LlamaModel,
                          LlavaConfig, LlavaForConditionalGeneration)

import HunyuanVideo_Apple as H

STATES_TOL = 5e-6
POOLED_TOL = 2e-6
FRAME_LEVELS = 2
PROMPT = "A cat wearing sunglasses walks along the beach at sunset."
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, rope_axes_dim=(4, 6, 6), num_layers=2,
                num_single_layers=2, num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=32)


def picture(width, height, seed=0, mode="RGB"):
    """A smooth random picture (resizing keeps it meaningful), in any PIL mode."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3)).astype(np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR).convert(mode)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The components the three pipelines share, and LLaVA's."""
    root = tmp_path_factory.mktemp("i2v")
    tok = make_llama_tokenizer(root / "tok")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    tok.save_pretrained(root / "tok")
    image_token, pad = tok.convert_tokens_to_ids("<image>"), tok.pad_token_id
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, pad_token_id=pad)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                              image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=32)
    config = LlavaConfig(text_config=LlamaConfig(**text), vision_config=vision, image_token_index=image_token,
                         projector_hidden_act="gelu", vision_feature_layer=-2)
    config.pad_token_id = pad
    llava = randomize(LlavaForConditionalGeneration(config), seed=0).eval()
    llama = randomize(LlamaModel(LlamaConfig(**{**text, "vocab_size": 128256, "pad_token_id": None})), seed=4).eval()
    clip = randomize(CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2)), seed=1).eval()
    vae = randomize(AutoencoderKLHunyuanVideo(block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                                              norm_num_groups=4), seed=3).eval()
    return dict(root=root, tok=tok, tok_t2v=make_llama_tokenizer(root / "tok_t2v"), llava=llava, llama=llama,
                clip=clip, tok2=make_clip_tokenizer(root / "tok2"), vae=vae,
                processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}))


def make_pipeline(parts, kind):
    """diffusers' pipeline of one kind with a random DiT, saved in the diffusers layout: (folder, pipeline)."""
    common = dict(vae=parts["vae"], scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                  text_encoder_2=parts["clip"], tokenizer_2=parts["tok2"])
    if kind == "skyreels":
        dit = HunyuanVideoTransformer3DModel(**TINY_DIT, in_channels=32, out_channels=16)
        pipe = HunyuanSkyreelsImageToVideoPipeline(text_encoder=parts["llama"], tokenizer=parts["tok_t2v"],
                                                   transformer=randomize(dit, seed=7).eval(), **common)
    else:
        dit = HunyuanVideoTransformer3DModel(**TINY_DIT, image_condition_type=kind,
                                             guidance_embeds=kind == "token_replace",
                                             in_channels=16 if kind == "token_replace" else 33, out_channels=16)
        pipe = HunyuanVideoImageToVideoPipeline(text_encoder=parts["llava"], tokenizer=parts["tok"],
                                                transformer=randomize(dit, seed=5).eval(),
                                                image_processor=parts["processor"], **common)
    folder = parts["root"] / kind
    if not folder.exists():
        pipe.save_pretrained(folder)
    return folder, pipe


@pytest.mark.parametrize("size, mode", [((400, 300), "RGB"), ((200, 520), "RGB"), ((336, 336), "L"),
                                        ((97, 61), "RGBA")])
def test_clip_preprocessing_matches_the_processor(parts, size, mode):
    image = picture(*size, seed=1, mode=mode)
    ref = parts["processor"](image, return_tensors="np").pixel_values[0].transpose(1, 2, 0)  # (336, 336, 3)
    ours = np.array(H.clip_pixels(image, parts["processor"].to_dict()))[0]
    assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("size", [(400, 300), (200, 520), (64, 48)])
def test_prompt_and_image_states_match_encode_prompt(parts, size):
    """LLaVA's states for a prompt read with its image (and for the negative prompt's black image, every 2nd
    image state) against diffusers' encode_prompt, on images of several sizes and aspect ratios."""
    folder, ref = make_pipeline(parts, "token_replace")
    image = picture(*size, seed=2)
    ours = H.HunyuanVideoPipeline.from_pretrained(folder, dtype=mx.float32)
    for prompt, interleave, img in ((PROMPT, 4, image), ("blurry, low quality", 2, Image.new("RGB", (64, 48), 0))):
        with torch.no_grad():
            states, pooled, mask = ref.encode_prompt(image=img, prompt=prompt, image_embed_interleave=interleave)
        mine, my_mask, my_pooled = ours.encode_prompt((prompt, img, interleave))
        assert np.array_equal(np.array(my_mask), mask.numpy()), "masks differ"
        assert mine.shape[1] == 576 // interleave + 252
        valid = mask.numpy()[0].astype(bool)
        err = rel_err(np.array(mine)[0][valid], states.numpy()[0][valid])
        print(f"{size}, interleave {interleave}: states {err:.2e}")
        assert err <= STATES_TOL, f"states: relative error {err:.2e} > {STATES_TOL}"
        assert rel_err(np.array(my_pooled), pooled.numpy()) <= POOLED_TOL


@pytest.mark.parametrize("kind, size, cfg, bound", [  # bound: about 6x the latents' measured error
    ("token_replace", (80, 64), False, 3e-4),  # measured 4.8e-5
    ("latent_concat", (50, 70), False, 2e-5),  # 2.3e-6
    ("skyreels", (64, 48), False, 5e-5),  # 6.9e-6
    ("token_replace", (64, 64), True, 2e-4),  # 2.8e-5
    ("skyreels", (72, 40), True, 5e-5)])  # 7.7e-6
def test_image_to_video_matches_diffusers(parts, kind, size, cfg, bound, monkeypatch):
    """Whole runs from the same initial noise against HunyuanVideoImageToVideoPipeline (both conditionings) and
    HunyuanSkyreelsImageToVideoPipeline, with and without true CFG (HunyuanVideo-I2V reads the negative prompt with a
    black image). SkyReels' pipeline samples the image's posterior; ours takes its mean, so the reference is run with
    the mean too (its retrieve_latents in "argmax" mode)."""
    folder, ref = make_pipeline(parts, kind)
    if kind == "skyreels":
        real = skyreels_module.retrieve_latents
        monkeypatch.setattr(skyreels_module, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                            real(out, generator, "argmax"))
    image = picture(*size, seed=3)
    (F, Hh, W), steps = (9, 48, 64), 3
    init = torch.randn(1, 16, (F - 1) // 4 + 1, Hh // 8, W // 8, generator=torch.Generator().manual_seed(6))
    kw = dict(height=Hh, width=W, num_frames=F, num_inference_steps=steps)
    if cfg:
        kw.update(negative_prompt="blurry, low quality", true_cfg_scale=4.0)
    guidance = 6.0 if kind == "token_replace" else 1.0
    with torch.no_grad():
        ref_latents = ref(image=image, prompt=PROMPT, latents=init, output_type="latent", return_dict=False,
                          guidance_scale=guidance, **kw)[0].permute(0, 2, 3, 4, 1).numpy()
        ref_frames = ref(image=image, prompt=PROMPT, latents=init, output_type="np", return_dict=False,
                         guidance_scale=guidance, **kw)[0][0]
    ours = H.HunyuanVideoPipeline.from_pretrained(folder, dtype=mx.float32)
    assert ours.image_condition() == {"skyreels": "concat"}.get(kind, kind)
    mine = mx.array(init.permute(0, 2, 3, 4, 1).numpy())
    latents = np.array(ours(PROMPT, image=image, latents=mine, output_type="latent", guidance=guidance,
                            **our_names(kw)))
    if kind == "latent_concat":  # the reference's latent output leaves out the first frame
        latents = latents[:, 1:]
    err = rel_err(latents, ref_latents)
    print(f"{kind}{' with true CFG' if cfg else ''}: latents {err:.2e}")
    assert err <= bound, f"{kind}: final latents relative error {err:.2e} > {bound}"
    frames = ours(PROMPT, image=image, latents=mine, guidance=guidance, **our_names(kw))
    assert frames.shape == ref_frames.shape == (F - 4 if kind == "latent_concat" else F, Hh, W, 3)
    levels = np.abs(frames.astype(np.float64) - ref_frames * 255).max()
    print(f"{kind}{' with true CFG' if cfg else ''}: frames {levels:.2f} levels")
    assert levels <= FRAME_LEVELS, f"{kind}: frames differ by {levels:.2f} levels of 255"


def run_cli(tmp_path, *args):
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "HUNYUAN_APPLE_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, str(Path(H.__file__).parent / "hunyuan_apple.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_the_command_line_with_an_image(parts, tmp_path, monkeypatch, capsys):
    """--image on an I2V checkpoint (read with the prompt, the prompt cache keeping image and prompt together, a
    negative prompt too), one sentence for what cannot be (the command line's main in this process), a warning for a
    tiny image, grayscale converted."""
    folder, _ = make_pipeline(parts, "token_replace")
    picture(90, 70, seed=4).save(tmp_path / "cat.png")
    picture(90, 70, seed=4, mode="L").save(tmp_path / "gray.png")
    small = ["--model", str(folder), "--resolution", "48", "64", "--frames", "9", "--steps", "2", "--seed", "1"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path / "cache"))
    import hunyuan_apple as cli

    def run(*args):
        code = cli.main(["--prompt", "a cat", *small, *args])
        return code, capsys.readouterr().err
    code, err = run("--image", "cat.png", "--output", "a.mp4")
    assert code == 0 and f"image {tmp_path / 'cat.png'}" in err and "prompt cache" not in err, err
    code, err = run("--image", "cat.png", "--output", "b.mp4", "--negative-prompt", "blurry")
    assert code == 0 and "the prompt's encoding comes from the prompt cache" not in err, err
    code, err = run("--image", "cat.png", "--output", "c.mp4")
    assert code == 0 and "the prompt's encoding comes from the prompt cache" in err, err
    code, err = run("--image", "gray.png", "--output", "d.mp4")
    assert code == 0 and "prompt cache" not in err, err  # another image: another entry
    picture(8, 6, seed=5).save(tmp_path / "tiny.png")
    with pytest.warns(UserWarning, match="the image is 8 x 6, far smaller than the 64 x 48 video"):
        cli.resolve(cli.parse_args(["--prompt", "a cat", "--image", str(tmp_path / "tiny.png"), *map(str, small)]))
    picture(600, 30, seed=5).save(tmp_path / "wide.png")  # 20:1 into 4:3: stretched, said so
    with pytest.warns(UserWarning, match="the image is 600 x 30 and the video 64 x 48: the image is stretched"):
        cli.resolve(cli.parse_args(["--prompt", "a cat", "--image", str(tmp_path / "wide.png"), *map(str, small)]))

    (tmp_path / "notes.png").write_text("not an image")
    for args, words in ((["--image", "absent.png"], "the image absent.png does not exist"),
                        (["--image", "notes.png"], "the image notes.png could not be read"),
                        ([], "is an image-to-video checkpoint: give --image"),
                        (["--image", "cat.png", "--video", "cat.png"], "--image and --video: give one of them"),
                        (["--image", "cat.png", "--output", "cat.png"], "the video is an mp4"),
                        (["--image", "cat.png", "--model", "tiny"], "is a text-to-video checkpoint, which takes no "
                                                                    "image")):
        code, err = run(*args)
        assert code == 2 and words in err, (args, err)


def test_the_tiny_image_to_video_demo(tmp_path, monkeypatch):
    """--model tiny-i2v, built here without a download: HunyuanVideo-I2V's token replace on tiny random weights
    (a tiny LLaVA reads the prompt with the image). The first latent frame is the image's latents, to the bit, and
    the command line makes its video."""
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path / "cache"))
    pipe = H.HunyuanVideoPipeline.from_pretrained("tiny-i2v")
    assert pipe.image_condition() == "token_replace"
    image = picture(90, 70, seed=2)
    latents = pipe(PROMPT, image=image, height=48, width=64, frames=9, steps=2, seed=0, output_type="latent")
    assert np.array_equal(np.array(latents[:, :1]), np.array(pipe.encode_image(image, 48, 64)))
    assert not np.array_equal(np.array(latents[:, 1:2]), np.array(latents[:, :1]))
    image.save(tmp_path / "cat.png")
    r = run_cli(tmp_path, "--model", "tiny-i2v", "--image", "cat.png", "--prompt", "a cat", "--output", "c.mp4")
    assert r.returncode == 0 and "height 96, width 160, 9 frames, 8 steps" in r.stderr, r.stderr
    assert (tmp_path / "c.mp4").stat().st_size > 0


def test_api_images_of_any_kind_and_bad_requests(parts):
    folder, _ = make_pipeline(parts, "latent_concat")
    ours = H.HunyuanVideoPipeline.from_pretrained(folder, dtype=mx.float32)
    kw = dict(height=32, width=32, frames=5, steps=1, seed=0, output_type="latent")
    rgb = np.array(picture(40, 40, seed=6))
    a = np.array(ours(PROMPT, image=rgb, **kw))
    rgba = np.concatenate([rgb, np.full((40, 40, 1), 255, np.uint8)], axis=-1)
    assert np.array_equal(np.array(ours(PROMPT, image=rgba, **kw)), a)  # an opaque RGBA image is its RGB
    gray = np.array(picture(40, 40, seed=6, mode="L"))
    assert ours(PROMPT, image=gray, **kw).shape == a.shape
    for bad, words in ((None, "is an image-to-video checkpoint: give image"),
                       (np.zeros((4, 4, 2), np.uint8), "an image array of shape (4, 4, 2)"),
                       ("absent.png", "does not exist")):
        with pytest.raises(H.HunyuanVideoError, match=words.replace("(", r"\(").replace(")", r"\)")):
            ours(PROMPT, image=bad, **kw)
    with pytest.raises(H.HunyuanVideoError, match="leaves out its first 4 frames; ask for 5 or more"):
        ours(PROMPT, image=rgb, **{**kw, "frames": 1})
    t2v = H.HunyuanVideoPipeline.from_pretrained("tiny")
    with pytest.raises(H.HunyuanVideoError, match="text-to-video checkpoint, which takes no image"):
        t2v(PROMPT, image=rgb, **kw)


def test_images_of_every_mode_read_as_8_bit_rgb(tmp_path):
    """Each mode PIL opens, from a file where the format stores it, against the value written in the test: 16-bit
    gray (v / 257: not clipped to white), 32-bit gray, CMYK ((255 - C)(255 - K) / 255), a palette with a
    transparent entry (its colours), gray and colour with alpha (the colour: alpha dropped, as the reference
    pipelines drop it)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, (24, 32)).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode in ("I;16", "I")
    expected = np.repeat(np.round(gray16 / 257)[..., None], 3, -1)
    assert np.array_equal(np.array(H.read_image(tmp_path / "gray16.png")), expected)
    gray32 = Image.fromarray(gray16.astype(np.int32))  # mode I, as older PIL opens 16-bit PNGs
    assert gray32.mode == "I" and np.array_equal(np.array(H.read_image(gray32)), expected)

    cmyk = rng.integers(0, 256, (24, 32, 4)).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tiff")
    c, k = cmyk[..., :3].astype(int), cmyk[..., 3:].astype(int)
    assert np.abs(np.array(H.read_image(tmp_path / "cmyk.tiff")).astype(int) - (255 - c) * (255 - k) / 255).max() <= 1

    colours = rng.integers(0, 256, (16, 3)).astype(np.uint8)
    index = rng.integers(0, 16, (24, 32)).astype(np.uint8)
    palette = Image.fromarray(index, "P")
    palette.putpalette(colours.tobytes())
    palette.save(tmp_path / "palette.png", transparency=3)
    assert np.array_equal(np.array(H.read_image(tmp_path / "palette.png")), colours[index])

    rgba = rng.integers(0, 256, (24, 32, 4)).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(np.array(H.read_image(tmp_path / "rgba.png")), rgba[..., :3])
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    assert np.array_equal(np.array(H.read_image(tmp_path / "la.png")), np.repeat(rgba[..., :1], 3, -1))


def test_other_layouts_and_conversion(parts, tmp_path):
    """Tencent's layout (one file, Tencent's names; its I2V DiT does not say how it takes the image, so the
    caller does) and SkyReels' single file load as the diffusers folders do; convert_weights.py converts an I2V
    checkpoint (LLaVA's vision tower kept in float, the image processor copied) into one that runs as quantizing
    on load does, to the bit."""
    import subprocess
    import sys
    from pathlib import Path

    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file
    for kind, sizes in (("token_replace", dict(image_condition_type="token_replace")), ("skyreels", {})):
        folder, _ = make_pipeline(parts, kind)
        model = H.load_transformer(folder / "transformer", dtype=mx.float32)
        single = tmp_path / f"{kind}.safetensors"
        save_file({"model.diffusion_model." + k: np.ascontiguousarray(v)  # numpy of a transposed MLX array: strided
                   for k, v in H._checkpoint_weights(model).items()}, single)
        again = H.load_transformer(single, dtype=mx.float32, rope_axes_dim=TINY_DIT["rope_axes_dim"], **sizes)
        assert again.image_condition_type == model.image_condition_type and again.in_channels == model.in_channels
        a, b = dict(tree_flatten(model.parameters())), dict(tree_flatten(again.parameters()))
        assert a.keys() == b.keys() and [k for k in a if not mx.array_equal(a[k], b[k]).item()] == []

    folder, _ = make_pipeline(parts, "token_replace")
    r = subprocess.run([sys.executable, str(Path(H.__file__).parent / "convert_weights.py"), "--model", str(folder),
                        "--quantization", "int8", "--output", str(tmp_path / "q8")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q8" / "image_processor" / "preprocessor_config.json").exists()
    llava = H.load_text_encoder(tmp_path / "q8" / "text_encoder")
    assert isinstance(llava.language_model.layers[0].mlp.up_proj, H.nn.QuantizedLinear)
    assert isinstance(llava.multi_modal_projector.linear_1, H.nn.Linear)  # the vision side stays as it was
    kw = dict(height=32, width=48, frames=5, steps=2, seed=0, output_type="latent",
              image=picture(48, 32, seed=8))
    converted = H.HunyuanVideoPipeline.from_pretrained(tmp_path / "q8")(PROMPT, **kw)
    on_load = H.HunyuanVideoPipeline.from_pretrained(folder, quantization="int8")(PROMPT, **kw)
    assert np.array_equal(np.array(converted), np.array(on_load))


def test_the_plan_brackets_the_measured_peaks(parts):
    """The memory plan for image to video (LLaVA's 934 tokens and its vision tower; the DiT's 396 text tokens and
    token replace's two-part modulation) against measured peaks, with test_memory's margins."""
    import warnings

    from test_memory import LONG, check_ratios
    folder, _ = make_pipeline(parts, "token_replace")
    size = (128, 288, 13)
    ratios = {}
    for dtype in (None, mx.float32):
        pipe = H.HunyuanVideoPipeline.from_pretrained(folder, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the prompt is cut at 256 tokens, on purpose
            pipe(LONG, **dict(zip(("height", "width", "frames"), size)), steps=1, seed=0,
                 image=picture(300, 200, seed=9), output_type="latent")
        est = H.estimate_memory(folder, *size, dtypes=pipe.dtypes, steps=1)
        ratios.update({(phase, dtype): est[phase] / (pipe.stats[phase][1] * H.GB) for phase in ("text encoders",
                                                                                                 "denoise")})
    check_ratios(ratios)

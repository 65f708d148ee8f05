"""Benchmarks: one DiT forward against diffusers; each phase of a generation per precision; the memory plan.

    python bench_hunyuan_apple.py                        # full-size DiT, random bf16 weights, 3 sizes
    python bench_hunyuan_apple.py --reference            # also diffusers on the same GPU, and the ratio
    python bench_hunyuan_apple.py --phases --sizes 544x960x13            # text / denoise / decode per precision
    python bench_hunyuan_apple.py --phases --model HunyuanVideo          # the same with real weights
    python bench_hunyuan_apple.py --plan                 # the memory plan's estimates at full size, no weights
    python bench_hunyuan_apple.py --parity               # one double + one single block at real width vs diffusers, bf16
    python bench_hunyuan_apple.py --vae --sizes 544x960x129   # our tiled decode vs diffusers' on the same device
    python bench_hunyuan_apple.py --tiny [--phases]      # tiny random models at small sizes: a smoke run anywhere
    python bench_hunyuan_apple.py --phases --model tiny  # the whole pipeline on the tiny demo checkpoint
    python bench_hunyuan_apple.py --work                 # DiT forwards and PFLOP a generation: caches, FastHunyuan
    python bench_hunyuan_apple.py --work --tiny          # the same measured on the tiny model (random weights)
    python bench_hunyuan_apple.py --page                 # the web page's own cost a step (needs gradio)
    python bench_hunyuan_apple.py --distributed          # several ranks: bytes and projected time a step, and
                                                         # a tiny run measured on 1 and 2 local ranks
    python bench_hunyuan_apple.py --family 1.5 [--reference | --parity | --vae | --phases]   # HunyuanVideo 1.5

Sizes are video HEIGHTxWIDTHxFRAMES; the text is 256 valid tokens. Effective TFLOP/s counts the token-wise
linear layers and attention of the 60 blocks (1.5: 54; the embedders and the refiner are negligible) over the
video's tokens and the valid text tokens. 1.5's text is the LLM's 1000 slots with 256 valid and byT5's 256 with
none (a prompt that quotes no text), as its pipeline pads them: ours drops the padding, diffusers attends over it
masked, with 729 zero image slots besides. Each figure is
the mean of --repeat timed forwards after one warm-up forward. Random weights, so no checkpoint is needed.
"""

import argparse
import gc
import importlib
import json
import math
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import HunyuanVideo15_Apple as H15
import HunyuanVideo_Apple as H
from mlx.utils import tree_flatten

FULL_SIZES = ["544x960x25", "544x960x61", "720x1280x129"]
TINY = dict(num_attention_heads=2, attention_head_dim=32, rope_axes_dim=(8, 12, 12), num_layers=2,
            num_single_layers=2, num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=32)
TINY_SIZES = ["64x64x5", "64x96x9"]
FULL_SIZES15 = ["480x848x61", "480x848x121", "720x1280x121"]
TINY15 = dict(num_attention_heads=2, attention_head_dim=32, rope_axes_dim=(8, 12, 12), num_layers=2,
              num_refiner_layers=1, text_embed_dim=64, text_embed_2_dim=32, image_embed_dim=32)
TINY_VAE15 = dict(block_out_channels=(8, 16, 16, 16, 16), layers_per_block=1, latent_channels=8)
QWEN = dict(model_type="qwen2_5_vl_text", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6)  # 1.5's LLM


def parse_size(s):
    h, w, f = (int(v) for v in s.lower().split("x"))
    return h, w, f


def tokens(h, w, f, text=256):
    return math.prod(H.patch_grid(h, w, f)) + text


def forward_flops(cfg, n, v15=False):
    """H.dit_flops for a DiT built with cfg (the real model's sizes where cfg is silent; v15: 1.5's)."""
    d = cfg.get("num_attention_heads", 16 if v15 else 24) * cfg.get("attention_head_dim", 128)
    return H.dit_flops(n, d, int(d * cfg.get("mlp_ratio", 4.0)), cfg.get("num_layers", 54 if v15 else 20),
                       0 if v15 else cfg.get("num_single_layers", 40))


def inputs_np(cfg, h, w, f, seed=0, v15=False):
    """Random DiT inputs, channels-last, with 256 valid text tokens, at timestep t. 1.5: 65 input channels at 1/16
    the size, the LLM's 1000 slots and byT5's 256 (none valid), as its pipeline pads them; t 896, as 900 is not a
    bf16 number (its pipeline gives diffusers the timestep in bf16)."""
    rng = np.random.default_rng(seed)
    rand = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    T = (f - 1) // 4 + 1
    if not v15:
        return dict(latents=rand(1, T, h // 8, w // 8, 16), t=900.0,
                    text=rand(1, 256, cfg.get("text_embed_dim", 4096)), mask=np.ones((1, 256), np.int64),
                    pooled=rand(1, cfg.get("pooled_projection_dim", 768)))
    return dict(latents=rand(1, T, h // 16, w // 16, cfg.get("in_channels", 65)), t=896.0,
                text=rand(1, H15.QWEN_LENGTH, cfg.get("text_embed_dim", 3584)),
                mask=(np.arange(H15.QWEN_LENGTH) < 256)[None].astype(np.int64),
                byt5=np.zeros((1, H15.BYT5_LENGTH, cfg.get("text_embed_2_dim", 1472)), np.float32),
                byt5_mask=np.zeros((1, H15.BYT5_LENGTH), np.int64),
                image=np.zeros((1, 729, cfg.get("image_embed_dim", 1152)), np.float32))  # diffusers' only


def dit_args(x):
    """Our DiT's arguments for inputs_np's arrays: bf16; 13B's guidance 6016, 1.5's Conditions (no image: text to
    video, as our pipeline gives it)."""
    bf16 = lambda k: mx.array(x[k], dtype=mx.bfloat16)  # noqa: E731
    head = (bf16("latents"), mx.array([x["t"]]), bf16("text"), mx.array(x["mask"]))
    if "byt5" in x:
        return head + (H15.Conditions(bf16("byt5"), mx.array(x["byt5_mask"]), None),)
    return head + (bf16("pooled"), mx.array([6016.0]))


def reference_args(x, dev):
    """diffusers' keyword arguments for inputs_np's arrays, bf16 on dev (1.5: the timestep in bf16 and zero image
    embeddings, as its text to video pipeline gives them)."""
    import torch

    t = lambda k, dtype=torch.bfloat16: torch.from_numpy(x[k]).to(dev, dtype)  # noqa: E731
    step = torch.tensor([x["t"]], device=dev, dtype=torch.bfloat16 if "byt5" in x else torch.float32)
    kw = dict(hidden_states=t("latents").permute(0, 4, 1, 2, 3), timestep=step,
              encoder_hidden_states=t("text"), encoder_attention_mask=t("mask", torch.int64), return_dict=False)
    if "byt5" in x:
        return dict(kw, encoder_hidden_states_2=t("byt5"), encoder_attention_mask_2=t("byt5_mask", torch.int64),
                    image_embeds=t("image"))
    return dict(kw, pooled_projections=t("pooled"), guidance=torch.tensor([6016.0], device=dev, dtype=torch.bfloat16))


def dit_class(v15):
    return H15.HunyuanVideo15Transformer if v15 else H.HunyuanVideoTransformer


def bench_ours(cfg, sizes, repeat, v15=False):
    model = random_model(dit_class(v15), **cfg)
    results = {}
    for s in sizes:
        args = dit_args(inputs_np(cfg, *parse_size(s), v15=v15))
        mx.eval(model(*args))  # warm-up: compiles the fused pieces
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        for _ in range(repeat):
            mx.eval(model(*args))
        results[s] = ((time.perf_counter() - t0) / repeat, mx.get_peak_memory() / 2**30)
    del model
    gc.collect()
    mx.clear_cache()
    return results


def bench_reference(cfg, sizes, repeat, v15=False):
    import diffusers
    import torch

    dev = torch_device()
    torch.set_default_dtype(torch.bfloat16)  # build the weights in bf16 directly, on the device
    with torch.device(dev), torch.no_grad():
        model = getattr(diffusers, dit_class(v15).diffusers_class)(**cfg).eval()
    torch.set_default_dtype(torch.float32)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    results = {}
    for s in sizes:
        kw = reference_args(inputs_np(cfg, *parse_size(s), v15=v15), dev)
        with torch.no_grad():
            model(**kw)
            sync()
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(repeat):
                model(**kw)
            sync()
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
        results[s] = ((time.perf_counter() - t0) / repeat, peak)
    return results, dev


def timed(fn):
    """(result, seconds, peak GiB) of fn(), evaluated, from a clean cache."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    out = fn()
    mx.eval(out)
    return out, time.perf_counter() - t0, mx.get_peak_memory() / 2**30


def random_model(cls, quantization=None, dtype=mx.bfloat16, **kw):
    """A model with random weights in dtype, materialized layer by layer (so never in float32 at once)."""
    model = cls(**kw)
    model.set_dtype(dtype)
    if quantization:
        H.quantize(model, quantization)
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)
    return model


def bench_phases(args, sizes, v15=False):
    """Each phase alone, per precision: random weights at full size (or tiny) unless --model has real ones. 1.5's
    text encoder phase times its Qwen2.5-VL LLM (byT5, 1% of its weights, is left out)."""
    dit_kw = (TINY15 if v15 else TINY) if args.tiny else {}
    llm_kw = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2) if args.tiny else {}
    if v15:
        llm_kw = {**H._hf_sizes(H.LlamaTextEncoder, QWEN), **llm_kw, "attention_bias": True}
        vae_kw, tile, stride = TINY_VAE15 if args.tiny else {}, H15.VAE_TILE, H15.VAE_STRIDE
    else:
        vae_kw = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4) if args.tiny else {}
        tile, stride = H.DEFAULT_VAE_TILE, H.DEFAULT_VAE_STRIDE
    print(f"{'precision':>9} {'size':>14} {'phase':>14} {'seconds':>9} {'peak GiB':>8}")
    for q in args.quantizations:
        quant = None if q == "bf16" else q
        for s in sizes:
            h, w, f = parse_size(s)
            rows = []
            if args.model:
                pipe = H._pipeline_class(args.model).from_pretrained(args.model, quantization=quant)
                pipe("a red fox runs through a snowy forest at dawn", height=h, width=w, frames=f, steps=args.steps,
                     seed=0, force=args.force)
                rows = [(name, pipe.stats[name][0] / (args.steps if name == "denoise" else 1), pipe.stats[name][1])
                        for name in ("text encoders", "denoise", "decode")]
            else:
                llm, sec, peak = timed(lambda: random_model(H.LlamaTextEncoder, quant,
                                                            H.DEFAULT_DTYPES["text_encoders"], **llm_kw))
                length = H15.QWEN_LENGTH + H15.QWEN_CROP_START if v15 else H.TEXT_LENGTH + H.CROP_START
                ids = mx.random.randint(0, llm.embed_tokens.weight.shape[0], (1, length))
                mx.eval(llm(ids))  # warm-up: the first quantized forward on a GPU compiles its kernels
                _, sec2, peak2 = timed(lambda: llm(ids))
                rows.append(("text encoder", sec2, max(peak, peak2)))
                del llm
                dit, _, peak = timed(lambda: random_model(dit_class(v15), quant, **dit_kw))
                a = dit_args(inputs_np(dit_kw, h, w, f, v15=v15))
                mx.eval(dit(*a))  # warm-up
                _, sec, peak2 = timed(lambda: dit(*a))
                rows.append(("denoise step", sec, max(peak, peak2)))
                del dit
                vae = random_model(H15.HunyuanVideo15VAE if v15 else H.HunyuanVideoVAE,
                                   dtype=H.DEFAULT_DTYPES["vae"], **vae_kw)
                z = mx.random.normal((*a[0].shape[:4], vae_kw.get("latent_channels", 32 if v15 else 16)))
                z = z.astype(vae.dtype)
                _, sec, peak = timed(lambda: vae.decode(z, tile, stride))
                rows.append(("decode", sec, peak))
                del vae
            for name, sec, peak in rows:
                print(f"{q:>9} {s:>14} {name:>14} {sec:>9.3f} {peak:>8.3g}")


def _write_header(folder, name, params, config):
    """A component's folder: its tensors as a safetensors header without data (bf16, as released), its config."""
    d = folder / name
    d.mkdir(parents=True)
    header = {k: {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [0, 0]} for k, v in params.items()}
    raw = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    (d / "config.json").write_text(json.dumps(config))


def header_only_checkpoint(folder, image_condition=None):
    """The real model's components as safetensors headers without data (and configs): enough for the memory
    plan, which reads only names, shapes and dtypes. MLX builds the models lazily, so this costs nothing.
    image_condition: HunyuanVideo-I2V's ("token_replace", or "latent_concat": 33 input channels), with LLaVA's
    vision tower and projector in the text encoder."""
    vae = {k: v.transpose(0, 4, 1, 2, 3) if v.ndim == 5 else v  # PyTorch's conv layout, as the files have it
           for k, v in tree_flatten(H.HunyuanVideoVAE().parameters())}
    llm = dict(tree_flatten(H.LlamaTextEncoder(skip_layers=0).parameters()))
    text = dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                num_attention_heads=32, num_key_value_heads=8)
    if image_condition:  # LLaVA: the LLM (its vocabulary grown by the image and pad tokens), tower, projector
        llava = H.LlavaTextEncoder(dict(text, vocab_size=128320), {}, 128257, 128258)
        weights = {k: v for k, v in tree_flatten(llava.parameters()) if not k.startswith("language_model.")}
        weights.update({"language_model." + k: v for k, v in llm.items()})
        _write_header(folder, "text_encoder", weights, dict(model_type="llava", text_config=text, vision_config={},
                                                            image_token_index=128257, pad_token_id=128258))
    else:
        _write_header(folder, "text_encoder", {**llm, "norm.weight": mx.zeros((4096,))}, text)
    _write_header(folder, "text_encoder_2", dict(tree_flatten(H.CLIPTextEncoder().parameters())), {})
    dit = H.HunyuanVideoTransformer(image_condition_type=image_condition,
                                    in_channels=33 if image_condition == "latent_concat" else 16)
    _write_header(folder, "transformer", H._checkpoint_weights(dit), dict(image_condition_type=image_condition))
    _write_header(folder, "vae", vae, {})
    return folder


def header_only_checkpoint15(folder, i2v=False):
    """HunyuanVideo 1.5's components as header_only_checkpoint writes 13B's: Qwen2.5-VL-7B's language model, byT5
    (Glyph-SDXL-v2's byt5-small), the DiT, the VAE, and for image to video SigLIP's vision tower (so400m-patch14-384):
    the real sizes, the modules' own names (those the loaders read)."""
    llm = H.LlamaTextEncoder(**{**H._hf_sizes(H.LlamaTextEncoder, QWEN), "attention_bias": True, "skip_layers": 0})
    _write_header(folder, "text_encoder", {**dict(tree_flatten(llm.parameters())), "norm.weight": mx.zeros((3584,))},
                  QWEN)
    _write_header(folder, "text_encoder_2", dict(tree_flatten(H15.T5Encoder().parameters())),
                  dict(model_type="t5", d_model=1472, d_ff=3584, d_kv=64, num_heads=6, num_layers=12, vocab_size=384,
                       feed_forward_proj="gated-gelu"))
    dit = H15.HunyuanVideo15Transformer(task_type="i2v" if i2v else "t2v")
    _write_header(folder, "transformer", H._checkpoint_weights(dit), dict(task_type=dit.task_type))
    _write_header(folder, "vae", H15.vae_checkpoint_weights(H15.HunyuanVideo15VAE()), {})
    if i2v:
        _write_header(folder, "image_encoder", H15.siglip_checkpoint_weights(H15.SiglipVisionTower()),
                      dict(model_type="siglip_vision_model"))
    return folder


def print_plan15(settings):
    """The memory plan of HunyuanVideo 1.5 at full size (header-only files, GPU estimates): each phase's GiB."""
    with tempfile.TemporaryDirectory() as tmp:
        folders = {kind: header_only_checkpoint15(Path(tmp) / kind, kind == "I2V") for kind in ("T2V", "I2V")}
        print(f"{'HunyuanVideo 1.5':>16} {'model':>5} {'precision':>9} {'true CFG':>10} {'text GiB':>8} "
              f"{'image GiB':>9} {'denoise GiB':>11} {'decode GiB':>10} {'peak GiB':>8}   (derived estimates for a "
              f"GPU: Metal or CUDA; 50 steps)")
        for s, q, cfg, kind in settings:
            est = H15.estimate_memory(folders[kind], *parse_size(s), q, backend="gpu", cfg=cfg)
            image = f"{est['image encoder'] / H.GB:>9.1f}" if "image encoder" in est else f"{'-':>9}"
            print(f"{s:>16} {kind:>5} {q or 'bf16':>9} {cfg or 'no':>10} {est['text encoders'] / H.GB:>8.1f} {image} "
                  f"{est['denoise'] / H.GB:>11.1f} {est['decode'] / H.GB:>10.1f} {max(est.values()) / H.GB:>8.1f}")


def print_plan(settings):
    with tempfile.TemporaryDirectory() as tmp:
        folders = {kind: header_only_checkpoint(Path(tmp) / (kind or "t2v"), kind)
                   for kind in (None, "token_replace", "latent_concat")}
        print(f"{'setting':>14} {'model':>13} {'precision':>9} {'low-memory':>10} {'true CFG':>10} {'text GiB':>8} "
              f"{'denoise GiB':>11} {'decode GiB':>10} {'peak GiB':>8}   (estimates for a GPU: Metal or CUDA; 50 steps)")
        for s, q, low, *more in settings:
            h, w, f = parse_size(s)
            cfg, kind = (more + [None, None])[:2]
            est = H.estimate_memory(folders[kind], h, w, f, q, low_memory=low, backend="gpu", cfg=cfg)
            print(f"{s:>14} {kind or 'T2V':>13} {q or 'bf16':>9} {'yes' if low else 'no':>10} {cfg or 'no':>10} "
                  f"{est['text encoders'] / H.GB:>8.1f} "
                  f"{est['denoise'] / H.GB:>11.1f} {est['decode'] / H.GB:>10.1f} {max(est.values()) / H.GB:>8.1f}")


def check_fits(args, sizes, phases, v15=False):
    """The memory plan, before any weights are made: refuse in one sentence (as the command line does) a benchmark
    whose phases (estimate_memory's: "text encoders", "denoise", "decode") would not fit at a size and precision,
    unless --force. Full-size random weights are planned from header-only files (with --model the pipeline plans
    its own run, as the command line's does)."""
    if args.force or args.tiny or args.model:
        return
    budget = H.available_memory()
    with tempfile.TemporaryDirectory() as tmp:
        folder = (header_only_checkpoint15 if v15 else header_only_checkpoint)(Path(tmp) / "t2v")
        for q in (args.quantizations if args.phases else ["bf16"]):
            for s in sizes:
                est = (H15 if v15 else H).estimate_memory(folder, *parse_size(s), None if q == "bf16" else q)
                phase = max(phases, key=est.get)
                if est[phase] > 0.9 * budget:
                    raise H.HunyuanVideoError(
                        f"at {s} in {q} the {phase} phase needs about {H.gib(est[phase])}, more than this machine "
                        f"can give ({H.gib(budget)}; HUNYUAN_APPLE_MEMORY_GB sets it): give smaller --sizes, "
                        f"--quantizations int8 or int4 with --phases, --tiny, or --force to run anyway.")


def torch_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_parity(args, v15=False):
    """One double and one single block (1.5: one double block) at the real width (or tiny), random weights made by
    diffusers on the device and saved, read back through our loader; both run in bf16 on the same inputs."""
    import diffusers
    import torch

    dev = torch_device()
    cfg = dict(num_layers=1, num_refiner_layers=1) if v15 else dict(num_layers=1, num_single_layers=1,
                                                                    num_refiner_layers=1)
    if args.tiny:
        cfg = dict(TINY15 if v15 else TINY, **cfg)
    torch.manual_seed(0)
    ref = getattr(diffusers, dit_class(v15).diffusers_class)(**cfg).to(dev, torch.bfloat16).eval()
    with torch.no_grad():  # random norms and biases too, so that nothing hides behind ones and zeros
        for name, p in ref.named_parameters():
            noise = torch.randn_like(p)
            if p.ndim == 1:
                p.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    print(f"{'size':>14} {'rel. error (max |ours - ref| / max |ref|)':>42}   bf16, diffusers on {dev}")
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = (H15 if v15 else H).load_transformer(tmp)
        for s in args.sizes or (["64x64x5"] if args.tiny else ["480x848x21" if v15 else "544x960x13"]):
            x = inputs_np(cfg, *parse_size(s), v15=v15)
            with torch.no_grad():
                r = ref(**reference_args(x, dev))[0]
            r = r.permute(0, 2, 3, 4, 1).float().cpu().numpy()
            o = np.array(ours(*dit_args(x)).astype(mx.float32))
            print(f"{s:>14} {np.abs(o - r).max() / np.abs(r).max():>42.2e}")


def bench_vae(args, sizes, v15=False):
    """Tiled decode of random latents: ours with its default tiles, diffusers' with its own (fp16, as its
    pipeline runs it), random full-size (or tiny) weights made by diffusers and read by our loader."""
    import diffusers
    import torch

    dev = torch_device()
    if v15:
        cfg, ratio = TINY_VAE15 if args.tiny else {}, 16
        chans = cfg.get("latent_channels", 32)
        name, load, tile = "AutoencoderKLHunyuanVideo15", H15.load_vae, (H15.VAE_TILE, H15.VAE_STRIDE)
    else:
        cfg = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4) if args.tiny else {}
        ratio, chans = 8, 16
        name, load, tile = "AutoencoderKLHunyuanVideo", H.load_vae, (H.DEFAULT_VAE_TILE, H.DEFAULT_VAE_STRIDE)
    ref = getattr(diffusers, name)(**cfg).to(dev, torch.float16).eval()
    ref.enable_tiling()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    print(f"{'size':>14} {'ours s':>8} {'peak GiB':>8} {'diffusers s':>12} {'peak GiB':>8}   (diffusers fp16 on {dev})")
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = load(tmp)
        for s in sizes:
            h, w, f = parse_size(s)
            z = np.random.default_rng(0).standard_normal((1, (f - 1) // 4 + 1, h // ratio, w // ratio, chans),
                                                         dtype=np.float32)
            zm = mx.array(z, dtype=mx.bfloat16)
            mx.eval(ours.decode(zm[:, :2, :8, :8], *tile))  # warm-up
            _, sec, peak = timed(lambda: ours.decode(zm, *tile))
            zt = torch.from_numpy(z).permute(0, 4, 1, 2, 3).to(dev, torch.float16)
            with torch.no_grad():
                ref.decode(zt[:, :, :2, :8, :8])  # warm-up
                sync()
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                ref.decode(zt)
                sync()
            rsec = time.perf_counter() - t0
            rpeak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
            print(f"{s:>14} {sec:>8.2f} {peak:>8.3g} {rsec:>12.2f} {rpeak:>8.3g}")


# the step caches' published HunyuanVideo speed-ups over 50 full steps at their default thresholds (real
# weights; the README gives each source and its quality)
PUBLISHED_SPEEDUP = {"fbcache": 1.62, "teacache": 2.1, "magcache": 2.8, "easycache": 2.21}
WORK_SIZES = ["544x960x61", "544x960x129"]


def full_size_work(steps, cache=None, radial=None, h=544, w=960, f=129):
    """The ledger (H.new_ledger, filled by the pipeline's own H._record) of a full-size generation without running
    it: every step a full forward, or TaylorSeer's rule (which forwards it forecasts is fixed in advance), with
    Radial Attention's mask for this size where radial is given ({} for its defaults)."""
    model = H.HunyuanVideoTransformer()  # built lazily: no weights are made
    grid = H.patch_grid(h, w, f)
    request = H.check_request(dict(prompt="x", height=h, width=w, frames=f, steps=steps, attention="radial" if radial
                                   is not None else "dense", **{f"radial_{k}": v for k, v in (radial or {}).items()},
                                   cache=cache if cache == "taylorseer" else None))
    sparse = H.RadialAttention(grid, steps, **H.radial_settings(request)) if radial is not None else None
    forward = H.step_cache(request) if cache == "taylorseer" else None
    ledger = H.new_ledger(cache, "radial" if sparse else "dense")
    for i in range(steps):
        ran = model.depth if forward is None or forward.computes(i) else (0, 0)
        H._record(ledger, model, 1, tokens(h, w, f), ran, sparse.at(i) if sparse else None)
        ledger["steps"].append(ran == model.depth)
    return ledger


def print_radial(sizes):
    """Radial Attention's mask at full size (the reference's defaults as of its commit 72788d4: 128-token blocks, decay
    0.95, no attention sink, the first 12 of 50 steps dense): kept video-video blocks, the share of query-key pairs a sparse forward computes (256 text
    tokens), and a sparse forward's attention and total PFLOP against a dense one's."""
    print(f"{'size':>13} {'blocks':>9} {'kept':>7} {'pairs':>7} {'dense fwd':>10} {'sparse fwd':>11} {'attention':>10}"
          f"   (PFLOP; the paper's count at 768x1280x117: 27.5% kept)")
    model = H.HunyuanVideoTransformer()
    for s in sizes:
        h, w, f = parse_size(s)
        grid = H.patch_grid(h, w, f)
        radial = H.RadialAttention(grid, 50)
        n = tokens(h, w, f)
        dense, sparse = model.work(n), model.work(n, radial=radial)
        print(f"{s:>13} {radial.mask.shape[0]:>4}^2 {radial.density:>7.1%} {radial.pairs(256) / n ** 2:>7.1%} "
              f"{sum(dense) / 1e15:>10.2f} {sum(sparse) / 1e15:>11.2f} {dense[0] / sum(dense):>5.0%}->"
              f"{sparse[0] / sum(sparse):.0%}")


def print_work(args, sizes):
    """PFLOP (attention and linear) and DiT forwards of one generation: 50 steps uncached, each cache at its
    default, Radial Attention, TaylorSeer and the step-distilled presets, and their combinations. Full size:
    counted exactly where the forwards are fixed in advance (TaylorSeer, Radial, presets), the published speed-ups
    applied where a threshold decides (marked publ.). --tiny: measured on the tiny model (random weights)."""
    fast, acc = H.PRESETS["fasthunyuan"], H.PRESETS["accvideo"]
    settings = [("50 steps, no cache", None, 50, 7.0, None)] + [
        (f"50 steps, {c} {t if t is not None else ''}".rstrip(), c, 50, 7.0, None) for c, t in H.CACHES.items()]
    settings += [("50 steps, radial", None, 50, 7.0, {}), ("50 steps, radial + taylorseer", "taylorseer", 50, 7.0, {}),
                 ("50 steps, radial + magcache", "magcache", 50, 7.0, {}),
                 (f"fasthunyuan, {fast['steps']} steps", None, fast["steps"], fast["shift"], None),
                 ("fasthunyuan + radial", None, fast["steps"], fast["shift"], {}),
                 (f"accvideo, {acc['steps']} steps", None, acc["steps"], acc["shift"], None),
                 ("accvideo + radial", None, acc["steps"], acc["shift"], {})]
    if args.tiny:
        pipe = H.HunyuanVideoPipeline.from_pretrained("tiny")
        text = pipe.encode_prompt("a red fox runs through a snowy forest at dawn")
        print(f"{'size':>12} {'setting':>30} {'forwards':>8} {'skipped':>7} {'PFLOP':>10} {'attention':>10} "
              f"{'linear':>10} {'seconds':>8}   (measured, tiny model, RANDOM weights: says nothing of real ones)")
        for s in sizes:
            h, w, f = parse_size(s)
            for name, cache, steps, shift, radial in settings:
                t0 = time.perf_counter()
                block = dict(radial_block=8) if radial is not None else {}  # the tiny sizes hold few 128-token blocks
                pipe(text=text, height=h, width=w, frames=f, steps=steps, shift=shift, seed=0, cache=cache,
                     attention="radial" if block else "dense", output_type="latent", **block)
                work = pipe.stats["work"]
                print(f"{s:>12} {name:>30} {work['forwards']:>8} {work['skipped']:>7} {work['pflop']:>10.3g} "
                      f"{work['attention_pflop']:>10.3g} {work['linear_pflop']:>10.3g} {time.perf_counter() - t0:>8.2f}")
        return
    print(f"{'size':>12} {'setting':>30} {'forwards':>8} {'PFLOP':>8} {'attention':>9} {'linear':>8} {'less work':>10}"
          f"   (real model; publ.: a published speed-up applied, not measured here)")
    for s in sizes:
        h, w, f = parse_size(s)
        base = None
        for name, cache, steps, shift, radial in settings:
            exact = cache in (None, "taylorseer")
            work = full_size_work(steps, cache if exact else None, radial, h, w, f)
            scale = 1 / PUBLISHED_SPEEDUP[cache] if not exact else 1.0
            pflop, att, lin = (scale * work[k] for k in ("pflop", "attention_pflop", "linear_pflop"))
            base = base or pflop
            label = f"{base / pflop:.2f}x" + ("" if exact else " publ.")
            print(f"{s:>12} {name:>30} {scale * work['forwards']:>8.1f} {pflop:>8.1f} {att:>9.1f} {lin:>8.1f} "
                  f"{label:>10}")
    print("published, real weights: Radial Attention 1.9x end to end at 768x1280x117 (mit-han-lab/radial-attention); "
          "TaylorSeer 4.65x latency at 480x640x65 (ywlq/TaylorSeer), 2.8x at PSNR 26.6 over 50 steps (ScalingCache's "
          "table); AccVideo 8.5x at 720x1280x129, 7.7x at 544x960x93 on an A100 (aejion/AccVideo)")


# sustained rates a step's time is set against: Apple silicon running a video DiT in MLX (mlx-serve, "at
# roofline, ~13.5 TFLOP/s"; ../shared/notes/speed-and-family.md) and an H100's dense bf16 peak (NVIDIA's
# datasheet, 989 TFLOP/s: no step can be shorter)
STEP_RATES = {"Apple silicon, 13.5 TFLOP/s": 13.5e12, "H100 peak, 989 TFLOP/s": 989e12}


def bench_page(args, sizes):
    """The web page's own work a denoising step, at full-size latents (random): on the run's thread the
    progress report and the preview strip made from the step's x0; on the page's thread the progress bars'
    HTML and the strip encoded as Gradio sends it (JPEG). Set against a step's time at STEP_RATES."""
    try:
        import gradio as gr
    except ImportError:
        print('error: --page measures the web page, which needs Gradio: pip install "hunyuan-apple[ui]".',
              file=sys.stderr)
        return 2
    import hunyuan_apple as cli
    import hunyuan_apple_ui as ui

    image = gr.Image(format="jpeg")  # as the page shows it
    print(f"the page's work a step, mean of {args.repeat} after one warm-up (ms), and its share of a step")
    print(f"{'size':>14} {'run thread':>11} {'page thread':>12} " + " ".join(f"{k:>28}" for k in STEP_RATES))
    for s in sizes:
        h, w, f = parse_size(s)
        shape = (1, (f - 1) // 4 + 1, h // 8, w // 8, 16)
        x, v = mx.random.normal(shape), mx.random.normal(shape)
        mx.eval(x, v)
        job = ui.Job([], None, None)
        ours, page = [], []
        for i in range(args.repeat + 1):
            t0 = time.perf_counter()
            job.progress("denoising", i + 1, 50)
            job.strip = cli.preview_strip(x - 0.5 * v)  # as the job makes it from a Step's x0 (made lazily)
            t1 = time.perf_counter()
            job.progress_html()
            image.postprocess(job.strip)  # written into Gradio's cache, as a yield sends it
            t2 = time.perf_counter()
            if i:
                ours.append(t1 - t0)
                page.append(t2 - t1)
        per = np.mean(ours) + np.mean(page)
        step = H.dit_flops(tokens(h, w, f))
        print(f"{s:>14} {np.mean(ours) * 1e3:>11.1f} {np.mean(page) * 1e3:>12.1f} " +
              " ".join(f"{f'{per * rate / step:.3%} of {step / rate:.3g} s':>28}" for rate in STEP_RATES.values()))


PLAN = [("544x960x129", None, False), ("720x1280x129", None, False), ("480x848x25", "int8", False),
        ("480x848x25", "int8", True), ("544x960x129", "int8", False), ("720x1280x129", "int8", False),
        ("544x960x97", None, False, "batched"), ("544x960x97", None, False, "sequential"),
        ("544x960x97", "int8", False, "sequential"), ("544x960x129", None, False, None, "token_replace"),
        ("720x1280x129", None, False, None, "token_replace"), ("544x960x129", None, False, None, "latent_concat"),
        ("720x1280x129", None, False, None, "latent_concat"), ("720x1280x129", "int8", False, None, "token_replace")]
# (size, quantization, --low-memory[, true CFG[, image-to-video conditioning]])
PLAN15 = [(size, q, cfg, "T2V") for size in ("480x848x121", "720x1280x121") for q in (None, "int8", "int4")
          for cfg in ("sequential", None)] + [(size, None, "sequential", "I2V") for size in ("480x848x121",
                                                                                          "720x1280x121")]
# HunyuanVideo 1.5: (size, quantization, true CFG (the base checkpoints; None: CFG-distilled), T2V or I2V)


# Several machines: published figures the projection uses (docs/several-machines.md lists them)
LINKS = {  # bytes a second one rank receives at
    "10 GbE": 1.25e9,  # 10 Gbit/s, at best
    "TB5 TCP": 6.5e9,  # Thunderbolt 5 over TCP: 52-64 Gbit/s in iperf3 (exo issue #2063); the lower figure
    "JACCL": 12.2e9,  # RDMA over Thunderbolt 5: a 256 MB all-reduce's algorithm bandwidth (MLX PR #3412)
}
COMPUTE = {  # sustained DiT FLOP a second of one device
    "Mac": 13e12,  # an M3 Ultra-class GPU on the DiT (../shared/notes/several-machines.md)
    "H100": 315e12,  # xDiT's HunyuanVideo on 1 H100: 1904 s for 50 steps of 720x1280x129 (12 PFLOP a step)
}


def print_distributed(sizes, ranks=(1, 2, 4, 8)):
    """Each rank's bytes received a denoising step (one forward, bf16: the other ranks' keys and values of the 60
    blocks and the velocity, H.split_bytes) and the projected seconds a step: the forward's FLOP over N ranks (the
    text's queries, on every rank, are under 0.4% at these sizes) at a device's sustained rate, plus the transfer at a
    link's bandwidth, not overlapped (as the code does it: the keys are gathered, then attended). Then a tiny
    generation measured here on 1 and 2 ranks (mlx.launch, ring backend on localhost)."""
    print("projected (published bandwidths and compute rates, see the code's LINKS and COMPUTE), a step of 1 video:")
    print(f"{'size':>13} {'N':>2} {'GB/rank':>8} " + " ".join(f"{d + ' ' + link:>16}" for d in COMPUTE for link in
                                                                 LINKS) + "   (seconds; speed-up on one device)")
    for s in sizes:
        h, w, f = parse_size(s)
        video = math.prod(H.patch_grid(h, w, f))
        flops = forward_flops({}, video + 256)
        for n in ranks:
            got = H.split_bytes(video, 1, 3072, 20, 40, 64, n)
            cells = []
            for rate in COMPUTE.values():
                one = flops / rate
                for bandwidth in LINKS.values():
                    t = flops / n / rate + got / bandwidth
                    cells.append(f"{t:>8.1f} ({one / t:>4.2f}x)")
            print(f"{s:>13} {n:>2} {got / 1e9:>8.1f} " + " ".join(f"{c:>16}" for c in cells))
    import subprocess

    print("measured here (tiny model, 112x176x13, 8 steps, ring backend on one machine):")
    results = {}
    for n in (1, 2):
        cmd = [sys.executable, __file__, "--ranks-run", str(n)]
        if n > 1:
            cmd = [str(Path(sys.executable).with_name("mlx.launch")), "-n", str(n), "--backend", "ring", "--python",
                   sys.executable, __file__, "--ranks-run", str(n)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(f"  {n} rank(s): failed\n{done.stderr[-2000:]}")
            return 1
        results[n] = json.loads(lines[0])
        r = results[n]
        print(f"  {n} rank(s): denoise {r['seconds']:.3f} s ({r['seconds'] / r['steps']:.4f} s a step), "
              f"{r['bytes'] / r['steps']:.0f} bytes received a step by each rank (formula: "
              f"{H.split_bytes(r['video'], 1, 64, 1, 1, 64, n):.0f})")
    print(f"  time ratio 2 ranks / 1: {results[2]['seconds'] / results[1]['seconds']:.2f} (on one machine the ranks "
          f"share its cores: this measures the code's overheads, not a speed-up)")


def ranks_run(n):
    """--distributed's measured run on this rank: the tiny demo's generation, denoising timed; rank 0 prints JSON."""
    pipe = H.HunyuanVideoPipeline.from_pretrained("tiny")
    h, w, f, steps = 112, 176, 13, 8
    pipe(prompt="a cat", height=h, width=w, frames=f, steps=steps, seed=0, output_type="latent")
    work = pipe.stats["work"]
    if mx.distributed.init().rank() == 0:
        print(json.dumps(dict(seconds=pipe.stats["denoise"][0], steps=steps, bytes=work["received_bytes"],
                              video=math.prod(H.patch_grid(h, w, f)), ranks=n)))


def parser():
    """The command's flags."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", help="HEIGHTxWIDTHxFRAMES, e.g. 544x960x25")
    ap.add_argument("--reference", action="store_true", help="also time diffusers (needs torch and diffusers)")
    ap.add_argument("--tiny", action="store_true", help="tiny random models instead of the full-size ones")
    ap.add_argument("--family", choices=["13B", "1.5"], help="HunyuanVideo 13B (the default) or 1.5 (8.3B): for "
                    "the DiT forward, --reference, --parity, --vae and --phases")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--phases", action="store_true", help="time and peak memory of each phase, per precision")
    ap.add_argument("--quantizations", nargs="+", help="with --phases (default: all four)",
                    choices=["bf16", "fp8", "int8", "int4"])
    ap.add_argument("--model", help="with --phases: a checkpoint folder (real weights) instead of random ones")
    ap.add_argument("--steps", type=int, help="with --phases --model: denoising steps to average (default 2)")
    ap.add_argument("--plan", action="store_true", help="print the memory plan's estimates at full size")
    ap.add_argument("--force", action="store_true", help="run even if the memory plan says it will not fit")
    ap.add_argument("--parity", action="store_true", help="one double and one single block vs diffusers, bf16")
    ap.add_argument("--vae", action="store_true", help="our tiled VAE decode vs diffusers' on the same device")
    ap.add_argument("--work", action="store_true", help="DiT forwards and PFLOP of a generation per cache and preset")
    ap.add_argument("--page", action="store_true", help="the web page's own work a step (progress, preview)")
    ap.add_argument("--radial", action="store_true", help="Radial Attention's mask at full size: kept blocks, FLOPs")
    ap.add_argument("--distributed", action="store_true", help="sequence parallel over N ranks: each rank's bytes and "
                    "the projected time a step (N = 1, 2, 4, 8; 10 GbE, Thunderbolt 5, JACCL), and a tiny run measured "
                    "on 1 and 2 local ranks (ring backend)")
    ap.add_argument("--ranks-run", type=int, help=argparse.SUPPRESS)  # --distributed's measured run, under mlx.launch
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    try:
        return run(ap, args)
    except H.HunyuanVideoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output piped into a reader that stopped early (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run(ap, args):
    if (args.model or args.quantizations) and not args.phases or args.steps is not None and not args.model:
        ap.error("--model and --quantizations go with --phases, --steps with --phases --model (the other "
                 "benchmarks use random weights)")
    args.quantizations = args.quantizations or ["bf16", "fp8", "int8", "int4"]
    args.steps = 2 if args.steps is None else args.steps
    if args.repeat < 1 or args.steps < 1:
        ap.error(f"--repeat {args.repeat} --steps {args.steps}: each is a count of 1 or more")
    needs = [f for f in ("reference", "parity", "vae") if getattr(args, f)]
    if needs:
        try:
            for name in ("torch", "diffusers"):
                importlib.import_module(name)
        except ImportError:
            print(f"error: --{needs[0]} runs diffusers, which needs torch and diffusers: pip install -r "
                  f"requirements-dev.txt (it names the versions the tests use).", file=sys.stderr)
            return 2
    v15 = args.family == "1.5"
    if args.model and args.family and v15 != (H._pipeline_class(args.model) is H15.HunyuanVideo15Pipeline):
        ap.error(f"--model {args.model} is not a HunyuanVideo {args.family} checkpoint: leave --family out (the "
                 f"model's own family is benchmarked)")
    other = [f for f in ("plan", "work", "radial", "page", "distributed") if getattr(args, f)]
    if args.family and other:
        ap.error(f"--family goes with the DiT forward, --parity, --vae and --phases (--{other[0]} "
                 f"{'prints both families' if other[0] == 'plan' else 'is HunyuanVideo 13B' + chr(39) + 's'})")
    cfg = (TINY15 if v15 else TINY) if args.tiny else {}
    small = args.tiny or args.model and H.is_tiny(args.model)  # the tiny demo's own model runs at tiny sizes too
    full = (["480x848x121"] if v15 else ["544x960x13"]) if args.phases else FULL_SIZES15 if v15 else FULL_SIZES
    sizes = args.sizes or (TINY_SIZES if small else full)
    for s in args.sizes or []:
        try:
            h, w, f = parse_size(s)
        except ValueError:
            ap.error(f"size {s!r}: write HEIGHTxWIDTHxFRAMES, such as 544x960x25")
        if min(h, w, f) < 1 or h % 16 or w % 16 or (f - 1) % 4:
            ap.error(f"size {s}: height and width must be multiples of 16 and frames 4n+1")
    if args.ranks_run:
        return ranks_run(args.ranks_run)
    print(f"MLX {mx.__version__} on {mx.default_device()}")
    if args.distributed:
        return print_distributed(args.sizes or ["544x960x129", "720x1280x129"])
    if args.work:
        return print_work(args, args.sizes or (["96x160x9"] if args.tiny else WORK_SIZES))
    if args.plan:
        print_plan(PLAN)
        return print_plan15(PLAN15)
    if args.radial:
        return print_radial(args.sizes or ["768x1280x117", "544x960x129", "720x1280x129"])
    if args.page:
        return bench_page(args, args.sizes or ["544x960x61", "720x1280x129"])
    if args.parity:
        return check_parity(args, v15)
    if args.vae:
        sizes = args.sizes or (["64x96x9"] if args.tiny else ["480x848x121" if v15 else "544x960x129"])
        check_fits(args, sizes, ["decode"], v15)
        return bench_vae(args, sizes, v15)
    if args.phases:
        v15 = v15 or bool(args.model) and H._pipeline_class(args.model) is H15.HunyuanVideo15Pipeline
        check_fits(args, sizes, ["text encoders", "denoise", "decode"], v15)
        return bench_phases(args, sizes, v15)
    check_fits(args, sizes, ["denoise"], v15)
    print(f"{'tiny' if args.tiny else 'full-size'} {'HunyuanVideo 1.5' if v15 else 'HunyuanVideo'} DiT, bf16, random "
          f"weights, mean of {args.repeat}")
    ours = bench_ours(cfg, sizes, args.repeat, v15)
    ref, dev = bench_reference(cfg, sizes, args.repeat, v15) if args.reference else ({}, None)
    head = f"{'size':>14} {'tokens':>8} {'PFLOP':>7} {'ours s':>8} {'TFLOP/s':>8} {'peak GiB':>8}"
    if ref:
        head += f" {'diffusers s':>12} {'TFLOP/s':>8} {'peak GiB':>8} {'ratio':>6}   (diffusers on {dev})"
    print(head)
    for s in sizes:
        n = tokens(*parse_size(s))
        fl = forward_flops(cfg, n, v15)
        t, peak = ours[s]
        line = f"{s:>14} {n:>8} {fl / 1e15:>7.3f} {t:>8.3f} {fl / t / 1e12:>8.1f} {peak:>8.3g}"
        if ref:
            tr, pr = ref[s]
            line += f" {tr:>12.3f} {fl / tr / 1e12:>8.1f} {pr:>8.3g} {t / tr:>6.2f}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())

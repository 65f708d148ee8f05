"""Time one DiT forward, ours (MLX) and optionally diffusers' (PyTorch) on the same machine.

    python bench_hunyuan_apple.py                        # full-size DiT, random bf16 weights, 3 sizes
    python bench_hunyuan_apple.py --reference            # also diffusers on the same GPU, and the ratio
    python bench_hunyuan_apple.py --tiny                 # a tiny DiT at small sizes: a smoke run anywhere

Sizes are video HEIGHTxWIDTHxFRAMES; the text is 256 valid tokens. Effective TFLOP/s counts the token-wise
linear layers and attention of the 60 blocks (the embedders and the refiner are negligible). Each figure is
the mean of --repeat timed forwards after one warm-up forward. Random weights, so no checkpoint is needed.
"""

import argparse
import gc
import time

import mlx.core as mx
import numpy as np

import HunyuanVideo_Apple as H

FULL_SIZES = ["544x960x25", "544x960x61", "720x1280x129"]
TINY = dict(num_attention_heads=2, attention_head_dim=32, rope_axes_dim=(8, 12, 12), num_layers=2,
            num_single_layers=2, num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=32)
TINY_SIZES = ["64x64x5", "64x96x9"]


def parse_size(s):
    h, w, f = (int(v) for v in s.lower().split("x"))
    return h, w, f


def tokens(h, w, f, text=256):
    return ((f - 1) // 4 + 1) * (h // 16) * (w // 16) + text


def forward_flops(cfg, n):
    """Token-wise linear layers (2 FLOP per multiply-add) and attention (QK^T and AV) of all blocks."""
    d = cfg.get("num_attention_heads", 24) * cfg.get("attention_head_dim", 128)
    mlp = int(d * cfg.get("mlp_ratio", 4.0))
    double, single = cfg.get("num_layers", 20), cfg.get("num_single_layers", 40)
    linear = double * (4 * d * d + 2 * d * mlp) + single * (d * (3 * d + mlp) + (d + mlp) * d)
    return 2 * n * linear + 4 * n * n * d * (double + single)


def inputs_np(cfg, h, w, f, seed=0):
    rng = np.random.default_rng(seed)
    return dict(latents=rng.standard_normal((1, (f - 1) // 4 + 1, h // 8, w // 8, 16), dtype=np.float32),
                text=rng.standard_normal((1, 256, cfg.get("text_embed_dim", 4096)), dtype=np.float32),
                pooled=rng.standard_normal((1, cfg.get("pooled_projection_dim", 768)), dtype=np.float32))


def bench_ours(cfg, sizes, repeat):
    model = H.HunyuanVideoTransformer(**cfg)
    model.set_dtype(mx.bfloat16)
    for block in [model] + model.double_blocks + model.single_blocks:  # materialize block by block: low peak
        mx.eval(block.parameters())
    results = {}
    for s in sizes:
        x = inputs_np(cfg, *parse_size(s))
        args = (mx.array(x["latents"], dtype=mx.bfloat16), mx.array([900.0]), mx.array(x["text"], dtype=mx.bfloat16),
                mx.ones((1, 256)), mx.array(x["pooled"], dtype=mx.bfloat16), mx.array([6016.0]))
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


def bench_reference(cfg, sizes, repeat):
    import torch
    from diffusers import HunyuanVideoTransformer3DModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)  # build the weights in bf16 directly, on the device
    with torch.device(dev), torch.no_grad():
        model = HunyuanVideoTransformer3DModel(**cfg).eval()
    torch.set_default_dtype(torch.float32)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    results = {}
    for s in sizes:
        x = inputs_np(cfg, *parse_size(s))
        kw = dict(hidden_states=torch.from_numpy(x["latents"]).permute(0, 4, 1, 2, 3),
                  encoder_hidden_states=torch.from_numpy(x["text"]), pooled_projections=torch.from_numpy(x["pooled"]))
        kw = {k: v.to(dev, torch.bfloat16) for k, v in kw.items()}
        kw.update(timestep=torch.tensor([900.0], device=dev), guidance=torch.tensor([6016.0], device=dev),
                  encoder_attention_mask=torch.ones(1, 256, device=dev, dtype=torch.int64), return_dict=False)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", help="HEIGHTxWIDTHxFRAMES, e.g. 544x960x25")
    ap.add_argument("--reference", action="store_true", help="also time diffusers (needs torch and diffusers)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random DiT instead of the full 13B one")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    cfg = TINY if args.tiny else {}
    sizes = args.sizes or (TINY_SIZES if args.tiny else FULL_SIZES)
    for s in sizes:
        h, w, f = parse_size(s)
        if h % 16 or w % 16 or (f - 1) % 4:
            ap.error(f"size {s}: height and width must be multiples of 16 and frames 4n+1")
    print(f"MLX {mx.__version__} on {mx.default_device()}; {'tiny' if args.tiny else 'full-size'} DiT, bf16, "
          f"random weights, mean of {args.repeat}")
    ours = bench_ours(cfg, sizes, args.repeat)
    ref, dev = bench_reference(cfg, sizes, args.repeat) if args.reference else ({}, None)
    head = f"{'size':>14} {'tokens':>8} {'PFLOP':>7} {'ours s':>8} {'TFLOP/s':>8} {'peak GB':>8}"
    if ref:
        head += f" {'diffusers s':>12} {'TFLOP/s':>8} {'peak GB':>8} {'ratio':>6}   (diffusers on {dev})"
    print(head)
    for s in sizes:
        n = tokens(*parse_size(s))
        fl = forward_flops(cfg, n)
        t, peak = ours[s]
        line = f"{s:>14} {n:>8} {fl / 1e15:>7.3f} {t:>8.3f} {fl / t / 1e12:>8.1f} {peak:>8.1f}"
        if ref:
            tr, pr = ref[s]
            line += f" {tr:>12.3f} {fl / tr / 1e12:>8.1f} {pr:>8.1f} {t / tr:>6.2f}"
        print(line)


if __name__ == "__main__":
    main()

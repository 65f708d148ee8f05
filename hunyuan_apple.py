"""HunyuanVideo text-to-video on MLX: the command line.

    python hunyuan_apple.py --prompt "a cat walks on the grass" --resolution 544 960 --frames 13

This version checks the request and loads the transformer (--model); the text encoders, the VAE and the
sampler that complete text-to-video are not in this version yet, and it says so instead of pretending.
"""

import argparse
import sys

import HunyuanVideo_Apple as H


def check_request(args):
    """One sentence per problem, naming the fix; None when the request is valid."""
    h, w = args.resolution
    if h % 16 or w % 16 or h <= 0 or w <= 0:
        return f"--resolution {h} {w}: height and width must be positive multiples of 16 (e.g. 544 960)."
    if args.frames < 1 or (args.frames - 1) % 4:
        n = max(1, round((args.frames - 1) / 4)) * 4 + 1
        return f"--frames {args.frames}: the frame count must be 4n+1 (1, 5, 9, ... 129); try {n}."
    if args.steps < 1:
        return f"--steps {args.steps}: use at least 1 step (50 is the default)."
    if not args.prompt.strip():
        return "--prompt is empty: describe the video to generate."
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description="HunyuanVideo text-to-video on MLX.")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--resolution", type=int, nargs=2, default=[544, 960], metavar=("HEIGHT", "WIDTH"))
    ap.add_argument("--frames", type=int, default=13, help="4n+1 frames (default 13)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--model", help="a transformer checkpoint: diffusers transformer/ folder, Tencent .pt, ComfyUI file")
    args = ap.parse_args(argv)
    problem = check_request(args)
    if problem:
        ap.exit(2, f"error: {problem}\n")
    try:
        if args.model:
            model = H.load_transformer(args.model)
            print(f"loaded the transformer from {args.model}: {len(model.double_blocks)} double and "
                  f"{len(model.single_blocks)} single blocks, {model.dtype}")
    except H.HunyuanVideoError as e:
        ap.exit(2, f"error: {e}\n")
    ap.exit(3, "error: text-to-video needs the text encoders, the VAE and the sampler, which this version does "
               "not have yet; today the module provides the transformer (HunyuanVideo_Apple.load_transformer).\n")


if __name__ == "__main__":
    sys.exit(main())

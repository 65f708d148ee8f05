"""Convert a HunyuanVideo transformer checkpoint to an MLX folder that loads without torch.

    python convert_weights.py --model SRC --output DIR [--dtype bfloat16|float16|float32]

SRC: a diffusers transformer/ folder, Tencent's mp_rank_00_model_states.pt (needs torch, read with
weights_only=True), or a ComfyUI .safetensors file. DIR gets model.safetensors (Tencent's key names) and
config.json; HunyuanVideo_Apple.load_transformer(DIR) reads it directly. An existing DIR is refused.
"""

import argparse
import sys
import time

import mlx.core as mx

import HunyuanVideo_Apple as H

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the transformer checkpoint to convert (file or folder)")
    ap.add_argument("--output", required=True, help="the folder to create")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    args = ap.parse_args(argv)
    out = H.Path(args.output).expanduser()
    try:
        if out.exists():
            raise H.HunyuanVideoError(f"{out} already exists: choose a new --output folder.")
        t0 = time.perf_counter()
        model = H.load_transformer(args.model, dtype=DTYPES[args.dtype])
        H.save_transformer(model, out)
    except H.HunyuanVideoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

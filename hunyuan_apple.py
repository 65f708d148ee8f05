"""HunyuanVideo on MLX (text, image or video to video): the command line.

    python hunyuan_apple.py --prompt "a cat walks on the grass" --quality 540p --aspect-ratio 16:9 --frames 13
    python hunyuan_apple.py --model tiny --prompt "a cat"          # offline demo: tiny random weights, noise video
    python hunyuan_apple.py --model tiny-i2v --image cat.png --prompt "a cat"    # the image-to-video demo
    python hunyuan_apple.py --prompt "..." --lora style.safetensors:0.8 --negative-prompt "blurry" --cfg-scale 6
    python hunyuan_apple.py --prompt "..." --video input.mp4 --strength 0.7     # video to video
    python hunyuan_apple.py --model hunyuanvideo-community/HunyuanVideo-I2V --image cat.png --prompt "..."

Writes an H.264 mp4 (and its settings as JSON beside it and in the mp4's metadata). The latents are saved
before decoding; if anything fails after denoising, the message says how to decode them again.
"""

import argparse
import json
import os
import re
import sys
import time
import warnings
from collections import namedtuple
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

import HunyuanVideo_Apple as H

# HunyuanVideo's trained sizes, (height, width); aspect ratios are width:height (16:9 is landscape)
BUCKETS = {
    "540p": {"16:9": (544, 960), "9:16": (960, 544), "4:3": (624, 832), "3:4": (832, 624), "1:1": (720, 720)},
    "720p": {"16:9": (720, 1280), "9:16": (1280, 720), "4:3": (832, 1104), "3:4": (1104, 832), "1:1": (960, 960)},
}
QUANTIZE_BITS = {8: "int8", 4: "int4"}
# --model tiny runs in seconds at this size unless the flags say otherwise (its videos are noise anyway)
TINY_DEMO = dict(height=96, width=160, frames=9, steps=8)
# what the settings (JSON sidecar, mp4 metadata) hold, with the type each must have
SETTINGS = {"prompt": str, "seed": int, "steps": int, "guidance": float, "shift": float, "height": int, "width": int,
            "frames": int, "model": str, "quantization": str, "quantize_modulation": bool, "dit_dtype": str,
            "vae_dtype": str, "text_dtype": str, "fps": int, "preset": str, "cache": str, "cache_threshold": float,
            "negative_prompt": str, "cfg_scale": float, "loras": list, "lora_ignore_unmatched": bool,
            "transformer": str, "video": str, "strength": float, "image": str, "original_prompt": str,
            "rewrite": str, "rewrite_model": str, "rewrite_temperature": float, "rewrite_seed": int,
            "cache_interval": int, "cache_order": int, "cache_warmup": int, "attention": str,
            "radial_dense_steps": int, "radial_dense_layers": int, "radial_decay": float, "radial_block": int,
            "quantized_matmul": str}
CACHE_OPTIONS = tuple(H.TaylorSeer.options)  # interval, order, warmup: --cache-interval, ...
RADIAL_OPTIONS = tuple(H.RADIAL_DEFAULTS)  # dense_steps, dense_layers, decay, block: --radial-dense-steps, ...
COMPONENT = {"dit_dtype": "transformer", "vae_dtype": "vae", "text_dtype": "text_encoders"}  # --dit-dtype, ...
DTYPE_NAMES = {dtype: name for name, dtype in H.DTYPES.items()}  # mx.bfloat16 -> "bf16"
DEFAULT_DTYPES = {k: DTYPE_NAMES[H.DEFAULT_DTYPES[c]] for k, c in COMPONENT.items()}  # {"dit_dtype": "bf16", ...}
DEFAULTS = dict(aspect_ratio="16:9", quality="540p", frames=13, steps=50, guidance=6.0, shift=7.0,
                model=H.DEFAULT_MODEL, fps=24, checkpoint_every=10.0, cfg_scale=1.0, strength=0.8)
MAX_FPS = 120
# what --decode-latents uses; any other flag is refused with it (the latents are already made)
DECODE_FLAGS = {"decode_latents", "model", "vae_dtype", "output", "overwrite", "frames_dir", "gif", "fps", "low_memory"}
# what --resume takes besides the settings in its file (a setting given too must agree with the file)
RESUME_FLAGS = {"resume", "model", "overwrite", "frames_dir", "gif", "low_memory", "force", "checkpoint_every",
                "no_prompt_cache", "preview"}


def sizes_table():
    rows = [f"  {q:<5} " + "  ".join(f"{ar} {h}x{w}" for ar, (h, w) in b.items()) for q, b in BUCKETS.items()]
    return "\n".join(rows)


def parse_args(argv):
    """The flags, with the defaults filled in and args.given: the flags the user typed (even if equal to a
    default, a typed flag is honoured)."""
    ap = argparse.ArgumentParser(
        prog="hunyuan-apple", description="HunyuanVideo on MLX: text to video, and image or video to video.",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"sizes (height x width) that --quality and --aspect-ratio choose (aspect ratios are width:height):\n"
               f"{sizes_table()}\n--resolution overrides them. With --model tiny (or tiny-i2v) the demo renders "
               f"96x160, 9 frames, 8 steps\nunless --resolution, --quality, --aspect-ratio, --frames or --steps say "
               f"otherwise.")
    ap.add_argument("--version", action="version", version=f"hunyuan-apple {H.__version__} (MLX {mx.__version__})")
    ap.add_argument("--prompt", help="what the video shows")
    ap.add_argument("--resolution", type=int, nargs="+", metavar="N",
                    help="HEIGHT WIDTH, or one number (the height; the width follows --aspect-ratio)")
    ap.add_argument("--aspect-ratio", choices=list(BUCKETS["540p"]),
                    help="width:height; 16:9 is landscape, 9:16 portrait (default 16:9)")
    ap.add_argument("--quality", choices=list(BUCKETS), help="540p (default) or 720p")
    ap.add_argument("--frames", type=int, help=f"4n+1 frames (default 13; {H.MAX_FRAMES} is the model's longest)")
    ap.add_argument("--steps", type=int, help="denoising steps (default 50)")
    ap.add_argument("--guidance", type=float, help="embedded guidance scale, 0 or more (default 6.0)")
    ap.add_argument("--rewrite", choices=list(H.REWRITE_MODES), help="first rewrite the prompt with a small local "
                    "language model (mlx-lm; pip install \".[rewrite]\"): normal adds setting, light, style and "
                    "mood; master a richer cinematographic description. In English, whatever the prompt's language")
    ap.add_argument("--rewrite-model", metavar="ID", help=f"the rewrite's instruct model: a hub id or a folder in "
                    f"mlx-lm's layout (default {H.REWRITE_MODEL})")
    ap.add_argument("--rewrite-temperature", type=float, metavar="T", help="0 (default): the same rewrite every "
                    "time; above 0 samples, for variety")
    ap.add_argument("--rewrite-seed", type=int, metavar="N", help="the rewrite's sampling seed (with a temperature)")
    ap.add_argument("--negative-prompt", metavar="TEXT", help="what the video should not show: true classifier-free "
                    "guidance, two DiT forwards a step (with --cfg-scale; 6 by default when this is given)")
    ap.add_argument("--cfg-scale", type=float, metavar="X", help="true CFG scale, above 1 to guide (SkyReels-V1: 6); "
                    "without --negative-prompt the negative prompt is empty")
    ap.add_argument("--shift", type=float, help="flow shift (default 7.0)")
    ap.add_argument("--seed", type=int, help="0 to 2**64 - 1; random if left out (it is printed and saved with the "
                                              "video)")
    ap.add_argument("--model", help=f"a local folder in the diffusers layout, a hub id (default {H.DEFAULT_MODEL}), "
                                    f"or 'tiny' / 'tiny-i2v' for the offline demos (text / image to video)")
    ap.add_argument("--transformer", help="the DiT from another checkpoint (a fine-tune): its diffusers folder, a "
                    "single .safetensors or .pt file, or a hub id; the rest comes from --model")
    ap.add_argument("--preset", choices=list(H.PRESETS), help="a checkpoint of the family with its own settings: "
                    + "; ".join(f"{k}: {p['about']}" for k, p in H.PRESETS.items()) + " (flags given too win)")
    ap.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="apply a LoRA to the DiT, at SCALE (1.0 "
                    "by default); repeat for several. diffusers, original, musubi/kohya and ComfyUI files")
    ap.add_argument("--lora-ignore-unmatched", action="store_true", help="load a LoRA even if some of its keys match "
                    "no layer (they are listed in a warning); by default that stops the run")
    ap.add_argument("--image", metavar="FILE", help="image to video, for the checkpoints that take one "
                    "(HunyuanVideo-I2V and its 33-channel variant, SkyReels-V1 I2V): the video starts from it")
    ap.add_argument("--video", metavar="FILE", help="video to video: start from this video (its own size rounded to "
                    "16 and its length, unless --resolution/--quality/--frames say otherwise)")
    ap.add_argument("--strength", type=float, help="with --video: how much to change it, 0 (keep) to 1 (text to video "
                    "from the same noise); the last strength x steps steps run (default 0.8)")
    ap.add_argument("--cache", choices=list(H.CACHES), help="skip DiT forwards that a step cache predicts (see the "
                    "README): " + ", ".join(f"{k} (default threshold {v})" if v is not None else
                                            f"{k} ({', '.join(f'{o} {d}' for o, d in H.TaylorSeer.options.items())})"
                                            for k, v in H.CACHES.items()))
    ap.add_argument("--cache-threshold", type=float, metavar="X", help="the cache's threshold: higher skips more; "
                                                                        "0 never skips")
    ap.add_argument("--cache-interval", type=int, metavar="N", help="taylorseer: a full forward every N (default 5; "
                    "1 computes every step)")
    ap.add_argument("--cache-order", type=int, metavar="N", help="taylorseer: the Taylor expansion's order, 1 to 4 "
                    "(default 1)")
    ap.add_argument("--cache-warmup", type=int, metavar="N", help="taylorseer: the first N steps computed (default 3)")
    ap.add_argument("--attention", choices=list(H.ATTENTIONS), help="dense (default), or radial: Radial Attention, "
                    "sparse attention between far frames after the first steps (see the README)")
    ap.add_argument("--radial-dense-steps", type=int, metavar="N", help="radial: the first N steps dense (default "
                    f"{round(H.RADIAL_DENSE_STEPS * 100)}%% of the steps, the reference's 12 of 50)")
    ap.add_argument("--radial-dense-layers", type=int, metavar="N", help="radial: the first N of the DiT's 60 blocks "
                    "dense (default 0)")
    ap.add_argument("--radial-decay", type=float, metavar="X", help="radial: scales the windows of far frames "
                    "(default 1.0)")
    ap.add_argument("--radial-block", type=int, metavar="N", help="radial: tokens a block, a power of two (default "
                    "128)")
    ap.add_argument("--quantization", choices=list(H.QUANTIZATIONS), help="quantize the DiT's blocks and the LLM")
    ap.add_argument("--quantize", type=int, choices=sorted(QUANTIZE_BITS), help="the same as --quantization int8|int4")
    ap.add_argument("--quantized-matmul", choices=list(H.QUANTIZED_MATMULS), help="with quantization: how the DiT's "
                    "quantized layers multiply, by MLX's kernel or on weights dequantized a block at a time (auto, the "
                    "default: dequantized on Apple GPUs but M5, as measured there; see the README)")
    ap.add_argument("--quantize-modulation", action="store_true",
                    help="also quantize the DiT's adaLN modulation (3.4B parameters, tabulated for all steps before "
                         "the first either way: no memory saved, may cost quality)")
    for flag, what in (("dit", "the DiT"), ("vae", "the VAE"), ("text", "the text encoders")):
        default = DEFAULT_DTYPES[f"{flag}_dtype"]
        ap.add_argument(f"--{flag}-dtype", choices=list(H.DTYPES), help=f"precision of {what} (default {default})")
    ap.add_argument("--low-memory", action="store_true",
                    help="trade speed for memory: no buffer cache, the DiT's blocks read from disk as they run")
    ap.add_argument("--force", action="store_true", help="run even if the memory plan says it will not fit")
    ap.add_argument("--no-prompt-cache", action="store_true", help="always run the text encoders (by default a "
                    "prompt's encoding is kept in the cache folder and reused)")
    ap.add_argument("--output", help="the mp4 to write (default outputs/<time>_<seed>.mp4)")
    ap.add_argument("--frames-dir", nargs="?", const="/tmp/hunyuan_frames", help="also write PNG frames here "
                    "(default folder /tmp/hunyuan_frames)")
    ap.add_argument("--fps", type=int, help=f"frame rate of the video, 1 to {MAX_FPS} (default 24)")
    ap.add_argument("--gif", action="store_true", help="also write a GIF beside the mp4")
    ap.add_argument("--preview", action="store_true", help="keep NAME.preview.png beside the mp4: a strip of frames "
                    "of the video the current step predicts, updated after every step")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--from-metadata", metavar="FILE", help="repeat a generation from its .json or .mp4 (flags given "
                                                            "too override its settings)")
    ap.add_argument("--decode-latents", metavar="FILE", help="decode latents saved by an earlier run")
    ap.add_argument("--resume", metavar="FILE", help="continue an interrupted run from the .partial.safetensors "
                                                     "checkpoint it left beside its output")
    ap.add_argument("--checkpoint-every", type=float, metavar="SECONDS", help="how often denoising saves its "
                    "checkpoint for --resume (default 10 s; 0: after every step)")
    typed = ap.parse_args(argv)
    args = argparse.Namespace(**{a.dest: DEFAULTS.get(a.dest, False if a.nargs == 0 else None)
                                 for a in ap._actions if a.dest not in ("help", "version")})
    args.__dict__.update(vars(typed))
    args.given = set(vars(typed))
    return args


def flag(key):
    """The command-line flag of a setting or argument: "frames_dir" -> "--frames-dir"."""
    return "--" + key.replace("_", "-")


def input_file(args, key):
    """The file a flag names (--from-metadata, --decode-latents, --resume), which must exist."""
    path = Path(getattr(args, key))
    if not path.is_file():
        raise H.HunyuanVideoError(f"{flag(key)} {path}: the file does not exist.")
    return path


def refuse(args, allowed, why):
    """One sentence for the flags given that a mode does not use."""
    unused = sorted(args.given - allowed)
    if unused:
        raise H.HunyuanVideoError(f"{', '.join(flag(k) for k in unused)}: {why}")


def read_metadata(path):
    """The settings of an earlier generation, from its JSON sidecar or its mp4's comment tag, type-checked."""
    try:
        if path.suffix == ".mp4":
            import subprocess

            import imageio_ffmpeg

            out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata",
                                  "-"], capture_output=True, text=True).stdout
            m = re.search(r"^comment=(.*?)(?<!\\)$", out, re.M | re.S)
            text = re.sub(r"\\(.)", r"\1", m.group(1)) if m else "{}"
        else:
            text = path.read_text()
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise H.HunyuanVideoError(f"{path} is not readable as generation settings ({str(e)[:80]}): pass the .json "
                                  f"written beside a video, or the video itself.") from None
    if not isinstance(data, dict) or "prompt" not in data:
        raise H.HunyuanVideoError(f"{path} holds no generation settings of hunyuan_apple (no prompt in it): pass "
                                  f"the .json written beside a video this tool made, or that video.")
    settings = {}
    for key, kind in SETTINGS.items():
        value = data.get(key)
        if value is None:
            continue
        number = (int, float) if kind is float else kind  # a whole number is a number; true is not one
        if not isinstance(value, number) or isinstance(value, bool) and kind is not bool:
            what = {str: "text", int: "a whole number", float: "a number", bool: "true or false"}[kind]
            raise H.HunyuanVideoError(f"{path}: \"{key}\" is {json.dumps(value)}, where {what} is expected: correct "
                                      f"the file, or give {flag('resolution' if key in ('height', 'width') else key)} "
                                      f"to override it.")
        settings[key] = value
    return settings


def resolve(args):
    """Settings from the flags (and --from-metadata), checked: a dict, or HunyuanVideoError in one sentence."""
    given = args.given
    s = read_metadata(input_file(args, "from_metadata")) if args.from_metadata else {}
    if args.preset:  # its settings, under the flags given
        s.update(preset=args.preset, **{k: v for k, v in H.PRESETS[args.preset].items() if k in SETTINGS})
    if args.lora:
        s["loras"] = [H.parse_lora(text) for text in args.lora]
    if {"quantize", "quantization"} <= given and QUANTIZE_BITS[args.quantize] != args.quantization:
        raise H.HunyuanVideoError(f"--quantize {args.quantize} and --quantization {args.quantization} disagree: "
                                  f"give one of them.")
    if args.resolution:
        if len(args.resolution) > 2:
            raise H.HunyuanVideoError("--resolution takes HEIGHT WIDTH, or one number (the height).")
        h = args.resolution[0]
        ar_w, ar_h = (int(n) for n in args.aspect_ratio.split(":"))
        w = args.resolution[1] if len(args.resolution) == 2 else int(round(h * ar_w / ar_h / 16)) * 16
        s.update(height=h, width=w)
    elif args.video and not {"quality", "aspect_ratio"} & given:
        s["height"], s["width"] = H.video_size(video_frames(args.video))
    elif "height" not in s or {"quality", "aspect_ratio"} & given:
        s["height"], s["width"] = BUCKETS[args.quality][args.aspect_ratio]
    quantization = args.quantization or QUANTIZE_BITS.get(args.quantize)
    for key, value in (("prompt", args.prompt), ("seed", args.seed), ("steps", args.steps), ("guidance", args.guidance),
                       ("shift", args.shift), ("frames", args.frames), ("model", args.model),
                       ("quantization", quantization), ("quantize_modulation", args.quantize_modulation),
                       ("fps", args.fps), ("cache", args.cache), ("cache_threshold", args.cache_threshold),
                       ("negative_prompt", args.negative_prompt), ("cfg_scale", args.cfg_scale),
                       ("transformer", args.transformer), ("video", args.video), ("strength", args.strength),
                       ("image", args.image), ("rewrite", args.rewrite), ("rewrite_model", args.rewrite_model),
                       ("rewrite_temperature", args.rewrite_temperature), ("rewrite_seed", args.rewrite_seed),
                       ("lora_ignore_unmatched", args.lora_ignore_unmatched), ("loras", []),
                       ("attention", args.attention or "dense"), ("quantized_matmul", args.quantized_matmul),
                       *((f"cache_{k}", getattr(args, f"cache_{k}")) for k in CACHE_OPTIONS),
                       *((f"radial_{k}", getattr(args, f"radial_{k}")) for k in RADIAL_OPTIONS),
                       *((k, getattr(args, k) or DEFAULT_DTYPES[k]) for k in DEFAULT_DTYPES)):
        if key not in s or key in given or (key == "quantization" and "quantize" in given):
            s[key] = value
    if "prompt" in given or "original_prompt" not in s:  # a new prompt: rewritten (if asked) afresh
        s["original_prompt"] = None
    elif "rewrite" in given and s.get("original_prompt"):  # an earlier run's prompt, rewritten in the mode asked now
        s["prompt"], s["original_prompt"] = s["original_prompt"], None
    if s.get("rewrite_temperature") is not None and not 0 <= s["rewrite_temperature"] < float("inf"):
        raise H.HunyuanVideoError(f"--rewrite-temperature {s['rewrite_temperature']}: use 0 (the same rewrite every "
                                  f"time) or more.")
    if not s.get("rewrite") and ({"rewrite_model", "rewrite_temperature", "rewrite_seed"} & given):
        raise H.HunyuanVideoError("--rewrite-model, --rewrite-temperature and --rewrite-seed set the prompt rewrite: "
                                  "give --rewrite normal or master too.")
    if args.video and "frames" not in given:  # the video's length, up to 129 frames
        n = len(video_frames(args.video))
        if n < 5:
            raise H.HunyuanVideoError(f"the video {args.video} has {n} frame{'s' * (n != 1)}: video to video starts "
                                      f"from a video of 5 frames or more (for an image, use --image with an "
                                      f"image-to-video checkpoint), or say --frames 1.")
        s["frames"] = min((n - 1) // 4 * 4 + 1, H.MAX_FRAMES)
    if "strength" in given and not s["video"]:
        raise H.HunyuanVideoError("--strength applies to video to video: give --video too.")
    if not s["video"]:
        s["strength"] = None
    if s.get("preset") == "skyreels-i2v" and not s["image"]:
        raise H.HunyuanVideoError("--preset skyreels-i2v makes video from an image: give --image FILE.")
    if s["image"] and s["video"]:
        raise H.HunyuanVideoError("--image and --video: give one of them (an image to start from, or a video).")
    if s["negative_prompt"] is not None and "cfg_scale" not in given and s["cfg_scale"] <= 1:
        s["cfg_scale"] = 6.0  # a negative prompt given alone: true CFG at SkyReels-V1's scale
    elif s["cfg_scale"] > 1 and s["negative_prompt"] is None:
        s["negative_prompt"] = ""  # --cfg-scale alone: the plain unconditional branch
    if H.is_tiny(s["model"]) and not args.from_metadata:
        if not ({"resolution", "quality", "aspect_ratio", "video"} & given):
            s.update(height=TINY_DEMO["height"], width=TINY_DEMO["width"])
        # a preset's steps apply, not its long clip: the demo's frames unless typed (or the video's)
        chosen = given | (H.PRESETS.get(args.preset, {}).keys() - {"frames"}) | ({"frames"} if args.video else set())
        s.update({k: TINY_DEMO[k] for k in ("frames", "steps") if k not in chosen})
        if "transformer" not in given:
            s["transformer"] = None  # the demo's own DiT, with a preset's settings
    prefix = H.PRESETS.get(s.get("preset"), {}).get("prompt_prefix", "")
    if s["prompt"] is not None and not s["prompt"].startswith(prefix):
        s["prompt"] = prefix + s["prompt"]
    if s["prompt"] is None:
        raise H.HunyuanVideoError("--prompt is missing: describe the video to generate.")
    if s["seed"] is None:
        s["seed"] = int.from_bytes(os.urandom(4), "little") >> 1
    for key, choices in (("quantization", H.QUANTIZATIONS), *((k, H.DTYPES) for k in DEFAULT_DTYPES)):
        if s[key] is not None and s[key] not in choices:
            raise H.HunyuanVideoError(f"{key} {s[key]!r}: use one of {', '.join(choices)}.")
    problem = H.check_request(s["height"], s["width"], s["frames"], s["steps"], s["prompt"], s["seed"], s["guidance"],
                              s["shift"]) \
        or H.check_guidance(s["negative_prompt"], s["cfg_scale"]) or (
            H.check_strength(s["strength"]) or H.check_video(video_frames(s["video"]), s["frames"]) if s["video"]
            else None)
    if problem:
        raise H.HunyuanVideoError(problem)
    if s["image"]:
        H.check_image(H.read_image(s["image"]), s["height"], s["width"])  # readable, and not far too small
    # input files by their absolute paths, so that --from-metadata repeats the run from any folder
    for key in ("image", "video", "transformer", "model"):
        if s[key] and Path(s[key]).expanduser().exists() and not (key == "model" and s[key] in H.TINY_MODELS):
            s[key] = str(Path(s[key]).expanduser().resolve())
    s["loras"] = [[str(Path(f).expanduser().resolve()) if Path(f).expanduser().exists() else f, scale]
                  for f, scale in s["loras"]]
    if s.get("quantized_matmul") and not s["quantization"]:
        raise H.HunyuanVideoError("--quantized-matmul chooses how quantized layers multiply: give --quantization (or "
                                  "--quantize) too.")
    radial_flags = [f"--radial-{k.replace('_', '-')}" for k in RADIAL_OPTIONS if s.get(f"radial_{k}") is not None]
    if radial_flags and s["attention"] != "radial":
        raise H.HunyuanVideoError(f"{', '.join(radial_flags)} set Radial Attention: give --attention radial too.")
    cache_flags = [f"--cache-{k}" for k in CACHE_OPTIONS if s.get(f"cache_{k}") is not None]
    if cache_flags and s["cache"] != "taylorseer":
        raise H.HunyuanVideoError(f"{', '.join(cache_flags)} set the TaylorSeer cache: give --cache taylorseer too"
                                  + (f" (--cache {s['cache']} takes --cache-threshold)." if s["cache"] else "."))
    try:  # the cache's and the attention's settings checked now, in the flags' words
        H.step_cache(s["cache"], s["cache_threshold"], s["steps"], (s["height"], s["width"]), cache_options(s))
        H.check_attention(s["attention"], radial_options(s), H.patch_grid(s["height"], s["width"], s["frames"]),
                          s["steps"])
    except H.HunyuanVideoError as e:
        raise H.HunyuanVideoError(flag_words(str(e))) from None
    if not 1 <= s["fps"] <= MAX_FPS:
        raise H.HunyuanVideoError(f"--fps {s['fps']}: use a frame rate from 1 to {MAX_FPS} (24 is HunyuanVideo's).")
    if s["guidance"] > 20:
        warnings.warn(f"guidance {s['guidance']} is far above what HunyuanVideo is run with (6.0 by default; its "
                      f"fine-tunes use 1 to 10).")
    return s


def cache_options(s):
    """TaylorSeer's settings given: {interval, order, warmup} from cache_interval, ... (None: its defaults)."""
    return {k: s[f"cache_{k}"] for k in CACHE_OPTIONS if s.get(f"cache_{k}") is not None}


def radial_options(s):
    """Radial Attention's settings given: {dense_steps, dense_layers, decay, block} from radial_dense_steps, ..."""
    return {k: s[f"radial_{k}"] for k in RADIAL_OPTIONS if s.get(f"radial_{k}") is not None}


def flag_words(message):
    """The module's words for cache and attention settings as the flags that set them."""
    for k in CACHE_OPTIONS:
        message = re.sub(rf"\b(taylorseer's |cache options? )?{k}\b", f"--cache-{k}", message, count=1)
    message = message.replace("taylorseer has no threshold", "--cache taylorseer takes no --cache-threshold")
    for k in RADIAL_OPTIONS:
        message = message.replace(f"Radial Attention's {k.replace('_', ' ')}", f"--radial-{k.replace('_', '-')}")
    return message.replace("Radial Attention's ", "").replace("with dense attention", "without --attention radial")


@lru_cache(maxsize=2)
def video_frames(path):
    """--video's frames, read once (its size and length set defaults; the pipeline encodes them)."""
    return H.read_video(path)


def check_writable(path, overwrite):
    """Refuse before any work is done, rather than after an hour of denoising."""
    if path.exists() and not overwrite:
        raise H.HunyuanVideoError(f"{path} already exists: pass --overwrite to replace it, or choose another --output.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise H.HunyuanVideoError(f"cannot write to {path.parent} ({e.strerror}): choose another --output.") from None


def check_outputs(out, args, latents=True):
    """Every file this run will write, checked before any work: none may be an input (whatever the flags),
    none may exist without --overwrite. Returns the latents file (None when decoding saved ones)."""
    inputs = {Path(f).resolve(): flag for flag, f in (("--from-metadata", args.from_metadata),
                                                      ("--decode-latents", args.decode_latents),
                                                      ("--resume", args.resume), ("--video", args.video),
                                                      ("--image", args.image),
                                                      *(("--lora", H.parse_lora(lora)[0]) for lora in args.lora or ()))
              if f}
    latents_file = out.with_name(out.stem + ".latents.safetensors") if latents else None
    files = [out, out.with_suffix(".json")] + ([out.with_suffix(".gif")] if args.gif else []) + \
        ([preview_file(out)] if args.preview and latents else []) + \
        ([latents_file] if latents else []) + ([partial_file(out)] if latents and not args.resume else [])
    for f in files:
        if f.resolve() in inputs:
            raise H.HunyuanVideoError(f"{f} is the {inputs[f.resolve()]} input and this run would write over it: "
                                      f"choose another --output.")
        check_writable(f, args.overwrite)
    if args.frames_dir:
        folder = Path(args.frames_dir)
        if folder.exists() and not folder.is_dir():
            raise H.HunyuanVideoError(f"--frames-dir {folder} is a file: choose a folder.")
        if written_frames(folder) and not args.overwrite:
            raise H.HunyuanVideoError(f"{folder} already holds frames of an earlier run: pass --overwrite to replace "
                                      f"them, or choose another --frames-dir.")
        check_writable(folder / "frame_0000.png", True)
    return latents_file


FRAME_NAME = re.compile(r"frame_\d{4,}\.png")  # what --frames-dir writes: frame_0000.png, ...


def written_frames(folder):
    """The PNG frames an earlier run wrote in folder (and nothing else of the user's there)."""
    return {p.name for p in folder.glob("frame_*.png") if FRAME_NAME.fullmatch(p.name)}


def preview_file(out):
    return out.with_name(out.stem + ".preview.png")


def preview_strip(x0):
    """A step's clean-latent estimate -> up to 8 of its frames side by side, 1/8 of the video's size, uint8
    (h, k w, 3): what --preview writes and the page shows."""
    t = x0.shape[1]
    chosen = mx.array(np.linspace(0, t - 1, min(t, 8)).round().astype(np.int32))  # only those frames are mapped
    return np.concatenate(list(H.latent_preview(x0[:, chosen])), axis=1)  # (h, k w, 3)


def write_preview(out):
    """--preview: after each step, the preview strip, written under a temporary name and renamed."""
    from PIL import Image

    def write(step, steps, x0):
        strip = preview_strip(x0)
        H.write_atomic(preview_file(out), lambda tmp: save_png(Image.fromarray(strip), tmp))
    return write


def partial_file(out):
    """The checkpoint an unfinished generation keeps beside its output, for --resume."""
    return out.with_name(out.stem + ".partial.safetensors")


class Checkpoint:
    """Saves what --resume needs, atomically, at most every `every` seconds of denoising and once more when
    interrupted: the latents after the last step done, the step, the step cache's state, the work so far, the
    text encoders' outputs and the settings (a few MB, milliseconds next to a step). stop() returning True
    after a step interrupts the run there, as Ctrl-C does."""

    def __init__(self, out, settings, text, every, pipe, stop=None):
        self.out, self.path, self.settings, self.text, self.every = out, partial_file(out), settings, text, every
        self.state, self.saved, self.last = None, 0, time.monotonic()
        self.pipe, self.dit, self.stop = pipe, None, stop

    def __call__(self, state):
        self.state = state
        if self.stop is not None and self.stop():
            raise KeyboardInterrupt  # saved by the run's handler, with the way to resume
        if time.monotonic() - self.last >= self.every:
            self.save()

    def save(self):
        if self.state is None or self.saved == self.state["step"]:
            return
        arrays, numbers = self.state["cache"]
        tensors = {"latents": self.state["latents"], **dict(zip(("text_states", "text_mask", "pooled"), self.text)),
                   **{f"cache.{k}": v for k, v in arrays.items()}}
        self.dit = self.dit or dit_fingerprint(self.pipe.transformer_path)  # the DiT is on disk by now
        metadata = {"output": str(self.out.resolve()), "step": str(self.state["step"]), "dit": self.dit,
                    "settings": json.dumps(self.settings), "cache": json.dumps(numbers),
                    "work": json.dumps(self.state["work"])}
        H.write_atomic(self.path, lambda tmp: mx.save_safetensors(str(tmp), tensors, metadata=metadata))
        self.saved, self.last = self.state["step"], time.monotonic()


def dit_fingerprint(path):
    """What tells one DiT from another, read quickly: its weight files' names and sizes and their first MiB."""
    import hashlib

    h = hashlib.sha256()
    for f in H._component_files(path, "pass the DiT's files")[0]:
        with open(f, "rb") as opened:
            h.update(f"{f.name} {f.stat().st_size}".encode() + opened.read(2 ** 20))
    return h.hexdigest()


def read_checkpoint(args):
    """--resume FILE: (output, settings, text, resume state, latents). Settings given as flags too must agree
    with the file's; flags that only start a generation are refused."""
    path = input_file(args, "resume")
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
        settings, step = json.loads(meta["settings"]), int(meta["step"])
        resume = dict(step=step, work=json.loads(meta["work"]), dit=meta.get("dit"), cache=(
            {k[6:]: v for k, v in tensors.items() if k.startswith("cache.")}, json.loads(meta["cache"])))
        text = tensors["text_states"], tensors["text_mask"], tensors["pooled"]
        latents = tensors["latents"]
        mx.eval(latents, *text)
    except Exception as e:
        raise H.HunyuanVideoError(f"{path} is not a checkpoint hunyuan_apple can resume ({type(e).__name__}): pass "
                                  f"the .partial.safetensors an interrupted run left, or start afresh (with "
                                  f"--overwrite if its output's names are taken).") from None
    flags = {"resolution": (settings["height"], settings["width"])}
    differ = [k for k in sorted(args.given & (SETTINGS.keys() | flags.keys()) - {"model"})
              if (tuple(args.resolution) if k == "resolution" else getattr(args, k)) != flags.get(k, settings.get(k))]
    if differ:
        said = ", ".join(f"{flag(k)} {getattr(args, k)} (the checkpoint: {flags.get(k, settings.get(k))})"
                         for k in differ)
        raise H.HunyuanVideoError(f"{said}: a resumed run keeps the settings it started with; leave the flag out, or "
                                  f"start afresh.")
    refuse(args, RESUME_FLAGS | SETTINGS.keys() | flags.keys(),
           "--resume continues the run as it was; leave these out.")
    if "model" in args.given and args.model != settings["model"]:  # a moved copy of the checkpoint (main checks it)
        settings["model"], resume["moved_from"] = args.model, settings["model"]
    return Path(meta["output"]), settings, text, resume, latents


def write_video(frames, path, settings, fps):
    """H.264 mp4 (yuv420p) with the settings in its metadata, written to a temporary name and renamed."""
    import imageio.v2 as iio

    def write(tmp):
        writer = iio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", quality=8,
                                macro_block_size=16, output_params=["-metadata", "comment=" + json.dumps(settings)])
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
    H.write_atomic(path, write)


def save_png(image, path):
    """A PIL image as PNG, through a file we close ourselves (a failed write is raised here, not printed by PIL
    as an ignored exception)."""
    with open(path, "wb") as f:
        image.save(f, format="PNG")


def write_extras(frames, path, args, settings):
    """JSON sidecar, and the PNG frames and GIF when asked. Returns the files written."""
    import imageio.v2 as iio
    from PIL import Image

    written = []
    sidecar = path.with_suffix(".json")
    text = json.dumps(settings, indent=2, ensure_ascii=False, allow_nan=False)  # JSON has no NaN
    H.write_atomic(sidecar, lambda tmp: tmp.write_text(text))
    written.append(sidecar)
    if args.frames_dir:
        folder = Path(args.frames_dir)
        folder.mkdir(parents=True, exist_ok=True)
        names = [f"frame_{i:04d}.png" for i in range(len(frames))]
        for name, frame in zip(names, frames):
            H.write_atomic(folder / name, lambda tmp, frame=frame: save_png(Image.fromarray(frame), tmp))
        for old in written_frames(folder) - set(names):  # an earlier, longer run's
            (folder / old).unlink()
        written.append(folder)
    if args.gif:
        gif = path.with_suffix(".gif")
        H.write_atomic(gif, lambda tmp: iio.mimsave(tmp, list(frames), format="GIF", duration=1000 / settings["fps"],
                                                    loop=0))
        written.append(gif)
    return written


class Progress:
    """One line per activity on stderr (loading, encoding, denoising, decoding): a bar, the count, seconds
    per step where a step means something, and the time left. Redrawn at most 10 times a second."""
    UNITS = {"denoising": "step", "decoding": "tile", "encoding the prompt": "layer", "rewriting the prompt": "token"}

    def __init__(self):
        self.what, self.start, self.shown, self.open = None, 0.0, 0.0, False

    def __call__(self, what, done, total):
        now = time.perf_counter()
        if done == 0 or what != self.what:
            self.close()
            self.what, self.start = what, now
        if 0 < done < total and now - self.shown < 0.1:
            return
        self.shown = now
        per = (now - self.start) / done if done else 0.0
        filled = 24 * done // total if total else 24  # nothing to do (video to video at strength 0) is done
        bar = "#" * filled + "-" * (24 - filled)
        unit = self.UNITS.get(what)
        rate = f"  {per:.2f} s/{unit}" if unit and done else ""
        print(f"\r  {what} [{bar}] {done}/{total}{rate}  ETA {per * (total - done):.0f} s", end="", file=sys.stderr,
              flush=True)
        self.open = True
        if done == total:
            self.close()

    def close(self):
        """End the current line, so that what is printed next starts on a fresh one."""
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False


def summary(pipe, files, seconds):
    """What a finished run did: its time, each phase's seconds and peak memory, the DiT's work, the files."""
    lines = ["done in {:.1f} s".format(seconds)]
    for name in ("rewrite", "text encoders", "denoise", "decode"):
        if name in pipe.stats:
            sec, peak = pipe.stats[name]
            lines.append(f"  {name:<14} {sec:8.1f} s   peak {H.gib(peak * H.GB)}")
    if "work" in pipe.stats:  # what the DiT did, and what it cost
        work = pipe.stats["work"]
        lines.append(f"  DiT forwards: {work['forwards']} computed, {work['skipped']} skipped "
                     f"({work['cache'] or 'no cache'}, {work.get('attention', 'dense')} attention), "
                     f"{work['pflop']:.3g} PFLOP (attention {work.get('attention_pflop', 0):.3g}, linear "
                     f"{work.get('linear_pflop', 0):.3g}); skipped {work.get('skipped_attention_pflop', 0):.3g} "
                     f"attention and {work.get('skipped_linear_pflop', 0):.3g} linear PFLOP")
    return lines + [f"  wrote {f}" for f in files]


def load_pipeline(settings, args):
    dtypes = {c: H.DTYPES[settings.get(k) or DEFAULT_DTYPES[k]] for k, c in COMPONENT.items()}
    return H.HunyuanVideoPipeline.from_pretrained(settings["model"], dtypes=dtypes,
                                                  quantization=settings.get("quantization"),
                                                  quantize_modulation=settings.get("quantize_modulation", False),
                                                  low_memory=args.low_memory, prompt_cache=not args.no_prompt_cache,
                                                  loras=[tuple(lora) for lora in settings.get("loras") or ()],
                                                  lora_ignore_unmatched=settings.get("lora_ignore_unmatched", False),
                                                  transformer=settings.get("transformer"),
                                                  quantized_matmul=settings.get("quantized_matmul") or "auto")


def decode_saved(args):
    """--decode-latents: the VAE phase alone, from latents an earlier run saved. --model, --vae-dtype and
    --fps given now replace the recorded ones; flags that only a generation uses are refused."""
    refuse(args, DECODE_FLAGS, "--decode-latents only decodes latents already made, with --model, --vae-dtype, "
                               "--output, --fps, --frames-dir, --gif, --low-memory; leave the rest out.")
    path = input_file(args, "decode_latents")
    try:
        saved = mx.load(str(path), return_metadata=True)
        latents, settings = saved[0]["latents"], json.loads(saved[1]["settings"])
    except Exception:
        raise H.HunyuanVideoError(f"{path} holds no latents saved by hunyuan_apple: pass the .latents.safetensors "
                                  f"file a run left behind.") from None
    name = path.name.removesuffix(".latents.safetensors")
    out = Path(args.output or path.with_name(name if name != path.name else path.stem).with_suffix(".mp4"))
    settings.update({k: getattr(args, k) for k in ("model", "vae_dtype", "fps") if k in args.given})
    return out, settings, latents


def rewriting(settings):
    """Whether the run rewrites its prompt first: asked to, and not already done (a resumed run, or settings
    read back from an earlier run, keep the rewritten prompt)."""
    return bool(settings.get("rewrite")) and not settings.get("original_prompt")


# what a generation will do, known before any weights load (see plan)
Plan = namedtuple("Plan", "cfg mode line memory problem")


def plan(pipe, settings):
    """A generation's plan, before any weights load: whether true CFG runs (cfg) and how (mode: "batched" or
    "sequential"), a line that tells the run, the memory plan's peaks, and problem: None, or the plan's sentence
    when it will not fit. Settings the checkpoint cannot take raise HunyuanVideoError."""
    condition = pipe.image_condition()
    if condition and not settings.get("image"):
        raise H.HunyuanVideoError(f"{settings['model']} is an image-to-video checkpoint: give --image FILE.")
    if settings.get("image") and not condition:
        raise H.HunyuanVideoError(f"{settings['model']} is a text-to-video checkpoint, which takes no image: "
                                  f"leave --image out, or use an image-to-video one (HunyuanVideo-I2V, "
                                  f"--preset skyreels-i2v).")
    if condition == "latent_concat" and settings["frames"] < 5:
        raise H.HunyuanVideoError(f"--frames {settings['frames']}: this checkpoint's video leaves out its first 4 "
                                  f"frames; ask for 5 or more (4n+1).")
    size = settings["height"], settings["width"], settings["frames"]
    rewrite = (settings.get("rewrite_model"), settings["prompt"]) if rewriting(settings) else None
    cfg = settings.get("negative_prompt") is not None and settings.get("cfg_scale", 1.0) > 1
    mode = pipe.cfg_mode(*size, settings["cache"], settings["steps"]) if cfg else None
    work = dict(cache_options=cache_options(settings), attention=settings.get("attention") or "dense")
    line = (f"height {settings['height']}, width {settings['width']}, {settings['frames']} frames, "
            f"{settings['steps']} steps, seed {settings['seed']}, model {settings['model']}"
            + (f", transformer {settings['transformer']}" if settings.get("transformer") else "")
            + (f", cache {settings['cache']}" if settings["cache"] else "")
            + (", Radial Attention" if settings.get("attention") == "radial" else "")
            + (f", true CFG {settings['cfg_scale']} ({mode})" if cfg else "")
            + "".join(f", LoRA {Path(f).name} x{s:g}" for f, s in settings.get("loras") or ())
            + (f", video {settings['video']} at strength {settings['strength']:g}" if settings.get("video") else "")
            + (f", image {settings['image']}" if settings.get("image") else "")
            + (f", the prompt rewritten first ({settings['rewrite']})" if rewrite else ""))
    try:
        return Plan(cfg, mode, line, pipe.check_memory(*size, settings["cache"], settings["steps"], mode, rewrite,
                                                       **work), None)
    except H.HunyuanVideoError as e:
        return Plan(cfg, mode, line, None, str(e))


# what a run ended with: the exit code; the message (an error, or how to resume); the files written; the
# settings; the pipeline; seconds; and, when it stopped after a step, (the step, its checkpoint file)
Outcome = namedtuple("Outcome", "code message files settings pipe seconds stopped",
                     defaults=((), None, None, 0.0, None))


def run(args, bar, say, load=None, preview=None, stop=None):
    """One generation (or a decode of saved latents, or a resumed run) from parsed flags, as an Outcome: the
    command line's whole work, shared by the web page. bar(what, done, total) follows each activity; say(text)
    tells what is about to happen; load(settings, args) gives the pipeline (load_pipeline by default; the page
    keeps one); preview(step, steps, x0) gets each step's clean-latent estimate; stop() returning True stops the
    run after the current step, leaving its checkpoint for --resume (as Ctrl-C does)."""
    t0 = time.perf_counter()
    latents_file, phase, checkpoint, settings = None, "loading", None, {}
    try:
        if args.checkpoint_every < 0:
            raise H.HunyuanVideoError(f"--checkpoint-every {args.checkpoint_every}: use 0 or more seconds.")
        if args.decode_latents:
            if args.from_metadata:
                raise H.HunyuanVideoError("--decode-latents and --from-metadata: give one of them.")
            out, settings, latents = decode_saved(args)
        elif args.resume:
            out, settings, text, resume, start = read_checkpoint(args)
        else:
            settings = resolve(args)
            out = Path(args.output or f"outputs/{time.strftime('%Y%m%d-%H%M%S')}_{settings['seed']}.mp4")
        if out.suffix != ".mp4":
            raise H.HunyuanVideoError(f"--output {out}: the video is an mp4; end the name with .mp4.")
        new_latents = check_outputs(out, args, latents=not args.decode_latents)
        pipe = (load or load_pipeline)(settings, args)
        pipe.progress = bar
        if args.resume and resume.get("moved_from") and (pipe.hub or pipe.transformer_hub or not resume["dit"] or
                                                         dit_fingerprint(pipe.transformer_path) != resume["dit"]):
            raise H.HunyuanVideoError(f"--model {args.model} is not the model this run started with "
                                      f"({resume['moved_from']}): its DiT differs; leave --model out, or give the "
                                      f"folder where that checkpoint now is.")
        if not args.decode_latents:
            settings["version"] = H.__version__
            p = plan(pipe, settings)
            if pipe.image_condition() == "latent_concat":
                say(f"this checkpoint's video leaves out its first 4 frames, as the reference's: "
                    f"{settings['frames'] - 4} frames")
            say(p.line)
            if p.problem:
                if not args.force:
                    raise H.HunyuanVideoError(p.problem)
                warnings.warn(f"{p.problem} (--force: running anyway)")
            else:
                say("memory plan: " + ", ".join(f"{k} {H.gib(v)}" for k, v in p.memory.items()))
            cfg, mode = p.cfg, p.mode
            if rewriting(settings):
                phase = "rewriting the prompt"
                prefix = H.PRESETS.get(settings.get("preset"), {}).get("prompt_prefix", "")  # kept as it is
                text = prefix + pipe.rewrite(settings["prompt"].removeprefix(prefix), settings["rewrite"],
                                             settings.get("rewrite_model"), settings.get("rewrite_temperature") or 0.0,
                                             settings.get("rewrite_seed"))
                settings["original_prompt"], settings["prompt"] = settings["prompt"], text
                say(f"the prompt, rewritten ({settings['rewrite']}, "
                    f"{settings.get('rewrite_model') or H.REWRITE_MODEL}"
                    f"{'; kept from an earlier rewrite' if pipe.rewrite_hit else ''}): {text}")
            image = H.read_image(settings["image"]) if settings.get("image") else None
            if args.resume:
                say(f"resuming after step {resume['step']} of {settings['steps']}")
            else:
                phase = "encoding the prompt"
                requests = pipe.prompt_requests([settings["prompt"]], [settings["negative_prompt"]] if cfg else [],
                                                image, settings["height"], settings["width"])
                text, resume, start = pipe.encode_prompt(requests), None, None  # rows: the prompt, the negative one
                if pipe.prompt_hit:
                    say("the prompt's encoding comes from the prompt cache (--no-prompt-cache runs the text "
                        "encoders)")
            video = None
            if settings.get("video") and not args.resume:
                phase = "encoding the video"
                video = pipe.encode_video(video_frames(settings["video"]), settings["height"], settings["width"],
                                          settings["frames"])
            if image is not None:
                phase = "encoding the image"
                image = pipe.encode_image(image, settings["height"], settings["width"])
            phase = "denoising"
            checkpoint = Checkpoint(out, settings, text, args.checkpoint_every, pipe, stop)
            previews = [f for f in (write_preview(out) if args.preview else None, preview) if f]
            latents = pipe.denoise(*(t[:1] for t in text), settings["height"], settings["width"], settings["frames"],
                                   settings["steps"], settings["guidance"], settings["shift"], settings["seed"],
                                   latents=start, cache=settings["cache"], cache_threshold=settings["cache_threshold"],
                                   checkpoint=checkpoint, resume=resume,
                                   preview=(lambda *a: [f(*a) for f in previews]) if previews else None,
                                   negative=tuple(t[1:] for t in text) if cfg else None,
                                   true_cfg_scale=settings.get("cfg_scale", 1.0), cfg_batched=mode == "batched",
                                   video_latents=video, strength=settings["strength"] if video is not None else 1.0,
                                   image_latents=image, cache_options=cache_options(settings),
                                   attention=settings.get("attention") or "dense", radial=radial_options(settings))
            settings["work"] = {k: v for k, v in pipe.stats["work"].items() if k != "cache"}  # in the video's metadata
            # the denoised latents are the expensive part: keep them until the video is safely written
            latents_file = new_latents
            H.write_atomic(latents_file, lambda tmp: mx.save_safetensors(
                str(tmp), {"latents": latents}, metadata={"settings": json.dumps(settings)}))
            checkpoint.path.unlink(missing_ok=True)  # the latents file now holds all of it
        phase = "decoding"
        frames = pipe.decode(latents)
        write_video(frames, out, settings, settings["fps"])
        files = [out] + write_extras(frames, out, args, settings)
        if latents_file is not None:
            latents_file.unlink()
    except H.HunyuanVideoError as e:
        message = str(e)
        if H.is_tiny(settings.get("model", "")):  # built here, not downloaded
            message = re.sub(r"(the download is incomplete; )?download (it|the checkpoint) again",
                             "the tiny demo is built on this machine: delete its folder and it is built anew", message)
        return fail(f"error: {message}", latents_file, settings, checkpoint=checkpoint)
    except KeyboardInterrupt:
        if checkpoint is not None and checkpoint.state is not None and latents_file is None:
            checkpoint.save()
            return Outcome(130, f"interrupted after step {checkpoint.saved} of {settings['steps']}: continue with\n"
                                f"  {command()} --resume {checkpoint.path}", settings=settings,
                           stopped=(checkpoint.saved, checkpoint.path))
        return fail("interrupted.", latents_file, settings, 130)
    except Exception as e:
        # MLX reports an allocation that failed as a RuntimeError
        if isinstance(e, MemoryError) or isinstance(e, RuntimeError) and re.search(r"alloc|memory", str(e), re.I):
            what = (str(e).splitlines() or [type(e).__name__])[0][:120]
            return fail(f"error: ran out of memory while {phase} ({what}): try --low-memory, --quantization int8, "
                        f"fewer --frames or a smaller --resolution; close other programs, or set "
                        f"HUNYUAN_APPLE_MEMORY_GB to what this machine can really give so that the memory plan refuses "
                        f"what will not fit.", latents_file, settings)
        if latents_file is None:  # after denoising, never lose the latents to an unexpected failure
            raise
        return fail(f"error: {type(e).__name__}: {e}", latents_file, settings)
    return Outcome(0, "", files, settings, pipe, time.perf_counter() - t0)


def main(argv=None):
    bar = Progress()
    warnings.showwarning = lambda message, *_, **__: bar.close() or print(f"warning: {message}", file=sys.stderr)
    args = parse_args(argv)
    try:
        done = run(args, bar, lambda text: bar.close() or print(text, file=sys.stderr))
    finally:
        bar.close()
    print(*(summary(done.pipe, done.files, done.seconds) if done.code == 0 else [done.message]), sep="\n",
          file=sys.stdout if done.code == 0 else sys.stderr)
    return done.code


def command():
    """How the user ran this: the installed command, or the script with the interpreter running it."""
    return f"{sys.executable} {sys.argv[0]}" if sys.argv[0].endswith("hunyuan_apple.py") else "hunyuan-apple"


def fail(message, latents_file, settings, code=2, checkpoint=None):
    """The Outcome of a run that failed: the message, and how to go on from what it kept."""
    lines, stopped = [message], None
    if latents_file is None and checkpoint is not None and checkpoint.saved and checkpoint.path.exists():
        lines.append(f"the run can go on from step {checkpoint.saved}: {command()} --resume {checkpoint.path}")
        stopped = (checkpoint.saved, checkpoint.path)
    if latents_file is not None and latents_file.exists():
        lines.append(f"the denoised latents are saved in {latents_file}: decode them with\n"
                     f"  {command()} --decode-latents {latents_file}")
    return Outcome(code, "\n".join(lines), settings=settings, stopped=stopped)


if __name__ == "__main__":
    sys.exit(main())

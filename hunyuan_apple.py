"""HunyuanVideo text-to-video on MLX: the command line.

    python hunyuan_apple.py --prompt "a cat walks on the grass" --quality 540p --aspect-ratio 16:9 --frames 13
    python hunyuan_apple.py --model tiny --prompt "a cat"          # offline demo: tiny random weights, noise video

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
SETTINGS = ("prompt", "seed", "steps", "guidance", "shift", "height", "width", "frames", "model", "quantization",
            "quantize_modulation", "dit_dtype", "vae_dtype", "text_dtype", "fps")
COMPONENT = {"dit_dtype": "transformer", "vae_dtype": "vae", "text_dtype": "text_encoders"}  # --dit-dtype, ...
DTYPE_NAMES = {dtype: name for name, dtype in H.DTYPES.items()}  # mx.bfloat16 -> "bf16"
DEFAULT_DTYPES = {k: DTYPE_NAMES[H.DEFAULT_DTYPES[c]] for k, c in COMPONENT.items()}  # {"dit_dtype": "bf16", ...}


def cache_dir():
    return Path(os.environ.get("HUNYUAN_APPLE_CACHE", Path.home() / ".cache" / "hunyuan_apple"))


def parse_args(argv):
    ap = argparse.ArgumentParser(description="HunyuanVideo text-to-video on MLX.",
                                 epilog="Sizes: --quality and --aspect-ratio pick one of HunyuanVideo's trained sizes; "
                                        "--resolution overrides them. Aspect ratios are width:height.")
    ap.add_argument("--prompt", help="what the video shows")
    ap.add_argument("--resolution", type=int, nargs="+", metavar="N",
                    help="HEIGHT WIDTH, or one number (the height; the width follows --aspect-ratio)")
    ap.add_argument("--aspect-ratio", choices=list(BUCKETS["540p"]), default="16:9",
                    help="width:height; 16:9 is landscape, 9:16 portrait (default 16:9)")
    ap.add_argument("--quality", choices=list(BUCKETS), default="540p", help="540p (default) or 720p")
    ap.add_argument("--frames", type=int, default=13, help="4n+1 frames (default 13; 129 is the model's longest)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=6.0, help="embedded guidance scale (default 6.0)")
    ap.add_argument("--shift", type=float, default=7.0, help="flow shift (default 7.0)")
    ap.add_argument("--seed", type=int, help="random if left out; it is printed and saved with the video")
    ap.add_argument("--model", default=H.DEFAULT_MODEL,
                    help=f"a local folder in the diffusers layout, a hub id (default {H.DEFAULT_MODEL}), or 'tiny' "
                         f"for the offline demo")
    ap.add_argument("--quantization", choices=["fp8", "int8", "int4"])
    ap.add_argument("--quantize", type=int, choices=sorted(QUANTIZE_BITS), help="the same as --quantization int8|int4")
    ap.add_argument("--quantize-modulation", action="store_true",
                    help="also quantize the DiT's adaLN modulation (3.4B parameters; saves memory, may cost quality)")
    for flag, what in (("dit", "the DiT"), ("vae", "the VAE"), ("text", "the text encoders")):
        default = DEFAULT_DTYPES[f"{flag}_dtype"]
        ap.add_argument(f"--{flag}-dtype", choices=list(H.DTYPES), help=f"precision of {what} (default {default})")
    ap.add_argument("--low-memory", action="store_true",
                    help="trade speed for memory: no buffer cache, the DiT's blocks read from disk as they run")
    ap.add_argument("--force", action="store_true", help="run even if the memory plan says it will not fit")
    ap.add_argument("--output", help="the mp4 to write (default outputs/<time>_<seed>.mp4)")
    ap.add_argument("--frames-dir", nargs="?", const="/tmp/hunyuan_frames", help="also write PNG frames here "
                    "(default folder /tmp/hunyuan_frames)")
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--gif", action="store_true", help="also write a GIF beside the mp4")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ap.add_argument("--from-metadata", metavar="FILE", help="repeat a generation from its .json or .mp4")
    ap.add_argument("--decode-latents", metavar="FILE", help="decode latents saved by an earlier run")
    return ap, ap.parse_args(argv)


def read_metadata(path):
    """The settings of an earlier generation, from its JSON sidecar or its mp4's comment tag."""
    path = Path(path)
    try:
        if path.suffix == ".mp4":
            import subprocess

            import imageio_ffmpeg

            out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata",
                                  "-"], capture_output=True, text=True, check=True).stdout
            m = re.search(r"^comment=(.*?)(?<!\\)$", out, re.M | re.S)
            return json.loads(re.sub(r"\\(.)", r"\1", m.group(1)))
        return json.loads(path.read_text())
    except Exception as e:
        raise H.HunyuanVideoError(f"{path} holds no readable generation settings ({type(e).__name__}): pass the .json "
                                  f"written beside the video, or the video itself.") from None


def resolve(ap, args):
    """Settings from the flags (and --from-metadata), checked: a dict, or HunyuanVideoError in one sentence."""
    s = {}
    if args.from_metadata:
        s = {k: v for k, v in read_metadata(args.from_metadata).items() if k in SETTINGS}
    flags = {a.dest for a in ap._actions if a.dest != "help"}
    given = {k for k in flags if getattr(args, k) != ap.get_default(k)}
    if args.resolution:
        if len(args.resolution) > 2:
            raise H.HunyuanVideoError("--resolution takes HEIGHT WIDTH, or one number (the height).")
        h = args.resolution[0]
        ar_w, ar_h = (int(n) for n in args.aspect_ratio.split(":"))
        w = args.resolution[1] if len(args.resolution) == 2 else int(round(h * ar_w / ar_h / 16)) * 16
        s.update(height=h, width=w)
    elif "height" not in s or {"quality", "aspect_ratio"} & given:
        s["height"], s["width"] = BUCKETS[args.quality][args.aspect_ratio]
    quantization = args.quantization or QUANTIZE_BITS.get(args.quantize)
    for key, value in (("prompt", args.prompt), ("seed", args.seed), ("steps", args.steps), ("guidance", args.guidance),
                       ("shift", args.shift), ("frames", args.frames), ("model", args.model),
                       ("quantization", quantization), ("quantize_modulation", args.quantize_modulation),
                       ("fps", args.fps), *((k, getattr(args, k) or DEFAULT_DTYPES[k]) for k in DEFAULT_DTYPES)):
        flag = {"quantization": "quantize"}.get(key, key)
        if key not in s or key in given or flag in given:
            s[key] = value
    if s["model"] == "tiny" and not args.from_metadata:
        if not ({"resolution", "quality", "aspect_ratio"} & given):
            s.update(height=TINY_DEMO["height"], width=TINY_DEMO["width"])
        s.update({k: TINY_DEMO[k] for k in ("frames", "steps") if k not in given})
    if s["prompt"] is None:
        raise H.HunyuanVideoError("--prompt is missing: describe the video to generate.")
    if s["seed"] is None:
        s["seed"] = int.from_bytes(os.urandom(4), "little") >> 1
    problem = H.check_request(s["height"], s["width"], s["frames"], s["steps"], s["prompt"])
    if problem:
        raise H.HunyuanVideoError(problem)
    if s["fps"] < 1:
        raise H.HunyuanVideoError(f"--fps {s['fps']}: use a positive frame rate (24 is the default).")
    return s


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


def write_video(frames, path, settings, fps):
    """H.264 mp4 (yuv420p) with the settings in its metadata, written to a temporary name and renamed."""
    import imageio.v2 as iio

    tmp = path.with_name(f".{path.stem}.partial.mp4")
    writer = iio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", quality=8,
                            macro_block_size=16, output_params=["-metadata", "comment=" + json.dumps(settings)])
    for frame in frames:
        writer.append_data(frame)
    writer.close()
    tmp.replace(path)


def write_extras(frames, path, args, settings):
    """JSON sidecar, and the PNG frames and GIF when asked. Returns the files written."""
    import imageio.v2 as iio
    from PIL import Image

    written = []
    sidecar = path.with_suffix(".json")
    sidecar.with_suffix(".json.partial").write_text(json.dumps(settings, indent=2, ensure_ascii=False))
    sidecar.with_suffix(".json.partial").replace(sidecar)
    written.append(sidecar)
    if args.frames_dir:
        folder = Path(args.frames_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            tmp = folder / f".frame_{i:04d}.partial.png"
            Image.fromarray(frame).save(tmp)
            tmp.replace(folder / f"frame_{i:04d}.png")
        written.append(folder)
    if args.gif:
        gif = path.with_suffix(".gif")
        tmp = gif.with_name(f".{gif.stem}.partial.gif")
        iio.mimsave(tmp, list(frames), format="GIF", duration=1000 / settings["fps"], loop=0)
        tmp.replace(gif)
        written.append(gif)
    return written


def progress(t0):
    """A one-line progress bar over the denoising steps: seconds per step and time left."""
    def show(step, steps, latents):
        per = (time.perf_counter() - t0[0]) / step
        bar = "#" * (24 * step // steps) + "-" * (24 - 24 * step // steps)
        end = "\n" if step == steps else ""
        print(f"\r  denoising [{bar}] {step}/{steps}  {per:.2f} s/step  ETA {per * (steps - step):.0f} s", end=end,
              file=sys.stderr, flush=True)
    return show


def report(pipe, files, seconds):
    print("done in {:.1f} s".format(seconds))
    for name, (sec, peak) in pipe.stats.items():
        print(f"  {name:<14} {sec:8.1f} s   peak {peak:6.2f} GiB")
    for f in files:
        print(f"  wrote {f}")


def load_pipeline(settings, low_memory=False):
    model = settings["model"]
    if model == "tiny":
        folder = cache_dir() / f"tiny-{H.__version__}"
        if not (folder / "model_index.json").exists():
            print(f"building the tiny offline demo checkpoint in {folder} (once; its videos are noise)", file=sys.stderr)
            H.build_tiny_checkpoint(folder)
        model = folder
    dtypes = {c: H.DTYPES[settings.get(k) or DEFAULT_DTYPES[k]] for k, c in COMPONENT.items()}
    return H.HunyuanVideoPipeline.from_pretrained(model, dtypes=dtypes, quantization=settings.get("quantization"),
                                                  quantize_modulation=settings.get("quantize_modulation", False),
                                                  low_memory=low_memory)


def decode_saved(args):
    """--decode-latents: the VAE phase alone, from latents an earlier run saved."""
    path = Path(args.decode_latents)
    try:
        saved = mx.load(str(path), return_metadata=True)
        latents, settings = saved[0]["latents"], json.loads(saved[1]["settings"])
    except Exception:
        raise H.HunyuanVideoError(f"{path} holds no latents saved by hunyuan_apple.py: pass the .latents.safetensors "
                                  f"file a run left behind.") from None
    out = Path(args.output or path.with_name(path.name.replace(".latents.safetensors", ".mp4")))
    check_writable(out, args.overwrite)
    if args.vae_dtype:  # the one setting of the run that decoding uses and the user may change
        settings["vae_dtype"] = args.vae_dtype
    pipe = load_pipeline(settings, args.low_memory)
    return pipe, out, settings, latents


def main(argv=None):
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    ap, args = parse_args(argv)
    t0 = time.perf_counter()
    latents_file, phase = None, "loading"
    try:
        if args.decode_latents:
            pipe, out, settings, latents = decode_saved(args)
        else:
            settings = resolve(ap, args)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = Path(args.output or f"outputs/{stamp}_{settings['seed']}.mp4")
            if out.suffix != ".mp4":
                raise H.HunyuanVideoError(f"--output {out}: the video is an mp4; end the name with .mp4.")
            check_writable(out, args.overwrite)
            settings["version"] = H.__version__
            print(f"height {settings['height']}, width {settings['width']}, {settings['frames']} frames, "
                  f"{settings['steps']} steps, seed {settings['seed']}, model {settings['model']}", file=sys.stderr)
            pipe = load_pipeline(settings, args.low_memory)
            if not args.force:  # before any weights load
                est = pipe.check_memory(settings["height"], settings["width"], settings["frames"])
                print("memory plan: " + ", ".join(f"{k} {v / H.GB:.1f} GiB" for k, v in est.items()), file=sys.stderr)
            phase = "encoding the prompt"
            states, mask, pooled = pipe.encode_prompt(settings["prompt"])
            start = [time.perf_counter()]
            phase = "denoising"
            latents = pipe.denoise(states, mask, pooled, settings["height"], settings["width"], settings["frames"],
                                   settings["steps"], settings["guidance"], settings["shift"], settings["seed"],
                                   callback=progress(start))
            # the denoised latents are the expensive part: keep them until the video is safely written
            latents_file = out.with_name(out.stem + ".latents.safetensors")
            tmp = out.with_name(f".{out.stem}.latents.partial.safetensors")
            mx.save_safetensors(str(tmp), {"latents": latents}, metadata={"settings": json.dumps(settings)})
            tmp.replace(latents_file)
        phase = "decoding"
        frames = pipe.decode(latents)
        write_video(frames, out, settings, settings["fps"])
        files = [out] + write_extras(frames, out, args, settings)
        if latents_file is not None:
            latents_file.unlink()
    except H.HunyuanVideoError as e:
        return fail(f"error: {e}", latents_file)
    except KeyboardInterrupt:
        return fail("interrupted.", latents_file, 130)
    except Exception as e:
        # MLX reports an allocation that failed as a RuntimeError
        if isinstance(e, MemoryError) or isinstance(e, RuntimeError) and re.search(r"alloc|memory", str(e), re.I):
            what = (str(e).splitlines() or [type(e).__name__])[0][:120]
            return fail(f"error: ran out of memory while {phase} ({what}): try --low-memory, --quantization int8, "
                        f"fewer --frames or a smaller --resolution; close other programs, or set "
                        f"HUNYUAN_APPLE_MEMORY_GB to what this machine can really give so that the memory plan "
                        f"refuses what will not fit.", latents_file)
        if latents_file is None:  # after denoising, never lose the latents to an unexpected failure
            raise
        return fail(f"error: {type(e).__name__}: {e}", latents_file)
    report(pipe, files, time.perf_counter() - t0)
    return 0


def fail(message, latents_file, code=2):
    print(message, file=sys.stderr)
    if latents_file is not None and latents_file.exists():
        print(f"the denoised latents are saved in {latents_file}: decode them with\n"
              f"  python hunyuan_apple.py --decode-latents {latents_file}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

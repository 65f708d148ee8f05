"""HunyuanVideo on MLX (text, image or video to video): the command line.

    python hunyuan_apple.py --prompt "a cat walks on the grass" --quality 540p --aspect-ratio 16:9 --frames 13
    python hunyuan_apple.py --model tiny --prompt "a cat"          # offline demo: tiny random weights, noise video
    python hunyuan_apple.py --model tiny-i2v --image cat.png --prompt "a cat"    # the image-to-video demo
    python hunyuan_apple.py --model tiny15 --prompt "a cat"        # HunyuanVideo 1.5's demos: tiny15, tiny15-i2v
    python hunyuan_apple.py --prompt "..." --lora style.safetensors:0.8 --negative-prompt "blurry" --cfg-scale 6
    python hunyuan_apple.py --prompt "..." --video input.mp4 --strength 0.7     # video to video
    python hunyuan_apple.py --model hunyuanvideo-community/HunyuanVideo-I2V --image cat.png --prompt "..."

Writes an H.264 mp4 (and its settings as JSON beside it and in the mp4's metadata). The latents are saved
before decoding; if anything fails after denoising, the message says how to decode them again.

Every setting of a generation is a flag made from the module's table (HunyuanVideo_Apple.SETTINGS): --frames sets
frames, --cfg-scale cfg_scale. A run is a loop over the pipeline's stream of events (stream), which writes the
checkpoint, the preview, the latents and the video between them.
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from collections import namedtuple
from pathlib import Path

import mlx.core as mx
import numpy as np

import HunyuanVideo15_Apple as H15
import HunyuanVideo_Apple as H

# each model's trained sizes by --quality and --aspect-ratio: {quality: {width:height: (height, width)}}
MODEL_SIZES = {kind.dit_class.family: kind.buckets for kind in (H.HunyuanVideoPipeline, H15.HunyuanVideo15Pipeline)}
QUALITIES = sorted({q for buckets in MODEL_SIZES.values() for q in buckets}, key=lambda q: int(q[:-1]))
QUANTIZE_BITS = {8: "int8", 4: "int4"}
SIZE_FLAGS = ("resolution", "quality", "aspect_ratio")  # what sets height and width
# the settings with flags of their own shape: the size (SIZE_FLAGS), the LoRAs (--lora FILE[:SCALE], repeated), and
# what a run records but no one sets
OWN_FLAGS = ("height", "width", "loras", "original_prompt")


def flag(key):
    """The command-line flag of a setting or argument: "frames_dir" -> "--frames-dir"."""
    return "--" + key.replace("_", "-")


# how this command line names the settings in its messages: by their flags
FLAGS = {**{k: flag(k) for k in H.SETTINGS}, "height": "height", "width": "width",
         "loras": "--lora", "resolution": "--resolution", "original_prompt": "the prompt as typed"}
# what --decode-latents uses; any other flag is refused with it (the latents are already made)
DECODE_FLAGS = {"decode_latents", "model", "vae_dtype", "output", "overwrite", "frames_dir", "gif", "fps", "low_memory"}
# what --resume takes besides the settings in its file (a setting given too must agree with the file)
RESUME_FLAGS = {"resume", "model", "overwrite", "frames_dir", "gif", "low_memory", "force", "checkpoint_every",
                "no_prompt_cache", "preview"}


def sizes_table():
    rows = [f"  {family}:\n" + "\n".join(f"    {q:<5} " + "  ".join(f"{ar} {h}x{w}" for ar, (h, w) in b.items())
                                         for q, b in buckets.items()) for family, buckets in MODEL_SIZES.items()]
    return "\n".join(rows)


def quality_sizes(args, saved=None):
    """{width:height: (height, width)} of the quality --quality names for the model the flags name, or else the
    saved settings (--from-metadata's), refused if the model is not made at it; or else of the quality of the
    model's own default size (its first where none is)."""
    chosen = {k: v for k, v in (saved or {}).items() if k in ("model", "preset") and v is not None}
    r = H.check_request({**chosen, **{k: getattr(args, k) for k in ("model", "preset") if k in args.given}},
                        text=True)
    kind = H._pipeline_class(r.model)
    if "quality" in args.given:
        if args.quality not in kind.buckets:
            raise H.HunyuanVideoError(f"--quality {args.quality}: {kind.dit_class.family} is made at "
                                      f"{' and '.join(kind.buckets)}; choose one of them, or give --resolution.")
        return kind.buckets[args.quality]
    first = next(iter(kind.buckets.values()))
    return next((b for b in kind.buckets.values() if b["16:9"] == (r.height, r.width)), first)


def parser():
    """The command line's flags: each setting's (from the module's table, in its order) and the command line's own."""
    ap = argparse.ArgumentParser(
        prog="hunyuan-apple", description="HunyuanVideo on MLX: text to video, and image or video to video.",
        argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"sizes (height x width) that --quality and --aspect-ratio choose (aspect ratios are width:height):\n"
               f"{sizes_table()}\n--resolution overrides them. With --model tiny (or tiny-i2v) the demo renders "
               f"{H.TINY_DEMO['height']}x{H.TINY_DEMO['width']}, {H.TINY_DEMO['frames']} frames, "
               f"{H.TINY_DEMO['steps']} steps\nunless --resolution, --quality, --aspect-ratio, --frames or --steps "
               f"say otherwise.")
    ap.add_argument("--version", action="version", version=f"hunyuan-apple {H.__version__} (MLX {mx.__version__})")
    for name, s in H.SETTINGS.items():
        if name == "height":
            ap.add_argument("--resolution", type=int, nargs="+", metavar="N",
                            help="HEIGHT WIDTH, or one number (the height; the width follows --aspect-ratio)")
            ap.add_argument("--aspect-ratio", choices=list(MODEL_SIZES[H.HunyuanVideoTransformer.family]["540p"]),
                            help="width:height; 16:9 is landscape, 9:16 portrait (default 16:9)")
            ap.add_argument("--quality", choices=QUALITIES, help="540p (13B's default) or 720p; 480p or 720p for "
                            "HunyuanVideo 1.5 (its default: the checkpoint's)")
        elif name == "loras":
            ap.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="apply a LoRA to the DiT, at "
                            "SCALE (1.0 by default); repeat for several. diffusers, original, musubi/kohya and "
                            "ComfyUI files")
        if name in OWN_FLAGS:
            continue
        default = f" (default {s.default})" if s.default not in (None, False, []) else ""
        metavar = {"model": "PATH", "transformer": "PATH", "image": "FILE", "video": "FILE",
                   "rewrite_model": "ID"}.get(name, {int: "N", float: "X", str: "TEXT"}.get(s.kind))
        kind = dict(action="store_true") if s.kind is bool else dict(choices=list(s.kind)) \
            if isinstance(s.kind, tuple) else dict(type=s.kind, metavar=metavar)
        ap.add_argument(FLAGS[name], help=(s.help + default).replace("%", "%%"), **kind)  # argparse formats help
        if name == "quantization":
            ap.add_argument("--quantize", type=int, choices=sorted(QUANTIZE_BITS), help="the same as --quantization "
                            "int8|int4")
    ap.add_argument("--no-prompt-cache", action="store_true", help="always run the text encoders (by default a "
                    "prompt's encoding is kept in the cache folder and reused)")
    ap.add_argument("--output", help="the mp4 to write (default outputs/<time>_<seed>.mp4)")
    ap.add_argument("--frames-dir", nargs="?", const="/tmp/hunyuan_frames", help="also write PNG frames here "
                    "(default folder /tmp/hunyuan_frames)")
    ap.add_argument("--gif", action="store_true", help="also write a GIF beside the mp4")
    ap.add_argument("--preview", action="store_true", help="keep NAME.preview.png beside the mp4: a strip of frames "
                    "of the video the current step predicts, updated after every step")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--from-metadata", metavar="FILE", help="repeat a generation from its .json or .mp4 (flags given "
                    "too override its settings; saved ones that no longer apply with them are left out, with a note)")
    ap.add_argument("--decode-latents", metavar="FILE", help="decode latents saved by an earlier run")
    ap.add_argument("--resume", metavar="FILE", help="continue an interrupted run from the .partial.safetensors "
                                                     "checkpoint it left beside its output")
    ap.add_argument("--checkpoint-every", type=float, metavar="SECONDS", help="how often denoising saves its "
                    "checkpoint for --resume (default 10 s; 0: after every step)")
    return ap


def parse_args(argv):
    """The flags, and args.given: the flags the user typed (a typed flag is honoured even if equal to a default).
    A setting's flag left out is None: the module's default (a preset's, the tiny demo's, ...) applies."""
    ap = parser()
    typed = ap.parse_args(argv)
    defaults = dict(aspect_ratio="16:9", quality="540p", checkpoint_every=10.0)
    args = argparse.Namespace(**{a.dest: defaults.get(a.dest, False if a.nargs == 0 else None)
                                 for a in ap._actions if a.dest not in ("help", "version")})
    args.__dict__.update(vars(typed))
    args.given = set(vars(typed))
    return args


def input_file(args, key):
    """The file a flag names (--from-metadata, --decode-latents, --resume), which must exist and not be a folder."""
    return H.given_file(getattr(args, key), flag(key), {
        "from_metadata": "the .json written beside a video, or the video",
        "decode_latents": "the .latents.safetensors file a run left", "resume": "the .partial.safetensors file "
        "an interrupted run left"}[key])


def refuse(args, allowed, why):
    """One sentence for the flags given that a mode does not use."""
    unused = sorted(args.given - allowed)
    if unused:
        raise H.HunyuanVideoError(f"{', '.join(flag(k) for k in unused)}: {why}")


def flag_reference():
    """The flags as a Markdown table (docs/command-line.md holds it; a test keeps the two equal)."""
    rows = ["| flag | what it does |", "| --- | --- |"]
    for a in parser()._actions:
        if not a.option_strings or a.dest == "help":
            continue
        value = "" if a.nargs == 0 else " " + ("|".join(map(str, a.choices)) if a.choices else
                                              a.metavar or a.dest.upper())
        text = (a.help or "").replace("%%", "%").replace("|", "\\|")
        rows.append(f"| `{a.option_strings[0]}{value.replace('|', chr(92) + '|')}` | {text} |")
    return "\n".join(rows) + "\n"


def typed_settings(args, saved=None):
    """The settings the flags typed give, by name: each setting's own flag, the size from --resolution (or --quality
    and --aspect-ratio, for the model the flags or the saved settings name), the quantization from --quantize, the
    LoRAs from --lora."""
    s = {k: getattr(args, k) for k in H.SETTINGS if k in args.given and k not in OWN_FLAGS}
    if set(SIZE_FLAGS) & args.given:
        if args.resolution and len(args.resolution) > 2:
            raise H.HunyuanVideoError("{resolution} takes HEIGHT WIDTH, or one number (the height).")
        h, w = quality_sizes(args, saved)[args.aspect_ratio]
        if args.resolution:
            ar_w, ar_h = (int(n) for n in args.aspect_ratio.split(":"))
            h = args.resolution[0]
            w = args.resolution[1] if len(args.resolution) == 2 else int(round(h * ar_w / ar_h / 16)) * 16
        s.update(height=h, width=w)
    if "quantize" in args.given:
        if "quantization" in args.given and QUANTIZE_BITS[args.quantize] != args.quantization:
            raise H.HunyuanVideoError(f"--quantize {args.quantize} and --quantization {args.quantization} disagree: "
                                      f"give one of them.")
        s["quantization"] = QUANTIZE_BITS[args.quantize]
    if args.lora:
        s["loras"] = [H.parse_lora(text) for text in args.lora]
    return s


def resolve(args, notes=None):
    """The request the flags (and --from-metadata's file) give, checked: an H.Request, or HunyuanVideoError. Flags
    typed beside --from-metadata win over its settings; a saved setting that no longer applies with them (the saved
    settings pass alone, and a refusal names it: Radial's settings under --attention dense, TaylorSeer's under
    --cache teacache, dense steps beyond fewer --steps) is left out, with a line in notes (a list)."""
    s = read_metadata(input_file(args, "from_metadata")) if args.from_metadata else {}
    typed = typed_settings(args, s)
    if "prompt" in typed or "original_prompt" not in s:  # a new prompt: rewritten (if asked) afresh
        s["original_prompt"] = None
    elif "rewrite" in typed and s.get("original_prompt"):  # an earlier run's prompt, rewritten in the mode asked now
        s["prompt"], s["original_prompt"] = s["original_prompt"], None
    while True:
        try:
            return H.check_request({**s, **typed})
        except H.HunyuanVideoError as e:
            saved = [k for k in e.settings if k in s and k not in typed and s[k] is not None]
            if not saved or not args.from_metadata or not valid(s):  # not the typed flags' doing
                raise
            said = ", ".join(f"{FLAGS[k]} {s[k]}" for k in saved)
            (notes if notes is not None else []).append(f"--from-metadata: left out {said} (saved): "
                                                        f"{e.sentence(FLAGS)}")
            s.update(dict.fromkeys(saved))


def valid(settings):
    """Whether settings make a request that passes its check."""
    try:
        H.check_request(settings)
    except H.HunyuanVideoError:
        return False
    return True


def read_metadata(path):
    """The settings an earlier generation recorded, from its JSON sidecar or its mp4's comment tag, by name, each of
    its setting's kind."""
    import subprocess

    try:
        if path.suffix == ".mp4":
            import imageio_ffmpeg

            out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata",
                                  "-"], capture_output=True, text=True).stdout
            m = re.search(r"^comment=(.*?)(?<!\\)$", out, re.M | re.S)  # ffmetadata escapes = ; # \ and newlines
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
    settings = {k: v for k, v in data.items() if k in H.SETTINGS and k not in H.UNSAVED}
    for k, v in settings.items():
        try:
            H.check_kind(k, v)
        except H.HunyuanVideoError as e:
            raise H.HunyuanVideoError(f"{path}: {e.text[:-1]}: correct the file, or give the flag to override it.")
    return settings


def sidecar(request, work=None):
    """What a video records of its request (the JSON sidecar, the mp4's metadata, the checkpoint): its settings by
    name, this version, and the DiT's work ledger."""
    out = {k: v for k, v in request._asdict().items() if k not in H.UNSAVED}
    out["version"] = H.__version__
    if work is not None:
        out["work"] = {k: v for k, v in work.items() if k != "cache"}
    return out


def describe(plan, seed=True):
    """The line that tells what a planned run will do (seed: with its seed)."""
    r = plan.request
    return (f"height {r.height}, width {r.width}, {r.frames} frames, {r.steps} steps"
            + (f", seed {r.seed}" if seed else "") + f", model {r.model}"
            + (f", transformer {r.transformer}" if r.transformer else "")
            + (f", cache {r.cache}" if r.cache else "")
            + (", Radial Attention" if r.attention == "radial" else "")
            + (f", true CFG {r.cfg_scale} ({plan.cfg})" if plan.cfg else "")
            + "".join(f", LoRA {Path(f).name} x{s:g}" for f, s in r.loras)
            + (f", video {r.video} at strength {r.strength:g}" if r.video else "")
            + (f", image {r.image}" if r.image else "")
            + (f", the prompt rewritten first ({r.rewrite})" if r.rewrite and not r.original_prompt else ""))


def load_pipeline(settings, args):
    """The pipeline of a request's (or a saved run's) loading settings, by name."""
    loading = {k: v for k, v in settings.items() if k in H.LOADING and k not in ("model", "preset", "low_memory")}
    return H.HunyuanVideoPipeline.from_pretrained(settings["model"], prompt_cache=not args.no_prompt_cache,
                                                  low_memory=args.low_memory, **loading)


# A run, as a stream: the pipeline's events passed on, the lines it tells (Said), and last its Outcome: the exit code;
# the message (an error, or how to resume); the files written; the settings; the pipeline; seconds; and, when it
# stopped after a step, (the step, its checkpoint file).
Said = namedtuple("Said", "text")
Outcome = namedtuple("Outcome", "code message files settings pipe seconds stopped",
                     defaults=((), None, None, 0.0, None))


def stream(args, names=FLAGS, load=None, progress=None):
    """One run of the command line from parsed flags (a generation, a resumed one, or a decode of saved latents): the
    pipeline's events, Said lines, and last an Outcome. Between events it writes what the run keeps: the checkpoint
    (every --checkpoint-every seconds of denoising, and when the run stops), the preview, the latents before the
    decode, the video and its files. Leaving the loop (closing the stream) stops the run after the current step with
    its checkpoint saved; a KeyboardInterrupt raised inside (or thrown in) does the same, and the Outcome says how to
    resume. names: how its messages name the settings (FLAGS; the page: its fields). load(settings, args): the
    pipeline (load_pipeline by default; the page keeps one). progress(what, done, total): each activity."""
    t0 = time.perf_counter()
    latents_file, phase, checkpoint, events, settings, pipe, claim = None, "loading", None, None, {}, None, None
    ranks = H.world()  # started by mlx.launch: every rank runs this; rank 0 alone speaks and writes
    lead = ranks is None or ranks.group.rank() == 0
    try:
        if not 0 <= args.checkpoint_every < math.inf:
            raise H.HunyuanVideoError(f"--checkpoint-every {args.checkpoint_every}: use a number of seconds, 0 or "
                                      f"more (0: after every step).")
        if args.decode_latents:
            if args.from_metadata:
                raise H.HunyuanVideoError("--decode-latents and --from-metadata: give one of them.")
            out, settings, latents = decode_saved(args)
        elif args.resume:
            out, request, resume = read_checkpoint(args, ranks)
        else:
            notes, resume = [], None
            request = resolve(args, notes)
            for note in notes:
                yield Said(note)
            out = Path(args.output or f"outputs/{time.strftime('%Y%m%d-%H%M%S')}_{request.seed}.mp4")
        if out.suffix != ".mp4":
            raise H.HunyuanVideoError(f"--output {out}: the video is an mp4; end the name with .mp4.")
        if lead:
            claim = claim_output(out)  # before the checks: no other run writes these names between them and us
            new_latents = check_outputs(out, args, latents=not args.decode_latents)
        pipe = (load or load_pipeline)(settings if args.decode_latents else request._asdict(), args)
        if args.decode_latents:
            phase = "decoding"
            frames = pipe.decode(latents, progress=progress)
        else:
            if resume and resume.get("moved_from") and (pipe.hub or pipe.transformer_hub or not resume["dit"] or
                                                        dit_fingerprint(pipe.transformer_path) != resume["dit"]):
                raise H.HunyuanVideoError(f"--model {args.model} is not the model this run started with "
                                          f"({resume['moved_from']}): its DiT differs; leave --model out, or give the "
                                          f"folder where that checkpoint now is.")
            if pipe.image_condition() == "latent_concat":
                yield Said(f"this checkpoint's video leaves out its first 4 frames, as the reference's: "
                           f"{request.frames - 4} frames")
            checkpoint = Checkpoint(out, pipe, args.checkpoint_every, resume, lead)
            events = pipe.generate(request, resume=resume, progress=progress)
            for event in events:
                if isinstance(event, H.Plan):
                    yield Said(describe(event))
                    if event.problem is not None and event.request.force:
                        warnings.warn(H.HunyuanVideoWarning(event.problem.text + " ({force}: running anyway)"))
                    elif event.problem is None:
                        each = f" (on each of {ranks.size} ranks)" if ranks is not None else ""
                        yield Said(f"memory plan{each}: " + ", ".join(f"{k} {H.gib(v)}" for k, v in
                                                                       event.memory.items()))
                    if resume:
                        yield Said(f"resuming after step {resume['step']} of {request.steps}")
                    rewriting = event.request.rewrite and not event.request.original_prompt and not resume
                    phase = "denoising" if resume else "rewriting the prompt" if rewriting else "encoding the prompt"
                    checkpoint.request = event.request
                elif isinstance(event, H.Rewritten):
                    r = event.request
                    yield Said(f"the prompt, rewritten ({r.rewrite}, {r.rewrite_model or H.REWRITE_MODEL}"
                               f"{'; kept from an earlier rewrite' if event.cached else ''}): {r.prompt}")
                    phase, checkpoint.request = "encoding the prompt", r
                elif isinstance(event, H.Encoded):
                    if event.cached:
                        yield Said("the prompt's encoding comes from the prompt cache (--no-prompt-cache runs the text "
                                   "encoders)")
                    phase, checkpoint.text = "denoising", event.text
                elif isinstance(event, H.Step):
                    checkpoint.after(event)
                    if args.preview and lead:
                        write_preview(out, event.x0)
                elif isinstance(event, H.Denoised):  # the expensive part: kept until the video is safely written
                    settings = sidecar(event.request, event.work)
                    if not lead:  # the other ranks still decode their share of the tiles
                        phase = "decoding"
                        yield event
                        continue
                    latents_file = new_latents
                    H.write_atomic(latents_file, lambda tmp: mx.save_safetensors(
                        str(tmp), {"latents": event.latents}, metadata={"settings": json.dumps(settings)}))
                    checkpoint.path.unlink(missing_ok=True)  # the latents file now holds all of it
                    phase = "decoding"
                elif isinstance(event, H.Decoded):
                    frames = event.frames
                yield event
        if not lead:
            yield Outcome(0, "", (), settings, pipe, time.perf_counter() - t0)
            return
        write_video(frames, out, settings, settings["fps"])
        files = [out] + write_extras(frames, out, args, settings)
        if latents_file is not None:
            latents_file.unlink()
    except GeneratorExit:  # the caller left the loop: the run stops here, its checkpoint kept
        if events is not None:
            events.close()
        if checkpoint is not None and latents_file is None and ranks is None:
            checkpoint.save()
        raise
    except H.HunyuanVideoError as e:
        if not lead and not isinstance(e, H.RanksLost):  # rank 0 says it (every rank checks the same), unless not
            after_rank_0()
            yield fail(f"error: rank {ranks.group.rank()} on {ranks.host}: {e.sentence(names)}", None, settings)
            return
        yield fail(f"error: {e.sentence(names)}", latents_file, settings, checkpoint=checkpoint)
        return
    except KeyboardInterrupt:
        ending()
        if events is not None:
            events.close()
        if ranks is None and checkpoint is not None and checkpoint.state is not None and latents_file is None:
            checkpoint.save()  # (several ranks cannot gather a checkpoint now: their last one stays, said by fail)
        if checkpoint is not None and checkpoint.saved and latents_file is None and lead:
            yield Outcome(130, f"interrupted after step {checkpoint.saved} of {checkpoint.state.steps}: continue "
                               f"with\n  {command()} --resume {checkpoint.path}", settings=settings,
                          stopped=(checkpoint.saved, checkpoint.path))
            return
        yield fail("interrupted." if lead else "", latents_file, settings, 130, checkpoint if lead else None)
        return
    except Exception as e:
        if ranks is not None and H.DISTRIBUTED_ERROR.search(str(e)):  # between the pipeline's events
            yield fail(f"error: {H.RanksLost().sentence(names)}", latents_file, settings, checkpoint=checkpoint)
            return
        # MLX reports an allocation that failed as a RuntimeError
        text = str(e)
        if isinstance(e, MemoryError) or isinstance(e, RuntimeError) and ("alloc" in text.lower() or
                                                                            "memory" in text.lower()):
            what = (text.splitlines() or [type(e).__name__])[0][:120]
            where = "" if ranks is None else f"rank {ranks.group.rank()} on {ranks.host} "
            yield fail(f"error: {where}ran out of memory while {phase} ({what}): try {names['low_memory']}, "
                       f"{names['quantization']} int8, fewer {names['frames']} or a smaller {names['resolution']}; "
                       f"close other programs, or set HUNYUAN_APPLE_MEMORY_GB to what this machine can really give so "
                       f"that the memory plan refuses what will not fit.", latents_file, settings)
            return
        if latents_file is None:  # after denoising, never lose the latents to an unexpected failure
            raise
        yield fail(f"error: {type(e).__name__}: {e}", latents_file, settings)
        return
    finally:
        if claim is not None:
            claim.release()
    yield Outcome(0, "", files, settings, pipe, time.perf_counter() - t0)


def after_rank_0(seconds=10):
    """A rank other than 0 that refuses the request waits before it says so: rank 0 checks the same, says it and
    ends, and mlx.launch then ends this rank, quietly (were this rank to end first, mlx.launch would end rank 0
    before it spoke). A refusal still standing after the wait is this rank's own (a file missing on its host)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(seconds)


class claim_output:
    """This run's claim on an output and the files named after it (its latents, checkpoint, sidecar, preview): a
    lock on a hidden file beside it (.NAME.claim), held until the run ends and released by the system if the process
    dies. Another run's claim on the same output is refused in one sentence: two runs never write one video."""

    def __init__(self, out):
        import fcntl

        self.path = out.with_name(f".{out.name}.claim")
        while True:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a+")
            except OSError as e:
                raise H.HunyuanVideoError(f"cannot write to {out.parent} ({e.strerror}): choose another "
                                          f"--output.") from None
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.file.close()
                raise H.HunyuanVideoError(f"--output {out}: another run is writing it now; choose another --output, "
                                          f"or wait for that run to end.") from None
            try:  # the file we locked is still the claim (not one a finishing run had just removed)
                if os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino:
                    return
            except FileNotFoundError:
                pass
            self.file.close()

    def release(self):
        self.path.unlink(missing_ok=True)  # while still locked: a run that opened it now finds it gone and retries
        self.file.close()


def run(args, progress=None, say=None):
    """stream's run to its end: its Outcome (say(text): each Said line). Ctrl-C is thrown into the stream, which
    saves the checkpoint and ends with how to resume."""
    events = stream(args, progress=progress)
    try:
        for event in events:
            try:
                if isinstance(event, Said) and say:
                    say(event.text)
                elif isinstance(event, Outcome):
                    return event
            except KeyboardInterrupt:  # between events: the stream stops as it would inside
                return events.throw(KeyboardInterrupt)
    except KeyboardInterrupt:  # while the stream ran (or wrote): it has already ended
        return Outcome(130, "interrupted.")
    finally:
        events.close()


def main(argv=None):
    bar = Progress()
    warnings.showwarning = lambda message, *_, **__: bar.close() or print(
        f"warning: {message.sentence(FLAGS) if isinstance(message, H.HunyuanVideoWarning) else message}",
        file=sys.stderr)
    ranks = H.world()
    if ranks is not None and ranks.group.rank():  # argparse's refusals (and --help) are rank 0's to say
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            try:
                args = parse_args(argv)
            except SystemExit as e:
                if e.code:
                    after_rank_0()
                raise
    else:
        args = parse_args(argv)
    if ranks is not None:  # several ranks (mlx.launch): rank 0 speaks; one that mlx.launch stops says why
        signal.signal(signal.SIGTERM, stopped)
        if ranks.group.rank():
            warnings.simplefilter("ignore")
            done = run(args)
            if done.message:
                print(done.message, file=sys.stderr)
            return leave(ranks, done.code)
    try:
        done = run(args, bar, lambda text: bar.close() or print(text, file=sys.stderr))
    finally:
        bar.close()
    print(*(summary(done.pipe, done.files, done.seconds) if done.code == 0 else [done.message]), sep="\n",
          file=sys.stdout if done.code == 0 else sys.stderr)
    return leave(ranks, done.code)


def stopped(*_):
    """SIGTERM on a rank of several: mlx.launch ends it, as another rank has ended; the run stops as if that rank
    were lost."""
    ending()
    raise H.RanksLost()


def ending():
    """A rank of several whose run has failed: mlx.launch's SIGTERM, sent as the other ranks end, no longer interrupts
    it while it says why and keeps its checkpoint (it leaves right after)."""
    if signal.getsignal(signal.SIGTERM) is stopped:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def leave(ranks, code):
    """The exit code; a rank of several that failed leaves at once: MLX's group, torn down as Python exits, can wait
    on the other ranks, which may wait in a collective for this one (the system's closing of its connections tells
    them at once)."""
    if ranks is not None and code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def command():
    """How the user ran this: the installed command, or the script with the interpreter running it."""
    return f"{sys.executable} {sys.argv[0]}" if sys.argv[0].endswith("hunyuan_apple.py") else "hunyuan-apple"


def fail(message, latents_file, settings, code=2, checkpoint=None):
    """The Outcome of a run that failed: the message, and how to go on from what it kept."""
    ending()
    lines, stopped = [message], None
    if latents_file is None and checkpoint is not None and checkpoint.saved and checkpoint.path.exists():
        lines.append(f"the run can go on from step {checkpoint.saved}: {command()} --resume {checkpoint.path}")
        stopped = (checkpoint.saved, checkpoint.path)
    if latents_file is not None and latents_file.exists():
        lines.append(f"the denoised latents are saved in {latents_file}: decode them with\n"
                     f"  {command()} --decode-latents {latents_file}")
    return Outcome(code, "\n".join(lines), settings=settings, stopped=stopped)


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
    """A step's clean-latent estimate -> up to 8 of its frames side by side, at the latents' size (1/8 of the
    video's; 1.5's 1/16), uint8 (h, k w, 3): what --preview writes and the page shows."""
    t = x0.shape[1]
    chosen = mx.array(np.linspace(0, t - 1, min(t, 8)).round().astype(np.int32))  # only those frames are mapped
    return np.concatenate(list(H.latent_preview(x0[:, chosen])), axis=1)  # (h, k w, 3)


def write_preview(out, x0):
    """--preview: after each step, the preview strip, written under a temporary name and renamed."""
    from PIL import Image

    strip = preview_strip(x0)
    H.write_atomic(preview_file(out), lambda tmp: save_png(Image.fromarray(strip), tmp))


def partial_file(out):
    """The checkpoint an unfinished generation keeps beside its output, for --resume."""
    return out.with_name(out.stem + ".partial.safetensors")


class Checkpoint:
    """What --resume needs, saved beside the output atomically, after a step at most every `every` seconds and once
    more when the run stops: the latents after the last step done, the step, the step cache's state and the work so
    far (the last Step event), the text encoders' outputs (the Encoded event's) and the request (a few MB,
    milliseconds next to a step). Over several ranks every rank calls it, rank 0's clock decides when, every rank's
    step-cache state is gathered (pipe.shared_cache_state) and rank 0 (lead) writes the file."""

    def __init__(self, out, pipe, every, resume=None, lead=True):
        self.out, self.path, self.pipe, self.every, self.lead = out, partial_file(out), pipe, every, lead
        self.request, self.text = None, resume and resume["text"]  # set from the stream's events
        self.state, self.saved, self.last, self.dit = None, 0, time.monotonic(), None

    def after(self, step):
        """A Step event: kept, and saved if `every` seconds have passed since the last save."""
        self.state = step
        due = time.monotonic() - self.last >= self.every
        if self.pipe.ranks is not None:  # rank 0's clock, so that every rank gathers at the same step
            due = self.pipe.ranks.exchange(b"1" if due else b"0")[0] == b"1"
        if due:
            self.save()

    def save(self):
        if self.state is None or self.saved == self.state.step:
            return
        arrays, numbers = self.pipe.shared_cache_state(self.state.cache)
        if not self.lead:
            self.saved = self.state.step
            return
        tensors = {"latents": self.state.latents, **dict(zip(("text_states", "text_mask", "pooled"), self.text)),
                   **{f"cache.{k}": v for k, v in arrays.items()}}
        self.dit = self.dit or dit_fingerprint(self.pipe.transformer_path)  # the DiT is on disk by now
        metadata = {"output": str(self.out.resolve()), "step": str(self.state.step), "dit": self.dit,
                    "settings": json.dumps(sidecar(self.request)), "cache": json.dumps(numbers),
                    "work": json.dumps(self.state.work)}
        H.write_atomic(self.path, lambda tmp: mx.save_safetensors(str(tmp), tensors, metadata=metadata))
        self.saved, self.last = self.state.step, time.monotonic()


def read_checkpoint(args, ranks=None):
    """--resume FILE: (output, request, resume state for generate). Settings given as flags too must agree with the
    file's; flags that only start a generation are refused. Over several ranks, rank 0 reads the file (it wrote it)
    and sends it to the others."""
    path = input_file(args, "resume") if ranks is None or ranks.group.rank() == 0 else None
    copy = None
    if ranks is not None:
        import tempfile

        data = ranks.exchange(path.read_bytes() if path else b"")[0]
        if path is None:  # read from a copy, removed once read
            copy = path = Path(tempfile.mkdtemp()) / Path(args.resume).name
            path.write_bytes(data)
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
        mx.eval(tensors)
        settings, step = json.loads(meta["settings"]), int(meta["step"])
        resume = dict(step=step, work=json.loads(meta["work"]), dit=meta.get("dit"), cache=(
            {k[6:]: v for k, v in tensors.items() if k.startswith("cache.")}, json.loads(meta["cache"])),
            text=(tensors["text_states"], tensors["text_mask"], tensors["pooled"]), latents=tensors["latents"])
    except Exception as e:
        raise H.HunyuanVideoError(f"{args.resume} is not a checkpoint hunyuan_apple can resume ({type(e).__name__}): "
                                  f"pass the .partial.safetensors an interrupted run left, or start afresh (with "
                                  f"--overwrite if its output's names are taken).") from None
    finally:
        if copy is not None:
            shutil.rmtree(copy.parent)
    typed = typed_settings(args, settings)
    differ = [k for k in typed if k not in ("model", *H.UNSAVED) and typed[k] != settings.get(k)]
    if differ:
        said = ", ".join(f"{FLAGS[k]} {typed[k]} (the checkpoint: {settings.get(k)})" for k in differ)
        raise H.HunyuanVideoError(f"{said}: a resumed run keeps the settings it started with; leave the flag out, or "
                                  f"start afresh.")
    refuse(args, RESUME_FLAGS | H.SETTINGS.keys() | set(SIZE_FLAGS) | {"lora", "quantize"},
           "--resume continues the run as it was; leave these out.")
    if "model" in args.given and args.model != settings["model"]:  # a moved copy of the checkpoint (stream checks it)
        settings["model"], resume["moved_from"] = args.model, settings["model"]
    request = H.check_request({k: v for k, v in settings.items() if k in H.SETTINGS} | {
        k: getattr(args, k) for k in H.UNSAVED if k in args.given})
    return Path(meta["output"]), request, resume


def decode_saved(args):
    """--decode-latents: the VAE phase alone, from latents an earlier run saved: (output, settings, latents).
    --model, --vae-dtype and --fps given now replace the recorded ones; flags that only a generation uses are
    refused."""
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


def dit_fingerprint(path):
    """What tells one DiT from another, read quickly: its weight files' names and sizes and their first MiB."""
    import hashlib

    h = hashlib.sha256()
    for f in H._component_files(path, "pass the DiT's files")[0]:
        with open(f, "rb") as opened:
            h.update(f"{f.name} {f.stat().st_size}".encode() + opened.read(2 ** 20))
    return h.hexdigest()


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
        if work.get("ranks", 1) > 1:
            lines.append(f"  split over {work['ranks']} ranks: each received {H.gib(work['received_bytes'])} of keys, "
                         f"values and velocities")
    return lines + [f"  wrote {f}" for f in files]


if __name__ == "__main__":
    sys.exit(main())

"""HunyuanVideo on MLX: the web page (Gradio), on this machine.

    pip install ".[ui]"
    hunyuan-apple-ui                                  # then open http://127.0.0.1:7860
    hunyuan-apple-ui --models ~/models --outputs ~/videos --model tiny

The page is the command line with a form in front of it: each generation is the command line's own run (the
same checks, files and messages; hunyuan_apple.run), with the form's settings as its flags. It adds no model
logic. One generation runs at a time; the others wait in the queue. The pipeline stays loaded between
generations of the same model (and the prompt cache serves a prompt seen before).

Safe by default: it listens on 127.0.0.1 only; --listen opens it to the network, with --auth asking for a
login. A path typed into the page (a model's folder, a LoRA) must lie in the --models folder; videos are
written to and read from the --outputs folder.
"""

import argparse
import html
import inspect
import json
import os
import re
import sys
import threading
import time
import warnings
from collections import namedtuple
from pathlib import Path

import HunyuanVideo_Apple as H
import hunyuan_apple as C

NONE = "none"  # the dropdowns' "no rewrite / preset / quantization / cache"
# the hub's checkpoints that presets name alone (HunyuanVideo 1.5's, each with its own settings), after the default
HUB_MODELS = list(dict.fromkeys(p["model"] for p in H.PRESETS.values() if "transformer" not in p and
                                p["model"] != H.DEFAULT_MODEL))
PREVIEW = "Preview: what the current step predicts"
# "model default": the checkpoint's (540p for 13B's, 1.5's own), or the tiny demos' 96 x 160; a quality the model is
# not made at is refused with the model's
SIZES = ["model default", *C.QUALITIES, "custom"]
# The form's fields. Most are the module's settings (HunyuanVideo_Apple.SETTINGS), one field each, made from its
# table: a choice is a dropdown, a yes-or-no a box, a number a text box (left empty: the default applies). The page
# lays out its own: the prompts and the model, the size (SIZE_FIELDS), the seed, the LoRAs and the files, read from
# its folders; it has no field for the paths it does not let a page read (the transformer, the rewrite model: the
# server's --rewrite-model) nor for what a run records (original_prompt).
OWN = ("prompt", "negative_prompt", "model", "height", "width", "seed", "loras", "image", "video", "strength",
       "transformer", "rewrite_model", "original_prompt")
SETTING_FIELDS = tuple(k for k in H.SETTINGS if k not in OWN)
MAIN = ("rewrite", "preset", "frames", "steps", "guidance", "cfg_scale", "shift", "quantization", "cache",
        "cache_threshold", "low_memory", "force")  # the settings in view; the rest under "More settings"
# the fields in the order the handlers take them (and gradio_client names them)
FIELDS = ("prompt", "negative_prompt", "model", "size", "aspect_ratio", "height", "width", "random_seed", "seed",
          "loras", "lora_files", "lora_scales", "image", "video", "strength", *SETTING_FIELDS)
# how the page names the settings in its messages: by their fields' labels
PAGE_NAMES = {**{k: s.label for k, s in H.SETTINGS.items() if s.label}, "resolution": "the custom size",
              "height": "the height", "width": "the width", "loras": "the LoRAs"}
Folders = namedtuple("Folders", "models outputs uploads")
NUMBERS = tuple(k for k in SETTING_FIELDS if H.SETTINGS[k].kind in (int, float))  # text boxes that show a default


def default_value(name):
    """A setting's field as the page opens: its choice ("none" for no choice), its box, or empty text."""
    s = H.SETTINGS[name]
    if s.kind is bool:
        return bool(s.default)
    if isinstance(s.kind, tuple):
        return NONE if s.default is None else s.default
    return ""


# ------------------------------------------------------------------------------------------------------------
# The form's settings -> the command line's flags. Paths are checked here: the page reads only what lies in the
# models folder, the outputs folder, or Gradio's folder of files uploaded through the page.

class Refused(Exception):
    """A setting the page does not take; its message is one sentence."""


def confined(path, folders, what, fix="put it in the models folder, or upload it", named=None):
    """path, resolved, if it lies in one of the folders; else Refused, saying how to fix it and naming the path as
    the page named it (named), never by the server's own folders: the page may be served to other machines."""
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(f) for f in folders):
        raise Refused(f"{what} {named or path} lies outside the folders this page reads: {fix}.")
    return resolved


def model_argument(name, folders):
    """The --model for a model named in the page: a demo, a folder in the models folder, or a hub id."""
    name = (name or "").strip()
    if name in H.TINY_MODELS:
        return name
    local = folders.models / name
    if name and local.exists():
        return str(confined(local, [folders.models], "the model", "put the model's folder in the models folder", name))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).expanduser().exists():
        return name  # a hub id
    raise Refused(f"the model {name!r} is neither a folder in the models folder, a hub id (owner/name) nor "
                  f"{' or '.join(H.TINY_MODELS)}: choose one of the list.")


def flags(v, folders, rewrite_model=None):
    """The form's values (a dict by FIELDS) -> the command line's flags. Empty fields are left out, so that
    the command line's defaults (and the tiny demo's sizes) apply. rewrite_model: the server's --rewrite-model."""
    argv = ["--prompt", v["prompt"] or "", "--model", model_argument(v["model"], folders)]
    if v.get("rewrite") not in (None, NONE) and rewrite_model:
        argv += ["--rewrite-model", rewrite_model]
    if v["negative_prompt"]:
        argv += ["--negative-prompt", v["negative_prompt"]]
    if v["size"] in C.QUALITIES:
        argv += ["--quality", v["size"], "--aspect-ratio", v["aspect_ratio"]]
    elif v["size"] == "custom":
        if v["height"] is None or v["width"] is None:
            raise Refused("a custom size needs a height and a width (multiples of 16).")
        argv += ["--resolution", str(int(v["height"])), str(int(v["width"]))]
    for key in SETTING_FIELDS:
        kind, value = H.SETTINGS[key].kind, v.get(key, default_value(key))
        if kind is bool:
            argv += [C.FLAGS[key]] * bool(value)
        elif isinstance(kind, tuple):
            argv += [C.FLAGS[key], value] if value not in (None, NONE) else []
        elif str(value if value is not None else "").strip():
            text = str(value).strip()
            try:
                kind(text)
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                raise Refused(f"{PAGE_NAMES[key]} {text!r}: type {what}, or leave it empty for the "
                              f"default.") from None
            argv += [C.FLAGS[key], text]
    if not v["random_seed"] and v["seed"] is not None:
        argv += ["--seed", str(int(v["seed"]))]
    files = [confined(folders.models / f, [folders.models], "the LoRA", named=f) for f in v["loras"] or ()] + \
            [confined(f, list(folders), "the LoRA") for f in v["lora_files"] or ()]
    scales = [s for s in re.split(r"[,\s]+", v["lora_scales"] or "") if s]
    if len(scales) > len(files):
        raise Refused(f"{len(scales)} LoRA scales for {len(files)} LoRA file{'s' * (len(files) != 1)}: give one "
                      f"scale a LoRA (1 when left out).")
    for f, scale in zip(files, scales + ["1"] * (len(files) - len(scales))):
        argv += ["--lora", f"{f}:{scale}"]
    if v["image"]:
        argv += ["--image", str(confined(v["image"], list(folders), "the image"))]
    if v["video"]:
        argv += ["--video", str(confined(v["video"], list(folders), "the video")), "--strength", str(v["strength"])]
    return argv


def parse(argv):
    """The command line's parse_args, with its complaint as Refused instead of an exit."""
    try:
        return C.parse_args(argv)
    except SystemExit:
        raise Refused(f"the settings do not make a valid command line: {' '.join(argv)}") from None


# ------------------------------------------------------------------------------------------------------------
# A generation: the command line's run in a thread, followed by the page. Its progress, preview and messages
# are kept here for the page to show; one runs at a time.

# where a thread's warnings go: the job's log (its run), the plan (its checks), else the server's stderr
heard = threading.local()


def show_warning(message, *_, **__):
    text = message.sentence(PAGE_NAMES) if isinstance(message, H.HunyuanVideoWarning) else str(message)
    lines = getattr(heard, "lines", None)
    if lines is None:
        print(f"warning: {text}", file=sys.stderr)
    else:
        lines.append(f"warning: {text}")


class Job:
    """One run of the command line's stream, on a thread of its own: a loop over its events that keeps what the page
    shows (each activity's count and times, the latest step's preview strip, the lines it tells, the outcome).
    stop (an Event) ends the run after the current step: the loop is left, the stream closed, its checkpoint kept."""

    def __init__(self, argv, session, load):
        self.argv, self.session, self.load = argv, session, load
        self.phases, self.strip, self.lines, self.outcome = {}, None, [], None
        self.step, self.rewritten = None, None  # the latest Step (its preview is self.strip); the prompt rewritten
        self.stop, self.thread = threading.Event(), threading.Thread(target=self._run, daemon=True)

    def progress(self, what, done, total):
        now = time.perf_counter()
        start = now if done == 0 or what not in self.phases else self.phases[what][2]
        self.phases[what] = (done, total, start, now)

    def _run(self):
        heard.lines = self.lines  # this thread's warnings go to the job's log
        try:
            args = parse(self.argv)
            events = C.stream(args, PAGE_NAMES, self.load, self.progress)
            try:
                for event in events:
                    if isinstance(event, C.Said):
                        self.lines.append(event.text)
                    elif isinstance(event, H.Rewritten):
                        self.rewritten = event.request.prompt
                    elif isinstance(event, H.Step):  # made here: a few milliseconds, on the thread of its arrays
                        self.strip, self.step = C.preview_strip(event.x0), event
                    elif isinstance(event, C.Outcome):
                        self.outcome = event
                    if self.stop.is_set() and self.outcome is None:
                        break  # cancelled: the stream is closed below, which saves its checkpoint
            finally:
                events.close()
            if self.outcome is None:  # left after a step: its checkpoint continues it
                path = C.partial_file(Path(args.output)) if args.output else Path(args.resume)
                step = self.step
                self.outcome = C.Outcome(130, "" if step else "error: cancelled before the first step.",
                                         settings={"steps": step and step.steps}, stopped=step and (step.step, path))
        except Refused as e:
            self.outcome = C.Outcome(2, f"error: {e}")
        except Exception as e:  # the page keeps serving; the message says what broke
            self.outcome = C.Outcome(1, f"error: {type(e).__name__}: {e}")

    def progress_html(self):
        """One bar an activity: its count, seconds a unit and the time left."""
        rows = []
        for what, (done, total, start, now) in self.phases.items():
            per = (now - start) / done if done else 0.0
            unit = C.Progress.UNITS.get(what, "")
            rate = f", {per:.2f} s/{unit}" if unit and done else ""
            rows.append(f'<div class="phase"><span>{html.escape(what)}</span> <progress value="{done}" '
                        f'max="{max(total, 1)}"></progress> {done}/{total}{rate}, {per * (total - done):.0f} s left'
                        f'</div>')
        return '<div id="phases">' + "".join(rows) + "</div>"


class Page:
    """The page's state on the server: its folders, the one pipeline it keeps loaded, the running job."""

    def __init__(self, folders, model, rewrite_model=None, shown=None):
        self.folders, self.model, self.rewrite_model = folders, model, rewrite_model
        self.shown = shown or (folders.models, folders.outputs)  # the folders as the page names them: as given
        self.lock, self.job = threading.Lock(), None
        self.waiting = []  # (session, Event): the requests waiting for their turn; the Event removes one
        self.pipe_key, self.pipe = None, None

    def load(self, settings, args):
        """The command line's load_pipeline, kept while the model and what loading it takes are the same."""
        key = (repr(sorted((k, settings.get(k)) for k in H.LOADING)), args.low_memory)
        if key != self.pipe_key:
            self.pipe_key, self.pipe = None, None  # the old one goes first
            self.pipe, self.pipe_key = C.load_pipeline(settings, args), key
        return self.pipe

    def output(self, seed):
        """A new mp4's name in the outputs folder: the command line's <time>_<seed>, never one already there."""
        base = f"{time.strftime('%Y%m%d-%H%M%S')}_{seed}"
        for n in range(1000):
            out = self.folders.outputs / (base + (f"-{n}" if n else "") + ".mp4")
            if not any(f.exists() for f in (out, out.with_suffix(".json"), C.partial_file(out))):
                return out
        raise Refused(f"the outputs folder has too many videos named {base}: wait a second.")

    def plan(self, v):
        """The plan shown above the Generate button: (what the run will be and whether it fits, or what to change,
        in a sentence; the checked request, or None)."""
        heard.lines = said = []  # the warnings the settings raise (a small image, a high guidance), shown too
        try:
            args = parse(flags(v, self.folders, self.rewrite_model))
            if not args.prompt:
                args.prompt = "x"  # the plan does not depend on the words
            request = C.resolve(args)
            request = H.check_request(request, self.load(request._asdict(), args))
            p = self.pipe.plan(request)
        except (Refused, H.HunyuanVideoError) as e:
            return (f"**Check the settings**: {e.sentence(PAGE_NAMES) if isinstance(e, H.HunyuanVideoError) else e}",
                    None)
        finally:
            heard.lines = None
        if p.problem:
            return f"**Will not fit**: {p.problem.sentence(PAGE_NAMES)}", request
        return (f"**Plan**: {C.describe(p, seed=not v['random_seed'] and v['seed'] is not None)}. Memory, each "
                f"phase's peak: " + ", ".join(f"{k} {H.gib(v)}" for k, v in p.memory.items()) +
                f" of {H.gib(H.available_memory())} available: it fits." +
                "".join(f"\n\n**Warning**: {w.removeprefix('warning: ')}" for w in said)), request

    def start(self, argv, session):
        self.job = Job(argv, session, self.load)
        self.job.thread.start()
        return self.job

    def follow(self, argv, session, outputs):
        """The generator behind Generate and Resume: waits its turn (saying so, and for what; Cancel removes it
        from the queue), runs the job, and yields the page's updates (progress and preview twice a second, then
        the outcome)."""
        import gradio as gr

        cleared = {outputs["preview"]: gr.update(value=None, label=PREVIEW), outputs["rewritten"]: gr.skip()}
        removed = threading.Event()
        entry = (session, removed)
        self.waiting.append(entry)
        try:
            # one generation at a time, in the order asked: the first waiting takes the lock when it is free
            while not (self.waiting[0] is entry and self.lock.acquire(timeout=0.5)):
                if self.waiting[0] is not entry:
                    removed.wait(0.5)
                if removed.is_set():
                    yield {outputs["message"]: "Removed from the queue: it did not run."}
                    return
                running = self.job
                doing = next((f"{what} {done}/{total}" for what, (done, total, *_) in
                              reversed(list(running.phases.items()))), "starting") if running else "starting"
                yield {**cleared, outputs["progress"]: "", outputs["message"]: (
                    f"Waiting: another generation is running ({doing}); this one is number "
                    f"{self.waiting.index(entry) + 1} in the queue and starts when the ones before it end. Cancel "
                    f"removes it from the queue.")}
        finally:
            self.waiting.remove(entry)
        try:
            job = self.start(argv, session)
            yield {**cleared, outputs["message"]: "Running.", outputs["rewritten"]: ""}
            try:
                shown = rewritten = None
                while job.thread.is_alive():
                    job.thread.join(0.5)
                    strip, step = job.strip, job.step
                    yield {outputs["progress"]: job.progress_html(), outputs["log"]: "\n".join(job.lines),
                           outputs["preview"]: gr.skip() if strip is shown else gr.update(
                               value=strip, label=f"{PREVIEW}: step {step.step} of {step.steps}"),
                           outputs["rewritten"]: gr.skip() if job.rewritten is rewritten else job.rewritten}
                    shown, rewritten = strip, job.rewritten
            finally:
                job.stop.set()  # the page went away: stop after the step, the checkpoint kept
                job.thread.join()
        finally:
            self.lock.release()
        yield self.finished(job, outputs)

    def finished(self, job, outputs):
        """The page's last update of a job: the video, its settings and ledger, or the message."""
        import gradio as gr

        done = job.outcome
        log = job.lines + ([done.message] if done.code else [])  # the message whole: how to go on, where said
        out = {outputs["progress"]: job.progress_html(), outputs["log"]: "\n".join(log),
               outputs["gallery"]: gallery(self.folders.outputs), outputs["resume"]: None,
               outputs["checkpoints"]: gr.update(choices=checkpoints_in(self.folders.outputs), value=None),
               outputs["rewritten"]: job.rewritten or ""}
        error = done.message.splitlines()[0].removeprefix("error: ") if done.message else ""
        if done.code == 0:
            video = Path(next(f for f in done.files if str(f).endswith(".mp4")))
            files = [self.named(f) for f in done.files]
            ledger = "```\n" + "\n".join(C.summary(done.pipe, files, done.seconds)) + "\n```"
            return {**out, outputs["video"]: str(video), outputs["ledger"]: ledger,
                    outputs["settings"]: json.loads(video.with_suffix(".json").read_text()),
                    outputs["message"]: f"Done: {video.name}, seed {done.settings['seed']}."}
        if done.stopped:  # cancelled (or failed) after a step: its checkpoint continues it
            step, path = done.stopped
            return {**out, outputs["resume"]: str(path), outputs["video"]: None, outputs["message"]: (
                f"Cancelled after step {step} of {done.settings['steps']}: Resume finishes it." if done.code == 130
                else f"{error} Resume goes on from step {step}.")}
        return {**out, outputs["video"]: None, outputs["message"]: error}

    def named(self, path):
        """A file in the outputs folder as the page names that folder (as given), not by its full path."""
        path = Path(path)
        return Path(self.shown[1]) / path.relative_to(self.folders.outputs) \
            if path.is_relative_to(self.folders.outputs) else path

    def cancel(self, session):
        """Cancel this page's running generation (after the current step), else remove its waiting ones."""
        job = self.job
        if job is not None and job.thread.is_alive() and job.session == session:
            job.stop.set()
            return "Cancelling after the current step..."
        mine = [removed for who, removed in list(self.waiting) if who == session]
        for removed in mine:
            removed.set()
        return "Removing it from the queue..." if mine else "Nothing of this page is running."


# ------------------------------------------------------------------------------------------------------------
# The gallery: earlier videos in the outputs folder, read from their sidecars.

def gallery(outputs):
    """[(mp4, caption)], newest first, for each sidecar whose video is there."""
    items = []
    for sidecar in sorted(outputs.glob("*.json"), key=lambda f: f.stat().st_mtime, reverse=True):
        mp4 = sidecar.with_suffix(".mp4")
        try:
            settings = C.read_metadata(sidecar)
        except H.HunyuanVideoError:
            continue
        if mp4.exists():
            items.append((str(mp4), f"{settings['prompt'][:60]} (seed {settings.get('seed')})"))
    return items


def checkpoints_in(outputs):
    """The checkpoints stopped runs left in the outputs folder, newest first, by name: what Resume can pick."""
    found = sorted(outputs.glob("*.partial.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
    return [f.name for f in found]


def used_values(r):
    """What a checked request r uses for each number the form shows, by setting: its value, or where the field is
    left empty the default the run takes (per model and preset); None where the setting does not apply."""
    radial = H.radial_settings(r) if r.attention == "radial" else {}
    taylor = H.cache_options(r) if r.cache == "taylorseer" else {}
    defaults = {"cache_threshold": H.cache_default(r.cache, r.model, r.steps),
                "rewrite_temperature": 0.0 if r.rewrite else None, **{f"radial_{k}": v for k, v in radial.items()},
                **{f"cache_{k}": v for k, v in taylor.items()}}
    return {k: getattr(r, k) if getattr(r, k) is not None else defaults.get(k) for k in NUMBERS}


def form_values(settings, folders):
    """A video's settings (its sidecar) -> the form's values: "use these settings"."""
    model = settings.get("model", "")
    if Path(model).is_absolute() and Path(model).resolve().is_relative_to(folders.models):
        model = str(Path(model).resolve().relative_to(folders.models))
    prefix = H.PRESETS.get(settings.get("preset"), {}).get("prompt_prefix", "")
    loras = [str(Path(f).resolve().relative_to(folders.models)) for f, _ in settings.get("loras") or ()
             if Path(f).resolve().is_relative_to(folders.models)]
    fields = {}
    for k in SETTING_FIELDS:  # each setting's field as the page opens it when the video left it out
        kind, value = H.SETTINGS[k].kind, settings.get(k)
        fields[k] = default_value(k) if value is None else bool(value) if kind is bool else \
            value if isinstance(kind, tuple) else str(value)
    prompt = settings.get("original_prompt") or settings["prompt"]  # a rewritten prompt: the words typed
    return dict(fields, prompt=prompt.removeprefix(prefix), negative_prompt=settings.get("negative_prompt") or "",
                model=model, size="custom", height=settings.get("height"), width=settings.get("width"),
                random_seed=False, seed=settings.get("seed"), loras=loras,
                lora_scales=", ".join(f"{s:g}" for f, s in settings.get("loras") or ()
                                      if Path(f).resolve().is_relative_to(folders.models)),
                strength=settings.get("strength") or 0.8)


# ------------------------------------------------------------------------------------------------------------
# The page itself.

def models_in(folder):
    """Checkpoint folders (diffusers layout) and LoRA files in the models folder, by their relative names."""
    found = [p for p in sorted(folder.rglob("model_index.json"))][:50]
    loras = [p for p in sorted(folder.rglob("*.safetensors")) if "lora" in p.name.lower()][:200]
    return [str(p.parent.relative_to(folder)) for p in found], [str(p.relative_to(folder)) for p in loras]


def setting_field(name):
    """A setting's field, made from its row of the table (inside a Blocks): a dropdown of its choices ("none" first
    where it has no default), a box, or a text box whose placeholder tells the default."""
    import gradio as gr

    s = H.SETTINGS[name]
    if s.kind is bool:
        return gr.Checkbox(bool(s.default), label=s.label, info=s.help if len(s.help) < 120 else None,
                           elem_id=name, min_width=160)
    if isinstance(s.kind, tuple):
        return gr.Dropdown([NONE] * (s.default is None) + list(s.kind), value=default_value(name), label=s.label,
                           info=s.help if len(s.help) < 120 else None, elem_id=name, min_width=160)
    return gr.Textbox("", label=s.label, placeholder="default" if s.default is None else f"default {s.default}",
                      info=s.help if len(s.help) < 120 else None, elem_id=name, min_width=160)


def build(page):
    """The Gradio Blocks of the page."""
    import gradio as gr

    folders = page.folders
    checkpoints, lora_names = models_in(folders.models)
    with gr.Blocks(title="HunyuanVideo on MLX") as demo:
        gr.Markdown(f"# HunyuanVideo on MLX\nText, image or video to video, on this machine. Videos are saved in "
                    f"`{page.shown[1]}` with their settings, as the command line saves them.")
        f = {}
        with gr.Row():
            with gr.Column(scale=3):
                f["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                         placeholder="a cat walks on the grass, realistic style")
                with gr.Row(equal_height=True):
                    rewritten = gr.Textbox("", label="The prompt as rewritten (the last run's; edit it freely)",
                                           lines=2, elem_id="rewritten", scale=4)
                    use_rewritten = gr.Button("Use it as the prompt", elem_id="use_rewritten", scale=1)
                f["negative_prompt"] = gr.Textbox("", label="Negative prompt (true CFG: two DiT forwards a step)",
                                                  elem_id="negative_prompt")
                with gr.Row():
                    f["model"] = gr.Dropdown([*H.TINY_MODELS, H.DEFAULT_MODEL, *HUB_MODELS, *checkpoints],
                                             value=page.model, label="Model", allow_custom_value=True,
                                             elem_id="model")
                    f["size"] = gr.Dropdown(SIZES, value=SIZES[0], label="Size", elem_id="size")
                    f["aspect_ratio"] = gr.Dropdown(list(H.HunyuanVideoPipeline.buckets["540p"]), value="16:9",
                                                         label="Aspect ratio")
                    f["height"] = gr.Number(544, label="Height (custom)", precision=0, elem_id="height")
                    f["width"] = gr.Number(960, label="Width (custom)", precision=0, elem_id="width")
                with gr.Row():
                    f["seed"] = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                    f["random_seed"] = gr.Checkbox(True, label="Random seed", elem_id="random_seed")
                with gr.Row(equal_height=True):  # the settings in view; left empty, a setting's default applies
                    for key in MAIN:
                        f[key] = setting_field(key)
                with gr.Accordion("More settings", open=False, elem_id="settings_more"):
                    with gr.Row(equal_height=True):
                        for key in SETTING_FIELDS:
                            if key not in MAIN:
                                f[key] = setting_field(key)
                with gr.Accordion("LoRAs, image to video, video to video", open=False, elem_id="more"):
                    with gr.Row():
                        f["loras"] = gr.Dropdown(lora_names, value=[], multiselect=True,
                                                 label=f"LoRAs in {page.shown[0]}")
                        f["lora_files"] = gr.File(file_count="multiple", file_types=[".safetensors"],
                                                  label="or upload LoRAs", elem_id="lora_files")
                        f["lora_scales"] = gr.Textbox("", label="LoRA scales, in order (1 when left out)")
                    with gr.Row():
                        f["image"] = gr.File(label="Image (image to video: an I2V checkpoint)", type="filepath",
                                             file_types=["image"], elem_id="image")
                        f["video"] = gr.File(label="Video (video to video)", type="filepath", file_types=["video"],
                                             elem_id="video")
                        f["strength"] = gr.Slider(0, 1, 0.8, step=0.05, label="Strength (video to video)")
                plan = gr.Markdown(elem_id="plan")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", elem_id="cancel")
                    resume = gr.Button("Resume", elem_id="resume")
                    pick = gr.Dropdown(checkpoints_in(folders.outputs), value=None, label="Resume which (left "
                                       "empty: this page's stopped run)", elem_id="checkpoint", min_width=240,
                                       allow_custom_value=True)  # the list is read anew when a page opens
                message = gr.Markdown(elem_id="message")
            with gr.Column(scale=2):
                progress = gr.HTML(elem_id="progress")
                preview = gr.Image(label=PREVIEW, interactive=False, format="jpeg", height=260,
                                   elem_id="preview")  # JPEG: 10x quicker than PNG
                video = gr.Video(label="Video", interactive=False, elem_id="video_out")
                ledger = gr.Markdown(elem_id="ledger")
                log = gr.Textbox(label="Log", lines=4, interactive=False, elem_id="log")
                settings = gr.JSON(label="Settings", elem_id="settings")
        with gr.Accordion("Earlier videos", open=False, elem_id="earlier"):
            gallery_view = gr.Gallery(gallery(folders.outputs), label=f"In {page.shown[1]}", columns=4,
                                      elem_id="gallery")
            chosen = gr.JSON(label="Its settings", elem_id="chosen")
            use = gr.Button("Use these settings", elem_id="use")
        resume_state = gr.State(None)
        fields = [f[k] for k in FIELDS]
        outputs = dict(progress=progress, preview=preview, video=video, settings=settings, ledger=ledger,
                       message=message, log=log, gallery=gallery_view, resume=resume_state, rewritten=rewritten,
                       checkpoints=pick)

        def values(args):
            return dict(zip(FIELDS, args))

        def on_generate(request: gr.Request, *args):
            v = values(args)
            try:
                argv = flags(v, folders, page.rewrite_model)
                seed = parse(argv).seed
                if seed is None:  # chosen now, for the file's name and to show it
                    seed = int.from_bytes(os.urandom(4), "little") >> 1
                argv += ["--seed", str(seed), "--output", str(page.output(seed))]
            except Refused as e:
                yield {message: str(e)}
                return
            yield from page.follow(argv, request.session_hash, outputs)

        def on_resume(path, picked, request: gr.Request):
            found = folders.outputs / picked if picked else path  # the one picked, else this page's stopped run
            if not found:
                yield {message: "Nothing of this page to resume: a run cancelled here leaves its checkpoint; or pick "
                                "one in the list beside Resume."}
                return
            yield from page.follow(["--resume", str(confined(found, [folders.outputs], "the checkpoint"))],
                                   request.session_hash, outputs)

        # Gradio names an endpoint's parameters after its function's: the API takes the form's fields by name
        on_generate.__signature__ = inspect.Signature(
            [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)] +
            [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f[k].value) for k in FIELDS])
        # one generation at a time; a request waiting for its turn shows its place in the queue by the message
        # (Gradio runs up to 16 at once: those that wait for the page's lock say so, and Cancel removes them)
        gen = dict(outputs=list(outputs.values()), concurrency_id="generation", concurrency_limit=16,
                   show_progress="hidden")
        generate.click(on_generate, fields, api_name="generate", **gen)
        resume.click(on_resume, [resume_state, pick], api_name="resume", **gen)

        def on_cancel(request: gr.Request):
            return page.cancel(request.session_hash)

        cancel.click(on_cancel, None, message, queue=False, api_name="cancel")
        shown = [plan, *(f[k] for k in NUMBERS), f["height"], f["width"]]

        def on_form(*args):
            """The plan, and the values the run will use: each number left empty shows its default for this model
            and preset; the size fields show the size unless it is custom."""
            v = values(args)
            text, request = page.plan(v)
            used = used_values(request) if request else {}
            hints = [gr.update(placeholder="default" if request is None else "not used" if used[k] is None else
                               f"default {used[k]:g}") for k in NUMBERS]
            size = [request.height, request.width] if request and v["size"] != "custom" else [gr.skip()] * 2
            return [text, *hints, *size]

        for key, field in zip(FIELDS, fields):  # the defaults shown follow the fields they depend on; all, the plan
            if key in ("model", "preset", "size", "aspect_ratio", "steps", "cache", "attention", "rewrite", "image",
                       "video"):
                field.change(on_form, fields, shown, queue=False, show_progress="hidden")
            else:
                field.change(lambda *args: page.plan(values(args))[0], fields, plan, queue=False,
                             show_progress="hidden")
        demo.load(on_form, fields, shown, queue=False)
        # what the outputs folder holds now, read whenever a page is opened (not when the server started)
        demo.load(lambda: (gallery(folders.outputs), gr.update(choices=checkpoints_in(folders.outputs))), None,
                  [gallery_view, pick], queue=False)
        use_rewritten.click(lambda text: (text, NONE) if text.strip() else (gr.skip(), gr.skip()), rewritten,
                            [f["prompt"], f["rewrite"]], queue=False)

        picked = gr.State(None)

        def on_select(evt: gr.SelectData):
            video = Path(gallery(folders.outputs)[evt.index][0])
            return video, C.read_metadata(video.with_suffix(".json"))

        gallery_view.select(on_select, None, [picked, chosen], queue=False)
        def on_use(video):
            if video is None:
                return [gr.skip()] * len(FIELDS)
            v = form_values(C.read_metadata(video.with_suffix(".json")), folders)
            return [v.get(k, gr.skip()) for k in FIELDS]

        use.click(on_use, picked, fields, queue=False)
    return demo


def parser():
    """The page's own flags (its settings are the form's fields)."""
    ap = argparse.ArgumentParser(prog="hunyuan-apple-ui", description="HunyuanVideo on MLX: the web page, on "
                                 "http://127.0.0.1:PORT (this machine only, unless --listen).")
    ap.add_argument("--models", default="models", help="the folder of checkpoints and LoRAs the page may read "
                    "(default ./models); hub ids and the tiny demos need no folder")
    ap.add_argument("--outputs", default="outputs", help="where videos are written, and the gallery read (default "
                                                         "./outputs)")
    ap.add_argument("--model", default=H.DEFAULT_MODEL, help=f"the model the page starts with (default "
                    f"{H.DEFAULT_MODEL}; 'tiny' for the offline demo)")
    ap.add_argument("--rewrite-model", metavar="ID", help=f"the instruct model of the page's prompt rewrite: a hub id "
                    f"or a folder in mlx-lm's layout (default {H.REWRITE_MODEL})")
    ap.add_argument("--port", type=int, default=7860, help="default 7860")
    ap.add_argument("--listen", nargs="?", const="0.0.0.0", metavar="ADDRESS", help="serve other machines too: on "
                    "ADDRESS (default 0.0.0.0, every address of this machine); pair it with --auth")
    ap.add_argument("--auth", metavar="USER:PASSWORD", help="ask for this login before the page opens")
    return ap


def parse_args(argv):
    return parser().parse_args(argv)


def check_address(address, port):
    """None if the page can serve on address:port, else one sentence: the port's range, an address that is not one
    (or is IPv6, which Gradio does not serve), one that is not this machine's, a port already taken."""
    import errno
    import ipaddress
    import socket

    if not 1 <= port <= 65535:
        return f"--port {port}: use a port from 1 to 65535 (7860 by default)."
    try:
        if ipaddress.ip_address(address).version == 6:
            return (f"--listen {address} is an IPv6 address: the page serves IPv4 only; give 0.0.0.0 (every address "
                    f"of this machine) or one of its IPv4 addresses.")
    except ValueError:  # a host name: it must name this machine
        try:
            address = socket.gethostbyname(address)
        except OSError as e:
            return f"--listen {address}: not an address ({e.strerror}); give 0.0.0.0 or one of this machine's."
    try:
        with socket.socket() as s:
            s.bind((address, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return f"{address}:{port} is in use (another program serves there): choose another --port."
        if e.errno == errno.EACCES:
            return f"--port {port}: this user may not serve on it (ports below 1024 need root); choose 1024 or more."
        return (f"--listen {address}: cannot serve there ({e.strerror}); give 0.0.0.0 or an address of this "
                f"machine.")
    return None


def main(argv=None):
    args = parse_args(argv)
    if H.world() is not None:
        print("error: the page runs in one process; start it without mlx.launch (several machines make one video "
              "from the command line or Python: docs/several-machines.md).", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local page tells no one it runs
    try:
        from gradio.utils import get_upload_folder
    except ImportError:
        print('error: the page needs Gradio: pip install "hunyuan-apple[ui]" (or pip install gradio).',
              file=sys.stderr)
        return 2
    where = check_address(args.listen or "127.0.0.1", args.port)
    if where:
        print(f"error: {where}", file=sys.stderr)
        return 2
    auth = None
    if args.auth is not None:
        user, _, password = args.auth.partition(":")
        if not user or not password:
            print("error: --auth takes USER:PASSWORD, both non-empty.", file=sys.stderr)
            return 2
        auth = (user, password)
    if args.listen and auth is None:
        print(f"warning: --listen {args.listen} without --auth: anyone who can reach this machine can use the page "
              f"and its folders; add --auth USER:PASSWORD.", file=sys.stderr)
    folders = []
    for name, path in (("--models", args.models), ("--outputs", args.outputs)):
        path = Path(path).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"error: {name} {path}: cannot make the folder ({e.strerror}); choose another.", file=sys.stderr)
            return 2
        folders.append(path.resolve())
    page = Page(Folders(*folders, Path(get_upload_folder()).resolve()), args.model, args.rewrite_model,
                (args.models, args.outputs))
    warnings.showwarning = show_warning
    warnings.filterwarnings("always", module="HunyuanVideo_Apple|hunyuan_apple")  # each run's, not once a server
    demo = build(page)
    demo.queue(default_concurrency_limit=1)
    print(f"HunyuanVideo on MLX: http://{args.listen or '127.0.0.1'}:{args.port} (Ctrl-C stops it)", flush=True)
    try:
        demo.launch(server_name=args.listen or "127.0.0.1", server_port=args.port, auth=auth, ssr_mode=False,
                    allowed_paths=[str(page.folders.outputs)], show_error=True, quiet=True, css=CSS)
    except OSError as e:
        print(f"error: cannot serve on {args.listen or '127.0.0.1'}:{args.port} ({str(e).splitlines()[0][:80]}): "
              f"choose another --port.", file=sys.stderr)
        return 2
    return 0


CSS = ("#phases .phase { display: flex; gap: 0.5em; align-items: center } #phases progress { flex: 1 } "
       "#preview img { image-rendering: pixelated; object-fit: contain } #message { min-height: 2.5em } "
       "#ledger pre, #ledger code { white-space: pre-wrap; overflow-wrap: anywhere; overflow-x: hidden }")

if __name__ == "__main__":
    sys.exit(main())

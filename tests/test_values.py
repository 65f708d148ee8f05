"""What the newer features compute, each checked against something our code did not produce: the scheduler's
sigmas and ComfyUI's published preview factors, the uninterrupted run (resume), fresh pipelines (caches across
generations), the notes' FLOP formula, the arrays each component really holds, formulas for the memory plan's
terms, the README's preset table, and writers that fail halfway.

Tolerances are stated beside each check with the error measured on this machine (Linux, MLX CPU backend).
"""

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_to_end
from diffusers import FlowMatchEulerDiscreteScheduler
from mlx.utils import tree_flatten

import HunyuanVideo_Apple as H
import hunyuan_apple as cli

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEGATIVE = "a red fox runs through the snow", "blurry, dark"
SIZE = dict(height=32, width=48, frames=9)  # 3 latent frames of 4 x 6: 3 x 2 x 3 = 18 video tokens

# ComfyUI's latent-to-RGB factors for HunyuanVideo (comfy/latent_formats.py, HunyuanVideo.latent_rgb_factors and
# latent_rgb_factors_bias), as published: one row per latent channel, columns R, G, B
COMFY_FACTORS = np.array([
    [-0.0395, -0.0331, 0.0445], [0.0696, 0.0795, 0.0518], [0.0135, -0.0945, -0.0282], [0.0108, -0.0250, -0.0765],
    [-0.0209, 0.0032, 0.0224], [-0.0804, -0.0254, -0.0639], [-0.0991, 0.0271, -0.0669], [-0.0646, -0.0422, -0.0400],
    [-0.0696, -0.0595, -0.0894], [-0.0799, -0.0208, -0.0375], [0.1166, 0.1627, 0.0962], [0.1165, 0.0432, 0.0407],
    [-0.2315, -0.1920, -0.1355], [-0.0270, 0.0401, -0.0821], [-0.0616, -0.0997, -0.0727], [0.0249, -0.0469, -0.1703]])
COMFY_BIAS = np.array([0.0259, -0.0192, -0.0761])


def comfy_preview(x0):
    """ComfyUI's preview of latents (t, h, w, 16): the linear map, then [-1, 1] to 0..255 (before rounding)."""
    rgb = np.asarray(x0, np.float64) @ COMFY_FACTORS + COMFY_BIAS
    return np.clip((rgb + 1) / 2, 0, 1) * 255


def scheduler_sigmas(steps, shift=7.0):
    """diffusers' sigmas for a run of `steps`, as its HunyuanVideo pipeline sets them."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    return sched.sigmas.numpy().astype(np.float64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny demo checkpoint and its prompt's and negative prompt's encodings."""
    folder = H.build_tiny_checkpoint(tmp_path_factory.mktemp("values") / "tiny")
    text = H.HunyuanVideoPipeline.from_pretrained(folder).encode_prompt([PROMPT, NEGATIVE])
    mx.eval(text)
    return folder, text


def branches(text, cfg):
    """The text encodings and settings of a run of the prompt (and with true CFG at 3, the negative prompt)."""
    kw = dict(negative_prompt=NEGATIVE, cfg_scale=3.0) if cfg else {}
    return (text if cfg else tuple(t[:1] for t in text)), kw


def latents_and_steps(pipe, **kw):
    """A run's final latents and its Step events (the stream left at Denoised: no decode)."""
    events = run_to_end(pipe.generate(**kw), stop=lambda e: isinstance(e, H.Denoised))
    return events[-1].latents, [e for e in events if isinstance(e, H.Step)]


# ---- 1. live preview ------------------------------------------------------------------------------------

def test_preview_is_the_x0_estimate_of_each_step(tiny):
    """After step i the preview gets x0 = x_i - sigma_i v_i. v_i is recovered from the latents before and after the
    step (x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i) with diffusers' sigmas; at the last step (sigma 0) x0 is the
    final latents, to the bit. Bound 1e-5 of max |x0| (measured 1.0e-6: float32 differences divided by the step)."""
    folder, text = tiny
    steps = 5
    pipe = H.HunyuanVideoPipeline(folder)
    init = mx.random.normal((1, 3, 4, 6, 16), key=mx.random.key(3))
    final, events = latents_and_steps(pipe, text=tuple(t[:1] for t in text), **SIZE, steps=steps, latents=init)
    xs = [np.array(init, np.float64)] + [np.array(e.latents, np.float64) for e in events]
    x0s = [np.array(e.x0, np.float64) for e in events]
    sigmas = scheduler_sigmas(steps)
    worst = 0.0
    for i in range(steps):
        v = (xs[i + 1] - xs[i]) / (sigmas[i + 1] - sigmas[i])
        expected = xs[i] - sigmas[i] * v
        worst = max(worst, np.abs(x0s[i] - expected).max() / np.abs(expected).max())
    print(f"preview x0 against the scheduler's sigmas: {worst:.2e}")
    assert worst <= 1e-5
    assert np.array_equal(x0s[-1], np.array(final, np.float64))


def test_preview_strip_is_comfyuis_map_of_the_final_latents(tiny, tmp_path, monkeypatch):
    """--preview's PNG after the last step: the final latents through ComfyUI's published factors, frames side by
    side: every pixel is the map's value rounded (PNG is lossless; 1e-3 of a level allowed for float32 against
    float64 at a .5 boundary)."""
    from PIL import Image

    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    decoded = []
    real = H.HunyuanVideoPipeline.decode
    monkeypatch.setattr(H.HunyuanVideoPipeline, "decode", lambda self, x, *a, **k: decoded.append(np.array(x)) or
                        real(self, x, *a, **k))
    assert cli.main(["--model", str(tiny[0]), "--prompt", PROMPT, "--resolution", "32", "48", "--frames", "9",
                     "--steps", "3", "--seed", "1", "--output", "fox.mp4", "--preview"]) == 0
    strip = np.asarray(Image.open(tmp_path / "fox.preview.png"), np.float64)
    expected = np.concatenate(list(comfy_preview(decoded[0][0])), axis=1)  # 3 latent frames side by side
    assert strip.shape == expected.shape == (4, 18, 3)
    assert np.abs(strip - expected).max() <= 0.5 + 1e-3


# ---- 2. resume from any step -----------------------------------------------------------------------------

THRESHOLDS = {None: None, "fbcache": 0.3, "teacache": 0.3, "magcache": 0.24, "easycache": 0.3, "taylorseer": None}
OPTIONS = {"taylorseer": dict(cache_interval=3, cache_order=2, cache_warmup=2)}  # computes forwards 0, 1, 2, 5, 8...
STEPS = 10


def snapshot(step):
    """A Step event as plain values: its cache's numbers (value and type) and arrays, its ledger, its latents."""
    arrays, numbers = step.cache
    return (dict(arrays), json.loads(json.dumps(numbers)),  # MLX arrays never change: kept as they are
            json.loads(json.dumps(step.work)), np.array(step.latents))


def same(a, b):
    return a[1] == b[1] and a[2] == b[2] and np.array_equal(a[3], b[3]) and a[0].keys() == b[0].keys() and \
        all(a[0][k].dtype == b[0][k].dtype and mx.array_equal(a[0][k], b[0][k]).item() for k in a[0])


@pytest.mark.parametrize("cfg", [False, True], ids=["one-branch", "true-cfg"])
@pytest.mark.parametrize("cache", list(THRESHOLDS), ids=lambda c: c or "no-cache")
def test_resume_after_any_step_is_the_uninterrupted_run(tiny, tmp_path, cache, cfg):
    """Stopped after every step in turn, written by the command line's checkpoint writer and read back by its
    reader, a run goes on to the uninterrupted run's latents and ledger to the bit, and at every later step its
    cache state (arrays, numbers and their types: float32 stays float32) is the uninterrupted run's. True CFG:
    each branch keeps its own cache."""
    folder, text = tiny
    pipe = H.HunyuanVideoPipeline(folder)
    prompt, kw = branches(text, cfg)
    kw.update(SIZE, steps=STEPS, seed=7, cache=cache, cache_threshold=THRESHOLDS[cache], **OPTIONS.get(cache, {}))
    full, events = latents_and_steps(pipe, text=prompt, **kw)
    full, states, work = np.array(full), [snapshot(e) for e in events], pipe.stats["work"]
    if cache:
        assert 0 < work["skipped"] and work["forwards"] > (2 if cfg else 1) * 2, work  # the rule binds here
    if cfg and cache:
        assert any(k.startswith("uncond.") for k in states[3][1])
    args = cli.parse_args(["--resume", str(tmp_path / "run.partial.safetensors")])
    request = H.check_request(dict(prompt=PROMPT, model=str(folder), **kw))
    for k in range(1, STEPS):
        arrays, numbers, ledger, latents = states[k - 1]
        saver = cli.Checkpoint(tmp_path / "run.mp4", pipe, 0)
        saver.request, saver.text = request, prompt
        saver.after(H.Step(k, STEPS, mx.array(latents), None, (arrays, numbers), ledger))
        _, resumed, resume = cli.read_checkpoint(args)
        assert resumed == request
        again, events = latents_and_steps(pipe, resume=resume, **kw)
        seen = [snapshot(e) for e in events]
        assert np.array_equal(np.array(again), full), f"resumed after step {k}"
        assert pipe.stats["work"] == work, f"resumed after step {k}"
        assert all(same(a, b) for a, b in zip(seen, states[k:])), f"cache state after resuming at step {k}"


# ---- 3. step caches across generations -------------------------------------------------------------------

def test_a_pipeline_generating_twice_gives_what_fresh_pipelines_give(tiny):
    """Each cache's state lives for one generation: the second generation of one pipeline (another seed) equals a
    fresh pipeline's, latents and ledger, with true CFG (a cache for each branch, made where the one cache of a
    run without it is)."""
    folder, text = tiny
    for cache in THRESHOLDS:
        prompt, kw = branches(text, True)
        kw.update(SIZE, steps=STEPS, cache=cache, cache_threshold=THRESHOLDS[cache], text=prompt,
                  output_type="latent", **OPTIONS.get(cache, {}))
        pipe = H.HunyuanVideoPipeline(folder)
        pipe(seed=1, **kw)
        second = np.array(pipe(seed=2, **kw)), pipe.stats["work"]
        fresh = H.HunyuanVideoPipeline(folder)
        expected = np.array(fresh(seed=2, **kw)), fresh.stats["work"]
        assert np.array_equal(second[0], expected[0]) and second[1] == expected[1], cache


# ---- 5. the work ledger with skipped steps ----------------------------------------------------------------

def notes_flop(tokens, dim, blocks):
    """The notes' count (shared/notes/hunyuanvideo.md): per token and block 24 dim^2 of linear work (13.6 GFLOP a
    token over the 60 blocks at width 3072), and attention 4 dim N^2 a block (737,280 N^2 at full size)."""
    return blocks * (24 * dim ** 2 * tokens + 4 * dim * tokens ** 2)


def test_the_notes_formula_at_full_size():
    assert notes_flop(1, 3072, 60) == pytest.approx(13.6e9, rel=0.01)
    assert notes_flop(1000, 3072, 60) - 1000 * notes_flop(1, 3072, 60) == pytest.approx(737280 * (1000 ** 2 - 1000))
    assert H.dit_flops(67576) / 1e15 == pytest.approx(4.3, rel=0.05)  # the notes: 4.3 PFLOP at 544x960x129


@pytest.mark.parametrize("cache", ["fbcache", "teacache"])
def test_ledger_pflop_with_skipped_steps_follows_the_notes(tiny, cache):
    """The ledger's PFLOP: each step's forward over the video tokens and the valid text tokens, full steps over all
    blocks, First-Block Cache's skipped steps over its one double block, TeaCache's over none."""
    folder, text = tiny
    pipe = H.HunyuanVideoPipeline(folder)
    pipe(text=tuple(t[:1] for t in text), **SIZE, steps=STEPS, seed=7, cache=cache, cache_threshold=THRESHOLDS[cache],
         output_type="latent")
    work = pipe.stats["work"]
    assert 0 < work["skipped"] < STEPS, work
    tokens = 3 * 2 * 3 + int(np.array(text[1][0]).sum())  # video tokens (2x2 patches) + the prompt's valid tokens
    skipped_blocks = 1 if cache == "fbcache" else 0
    expected = sum(notes_flop(tokens, 64, 2 if full else skipped_blocks) for full in work["steps"]) / 1e15
    assert work["pflop"] == pytest.approx(expected, rel=1e-12)
    # attention and linear apart (4 dim N^2 and 24 dim^2 N a block), and what the skipped blocks would have cost
    blocks = sum(2 if full else skipped_blocks for full in work["steps"])
    assert work["attention_pflop"] == pytest.approx(blocks * 4 * 64 * tokens ** 2 / 1e15, rel=1e-12)
    assert work["linear_pflop"] == pytest.approx(blocks * 24 * 64 ** 2 * tokens / 1e15, rel=1e-12)
    assert work["skipped_attention_pflop"] == pytest.approx((2 * STEPS - blocks) * 4 * 64 * tokens ** 2 / 1e15)
    assert work["skipped_linear_pflop"] == pytest.approx((2 * STEPS - blocks) * 24 * 64 ** 2 * tokens / 1e15)


# ---- 6. each component in its own precision --------------------------------------------------------------

def test_each_component_loads_and_runs_in_its_own_dtype(tiny, monkeypatch):
    """DiT fp16, VAE fp32, text encoders bf16 (none of them the default): the weights each loader returns and the
    arrays each component computes are in that component's dtype."""
    folder, _ = tiny
    want = {"transformer": mx.float16, "vae": mx.float32, "text_encoders": mx.bfloat16}
    seen = {}

    def spy(name, fn):
        return lambda *a, **k: seen.setdefault(name, []).append(fn(*a, **k)) or seen[name][-1]
    for name in ("load_transformer", "load_vae", "load_text_encoder", "load_clip_text_encoder", "encode_llama",
                 "encode_clip"):
        monkeypatch.setattr(H, name, spy(name, getattr(H, name)))
    forward, decode = H.HunyuanVideoTransformer.__call__, H.HunyuanVideoVAE.decode
    monkeypatch.setattr(H.HunyuanVideoTransformer, "__call__", lambda self, *a, **k: seen.setdefault(
        "dit output", []).append(forward(self, *a, **k)) or seen["dit output"][-1])
    monkeypatch.setattr(H.HunyuanVideoVAE, "decode", lambda self, *a, **k: seen.setdefault(
        "vae output", []).append(decode(self, *a, **k)) or seen["vae output"][-1])
    H.HunyuanVideoPipeline.from_pretrained(folder, dtypes=want)(PROMPT, height=32, width=32, frames=5, steps=2, seed=0)

    def floats(model):
        return {p.dtype for _, p in tree_flatten(model.parameters()) if mx.issubdtype(p.dtype, mx.floating)}
    assert floats(seen["load_transformer"][0]) == {want["transformer"]}
    assert floats(seen["load_vae"][0]) == {want["vae"]}
    assert floats(seen["load_text_encoder"][0]) == floats(seen["load_clip_text_encoder"][0]) == {want["text_encoders"]}
    assert {x.dtype for x in seen["dit output"]} == {want["transformer"]}
    assert seen["vae output"][0].dtype == want["vae"]
    states, mask = seen["encode_llama"][0]
    assert states.dtype == seen["encode_clip"][0].dtype == want["text_encoders"]


# ---- 10. the memory plan's terms at full size ------------------------------------------------------------

@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """Header-only files of the real models (T2V, and HunyuanVideo-I2V's token replace), planned as on a GPU."""
    import bench_hunyuan_apple as B
    root = tmp_path_factory.mktemp("plan")
    return B.header_only_checkpoint(root / "t2v"), B.header_only_checkpoint(root / "i2v", "token_replace")


def test_plan_terms_for_true_cfg_and_token_replace(full_size, monkeypatch):
    """At 544x960x129 (33 x 34 x 60 = 67,320 video tokens), width 3072, bf16, 50 steps: true CFG one branch after
    the other adds a second modulation table (50 steps x 3072 x (12 x 20 double + 3 x 40 single) values) and the
    prompt's velocity kept in bf16 and float32 (64 values a video token); token replace adds one (tokens, 3072)
    copy to a block's peak, over LLaVA's 252 prompt tokens and every 4th of the image's 576."""
    t2v, i2v = full_size
    plan = lambda folder, **kw: H.estimate_memory(folder, 544, 960, 129, backend="gpu", **kw)["denoise"]  # noqa: E731
    video, D = 33 * 34 * 60, 3072
    table = 50 * D * (12 * 20 + 3 * 40) * 2
    assert plan(t2v, cfg="sequential") - plan(t2v) == table + video * 64 * (2 + 4)
    with_copy = plan(i2v)
    activations = H._dit_activations
    monkeypatch.setattr(H, "_dit_activations", lambda *a, **k: activations(*a, **{**k, "token_replace": False}))
    assert with_copy - plan(i2v) == (video + 252 + 576 // 4) * D * 2


def test_cfg_mode_batches_only_within_the_margin(full_size, monkeypatch):
    """cfg_mode runs the two branches as one batch when the batched plan is at most 90% of what the machine gives."""
    t2v, _ = full_size
    monkeypatch.setattr(H, "_backend", lambda: "gpu")
    pipe = H.HunyuanVideoPipeline(t2v)
    batched = H.estimate_memory(t2v, 544, 960, 129, cfg="batched", steps=50)["denoise"]
    for budget, mode in ((int(np.ceil(batched / 0.9)) + 1, "batched"), (int(batched / 0.9) - 1, "sequential")):
        monkeypatch.setattr(H, "available_memory", lambda: budget)
        assert pipe.cfg_mode(544, 960, 129) == mode, budget
    assert pipe.cfg_mode(544, 960, 129, cache="teacache") == "sequential"


# ---- 11. presets and the prompt cache's key ---------------------------------------------------------------

def readme_presets():
    """The README's preset table: {name: (checkpoint, DiT or None, settings text)}."""
    section = (ROOT / "README.md").read_text().split("**Presets**")[1].split("\n\n")[1]
    rows = re.findall(r"^\| `([\w.-]+)` \| (.+?) \| (.+?) \| [^|]+\|$", section, re.M)
    out = {}
    for name, checkpoint, settings in rows:
        ids = re.findall(r"`([\w.-]+/[\w.-]+)`", checkpoint)
        dit = re.search(r"DiT `([\w.-]+/[\w.-]+(?:/[\w.-]+)*)`", checkpoint)  # a repository, or a file in one
        out[name] = ids[0], dit and dit.group(1), settings
    return out


def test_every_preset_resolves_to_what_the_readme_lists(tmp_path):
    """Each preset's checkpoint, DiT and the settings its README row names; what a row does not name stays at the
    command line's default."""
    from PIL import Image
    Image.new("RGB", (96, 54)).save(tmp_path / "still.png")
    table = readme_presets()
    assert set(table) == set(H.PRESETS), (sorted(table), sorted(H.PRESETS))
    for name, (model, dit, text) in table.items():
        extra = ["--image", str(tmp_path / "still.png")] if "i2v" in name else []  # 16:9
        s = cli.resolve(cli.parse_args(["--prompt", "a man walks", "--preset", name, *extra]))._asdict()
        number = lambda pattern, default: float(m.group(1)) if (m := re.search(pattern, text)) else default  # noqa
        size = re.search(r"(\d+)x(\d+)", text)
        listed = dict(model=model, transformer=dit, steps=number(r"(\d+) steps", 50),
                      shift=number(r"flow shift (\d+)", 7.0), guidance=number(r"embedded guidance (\d+)", 6.0),
                      cfg_scale=number(r"true CFG (\d+)", 1.0), frames=number(r"(\d+) frames", 13),
                      height=int(size.group(1)) if size else 544, width=int(size.group(2)) if size else 960)
        got = {k: s[k] for k in listed}
        assert got == listed, name
        prefix = re.search(r"prompts begin `([^`]+)`", text)
        assert s["prompt"] == (prefix.group(1) if prefix else "") + "a man walks", name
        assert (s["negative_prompt"] is not None) == ("negative prompt" in text), name


def test_accvideo_steps_are_every_tenth_of_the_50_step_schedule():
    """AccVideo's pipeline takes sigmas [0, 10, 20, 30, 40, 50] of the 50-step schedule (shift 7): the preset's 5
    steps at shift 7 are those, and its DiT is the file in its repository."""
    p = H.PRESETS["accvideo"]
    assert np.abs(H.flow_sigmas(p["steps"], p["shift"]) - H.flow_sigmas(50, 7.0)[::10]).max() <= 1e-6
    assert H._hub_file(p["transformer"]) == ("aejion/AccVideo", "accvideo-t2v-5-steps/diffusion_pytorch_model.pt")


def test_each_field_of_the_prompt_cache_key_misses(tiny, monkeypatch):
    """The prompt cache's entry changes with every single field that changes the text encoders' outputs: the
    prompt, the image (one pixel), LLaVA's interleave, a negative prompt's own entry, the template, the dtype and
    the quantization; the same request gives the same entry."""
    from PIL import Image
    folder, _ = tiny
    pipe = H.HunyuanVideoPipeline.from_pretrained(folder)
    image = Image.new("RGB", (32, 32), (10, 20, 30))
    other = image.copy()
    other.putpixel((5, 5), (10, 20, 31))
    base = pipe._prompt_entry(PROMPT, image, 4)
    assert pipe._prompt_entry(PROMPT, image.copy(), 4) == base
    changed = {"prompt": pipe._prompt_entry(PROMPT + ".", image, 4), "image": pipe._prompt_entry(PROMPT, other, 4),
               "interleave": pipe._prompt_entry(PROMPT, image, 2), "negative": pipe._prompt_entry(NEGATIVE, image, 2),
               "no image": pipe._prompt_entry(PROMPT),
               "dtype": H.HunyuanVideoPipeline.from_pretrained(folder, dtype=mx.float32)._prompt_entry(PROMPT, image, 4),
               "quantization": H.HunyuanVideoPipeline.from_pretrained(folder, quantization="int8")._prompt_entry(
                   PROMPT, image, 4)}
    for owner, name in ((H, "I2V_TEMPLATE"), (H.HunyuanVideoPipeline, "prompt_template")):  # the templates
        monkeypatch.setattr(owner, name, getattr(owner, name).replace("Describe", "Show"))
        changed[name] = pipe._prompt_entry(PROMPT, image, 4)
        monkeypatch.undo()
    assert all(entry != base for entry in changed.values()), [k for k, v in changed.items() if v == base]
    assert len(set(changed.values())) == len(changed)


# ---- 4. atomic writes under faults ------------------------------------------------------------------------

def halfway(write):
    """A writer that does its work, then cuts its file to half and fails as a full disk does."""
    def failing(path, *a, **k):
        write(path, *a, **k)
        target = Path(path if isinstance(path, (str, Path)) else path.name)
        data = target.read_bytes()
        target.write_bytes(data[:len(data) // 2])
        raise OSError(28, "No space left on device")
    return failing


@pytest.mark.parametrize("what", ["checkpoint", "latents", "mp4", "sidecar", "png", "prompt cache"])
def test_a_writer_failing_halfway_leaves_the_earlier_file(tiny, tmp_path, monkeypatch, capsys, what):
    """A second run over the first one's files (--overwrite) whose writer of one kind fails halfway: that file keeps
    the earlier bytes (and when it is the run's first write, the checkpoint, every file does), nothing half-written
    is left under a final or temporary name, and the run ends in one sentence (the prompt cache's entry: a warning,
    and the run goes on)."""
    import imageio.v2 as iio
    import PIL.Image

    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(tiny[0]), "--resolution", "32", "48", "--frames", "5", "--steps", "2", "--output",
            "fox.mp4", "--frames-dir", "png", "--checkpoint-every", "0"]
    assert cli.main(["--prompt", PROMPT, "--seed", "1", *args]) == 0
    cache = tmp_path / "cache" / "prompts"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    # the earlier checkpoint and latents: what an interrupted run and a failed decode leave
    (tmp_path / "fox.partial.safetensors").write_bytes(b"earlier checkpoint")
    (tmp_path / "fox.latents.safetensors").write_bytes(b"earlier latents")
    before.update({tmp_path / n: (tmp_path / n).read_bytes() for n in ("fox.partial.safetensors",
                                                                      "fox.latents.safetensors")})
    if what in ("checkpoint", "latents", "prompt cache"):
        real = mx.save_safetensors
        marker = {"checkpoint": ".fox.partial.partial", "latents": ".fox.latents.partial", "prompt cache": ""}[what]
        monkeypatch.setattr(mx, "save_safetensors", lambda f, *a, **k: (halfway(real) if marker in str(f) and (
            what != "prompt cache" or "prompts" in str(f)) else real)(f, *a, **k))
    elif what == "mp4":
        real_writer = iio.get_writer

        class Writer:
            def __init__(self, path, **kw):
                self.path, self.inner = path, real_writer(path, **kw)

            def append_data(self, frame):
                self.inner.append_data(frame)

            def close(self):
                self.inner.close()
                halfway(lambda p: None)(self.path)
        monkeypatch.setattr(iio, "get_writer", Writer)
    elif what == "sidecar":
        real_text = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (halfway(real_text) if self.suffix == ".json"
                                                                       else real_text)(self, *a, **k))
    else:
        real_save = PIL.Image.Image.save
        monkeypatch.setattr(PIL.Image.Image, "save", lambda self, f, *a, **k: halfway(
            lambda f, *a, **k: real_save(self, f, *a, **k))(f, *a, **k))
    prompt = PROMPT + (" again" if what == "prompt cache" else "")
    code = cli.main(["--prompt", prompt, "--seed", "2", *args, "--overwrite"])
    err = capsys.readouterr().err
    left = [p for p in tmp_path.rglob("*") if p.is_file() and ".partial." in p.name and p not in before]
    assert not left, left
    if what == "prompt cache":
        assert code == 0 and "the prompt cache cannot be written" in err, err
        assert len(list(cache.glob("*.safetensors"))) == 1  # nothing under the new prompt's entry
        return
    assert code == 2 and "No space left on device" in err and "Traceback" not in err, err
    assert re.search(r"error: could not write \S+ \(No space left on device\)", err), err
    target = tmp_path / {"checkpoint": "fox.partial.safetensors", "latents": "fox.latents.safetensors",
                         "mp4": "fox.mp4", "sidecar": "fox.json", "png": "png/frame_0000.png"}[what]
    assert target.read_bytes() == before[target]  # the earlier file, whole
    if what == "checkpoint":  # it failed first: every file as it was
        assert all(p.read_bytes() == data for p, data in before.items())


# ---- what the review's injected bugs showed untested ------------------------------------------------------

def test_one_non_finite_latent_stops_denoising(tiny, monkeypatch):
    """A single NaN among the latents after a step (the rest finite) stops the run there, naming the step."""
    real = H.sampler_step

    def one_nan(x, *args):
        x = real(x, *args)
        return mx.where(mx.arange(x.size).reshape(x.shape) == 7, mx.array(float("nan")), x)

    monkeypatch.setattr(H, "sampler_step", one_nan)
    pipe = H.HunyuanVideoPipeline(tiny[0])
    with pytest.raises(H.HunyuanVideoError, match="denoising gave NaN or infinite latents at step 1"):
        pipe(text=branches(tiny[1], False)[0], steps=2, seed=0, output_type="latent", **SIZE)


def test_non_finite_frames_stop_the_decode_though_the_latents_are_finite(tiny, monkeypatch):
    """A VAE that writes one NaN pixel from finite latents: the decode is refused, not written as black."""
    real = H.HunyuanVideoVAE.decode

    def one_nan(self, z, *args, **kw):
        video = real(self, z, *args, **kw)
        return mx.where(mx.arange(video.size).reshape(video.shape) == 11, mx.array(float("nan"), video.dtype), video)

    monkeypatch.setattr(H.HunyuanVideoVAE, "decode", one_nan)
    pipe = H.HunyuanVideoPipeline(tiny[0])
    latents = mx.random.normal((1, 3, 4, 6, 16), key=mx.random.key(0))
    with pytest.raises(H.HunyuanVideoError, match="decoding gave NaN or infinite frames"):
        pipe.decode(latents)
    monkeypatch.setattr(H.HunyuanVideoVAE, "decode", real)
    assert pipe.decode(latents).shape == (9, 32, 48, 3)  # the same latents, the real VAE: frames


@pytest.mark.parametrize("choice", ["kernel", "dequantized", "auto"])
def test_the_pipeline_runs_the_quantized_matmul_its_ledger_names(tiny, monkeypatch, choice):
    """A quantized run's DiT layers multiply as chosen (dequantized: mx.dequantize then a matmul, counted; the kernel:
    never), and the ledger's "matmul" says which. "auto" on this machine's CPU backend is the kernel."""
    calls = []
    real = mx.dequantize
    monkeypatch.setattr(mx, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipe = H.HunyuanVideoPipeline(tiny[0], quantization="int8", quantized_matmul=choice)
    pipe(text=branches(tiny[1], False)[0], steps=2, seed=0, output_type="latent", **SIZE)
    expected = "dequantized" if choice == "dequantized" else "kernel"
    assert pipe.stats["work"]["matmul"] == expected
    assert (len(calls) > 0) == (expected == "dequantized"), len(calls)

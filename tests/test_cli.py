"""hunyuan_apple.py as a user runs it, on the offline tiny checkpoint (--model tiny): the files it writes, read
back; the settings round trip; recovery from a failed decode; and one clear sentence for bad input."""

import json
import os
import shutil
import re
import subprocess
import sys
import time
from pathlib import Path

import imageio.v2 as iio
import mlx.core as mx
import numpy as np
import pytest

import HunyuanVideo_Apple as H
import hunyuan_apple as cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny", "--resolution", "48", "64", "--frames", "9", "--steps", "2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "HUNYUAN_APPLE_CACHE": str(cache)}


def run(env, cwd, *args):
    return subprocess.run([sys.executable, str(ROOT / "hunyuan_apple.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def read_frames(path):
    with iio.get_reader(str(path), format="FFMPEG") as r:  # the reader a user's player would use: ffmpeg
        return np.stack([f for f in r.iter_data()])  # list(r) would ask for its length: ffmpeg says inf


def test_generate_writes_what_it_says(env, tmp_path):
    r = run(env, tmp_path, "--prompt", "a cat walks on the grass", *SMALL, "--seed", "3", "--output", "v/cat.mp4",
            "--frames-dir", "frames", "--gif")
    assert r.returncode == 0, r.stderr
    frames = read_frames(tmp_path / "v/cat.mp4")
    assert frames.shape == (9, 48, 64, 3) and frames.std() > 1  # H.264 frames read back: count and size
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"frame_{i:04d}.png" for i in range(9)]
    assert iio.imread(tmp_path / "frames/frame_0000.png").shape == (48, 64, 3)
    assert (tmp_path / "v/cat.gif").stat().st_size > 0
    settings = json.loads((tmp_path / "v/cat.json").read_text())
    work = settings.pop("work")  # the work ledger: DiT forwards computed and skipped, their PFLOP
    assert settings | {"version": None} == {"prompt": "a cat walks on the grass", "seed": 3, "steps": 2, "guidance": 6.0,
                                            "shift": 7.0, "height": 48, "width": 64, "frames": 9, "model": "tiny",
                                            "quantization": None, "quantize_modulation": False, "dit_dtype": "bf16",
                                            "vae_dtype": "fp16", "text_dtype": "fp16", "fps": 24, "cache": None,
                                            "cache_threshold": None, "version": None, "negative_prompt": None,
                                            "cfg_scale": 1.0, "loras": [], "lora_ignore_unmatched": False,
                                            "transformer": None, "video": None, "strength": None, "image": None,
                                            "original_prompt": None, "rewrite": None, "rewrite_model": None,
                                            "rewrite_temperature": None, "rewrite_seed": None, "attention": "dense",
                                            "cache_interval": None, "cache_order": None, "cache_warmup": None,
                                            "radial_dense_steps": None, "radial_dense_layers": None,
                                            "radial_decay": None, "radial_block": None, "quantized_matmul": None,
                                            "preset": None}
    assert work["forwards"] == 2 and work["skipped"] == 0 and work["steps"] == [True, True] and work["pflop"] > 0
    assert f"DiT forwards: 2 computed, 0 skipped (no cache, dense attention), {work['pflop']:.3g} PFLOP (attention " \
           f"{work['attention_pflop']:.3g}, linear {work['linear_pflop']:.3g}); skipped 0 attention and 0 linear PFLOP" \
           in r.stdout
    assert not list((tmp_path / "v").glob("*.latents.safetensors")) and not list((tmp_path / "v").glob(".*"))
    for phase in ("text encoders", "denoise", "decode"):
        assert phase in r.stdout
    # every long activity shows progress; memory in GiB with digits enough for the tiny model's megabytes
    for activity in ("loading the LLM", "encoding the prompt", "loading the DiT", "denoising", "decoding"):
        assert f"  {activity} [" in r.stderr, activity
    assert "s/step" in r.stderr and "ETA" in r.stderr
    plan = re.search(r"memory plan: (.*)", r.stderr).group(1)
    assert all(float(v) > 0 for v in re.findall(r"([\d.e-]+) GiB", plan)) and plan.count("GiB") == 3, plan
    assert all(float(v) > 0 for v in re.findall(r"peak ([\d.e-]+) GiB", r.stdout)), r.stdout
    # the mp4 carries its settings: --from-metadata on the video repeats the generation exactly
    r = run(env, tmp_path, "--from-metadata", "v/cat.mp4", "--output", "again.mp4")
    assert r.returncode == 0, r.stderr
    assert "comes from the prompt cache" in r.stderr and "loading the LLM" not in r.stderr  # the same prompt
    assert json.loads((tmp_path / "again.json").read_text()) == settings | {"work": work}
    assert np.array_equal(read_frames(tmp_path / "again.mp4"), frames)
    # an existing file is not replaced without --overwrite
    r = run(env, tmp_path, "--from-metadata", "v/cat.json", "--output", "again.mp4")
    assert r.returncode == 2 and "already exists: pass --overwrite" in r.stderr
    # an input is never written over, whatever the flags: the video read, or its sidecar as the new sidecar
    for source in ("v/cat.mp4", "v/cat.json"):
        r = run(env, tmp_path, "--from-metadata", source, "--output", "v/cat.mp4", "--overwrite")
        assert r.returncode == 2 and f"{source} is the --from-metadata input" in r.stderr, r.stderr
    assert np.array_equal(read_frames(tmp_path / "v/cat.mp4"), frames)
    # PNG frames: not mixed with an earlier run's; --overwrite replaces them, the extra ones removed
    r = run(env, tmp_path, "--from-metadata", "v/cat.json", "--output", "short.mp4", "--frames", "5", "--frames-dir",
            "frames")
    assert r.returncode == 2 and "frames already holds frames of an earlier run" in r.stderr, r.stderr
    (tmp_path / "frames" / "frame_notes.png").write_bytes(b"the user's own file")  # not a name this tool writes
    r = run(env, tmp_path, "--from-metadata", "v/cat.json", "--output", "short.mp4", "--frames", "5", "--frames-dir",
            "frames", "--overwrite", "--no-prompt-cache")
    assert r.returncode == 0 and "loading the LLM" in r.stderr, r.stderr
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"frame_{i:04d}.png" for i in range(5)] + \
        ["frame_notes.png"]


def test_failed_decode_keeps_the_latents(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", env["HUNYUAN_APPLE_CACHE"])
    monkeypatch.chdir(tmp_path)
    real_decode = H.HunyuanVideoPipeline.decode
    monkeypatch.setattr(H.HunyuanVideoPipeline, "decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    assert cli.main(["--prompt", "a fox", *SMALL, "--seed", "4", "--output", "fox.mp4"]) == 2
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "--decode-latents fox.latents.safetensors" in err
    assert not (tmp_path / "fox.mp4").exists()
    monkeypatch.setattr(H.HunyuanVideoPipeline, "decode", real_decode)
    assert cli.main(["--decode-latents", "fox.latents.safetensors"]) == 0
    assert read_frames(tmp_path / "fox.mp4").shape == (9, 48, 64, 3)
    assert json.loads((tmp_path / "fox.json").read_text())["seed"] == 4
    # renamed latents, --overwrite: the video is renamed.mp4, the latents themselves are kept
    (tmp_path / "fox.latents.safetensors").rename(tmp_path / "renamed.safetensors")
    kept = (tmp_path / "renamed.safetensors").read_bytes()
    r = run(env, tmp_path, "--decode-latents", "renamed.safetensors", "--overwrite")
    assert r.returncode == 0 and (tmp_path / "renamed.safetensors").read_bytes() == kept, r.stderr
    assert read_frames(tmp_path / "renamed.mp4").shape == (9, 48, 64, 3)
    # --model given now is used (a moved copy of the checkpoint), and recorded
    moved = H.build_tiny_checkpoint(tmp_path / "moved")
    r = run(env, tmp_path, "--decode-latents", "renamed.safetensors", "--model", moved, "--output", "moved.mp4")
    assert r.returncode == 0 and json.loads((tmp_path / "moved.json").read_text())["model"] == str(moved), r.stderr
    r = run(env, tmp_path, "--decode-latents", "renamed.safetensors", "--model", tmp_path / "gone", "--output", "x.mp4")
    assert r.returncode == 2 and "gone does not exist" in r.stderr, r.stderr


def test_interrupted_starts_a_fresh_line(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", env["HUNYUAN_APPLE_CACHE"])
    monkeypatch.chdir(tmp_path)

    def interrupted(self, *a):
        progress = a[-1]
        progress("denoising", 0, 4)
        time.sleep(0.2)  # the bar is redrawn at most 10 times a second
        progress("denoising", 1, 4)
        raise KeyboardInterrupt
        yield
    monkeypatch.setattr(H.HunyuanVideoPipeline, "_denoise", interrupted)
    assert cli.main(["--prompt", "a fox", *SMALL, "--output", "fox.mp4"]) == 130
    err = capsys.readouterr().err
    assert "  denoising [######------------------] 1/4" in err and "ETA" in err
    assert re.search(r"ETA \d+ s\ninterrupted\.\n", err), err


@pytest.mark.parametrize("args, words", [
    (["--frames", "12"], "4n+1"),
    (["--resolution", "540", "960"], "multiples of 16"),
    (["--aspect-ratio", "5:4"], "invalid choice: '5:4'"),
    (["--quantization", "fp16"], "invalid choice: 'fp16'"),
    (["--steps", "0"], "use 1 to 1000"),
    (["--prompt", "  "], "prompt is empty"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--model", "missing/model/folder"], "does not exist"),
    (["--model", "."], "lacks transformer"),  # a folder, but not a checkpoint
    (["--output", "notes.txt/video.mp4"], "cannot write to notes.txt"),
    (["--output", "video.avi"], "end the name with .mp4"),
    (["--seed", "-1"], "seed -1: use a whole number from 0 to 2**64 - 1"),
    (["--seed", "99999999999999999999"], "seed 99999999999999999999: use a whole number from 0 to 2**64 - 1"),
    (["--frames", "200"], "4n+1 (1, 5, 9, ... 129); try 129"),
    (["--quantize", "8", "--quantization", "int4"], "--quantize 8 and --quantization int4 disagree"),
    (["--guidance", "-5"], "guidance -5.0: the embedded guidance scale is a number of 0 or more"),
    (["--guidance", "nan"], "--guidance is NaN, where a finite number is expected"),
    (["--guidance", "inf"], "--guidance is Infinity, where a finite number is expected"),
    (["--cfg-scale=-inf"], "--cfg-scale is -Infinity, where a finite number is expected"),
    (["--attention", "radial", "--radial-decay", "nan"], "--radial-decay is NaN, where a finite number is expected"),
    (["--shift", "0"], "--shift 0.0: use a number above 0"),
    (["--shift", "-1"], "--shift -1.0: use a number above 0"),
    (["--shift", "nan"], "--shift is NaN, where a finite number is expected"),
    (["--steps", "100000000", "--force"], "--steps 100000000: use 1 to 1000"),
    (["--preset", "skyreels-i2v"], "--preset skyreels-i2v makes video from an image: give --image"),
    (["--fps", "1000"], "--fps 1000: use a frame rate from 1 to 120"),
    (["--fps", "0"], "--fps 0: use a frame rate from 1 to 120"),
    (["--output", "mine.mp4"], "mine.json already exists"),  # the sidecar is not overwritten either
    (["--output", "mine.mp4", "--gif"], "mine.json already exists"),
    (["--output", "old.mp4"], "old.latents.safetensors already exists"),  # an earlier run's latents are kept
    (["--frames-dir", "notes.txt"], "--frames-dir notes.txt is a file"),
    (["--cache", "deepcache"], "invalid choice: 'deepcache'"),
    (["--cache", "teacache", "--cache-threshold", "-1"], "--cache-threshold -1.0: use 0 or more"),
    (["--cache-threshold", "0.1"], "--cache-threshold without --cache: name the cache too"),
    (["--preset", "fastest"], "invalid choice: 'fastest'"),
    (["--checkpoint-every", "-5"], "--checkpoint-every -5.0: use a number of seconds, 0 or more"),
    (["--checkpoint-every", "nan"], "--checkpoint-every nan: use a number of seconds, 0 or more"),
    (["--image", "."], "the image . is a folder: pass an image file"),
    (["--lora", "."], "is a folder: pass a LoRA file (.safetensors, or a .pt)"),
    (["--video", "."], "the video . is a folder: pass a video file"),
    (["--from-metadata", "."], "--from-metadata . is a folder: pass the .json written beside a video"),
    (["--attention", "sparse"], "invalid choice: 'sparse'"),
    (["--attention", "radial"], "the video has 36 tokens, less than one block of 128; use dense attention"),
    (["--attention", "radial", "--radial-decay", "0"], "--radial-decay 0.0: use a number above 0 and at most 4"),
    (["--radial-block", "64"], "--radial-block set Radial Attention: give --attention radial too"),
    (["--cache", "taylorseer", "--cache-threshold", "0.1"], "--cache taylorseer takes no --cache-threshold"),
    (["--cache", "teacache", "--cache-order", "2"], "--cache-order set the TaylorSeer cache: give --cache taylorseer"),
    (["--quantized-matmul", "kernel"], "--quantized-matmul chooses how quantized layers multiply: give --quantization"),
])
def test_bad_input_one_sentence(tmp_path, monkeypatch, capsys, args, words):
    """Refused in one sentence before any work (no memory plan printed, no weights loaded): the command line's main
    in this process (an exception would fail the test; test_bad_input_in_a_real_process runs the script)."""
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    (tmp_path / "mine.json").write_text("{}")
    (tmp_path / "old.latents.safetensors").write_text("an earlier run's latents")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path / "cache"))
    for name in ("load_transformer", "load_text_encoder", "load_clip_text_encoder", "load_vae"):
        monkeypatch.setattr(H, name, lambda *a, **k: pytest.fail("weights were loaded"))
    try:
        code = cli.main(["--prompt", "a cat", *SMALL, *args])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out = capsys.readouterr()
    assert code == 2, out
    assert words in out.err and "memory plan" not in out.err + out.out, out.err
    assert (tmp_path / "mine.json").read_text() == "{}" and not (tmp_path / "mine.mp4").exists()


@pytest.mark.parametrize("args, words", [(["--frames", "12"], "4n+1"), (["--frobnicate"], "unrecognized arguments"),
                                         (["--attention", "radial"], "less than one block of 128"),
                                         (["--prompt", "\udcff\udcfe cat"], "--prompt holds bytes that are not "
                                          "UTF-8 text (\\udcff\\udcfe cat): type it again in UTF-8")])
def test_bad_input_in_a_real_process(env, tmp_path, args, words):
    """The script itself: exit status 2, the sentence on stderr, no traceback."""
    r = run(env, tmp_path, "--prompt", "a cat", *SMALL, *args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, words", [
    (["--from-metadata", "frames.json"], 'frames.json: --frames is "nine", where a whole number is expected: correct the file'),
    (["--from-metadata", "seed.json"], 'seed.json: --seed is 1.5, where a whole number is expected'),
    (["--from-metadata", "prompt.json"], 'prompt.json: --prompt is 3, where text is expected'),
    (["--from-metadata", "list.json"], "holds no generation settings"),
    (["--from-metadata", "foreign.mp4"], "foreign.mp4 holds no generation settings"),
    (["--from-metadata", "notes.txt"], "is not readable as generation settings"),
    (["--from-metadata", "absent.json"], "--from-metadata absent.json does not exist"),
    (["--decode-latents", "absent.safetensors"], "--decode-latents absent.safetensors does not exist"),
    (["--decode-latents", "notes.txt"], "holds no latents saved by hunyuan_apple"),
    (["--decode-latents", "notes.txt", "--steps", "3", "--prompt", "x"], "--prompt, --steps: --decode-latents only"),
    (["--decode-latents", "notes.txt", "--from-metadata", "frames.json"], "give one of them"),
])
def test_bad_files_one_sentence(env, tmp_path, args, words):
    """Settings files of the wrong kind or with values of the wrong type, latents that are not: one sentence."""
    (tmp_path / "notes.txt").write_text("a file, not settings")
    for name, settings in (("frames", {"prompt": "x", "frames": "nine"}), ("seed", {"prompt": "x", "seed": 1.5}),
                           ("prompt", {"prompt": 3}), ("list", ["prompt"])):
        (tmp_path / f"{name}.json").write_text(json.dumps(settings))
    iio.mimsave(tmp_path / "foreign.mp4", [np.zeros((32, 32, 3), np.uint8)] * 3, fps=8)  # an mp4 made elsewhere
    r = run(env, tmp_path, *args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_flags_beside_from_metadata_win_and_what_no_longer_applies_is_left_out(env, tmp_path, monkeypatch, capsys):
    """A video made with Radial Attention's and TaylorSeer's own settings, repeated with --attention dense, another
    --cache and fewer --steps: each runs, says which saved settings it left out, and records the new request."""
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", env["HUNYUAN_APPLE_CACHE"])
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--prompt", "a cat", *SMALL, "--steps", "4", "--attention", "radial", "--radial-block", "8",
                     "--radial-dense-steps", "3", "--cache", "taylorseer", "--cache-interval", "3", "--output",
                     "a.mp4"]) == 0
    for args, left_out, expected in (
            (["--attention", "dense", "--cache", "teacache"], "--radial-dense-steps 3, --radial-block 8 (saved)",
             dict(attention="dense", radial_block=None, cache="teacache", cache_interval=None)),
            (["--steps", "2"], "--radial-dense-steps 3 (saved)", dict(steps=2, radial_dense_steps=None,
                                                                     radial_block=8, cache_interval=3))):
        out = f"b{len(args)}.mp4"
        capsys.readouterr()
        assert cli.main(["--from-metadata", "a.json", *args, "--output", out]) == 0
        assert f"--from-metadata: left out {left_out}" in capsys.readouterr().err
        saved = json.loads((tmp_path / out).with_suffix(".json").read_text())
        assert {k: saved[k] for k in expected} == expected and saved["prompt"] == "a cat"
    assert cli.main(["--from-metadata", "a.json", "--cache", "teacache", "--output", "c.mp4"]) == 0
    assert "left out --cache-interval 3 (saved)" in capsys.readouterr().err
    assert cli.main(["--from-metadata", "a.json", "--radial-block", "3", "--output", "d.mp4"]) == 2  # typed: refused
    err = capsys.readouterr().err
    assert "--radial-block 3: use a power of two" in err and "left out" not in err


def test_an_output_another_run_is_writing_is_refused(env, tmp_path):
    """Two runs never write one video: a run holding the output's claim (here this test, as another process would)
    makes a second one with the same --output stop in one sentence, before any work; once released (or when the
    process that held it died, leaving the file unlocked), the output is free."""
    claim = cli.claim_output(tmp_path / "same.mp4")
    r = run(env, tmp_path, "--prompt", "a cat", *SMALL, "--output", "same.mp4")
    assert r.returncode == 2 and "--output same.mp4: another run is writing it now" in r.stderr, r.stderr
    assert "memory plan" not in r.stderr and not (tmp_path / "same.json").exists()
    claim.release()
    (tmp_path / ".same.mp4.claim").write_text("")  # a claim left unlocked by a run that died
    r = run(env, tmp_path, "--prompt", "a cat", *SMALL, "--output", "same.mp4")
    assert r.returncode == 0 and (tmp_path / "same.mp4").exists(), r.stderr
    assert not (tmp_path / ".same.mp4.claim").exists()  # released at the end


def test_two_runs_started_together_with_one_output(env, tmp_path):
    """Started at once: one writes the video, with its own settings beside it; the other is refused (while the
    first runs, or, if it came late, because the video exists) and leaves nothing."""
    runs = [subprocess.Popen([sys.executable, str(ROOT / "hunyuan_apple.py"), "--prompt", f"cat {i}", *SMALL, "--seed",
                              str(i), "--output", "one.mp4"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    results = [(p.wait(300), p.stderr.read()) for p in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    winner = next(i for i, (code, _) in enumerate(results) if code == 0)
    loser = results[1 - winner][1]
    assert "another run is writing it now" in loser or "one.json already exists" in loser, loser
    saved = json.loads((tmp_path / "one.json").read_text())
    assert (saved["seed"], saved["prompt"]) == (winner, f"cat {winner}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one.mp4"]


def test_truncated_weights_are_named_by_the_plan(env, tmp_path):
    """A weights file cut inside its header (0 or 100 bytes): the memory plan, which reads the headers first,
    says what the loader would say."""
    tiny = H.build_tiny_checkpoint(tmp_path / "tiny")
    for part, size in (("transformer", 0), ("vae", 100)):
        f = tiny / part / "diffusion_pytorch_model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[:size])
        r = run(env, tmp_path, "--model", tiny, "--prompt", "a cat", "--resolution", "48", "64", "--frames", "5")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"{f} could not be read as safetensors" in r.stderr and "probably truncated" in r.stderr, r.stderr
        assert "the tiny demo is built on this machine: delete its folder" in r.stderr, r.stderr  # not downloaded
        f.write_bytes(data)


def test_warnings_and_help(env, tmp_path):
    """Past 129 frames and far above the usual guidance, a warning (the request stands); --version; the sizes
    and the defaults in --help."""
    r = run({**env, "HUNYUAN_APPLE_MEMORY_GB": "1e-6"}, tmp_path, "--prompt", "a cat", *SMALL, "--frames", "133",
            "--guidance", "30")
    assert "warning: --frames 133 is more than HunyuanVideo (13B)'s longest clip (129)" in r.stderr, r.stderr
    assert "warning: --guidance 30.0 is far above" in r.stderr and "133 frames, 2 steps" in r.stderr
    r = run(env, tmp_path, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"hunyuan-apple {H.__version__} (MLX {mx.__version__})"
    r = run(env, tmp_path, "--help")
    assert r.returncode == 0 and "16:9 544x960" in r.stdout and "4:3 832x1104" in r.stdout
    assert "denoising steps (default 50)" in r.stdout and "(default 24)" in r.stdout
    assert "text to video, and image or video to video" in r.stdout
    r = run(env, tmp_path, "--prompt", "a cat", *SMALL, "--cfg-scale", "0.5", "--output", "half.mp4")
    assert r.returncode == 0 and "warning: --cfg-scale 0.5 has no effect" in r.stderr, r.stderr


def test_frames_far_too_many_are_refused_at_once(env, tmp_path):
    """The plan finds the longest clip that fits by bisection: 100001 frames are answered in seconds."""
    start = time.monotonic()
    r = run(env, tmp_path, "--prompt", "a cat", *SMALL, "--frames", "100001")
    assert r.returncode == 2 and re.search(r"try --frames \d+", r.stderr), r.stderr
    assert time.monotonic() - start < 60 and "Traceback" not in r.stderr

@pytest.mark.parametrize("args, size", [
    ([], (544, 960)), (["--aspect-ratio", "9:16"], (960, 544)), (["--quality", "720p"], (720, 1280)),
    (["--quality", "720p", "--aspect-ratio", "4:3"], (832, 1104)), (["--aspect-ratio", "1:1"], (720, 720)),
    (["--resolution", "480"], (480, 848)), (["--resolution", "480", "--aspect-ratio", "9:16"], (480, 272)),
    (["--resolution", "320", "512"], (320, 512)),
])
def test_sizes(args, size):
    s = cli.resolve(cli.parse_args(["--prompt", "x", *args]))._asdict()
    assert (s["height"], s["width"]) == size


def test_tiny_demo_is_small_unless_told(env, tmp_path):
    """The tiny demo's own sizes apply only to what the user left out: a flag typed with the default's value
    (--frames 13, --steps 50, --quality 540p) is honoured too. The plan refuses (a tiny budget) before any
    work, after the line that says what will run."""
    s = cli.resolve(cli.parse_args(["--prompt", "x", "--model", "tiny"]))._asdict()
    assert (s["height"], s["width"], s["frames"], s["steps"]) == (96, 160, 9, 8)
    s = cli.resolve(cli.parse_args(["--prompt", "x", "--model", "tiny", "--frames", "5", "--aspect-ratio",
                                    "1:1"]))._asdict()
    assert (s["height"], s["width"], s["frames"], s["steps"]) == (720, 720, 5, 8)
    copy = H.build_tiny_checkpoint(tmp_path / "copied")  # a demo under another name: still the demo's sizes
    s = cli.resolve(cli.parse_args(["--prompt", "x", "--model", str(copy)]))._asdict()
    assert (s["height"], s["width"], s["frames"], s["steps"]) == (96, 160, 9, 8)
    s = cli.resolve(cli.parse_args(["--prompt", "x", "--model", "tiny", "--preset", "skyreels"]))._asdict()
    assert (s["frames"], s["steps"], s["height"]) == (9, 30, 96)  # the preset's steps, not its 97 frames
    r = run({**env, "HUNYUAN_APPLE_MEMORY_GB": "1e-6"}, tmp_path, "--model", "tiny", "--prompt", "a cat", "--frames",
            "13", "--steps", "50", "--quality", "540p")
    assert r.returncode == 2 and "height 544, width 960, 13 frames, 50 steps" in r.stderr, r.stderr


@pytest.mark.parametrize("where, doing", [("denoise", "denoising"), ("decode", "decoding")])
def test_out_of_memory_is_one_sentence_and_keeps_the_latents(env, tmp_path, monkeypatch, capsys, where, doing):
    """MLX reports a failed allocation as a RuntimeError: the CLI says what ran out and what to try, exits 2,
    and keeps the denoised latents when it happens while decoding."""
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", env["HUNYUAN_APPLE_CACHE"])
    monkeypatch.chdir(tmp_path)

    def oom(*a, **k):
        raise RuntimeError("[metal::malloc] Attempting to allocate 68719476736 bytes which is greater than the "
                           "maximum allowed buffer size of 28991029248 bytes.")
    monkeypatch.setattr(H.HunyuanVideoPipeline, {"denoise": "_denoise"}.get(where, where), oom)
    assert cli.main(["--prompt", "a fox", *SMALL, "--output", "fox.mp4"]) == 2
    err = capsys.readouterr().err
    assert f"error: ran out of memory while {doing} ([metal::malloc] Attempting to allocate" in err
    assert "--low-memory" in err and "Traceback" not in err
    assert (tmp_path / "fox.latents.safetensors").exists() == (where == "decode")
    assert not (tmp_path / "fox.mp4").exists() and not list(tmp_path.glob(".*partial*"))


def test_latents_and_frames_are_written_under_temporary_names(env, tmp_path, monkeypatch):
    """The latents file and every PNG frame appear under their names only once complete."""
    import PIL.Image

    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", env["HUNYUAN_APPLE_CACHE"])
    monkeypatch.chdir(tmp_path)
    H.tiny_checkpoint()  # built (in its own temporary folder) before the writers are watched: alone, it is not yet
    written = []
    save_latents, save_png = mx.save_safetensors, PIL.Image.Image.save
    monkeypatch.setattr(mx, "save_safetensors", lambda f, *a, **k: written.append(Path(f)) or save_latents(f, *a, **k))
    monkeypatch.setattr(PIL.Image.Image, "save", lambda self, f, *a, **k: written.append(Path(getattr(f, "name", f)))
                        or save_png(self, f, *a, **k))  # a path, or a file opened on one
    assert cli.main(["--prompt", "a fox", *SMALL, "--output", "fox.mp4", "--frames-dir", "png"]) == 0
    assert written and all(f.name.startswith(".") and ".partial" in f.name for f in written), written
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"frame_{i:04d}.png" for i in range(9)]


def test_precision_flags_are_used_and_saved(env, tmp_path, monkeypatch):
    """--dit-dtype, --vae-dtype and --text-dtype reach the pipeline and the settings (so --from-metadata repeats
    them); --decode-latents takes a new --vae-dtype."""
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", env["HUNYUAN_APPLE_CACHE"])
    monkeypatch.chdir(tmp_path)
    seen = []
    real = H.HunyuanVideoPipeline.from_pretrained
    monkeypatch.setattr(H.HunyuanVideoPipeline, "from_pretrained",
                        lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    real_decode = H.HunyuanVideoPipeline.decode
    monkeypatch.setattr(H.HunyuanVideoPipeline, "decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    assert cli.main(["--prompt", "a fox", *SMALL, "--output", "fox.mp4", "--dit-dtype", "fp32", "--text-dtype",
                     "bf16"]) == 2
    assert seen[-1].dtypes == {"transformer": mx.float32, "vae": mx.float16, "text_encoders": mx.bfloat16}
    monkeypatch.setattr(H.HunyuanVideoPipeline, "decode", real_decode)
    assert cli.main(["--decode-latents", "fox.latents.safetensors", "--vae-dtype", "fp32"]) == 0
    assert seen[-1].dtypes == {"transformer": mx.float32, "vae": mx.float32, "text_encoders": mx.bfloat16}
    settings = json.loads((tmp_path / "fox.json").read_text())
    assert (settings["dit_dtype"], settings["vae_dtype"], settings["text_dtype"]) == ("fp32", "fp32", "bf16")


@pytest.mark.parametrize("value", ["abc", "-1"])
def test_bad_memory_variable_is_named_on_the_command_line(env, tmp_path, value):
    r = run({**env, "HUNYUAN_APPLE_MEMORY_GB": value}, tmp_path, "--prompt", "a cat", *SMALL)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: HUNYUAN_APPLE_MEMORY_GB='{value}': set it to the GiB a generation may use" in r.stderr


@pytest.mark.parametrize("value", ["1e308", "nan", "inf", "0"])
def test_memory_variable_out_of_range_is_one_sentence(tmp_path, monkeypatch, capsys, value):
    """Numbers that parse but cannot be a budget (too large to count in bytes, not finite, none): one sentence."""
    monkeypatch.setenv("HUNYUAN_APPLE_MEMORY_GB", value)
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path / "cache"))
    assert cli.main(["--prompt", "a cat", *SMALL, "--output", str(tmp_path / "a.mp4")]) == 2
    assert f"error: HUNYUAN_APPLE_MEMORY_GB='{value}': set it to the GiB a generation may use, above 0 and at most " \
           f"1048576" in capsys.readouterr().err


def test_cache_and_preset(env, tmp_path):
    """--cache reaches the sampler and the ledger; --preset gives its checkpoint and settings, under the flags
    typed."""
    r = run(env, tmp_path, "--prompt", "a cat", *SMALL, "--steps", "10", "--cache", "magcache", "--output", "c.mp4")
    assert r.returncode == 0, r.stderr
    work = json.loads((tmp_path / "c.json").read_text())["work"]
    assert work["skipped"] > 0 and work["forwards"] + work["skipped"] == 10, work  # MagCache's ratios decide alone
    assert f"DiT forwards: {work['forwards']} computed, {work['skipped']} skipped (magcache, dense attention)" in r.stdout
    s = cli.resolve(cli.parse_args(["--prompt", "x", "--preset", "fasthunyuan"]))._asdict()
    assert (s["model"], s["steps"], s["shift"], s["guidance"]) == ("FastVideo/FastHunyuan-diffusers", 6, 17.0, 6.0)
    s = cli.resolve(cli.parse_args(["--prompt", "x", "--preset", "fasthunyuan", "--model", "tiny", "--steps",
                                    "3"]))._asdict()
    assert (s["model"], s["steps"], s["shift"], s["preset"]) == ("tiny", 3, 17.0, "fasthunyuan")
    s = cli.resolve(cli.parse_args(["--prompt", "x", "--preset", "fasthunyuan", "--model", "tiny"]))._asdict()
    assert (s["steps"], s["frames"], s["height"]) == (6, 9, 96)  # the preset's steps; the demo's size


def test_interrupted_run_resumes_to_the_same_video(env, tmp_path):
    """A real SIGINT during denoising leaves a checkpoint and says how to resume; --resume gives the frames
    and the work ledger of an uninterrupted run with the same seed (TeaCache's state carried over too), and
    removes the checkpoint. A damaged checkpoint, a missing one, a setting that disagrees: one sentence each;
    a fresh run then needs --overwrite to replace the checkpoint."""
    import signal
    # 200 steps (about 2 s of denoising): the interrupt lands mid-run even when this machine is loaded
    args = ["--model", "tiny", "--prompt", "a cat", "--steps", "200", "--seed", "5", "--cache", "teacache"]
    assert run(env, tmp_path, *args, "--output", "full.mp4").returncode == 0
    # a shell started as a background job ignores SIGINT, and its children inherit that: the child restores it
    p = subprocess.Popen([sys.executable, str(ROOT / "hunyuan_apple.py"), *args, "--output", "cut.mp4",
                          "--checkpoint-every", "0"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not (tmp_path / "cut.partial.safetensors").exists() and p.poll() is None:
        time.sleep(0.002)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130, err
    step = int(re.search(r"interrupted after step (\d+) of 200: continue with\n.* --resume cut.partial.safetensors",
                         err).group(1))
    assert 0 < step < 200 and not (tmp_path / "cut.mp4").exists()

    r = run(env, tmp_path, "--resume", "cut.partial.safetensors", "--steps", "50")
    assert r.returncode == 2 and "--steps 50 (the checkpoint: 200): a resumed run keeps" in r.stderr, r.stderr
    other = H.build_tiny_checkpoint(tmp_path / "other", seed=1)  # the same shapes, other weights
    r = run(env, tmp_path, "--resume", "cut.partial.safetensors", "--model", other)
    assert r.returncode == 2 and f"--model {other} is not the model this run started with (tiny)" in r.stderr, r.stderr
    moved = tmp_path / "moved"  # a copy of the checkpoint the run started with, elsewhere: accepted
    shutil.copytree(Path(env["HUNYUAN_APPLE_CACHE"]) / f"tiny-{H.__version__}", moved)
    r = run(env, tmp_path, "--resume", "cut.partial.safetensors", "--model", moved)
    assert r.returncode == 0 and f"resuming after step {step} of 200" in r.stderr, r.stderr
    assert np.array_equal(read_frames(tmp_path / "cut.mp4"), read_frames(tmp_path / "full.mp4"))
    work = [json.loads((tmp_path / f"{name}.json").read_text())["work"] for name in ("cut", "full")]
    assert work[0] == work[1] and work[0]["skipped"] > 0
    assert not (tmp_path / "cut.partial.safetensors").exists()

    (tmp_path / "bad.partial.safetensors").write_bytes(b"\0" * 100)
    for target, words in (("bad.partial.safetensors", "is not a checkpoint hunyuan_apple can resume"),
                          ("gone.partial.safetensors", "--resume gone.partial.safetensors does not exist: check the path")):
        r = run(env, tmp_path, "--resume", target)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run(env, tmp_path, *SMALL, "--prompt", "a cat", "--output", "bad.mp4")  # afresh: the checkpoint is kept
    assert r.returncode == 2 and "bad.partial.safetensors already exists: pass --overwrite" in r.stderr, r.stderr
    assert run(env, tmp_path, *SMALL, "--prompt", "a cat", "--output", "bad.mp4", "--overwrite").returncode == 0


def test_preview_is_written_after_every_step(env, tmp_path, monkeypatch):
    """--preview: NAME.preview.png appears after the first step and is rewritten after each one, a strip of the
    predicted frames at 1/8 of the video's size (up to 8 of them)."""
    import PIL.Image

    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", env["HUNYUAN_APPLE_CACHE"])
    monkeypatch.chdir(tmp_path)
    seen = []
    real = PIL.Image.Image.save

    def save(self, f, *a, **k):
        if "preview" in str(f):
            seen.append((self.size, (tmp_path / "fox.preview.png").exists()))
        return real(self, f, *a, **k)
    monkeypatch.setattr(PIL.Image.Image, "save", save)
    assert cli.main(["--prompt", "a fox", *SMALL, "--steps", "3", "--output", "fox.mp4", "--preview"]) == 0
    assert seen == [((3 * 64 // 8, 48 // 8), False), ((24, 6), True), ((24, 6), True)]  # 3 latent frames of 6 x 8
    assert iio.imread(tmp_path / "fox.preview.png").shape == (6, 24, 3)
    r = run(env, tmp_path, "--prompt", "a fox", *SMALL, "--output", "fox.mp4", "--preview")  # the names are taken
    assert r.returncode == 2 and "fox.mp4 already exists" in r.stderr


def test_preview_of_the_clean_latents():
    """The preview is ComfyUI's linear map of the x0 estimate: channels times its factors plus its bias, from
    [-1, 1] to 0..255; zero latents give the bias's colour."""
    x0 = mx.zeros((1, 2, 3, 4, 16))
    frames = H.latent_preview(x0)
    assert frames.shape == (2, 3, 4, 3) and (frames == np.round((H.LATENT_RGB_BIAS + 1) / 2 * 255)).all()
    one = mx.zeros((1, 1, 1, 1, 16)).at[..., 12].add(1.0)  # channel 12: the strongest, darkens every colour
    assert (H.latent_preview(one)[0, 0, 0] < frames[0, 0, 0]).all()


def tiny_lora(path, seed=0):
    """A LoRA for the tiny demo's DiT (width 64), in the original layout."""
    from safetensors.numpy import save_file
    g = np.random.default_rng(seed)
    sd = {}
    for name, out in (("double_blocks.0.img_attn_qkv", 192), ("single_blocks.0.linear1", 448)):
        sd[f"diffusion_model.{name}.lora_A.weight"] = (g.standard_normal((4, 64)) / 8).astype(np.float32)
        sd[f"diffusion_model.{name}.lora_B.weight"] = g.standard_normal((out, 4)).astype(np.float32)
    save_file(sd, path)
    return path


def test_lora_negative_prompt_and_video_to_video(env, tmp_path):
    """--lora FILE:SCALE, --negative-prompt (true CFG at 6 unless --cfg-scale says), --video/--strength: each used
    as typed, recorded in the settings, and --from-metadata repeats them."""
    tiny_lora(tmp_path / "style.safetensors")
    base = ["--prompt", "a cat", *SMALL, "--seed", "2"]
    assert run(env, tmp_path, *base, "--output", "plain.mp4").returncode == 0
    r = run(env, tmp_path, *base, "--lora", "style.safetensors:0.5", "--negative-prompt", "blurry", "--output", "l.mp4")
    assert r.returncode == 0, r.stderr
    assert "true CFG 6.0 (batched), LoRA style.safetensors x0.5" in r.stderr
    s = json.loads((tmp_path / "l.json").read_text())
    assert (s["loras"], s["negative_prompt"], s["cfg_scale"], s["work"]["forwards"]) == (
        [[str(tmp_path / "style.safetensors"), 0.5]], "blurry", 6.0, 4)  # inputs by absolute path
    assert not np.array_equal(read_frames(tmp_path / "l.mp4"), read_frames(tmp_path / "plain.mp4"))
    (tmp_path / "elsewhere").mkdir()  # repeated from another folder: the LoRA is still found
    assert run(env, tmp_path / "elsewhere", "--from-metadata", "../l.json", "--output", "again.mp4").returncode == 0
    assert np.array_equal(read_frames(tmp_path / "elsewhere" / "again.mp4"), read_frames(tmp_path / "l.mp4"))

    iio.mimsave(tmp_path / "in.mp4", list(np.random.default_rng(0).integers(0, 255, (10, 40, 72, 3), np.uint8)),
                fps=8, macro_block_size=8)
    r = run(env, tmp_path, "--prompt", "a cat", "--model", "tiny", "--steps", "4", "--video", "in.mp4",
            "--strength", "0.5", "--output", "v.mp4")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "v.json").read_text())
    assert (s["frames"], s["height"], s["width"], s["strength"], s["work"]["forwards"]) == (9, 48, 80, 0.5, 2)
    assert read_frames(tmp_path / "v.mp4").shape == (9, 48, 80, 3)
    assert s["video"] == str(tmp_path / "in.mp4")
    r = run(env, tmp_path, "--prompt", "a cat", "--model", "tiny", "--steps", "4", "--video", "in.mp4",
            "--strength", "0", "--output", "kept.mp4")  # nothing to denoise: the encoded video, decoded
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert json.loads((tmp_path / "kept.json").read_text())["work"]["forwards"] == 0


@pytest.mark.parametrize("args, words", [
    (["--lora", "style.safetensors:strong"], "the LoRA's scale 'strong' is not a number"),
    (["--lora", "absent.safetensors"], "the LoRA absent.safetensors does not exist"),
    (["--lora", "notes.txt"], "neither .safetensors nor .pt"),
    (["--lora", "cut.safetensors"], "could not be read as safetensors"),
    (["--lora", "other.safetensors"], "matches no layer of HunyuanVideo's DiT"),
    (["--lora", "demo/cut.safetensors"], "demo/cut.safetensors could not be read as safetensors (tensors past the end "
                                         "of the file); it is probably truncated or corrupt: download it again"),
    (["--transformer", "demo/cut.safetensors"], "corrupt: download it again"),
    (["--video", "absent.mp4"], "the video absent.mp4 does not exist"),
    (["--video", "notes.mp4"], "the video notes.mp4 could not be read"),
    (["--video", "in.mp4", "--frames", "13"], "the video has 5 frames, fewer than the 13 asked: ask for 5 or fewer"),
    (["--video", "in.mp4", "--strength", "1.5"], "strength 1.5: use a number from 0"),
    (["--strength", "0.5"], "--strength applies to video to video: give --video too"),
    (["--cfg-scale", "-2", "--negative-prompt", "x"], "--cfg-scale -2.0: use a number of 0 or more"),
    (["--video", "in.mp4", "--output", "in.mp4"], "in.mp4 is the --video input"),
    (["--lora", "style.safetensors", "--lora", "style.safetensors:0.5"], "the LoRA style.safetensors is given twice"),
    (["--lora", "int.safetensors"], "the LoRA int.safetensors holds integer tensors"),
    (["--video", "still.png"], "--video still.png has 1 frame: video to video starts from a video of 5 frames"),
    (["--video", "short.mp4"], "--video short.mp4 has 3 frames: video to video starts from a video of 5 frames"),
])
def test_bad_lora_video_and_guidance_one_sentence(env, tmp_path, args, words):
    from safetensors.numpy import save_file
    tiny_lora(tmp_path / "style.safetensors")
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "notes.mp4").write_text("not a video")
    data = (tmp_path / "style.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    if "demo/cut.safetensors" in args:  # the user's own file kept in a tiny demo's folder is not the demo's
        H.build_tiny_checkpoint(tmp_path / "demo")
        (tmp_path / "demo/cut.safetensors").write_bytes(data[:len(data) // 2])
    save_file({"lora_unet_down_blocks_0_proj_in.lora_down.weight": np.zeros((4, 8), np.float32)},
              tmp_path / "other.safetensors")
    iio.mimsave(tmp_path / "in.mp4", [np.zeros((48, 64, 3), np.uint8)] * 5, fps=8)
    iio.mimsave(tmp_path / "short.mp4", [np.zeros((48, 64, 3), np.uint8)] * 3, fps=8)
    iio.imwrite(tmp_path / "still.png", np.zeros((48, 64, 3), np.uint8))
    save_file({"diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight": np.ones((4, 64), np.int32),
               "diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight": np.ones((192, 4), np.int32)},
              tmp_path / "int.safetensors")
    r = run(env, tmp_path, "--prompt", "a cat", "--model", "tiny", "--steps", "1", *[a for a in args])
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "memory plan" not in r.stderr  # refused before anything loads


def test_skyreels_preset_and_guidance_settings():
    s = cli.resolve(cli.parse_args(["--prompt", "a man walks", "--preset", "skyreels"]))._asdict()
    assert (s["model"], s["transformer"], s["steps"], s["guidance"], s["cfg_scale"], s["height"], s["width"],
            s["frames"], s["prompt"]) == (H.DEFAULT_MODEL, "Skywork/SkyReels-V1-Hunyuan-T2V", 30, 1.0, 6.0, 544, 960,
                                          97, "FPS-24, a man walks")
    assert s["negative_prompt"].startswith("Aerial view, aerial view, overexposed")
    s = cli.resolve(cli.parse_args(["--prompt", "FPS-24, a man", "--preset", "skyreels", "--cfg-scale", "4",
                                    "--model", "tiny"]))._asdict()
    assert (s["prompt"], s["cfg_scale"], s["transformer"]) == ("FPS-24, a man", 4.0, None)  # the demo's own DiT
    s = cli.resolve(cli.parse_args(["--prompt", "x", "--cfg-scale", "3"]))._asdict()
    assert (s["negative_prompt"], s["cfg_scale"]) == ("", 3.0)  # the plain unconditional branch
    with pytest.warns(UserWarning, match="has no effect"):
        cli.resolve(cli.parse_args(["--prompt", "x", "--negative-prompt", "y", "--cfg-scale", "1"]))
    assert H.parse_lora("a:b/c.safetensors") == ["a:b/c.safetensors", 1.0]
    assert H.parse_lora("style.safetensors:0.25") == ["style.safetensors", 0.25]


def test_a_cache_folder_that_cannot_be_made_and_weights_that_give_nan(env, tmp_path):
    """HUNYUAN_APPLE_CACHE naming a file: one sentence on where to build the demo. A LoRA of NaNs: the run stops at
    the first step in one sentence naming the phase, and writes no (black) video."""
    from safetensors.numpy import save_file
    (tmp_path / "afile").write_text("")
    r = run({**env, "HUNYUAN_APPLE_CACHE": str(tmp_path / "afile")}, tmp_path, "--prompt", "a cat", *SMALL)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot build the tiny demo checkpoint" in r.stderr and "set HUNYUAN_APPLE_CACHE" in r.stderr, r.stderr
    lora = mx.load(str(tiny_lora(tmp_path / "x.safetensors")))
    save_file({k: np.full(v.shape, np.nan, np.float32) for k, v in lora.items()}, tmp_path / "nan.safetensors")
    r = run(env, tmp_path, "--prompt", "a cat", *SMALL, "--lora", "nan.safetensors", "--output", "nan.mp4")
    assert r.returncode == 2 and "error: denoising gave NaN or infinite latents at step 1" in r.stderr, r.stderr
    assert not (tmp_path / "nan.mp4").exists() and "Traceback" not in r.stderr

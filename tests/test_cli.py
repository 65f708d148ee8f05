"""hunyuan_apple.py as a user runs it, on the offline tiny checkpoint (--model tiny): the files it writes, read
back; the settings round trip; recovery from a failed decode; and one clear sentence for bad input."""

import json
import os
import subprocess
import sys
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
    assert settings | {"version": None} == {"prompt": "a cat walks on the grass", "seed": 3, "steps": 2, "guidance": 6.0,
                                            "shift": 7.0, "height": 48, "width": 64, "frames": 9, "model": "tiny",
                                            "quantization": None, "quantize_modulation": False, "dit_dtype": "bf16",
                                            "vae_dtype": "fp16", "text_dtype": "fp16", "fps": 24, "version": None}
    assert not list((tmp_path / "v").glob("*.latents.safetensors")) and not list((tmp_path / "v").glob(".*"))
    for phase in ("text encoders", "denoise", "decode"):
        assert phase in r.stdout
    assert "denoising [" in r.stderr and "s/step" in r.stderr and "ETA" in r.stderr
    # the mp4 carries its settings: --from-metadata on the video repeats the generation exactly
    r = run(env, tmp_path, "--from-metadata", "v/cat.mp4", "--output", "again.mp4")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "again.json").read_text()) == settings
    assert np.array_equal(read_frames(tmp_path / "again.mp4"), frames)
    # an existing file is not replaced without --overwrite
    r = run(env, tmp_path, "--from-metadata", "v/cat.json", "--output", "again.mp4")
    assert r.returncode == 2 and "already exists: pass --overwrite" in r.stderr
    assert run(env, tmp_path, "--from-metadata", "v/cat.json", "--output", "again.mp4", "--overwrite").returncode == 0


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


@pytest.mark.parametrize("args, words", [
    (["--frames", "12"], "4n+1"),
    (["--resolution", "540", "960"], "multiples of 16"),
    (["--aspect-ratio", "5:4"], "invalid choice: '5:4'"),
    (["--quantization", "fp16"], "invalid choice: 'fp16'"),
    (["--steps", "0"], "at least 1"),
    (["--prompt", "  "], "prompt is empty"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--model", "missing/model/folder"], "does not exist"),
    (["--model", "."], "lacks transformer"),  # a folder, but not a checkpoint
    (["--output", "notes.txt/video.mp4"], "cannot write to notes.txt"),
    (["--output", "video.avi"], "end the name with .mp4"),
])
def test_bad_input_one_sentence(env, tmp_path, args, words):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    base = ["--prompt", "a cat", *SMALL]
    r = run(env, tmp_path, *base, *args)
    assert r.returncode == 2, r
    assert words in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, size", [
    ([], (544, 960)), (["--aspect-ratio", "9:16"], (960, 544)), (["--quality", "720p"], (720, 1280)),
    (["--quality", "720p", "--aspect-ratio", "4:3"], (832, 1104)), (["--aspect-ratio", "1:1"], (720, 720)),
    (["--resolution", "480"], (480, 848)), (["--resolution", "480", "--aspect-ratio", "9:16"], (480, 272)),
    (["--resolution", "320", "512"], (320, 512)),
])
def test_sizes(args, size):
    ap, a = cli.parse_args(["--prompt", "x", *args])
    s = cli.resolve(ap, a)
    assert (s["height"], s["width"]) == size


def test_tiny_demo_is_small_unless_told():
    ap, a = cli.parse_args(["--prompt", "x", "--model", "tiny"])
    s = cli.resolve(ap, a)
    assert (s["height"], s["width"], s["frames"], s["steps"]) == (96, 160, 9, 8)
    ap, a = cli.parse_args(["--prompt", "x", "--model", "tiny", "--frames", "5", "--aspect-ratio", "1:1"])
    s = cli.resolve(ap, a)
    assert (s["height"], s["width"], s["frames"], s["steps"]) == (720, 720, 5, 8)


@pytest.mark.parametrize("where, doing", [("denoise", "denoising"), ("decode", "decoding")])
def test_out_of_memory_is_one_sentence_and_keeps_the_latents(env, tmp_path, monkeypatch, capsys, where, doing):
    """MLX reports a failed allocation as a RuntimeError: the CLI says what ran out and what to try, exits 2,
    and keeps the denoised latents when it happens while decoding."""
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", env["HUNYUAN_APPLE_CACHE"])
    monkeypatch.chdir(tmp_path)

    def oom(*a, **k):
        raise RuntimeError("[metal::malloc] Attempting to allocate 68719476736 bytes which is greater than the "
                           "maximum allowed buffer size of 28991029248 bytes.")
    monkeypatch.setattr(H.HunyuanVideoPipeline, where, oom)
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
    written = []
    save_latents, save_png = mx.save_safetensors, PIL.Image.Image.save
    monkeypatch.setattr(mx, "save_safetensors", lambda f, *a, **k: written.append(Path(f)) or save_latents(f, *a, **k))
    monkeypatch.setattr(PIL.Image.Image, "save", lambda self, f, *a, **k: written.append(Path(f)) or
                        save_png(self, f, *a, **k))
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
                        lambda *a, **k: seen.append(k["dtypes"]) or real(*a, **k))
    real_decode = H.HunyuanVideoPipeline.decode
    monkeypatch.setattr(H.HunyuanVideoPipeline, "decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    assert cli.main(["--prompt", "a fox", *SMALL, "--output", "fox.mp4", "--dit-dtype", "fp32", "--text-dtype",
                     "bf16"]) == 2
    assert seen[-1] == {"transformer": mx.float32, "vae": mx.float16, "text_encoders": mx.bfloat16}
    monkeypatch.setattr(H.HunyuanVideoPipeline, "decode", real_decode)
    assert cli.main(["--decode-latents", "fox.latents.safetensors", "--vae-dtype", "fp32"]) == 0
    assert seen[-1] == {"transformer": mx.float32, "vae": mx.float32, "text_encoders": mx.bfloat16}
    settings = json.loads((tmp_path / "fox.json").read_text())
    assert (settings["dit_dtype"], settings["vae_dtype"], settings["text_dtype"]) == ("fp32", "fp32", "bf16")

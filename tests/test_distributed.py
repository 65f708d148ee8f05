"""Several processes on one video (sequence parallel, CFG parallel, the decode's tiles shared), live: mlx.launch starts
2, 3 and 4 ranks on this machine with the ring backend (TCP on localhost), on the tiny checkpoints in float32.

Bounds: the split runs' final latents against one process's, max |difference| <= 1e-6 x max |latents| (measured:
0.0 exactly at 2, 3 and 4 ranks: every rank computes its rows with the same kernels over the same keys); the frames of
the videos, equal (measured: equal). A rank's missing tokens, a RoPE table not shifted to its slice, Radial Attention's
blocks taken from the wrong rows or a cache deciding from one rank's norms are all far above it (a step cache's
decisions, and the changes they decide from, are compared too)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import distributed_scenarios as D
import HunyuanVideo_Apple as H
import hunyuan_apple as cli

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
LAUNCH = str(Path(PYTHON).with_name("mlx.launch"))
TOL = 1e-6
# a step cache's measured changes: sums over every rank's tokens, in another order than one process's float32 sum
# (measured: up to 3.7e-6 relative; changes measured over one rank's tokens alone fail it)
CHANGE_TOL = 1e-5


def launch(n, *args, cwd=None, timeout=240, wait=True):
    """mlx.launch -n N --backend ring of a Python script and its arguments: the finished process (or, wait=False,
    the running one, in its own session)."""
    cmd = [LAUNCH, "-n", str(n), "--backend", "ring", "--python", PYTHON, *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny text-to-video and image-to-video checkpoints (and HunyuanVideo 1.5's, saved by diffusers' pipeline),
    an image, and one process's results of every scenario."""
    from test_hunyuanvideo15_pipeline import reference_pipeline

    root = tmp_path_factory.mktemp("distributed")
    reference_pipeline(root / "hv15", 4.0)
    (root / "hv15" / "ckpt").rename(root / "t2v15")  # beside t2v, where distributed_scenarios.py finds it
    folders = {"t2v": H.build_tiny_checkpoint(root / "t2v"),
               "i2v": H.build_tiny_checkpoint(root / "i2v", image_condition="token_replace"), "t2v15": root / "t2v15"}
    image = root / "image.png"
    Image.fromarray((np.random.default_rng(0).random((120, 200, 3)) * 255).astype(np.uint8)).save(image)
    one = {name: D.generate(name, folders, image) for name in [*D.SCENARIOS, "decode"]}
    return root, folders, image, one


def split_run(tiny, n, names=()):
    """The scenarios run by n ranks: {name: (latents, work)} as rank 0 wrote them."""
    root, folders, image, _ = tiny
    out = root / f"ranks{n}"
    out.mkdir(exist_ok=True)
    done = launch(n, ROOT / "tests" / "distributed_scenarios.py", folders["t2v"], folders["i2v"], image, out, *names)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return {f.stem: (np.load(f)["latents"], json.loads(str(np.load(f)["work"]))) for f in out.glob("*.npz")}


def per_forward(video, ranks, width=64, blocks=2, out=64, itemsize=4):
    """The bytes one rank receives a DiT forward, as the notes count them: (N - 1) of the N equal slices (the
    last one padded to the others' size) of each block's keys and values, and of the velocity at the end."""
    per = math.ceil(video / ranks)
    return (ranks - 1) * per * itemsize * (blocks * 2 * width + out)


@pytest.mark.parametrize("n", [2, 3])
def test_split_runs_equal_one_process(tiny, n):
    """Plain text to video, First-Block Cache at a threshold that skips some steps, Radial Attention (16-token
    blocks: 77-token frames cross them, and ranks' slices start inside them), true CFG without and with a step cache
    (CFG parallel at 2 ranks: each rank one branch; at 3, both branches split three ways), token-replace image to
    video, an int8 DiT, HunyuanVideo 1.5 with true CFG (its four text encodings sent by rank 0), and (at 2 ranks) the
    VAE's tiles shared: each within TOL of one process, the caches' steps the same; 3 ranks split the video's 308
    tokens 103, 103, 102."""
    names = [*D.SCENARIOS, *(["decode"] if n == 2 else [])]  # 27 tiles: a last round of one tile on 2 ranks
    one, split = tiny[3], split_run(tiny, n, names)
    assert set(split) == set(names)
    for name, (latents, work) in split.items():
        ref, ref_work = one[name]
        err = np.abs(latents - ref).max() / np.abs(ref).max()
        assert err <= TOL, (name, err)
        if name == "decode":
            continue
        assert work["steps"] == ref_work["steps"], name
        # over all the tokens; with CFG parallel, rank 0 measures its branch's alone (one process alternates them)
        changes = ref_work["changes"][::2] if name == "cfg_fbcache" and n == 2 else ref_work["changes"]
        assert np.allclose(work["changes"], changes, rtol=CHANGE_TOL, atol=0), name
        assert work["ranks"] == n and work["received_bytes"] > 0, (name, work)
    for name in ("fbcache", "cfg_fbcache"):
        assert split[name][1]["skipped"] > 0 and split[name][1]["forwards"] > 1
    assert len(split["fbcache"][1]["changes"]) == 7
    assert one["radial"][0].tolist() != one["t2v"][0].tolist()  # Radial Attention did drop blocks
    # the bytes counted by the code, against the notes' formula (4 steps, no cache; CFG parallel at 2 ranks: each
    # step the other half's velocity, 64 values a token, and its branch's work as two int32)
    video = 4 * 7 * 11
    assert split["t2v"][1]["received_bytes"] == 4 * per_forward(video, n)
    cfg = 4 * (video * 64 * 4 + 2 * 4) if n == 2 else 4 * 2 * per_forward(video, n)
    assert split["cfg"][1]["received_bytes"] == cfg


def test_sequence_and_cfg_parallel_at_four_ranks(tiny):
    """4 ranks, true CFG: two halves each split the video over 2 ranks and run one branch (the ring backend cannot
    split its group: the keys come over all four, the other half's dropped); with a step cache, whose branches skip
    different steps, both branches over all four ranks."""
    one, split = tiny[3], split_run(tiny, 4, ["cfg", "cfg_fbcache"])
    for name, (latents, work) in split.items():
        assert np.abs(latents - one[name][0]).max() <= TOL * np.abs(one[name][0]).max(), name
        assert work["steps"] == one[name][1]["steps"]


def test_bytes_at_full_size_match_the_notes():
    """544x960x129: 67,320 video tokens; each block's keys and values in bf16 are 2 x 413 MB, 60 blocks about 50 GB
    a forward, of which a rank receives (N - 1) / N (../shared/notes/several-machines.md)."""
    tokens = 33 * 34 * 60
    kv = 60 * 2 * tokens * 3072 * 2
    for n in (2, 4, 8):
        got = H.split_bytes(tokens, 1, 3072, 20, 40, 64, n)
        assert got == pytest.approx(kv * (n - 1) / n, rel=2e-3), n  # padding and the velocity: under 0.2%
    assert kv == pytest.approx(49.6e9, rel=1e-3)


def test_memory_plan_per_rank(tiny):
    """A rank's denoising phase holds its share of the tokens' activations: less than one process's, and the gathered
    keys and values make up the difference's rest (at 720x1280x129 bf16)."""
    folder = tiny[1]["t2v"]
    big = {"transformer": H.mx.bfloat16}
    plans = [H.estimate_memory(folder, 720, 1280, 129, dtypes=big, ranks=n, backend="gpu")["denoise"]
             for n in (1, 2, 4)]
    assert plans[0] > plans[1] > plans[2]


def frames_of(folder):
    return np.stack([np.asarray(Image.open(f)) for f in sorted(Path(folder).glob("frame_*.png"))])


def rank_pid(launcher, rank):
    """The process of a rank that mlx.launch started (by its MLX_RANK)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in environ and b"hunyuan_apple.py" in cmdline and int(pid) != launcher.pid:
            return int(pid)
    raise AssertionError(f"rank {rank} not found")


def test_killed_rank_stops_the_run_and_resume_finishes_it(tiny, tmp_path, monkeypatch):
    """Two ranks of the command line, First-Block Cache on, a checkpoint after every step; rank 1 killed mid-run:
    rank 0 exits within 30 s with one sentence naming rank 1 and its host, the checkpoint stays; --resume under two
    ranks finishes it, writing the mp4 once (rank 0): its frames are one uninterrupted process's."""
    folder = tiny[1]["t2v"]
    flags = ["--model", folder, "--prompt", "a cat", "--seed", "5", "--steps", "100", "--resolution", "64", "96",
             "--frames", "13", "--dit-dtype", "fp32", "--vae-dtype", "fp32", "--text-dtype", "fp32", "--cache",
             "fbcache", "--cache-threshold", "0.28", "--no-prompt-cache"]
    monkeypatch.chdir(tmp_path)
    assert cli.main([*map(str, flags), "--output", "whole.mp4", "--frames-dir", "whole"]) == 0  # one process: this
    run = launch(2, ROOT / "hunyuan_apple.py", *flags, "--output", "split.mp4", "--checkpoint-every", "0",
                 cwd=tmp_path, wait=False)
    checkpoint = tmp_path / "split.partial.safetensors"
    try:
        start = time.monotonic()
        while not checkpoint.exists():
            assert run.poll() is None and time.monotonic() - start < 120, run.stdout and run.stdout.read()
            time.sleep(0.01)
        os.kill(rank_pid(run, 1), signal.SIGKILL)
        killed = time.monotonic()
        out, _ = run.communicate(timeout=60)
        assert time.monotonic() - killed < 30
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    said = errors(out)
    assert len(said) == 1 and re.search(r"rank 0 on \S+: rank 1 on \S+ stopped", said[0]), out[-3000:]
    assert "--resume" in out and checkpoint.exists() and not (tmp_path / "split.mp4").exists()
    done = launch(2, ROOT / "hunyuan_apple.py", "--resume", checkpoint, "--frames-dir", "resumed", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 3  # the mp4, its JSON, the frames: once
    assert not checkpoint.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed", "split.json", "split.mp4", "whole", "whole.json",
                                                          "whole.mp4"]
    assert np.array_equal(frames_of(tmp_path / "resumed"), frames_of(tmp_path / "whole"))
    assert np.array_equal(mp4_frames(tmp_path / "split.mp4"), mp4_frames(tmp_path / "whole.mp4"))


def errors(output):
    """The error sentences the ranks said: each from "error: " to its line's end (mlx.launch writes its own notices
    into the same stream, at times in the middle of a line it relays)."""
    return re.findall(r"error: .*", output)


def mp4_frames(path):
    import imageio.v2 as iio

    with iio.get_reader(str(path), format="FFMPEG") as r:
        return np.stack(list(r.iter_data()))


def rank_1_also(tmp_path, *flags):
    """A script that runs the command line with `flags` added on rank 1 alone."""
    script = tmp_path / "rank1.py"
    script.write_text(f"import os, runpy, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                      f"if os.environ.get('MLX_RANK') == '1':\n    sys.argv += {list(map(str, flags))!r}\n"
                      f"sys.argv[0] = {str(ROOT / 'hunyuan_apple.py')!r}\n"
                      f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return script


def test_ranks_that_differ_are_refused_before_loading(tiny, tmp_path):
    """Rank 1 given another --shift: every rank stops before the DiT loads, and rank 0 alone says so, naming rank 1
    and its host and the setting; a request every rank refuses is said once (by rank 0: the others wait for it to
    end); one that rank 1 alone refuses (its --model missing) is said by rank 1, and rank 0 names rank 1."""
    flags = ["--model", tiny[1]["t2v"], "--prompt", "a cat", "--steps", "2", "--output", "x.mp4", "--no-prompt-cache"]
    done = launch(2, rank_1_also(tmp_path, "--shift", "5"), *flags, cwd=tmp_path)
    said = errors(done.stderr)
    assert len(said) == 1 and re.search(r"rank 1 on \S+ would make another video than rank 0 on \S+: the settings "
                                        r"differ \(shift\)", said[0]), done.stderr[-3000:]
    assert "loading the DiT" not in done.stderr and not list(tmp_path.glob("x*"))
    done = launch(2, ROOT / "hunyuan_apple.py", *flags, "--frames", "10", cwd=tmp_path)
    assert errors(done.stderr) == [
        "error: --frames 10: the frame count must be 4n+1 (1, 5, 9, ... 129); try 9."], done.stderr[-3000:]
    done = launch(2, rank_1_also(tmp_path, "--model", tmp_path / "nowhere"), *flags, cwd=tmp_path)
    said = sorted(errors(done.stderr))
    assert len(said) == 2 and re.fullmatch(r"error: rank 0 on \S+: rank 1 stopped, so every rank of the run stops\.",
                                           said[0]), done.stderr[-3000:]
    assert re.match(rf"error: rank 1 on \S+: the --model {tmp_path / 'nowhere'} does not exist", said[1]), said

"""convert_weights.py and bench_hunyuan_apple.py as a user runs them (hunyuan_apple.py: test_cli.py)."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_transformer import CONFIGS, make_inputs, make_reference, run_ours

import HunyuanVideo_Apple as H

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, env=None):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=env)


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "transformer"
    make_reference(CONFIGS["uneven-rope-no-guidance"]["model"]).save_pretrained(path)
    return path


def test_convert_reloads_identically(diffusers_folder, tmp_path):
    r = run("convert_weights.py", "--model", diffusers_folder, "--output", tmp_path / "mlx", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "mlx").iterdir()) == ["config.json", "model.safetensors"]
    direct = H.load_transformer(diffusers_folder, dtype=mx.float32)
    converted = H.load_transformer(tmp_path / "mlx", dtype=mx.float32)
    a, b = dict(tree_flatten(direct.parameters())), dict(tree_flatten(converted.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
    inputs = make_inputs(CONFIGS["uneven-rope-no-guidance"])
    assert np.array_equal(run_ours(direct, inputs), run_ours(converted, inputs))
    # an existing output is never overwritten
    r = run("convert_weights.py", "--model", diffusers_folder, "--output", tmp_path / "mlx")
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr


def test_bench_tiny_prints_a_table():
    r = run("bench_hunyuan_apple.py", "--tiny", "--repeat", "1", "--sizes", "32x48x5")
    assert r.returncode == 0, r.stderr
    row = r.stdout.strip().splitlines()[-1].split()
    assert row[0] == "32x48x5" and int(row[1]) == 2 * 2 * 3 + 256 and float(row[3]) > 0


def test_bench_flop_count_matches_the_notes():
    """The benchmark's effective TFLOP/s rests on this count: 0.35 PFLOP at 544x960x25, 12.1 at 720x1280x129."""
    import bench_hunyuan_apple as B
    assert B.tokens(720, 1280, 129) == 119_056
    assert abs(B.forward_flops({}, B.tokens(544, 960, 25)) / 1e15 - 0.35) < 0.005
    assert abs(B.forward_flops({}, B.tokens(720, 1280, 129)) / 1e15 - 12.1) < 0.05


def test_convert_whole_checkpoint_int8_equals_quantize_on_load(tmp_path):
    tiny = H.build_tiny_checkpoint(tmp_path / "tiny")
    r = run("convert_weights.py", "--model", tiny, "--quantization", "int8", "--output", tmp_path / "q8")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "q8"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny.iterdir())
    assert not (tmp_path / "q8.partial").exists()
    for load, part in ((H.load_transformer, "transformer"), (H.load_text_encoder, "text_encoder")):
        stored = dict(tree_flatten(load(out / part).parameters()))
        on_load = dict(tree_flatten(load(tiny / part, quantization="int8").parameters()))
        assert stored.keys() == on_load.keys() and any(k.endswith(".scales") for k in stored)
        assert all(mx.array_equal(stored[k], on_load[k]).item() for k in stored), part
    # its config is complete, and the memory plan reads the sizes off the shapes where a config lacks them
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert (config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]) == (2, 32, 1)
    plan = H.estimate_memory(out, 48, 64, 5)
    assert plan == H.estimate_memory(tiny, 48, 64, 5, "int8")
    sizes = set(inspect.signature(H.HunyuanVideoTransformer).parameters) - {"rope_axes_dim", "rope_theta"}
    (out / "transformer" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in sizes}))
    assert H.estimate_memory(out, 48, 64, 5) == plan
    kw = dict(height=32, width=32, frames=5, steps=2, seed=3, output_type="latent")
    a = H.HunyuanVideoPipeline.from_pretrained(out)("a cat", **kw)
    b = H.HunyuanVideoPipeline.from_pretrained(tiny, quantization="int8")("a cat", **kw)
    assert np.array_equal(np.array(a), np.array(b))


def test_bench_phases_and_plan_run():
    r = run("bench_hunyuan_apple.py", "--tiny", "--phases", "--sizes", "32x48x5", "--quantizations", "bf16", "int8")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[2:]]
    assert [(p, s, n) for p, s, *n, _, _ in rows] == [(p, "32x48x5", n) for p in ("bf16", "int8")
                                                     for n in (["text", "encoder"], ["denoise", "step"], ["decode"])]
    r = run("bench_hunyuan_apple.py", "--plan")
    assert r.returncode == 0 and "720x1280x129" in r.stdout, r.stderr


def test_plan_counts_the_real_model_exactly(tmp_path):
    """The plan's weights, from header-only files of the real shapes: bf16 is 2 bytes x 12,821,012,544
    parameters; int8 saves 1 - 1/16 byte on each of the 9.06B token-wise block weights (2 bytes -> 1 + a bf16
    scale and bias per 64). The denoise estimate is those weights less the adaLN modulation (360 (D^2 + D) in
    bf16: 3.4B parameters, never held whole), plus its table for 50 steps (50 x 360 D) and the activations,
    exactly."""
    import bench_hunyuan_apple as B
    folder = B.header_only_checkpoint(tmp_path)
    info = H._tensor_info(H._component_files(folder / "transformer", "")[0])
    bf16, int8 = H._weights_bytes(info), H._weights_bytes(info, "int8")
    assert bf16 == 2 * 12_821_012_544
    D = 3072
    token_wise = 960 * D * D  # 20 double blocks x 2 streams x 12 D^2 + 40 single blocks x 12 D^2
    assert bf16 - int8 == token_wise * (2 - 1 - 4 / 64)
    N = B.tokens(544, 960, 13)
    activations = H._dit_activations(N, 256, N - 256, D, 24, 4 * D, 4096, 2, cpu=False)
    modulation, table = 2 * 360 * (D * D + D), 2 * 50 * 360 * D
    assert modulation / 2 == 3_398_492_160
    assert H.estimate_memory(folder, 544, 960, 13, "int8", backend="gpu")["denoise"] == \
        int8 - modulation + table + activations


@pytest.mark.parametrize("family", [[], ["--family", "1.5"]])
def test_bench_parity_and_vae_run(family):
    """The benchmark's own parity check, per family: bf16 against diffusers in bf16 (measured 7.8e-3 on both)."""
    r = run("bench_hunyuan_apple.py", "--tiny", "--parity", *family)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip().splitlines()[-1].split()[-1]) <= 3e-2  # bf16, as the parity tests bound it
    r = run("bench_hunyuan_apple.py", "--tiny", "--vae", "--sizes", "32x48x5", *family)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].split()[0] == "32x48x5", r.stderr


def test_bench_1_5_forward_table_and_flop_count():
    """1.5's DiT forward: its row counts the video's tokens (the same at 1/16 with patch 1 as 13B's at 1/8 with patch
    2) and 256 valid text tokens; its FLOPs are 54 double blocks of 24 N D^2 (q, k, v, out and a 4x MLP on both
    streams) + 4 N^2 D (attention) at D 2048, written out here."""
    import bench_hunyuan_apple as B
    r = run("bench_hunyuan_apple.py", "--tiny", "--family", "1.5", "--repeat", "1", "--sizes", "32x48x5")
    assert r.returncode == 0, r.stderr
    assert "HunyuanVideo 1.5 DiT" in r.stdout
    row = r.stdout.strip().splitlines()[-1].split()
    assert row[0] == "32x48x5" and int(row[1]) == 2 * 2 * 3 + 256 and float(row[3]) > 0
    n, D = B.tokens(480, 848, 121), 2048
    assert n == 31 * 30 * 53 + 256
    assert B.forward_flops({}, n, v15=True) == 54 * (24 * n * D * D + 4 * n * n * D)
    r = run("bench_hunyuan_apple.py", "--family", "1.5", "--plan")
    assert r.returncode == 2 and "--family goes with the DiT forward" in r.stderr and "Traceback" not in r.stderr


def test_tiny_is_a_model_wherever_one_is_taken(tmp_path, monkeypatch):
    """'tiny' names the offline demo checkpoint in the Python API, convert_weights.py and the benchmark; it is
    built once in HUNYUAN_APPLE_CACHE."""
    env = {**os.environ, "HUNYUAN_APPLE_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", env["HUNYUAN_APPLE_CACHE"])
    pipe = H.HunyuanVideoPipeline.from_pretrained("tiny")
    assert pipe.folder == tmp_path / "cache" / f"tiny-{H.__version__}" and (pipe.folder / "model_index.json").exists()
    r = run("convert_weights.py", "--model", "tiny", "--output", tmp_path / "converted", env=env)
    assert r.returncode == 0, r.stderr
    assert H.HunyuanVideoPipeline.from_pretrained(tmp_path / "converted").folder == tmp_path / "converted"
    r = run("bench_hunyuan_apple.py", "--phases", "--model", "tiny", "--sizes", "32x48x5", "--quantizations", "bf16",
            env=env)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[2:]]
    assert [row[2] for row in rows] == ["text", "denoise", "decode"] and all(float(row[-1]) > 0 for row in rows), rows


@pytest.mark.parametrize("flag", ["--reference", "--parity", "--vae"])
def test_bench_without_torch_says_what_to_install(flag):
    """Without torch (hidden from the import system), the benchmarks that run diffusers say so in one sentence."""
    code = (f"import sys, runpy; sys.path.insert(0, {str(ROOT)!r}); sys.modules['torch'] = None; "
            f"sys.argv = ['bench_hunyuan_apple.py', {flag!r}, '--tiny']; "
            f"sys.exit(runpy.run_path({str(ROOT / 'bench_hunyuan_apple.py')!r}, run_name='__main__'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: {flag} runs diffusers, which needs torch and diffusers" in r.stderr


@pytest.mark.parametrize("args, words", [
    ([], "at 544x960x25 in bf16 the denoise phase needs about"),
    (["--phases", "--quantizations", "int8"], "at 544x960x13 in int8 the "),
    (["--vae", "--sizes", "720x1280x129"], "at 720x1280x129 in bf16 the decode phase needs about"),
    (["--family", "1.5"], "at 480x848x61 in bf16 the denoise phase needs about"),
    (["--family", "1.5", "--phases", "--quantizations", "int4"], "at 480x848x121 in int4 the ")])
def test_bench_plans_before_it_makes_full_size_weights(monkeypatch, capsys, args, words):
    """With no arguments the benchmark would build the full-size 13B DiT: on a machine that cannot hold it (8 GiB
    here, as HUNYUAN_APPLE_MEMORY_GB says) it is refused in one sentence before any weights are made."""
    import bench_hunyuan_apple as B

    monkeypatch.setenv("HUNYUAN_APPLE_MEMORY_GB", "8")
    monkeypatch.setattr(B, "random_model", lambda *a, **k: pytest.fail("weights were made"))
    assert B.main(args) == 2
    out = capsys.readouterr()
    assert words in out.err and "--force to run anyway" in out.err and "random weights" not in out.out, out.err


def test_bench_refuses_flags_it_would_ignore():
    r = run("bench_hunyuan_apple.py", "--tiny", "--model", "tiny")
    assert r.returncode == 2 and "--model and --quantizations go with --phases" in r.stderr, r.stderr


@pytest.mark.parametrize("args, words", [
    (["--sizes", "abc"], "size 'abc': write HEIGHTxWIDTHxFRAMES"), (["--repeat", "0"], "--repeat 0"),
    (["--repeat", "-1"], "each is a count of 1 or more"), (["--sizes", "0x0x1"], "size 0x0x1: height and width"),
])
def test_bench_bad_arguments_one_sentence(args, words):
    r = run("bench_hunyuan_apple.py", *args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_output_into_a_reader_that_stops_early():
    """`--plan | head -3`: the reader closes the pipe; the benchmark stops quietly, no BrokenPipeError."""
    p = subprocess.Popen(f"{sys.executable} {ROOT / 'bench_hunyuan_apple.py'} --plan | head -3", shell=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    out, err = p.communicate(timeout=300)
    assert len(out.splitlines()) == 3 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("output, words", [("", "--output is empty"), ("/proc/x", "cannot write /proc/x")])
def test_convert_to_a_folder_it_cannot_write(output, words, tmp_path):
    r = run("convert_weights.py", "--model", "tiny", "--output", output,
            env={**os.environ, "HUNYUAN_APPLE_CACHE": str(tmp_path)})
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_work_table(tmp_path):
    """Full size: the uncached count (4.29 PFLOP a forward at 544x960x129, 50 of them), attention and linear apart,
    the published speed-ups applied to the threshold caches, TaylorSeer's 13 computed forwards of 50 (its rule),
    Radial Attention cutting attention only, the presets' steps; --tiny: measured, the ledger's figures (forwards +
    skipped = the steps)."""
    import re

    import bench_hunyuan_apple as B
    r = run("bench_hunyuan_apple.py", "--work", "--sizes", "544x960x129")
    assert r.returncode == 0, r.stderr
    rows = {m[2]: tuple(float(m[i]) for i in (3, 4, 5, 6)) for line in r.stdout.splitlines()[2:]
            for m in [re.match(r"\s*(\S+)\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+x", line)] if m}
    per_forward = B.forward_flops({}, B.tokens(544, 960, 129)) / 1e15
    n = B.tokens(544, 960, 129)
    attention = 4 * 3072 * n * n * 60 / 1e15  # a dense forward's attention; the rest is linear
    assert rows["50 steps, no cache"] == pytest.approx((50, 50 * per_forward, 50 * attention,
                                                        50 * (per_forward - attention)), abs=0.05)
    computed = sum(s < 3 or (s - 4) % 5 == 0 for s in range(50))  # diffusers' TaylorSeer rule, its defaults
    assert computed == 13 and rows["50 steps, taylorseer"][:2] == pytest.approx((13, 13 * per_forward), abs=0.05)
    radial = rows["50 steps, radial"]
    assert radial[0] == 50 and radial[3] == rows["50 steps, no cache"][3] and radial[2] < 0.5 * 50 * attention
    assert rows["fasthunyuan, 6 steps"][:2] == pytest.approx((6, 6 * per_forward), abs=0.05)
    assert rows["accvideo, 5 steps"][:2] == pytest.approx((5, 5 * per_forward), abs=0.05)
    assert rows["50 steps, magcache 0.24"][0] == pytest.approx(50 / 2.8, abs=0.05)
    assert len(rows) == 13
    env = {**os.environ, "HUNYUAN_APPLE_CACHE": str(tmp_path / "cache")}
    r = run("bench_hunyuan_apple.py", "--work", "--tiny", "--sizes", "32x48x5", env=env)
    assert r.returncode == 0 and "RANDOM weights" in r.stdout, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[2:]]
    assert [int(row[-6]) + int(row[-5]) for row in rows] == [50] * 9 + [6, 6, 5, 5]
    assert all(float(row[-4]) == pytest.approx(float(row[-3]) + float(row[-2]), rel=1e-2) for row in rows)


def test_convert_bakes_a_lora_in(tmp_path):
    """--lora merges the LoRA before quantizing: the converted int8 checkpoint equals quantizing on load with the
    LoRA; a checkpoint already quantized is refused (the LoRA would not be baked in)."""
    from test_cli import tiny_lora
    tiny = H.build_tiny_checkpoint(tmp_path / "tiny")
    lora = tiny_lora(tmp_path / "style.safetensors")
    r = run("convert_weights.py", "--model", tiny / "transformer", "--quantization", "int8", "--lora",
            f"{lora}:0.5", "--output", tmp_path / "q8")
    assert r.returncode == 0, r.stderr
    stored = dict(tree_flatten(H.load_transformer(tmp_path / "q8").parameters()))
    on_load = dict(tree_flatten(H.load_transformer(tiny / "transformer", quantization="int8",
                                                   loras=[(lora, 0.5)]).parameters()))
    plain = dict(tree_flatten(H.load_transformer(tiny / "transformer", quantization="int8").parameters()))
    assert stored.keys() == on_load.keys() and all(mx.array_equal(stored[k], on_load[k]).item() for k in stored)
    assert not mx.array_equal(stored["single_blocks.0.linear1.weight"], plain["single_blocks.0.linear1.weight"]).item()
    r = run("convert_weights.py", "--model", tmp_path / "q8", "--lora", lora, "--output", tmp_path / "again")
    assert r.returncode == 2 and "is already quantized" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "again").exists()

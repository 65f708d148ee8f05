"""The memory plan: its estimate against the measured peaks of tiny runs, a request over budget refused
before any weights load (with what would fit), --force and --low-memory.

Stated margin (CPU backend, where the tests run): each phase's estimate is at least its measured peak
(mx.get_peak_memory) and at most 1.25x it for the DiT and the VAE, 1.6x for the text encoders (there the
tiny LLM's activations dominate; the real one's 15 GB of weights dwarf them).
"""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import HunyuanVideo_Apple as H

ROOT = Path(__file__).resolve().parents[1]
LONG = " ".join(["a red fox runs through the snow in the forest at night"] * 40)  # fills the 256 text tokens
MARGIN = {"text encoders": 1.6, "denoise": 1.25, "decode": 1.25}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return H.build_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny")


@pytest.mark.parametrize("size", [(96, 160, 9), (192, 320, 17)])
def test_estimate_brackets_the_measured_peak(tiny, size):
    pipe = H.HunyuanVideoPipeline.from_pretrained(tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prompt is cut at 256 tokens, on purpose
        pipe(LONG, *size, num_inference_steps=1, seed=0)
    est = H.estimate_memory(tiny, *size)
    for phase, (_, measured_gb) in pipe.stats.items():
        ratio = est[phase] / (measured_gb * H.GB)
        assert 1.0 <= ratio <= MARGIN[phase], f"{phase}: estimate {ratio:.2f}x the measured peak"


def test_over_budget_is_refused_before_loading(tiny, monkeypatch):
    monkeypatch.setenv("HUNYUAN_APPLE_MEMORY_GB", "0.25")
    for name in ("load_transformer", "load_text_encoder", "load_clip_text_encoder", "load_vae"):
        monkeypatch.setattr(H, name, lambda *a, **k: pytest.fail("weights were loaded"))
    pipe = H.HunyuanVideoPipeline.from_pretrained(tiny)
    with pytest.raises(H.HunyuanVideoError) as e:
        pipe("a cat", 192, 320, 17, 1)
    msg = str(e.value)
    assert "needs about 1.9 GB at its peak (decode)" in msg and "can give 0.2 GB" in msg and "--force" in msg
    frames = int(re.search(r"--frames (\d+)", msg).group(1))  # the longest clip that fits
    fits = lambda f: max(H.estimate_memory(tiny, 192, 320, f).values()) <= 0.9 * 0.25 * H.GB  # noqa: E731
    assert fits(frames) and not fits(frames + 4)


def test_low_memory_streams_blocks_with_the_same_result(tmp_path):
    """16 blocks of 256-wide layers: streamed from disk, at most about two are in memory, and the output is
    the same to the bit."""
    from test_transformer import make_inputs, make_reference, run_ours
    cfg = dict(model=dict(num_attention_heads=4, attention_head_dim=64, rope_axes_dim=(16, 24, 24), num_layers=8,
                          num_single_layers=8, num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=32),
               latent=(1, 2, 8, 8), text=8, lengths=(8,))
    make_reference(cfg["model"]).save_pretrained(tmp_path)
    inputs = make_inputs(cfg)
    peaks, outs = [], []
    for stream in (False, True):
        mx.clear_cache()
        mx.reset_peak_memory()
        model = H.load_transformer(tmp_path, quantization="int8", stream=stream)
        outs.append(run_ours(model, inputs))
        peaks.append(mx.get_peak_memory())
        del model
    assert np.array_equal(outs[0], outs[1])
    assert peaks[1] < 0.5 * peaks[0], f"streamed peak {peaks[1] / 2**20:.1f} MB vs {peaks[0] / 2**20:.1f} MB"


def test_cli_refuses_then_force_runs(tiny, tmp_path):
    env = {**os.environ, "HUNYUAN_APPLE_MEMORY_GB": "0.25"}
    cmd = [sys.executable, str(ROOT / "hunyuan_apple.py"), "--model", str(tiny), "--prompt", "a cat",
           "--resolution", "192", "320", "--frames", "17", "--steps", "1", "--output", str(tmp_path / "v.mp4")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "needs about" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "v.mp4").exists()
    r = subprocess.run(cmd + ["--force"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr


def test_plan_of_a_converted_checkpoint_counts_it_as_stored(tiny, tmp_path):
    """A checkpoint converted to int8 holds packed integers: the plan counts them as stored, and gets the same
    weights as for the original quantized on load."""
    q8 = tmp_path / "q8"
    for part in ("text_encoder", "transformer"):
        (q8 / part).mkdir(parents=True)
    H.save_transformer(H.load_transformer(tiny / "transformer", quantization="int8"), q8 / "transformer")
    llm_config = __import__("json").loads((tiny / "text_encoder" / "config.json").read_text())
    H.save_text_encoder(H.load_text_encoder(tiny / "text_encoder", quantization="int8"), q8 / "text_encoder", llm_config)
    for part in ("transformer", "text_encoder"):
        stored = H._weights_bytes(q8 / part, dit=part == "transformer")
        on_load = H._weights_bytes(tiny / part, "int8", dit=part == "transformer",
                                   keep=lambda k: not k.startswith(("layers.2.", "layers.3.", "norm.")))
        assert stored == on_load, part

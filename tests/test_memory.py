"""The memory plan: its derived estimate against the measured peaks of tiny runs of several widths, a request
over budget refused before any weights load (with what would fit, changes combined where one is not enough),
--force, --low-memory (streaming, the cache limit), and memory given back between phases.

Stated margin (CPU backend, where the tests run): each phase's estimate is at least its measured peak
(mx.get_peak_memory) and at most 1.2x it for the DiT and the VAE, 1.4x for the text encoders, for every
width below, at two sizes (the second tiled) with the default precisions (DiT bf16, VAE and text encoders fp16), and
at the first in float32; the streamed DiT's (--low-memory) at most 1.3x (see test_pipeline_low_memory).
Nothing in the estimate was fitted to these runs: it counts the tensors the code allocates (see
estimate_memory), and the widths differ in every component.

The text encoders' bound is set from measured runs, quiet and under load: the measured peak is not the same
from run to run. On the widest checkpoint (LLM width 256, default precisions, 64x96x5) eight quiet runs measured
7.76 to 7.85 MB against an estimate of 9.79 MB (1.25x to 1.26x), and with three busy processes beside them one
run in eight measured 7.27 MB (1.35x): some of a layer's arrays are released by MLX's CPU worker thread, and how
many are alive at once at the peak moves by a few hundred KB with thread scheduling (sleeping between layers does
not change it). 1.3 failed a CI run under load (1.33x); 1.4 holds with that spread.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err
from mlx.utils import tree_flatten

import HunyuanVideo_Apple as H
import hunyuan_apple as cli

ROOT = Path(__file__).resolve().parents[1]
LONG = " ".join(["a red fox runs through the snow in the forest at night"] * 40)  # fills the 256 text tokens
MARGIN = {"text encoders": 1.4, "denoise": 1.2, "decode": 1.2}  # see above for the text encoders' 1.4
# (DiT heads x head width, LLM width, VAE block_out): three checkpoints whose every component differs
WIDTHS = [((2, 32), 64, (8, 8, 16, 16)), ((4, 32), 128, (8, 16, 16, 16)), ((2, 64), 256, (16, 16, 32, 32))]


def check_ratios(ratios):
    """Each estimate / measured peak, keyed (phase, ...), within [1, MARGIN[phase]]."""
    print({k: f"{v:.2f}" for k, v in ratios.items()})
    for (phase, *case), ratio in ratios.items():
        assert 1.0 <= ratio <= MARGIN[phase], f"{phase} {case}: estimate {ratio:.2f}x the measured peak"


def make_checkpoint(folder, heads, head_dim, llm_width, block_out, blocks=(1, 2)):
    """The tiny demo checkpoint with its DiT, LLM and VAE replaced by random ones of the given widths (and
    numbers of double and single blocks)."""
    H.build_tiny_checkpoint(folder)
    dit_cfg = dict(num_attention_heads=heads, attention_head_dim=head_dim, num_layers=blocks[0],
                   num_single_layers=blocks[1],
                   num_refiner_layers=1, text_embed_dim=llm_width, pooled_projection_dim=16,
                   rope_axes_dim=[head_dim // 4, 3 * head_dim // 8, head_dim - head_dim // 4 - 3 * head_dim // 8])
    weights = H._to_diffusers(H._checkpoint_weights(H.HunyuanVideoTransformer(**dit_cfg)))
    shutil.rmtree(folder / "transformer")
    H._save_component(folder / "transformer", weights, {"_class_name": "HunyuanVideoTransformer3DModel", **dit_cfg},
                      "diffusion_pytorch_model.safetensors")
    llm_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    llm_cfg.update(hidden_size=llm_width, intermediate_size=2 * llm_width, num_attention_heads=4, num_key_value_heads=2)
    llm = H.LlamaTextEncoder(**H._hf_sizes(H.LlamaTextEncoder, llm_cfg), skip_layers=0)
    shutil.rmtree(folder / "text_encoder")
    H._save_component(folder / "text_encoder", {**dict(tree_flatten(llm.parameters())),
                                                "norm.weight": mx.ones((llm_width,))}, llm_cfg)
    vae_cfg = dict(block_out_channels=list(block_out), layers_per_block=1, norm_num_groups=4)
    vae = H.HunyuanVideoVAE(**vae_cfg)
    shutil.rmtree(folder / "vae")
    H._save_component(folder / "vae", {k: v.transpose(0, 4, 1, 2, 3) if v.ndim == 5 else v
                                       for k, v in tree_flatten(vae.parameters())},
                      {"_class_name": "AutoencoderKLHunyuanVideo", "scaling_factor": 0.476986, **vae_cfg},
                      "diffusion_pytorch_model.safetensors")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return H.build_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny")


@pytest.mark.parametrize("widths", WIDTHS, ids=["narrow", "middle", "wide"])
def test_estimate_brackets_the_measured_peak(widths, tmp_path):
    (heads, head_dim), llm_width, block_out = widths
    folder = make_checkpoint(tmp_path / "ckpt", heads, head_dim, llm_width, block_out)
    ratios = {}
    for size in [(64, 96, 5), (64, 272, 9)]:  # the second is tiled (width 272 > 256)
        for dtype in (None, mx.float32)[:2 if size[1] < 256 else 1]:  # the default precisions; float32 everywhere
            pipe = H.HunyuanVideoPipeline.from_pretrained(folder, dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the prompt is cut at 256 tokens, on purpose
                pipe(LONG, **dict(zip(("height", "width", "frames"), size)), steps=1, seed=0, force=True)
            est = H.estimate_memory(folder, *size, dtypes=pipe.dtypes, steps=1)
            for phase in est:
                measured_gb = pipe.stats[phase][1]
                ratios[phase, size, dtype] = est[phase] / (measured_gb * H.GB)
    check_ratios(ratios)


def test_over_budget_is_refused_before_loading(tiny, monkeypatch):
    monkeypatch.setenv("HUNYUAN_APPLE_MEMORY_GB", "0.25")
    for name in ("load_transformer", "load_text_encoder", "load_clip_text_encoder", "load_vae"):
        monkeypatch.setattr(H, name, lambda *a, **k: pytest.fail("weights were loaded"))
    pipe = H.HunyuanVideoPipeline.from_pretrained(tiny)
    with pytest.raises(H.HunyuanVideoError) as e:
        pipe("a cat", height=192, width=320, frames=17, steps=1)
    msg = str(e.value)
    est = H.estimate_memory(tiny, 192, 320, 17)
    assert f"needs about {H.gib(max(est.values()))} at its peak (decode)" in msg
    assert "can give 0.25 GiB" in msg and "or force to run it anyway" in msg
    frames = int(re.search(r"frames (\d+)", msg).group(1))  # the longest clip that fits
    fits = lambda f: max(H.estimate_memory(tiny, 192, 320, f).values()) <= 0.9 * 0.25 * H.GB  # noqa: E731
    assert fits(frames) and not fits(frames + 4)


def test_suggestions_combine_changes_when_one_is_not_enough(tmp_path, monkeypatch):
    """A budget that neither int8, int4 nor --low-memory meets alone, but int8 and --low-memory together do, at
    full size (544x960x129, header-only files of the real model, GPU estimates): the sentence names the pair,
    not 'a smaller request'."""
    import bench_hunyuan_apple as B
    folder = B.header_only_checkpoint(tmp_path)
    peak = lambda **kw: max(H.estimate_memory(folder, 544, 960, 129, backend="gpu", **kw).values())  # noqa: E731
    both = peak(quantization="int8", low_memory=True)
    budget = int(both / 0.9) + 1
    assert min(peak(quantization="int8"), peak(quantization="int4"), peak(low_memory=True)) > 0.9 * budget
    monkeypatch.setattr(H, "_backend", lambda: "gpu")
    with pytest.raises(H.HunyuanVideoError) as e:
        H.check_memory(folder, 544, 960, 129, budget=budget)
    assert "try quantization int8 low_memory" in str(e.value), str(e.value)
    assert "try --quantization int8 --low-memory" in e.value.sentence(cli.FLAGS)  # the command line's words


@pytest.mark.parametrize("value", ["abc", "-1", "0", "inf"])
def test_bad_memory_variable_is_named(tiny, monkeypatch, value):
    monkeypatch.setenv("HUNYUAN_APPLE_MEMORY_GB", value)
    with pytest.raises(H.HunyuanVideoError, match=f"HUNYUAN_APPLE_MEMORY_GB='{re.escape(value)}'"):
        H.check_memory(tiny, 96, 160, 9)


def test_low_memory_streams_blocks_with_the_same_result(tmp_path):
    """16 blocks of 256-wide layers: streamed from disk, at most about two are in memory, and the output is
    the same to the bit. The files are indexed once and none stays open."""
    from test_transformer import make_inputs, make_reference, run_ours
    cfg = dict(model=dict(num_attention_heads=4, attention_head_dim=64, rope_axes_dim=(16, 24, 24), num_layers=8,
                          num_single_layers=8, num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=32),
               latent=(1, 2, 8, 8), text=8, lengths=(8,))
    make_reference(cfg["model"]).save_pretrained(tmp_path, max_shard_size="300KB")  # many shards
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
    fds = Path(f"/proc/{os.getpid()}/fd")
    if fds.exists():  # Linux: no shard is held open by the streamed model
        model = H.load_transformer(tmp_path, quantization="int8", stream=True)
        run_ours(model, inputs)
        held = [p for p in fds.iterdir() if str(tmp_path) in str(p.resolve())]
        assert not held, held


def test_pipeline_low_memory(tmp_path):
    """--low-memory through the pipeline: the same latents as without, a lower denoising peak (a DiT of 4 double
    and 8 single blocks, of which it holds about two), and the buffer cache limit it sets only while a phase
    runs."""
    folder = make_checkpoint(tmp_path / "m", 2, 32, 64, (8, 8, 16, 16), blocks=(4, 8))
    kw = dict(height=96, width=160, frames=9, steps=2, seed=1, output_type="latent")
    plain = H.HunyuanVideoPipeline.from_pretrained(folder)
    low = H.HunyuanVideoPipeline.from_pretrained(folder, low_memory=True)
    before = mx.set_cache_limit(123 * 2**20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the prompt is cut at 256 tokens, on purpose: the plan's worst case
            a, b = plain(LONG, **kw), low(LONG, **kw)
        assert mx.set_cache_limit(before) == 123 * 2**20  # restored after the run
    finally:
        mx.set_cache_limit(before)
    assert np.array_equal(np.array(a), np.array(b))
    assert low.stats["denoise"][1] < plain.stats["denoise"][1]
    est = H.estimate_memory(folder, 96, 160, 9, low_memory=True, steps=2)["denoise"]
    # streamed blocks are freed on MLX's CPU worker thread, so the measured peak moves with scheduling: 1.15x to
    # 1.17x quiet or beside a busy process, 1.23x once in the two-process suite; 1.3 holds that spread
    assert 1.0 <= est / (low.stats["denoise"][1] * H.GB) <= 1.3


def test_memory_is_given_back_after_each_phase(tiny):
    """After the denoising phase the DiT is gone and its buffers are not kept in MLX's cache for the VAE."""
    dit = next((tiny / "transformer").glob("*.safetensors")).stat().st_size
    pipe = H.HunyuanVideoPipeline.from_pretrained(tiny)
    states, mask, pooled = pipe.encode_prompt("a cat")
    pipe(text=(states, mask, pooled), height=96, width=160, frames=9, steps=1, seed=0, output_type="latent")
    assert mx.get_cache_memory() < 0.1 * dit, f"{mx.get_cache_memory()} bytes cached after the DiT's phase"


def test_cli_refuses_then_force_runs(tiny, tmp_path):
    env = {**os.environ, "HUNYUAN_APPLE_MEMORY_GB": "0.01"}  # the decode plans 0.02 GiB at this size
    cmd = [sys.executable, str(ROOT / "hunyuan_apple.py"), "--model", str(tiny), "--prompt", "a cat",
           "--resolution", "32", "48", "--frames", "5", "--steps", "1", "--output", str(tmp_path / "v.mp4")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "needs about" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "v.mp4").exists()
    r = subprocess.run(cmd + ["--force"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "warning: this request needs about" in r.stderr and "(--force: running anyway)" in r.stderr, r.stderr


def test_hub_checkpoint_is_planned_before_its_weights_download(tiny, tmp_path, monkeypatch):
    """from_pretrained(hub id) fetches the configs only; the plan reads the weights' headers on the hub, and a
    request that does not fit is refused before any weight is downloaded. (The hub is played by the tiny
    checkpoint: this machine has no network.)"""
    import huggingface_hub

    fetched, asked = [], []

    def snapshot_download(repo_id, allow_patterns):
        fetched.append(allow_patterns)
        out = tmp_path / ("full" if any(p.endswith("/*") and p[:-2] in H.COMPONENTS[:4] for p in allow_patterns)
                          else "configs")
        if not out.exists():
            shutil.copytree(tiny, out, ignore=None if out.name == "full" else shutil.ignore_patterns("*.safetensors"))
        return str(out)

    class Api:
        def parse_safetensors_file_metadata(self, repo_id, filename):
            asked.append(filename)
            tensors, _ = H._safetensors_header(tiny / filename)
            info = huggingface_hub.utils.TensorInfo
            return type("Meta", (), {"tensors": {k: info(dtype=d, shape=list(s), data_offsets=o)
                                                 for k, (s, d, o) in tensors.items()}})

        def list_repo_files(self, repo_id):
            return [str(p.relative_to(tiny)) for p in tiny.rglob("*") if p.is_file()]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    pipe = H.HunyuanVideoPipeline.from_pretrained("someone/hunyuan")
    assert len(fetched) == 1 and not list(pipe.folder.rglob("*.safetensors"))
    plan = pipe.plan(H.check_request(dict(prompt="a cat", height=96, width=160, frames=9), pipe))
    assert plan.memory == H.estimate_memory(tiny, 96, 160, 9)  # the same figures, from the hub
    monkeypatch.setenv("HUNYUAN_APPLE_MEMORY_GB", "0.25")
    with pytest.raises(H.HunyuanVideoError, match="needs about"):
        pipe("a cat", height=192, width=320, frames=17, steps=1)
    assert len(fetched) == 1  # refused: no weights were fetched
    assert sorted(asked) == sorted(str(p.relative_to(tiny)) for p in tiny.rglob("*.safetensors"))  # each header once
    monkeypatch.delenv("HUNYUAN_APPLE_MEMORY_GB")
    frames = pipe("a cat", height=32, width=32, frames=5, steps=1, seed=0)
    assert len(fetched) == 2 and frames.shape == (5, 32, 32, 3)


def test_plan_of_a_converted_checkpoint_counts_it_as_stored(tiny, tmp_path):
    """A checkpoint converted to int8 holds packed integers: the plan counts them as stored, and gets the same
    weights as for the original quantized on load."""
    q8 = tmp_path / "q8"
    for part in ("text_encoder", "transformer"):
        (q8 / part).mkdir(parents=True)
    H.save_transformer(H.load_transformer(tiny / "transformer", quantization="int8"), q8 / "transformer")
    llm_config = json.loads((tiny / "text_encoder" / "config.json").read_text())
    H.save_text_encoder(H.load_text_encoder(tiny / "text_encoder", quantization="int8"), q8 / "text_encoder", llm_config)
    info = lambda folder: H._tensor_info(H._component_files(folder, "")[0])  # noqa: E731
    for part, keep in (("transformer", lambda k: True), ("text_encoder", lambda k: H._llm_keeps(k, 2))):
        stored = H._weights_bytes(info(q8 / part), dit=part == "transformer")
        on_load = H._weights_bytes(info(tiny / part), "int8", dit=part == "transformer", keep=keep)
        assert stored == on_load, part


def test_plan_counts_tencent_pt_files(tmp_path):
    """Tencent's .pt checkpoints have no safetensors header: the plan reads the pickle's tensors without their
    data (memory-mapped) and counts them as they will load, bf16 and dequantized fp8 alike."""
    import torch
    from safetensors.torch import save_file
    from test_quantization import CFG, fp8_state_dict

    stored, scales, _ = fp8_state_dict("e4m3", scaled=True)
    for name, sd in (("bf16", {k: v.to(torch.bfloat16) for k, v in stored.items()}), ("fp8", stored)):
        (tmp_path / name).mkdir()
        torch.save({"module": sd}, tmp_path / name / "mp_rank_00_model_states.pt")
    torch.save(scales, tmp_path / "fp8" / "mp_rank_00_model_states_map.pt")
    (tmp_path / "st").mkdir()
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in stored.items()}, tmp_path / "st" / "model.safetensors")
    counted = {name: H._weights_bytes(H._tensor_info(H._component_files(tmp_path / name, "")[0]))
               for name in ("bf16", "fp8", "st")}
    assert counted["bf16"] == counted["fp8"] == counted["st"] == 2 * sum(v.numel() for v in stored.values())
    assert H.load_transformer(tmp_path / "fp8", rope_axes_dim=CFG["model"]["rope_axes_dim"])  # the map is not a 2nd .pt


@pytest.mark.parametrize("quantization, low_memory", [(None, False), ("int8", False), (None, True)])
def test_precomputed_modulation_equals_the_per_step_one(tmp_path, quantization, low_memory):
    """The pipeline computes every block's adaLN modulation for all steps before the first and never holds its
    weights: the latents equal those of the per-step computation from the weights (float32, 1e-6), quantized
    or not, streamed or not."""
    folder = make_checkpoint(tmp_path / "m", 2, 32, 64, (8, 8, 16, 16))
    kw = dict(height=48, width=64, frames=5, steps=3, seed=2, output_type="latent")
    pipes = [H.HunyuanVideoPipeline.from_pretrained(folder, dtype=mx.float32, quantization=quantization,
                                                    low_memory=low_memory) for _ in range(2)]
    pipes[1].precompute_modulation = False
    ahead, per_step = (np.array(pipe("a cat", **kw)) for pipe in pipes)
    assert rel_err(ahead, per_step) <= 1e-6


def test_precomputed_modulation_lowers_the_denoising_peak(tmp_path):
    """Measured (this machine, MLX CPU): on a DiT whose modulation weights are a large part of it (width 256,
    4 double and 8 single blocks, few tokens), the denoising peak drops by about their size, less the one
    block's that is read while its table is made; the plan's estimate brackets the new peak."""
    folder = make_checkpoint(tmp_path / "m", 4, 64, 64, (8, 8, 16, 16), blocks=(4, 8))
    info = H._tensor_info(H._component_files(folder / "transformer", "")[0])
    modulation = H._weights_bytes(info, itemsize=4, keep=H._is_modulation)
    one_block = H._weights_bytes(info, itemsize=4, keep=lambda k: H._is_modulation(k) and ".0.norm1" in k)
    peaks = []
    for ahead in (True, False):
        pipe = H.HunyuanVideoPipeline.from_pretrained(folder, dtype=mx.float32)
        pipe.precompute_modulation = ahead
        pipe("a cat", height=32, width=32, frames=1, steps=2, seed=0, output_type="latent")
        peaks.append(pipe.stats["denoise"][1] * H.GB)
    print(f"modulation {modulation / 2**20:.1f} MiB, peaks {peaks[0] / 2**20:.1f} / {peaks[1] / 2**20:.1f} MiB")
    assert 0.9 * (modulation - one_block) <= peaks[1] - peaks[0] <= 1.1 * modulation
    est = H.estimate_memory(folder, 32, 32, 1, dtypes=dict.fromkeys(H.DEFAULT_DTYPES, mx.float32), steps=2)
    assert 1.0 <= est["denoise"] / peaks[0] <= MARGIN["denoise"]


def test_true_cfg_estimate_brackets_the_measured_peak(tmp_path):
    """True CFG's denoising peak, its two branches batched and one after the other, against the plan's estimate
    for each (the same margin as one branch)."""
    (heads, head_dim), llm_width, block_out = WIDTHS[1]
    folder = make_checkpoint(tmp_path / "ckpt", heads, head_dim, llm_width, block_out)
    size = (128, 288, 13)
    ratios = {}
    for dtype in (None, mx.float32):
        pipe = H.HunyuanVideoPipeline.from_pretrained(folder, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the prompt is cut at 256 tokens, on purpose
            text = pipe.encode_prompt([LONG, LONG[::-1]])
        for mode in ("batched", "sequential"):  # the plan chooses by the memory it is told of
            with pytest.MonkeyPatch.context() as m:
                m.setattr(H.HunyuanVideoPipeline, "cfg_mode", lambda *a, **k: mode)
                pipe(text=text, **dict(zip(("height", "width", "frames"), size)), steps=1, seed=0, negative_prompt="",
                     cfg_scale=5.0, output_type="latent")
            est = H.estimate_memory(folder, *size, dtypes=pipe.dtypes, steps=1, cfg=mode)["denoise"]
            ratios["denoise", mode, dtype] = est / (pipe.stats["denoise"][1] * H.GB)
    check_ratios(ratios)

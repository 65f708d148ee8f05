"""Quantization: each mode against float (diffusers, float32, the same random weights), what stays
unquantized, fp8 checkpoints (Tencent's .pt, ComfyUI's plain and scaled safetensors, E4M3 and E5M2), the type
check of every tensor, and converted checkpoints that reload exactly.

Bounds (relative error = max |ours - ref| / max |ref|, float32 compute, tiny DiT of 64-wide layers):
  int8 <= 2e-2, fp8 <= 1.2e-1, int4 <= 4e-1, and int8 < fp8 < int4. The LLM's states in int8: <= 2e-2.
  fp8 files against diffusers on the weights as their makers dequantize them: 1e-4.
"""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from conftest import rel_err
from diffusers import HunyuanVideoTransformer3DModel
from safetensors.torch import save_file
from test_transformer import diffusers_converter, make_inputs, make_reference, run_ours, run_reference, tencent_state_dict

import HunyuanVideo_Apple as H

BOUNDS = {"int8": 2e-2, "fp8": 1.2e-1, "int4": 4e-1}  # measured: 9.3e-3, 6.1e-2, 1.8e-1
CFG = dict(model=dict(num_attention_heads=2, attention_head_dim=32, rope_axes_dim=(8, 12, 12), num_layers=2,
                      num_single_layers=2, num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=32),
           latent=(1, 3, 8, 12), text=10, lengths=(7,))


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "transformer"
    ref = make_reference(CFG["model"])
    ref.save_pretrained(path)
    return path, ref


def quantized_layers(model):
    return {name for name, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}


def test_each_mode_stays_close_to_float(dit):
    path, ref = dit
    inputs = make_inputs(CFG)
    expected = run_reference(ref, inputs)
    errs = {}
    for q in BOUNDS:
        model = H.load_transformer(path, dtype=mx.float32, quantization=q)
        assert len(quantized_layers(model)) == 2 * 8 + 2 * 2  # the blocks' token-wise layers, no modulation
        errs[q] = rel_err(run_ours(model, inputs), expected)
    print("relative error vs float:", {q: f"{e:.2e}" for q, e in errs.items()})
    for q, e in errs.items():
        assert e <= BOUNDS[q], f"{q}: relative error {e:.2e} > {BOUNDS[q]}"
    assert errs["int8"] < errs["fp8"] < errs["int4"]


def test_what_stays_unquantized(tmp_path):
    """96-wide layers do not fit int8's groups of 64 (their 384-wide MLP outputs feed layers that do): those
    stay as they are instead of failing. Embedders, refiner, final layer and modulation stay too."""
    m = dict(CFG["model"], num_attention_heads=3, rope_axes_dim=(8, 12, 12))
    make_reference(m).save_pretrained(tmp_path)
    model = H.load_transformer(tmp_path, dtype=mx.float32, quantization="int8")
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.QuantizedLinear))}
    for name, mod in layers.items():
        in_dim = mod.weight.shape[1] * (32 // mod.bits if isinstance(mod, nn.QuantizedLinear) else 1)
        fits = in_dim % 64 == 0 and name.startswith(("double_blocks", "single_blocks")) and "mod" not in name
        assert isinstance(mod, nn.QuantizedLinear) == fits, name
    assert quantized_layers(model) == {f"double_blocks.{i}.{s}_mlp.fc2" for i in range(2) for s in ("img", "txt")}
    run_ours(model, make_inputs(dict(CFG, model=m)))  # and it runs


def test_modulation_is_quantized_only_when_asked(dit):
    plain = H.load_transformer(dit[0], dtype=mx.float32, quantization="int8")
    asked = H.load_transformer(dit[0], dtype=mx.float32, quantization="int8", quantize_modulation=True)
    mods = {n for n in quantized_layers(asked) if n.endswith(("_mod.linear", "modulation.linear"))}
    assert not mods & quantized_layers(plain) and len(mods) == 2 * 2 + 2


def test_llm_int8_close_to_float(tmp_path):
    from conftest import make_llama_tokenizer, randomize
    from transformers import LlamaConfig, LlamaModel
    tok = make_llama_tokenizer(tmp_path / "tokenizer")
    randomize(LlamaModel(LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2)), 0).save_pretrained(tmp_path / "te")
    ref, mask = H.encode_llama("a cat walks on the grass", tok, H.load_text_encoder(tmp_path / "te", mx.float32))
    q = H.load_text_encoder(tmp_path / "te", mx.float32, quantization="int8")
    assert len(quantized_layers(q)) == 2 * 7 and isinstance(q.embed_tokens, nn.Embedding)
    out, _ = H.encode_llama("a cat walks on the grass", tok, q)
    valid = np.array(mask).astype(bool)
    err = rel_err(np.array(out)[valid], np.array(ref)[valid])
    assert err <= 2e-2, f"LLM int8: relative error {err:.2e}"


def test_pipeline_leaves_clip_and_vae_alone(tmp_path, monkeypatch):
    folder = H.build_tiny_checkpoint(tmp_path / "tiny")
    loaded = {}
    for name in ("load_vae", "load_clip_text_encoder", "load_transformer", "load_text_encoder"):
        real = getattr(H, name)
        monkeypatch.setattr(H, name, lambda *a, _real=real, _n=name, **k: loaded.setdefault(_n, _real(*a, **k)))
    H.HunyuanVideoPipeline.from_pretrained(folder, quantization="int8")("a cat", height=32, width=32, frames=5,
                                                                        steps=1, seed=0)
    assert quantized_layers(loaded["load_transformer"]) and quantized_layers(loaded["load_text_encoder"])
    assert not quantized_layers(loaded["load_vae"]) and not quantized_layers(loaded["load_clip_text_encoder"])


FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}  # format, largest value


def fp8_state_dict(kind, scaled, m=CFG["model"], per_row=False):
    """The tiny Tencent-layout DiT with its blocks' Linear weights in fp8 (scaled per layer, or per output row, to the
    format's range, or cast as they are), the scales, and the weights as the makers dequantize them:
    bf16(W_fp8) * bf16(scale), a row's scale multiplying its row."""
    fmt, largest = FP8[kind]
    stored, scales, dequantized = {}, {}, {}
    for k, w in tencent_state_dict(m).items():
        if k.startswith(("double_blocks", "single_blocks")) and k.endswith(".weight") and w.ndim == 2:
            scale = w.abs().amax(dim=1) / largest if per_row else w.abs().max() / largest if scaled else \
                torch.tensor(1.0)
            column = scale.reshape(-1, 1) if per_row else scale
            stored[k] = (w / column).to(fmt)
            scales[k.removesuffix(".weight")] = scale
            dequantized[k] = (stored[k].to(torch.bfloat16) * column.to(torch.bfloat16)).float()
        else:
            stored[k] = dequantized[k] = w
    return stored, scales, dequantized


def fp8_error(path, dequantized):
    """Our DiT loaded from path against diffusers on the dequantized weights (diffusers' own converter)."""
    ref = HunyuanVideoTransformer3DModel(**CFG["model"]).eval()
    ref.load_state_dict(diffusers_converter(64)(dequantized), strict=True)
    ours = H.load_transformer(path, dtype=mx.float32, rope_axes_dim=CFG["model"]["rope_axes_dim"])
    inputs = make_inputs(CFG)
    return rel_err(run_ours(ours, inputs), run_reference(ref, inputs))


@pytest.mark.parametrize("kind, scaled, key, per_row", [
    ("e4m3", False, None, False), ("e5m2", False, None, False), ("e4m3", True, "scale_weight", False),
    ("e5m2", True, "scale_weight", False), ("e4m3", True, "weight_scale", False), ("e4m3", True, "scale_weight", True),
    ("e4m3", True, "weight_scale", True)],
    ids=["e4m3-plain", "e5m2-plain", "e4m3-scale_weight", "e5m2-scale_weight", "e4m3-weight_scale",
         "e4m3-scale_weight-per-row", "e4m3-weight_scale-per-row"])
def test_fp8_safetensors(kind, scaled, key, per_row, tmp_path):
    """Single files with fp8 block weights: plain casts (*_fp8_e4m3fn.safetensors), ComfyUI's scaled fp8 (a
    scale_weight per layer and the scaled_fp8 marker) and the newer weight_scale key, a scale per layer or per
    output row, E4M3 and E5M2. They load as their makers dequantize them, written in fp8_state_dict: 1e-4 against
    diffusers on those weights (measured 4.4e-5 to 4.6e-5: bf16 weights in a float32 model)."""
    stored, scales, dequantized = fp8_state_dict(kind, scaled, per_row=per_row)
    tensors = dict(stored)
    if scaled:
        tensors.update({f"{layer}.{key}": s.reshape(-1) for layer, s in scales.items()})
        tensors["scaled_fp8"] = torch.zeros(0, dtype=FP8[kind][0])
    path = tmp_path / f"hunyuan_video_720_fp8_{kind}.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in tensors.items()}, path)
    err = fp8_error(path, dequantized)
    print(f"fp8 {kind} {key} per row {per_row}: {err:.2e}")
    assert err <= 1e-4, f"fp8 {kind} ({key or 'plain'}): relative error {err:.2e}"


@pytest.mark.parametrize("kind", FP8)
def test_tencent_fp8_checkpoint(kind, tmp_path):
    """mp_rank_00_model_states_fp8.pt (fp8 block weights) + _map.pt (a scale per layer): loaded as Tencent
    dequantizes it, W = W_fp8.to(bf16) * scale.to(bf16); 1e-4. A missing map, or a layer missing from it,
    is one sentence."""
    stored, scales, dequantized = fp8_state_dict(kind, scaled=True)
    path = tmp_path / "mp_rank_00_model_states_fp8.pt"
    torch.save({"module": stored}, path)
    with pytest.raises(H.HunyuanVideoError, match="_map.pt, which is not beside it"):
        H.load_transformer(path)
    torch.save({k: v for k, v in scales.items() if k != "single_blocks.1.linear2"}, tmp_path / f"{path.stem}_map.pt")
    with pytest.raises(H.HunyuanVideoError, match="has no scale for single_blocks.1.linear2"):
        H.load_transformer(path, rope_axes_dim=CFG["model"]["rope_axes_dim"])
    torch.save(scales, tmp_path / f"{path.stem}_map.pt")
    err = fp8_error(path, dequantized)
    assert err <= 1e-4, f"Tencent fp8 ({kind}): relative error {err:.2e}"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident memory from Linux's /proc")
def test_tencent_fp8_loads_tensor_by_tensor(tmp_path):
    """The fp8 .pt is converted one tensor at a time: the resident memory a load adds at its peak stays within
    the result (bf16), the file (memory-mapped) and half the result for MLX's own start and one tensor, where
    holding the whole dequantized state dict beside the result adds the result's size again."""
    m = dict(CFG["model"], num_attention_heads=4, attention_head_dim=128, rope_axes_dim=(32, 48, 48), num_layers=3,
             num_single_layers=3)
    stored, scales, _ = fp8_state_dict("e4m3", scaled=True, m=m)
    path = tmp_path / "mp_rank_00_model_states_fp8.pt"
    torch.save({"module": stored}, path)
    torch.save(scales, tmp_path / f"{path.stem}_map.pt")
    result = sum(v.numel() * 2 for v in stored.values())  # everything in bf16
    r = subprocess.run([sys.executable, "-c", RSS_WHILE_LOADING, str(Path(H.__file__).parent), str(path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    grown = int(r.stdout.split()[-1])
    print(f"peak grew by {grown / 2**20:.0f} MB; result {result / 2**20:.0f} MB, file {path.stat().st_size / 2**20:.0f} MB")
    assert grown <= result + path.stat().st_size + result / 2  # measured: 173 MB here; 243 MB before the fix


# the resident memory a load adds at its peak, sampled every half millisecond (Linux's /proc)
RSS_WHILE_LOADING = """
import os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import torch  # imported before measuring: its own libraries are not the load's
import HunyuanVideo_Apple as H
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
peak, done = [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
before = rss()
watcher = threading.Thread(target=watch)
watcher.start()
model = H.load_transformer(sys.argv[2], rope_axes_dim=(32, 48, 48))
done.set()
watcher.join()
print(max(peak[0], rss()) - before)
"""


def test_a_tensor_of_the_wrong_type_is_refused(tmp_path):
    """Integers where a layer expects floating point (here a block weight stored as uint8 without an fp8 type)
    are refused in one sentence that names them, never loaded as numbers."""
    sd = tencent_state_dict(CFG["model"])
    sd["double_blocks.0.img_attn_qkv.weight"] = sd["double_blocks.0.img_attn_qkv.weight"].to(torch.uint8)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "dit.safetensors")
    with pytest.raises(H.HunyuanVideoError) as e:
        H.load_transformer(tmp_path / "dit.safetensors", rope_axes_dim=CFG["model"]["rope_axes_dim"])
    assert "1 tensors of the wrong type (double_blocks.0.img_attn_qkv.weight uint8 where floating point is " \
           "expected)" in str(e.value) and "\n" not in str(e.value)


def test_a_stored_quantization_is_kept(dit, tmp_path):
    model = H.load_transformer(dit[0], quantization="int8")
    H.save_transformer(model, tmp_path / "q8")
    again = H.load_transformer(tmp_path / "q8")
    assert quantized_layers(again) == quantized_layers(model) and again.quantization == "int8"
    with pytest.raises(H.HunyuanVideoError, match="stored in int8; it cannot become int4"):
        H.load_transformer(tmp_path / "q8", quantization="int4")


# the dequantized matmul (weights dequantized just before a plain matmul) against MLX's quantized kernel, on the same
# quantized weights: in float32 they differ by the order of the sums only (measured 0 for int8 and int4, 5.7e-7 for
# fp8; bound 1e-5); in bf16 both round, so the dequantized way is held to the rounding bf16 itself brings: its
# distance to the float32 kernel no more than the bf16 kernel's (measured 0.88x to 0.93x of it; bound 1.5x)


@pytest.mark.parametrize("q", ["int8", "int4", "fp8"])
def test_dequantized_matmul_equals_the_kernel(dit, q, monkeypatch):
    """Both ways of the DiT's quantized layers give the same forward within the dtype's rounding; the dequantized
    way never calls mx.quantized_matmul (counted), the kernel way does for every quantized layer."""
    inputs = make_inputs(CFG)
    calls = []
    real = mx.quantized_matmul
    monkeypatch.setattr(mx, "quantized_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = {}
    for dtype in (mx.float32, mx.bfloat16):
        model = H.load_transformer(dit[0], dtype=dtype, quantization=q)
        for dequantized in (False, True):
            calls.clear()
            H.set_quantized_matmul(model, dequantized)
            out[dtype, dequantized] = run_ours(model, inputs)
            assert len(calls) == (0 if dequantized else len(quantized_layers(model)))
    assert rel_err(out[mx.float32, True], out[mx.float32, False]) <= 1e-5
    bf16_rounding = rel_err(out[mx.bfloat16, False], out[mx.float32, False])
    err = rel_err(out[mx.bfloat16, True], out[mx.float32, False])
    assert err <= 1.5 * bf16_rounding, f"{q}: {err:.2e} from float32, against bf16's own {bf16_rounding:.2e}"


def test_the_matmul_rule_and_its_plan(tmp_path, monkeypatch):
    """The rule: dequantized on an Apple GPU other than M5 at 768 rows or more, the kernel on the CPU and CUDA
    backends; chosen by name, always. The plan counts one double block's token-wise weights in bf16 when the
    matmul dequantizes (24 dim^2 weights and 18 dim biases, the four 128-wide norms): 906 MB at full size."""
    import bench_hunyuan_apple as B
    assert H.dequantize_matmul(10 ** 5) is False  # this machine: the CPU backend
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    for name, rows, expected in [("Apple M4 Max", 768, True), ("Apple M4 Max", 767, False), ("Apple M1", 5000, True),
                                 ("Apple M5 Pro", 10 ** 5, False)]:
        monkeypatch.setattr(mx, "device_info", lambda: {"device_name": name})
        assert H.dequantize_matmul(rows) is expected, (name, rows)
    assert H.dequantize_matmul(10, "dequantized") and not H.dequantize_matmul(10 ** 6, "kernel")
    with pytest.raises(H.HunyuanVideoError, match="quantized matmul 'fast': use one of auto, kernel, dequantized"):
        H.dequantize_matmul(10, "fast")
    folder = B.header_only_checkpoint(tmp_path)
    peak = lambda m: H.estimate_memory(folder, 544, 960, 129, "int8", backend="gpu", quantized_matmul=m)["denoise"]  # noqa
    d = 3072
    assert peak("dequantized") - peak("kernel") == (24 * d * d + 18 * d + 4 * 128) * 2
    with pytest.raises(H.HunyuanVideoError, match="quantized_matmul chooses how quantized layers multiply: give quantization too"):
        H.HunyuanVideoPipeline.from_pretrained("tiny", quantized_matmul="kernel")

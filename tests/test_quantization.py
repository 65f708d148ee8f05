"""Quantization: each mode against float (diffusers, float32, the same random weights), what stays
unquantized, Tencent's fp8 checkpoint, and converted checkpoints that reload exactly.

Bounds (relative error = max |ours - ref| / max |ref|, float32 compute, tiny DiT of 64-wide layers):
  int8 <= 2e-2, fp8 <= 1.2e-1, int4 <= 4e-1, and int8 < fp8 < int4. The LLM's states in int8: <= 2e-2.
  Tencent's fp8 file against diffusers on the weights Tencent's own formula dequantizes: 1e-4.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from conftest import rel_err
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.loaders import single_file_utils
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
    H.HunyuanVideoPipeline.from_pretrained(folder, quantization="int8")("a cat", 32, 32, 5, 1, seed=0)
    assert quantized_layers(loaded["load_transformer"]) and quantized_layers(loaded["load_text_encoder"])
    assert not quantized_layers(loaded["load_vae"]) and not quantized_layers(loaded["load_clip_text_encoder"])


def test_tencent_fp8_checkpoint(tmp_path):
    """mp_rank_00_model_states_fp8.pt (float8_e4m3fn block weights) + _map.pt (a scale per layer): loaded as
    Tencent dequantizes it, W = W_fp8.to(bf16) * scale.to(bf16)."""
    m = dict(CFG["model"])
    sd = tencent_state_dict(m)
    scales, dequantized = {}, dict(sd)
    for k, w in sd.items():
        if k.startswith(("double_blocks", "single_blocks")) and k.endswith(".weight") and w.ndim == 2:
            scale = w.abs().max() / 448.0  # E4M3's largest value
            sd[k] = (w / scale).to(torch.float8_e4m3fn)
            scales[k.removesuffix(".weight")] = scale
            dequantized[k] = (sd[k].to(torch.bfloat16) * scale.to(torch.bfloat16)).float()
    path = tmp_path / "mp_rank_00_model_states_fp8.pt"
    torch.save({"module": sd}, path)
    with pytest.raises(H.HunyuanVideoError, match="_map.pt, which is not beside it"):
        H.load_transformer(path)
    torch.save(scales, tmp_path / "mp_rank_00_model_states_fp8_map.pt")
    ref = HunyuanVideoTransformer3DModel(**m).eval()
    ref.load_state_dict(diffusers_converter(64)(dequantized), strict=True)
    ours = H.load_transformer(path, dtype=mx.float32, rope_axes_dim=m["rope_axes_dim"])
    inputs = make_inputs(CFG)
    err = rel_err(run_ours(ours, inputs), run_reference(ref, inputs))
    assert err <= 1e-4, f"Tencent fp8: relative error {err:.2e}"
    assert single_file_utils  # the converter used above is diffusers' own


def test_a_stored_quantization_is_kept(dit, tmp_path):
    model = H.load_transformer(dit[0], quantization="int8")
    H.save_transformer(model, tmp_path / "q8")
    again = H.load_transformer(tmp_path / "q8")
    assert quantized_layers(again) == quantized_layers(model) and again.quantization == "int8"
    with pytest.raises(H.HunyuanVideoError, match="stored in int8; it cannot become int4"):
        H.load_transformer(tmp_path / "q8", quantization="int4")

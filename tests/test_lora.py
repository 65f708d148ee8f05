"""LoRA: the four key layouts, against diffusers' load_lora_weights + set_adapters (PEFT) run live on the same
random DiT and random LoRAs, on quantized weights, and bad LoRAs refused in one sentence.

Tolerances (relative error = max |ours - ref| / max |ref|, float32):
  diffusers and original layouts against diffusers: 1e-4 (two LoRAs of several ranks at two scales, on fused
    q|k|v, single blocks' linear1, the modulation, the final layer, the token refiner and the patch embedding);
  musubi (kohya) and ComfyUI layouts against the same matrices written in the original layout: 1e-6;
  an int8 converted checkpoint with the LoRA as a branch against diffusers with it: the int8 bound of
    test_quantization (2e-2).
"""

import gc
import inspect

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import rel_err
from diffusers import HunyuanVideoPipeline
from diffusers.loaders import lora_conversion_utils, lora_pipeline
from safetensors.torch import save_file
from test_quantization import BOUNDS
from test_transformer import make_inputs, make_reference, run_ours, run_reference

import HunyuanVideo_Apple as H

F32_TOL = 1e-4
SAME_TOL = 1e-6
CFG = dict(model=dict(num_attention_heads=2, attention_head_dim=32, rope_axes_dim=(8, 12, 12), num_layers=2,
                      num_single_layers=2, num_refiner_layers=1, text_embed_dim=48, pooled_projection_dim=32),
           latent=(1, 3, 4, 6), text=8, lengths=(6,))
D = 64
MLP = 4 * D


def pair(g, out, fan_in, r, size=0.5):
    """Random LoRA matrices, down (r, in) and up (out, r), big enough to move the output well past the tolerance."""
    return (torch.randn(r, fan_in, generator=g) / np.sqrt(fan_in),
            size * torch.randn(out, r, generator=g) / np.sqrt(r))


def diffusers_lora(seed, r):
    """Diffusers/PEFT keys, q, k, v apart; a rank per layer (PEFT's rank_pattern), the patch embedding's Conv3d
    and the final layer's (scale, shift) modulation included."""
    g = torch.Generator().manual_seed(seed)
    layers = {"transformer_blocks.0.attn.to_q": (D, D, r), "transformer_blocks.0.attn.to_k": (D, D, r + 1),
              "transformer_blocks.1.attn.add_v_proj": (D, D, r), "transformer_blocks.1.ff.net.2": (D, MLP, r),
              "transformer_blocks.0.norm1.linear": (6 * D, D, r), "single_transformer_blocks.0.attn.to_q": (D, D, r),
              "single_transformer_blocks.0.attn.to_k": (D, D, r), "single_transformer_blocks.0.attn.to_v": (D, D, r),
              "single_transformer_blocks.0.proj_mlp": (MLP, D, r),
              "single_transformer_blocks.1.proj_out": (D, D + MLP, r),
              "single_transformer_blocks.1.norm.linear": (3 * D, D, r), "norm_out.linear": (2 * D, D, r),
              "context_embedder.token_refiner.refiner_blocks.0.attn.to_v": (D, D, r),
              "time_text_embed.timestep_embedder.linear_2": (D, D, r)}
    sd = {}
    for name, (out, fan_in, rank) in layers.items():
        down, up = pair(g, out, fan_in, rank)
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = down, up
    down, up = pair(g, D, 16 * 4, r)  # x_embedder.proj: Conv3d (D, 16, 1, 2, 2)
    sd["transformer.x_embedder.proj.lora_A.weight"] = down.reshape(r, 16, 1, 2, 2)
    sd["transformer.x_embedder.proj.lora_B.weight"] = up.reshape(D, r, 1, 1, 1)
    return sd


ORIGINAL = {"double_blocks.0.img_attn_qkv": (3 * D, D), "double_blocks.1.txt_attn_qkv": (3 * D, D),
            "double_blocks.0.img_attn_proj": (D, D), "double_blocks.1.txt_mlp.fc1": (MLP, D),
            "double_blocks.1.img_mod.linear": (6 * D, D), "single_blocks.0.linear1": (3 * D + MLP, D),
            "single_blocks.1.linear2": (D, D + MLP), "single_blocks.1.modulation.linear": (3 * D, D)}


def original_matrices(seed, r):
    g = torch.Generator().manual_seed(seed)
    return {name: pair(g, out, fan_in, r) for name, (out, fan_in) in ORIGINAL.items()}


def original_lora(matrices, prefix="diffusion_model."):
    """The original (diffusion-pipe) layout: Tencent names, one lora_A for a fused q|k|v."""
    return {f"{prefix}{name}.{ab}.weight": t for name, (down, up) in matrices.items()
            for ab, t in (("lora_A", down), ("lora_B", up))}


def patched_hunyuan_lora_converter():
    """diffusers' _convert_hunyuan_video_lora_to_diffusers with its hard-coded width (3072, the real model's) set to
    the tiny model's, so that single blocks' linear1 splits at tiny sizes. Nothing else changes."""
    src = inspect.getsource(lora_conversion_utils._convert_hunyuan_video_lora_to_diffusers)
    assert src.count("hidden_size = 3072") == 1, "diffusers' converter changed: revisit this test"
    namespace = dict(vars(lora_conversion_utils))
    exec(src.replace("hidden_size = 3072", f"hidden_size = {D}"), namespace)
    return namespace["_convert_hunyuan_video_lora_to_diffusers"]


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    ref = make_reference(CFG["model"])
    ref.save_pretrained(root / "transformer")
    return root, ref


def reference_with(ref, loras, monkeypatch):
    """diffusers' pipeline holding the random DiT, the LoRA files loaded by load_lora_weights and weighted by
    set_adapters, as a user of diffusers does."""
    monkeypatch.setattr(lora_pipeline, "_convert_hunyuan_video_lora_to_diffusers", patched_hunyuan_lora_converter())
    pipe = HunyuanVideoPipeline(transformer=ref, vae=None, text_encoder=None, tokenizer=None, scheduler=None,
                                text_encoder_2=None, tokenizer_2=None)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, [scale for _, scale in loras])
    return pipe


def test_diffusers_and_original_layouts_match_diffusers(dit, monkeypatch):
    root, ref = dit
    inputs = make_inputs(CFG)
    plain = run_reference(ref, inputs)
    save_file(diffusers_lora(seed=10, r=4), root / "diffusers_lora.safetensors")
    save_file(original_lora(original_matrices(seed=11, r=2), "transformer."), root / "original_lora.safetensors")
    loras = [(root / "diffusers_lora.safetensors", 0.8), (root / "original_lora.safetensors", -0.6)]
    pipe = reference_with(ref, loras, monkeypatch)
    expected = run_reference(pipe.transformer, inputs)
    pipe.unload_lora_weights()
    assert rel_err(expected, plain) > 0.1  # the LoRAs change the output far past the tolerance
    ours = H.load_transformer(root / "transformer", dtype=mx.float32, loras=loras)
    err = rel_err(run_ours(ours, inputs), expected)
    print(f"two LoRAs vs diffusers: {err:.2e}")
    assert err <= F32_TOL, f"relative error {err:.2e} > {F32_TOL}"
    for path, scale in loras:  # each alone, at its scale
        pipe = reference_with(ref, [(path, scale)], monkeypatch)
        expected = run_reference(pipe.transformer, inputs)
        pipe.unload_lora_weights()
        err = rel_err(run_ours(H.load_transformer(root / "transformer", dtype=mx.float32, loras=[(path, scale)]),
                               inputs), expected)
        print(f"{path.name} vs diffusers: {err:.2e}")
        assert err <= F32_TOL, f"{path.name}: relative error {err:.2e} > {F32_TOL}"


def test_a_lora_diffusers_saved_with_its_config_takes_its_alpha(dit, tmp_path, monkeypatch):
    """A LoRA trained with PEFT and saved by diffusers' HunyuanVideoPipeline.save_lora_weights with its LoraConfig
    (rank 2, lora_alpha 8: scale 4; one module's alpha 1 by alpha_pattern; in the file's metadata under
    "transformer."): scaled as load_lora_weights scales it, float32 (measured 2.8e-5; bound F32_TOL). Read at
    alpha = r, as before the metadata was read, it is 4x too weak on most layers (relative error 0.4)."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root, ref = dit
    model = copy.deepcopy(ref)
    config = LoraConfig(r=2, lora_alpha=8, alpha_pattern={"transformer_blocks.1.ff.net.2": 1},
                        target_modules=["transformer_blocks.0.attn.to_k", "transformer_blocks.1.ff.net.2",
                                        "single_transformer_blocks.0.proj_mlp", "norm_out.linear"],
                        init_lora_weights=False)
    torch.manual_seed(3)
    model.add_adapter(config, adapter_name="trained")
    HunyuanVideoPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(
        model, adapter_name="trained"), transformer_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    inputs = make_inputs(CFG)
    pipe = reference_with(ref, [(path, 0.6)], monkeypatch)
    expected = run_reference(pipe.transformer, inputs)
    pipe.unload_lora_weights()
    err = rel_err(run_ours(H.load_transformer(root / "transformer", dtype=mx.float32, loras=[(path, 0.6)]), inputs),
                  expected)
    print(f"a LoRA saved with its config vs diffusers: {err:.2e}")
    assert err <= F32_TOL, f"relative error {err:.2e} > {F32_TOL}"


def comfy_name(name):
    """Tencent's module names as ComfyUI's own modules call them."""
    for a, b in ((".img_mod.linear", ".img_mod.lin"), (".modulation.linear", ".modulation.lin"),
                 ("_attn_qkv", "_attn.qkv"), ("_attn_proj", "_attn.proj"), ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")):
        name = name.replace(a, b)
    return name


def test_musubi_and_comfyui_layouts_equal_the_original(dit, tmp_path):
    root, _ = dit
    matrices = original_matrices(seed=12, r=4)
    save_file(original_lora(matrices), tmp_path / "original.safetensors")
    musubi = {}
    for name, (down, up) in matrices.items():  # alpha = 2 r: scale 2, so up is stored halved
        key = "lora_unet_" + name.replace(".", "_")
        musubi.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up / 2,
                       f"{key}.alpha": torch.tensor(8.0)})
    save_file(musubi, tmp_path / "musubi.safetensors")
    comfy = {f"diffusion_model.{comfy_name(name)}.{ud}.weight": t for name, (down, up) in matrices.items()
             for ud, t in (("lora_down", down), ("lora_up", up))}
    assert "diffusion_model.double_blocks.1.img_mod.lin.lora_down.weight" in comfy
    assert "diffusion_model.double_blocks.1.txt_mlp.0.lora_up.weight" in comfy
    save_file(comfy, tmp_path / "comfy.safetensors")
    inputs = make_inputs(CFG)
    out = {fmt: run_ours(H.load_transformer(root / "transformer", dtype=mx.float32,
                                            loras=[(tmp_path / f"{fmt}.safetensors", 0.7)]), inputs)
           for fmt in ("original", "musubi", "comfy")}
    for fmt in ("musubi", "comfy"):
        err = rel_err(out[fmt], out["original"])
        print(f"{fmt} vs original: {err:.2e}")
        assert err <= SAME_TOL, f"{fmt}: relative error {err:.2e} > {SAME_TOL}"


def test_comfyui_bias_deltas_are_added(dit, tmp_path):
    """.diff_b: a bias delta, checked against a checkpoint whose bias was changed by the same amount."""
    root, ref = dit
    g = torch.Generator().manual_seed(13)
    delta = 0.3 * torch.randn(6 * D, generator=g)
    save_file({"diffusion_model.double_blocks.0.img_mod.lin.diff_b": delta}, tmp_path / "bias.safetensors")
    changed = make_reference(CFG["model"])
    with torch.no_grad():
        changed.transformer_blocks[0].norm1.linear.bias += 0.5 * delta
    inputs = make_inputs(CFG)
    ours = H.load_transformer(root / "transformer", dtype=mx.float32, loras=[(tmp_path / "bias.safetensors", 0.5)])
    err = rel_err(run_ours(ours, inputs), run_reference(changed, inputs))
    assert err <= F32_TOL, f"relative error {err:.2e} > {F32_TOL}"


@pytest.mark.parametrize("layout, branches", [("original", 6), ("diffusers", 5)])
def test_on_an_int8_checkpoint_the_lora_is_a_branch(dit, tmp_path, monkeypatch, layout, branches):
    """On a converted int8 checkpoint the LoRA stays beside the quantized layers (no dequantized copy): the output
    is within int8's bound of diffusers with the LoRA, and the memory held grows by the LoRA's matrices only. In the
    diffusers layout the LoRA addresses slices of fused layers (q, k apart in img_attn_qkv; v alone in txt_attn_qkv;
    q, k, v and proj_mlp in single blocks' linear1): each slice's branch adds to its rows only."""
    root, ref = dit
    H.save_transformer(H.load_transformer(root / "transformer", dtype=mx.float32, quantization="int8"), tmp_path / "q8")
    lora = tmp_path / "lora.safetensors"
    save_file(original_lora(original_matrices(seed=14, r=4)) if layout == "original" else diffusers_lora(14, 4), lora)
    inputs = make_inputs(CFG)
    pipe = reference_with(ref, [(lora, 1.0)], monkeypatch)
    expected = run_reference(pipe.transformer, inputs)
    pipe.unload_lora_weights()

    gc.collect()  # what earlier tests left to the collector is freed now, not while the memory is measured
    mx.clear_cache()
    before = mx.get_active_memory()
    plain = H.load_transformer(tmp_path / "q8", dtype=mx.float32)
    held_plain = mx.get_active_memory() - before
    del plain
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    model = H.load_transformer(tmp_path / "q8", dtype=mx.float32, loras=[(lora, 1.0)])
    held = mx.get_active_memory() - before
    lora_bytes = lora.stat().st_size  # float32, as the model computes here
    print(f"held {held_plain} B without the LoRA, {held} B with it; the LoRA file {lora_bytes} B")
    assert held - held_plain <= lora_bytes
    branched = [m for _, m in model.named_modules() if isinstance(m, H.LoRAQuantizedLinear)]
    assert len(branched) == branches and all(m.weight.dtype == mx.uint32 for m in branched)  # modulation: merged
    err = rel_err(run_ours(model, inputs), expected)
    print(f"int8 + LoRA branch vs diffusers float32 with the LoRA: {err:.2e}")
    assert err <= BOUNDS["int8"], f"int8 + LoRA: relative error {err:.2e} > {BOUNDS['int8']}"
    streamed = H.load_transformer(tmp_path / "q8", dtype=mx.float32, loras=[(lora, 1.0)], stream=True)
    assert np.array_equal(run_ours(streamed, inputs), run_ours(model, inputs))


def test_merged_before_quantizing_and_streamed(dit, tmp_path):
    """A bf16 checkpoint quantized on load gets the LoRA merged first; streamed blocks (--low-memory) get it too."""
    root, _ = dit
    lora = tmp_path / "lora.safetensors"
    save_file(original_lora(original_matrices(seed=15, r=4)), lora)
    inputs = make_inputs(CFG)
    merged = run_ours(H.load_transformer(root / "transformer", dtype=mx.float32, loras=[lora]), inputs)
    q8 = H.load_transformer(root / "transformer", dtype=mx.float32, quantization="int8", loras=[lora])
    assert not any(isinstance(m, H.LoRAQuantizedLinear) for _, m in q8.named_modules())
    assert rel_err(run_ours(q8, inputs), merged) <= BOUNDS["int8"]
    streamed = H.load_transformer(root / "transformer", dtype=mx.float32, loras=[lora], stream=True)
    assert rel_err(run_ours(streamed, inputs), merged) <= SAME_TOL


# ---- bad LoRAs: one sentence each ----------------------------------------------------------------------

def refused(root, lora, *words, **kw):
    with pytest.raises(H.HunyuanVideoError) as e:
        H.load_transformer(root / "transformer", dtype=mx.float32, loras=[lora], **kw)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_a_lora_for_another_model(dit, tmp_path):
    root, _ = dit
    g = torch.Generator().manual_seed(0)
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 8, generator=g),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 4, generator=g)}
    save_file(sdxl, tmp_path / "sdxl.safetensors")
    refused(root, tmp_path / "sdxl.safetensors", "matches no layer", "another model")
    refused(root, tmp_path / "sdxl.safetensors", "another model", lora_ignore_unmatched=True)
    wider = original_lora({"double_blocks.0.img_attn_qkv": pair(g, 9 * D, 3 * D, 4)})  # a wider model's
    save_file(wider, tmp_path / "wider.safetensors")
    refused(root, tmp_path / "wider.safetensors", "double_blocks.0.img_attn_qkv", "another model")


def test_unmatched_keys_are_reported_or_ignored_when_asked(dit, tmp_path):
    root, _ = dit
    sd = original_lora(original_matrices(seed=16, r=2))
    g = torch.Generator().manual_seed(1)
    sd.update({"diffusion_model.double_blocks.7.img_attn_qkv.lora_A.weight": torch.randn(2, D, generator=g),
               "diffusion_model.double_blocks.7.img_attn_qkv.lora_B.weight": torch.randn(3 * D, 2, generator=g),
               "diffusion_model.double_blocks.0.img_attn_qkv.dora_scale": torch.randn(1, D, generator=g)})
    save_file(sd, tmp_path / "extra.safetensors")
    refused(root, tmp_path / "extra.safetensors", "3 of the 19 keys", "double_blocks.0.img_attn_qkv.dora_scale",
            "set lora_ignore_unmatched to load the rest")
    with pytest.warns(UserWarning, match="3 of the 19 keys"):
        H.load_transformer(root / "transformer", dtype=mx.float32, loras=[tmp_path / "extra.safetensors"],
                           lora_ignore_unmatched=True)


def test_corrupt_or_missing_lora_and_bad_scale(dit, tmp_path):
    root, _ = dit
    save_file(original_lora(original_matrices(seed=17, r=2)), tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    refused(root, tmp_path / "cut.safetensors", "could not be read", "corrupt")
    refused(root, tmp_path / "none.safetensors", "does not exist")
    refused(root, (tmp_path / "good.safetensors", "strong"), "not a number")
    half = {k: v for k, v in original_lora(original_matrices(seed=17, r=2)).items() if "lora_B" not in k
            or "img_attn_qkv" not in k}
    save_file(half, tmp_path / "half.safetensors")
    refused(root, tmp_path / "half.safetensors", "only one of the two matrices", "double_blocks.0.img_attn_qkv")


def test_a_pickle_lora_is_read_weights_only(dit, tmp_path):
    root, _ = dit
    sd = original_lora(original_matrices(seed=18, r=2))
    torch.save(sd, tmp_path / "lora.pt")
    save_file(sd, tmp_path / "lora.safetensors")
    inputs = make_inputs(CFG)
    a, b = (run_ours(H.load_transformer(root / "transformer", dtype=mx.float32, loras=[tmp_path / f]), inputs)
            for f in ("lora.pt", "lora.safetensors"))
    assert np.array_equal(a, b)

"""HunyuanVideo 1.5's DiT and VAE against diffusers' HunyuanVideo15Transformer3DModel and AutoencoderKLHunyuanVideo15,
run live on the same random weights (the DiT in diffusers' layout and in Tencent's).

Tolerances (relative error = max |ours - ref| / max |ref|), about 3-10x what was measured on this project's Linux
machine:
  float32: 5e-5 (measured 1.8e-6 to 5.1e-6 over the three configs and the two layouts);
  bfloat16 (ours, the default) against bfloat16 (the reference): 5e-2 (measured 1.4e-2; the other configs 6.5e-3
    and 1.7e-2);
  the VAE in float32, decode and encode, whole and tiled: 1.5e-5 (measured 1.3e-6 to 1.5e-6);
  the VAE's decode in float16 (ours, the default) against the reference in float16: 2e-2 (measured 2.3e-3).
"""

import copy

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from conftest import randomize, rel_err
from diffusers import HunyuanVideo15Transformer3DModel
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file

import HunyuanVideo15_Apple as H15
import HunyuanVideo_Apple as H

F32_TOL = 5e-5
BF16_TOL = 5e-2
VAE_TOL = 1.5e-5
VAE_FP16_TOL = 2e-2

MODEL = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, rope_axes_dim=(4, 6, 6),
             num_layers=2, num_refiner_layers=1, text_embed_dim=24, text_embed_2_dim=20, image_embed_dim=12)
# What differs between checkpoints and requests: batch 2 with different text lengths and a prompt without quoted
# text (byT5 all padding); an image's tokens (image to video); the mean-flow timestep; odd latent shapes.
CONFIGS = {
    "t2v-batch2": dict(model=MODEL, latent=(2, 4, 6), llm=(12, (5, 9)), byt5=(6, (3, 0)), image=None),
    "i2v": dict(model=MODEL, latent=(3, 4, 4), llm=(10, (7,)), byt5=(6, (4,)), image=5),
    "meanflow": dict(model={**MODEL, "use_meanflow": True, "num_refiner_layers": 2}, latent=(1, 6, 2),
                     llm=(8, (8,)), byt5=(4, (2,)), image=None),
}


def make_inputs(cfg, seed=1):
    """Channels-first torch inputs, as the reference takes them."""
    g = torch.Generator().manual_seed(seed)
    m = cfg["model"]
    B = len(cfg["llm"][1])

    def states(length, lengths, width):
        mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
        return torch.randn(B, length, width, generator=g), mask
    text, mask = states(*cfg["llm"], m["text_embed_dim"])
    byt5, byt5_mask = states(*cfg["byt5"], m["text_embed_2_dim"])
    image = torch.zeros(B, 3, m["image_embed_dim"]) if cfg["image"] is None else \
        torch.randn(B, cfg["image"], m["image_embed_dim"], generator=g)
    return dict(hidden_states=torch.randn(B, m["in_channels"], *cfg["latent"], generator=g),
                timestep=torch.tensor([700.0, 250.0][:B]), encoder_hidden_states=text, encoder_attention_mask=mask,
                encoder_hidden_states_2=byt5, encoder_attention_mask_2=byt5_mask, image_embeds=image,
                timestep_r=torch.tensor([500.0][:B]) if m.get("use_meanflow") else None)


def run_reference(model, inputs):
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]  # (B, C, T, H, W)
    return out.float().permute(0, 2, 3, 4, 1).numpy()  # channels-last, like ours


def run_ours(model, inputs):
    x = lambda t: None if t is None else mx.array(t.float().numpy())  # noqa: E731
    conditions = H15.Conditions(x(inputs["encoder_hidden_states_2"]), x(inputs["encoder_attention_mask_2"]),
                                x(inputs["image_embeds"]))
    out = model(mx.array(inputs["hidden_states"].permute(0, 2, 3, 4, 1).float().numpy()), x(inputs["timestep"]),
                x(inputs["encoder_hidden_states"]), x(inputs["encoder_attention_mask"]), conditions,
                x(inputs["timestep_r"]))
    return np.array(out.astype(mx.float32))


@pytest.mark.parametrize("name", CONFIGS)
def test_diffusers_folder_float32(name, tmp_path):
    cfg = CONFIGS[name]
    ref = randomize(HunyuanVideo15Transformer3DModel(**cfg["model"]), seed=0).eval()
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="2MB")  # sharded, with an index
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    ours = H15.load_transformer(tmp_path / "transformer", dtype=mx.float32)
    assert len(ours.double_blocks) == cfg["model"]["num_layers"] and not ours.single_blocks
    inputs = make_inputs(cfg)
    err = rel_err(run_ours(ours, inputs), run_reference(ref, inputs))
    assert err <= F32_TOL, f"{name}: relative error {err:.2e} > {F32_TOL}"


# Tencent's names for diffusers' (diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py, read in the other
# direction), written out here: {} is a block's index; the refiner's q, k, v are one fused tensor in Tencent's
# files, the final modulation's halves are in the other order
TENCENT = {
    "time_in.mlp.0": "time_embed.timestep_embedder.linear_1", "time_in.mlp.2": "time_embed.timestep_embedder.linear_2",
    "time_r_in.mlp.0": "time_embed.timestep_embedder_r.linear_1",
    "time_r_in.mlp.2": "time_embed.timestep_embedder_r.linear_2",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "byt5_in.layernorm": "context_embedder_2.norm", "byt5_in.fc1": "context_embedder_2.linear_1",
    "byt5_in.fc2": "context_embedder_2.linear_2", "byt5_in.fc3": "context_embedder_2.linear_3",
    "vision_in.proj.0": "image_embedder.norm_in", "vision_in.proj.1": "image_embedder.linear_1",
    "vision_in.proj.3": "image_embedder.linear_2", "vision_in.proj.4": "image_embedder.norm_out",
    "img_in.proj": "x_embedder.proj", "cond_type_embedding": "cond_type_embed",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}
TENCENT_REFINER = {"norm1": "norm1", "norm2": "norm2", "self_attn_proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj",
                   "mlp.fc2": "ff.net.2", "adaLN_modulation.1": "norm_out.linear"}
TENCENT_BLOCK = {
    "img_mod.linear": "norm1.linear", "txt_mod.linear": "norm1_context.linear",
    "img_attn_q": "attn.to_q", "img_attn_k": "attn.to_k", "img_attn_v": "attn.to_v",
    "img_attn_q_norm": "attn.norm_q", "img_attn_k_norm": "attn.norm_k", "img_attn_proj": "attn.to_out.0",
    "txt_attn_q": "attn.add_q_proj", "txt_attn_k": "attn.add_k_proj", "txt_attn_v": "attn.add_v_proj",
    "txt_attn_q_norm": "attn.norm_added_q", "txt_attn_k_norm": "attn.norm_added_k", "txt_attn_proj": "attn.to_add_out",
    "img_mlp.fc1": "ff.net.0.proj", "img_mlp.fc2": "ff.net.2",
    "txt_mlp.fc1": "ff_context.net.0.proj", "txt_mlp.fc2": "ff_context.net.2"}


def tencent_state_dict(ref, cfg):
    sd = ref.state_dict()
    names = dict(TENCENT)
    for i in range(cfg["num_layers"]):
        names.update({f"double_blocks.{i}.{t}": f"transformer_blocks.{i}.{d}" for t, d in TENCENT_BLOCK.items()})
    for i in range(cfg["num_refiner_layers"]):
        names.update({f"txt_in.individual_token_refiner.blocks.{i}.{t}":
                      f"context_embedder.token_refiner.refiner_blocks.{i}.{d}" for t, d in TENCENT_REFINER.items()})
    out = {}
    for t, d in names.items():
        for p in ("weight", "bias"):
            if f"{d}.{p}" in sd:
                out[f"{t}.{p}"] = sd.pop(f"{d}.{p}")
    for key in [k for k in out if k.startswith("final_layer.adaLN_modulation.1.")]:
        scale, shift = out[key].chunk(2)
        out[key] = torch.cat([shift, scale])
    for i in range(cfg["num_refiner_layers"]):
        d = f"context_embedder.token_refiner.refiner_blocks.{i}.attn."
        for p in ("weight", "bias"):
            out[f"txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv.{p}"] = torch.cat(
                [sd.pop(f"{d}to_{x}.{p}") for x in "qkv"])
    assert not sd, sorted(sd)  # every tensor renamed
    return {k: v.contiguous() for k, v in out.items()}


def tencent_config(m, task, resolution):
    """A DiT folder's config.json as Tencent's HunyuanVideo_1_5_DiffusionTransformer writes it (diffusers'
    ConfigMixin over its __init__'s names, read in Tencent's hyvideo/models/transformers/): its in_channels counts
    the latents alone (the patch embedding takes 2 x in_channels + 1 with concat_condition)."""
    return {"_class_name": "HunyuanVideo_1_5_DiffusionTransformer", "_diffusers_version": "0.35.0",
            "patch_size": [1, 1, 1], "in_channels": (m["in_channels"] - 1) // 2, "concat_condition": True,
            "out_channels": m["out_channels"], "hidden_size": m["num_attention_heads"] * m["attention_head_dim"],
            "heads_num": m["num_attention_heads"], "mlp_width_ratio": 4.0, "mlp_act_type": "gelu_tanh",
            "mm_double_blocks_depth": m["num_layers"], "mm_single_blocks_depth": 0, "rope_dim_list": [4, 6, 6],
            "qkv_bias": True, "qk_norm": True, "qk_norm_type": "rms", "guidance_embed": False,
            "use_meanflow": m.get("use_meanflow", False), "text_projection": "single_refiner",
            "use_attention_mask": True, "text_states_dim": m["text_embed_dim"],
            "text_states_dim_2": m["text_embed_2_dim"],
            "rope_theta": 256, "attn_mode": "flash", "glyph_byT5_v2": True, "vision_projection": "linear",
            "vision_states_dim": m["image_embed_dim"], "is_reshape_temporal_channels": False,
            "use_cond_type_embedding": True, "ideal_resolution": resolution, "ideal_task": task}


def test_tencent_and_comfyui_files_float32(tmp_path):
    """Tencent's single file and a transformer/720p_t2v/ folder of its (its own config.json: in_channels 4 where
    the tensors take 9, patch_size a list; its task and resolution read from it), ComfyUI's file: each against the
    reference (bound F32_TOL). A pipeline given that folder as its DiT, with an image-to-video checkpoint's other
    parts, runs text to video, as the DiT's config says."""
    import json

    cfg = CONFIGS["i2v"]
    ref = randomize(HunyuanVideo15Transformer3DModel(**cfg["model"]), seed=2).eval()
    sd = tencent_state_dict(ref, cfg["model"])
    save_file(sd, tmp_path / "tencent.safetensors")
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, tmp_path / "comfyui.safetensors")
    folder = tmp_path / "transformer" / "720p_t2v"
    folder.mkdir(parents=True)
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(tencent_config(cfg["model"], "t2v", "720p")))
    inputs = make_inputs(cfg)
    expected = run_reference(ref, inputs)
    for name in ("tencent.safetensors", "comfyui.safetensors", "transformer/720p_t2v"):
        ours = H15.load_transformer(tmp_path / name, dtype=mx.float32, **({} if "/" in name else
                                                                           dict(rope_axes_dim=(4, 6, 6))))
        assert "/" not in name or (ours.task_type, ours.target_size) == ("t2v", 960)
        err = rel_err(run_ours(ours, inputs), expected)
        assert err <= F32_TOL, f"{name}: relative error {err:.2e} > {F32_TOL}"
    assert H15.HunyuanVideo15Pipeline.from_pretrained("tiny15-i2v", transformer=str(folder)).image_condition() is None


def test_bfloat16_default_against_the_reference_in_bfloat16(tmp_path):
    cfg = CONFIGS["t2v-batch2"]
    ref = randomize(HunyuanVideo15Transformer3DModel(**cfg["model"]), seed=0).eval().to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "transformer")  # checkpoints ship in bf16
    ours = H15.load_transformer(tmp_path / "transformer")
    assert ours.dtype == mx.bfloat16
    inputs = make_inputs(cfg)
    ref_inputs = {k: v.to(torch.bfloat16) if v is not None and v.is_floating_point() else v for k, v in inputs.items()}
    out = run_ours(ours, inputs)
    err = rel_err(out, run_reference(ref, ref_inputs))
    assert np.isfinite(out).all() and err <= BF16_TOL, f"bf16 relative error {err:.2e} > {BF16_TOL}"


def test_a_13b_transformer_is_refused_in_one_sentence(tmp_path):
    """A 13B DiT folder given where a 1.5 one is expected (and the reverse): one sentence naming the model it is
    for (told by its tensors' names: 13B's single-stream blocks, 1.5's byT5 projection)."""
    small = dict(num_attention_heads=2, attention_head_dim=16, rope_axes_dim=(4, 6, 6), num_layers=1,
                 num_single_layers=1, num_refiner_layers=1, text_embed_dim=24, pooled_projection_dim=8)
    from diffusers import HunyuanVideoTransformer3DModel
    HunyuanVideoTransformer3DModel(**small).save_pretrained(tmp_path / "13b")
    HunyuanVideo15Transformer3DModel(**MODEL).save_pretrained(tmp_path / "15")
    with pytest.raises(H.HunyuanVideoError, match="is HunyuanVideo \\(13B\\)'s DiT, and this model is "
                                                  "HunyuanVideo 1.5"):
        H15.load_transformer(tmp_path / "13b")
    with pytest.raises(H.HunyuanVideoError, match="is HunyuanVideo 1.5's DiT, and this model is HunyuanVideo "
                                                  "\\(13B\\)"):
        H.load_transformer(tmp_path / "15")


# ---------------------------------------------------------------------------------------------------
# The VAE against diffusers' AutoencoderKLHunyuanVideo15
# ---------------------------------------------------------------------------------------------------

TINY_VAE = dict(block_out_channels=(8, 16, 16, 16, 16), layers_per_block=1, latent_channels=4)
VAE_TILE, VAE_STRIDE = (H15.VAE_TILE[0], 64, 64), (H15.VAE_STRIDE[0], 48, 48)  # pixels: 4 latents every 3


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from diffusers import AutoencoderKLHunyuanVideo15

    ref = randomize(AutoencoderKLHunyuanVideo15(**TINY_VAE), seed=0).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vae"
    ref.save_pretrained(path)
    return ref, path


def reference_decode(ref, z, tiled):
    """diffusers' decode of z (B, C, T, h, w), whole or tiled in space as ours is with VAE_TILE: channels-last."""
    if tiled:
        ref.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_latent_min_height=4,
                          tile_latent_min_width=4, tile_overlap_factor=0.25)
    with torch.no_grad():
        expected = ref.decode(z).sample.permute(0, 2, 3, 4, 1).numpy()
    ref.disable_tiling()
    return expected


@pytest.mark.parametrize("tiled", [False, True])
def test_vae_decode_float32(vae, tiled):
    ref, path = vae
    ours = H15.load_vae(path, dtype=mx.float32)
    z = torch.randn(1, 4, 2, 6, 7, generator=torch.Generator().manual_seed(1))  # 5 frames of 96 x 112 pixels
    expected = reference_decode(ref, z, tiled)
    out = ours.decode(mx.array(z.permute(0, 2, 3, 4, 1).numpy()), *((VAE_TILE, VAE_STRIDE) if tiled else ()))
    assert out.shape == expected.shape == (1, 5, 96, 112, 3)
    err = rel_err(np.array(out), expected)
    assert err <= VAE_TOL, f"relative error {err:.2e} > {VAE_TOL}"


@pytest.mark.parametrize("tiled", [False, True])
def test_vae_decodes_a_few_frames_at_a_time_as_the_reference_decodes_all(vae, tiled, monkeypatch):
    """5 latent frames (17 of video) decoded 2 latent frames at a time (pieces of 2, 2 and 1: the convolutions' last
    frames and the attention's keys and values carried from piece to piece) against diffusers decoding them all at
    once, float32, whole and tiled in space (measured 1.5e-6 and 1.3e-6; bound VAE_TOL). The pieces are checked
    by counting the decoder's calls and their frames. Without the carried convolution frames, or the carried keys
    and values, the error is about 1, or 0.14 to 0.25."""
    ref, path = vae
    ours = H15.load_vae(path, dtype=mx.float32)
    monkeypatch.setattr(H15, "DECODE_FRAMES", 2)
    z = torch.randn(1, 4, 5, 6, 7, generator=torch.Generator().manual_seed(4))
    expected = reference_decode(ref, z, tiled)
    pieces, call = [], H15.VAEDecoder.__call__
    monkeypatch.setattr(H15.VAEDecoder, "__call__", lambda self, z, cache=None: pieces.append(z.shape[1]) or
                        call(self, z, cache))
    out = ours.decode(mx.array(z.permute(0, 2, 3, 4, 1).numpy()), *((VAE_TILE, VAE_STRIDE) if tiled else ()))
    assert out.shape == expected.shape == (1, 17, 96, 112, 3)
    assert pieces == [2, 2, 1] * (6 if tiled else 1), pieces  # tiled: 3 x 2 tiles of 4 latents every 3
    err = rel_err(np.array(out), expected)
    assert err <= VAE_TOL, f"relative error {err:.2e} > {VAE_TOL}"


def test_a_rank_decodes_only_its_own_tiles(vae, monkeypatch):
    """Two ranks share a tiled decode: this one (rank 0) decodes every second of the 6 tiles, and the tiling is
    walked with the tiles' output shapes computed (1.5's decoder evaluates layer by layer: decoding them to learn
    their shapes cost every rank every tile). The other rank stands in here by giving back this rank's tile."""
    ref, path = vae
    ours = H15.load_vae(path, dtype=mx.float32)

    class Two:
        size, rank = 2, 0

        @staticmethod
        def gather(x):  # (1, ...) -> (2, ...): this rank's tile and the other's (here the same)
            return mx.concatenate([x, x])

    calls, call = [], H15.VAEDecoder.__call__
    monkeypatch.setattr(H15.VAEDecoder, "__call__", lambda self, z, cache=None: calls.append(z.shape) or
                        call(self, z, cache))
    z = mx.random.normal((1, 2, 6, 7, 4), key=mx.random.key(5))
    out = ours.decode(z, VAE_TILE, VAE_STRIDE, ranks=Two())
    assert out.shape == (1, 5, 96, 112, 3) and len(calls) == 3, calls


@pytest.mark.parametrize("tiled", [False, True])
def test_vae_encode_float32(vae, tiled):
    ref, path = vae
    ours = H15.load_vae(path, dtype=mx.float32)
    x = torch.rand(1, 3, 5, 96, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1
    if tiled:
        ref.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_latent_min_height=4,
                          tile_latent_min_width=4, tile_overlap_factor=0.25)
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.mode().permute(0, 2, 3, 4, 1).numpy()
    ref.disable_tiling()
    out = ours.encode(mx.array(x.permute(0, 2, 3, 4, 1).numpy()), *((VAE_TILE, VAE_STRIDE) if tiled else ()))
    assert out.shape == expected.shape == (1, 2, 6, 7, 4)
    err = rel_err(np.array(out), expected)
    assert err <= VAE_TOL, f"relative error {err:.2e} > {VAE_TOL}"


def test_vae_decode_float16_default_against_the_reference_in_float16(vae):
    ref, path = vae
    ours = H15.load_vae(path)
    assert ours.dtype == mx.float16
    z = torch.randn(1, 4, 2, 3, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # a copy in float16: the fixture's stays float32 for the other tests
        expected = copy.deepcopy(ref).half().decode(z.half()).sample.float().permute(0, 2, 3, 4, 1).numpy()
    out = np.array(ours.decode(mx.array(z.permute(0, 2, 3, 4, 1).numpy())).astype(mx.float32))
    err = rel_err(out, expected)
    assert np.isfinite(out).all() and err <= VAE_FP16_TOL, f"fp16 relative error {err:.2e} > {VAE_FP16_TOL}"


def test_an_int8_checkpoint_written_by_us_loads_as_it_was_saved(tmp_path):
    """The 1.5 DiT quantized (int8) and saved as convert_weights.py saves it loads back to the same model: its
    blocks' layers quantized (not the modulation), its output equal to the saved model's, to the bit, and within
    int8's error of the float32 reference (measured 1.2e-2; bound 3e-2)."""
    cfg = {**MODEL, "attention_head_dim": 32, "rope_axes_dim": (8, 12, 12)}  # width 64: one quantization group
    ref = randomize(HunyuanVideo15Transformer3DModel(**cfg), seed=4).eval()
    ref.save_pretrained(tmp_path / "transformer")
    model = H15.load_transformer(tmp_path / "transformer", dtype=mx.float32, quantization="int8")
    H.save_transformer(model, tmp_path / "int8")
    again = H15.load_transformer(tmp_path / "int8", dtype=mx.float32)
    assert again.quantization == "int8" and isinstance(again.double_blocks[0].img_attn_qkv, nn.QuantizedLinear)
    assert not isinstance(again.double_blocks[0].img_mod.linear, nn.QuantizedLinear)
    inputs = make_inputs({**CONFIGS["i2v"], "model": cfg})
    out = run_ours(again, inputs)
    assert np.array_equal(out, run_ours(model, inputs))
    err = rel_err(out, run_reference(ref, inputs))
    assert err <= 3e-2, f"int8 relative error {err:.2e}"


def tencent_vae_name(name):
    """A VAE tensor's name in Tencent's files, from diffusers' (convert_hunyuan_video_15_vae_checkpoint_to_diffusers,
    read in the other direction)."""
    for old, new in [("down_blocks.{}.resnets.", "down.{}.block."),
                     ("down_blocks.{}.downsamplers.0.", "down.{}.downsample."),
                     ("up_blocks.{}.resnets.", "up.{}.block."), ("up_blocks.{}.upsamplers.0.", "up.{}.upsample."),
                     ("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
                     ("mid_block.attentions.0.to_q.", "mid.attn_1.q."),
                     ("mid_block.attentions.0.to_k.", "mid.attn_1.k."),
                     ("mid_block.attentions.0.to_v.", "mid.attn_1.v."), ("mid_block.attentions.0.", "mid.attn_1.")]:
        for i in range(5):
            name = name.replace(old.format(i), new.format(i))
    return name


def test_vae_in_tencent_layout_float32(vae, tmp_path):
    ref, _ = vae
    sd = {tencent_vae_name(k): v.contiguous() for k, v in ref.state_dict().items()}
    assert "encoder.down.0.block.0.conv1.conv.weight" in sd and "decoder.mid.attn_1.q.weight" in sd
    save_file(sd, tmp_path / "vae.safetensors")
    ours = H15.load_vae(tmp_path / "vae.safetensors", dtype=mx.float32)
    z = torch.randn(1, 4, 2, 3, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref.decode(z).sample.permute(0, 2, 3, 4, 1).numpy()
    err = rel_err(np.array(ours.decode(mx.array(z.permute(0, 2, 3, 4, 1).numpy()))), expected)
    assert err <= VAE_TOL, f"relative error {err:.2e} > {VAE_TOL}"


def test_vae_encodes_and_decodes_one_frame(vae):
    """An image (one frame): frame 0 is resampled on its own, with nothing after it (float32, as the others)."""
    ref, path = vae
    ours = H15.load_vae(path, dtype=mx.float32)
    x = torch.rand(1, 3, 1, 32, 48, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mode()
        expected = ref.decode(z).sample
    ours_z = ours.encode(mx.array(x.permute(0, 2, 3, 4, 1).numpy()))
    assert rel_err(np.array(ours_z), z.permute(0, 2, 3, 4, 1).numpy()) <= VAE_TOL
    out = ours.decode(mx.array(z.permute(0, 2, 3, 4, 1).numpy()))
    assert out.shape == (1, 1, 32, 48, 3)
    assert rel_err(np.array(out), expected.permute(0, 2, 3, 4, 1).numpy()) <= VAE_TOL


def test_the_size_picked_for_an_image_is_the_reference_s():
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    processor = HunyuanVideo15ImageProcessor()
    for target in (640, 960):
        for height in range(100, 2000, 97):
            for width in range(100, 2000, 113):
                assert H15.bucket_size(height, width, target) == tuple(
                    processor.calculate_default_height_width(height, width, target)), (height, width, target)


def test_a_lora_in_diffusers_layout_matches_the_reference(tmp_path):
    """A random LoRA (rank 3, scale 0.7) in diffusers' layout on the blocks' fused q, k, v (as slices), their
    output projections, MLPs and modulation, and on 1.5's own roots (the timestep embedder, byT5's and SigLIP's
    projections, the final layer): ours merged at load against diffusers' transformer with it through peft
    (load_lora_adapter, set_adapters), float32 (measured 7.2e-6; bound 3e-5; the LoRA itself moves the output 0.51).
    A LoRA for 13B (its 3072-wide layers) is refused in one sentence."""
    cfg = CONFIGS["i2v"]
    ref = randomize(HunyuanVideo15Transformer3DModel(**cfg["model"]), seed=5).eval()
    ref.save_pretrained(tmp_path / "transformer")
    modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
               "transformer_blocks.1.attn.add_k_proj", "transformer_blocks.1.attn.to_out.0",
               "transformer_blocks.0.attn.to_add_out", "transformer_blocks.1.ff.net.0.proj",
               "transformer_blocks.0.ff_context.net.2", "transformer_blocks.1.norm1.linear",
               "time_embed.timestep_embedder.linear_1",
               "context_embedder_2.linear_3", "image_embedder.linear_1", "proj_out"]
    g = torch.Generator().manual_seed(6)
    lora = {}
    for name in modules:
        out, inp = ref.get_submodule(name).weight.shape
        lora[f"transformer.{name}.lora_A.weight"] = torch.randn(3, inp, generator=g) / inp ** 0.5
        lora[f"transformer.{name}.lora_B.weight"] = torch.randn(out, 3, generator=g) / 3 ** 0.5
    save_file(lora, tmp_path / "lora.safetensors")
    inputs = make_inputs(cfg)
    before = run_reference(ref, inputs)
    ref.load_lora_adapter({k: v.clone() for k, v in lora.items()}, prefix="transformer", adapter_name="a")
    ref.set_adapters(["a"], weights=[0.7])
    expected = run_reference(ref, inputs)
    ours = H15.load_transformer(tmp_path / "transformer", dtype=mx.float32,
                                loras=[(tmp_path / "lora.safetensors", 0.7)])
    err = rel_err(run_ours(ours, inputs), expected)
    assert rel_err(before, expected) > 100 * err and err <= 3e-5, (err, rel_err(before, expected))
    big = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 3072),
           "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 2)}
    save_file(big, tmp_path / "lora13b.safetensors")
    with pytest.raises(H.HunyuanVideoError, match="lora13b.safetensors gives .* it is a LoRA for another model"):
        H15.load_transformer(tmp_path / "transformer", loras=[tmp_path / "lora13b.safetensors"])


# A LoRA trained with PEFT on diffusers' 1.5 DiT, in diffusers' names, and those modules in Tencent's names (this
# file's TENCENT tables, read the other way)
LORA_MODULES = {"transformer_blocks.0.attn.to_q": "double_blocks.0.img_attn_q",
                "transformer_blocks.0.attn.to_v": "double_blocks.0.img_attn_v",
                "transformer_blocks.1.attn.add_k_proj": "double_blocks.1.txt_attn_k",
                "transformer_blocks.1.attn.to_out.0": "double_blocks.1.img_attn_proj",
                "transformer_blocks.0.ff_context.net.2": "double_blocks.0.txt_mlp.fc2",
                "transformer_blocks.1.norm1.linear": "double_blocks.1.img_mod.linear",
                "context_embedder_2.linear_3": "byt5_in.fc3", "image_embedder.linear_1": "vision_in.proj.1",
                "time_embed.timestep_embedder.linear_1": "time_in.mlp.0", "proj_out": "final_layer.linear"}


@pytest.mark.parametrize("layout", ["diffusers", "tencent", "musubi"])
def test_a_lora_in_each_layout_with_its_alpha_matches_the_reference(layout, tmp_path):
    """A LoRA trained as Tencent's train.py trains one (PEFT, rank 3, lora_alpha 6: scale 2; one module's alpha 1.5
    by alpha_pattern), saved by diffusers' save_lora_adapter with its LoraConfig in the file's metadata; the same in
    Tencent's names (q, k and v apart, as its own DiT and its training script name them) with that metadata; and in
    musubi-tuner's (kohya's lora_unet_ names, an alpha tensor a module). Ours at scale 0.7 against diffusers' DiT
    with the adapter at weight 0.7 (peft), float32 (measured 3.9e-6 in each layout; bound F32_TOL; the LoRA moves
    the output 0.46). The Tencent-layout pieces of a 1.5 LoRA name it as 1.5's to 13B's DiT."""
    import json

    from peft import LoraConfig
    from safetensors import safe_open

    cfg = CONFIGS["i2v"]
    ref = randomize(HunyuanVideo15Transformer3DModel(**cfg["model"]), seed=5).eval()
    ref.save_pretrained(tmp_path / "transformer")
    inputs = make_inputs(cfg)
    before = run_reference(ref, inputs)
    torch.manual_seed(7)
    ref.add_adapter(LoraConfig(r=3, lora_alpha=6, alpha_pattern={"proj_out": 1.5}, init_lora_weights=False,
                               target_modules=list(LORA_MODULES)), adapter_name="a")
    ref.set_adapters(["a"], weights=[0.7])
    expected = run_reference(ref, inputs)
    ref.save_lora_adapter(tmp_path / "saved", adapter_name="a")
    saved = tmp_path / "saved" / "pytorch_lora_weights.safetensors"
    with safe_open(saved, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    assert (config["r"], config["lora_alpha"]) == (3, 6)
    path = tmp_path / f"{layout}.safetensors"
    if layout == "diffusers":
        path = saved
    elif layout == "tencent":
        config["alpha_pattern"] = {"final_layer.linear": 1.5}
        save_file({k.replace(d + ".", t + "."): v for k, v in tensors.items() for d, t in LORA_MODULES.items()
                   if k.startswith(d + ".")}, path, metadata={"lora_adapter_metadata": json.dumps(config)})
    else:
        musubi = {}
        for d, t in LORA_MODULES.items():
            name = "lora_unet_" + t.replace(".", "_")
            musubi[f"{name}.lora_down.weight"] = tensors[f"{d}.lora_A.weight"]
            musubi[f"{name}.lora_up.weight"] = tensors[f"{d}.lora_B.weight"]
            musubi[f"{name}.alpha"] = torch.tensor(1.5 if d == "proj_out" else 6.0)
        save_file(musubi, path)
    ours = H15.load_transformer(tmp_path / "transformer", dtype=mx.float32, loras=[(path, 0.7)])
    err = rel_err(run_ours(ours, inputs), expected)
    assert rel_err(before, expected) > 100 * err and err <= F32_TOL, (err, rel_err(before, expected))
    if layout != "diffusers":
        pieces = {k: v for k, v in load_safetensors(path).items() if "_attn_q" in k or "_attn_v" in k}
        save_file(pieces, tmp_path / "pieces.safetensors")
        small = dict(num_attention_heads=2, attention_head_dim=16, rope_axes_dim=(4, 6, 6), num_layers=1,
                     num_single_layers=1, num_refiner_layers=1, text_embed_dim=24, pooled_projection_dim=8)
        with pytest.raises(H.HunyuanVideoError, match=r"pieces.safetensors is for HunyuanVideo 1.5's DiT"):
            H.read_loras([tmp_path / "pieces.safetensors"], H.HunyuanVideoTransformer(**small))


def test_a_comfyui_fp8_file_converts_to_the_model_its_maker_dequantizes(tmp_path):
    """A 1.5 DiT in ComfyUI's scaled fp8 single file (E4M3 block weights, a scale_weight per layer, the scaled_fp8
    marker, no config): convert_weights.py tells it is 1.5's from its tensors' names alone and writes the weights as
    their makers dequantize them, bf16(W_fp8) * bf16(scale). Against diffusers on those weights, float32 (measured
    2.9e-6; bound 5e-5, F32_TOL); as 13B's DiT it is refused."""
    import re

    import convert_weights
    m = {**MODEL, "num_attention_heads": 1, "attention_head_dim": 128, "rope_axes_dim": (16, 56, 56)}  # real heads
    cfg = {**CONFIGS["i2v"], "model": m}
    ref = randomize(HunyuanVideo15Transformer3DModel(**m), seed=5).eval()
    stored, dequantized = {}, {}
    for k, w in tencent_state_dict(ref, m).items():
        block = re.fullmatch(r"double_blocks\.(\d+)\.(.+)\.weight", k)
        if block and w.ndim == 2:
            scale = w.abs().max() / 448.0  # E4M3's largest value
            stored[k] = (w / scale).to(torch.float8_e4m3fn)
            stored[k.removesuffix("weight") + "scale_weight"] = scale
            name = f"transformer_blocks.{block[1]}.{TENCENT_BLOCK[block[2]]}.weight"
            dequantized[name] = (stored[k].to(torch.bfloat16) * scale.to(torch.bfloat16)).float()
        else:
            stored[k] = w
    stored["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    assert len(dequantized) == m["num_layers"] * (len(TENCENT_BLOCK) - 4)  # each block's Linears, not its norms
    ref.load_state_dict(dequantized, strict=False)
    path = tmp_path / "hunyuanvideo1.5_480p_i2v_fp8_scaled.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in stored.items()}, path)
    assert convert_weights.main(["--model", str(path), "--dtype", "float32", "--output", str(tmp_path / "mlx")]) == 0
    ours = H15.load_transformer(tmp_path / "mlx", dtype=mx.float32)
    inputs = make_inputs(cfg)
    err = rel_err(run_ours(ours, inputs), run_reference(ref, inputs))
    print(f"1.5 fp8 file: {err:.2e}")
    assert err <= F32_TOL, f"fp8 relative error {err:.2e} > {F32_TOL}"
    with pytest.raises(H.HunyuanVideoError, match="is HunyuanVideo 1.5's DiT, and this model is HunyuanVideo "):
        H.load_transformer(tmp_path / "mlx")

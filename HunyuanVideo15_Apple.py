"""HunyuanVideo 1.5 (Tencent's 8.3B text- and image-to-video model) in plain MLX, on HunyuanVideo_Apple's machinery.

One module, in the order data flows, holding only what 1.5 changes:
  1. the text encoders: Qwen2.5-VL's language model (13B's Llama encoder with biased q, k, v) reading the prompt in
     Qwen's chat format, and byT5 (T5's encoder) reading only the prompt's quoted text; for image to video,
     SigLIP's vision tower reading the image;
  2. the diffusion transformer (DiT): 54 double-stream blocks and no single-stream ones, patch 1x1x1, 65 input
     channels (the noisy latents, an image's latents and its frame mask), no pooled text vector and no guidance
     embedding (an optional second timestep instead, mean-flow's). Its text stream joins three sources: the LLM's
     states through 13B's token refiner, byT5's states and SigLIP's image tokens, each projected and tagged by a
     type embedding, every row reordered so that its valid tokens come first;
  3. the causal 3D VAE: 16x in space, 4x in time, 32 channels, tiled in space like the reference, its decode a few
     frames at a time (the causal context carried from piece to piece: the same video, a piece's memory);
  4. loading: diffusers' layout and Tencent's (ComfyUI's single files too), strictly; the offline demos (tiny15,
     tiny15-i2v), tiny random checkpoints in diffusers' layout;
  5. the memory plan: each phase's peak, counted before anything loads;
  6. the pipeline: HunyuanVideo_Apple's, with 1.5's parts, trained sizes and MagCache calibration.
Everything else is HunyuanVideo_Apple's, imported and not copied: the Llama layers, the double-stream block (1.5's
separate q, k and v projections are fused at load, as 13B's diffusers layout is), attention and RoPE, the token
refiner, the blocks' modulation tables, block streaming, quantization, the step caches' entry points (embed, blocks,
final), the sequence split over several processes, the causal convolutions, the VAE's tiling and the strict loader.

Conventions are HunyuanVideo_Apple's: channels-last video tensors (B, T, H, W, C); the DiT's module names are
Tencent's checkpoint names, the VAE's and the encoders' diffusers' and transformers'. The reference for every number
is diffusers (HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel, AutoencoderKLHunyuanVideo15) with
transformers (Qwen2_5_VLTextModel, T5EncoderModel, SiglipVisionModel).
"""

import gc
import json
import math
import re
import shutil
from collections import namedtuple
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

import HunyuanVideo_Apple as H

# ---------------------------------------------------------------------------------------------------
# Text encoders: Qwen2.5-VL's language model (per-token states) and byT5 (the quoted text's glyphs)
# ---------------------------------------------------------------------------------------------------
# The prompt is read twice. Qwen2.5-VL-7B-Instruct's language model reads it as the user's message after a fixed
# system message, in Qwen's chat format; its third-to-last hidden state (the output of layer n-2, no final norm)
# gives one vector per token, and the first 108 tokens (the format and the system message) are cropped off. It is
# 13B's Llama encoder with biased q, k, v (HunyuanVideo_Apple.LlamaTextEncoder, attention_bias=True): on text alone
# Qwen2.5-VL's multimodal RoPE rotates every section by the same position, which is the usual RoPE. byT5 reads
# only the text the prompt quotes ("..." or “...”), as 'Text "...". ' phrases, byte by byte: T5's encoder.

QWEN_SYSTEM = ("You are a helpful assistant. Describe the video by detailing the following aspects:         1. The "
               "main content and theme of the video.         2. The color, shape, size, texture, quantity, text, and "
               "spatial relationships of the objects.         3. Actions, events, behaviors temporal relationships, "
               "physical movement changes of the objects.         4. background environment, light, style and "
               "atmosphere.         5. camera angles, movements, and transitions used in the video.")
QWEN_TEMPLATE = ("<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                 "<|im_start|>assistant\n")
QWEN_CROP_START = 108  # the template's tokens before the prompt, in Qwen2.5's vocabulary
QWEN_LENGTH = 1000  # the LLM's states after cropping: right-padded (mask 0) or truncated to this many
BYT5_LENGTH = 256


def glyph_text(prompt):
    """What byT5 reads of a prompt: its quoted texts (ASCII or curly quotes; repeated ones once, when there are
    several) as 'Text "...". ' phrases, or None where it quotes nothing (as the reference's extract_glyph_texts)."""
    found = [a or b for a, b in re.findall(r"\"(.*?)\"|“(.*?)”", prompt)]
    found = list(dict.fromkeys(found)) if len(found) > 1 else found
    return ". ".join(f'Text "{text}"' for text in found) + ". " if found else None


class T5Attention(nn.Module):
    """T5's self-attention: no scaling of the scores, a learned bias per head and relative position instead."""

    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim, bias=False) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, dim, bias=False)

    def __call__(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (p(x).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3) for p in (self.q, self.k, self.v))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias)  # (B, heads, L, hd)
        return self.o(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5Block(nn.Module):
    """layer.0: RMS norm -> self-attention; layer.1: RMS norm -> gated-GELU MLP (wi_0, wi_1, wo); both residual."""

    def __init__(self, dim, heads, head_dim, hidden, eps, relative=False, buckets=32):
        super().__init__()
        attend, mlp = nn.Module(), nn.Module()
        attend.layer_norm, attend.SelfAttention = nn.RMSNorm(dim, eps=eps), T5Attention(dim, heads, head_dim)
        if relative:
            attend.SelfAttention.relative_attention_bias = nn.Embedding(buckets, heads)
        mlp.layer_norm, mlp.DenseReluDense = nn.RMSNorm(dim, eps=eps), nn.Module()
        ff = mlp.DenseReluDense
        ff.wi_0, ff.wi_1, ff.wo = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False), \
            nn.Linear(hidden, dim, bias=False)
        self.layer = [attend, mlp]

    def __call__(self, x, bias):
        attend, mlp = self.layer
        x = x + attend.SelfAttention(attend.layer_norm(x), bias)
        ff, h = mlp.DenseReluDense, mlp.layer_norm(x)
        return x + ff.wo(nn.gelu_approx(ff.wi_0(h)) * ff.wi_1(h))


def _t5_buckets(length, buckets=32, max_distance=128):
    """T5's bidirectional relative-position bucket of every (query, key) pair (L, L): half the buckets for keys
    after the query; exact distances below buckets/4, logarithmic ones up to max_distance, in float32 as the
    reference computes them."""
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
    half = buckets // 2
    out = (relative > 0) * half
    distance = np.abs(relative)
    exact = half // 2
    large = exact + (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact)) /
                     np.float32(math.log(max_distance / exact)) * np.float32(half - exact)).astype(np.int64)
    return out + np.where(distance < exact, distance, np.minimum(large, half - 1))


class T5Encoder(nn.Module):
    """transformers' T5EncoderModel (byT5-small's gated-GELU variant): last_hidden_state. Keywords: its config.json
    names."""

    def __init__(self, vocab_size=384, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                 feed_forward_proj="gated-gelu"):
        super().__init__()
        if feed_forward_proj != "gated-gelu":
            raise H.HunyuanVideoError(f"feed_forward_proj {feed_forward_proj!r}: byT5 (the Glyph-SDXL-v2 weights "
                                      f"HunyuanVideo 1.5 reads with) is gated-gelu; pass its text_encoder_2/.")
        self.buckets, self.max_distance = relative_attention_num_buckets, relative_attention_max_distance
        self.shared = nn.Embedding(vocab_size, d_model)
        self.encoder = nn.Module()
        self.encoder.block = [T5Block(d_model, num_heads, d_kv, d_ff, layer_norm_epsilon, i == 0, self.buckets)
                              for i in range(num_layers)]
        self.encoder.final_layer_norm = nn.RMSNorm(d_model, eps=layer_norm_epsilon)

    @property
    def dtype(self):
        return self.shared.weight.dtype

    def __call__(self, ids, mask):
        """ids (B, L), mask (B, L) bool or 0/1 -> states (B, L, d_model). Each token sees every valid one."""
        L = ids.shape[1]
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = table(mx.array(_t5_buckets(L, self.buckets, self.max_distance))).transpose(2, 0, 1)[None]
        masked = mx.where(mx.array(mask)[:, None, None, :] > 0, 0.0, -1e9)  # (B, 1, 1, L): padding is no key
        bias = mx.maximum(bias.astype(mx.float32) + masked, mx.finfo(self.dtype).min).astype(self.dtype)
        x = self.shared(ids)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def encode_qwen(prompts, tokenizer, model, max_length=QWEN_LENGTH, progress=None):
    """Prompts -> (states (B, max_length, hidden) in the model's dtype, zero where padded; mask (B, max_length)):
    HunyuanVideo_Apple.encode_llama with Qwen's template (an empty prompt read as one space, as the reference)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return H.encode_llama([p or " " for p in prompts], tokenizer, model, max_length, QWEN_TEMPLATE, QWEN_CROP_START,
                          progress, "the Qwen2.5-VL text encoder")


def encode_byt5(prompts, tokenizer, model, max_length=BYT5_LENGTH):
    """Prompts -> (states (B, max_length, d_model), zero where padded; mask (B, max_length)) of their glyph_text; all
    zeros for a prompt that quotes nothing. Only the longest text's tokens are run: with padding masked out of
    every attention and positions only relative, the valid ones get the same states either way."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = [glyph_text(p) for p in prompts]
    quoted = [i for i, t in enumerate(texts) if t is not None]  # the others' states are zeros: they are not run
    mask = np.zeros((len(prompts), max_length), np.int32)
    rows = [mx.zeros((max_length, model.shared.weight.shape[1]), model.dtype)] * len(prompts)
    if quoted:
        ids, found = H._tokenize(tokenizer, [texts[i] for i in quoted], max_length, "byT5")
        n = int(found.sum(axis=1).max())
        states = model(mx.array(ids[:, :n]), found[:, :n]) * mx.array(found[:, :n, None]).astype(model.dtype)
        states = mx.pad(states, [(0, 0), (0, max_length - n), (0, 0)])  # (quoted, max_length, d_model)
        for j, i in enumerate(quoted):
            rows[i], mask[i] = states[j], found[j]
    return mx.stack(rows), mx.array(mask)


def encode_prompt(prompt, tokenizer, text_encoder, tokenizer_2, text_encoder_2):
    """The DiT's text inputs for a prompt: the LLM's states (B, 1000, 3584) and mask, and Conditions with byT5's
    states (B, 256, 1472) and mask (and no image: text to video)."""
    states, mask = encode_qwen(prompt, tokenizer, text_encoder)
    return states, mask, Conditions(*encode_byt5(prompt, tokenizer_2, text_encoder_2), None)


# ---------------------------------------------------------------------------------------------------
# Image encoder: SigLIP's vision tower (image to video)
# ---------------------------------------------------------------------------------------------------
# For image to video the DiT reads the image twice: its VAE latents as input channels, and SigLIP's 729 tokens of
# it (so400m-patch14-384, the tower of FLUX.1-Redux) in its text stream. The tower is 13B's CLIP layers without a
# class token or a first norm, its GELU the tanh one, a final LayerNorm; its pooling head is not used (not built).

class SiglipVisionTower(nn.Module):
    """transformers' SiglipVisionModel's last_hidden_state: pixels (B, 384, 384, 3) -> (B, 729, 1152). Keywords: its
    config.json names."""

    def __init__(self, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                 image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", num_channels=3):
        super().__init__()
        if hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise H.HunyuanVideoError(f"SigLIP hidden_act {hidden_act!r} is not supported: use gelu_pytorch_tanh.")
        act = nn.gelu_approx if hidden_act == "gelu_pytorch_tanh" else nn.gelu
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(num_channels, hidden_size, patch_size, stride=patch_size)
        self.embeddings.position_embedding = nn.Embedding((image_size // patch_size) ** 2, hidden_size)
        self.encoder = nn.Module()
        self.encoder.layers = [H.CLIPLayer(hidden_size, intermediate_size, num_attention_heads, layer_norm_eps, act,
                                           causal=False) for _ in range(num_hidden_layers)]
        self.post_layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    @property
    def dtype(self):
        return self.post_layernorm.weight.dtype

    def __call__(self, pixels):
        e = self.embeddings
        x = e.patch_embedding(pixels.astype(self.dtype))  # (B, 27, 27, width)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, 729, width), row by row as the reference flattens
        x = x + e.position_embedding(mx.arange(x.shape[1]))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


def siglip_pixels(image, config):
    """An image (PIL) as SigLIP's image processor (config: the checkpoint's feature_extractor/
    preprocessor_config.json) prepares it: RGB, resized to its size (384 x 384, bicubic, the aspect not kept),
    scaled to [0, 1], normalized by mean and std (0.5). -> (1, H, W, 3) float32."""
    size = config.get("size", {"height": 384, "width": 384})
    image = image.convert("RGB").resize((size["width"], size["height"]), resample=config.get("resample", 3))
    x = (np.asarray(image).astype(np.float64) * config.get("rescale_factor", 1 / 255)).astype(np.float32)
    mean = np.array(config.get("image_mean", [0.5] * 3), np.float32)
    std = np.array(config.get("image_std", [0.5] * 3), np.float32)
    return mx.array((x - mean) / std)[None]


def fit_image(image, height, width):
    """An image (PIL) fitted to the video as the reference's image-to-video pipeline fits it (diffusers'
    _resize_and_crop): resized (Lanczos) to cover width x height with its aspect kept, the excess cropped evenly."""
    from PIL import Image

    image = image.convert("RGB")
    w = width if width / height > image.width / image.height else image.width * height // image.height
    h = height if width / height <= image.width / image.height else image.height * width // image.width
    out = Image.new("RGB", (width, height))
    out.paste(image.resize((w, h), resample=Image.LANCZOS), box=(width // 2 - w // 2, height // 2 - h // 2))
    return out


def bucket_size(height, width, target_size=640, step=16):
    """The video size the reference's image-to-video pipeline picks for an image of height x width: among the
    sizes of about target_size^2 pixels in steps of 16 (aspect at most 4), the closest in aspect on the image's own
    side of square (calculate_default_height_width). -> (height, width)."""
    n = round((target_size / step) ** 2)
    sizes, wp, hp = [], n, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= 4:
            sizes.append((wp * step, hp * step))  # (height, width), as the reference lists them
        if (hp + 1) * wp <= n:
            hp += 1
        else:
            wp -= 1
    aspect = height / width
    ratios = np.array([round(h / w, 5) for h, w in sizes]) - aspect
    side = [i for i, d in enumerate(ratios) if (d <= 0 if aspect >= 1 else d >= 0)]
    return sizes[min(side, key=lambda i: abs(ratios[i]))]


# ---------------------------------------------------------------------------------------------------
# DiT: the text stream's other sources
# ---------------------------------------------------------------------------------------------------
# Besides the LLM's states, 1.5's text stream reads byT5's states of the prompt's quoted text (its glyphs) and,
# for image to video, SigLIP's tokens of the image. Each source is projected to the model's width and gets its
# type's embedding (0 LLM, 1 byT5, 2 image).

# what the DiT takes besides the LLM's states (the 13B model's pooled vector's place): byT5's states (B, Lb, 1472)
# and mask (B, Lb), and SigLIP's image tokens (B, 729, 1152), all zeros (or None) for text to video
Conditions = namedtuple("Conditions", "byt5 byt5_mask image")


class ByT5Projection(nn.Module):
    """byT5's states to the model's width: LayerNorm -> Linear -> GELU -> Linear -> GELU -> Linear (Tencent's
    byt5_in: layernorm, fc1, fc2, fc3)."""

    def __init__(self, in_dim, hidden, dim):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1, self.fc2, self.fc3 = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, dim)

    def __call__(self, x):
        return self.fc3(nn.gelu(self.fc2(nn.gelu(self.fc1(self.layernorm(x))))))


class ImageProjection(nn.Module):
    """SigLIP's image tokens to the model's width: LayerNorm -> Linear -> GELU -> Linear -> LayerNorm (Tencent's
    vision_in.proj, a Sequential: 0, 1, (2: the GELU), 3, 4)."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.proj = [nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, dim),
                     nn.LayerNorm(dim)]

    def __call__(self, x):
        for layer in self.proj:
            x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------------
# DiT: the model
# ---------------------------------------------------------------------------------------------------

class HunyuanVideo15Transformer(H.HunyuanVideoTransformer):
    """HunyuanVideo 1.5's DiT. The defaults are the real model (480p and 720p, T2V and I2V, share them); tests build
    smaller ones by keyword. The keywords are diffusers' config names, so a diffusers config.json passes straight
    through (byt5_width, the byT5 projection's hidden width, is 2048 there and not in its config).

    Called as HunyuanVideo_Apple.HunyuanVideoTransformer is, (latents, timestep, text_states, text_mask, conditions,
    timestep_r, modulation, radial, split), with 1.5's inputs in the places of 13B's pooled vector and guidance:
    latents (B, T, H, W, 65); text_states (B, L, 3584), the LLM's, and text_mask (B, L); conditions, a Conditions;
    timestep_r (B,) mean-flow's second timestep (its checkpoints only), or None."""

    diffusers_class = "HunyuanVideo15Transformer3DModel"
    family = "HunyuanVideo 1.5"
    saved = ("target_size", "task_type")

    def __init__(self, in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                 num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
                 text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0,
                 rope_axes_dim=(16, 56, 56), target_size=640, task_type="i2v", use_meanflow=False, byt5_width=2048):
        if qk_norm != "rms_norm":
            raise H.HunyuanVideoError(f"qk_norm {qk_norm!r}: HunyuanVideo 1.5 normalizes queries and keys by "
                                      f"rms_norm.")
        super().__init__(in_channels=in_channels, out_channels=out_channels, num_attention_heads=num_attention_heads,
                         attention_head_dim=attention_head_dim, num_layers=num_layers, num_single_layers=0,
                         num_refiner_layers=num_refiner_layers, mlp_ratio=mlp_ratio, patch_size=patch_size,
                         patch_size_t=patch_size_t, guidance_embeds=False, text_embed_dim=text_embed_dim,
                         pooled_projection_dim=None, rope_theta=rope_theta, rope_axes_dim=rope_axes_dim)
        dim = num_attention_heads * attention_head_dim
        self.byt5_in = ByT5Projection(text_embed_2_dim, byt5_width, dim)
        self.vision_in = ImageProjection(image_embed_dim, dim)
        self.cond_type_embedding = nn.Embedding(3, dim)
        if use_meanflow:
            self.time_r_in = H.TimestepEmbedder(dim)
        # the resolution the checkpoint was trained at (640: 480p, 960: 720p) and its task ("t2v" or "i2v")
        self.target_size, self.task_type = target_size, task_type

    @staticmethod
    def names(weights):
        return _names(weights)

    @staticmethod
    def shapes(weights):
        return _shapes(weights)

    @staticmethod
    def diffusers_names():
        return _FROM_DIFFUSERS

    @staticmethod
    def original_names():
        return _FROM_TENCENT

    @staticmethod
    def diffusers_config(config):
        """A DiT folder's config.json in diffusers' names: Tencent's own (transformer/480p_t2v/ and the like in
        tencent/HunyuanVideo-1.5; its in_channels counts the latents alone, its patch_size is a list) read for what
        the tensors do not tell: mean-flow, the task and the trained resolution, RoPE."""
        if config.get("_class_name") != TENCENT_CLASS:
            return config
        out = {"_class_name": HunyuanVideo15Transformer.diffusers_class, "use_meanflow": config.get("use_meanflow")}
        out["task_type"] = config.get("ideal_task")
        out["target_size"] = {"480p": 640, "720p": 960}.get(config.get("ideal_resolution"))
        out["rope_theta"], out["rope_axes_dim"] = config.get("rope_theta"), config.get("rope_dim_list")
        return {k: v for k, v in out.items() if v is not None}

    def conditioning(self, timestep, conditions, timestep_r=None):
        """The conditioning vector (B, D): time_in(t), plus time_r_in(r) given mean-flow's second timestep (summed,
        as diffusers does; Tencent's code averages the two)."""
        vec = self.time_in(timestep.astype(mx.float32), self.dtype)
        if timestep_r is None:
            return vec
        if "time_r_in" not in self:
            raise H.HunyuanVideoError("this checkpoint has no mean-flow timestep embedding: leave timestep_r out.")
        return vec + self.time_r_in(timestep_r.astype(mx.float32), self.dtype)

    def text(self, text_states, text_mask, timestep, conditions):
        """The text stream (B, keep, D) and its mask (B, keep) bool on the host, as the reference orders it: in each
        row its valid image tokens, valid byT5 tokens and valid LLM tokens, then its padding (masked: its content
        never reaches a valid output). The image's tokens count only where some image is given (all zeros is text
        to video, as the reference decides it)."""
        dtype, types = self.dtype, self.cond_type_embedding.weight.astype(self.dtype)
        llm_mask, llm = H._valid_prefix(text_mask, text_states)
        byt5_mask, byt5 = H._valid_prefix(conditions.byt5_mask, conditions.byt5)
        sources = [(self.byt5_in(byt5.astype(dtype)) + types[1], byt5_mask),
                   (self.txt_in(llm.astype(dtype), timestep, llm_mask) + types[0], llm_mask)]
        image = conditions.image
        if image is not None and mx.any(image != 0).item():
            image = self.vision_in(image.astype(dtype)) + types[2]  # (B, 729, D)
            sources.insert(0, (image, np.ones(image.shape[:2], bool)))
        tokens = mx.concatenate([t for t, _ in sources], axis=1)  # (B, Ni + Lb + L, D)
        valid = np.concatenate([m for _, m in sources], axis=1)
        counts = valid.sum(axis=1)
        keep = max(int(counts.max()), 1)
        order = np.zeros((len(valid), keep), np.int32)  # each row's valid tokens, in order; the padding: token 0
        for b, row in enumerate(valid):
            order[b, :counts[b]] = np.nonzero(row)[0]
        return mx.take_along_axis(tokens, mx.array(order)[..., None], axis=1), np.arange(keep) < counts[:, None]


# ---------------------------------------------------------------------------------------------------
# VAE: 16x smaller in height and width, 4x fewer frames, 32 channels
# ---------------------------------------------------------------------------------------------------
# AutoencoderKLHunyuanVideo15 keeps 13B's causal convolutions (HunyuanVideo_Apple.CausalConv3d) and frame-causal
# attention, but normalizes by RMS over the channels, resamples by moving pixels into channels and back (DC-AE's
# way) with a shortcut beside each resampling convolution that moves the input's pixels the same way (averaged or
# repeated to the output's channels), and adds such shortcuts around the encoder's output and the decoder's input.
# In time, frame 0 is resampled on its own (an image), the rest in pairs. Channels-last, (B, T, H, W, C); names are
# diffusers'.

class RMSNorm(nn.Module):
    """x / |x| * sqrt(C) * gamma over the channels: RMS normalization without eps (F.normalize's 1e-12 floor)."""

    def __init__(self, channels):
        super().__init__()
        self.gamma = mx.ones((channels,))

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.gamma, 1e-24)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = RMSNorm(cin), H.CausalConv3d(cin, cout, 3)
        self.norm2, self.conv2 = RMSNorm(cout), H.CausalConv3d(cout, cout, 3)
        if cin != cout:
            self.conv_shortcut = nn.Conv3d(cin, cout, 1)

    def __call__(self, x, cache=None):
        h = self.conv2(nn.silu(self.norm2(self.conv1(nn.silu(self.norm1(x)), cache))), cache)
        return h + (self.conv_shortcut(x) if "conv_shortcut" in self else x)


class VAEAttention(nn.Module):
    """One head over all positions, frame-causal, its projections 1x1x1 convolutions. cache: as CausalConv3d's; the
    earlier pieces' keys and values are kept there (at the latents' size: small)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = RMSNorm(channels)
        self.to_q, self.to_k, self.to_v, self.proj_out = (nn.Conv3d(channels, channels, 1) for _ in range(4))

    def __call__(self, x, cache=None):
        h = self.norm(x)
        k, v = self.to_k(h), self.to_v(h)
        if cache is not None:
            before = cache.get(id(self))
            if before is not None:
                k, v = mx.concatenate([before[0], k], axis=1), mx.concatenate([before[1], v], axis=1)
            cache[id(self)] = (k, v)
        return x + self.proj_out(H._frame_causal_attention(self.to_q(h), k, v))


class MidBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels), ResnetBlock(channels, channels)]
        self.attentions = [VAEAttention(channels)]

    def __call__(self, x, cache=None):
        return self.resnets[1](self.attentions[0](self.resnets[0](x, cache), cache), cache)


def _to_channels(x, rt, rs=2):
    """(B, rt*T, rs*H, rs*W, C) -> (B, T, H, W, rt*rs*rs*C), channels ordered (t, h, w offset, channel)."""
    B, T, Hh, W, C = x.shape
    x = x.reshape(B, T // rt, rt, Hh // rs, rs, W // rs, rs, C)
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(B, T // rt, Hh // rs, W // rs, rt * rs * rs * C)


def _from_channels(x, rt, rs=2):
    """The inverse of _to_channels: (B, T, H, W, rt*rs*rs*C) -> (B, rt*T, rs*H, rs*W, C)."""
    B, T, Hh, W, C = x.shape
    x = x.reshape(B, T, Hh, W, rt, rs, rs, C // (rt * rs * rs))
    return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, T * rt, Hh * rs, W * rs, -1)


def _channel_mean(x, group):
    """Each run of `group` consecutive channels averaged: (..., C) -> (..., C / group)."""
    return x.reshape(*x.shape[:-1], -1, group).mean(axis=-1)


class Downsample(nn.Module):
    """Halve H and W (and T after frame 0, with `time`): a convolution to cout / 4 (or / 8) channels whose pixels
    move into channels, plus the input's pixels moved likewise and averaged down to cout channels."""

    def __init__(self, cin, cout, time):
        super().__init__()
        self.time, factor = time, 8 if time else 4
        self.conv = H.CausalConv3d(cin, cout // factor, 3)
        self.group = factor * cin // cout

    def __call__(self, x):
        h = self.conv(x)
        if not self.time:
            return _to_channels(h, 1) + _channel_mean(_to_channels(x, 1), self.group)
        first = _to_channels(h[:, :1], 1)  # frame 0: in space only, its channels twice
        out = mx.concatenate([first, first], axis=-1) + _channel_mean(_to_channels(x[:, :1], 1), self.group // 2)
        if x.shape[1] == 1:  # an image
            return out
        rest = _to_channels(h[:, 1:], 2) + _channel_mean(_to_channels(x[:, 1:], 2), self.group)
        return mx.concatenate([out, rest], axis=1)


class Upsample(nn.Module):
    """Double H and W (and T after frame 0, with `time`): a convolution to 4 (or 8) x cout channels moved out into
    pixels, plus the input's channels repeated and moved likewise."""

    def __init__(self, cin, cout, time):
        super().__init__()
        self.time, factor = time, 8 if time else 4
        self.conv = H.CausalConv3d(cin, cout * factor, 3)
        self.repeats = factor * cout // cin

    def __call__(self, x, cache=None):
        image = 1 if cache is None or id(self.conv) not in cache else 0  # x starts at the video's frame 0, or not
        h = self.conv(x, cache)
        if not self.time:
            return _from_channels(h, 1) + _from_channels(mx.repeat(x, self.repeats, axis=-1), 1)
        out = []
        if image:  # frame 0: in space only, the first half of its channels
            first = _from_channels(h[:, :1], 1)
            out.append(first[..., :first.shape[-1] // 2] + mx.repeat(_from_channels(x[:, :1], 1), self.repeats // 2,
                                                                    axis=-1))
        if x.shape[1] > image:  # the other frames: in time too
            out.append(_from_channels(h[:, image:], 2) + mx.repeat(_from_channels(x[:, image:], 2), self.repeats,
                                                                   axis=-1))
        return mx.concatenate(out, axis=1) if len(out) > 1 else out[0]


def _levels(n, spatial_ratio, temporal_ratio, encoder):
    """Each level's resampling: None, "space" or "time" (space and time). The encoder halves space at its first
    log2(spatial) levels and time too from level log2(spatial / temporal) on; the decoder doubles space at its
    first log2(spatial) levels and time too at its first log2(temporal)."""
    space, time = math.log2(spatial_ratio), math.log2(temporal_ratio)
    return [None if i >= space else
            "time" if (i >= space - time if encoder else i < time) else "space" for i in range(n)]


class VAEEncoder(nn.Module):
    def __init__(self, cin, latent, block_out, layers, spatial_ratio, temporal_ratio):
        super().__init__()
        self.conv_in = H.CausalConv3d(cin, block_out[0], 3)
        self.down_blocks, prev = [], block_out[0]
        for i, (cout, level) in enumerate(zip(block_out, _levels(len(block_out), spatial_ratio, temporal_ratio,
                                                                 True))):
            block = nn.Module()
            block.resnets = [ResnetBlock(prev if j == 0 else cout, cout) for j in range(layers)]
            prev = cout
            if level:
                block.downsamplers = [Downsample(cout, block_out[i + 1], level == "time")]
                prev = block_out[i + 1]
            self.down_blocks.append(block)
        self.mid_block = MidBlock(block_out[-1])
        self.norm_out = RMSNorm(block_out[-1])
        self.conv_out = H.CausalConv3d(block_out[-1], 2 * latent, 3)
        self.group = block_out[-1] // (2 * latent)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            for layer in block.resnets + block.get("downsamplers", []):
                x = layer(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.norm_out(x))) + _channel_mean(x, self.group)


class VAEDecoder(nn.Module):
    def __init__(self, latent, cout, block_out, layers, spatial_ratio, temporal_ratio):
        super().__init__()
        block_out = block_out[::-1]  # widest first
        self.conv_in = H.CausalConv3d(latent, block_out[0], 3)
        self.repeats = block_out[0] // latent
        self.mid_block = MidBlock(block_out[0])
        self.up_blocks, prev = [], block_out[0]
        for i, (c, level) in enumerate(zip(block_out, _levels(len(block_out), spatial_ratio, temporal_ratio,
                                                               False))):
            block = nn.Module()
            block.resnets = [ResnetBlock(prev if j == 0 else c, c) for j in range(layers + 1)]
            prev = c
            if level:
                block.upsamplers = [Upsample(c, block_out[i + 1], level == "time")]
                prev = block_out[i + 1]
            self.up_blocks.append(block)
        self.norm_out = RMSNorm(block_out[-1])
        self.conv_out = H.CausalConv3d(block_out[-1], cout, 3)

    def __call__(self, z, cache=None):
        """z (B, T, h, w, latent) -> (B, 4T - 3, 16h, 16w, 3), or 4T frames for a piece after the first (cache: a
        dict kept from piece to piece; see HunyuanVideo15VAE._decode)."""
        x = self.mid_block(self.conv_in(z, cache) + mx.repeat(z, self.repeats, axis=-1), cache)
        for block in self.up_blocks:
            for layer in block.resnets + block.get("upsamplers", []):
                x = layer(x, cache)
                mx.eval(x, cache or [])  # one layer at a time: its temporaries freed before the next one's are made
        return self.conv_out(nn.silu(self.norm_out(x)), cache)


# The reference tiles 1.5's VAE in space only, with 13B's tiles and strides (256 and 192 pixels) and blending:
# HunyuanVideo_Apple.HunyuanVideoVAE's decode and encode, given a tile longer than any clip.
VAE_TILE = (1 << 20, 256, 256)  # (frames, height, width) in pixels
VAE_STRIDE = (1 << 20, 192, 192)
# Where the reference decodes a tile's frames all at once, this decodes them a few at a time (the same video, to
# float rounding): latent frames a piece, 4 x as many frames of video
DECODE_FRAMES = 4


class HunyuanVideo15VAE(H.HunyuanVideoVAE):
    """AutoencoderKLHunyuanVideo15. The defaults are the real model; keywords are diffusers' config names. Decodes
    and encodes as HunyuanVideo_Apple.HunyuanVideoVAE (tiled with VAE_TILE and VAE_STRIDE as the reference)."""

    def __init__(self, in_channels=3, out_channels=3, latent_channels=32,
                 block_out_channels=(128, 256, 512, 1024, 1024), layers_per_block=2, spatial_compression_ratio=16,
                 temporal_compression_ratio=4, downsample_match_channel=True, upsample_match_channel=True,
                 scaling_factor=1.03682):
        nn.Module.__init__(self)
        if not (downsample_match_channel and upsample_match_channel):
            raise H.HunyuanVideoError("downsample_match_channel and upsample_match_channel must be true: the "
                                      "HunyuanVideo 1.5 VAE resamples to the next level's width.")
        args = (tuple(block_out_channels), layers_per_block, spatial_compression_ratio, temporal_compression_ratio)
        self.encoder = VAEEncoder(in_channels, latent_channels, *args)
        self.decoder = VAEDecoder(latent_channels, out_channels, *args)
        self.scaling_factor = scaling_factor
        self.ratio = (temporal_compression_ratio, spatial_compression_ratio)

    @property
    def dtype(self):
        return self.decoder.conv_in.conv.weight.dtype

    def _decode(self, z):
        """The decoder over DECODE_FRAMES latent frames at a time, each piece's causal context carried to the next in
        a cache (each convolution's last two frames, the attention's keys and values): the video the whole clip
        decodes to in one pass, its norms being per position, with the activations of a piece."""
        if z.shape[1] <= DECODE_FRAMES:
            return self.decoder(z)
        cache, out = {}, []
        for t in range(0, z.shape[1], DECODE_FRAMES):
            out.append(self.decoder(z[:, t:t + DECODE_FRAMES], cache))
            mx.eval(out[-1], cache)
        return mx.concatenate(out, axis=1)

    def _encode(self, x):
        return self.encoder(x)


# The live preview's linear map from the 32 channels (scaled, the DiT's space) to RGB at 1/16 the size, where 13B's
# has 16 channels: ComfyUI's factors for 1.5 (comfy/latent_formats.py, HunyuanVideo15.latent_rgb_factors and
# latent_rgb_factors_bias), used by HunyuanVideo_Apple.latent_preview for latents of 32 channels.
LATENT_RGB = np.array([
    [0.0568, -0.0521, -0.0131], [0.0014, 0.0735, 0.0326], [0.0186, 0.0531, -0.0138], [-0.0031, 0.0051, 0.0288],
    [0.0110, 0.0556, 0.0432], [-0.0041, -0.0023, -0.0485], [0.0530, 0.0413, 0.0253], [0.0283, 0.0251, 0.0339],
    [0.0277, -0.0372, -0.0093], [0.0393, 0.0944, 0.1131], [0.0020, 0.0251, 0.0037], [-0.0017, 0.0012, 0.0234],
    [0.0468, 0.0436, 0.0203], [0.0354, 0.0439, -0.0233], [0.0090, 0.0123, 0.0346], [0.0382, 0.0029, 0.0217],
    [0.0261, -0.0300, 0.0030], [-0.0088, -0.0220, -0.0283], [-0.0272, -0.0121, -0.0363], [-0.0664, -0.0622, 0.0144],
    [0.0414, 0.0479, 0.0529], [0.0355, 0.0612, -0.0247], [0.0147, 0.0264, 0.0174], [0.0438, 0.0038, 0.0542],
    [0.0431, -0.0573, -0.0033], [-0.0162, -0.0211, -0.0406], [-0.0487, -0.0295, -0.0393], [0.0005, -0.0109, 0.0253],
    [0.0296, 0.0591, 0.0353], [0.0119, 0.0181, -0.0306], [-0.0085, -0.0362, 0.0229], [0.0005, -0.0106, 0.0242]],
    dtype=np.float32)
LATENT_RGB_BIAS = np.array([0.0456, -0.0202, -0.0644], dtype=np.float32)
H.LATENT_RGB_FACTORS[32] = (LATENT_RGB, LATENT_RGB_BIAS)


# ---------------------------------------------------------------------------------------------------
# Loading: layouts
# ---------------------------------------------------------------------------------------------------
# The model's names are Tencent's, but for the double blocks' q, k and v, fused as in the 13B model (img_attn_qkv,
# txt_attn_qkv). diffusers' layout is renamed by HunyuanVideo_Apple's rows for the blocks and the token refiner
# (the same modules as 13B's) and 1.5's own for the rest: the inverse of diffusers'
# convert_hyvideo15_transformer_to_diffusers (scripts/convert_hunyuan_video1_5_to_diffusers.py).

_FROM_DIFFUSERS = [H._FROM_DIFFUSERS[0], H._FROM_DIFFUSERS[2], H._FROM_DIFFUSERS[3], ("", "", {
    "x_embedder.proj": "img_in.proj",
    "time_embed.timestep_embedder.linear_1": "time_in.mlp.0",
    "time_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "time_embed.timestep_embedder_r.linear_1": "time_r_in.mlp.0",
    "time_embed.timestep_embedder_r.linear_2": "time_r_in.mlp.2",
    "context_embedder_2.norm": "byt5_in.layernorm", "context_embedder_2.linear_1": "byt5_in.fc1",
    "context_embedder_2.linear_2": "byt5_in.fc2", "context_embedder_2.linear_3": "byt5_in.fc3",
    "image_embedder.norm_in": "vision_in.proj.0", "image_embedder.linear_1": "vision_in.proj.1",
    "image_embedder.linear_2": "vision_in.proj.3", "image_embedder.norm_out": "vision_in.proj.4",
    "cond_type_embed": "cond_type_embedding",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # halves swapped by _from_diffusers
    "proj_out": "final_layer.linear"})]

# Tencent's layout: only the double blocks' projections are fused. Its DiT folders' config.json names its own class
TENCENT_CLASS = "HunyuanVideo_1_5_DiffusionTransformer"
_FROM_TENCENT = [("double_blocks.{}", "double_blocks.{}", {
    ("img_attn_q", "img_attn_k", "img_attn_v"): "img_attn_qkv",
    ("txt_attn_q", "txt_attn_k", "txt_attn_v"): "txt_attn_qkv"})]


def _names(weights):
    """A 1.5 DiT's tensors (or one block's) under the model's names, from either layout."""
    weights = H._strip_prefix(weights)
    diffusers = any(k.startswith(("transformer_blocks.", "x_embedder.")) for k in weights)
    return H._from_diffusers(weights, _FROM_DIFFUSERS if diffusers else _FROM_TENCENT)


def _shapes(sd):
    """The 1.5 DiT's constructor keywords, read off its tensors' shapes (the model's names)."""
    dim, cin, pt, ph, pw = sd["img_in.proj.weight"].shape
    head_dim = sd["double_blocks.0.img_attn_q_norm.weight"].shape[0]
    return dict(
        in_channels=cin, out_channels=sd["final_layer.linear.weight"].shape[0] // (pt * ph * pw),
        num_attention_heads=dim // head_dim, attention_head_dim=head_dim, num_layers=H._count(sd, "double_blocks"),
        num_refiner_layers=H._count(sd, "txt_in.individual_token_refiner.blocks"),
        mlp_ratio=sd["double_blocks.0.img_mlp.fc1.weight"].shape[0] / dim, patch_size=ph, patch_size_t=pt,
        text_embed_dim=sd["txt_in.input_embedder.weight"].shape[1], text_embed_2_dim=sd["byt5_in.fc1.weight"].shape[1],
        byt5_width=sd["byt5_in.fc1.weight"].shape[0], image_embed_dim=sd["vision_in.proj.0.weight"].shape[0],
        use_meanflow="time_r_in.mlp.0.weight" in sd)


def load_transformer(path, dtype=H.DEFAULT_DTYPES["transformer"], **options):
    """The 1.5 DiT from a diffusers transformer/ folder, Tencent's transformer/<name>/ folder or file, a ComfyUI
    single file, or a folder written by convert_weights.py: HunyuanVideo_Apple.load_transformer's options
    (quantization, stream, lazy_modulation, loras, progress) and sizes, for this model."""
    return H.load_transformer(path, dtype, model_class=HunyuanVideo15Transformer, **options)


def _vae_shapes(sd):
    """The 1.5 VAE's constructor keywords, read off its tensors' shapes."""
    levels = H._count(sd, "encoder.down_blocks")
    return dict(in_channels=sd["encoder.conv_in.conv.weight"].shape[1],
                out_channels=sd["decoder.conv_out.conv.weight"].shape[0],
                latent_channels=sd["decoder.conv_in.conv.weight"].shape[1],
                block_out_channels=tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight"].shape[0]
                                         for i in range(levels)),
                layers_per_block=H._count(sd, "encoder.down_blocks.0.resnets"))


# Tencent's VAE names -> diffusers' (the inverse of diffusers' convert_hunyuan_video_15_vae_checkpoint_to_diffusers)
_VAE_FROM_TENCENT = [(r"\.(down|up)\.(\d+)\.block\.", lambda m: f".{m[1]}_blocks.{m[2]}.resnets."),
                     (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
                     (r"\.up\.(\d+)\.upsample\.", r".up_blocks.\1.upsamplers.0."),
                     (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
                     (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
                     (r"\.mid\.attn_1\.", ".mid_block.attentions.0.")]


def load_vae(path, dtype=H.DEFAULT_DTYPES["vae"], **sizes):
    """The 1.5 VAE from a diffusers vae/ folder, Tencent's vae/ folder or a single file in either layout (ComfyUI's).
    Keywords override sizes."""
    source = Path(path).expanduser()
    weights, config = H._read_weights(source, "pass the vae/ folder of a HunyuanVideo 1.5 checkpoint")
    if config.get("_class_name") != "AutoencoderKLConv3D":  # Tencent's own name for the same VAE
        H._check_class(config, "AutoencoderKLHunyuanVideo15", source, "vae")
    weights = H._strip_prefix(weights)
    for pattern, name in _VAE_FROM_TENCENT:
        weights = {re.sub(pattern, name, k): v for k, v in weights.items()}
    model = HunyuanVideo15VAE(**{**H._sizes(HunyuanVideo15VAE, _vae_shapes, weights, config, source, "VAE"), **sizes})
    # PyTorch layout: Conv3d (O, I, kt, kh, kw) -> MLX (O, kt, kh, kw, I); the norms' gamma (C, 1, 1, 1) -> (C,)
    weights = {k: v.transpose(0, 2, 3, 4, 1) if v.ndim == 5 else v.reshape(-1) if k.endswith(".gamma") else v
               for k, v in weights.items()}
    return H._load_strict(model, weights, dtype, source)


def _qwen_name(name):
    """A Qwen2.5-VL tensor's name in transformers 5's layout (model.language_model.*), 4's (model.*) or its text
    model's (no prefix) -> LlamaTextEncoder's; None for the vision tower's and the head's."""
    if name.startswith(("visual.", "model.visual.", "lm_head.")):
        return None
    return name.removeprefix("model.language_model.").removeprefix("model.")


def load_text_encoder(path, dtype=H.DEFAULT_DTYPES["text_encoders"], quantization=None, progress=None):
    """Qwen2.5-VL-7B-Instruct's language model from a diffusers text_encoder/ folder (transformers'
    Qwen2_5_VLTextModel), the whole Qwen2.5-VL (Tencent's text_encoder/llm/: its vision tower and head are left on
    disk), or a folder written by convert_weights.py. The last two layers and the final norm do not reach
    hidden_states[-3]: left on disk too. quantization: None, "int8", "int4" or "fp8"."""
    source = Path(path).expanduser()
    weights, config = H._read_weights(source, "pass the text_encoder/ folder of a HunyuanVideo 1.5 checkpoint")
    if config.get("model_type") not in ("qwen2_5_vl_text", "qwen2_5_vl"):
        raise H.HunyuanVideoError(f"{source} holds a {config.get('model_type', 'model without config.json')} where "
                                  f"Qwen2.5-VL's language model was expected: pass the checkpoint's text_encoder/.")
    text = config.get("text_config", config)  # the whole Qwen2.5-VL's config nests it (transformers 5)
    theta = text.get("rope_theta") or text.get("rope_parameters", {}).get("rope_theta", 1e6)
    model = H.LlamaTextEncoder(**{**H._hf_sizes(H.LlamaTextEncoder, text), "rope_theta": theta,
                                  "attention_bias": True})
    structure, prepare = H._quantized_loading(config, quantization, False, source)
    if structure:
        structure(model)
    weights = {name: v for k, v in weights.items()
               if (name := _qwen_name(k)) is not None and H._llm_keeps(name, len(model.layers))}
    return H._load_strict(model, weights, dtype, source, prepare, progress=progress)


def load_byt5(path, dtype=H.DEFAULT_DTYPES["text_encoders"]):
    """byT5 (the Glyph-SDXL-v2 weights) from a diffusers text_encoder_2/ folder (transformers' T5EncoderModel)."""
    source = Path(path).expanduser()
    weights, config = H._read_weights(source, "pass the text_encoder_2/ folder of a HunyuanVideo 1.5 checkpoint")
    if config.get("model_type") != "t5":
        raise H.HunyuanVideoError(f"{source} holds a {config.get('model_type', 'model without config.json')} where "
                                  f"byT5 (model_type t5) was expected: pass the checkpoint's text_encoder_2/.")
    model = T5Encoder(**H._hf_sizes(T5Encoder, config))
    weights = H._strip_prefix(weights)
    tied = weights.pop("encoder.embed_tokens.weight", None)  # the same table as shared (tied), where both are saved
    weights.setdefault("shared.weight", tied)
    weights = {k: v for k, v in weights.items() if v is not None and not k.startswith(("decoder.", "lm_head."))}
    return H._load_strict(model, weights, dtype, source)


def load_image_encoder(path, dtype=H.DEFAULT_DTYPES["text_encoders"]):
    """SigLIP's vision tower from a diffusers image_encoder/ folder (transformers' SiglipVisionModel, with or
    without the vision_model. prefix of transformers 4); its pooling head is left on disk."""
    source = Path(path).expanduser()
    weights, config = H._read_weights(source, "pass the image_encoder/ folder of a HunyuanVideo 1.5 image-to-video "
                                              "checkpoint")
    if config.get("model_type") not in ("siglip_vision_model", "siglip"):
        raise H.HunyuanVideoError(f"{source} holds a {config.get('model_type', 'model without config.json')} where "
                                  f"SigLIP's vision tower was expected: pass the checkpoint's image_encoder/.")
    model = SiglipVisionTower(**H._hf_sizes(SiglipVisionTower, config.get("vision_config", config)))
    weights = {k.removeprefix("vision_model."): v for k, v in weights.items()}
    channels = model.embeddings.patch_embedding.weight.shape[-1]
    weights = {k: v.transpose(0, 2, 3, 1) if k == "embeddings.patch_embedding.weight" and v.shape[1] == channels
               else v for k, v in weights.items()  # PyTorch's Conv2d (O, I, kh, kw) -> MLX's (O, kh, kw, I)
               if not k.startswith(("head.", "text_model.")) and not k.endswith("position_ids")}
    return H._load_strict(model, weights, dtype, source)


# Tencent's own checkpoint folder: tencent/HunyuanVideo-1.5 (transformer/<version>/ such as 480p_t2v, vae/) with
# the encoders its checkpoints-download.md puts beside them: text_encoder/llm/ (the whole Qwen2.5-VL-7B-Instruct, its
# tokenizer with it), text_encoder/byt5-small/ (google's: its config and tokenizer) and text_encoder/Glyph-SDXL-v2/
# (checkpoints/byt5_model.pt, byT5's weights; assets/, the color and font tokens its vocabulary adds), and for image
# to video vision_encoder/siglip/ (FLUX.1-Redux-dev's image_encoder/ and feature_extractor/). It is read as diffusers'
# converter reads it (scripts/convert_hunyuan_video1_5_to_diffusers.py), through a view of it in diffusers' layout,
# made once in the cache folder: links to its parts; byT5 with the Glyph weights and its tokenizer with the added
# tokens, written; the version's flow shift and CFG scale (Tencent's PIPELINE_CONFIGS) as a scheduler's and a guider's.

def is_tencent_checkpoint(folder):
    folder = Path(str(folder)).expanduser()
    return (folder / "text_encoder" / "llm").is_dir() and (folder / "transformer").is_dir() and \
        not (folder / "transformer" / "config.json").exists()


def tencent_version(folder, transformer=None):
    """The transformer/<version>/ of Tencent's folder a run takes: the one `transformer` names, or its only one;
    several and none named: one sentence listing them."""
    versions = sorted(d.name for d in (folder / "transformer").iterdir() if (d / "config.json").is_file())
    if transformer is not None and Path(transformer).expanduser().resolve().parent == \
            (folder / "transformer").resolve():
        return Path(transformer).name
    if len(versions) != 1:
        held = f"the transformers {', '.join(versions)}" if versions else "no transformer/<version>/ with a config"
        raise H.HunyuanVideoError(f"{folder} holds {held}: name the one to run with {{transformer}} "
                                  f"{folder / 'transformer' / (versions or ['480p_t2v'])[0]}.")
    return versions[0]


def tencent_settings(version):
    """Tencent's PIPELINE_CONFIGS for a version: its flow shift and CFG scale (1 for the distilled ones)."""
    shift = 7.0 if "step_distilled" in version else 5.0 if version.startswith("480p") else \
        9.0 if "t2v" in version else 7.0
    return shift, 1.0 if "distilled" in version else 6.0


def tencent_view(folder, transformer=None):
    """Tencent's checkpoint folder as a folder in diffusers' layout (see above), made in the cache folder once per
    folder and version and kept (a byT5 of Glyph's weights, about 1 GB, is its only copy)."""
    import hashlib

    folder = Path(folder).expanduser().resolve()
    version = tencent_version(folder, transformer)
    text, glyph = folder / "text_encoder", folder / "text_encoder" / "Glyph-SDXL-v2"
    weights = glyph / "checkpoints" / "byt5_model.pt"
    for need in (text / "byt5-small", weights, glyph / "assets"):
        if not need.exists():
            raise H.HunyuanVideoError(f"{need} is missing: download byT5 and Glyph-SDXL-v2 as Tencent's "
                                      f"checkpoints-download.md says, into {text}.")
    stamp = f"{folder} {version} {weights.stat().st_size} {weights.stat().st_mtime_ns} {H.__version__}"
    view = H.cache_dir() / "tencent" / hashlib.sha256(stamp.encode()).hexdigest()[:16]
    if (view / "model_index.json").exists():
        return view
    tmp = view.with_name(view.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    siglip = folder / "vision_encoder" / "siglip"
    links = {"transformer": folder / "transformer" / version, "vae": folder / "vae", "text_encoder": text / "llm",
             "tokenizer": text / "llm", "image_encoder": siglip / "image_encoder",
             "feature_extractor": siglip / "feature_extractor"}
    for name, target in links.items():
        if target.exists():
            (tmp / name).symlink_to(target, target_is_directory=True)
    # byT5: Glyph's weights under the encoder's names ('encoder.' for its 'module.text_tower.encoder.'), the shared
    # embedding its own table (tied); google's config with the vocabulary those weights have
    tensors = {"encoder." + k.removeprefix("module.text_tower.encoder."): v for k, v in H._read_pt(weights).items()}
    tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    config = json.loads((text / "byt5-small" / "config.json").read_text())
    config["vocab_size"] = tensors["shared.weight"].shape[0]
    (tmp / "text_encoder_2").mkdir()
    mx.save_safetensors(str(tmp / "text_encoder_2" / "model.safetensors"), tensors)
    (tmp / "text_encoder_2" / "config.json").write_text(json.dumps(config))
    tokenizer = H.load_tokenizer(text / "byt5-small")  # its tokens for Glyph's colors and fonts, in Glyph's order
    fonts = json.loads((glyph / "assets" / "multilingual_10-lang_idx.json").read_text())
    colors = json.loads((glyph / "assets" / "color_idx.json").read_text())
    tokenizer.add_tokens([f"<color-{i}>" for i in range(len(colors))] +
                         [f"<{code[:2]}-font-{fonts[code]}>" for code in fonts], special_tokens=True)
    if len(tokenizer) != config["vocab_size"]:
        raise H.HunyuanVideoError(f"{weights} holds {config['vocab_size']} byT5 tokens, and byt5-small with Glyph's "
                                  f"colors and fonts makes {len(tokenizer)}: download Glyph-SDXL-v2 again.")
    tokenizer.save_pretrained(str(tmp / "tokenizer_2"))
    shift, scale = tencent_settings(version)
    for name, file, kind, values in (("scheduler", "scheduler_config.json", "FlowMatchEulerDiscreteScheduler",
                                      {"shift": shift}),
                                     ("guider", "guider_config.json", "ClassifierFreeGuidance",
                                      {"guidance_scale": scale})):
        (tmp / name).mkdir()
        (tmp / name / file).write_text(json.dumps({"_class_name": kind, **values}))
    (tmp / "model_index.json").write_text(json.dumps({"_class_name": HunyuanVideo15Pipeline.__name__}))
    shutil.rmtree(view, ignore_errors=True)
    tmp.rename(view)
    return view


# ---------------------------------------------------------------------------------------------------
# The offline demos: tiny random HunyuanVideo 1.5s in the real layout
# ---------------------------------------------------------------------------------------------------

def vae_checkpoint_weights(vae):
    """The VAE's tensors as diffusers' files hold them (load_vae's inverse): Conv3d (O, I, kt, kh, kw), the norms'
    gamma (C, 1, 1, 1)."""
    return {k: v.transpose(0, 4, 1, 2, 3) if v.ndim == 5 else v.reshape(-1, 1, 1, 1) if k.endswith(".gamma") else v
            for k, v in tree_flatten(vae.parameters())}


def siglip_checkpoint_weights(tower):
    """SigLIP's tower's tensors as transformers' files hold them (load_image_encoder's inverse, less the pooling
    head): the patch embedding as its Conv2d (O, I, kh, kw)."""
    return {k: v.transpose(0, 3, 1, 2) if v.ndim == 4 else v for k, v in tree_flatten(tower.parameters())}


def checkpoint_settings(model, transformer=None):
    """A local 1.5 folder's own settings, read from its files before anything loads, as the reference's pipelines
    take them: the flow shift (scheduler/scheduler_config.json), true CFG's scale (guider/guider_config.json: 6 on
    the base checkpoints, 1 on the distilled ones), 121 frames, and the 16:9 size at the DiT's target_size
    (transformer/config.json; target_size kept too: image to video takes the image's aspect). Tencent's folder: its
    version's (tencent_settings, and its DiT's config), the version `transformer` names or its only one. {} for a
    name that is not a folder."""
    folder = Path(str(model)).expanduser()
    if not folder.is_dir():
        return {}
    if is_tencent_checkpoint(folder):
        try:
            version = tencent_version(folder, transformer)
        except H.HunyuanVideoError:
            return {"frames": 121}  # from_pretrained says which versions there are
        shift, scale = tencent_settings(version)
        config = HunyuanVideo15Transformer.diffusers_config(
            json.loads((folder / "transformer" / version / "config.json").read_text()))
        target = config.get("target_size", 960 if version.startswith("720p") else 640)
        return {"frames": 121, "shift": shift, "cfg_scale": scale, "target_size": target,
                **dict(zip(("height", "width"), bucket_size(9, 16, target)))}

    def read(name):
        try:
            return json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return {}
    out = {"frames": 121}
    shift = read("scheduler/scheduler_config.json").get("shift")
    scale = read("guider/guider_config.json").get("guidance_scale")
    target = read("transformer/config.json").get("target_size")
    if isinstance(shift, (int, float)):
        out["shift"] = float(shift)
    if isinstance(scale, (int, float)):
        out["cfg_scale"] = float(scale)
    if isinstance(target, int) and target >= 16:
        out["target_size"] = target
        out["height"], out["width"] = bucket_size(9, 16, target)
    return out


def build_tiny_checkpoint(folder, seed=0, image_condition=None):
    """A tiny random-weight HunyuanVideo 1.5 in diffusers' layout (HunyuanVideo_Apple.build_tiny_checkpoint's
    counterpart, "tiny15" and "tiny15-i2v"): every component the real checkpoint has, in the same format and layout,
    built without torch or network, so the whole path runs in seconds; its videos are noise. The tokenizers: a
    word-level one in Qwen's chat tokens, and byT5's (bytes: it has no vocabulary file). image_condition
    "latents_and_tokens": image to video, with SigLIP and its image processor. Built in a temporary folder, then
    renamed."""
    i2v, folder = image_condition is not None, Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.random.seed(seed)
    words = re.findall(r"\w+|[^\w\s]", re.sub(r"<\|\w+\|>", " ", QWEN_TEMPLATE)) + H._TINY_WORDS.split()
    n_qwen = H._word_tokenizer(words, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], "$A", False, 2048,
                               tmp / "tokenizer")
    H._transformers().ByT5Tokenizer().save_pretrained(tmp / "tokenizer_2")
    # widths are multiples of 64, so that quantization has layers to quantize here too
    qwen = dict(vocab_size=n_qwen, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6)
    llm = H.LlamaTextEncoder(**qwen, attention_bias=True, skip_layers=0)  # all layers, as the real file has them
    H._save_component(tmp / "text_encoder", {**dict(tree_flatten(llm.parameters())), "norm.weight": mx.ones((64,))},
                      {"model_type": "qwen2_5_vl_text", "architectures": ["Qwen2_5_VLTextModel"], **qwen})
    t5 = dict(vocab_size=384, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu")
    H._save_component(tmp / "text_encoder_2", dict(tree_flatten(T5Encoder(**t5).parameters())),
                      {"model_type": "t5", "architectures": ["T5EncoderModel"], **t5})
    sig = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56,
               patch_size=14)
    # 4 latent channels (the real VAE's 32 exceed a tiny decoder's widest level): 4 + 4 + 1 DiT inputs
    dit_cfg = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
                   num_refiner_layers=1, text_embed_dim=64, text_embed_2_dim=32, image_embed_dim=32,
                   rope_axes_dim=[8, 12, 12], target_size=160, task_type="i2v" if i2v else "t2v")
    dit = HunyuanVideo15Transformer(**dit_cfg)  # byT5's projection at its fixed width (2048), as diffusers has it
    H._save_component(tmp / "transformer", H._to_diffusers(H._checkpoint_weights(dit), _FROM_DIFFUSERS),
                      {"_class_name": "HunyuanVideo15Transformer3DModel", **dit_cfg},
                      "diffusion_pytorch_model.safetensors")
    vae_cfg = dict(block_out_channels=[8, 16, 16, 16, 16], layers_per_block=1, latent_channels=4)
    H._save_component(tmp / "vae", vae_checkpoint_weights(HunyuanVideo15VAE(**vae_cfg)),
                      {"_class_name": "AutoencoderKLHunyuanVideo15", "scaling_factor": 1.03682, **vae_cfg},
                      "diffusion_pytorch_model.safetensors")
    if i2v:
        tower = siglip_checkpoint_weights(SiglipVisionTower(**sig))
        W, I = sig["hidden_size"], sig["intermediate_size"]  # the pooling head the real file has (and 1.5 leaves)
        tower.update({f"head.{k}": mx.random.normal(shape) * 0.02 for k, shape in {
            "probe": (1, 1, W), "attention.in_proj_weight": (3 * W, W), "attention.in_proj_bias": (3 * W,),
            "attention.out_proj.weight": (W, W), "attention.out_proj.bias": (W,), "layernorm.weight": (W,),
            "layernorm.bias": (W,), "mlp.fc1.weight": (I, W), "mlp.fc1.bias": (I,), "mlp.fc2.weight": (W, I),
            "mlp.fc2.bias": (W,)}.items()})
        H._save_component(tmp / "image_encoder", tower, {"model_type": "siglip_vision_model", **sig})
        (tmp / "feature_extractor").mkdir()
        (tmp / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "SiglipImageProcessor", "size": {"height": 56, "width": 56}, "resample": 3,
             "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 5.0}))
    kind = "HunyuanVideo15ImageToVideoPipeline" if i2v else "HunyuanVideo15Pipeline"
    (tmp / "model_index.json").write_text(json.dumps({"_class_name": kind, "tiny_demo": True,
                                                      "hunyuan_apple_version": H.__version__}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


# ---------------------------------------------------------------------------------------------------
# Memory plan: each phase's peak, counted as HunyuanVideo_Apple counts 13B's, before anything loads
# ---------------------------------------------------------------------------------------------------
# The weights from the files' headers and the activations of what this code has alive at once, with
# HunyuanVideo_Apple's pieces where the code is shared: the LLM's layers (_llm_activations, for Qwen, byT5 and
# SigLIP alike), the DiT's double-stream blocks (denoise_bytes: no single-stream blocks, 65 values a video token in
# and 32 out, a text stream of up to 1000 LLM, 256 byT5 and 729 image tokens). The VAE's decode is 1.5's own.

def _decode_activations(frames, height, width, tile, vae, itemsize, cpu):
    """Peak activation bytes of a tiled decode by HunyuanVideo15VAE (vae: its constructor's sizes), a piece of
    DECODE_FRAMES latent frames at a time. The largest tensors live at full resolution (c0 = block_out[0] channels):
    in the upsampler into it, per output voxel, the convolution's output, its pixels moved out, the input's channels
    repeated and moved, and the sum (4 c0); then in each resnet there, the input, norm, SiLU, padded copy, conv1,
    norm, SiLU, padded copy, conv2 and the sum (10 c0 at most alive together). CPU: each 3x3x3 convolution unfolds
    its input into 27 float32 columns per channel and output voxel, beside float32 copies of its padded input (6 at
    most), two such convolutions alive at once, and the norms' float32 temporaries. Beside them, what the pieces
    carry (_decode_context). Then the decoded video, as HunyuanVideo_Apple's: the tiles, the blended rows and the
    clip in the VAE's dtype, its float32 and uint8 conversions."""
    c0 = vae["block_out_channels"][0]
    latents = (frames - 1) // 4 + 1
    t = max(4 * min(latents, DECODE_FRAMES) - 3, 4 * min(latents - DECODE_FRAMES, DECODE_FRAMES))  # the longest piece
    h, w = min(tile[1], height), min(tile[2], width)  # one tile's output: tiled in space only
    voxels, padded = t * h * w, (t + 2) * (h + 2) * (w + 2)
    act = 10 * c0 * voxels * itemsize + 2 * c0 * (padded - voxels) * itemsize
    if cpu:
        act += 2 * c0 * (27 * voxels + 6 * padded) * 4 + 2 * H._cpu_norm_temporaries(voxels * c0, itemsize, rms=True)
    if latents > DECODE_FRAMES:
        act += _decode_context(latents, h, w, vae, itemsize)
    return act + frames * height * width * 3 * (3 * itemsize + 4 + 1)


def _decode_context(latents, height, width, vae, itemsize):
    """Bytes carried from piece to piece in a decode of a tile height x width (pixels): two frames of each causal
    convolution's input at its level's size (conv_in, the mid block's four, each up block's resnets' and upsampler's,
    conv_out), and the attention's keys and values over every latent frame (VAEDecoder's layers, walked as built)."""
    block_out, layers, s = vae["block_out_channels"][::-1], vae["layers_per_block"], vae["spatial_compression_ratio"]
    h, w = height // s, width // s
    convs = vae["latent_channels"] * h * w + 4 * block_out[0] * h * w
    keys = 2 * latents * block_out[0] * h * w
    prev = block_out[0]
    for i, (c, level) in enumerate(zip(block_out, _levels(len(block_out), s, vae["temporal_compression_ratio"],
                                                            False))):
        convs += (prev + (2 * layers + 1) * c) * h * w  # the first resnet's conv1 reads prev channels
        prev = c
        if level:
            convs += c * h * w
            h, w, prev = 2 * h, 2 * w, block_out[i + 1]
    convs += prev * h * w  # conv_out
    return (2 * convs + keys) * itemsize


def estimate_memory(folder, height, width, num_frames, quantization=None, modulation=False, tile=VAE_TILE,
                    low_memory=False, backend=None, dtypes=None, hub=None, cache=None, steps=50, cfg=None,
                    transformer=(None, None), cache_options=None, attention="dense", quantized_matmul="auto",
                    ranks=1):
    """Estimated peak bytes of each phase of a 1.5 generation, on each rank: {"text encoders", "denoise", "decode"},
    and "image encoder" (SigLIP) for an image-to-video checkpoint. The settings are HunyuanVideo_Apple.
    estimate_memory's."""
    folder, cpu = Path(folder), (backend or H._backend()) == "cpu"
    size = {c: d.size for c, d in {**H.DEFAULT_DTYPES, **(dtypes or {})}.items()}  # bytes per value
    b = size["text_encoders"]
    parts = H._components(folder, hub, *transformer)
    out = {}

    llm_info, llm_cfg = parts["text_encoder"]
    llm = H._sizes_of(H.LlamaTextEncoder, llm_cfg.get("text_config", llm_cfg))
    used = llm["num_hidden_layers"] - llm["skip_layers"]
    named = {n: v for k, v in llm_info.items() if (n := _qwen_name(k)) is not None}
    keep = lambda k: H._llm_keeps(k, used)  # noqa: E731
    qwen = H._weights_bytes(named, quantization, dit=False, itemsize=b, keep=keep) + max(
        H._cast_bytes(named, b, keep), H._llm_activations(
            QWEN_LENGTH + QWEN_CROP_START, llm["hidden_size"], llm["intermediate_size"], llm["num_attention_heads"],
            llm["num_key_value_heads"], b, cpu))
    t5_info, t5_cfg = parts["text_encoder_2"]
    t5 = H._sizes_of(T5Encoder, t5_cfg)
    byt5 = H._weights_bytes(t5_info, dit=False, itemsize=b) + H._llm_activations(
        BYT5_LENGTH, t5["d_model"], t5["d_ff"], t5["num_heads"], t5["num_heads"], b, cpu)
    out["text encoders"] = max(qwen, byt5)  # Qwen is gone before byT5 loads
    # the text encoders' outputs, held from then on: the prompt's and true CFG's negative prompt's (masks float32)
    prompts = 2 if cfg else 1
    encoded = prompts * ((QWEN_LENGTH * llm["hidden_size"] + BYT5_LENGTH * t5["d_model"]) * b +
                         (QWEN_LENGTH + BYT5_LENGTH) * 4)

    image_tokens = 0
    if (folder / "image_encoder").is_dir():  # SigLIP: its weights, its largest tensor as stored while it loads, its
        # layers over the image's tokens, its float32 pixels, its output; on the CPU the patch convolution's float32
        # temporaries (the pixels unfolded, and in the model's dtype first, the weights, the output) and the final
        # LayerNorm's
        info, config = H._components(folder, hub, only=("image_encoder",))["image_encoder"]
        sig = H._sizes_of(SiglipVisionTower, config.get("vision_config", config))
        W, pixels = sig["hidden_size"], sig["image_size"] ** 2 * 3
        image_tokens = (sig["image_size"] // sig["patch_size"]) ** 2
        act = H._llm_activations(image_tokens, W, sig["intermediate_size"], sig["num_attention_heads"],
                                 sig["num_attention_heads"], b, cpu) + pixels * 4 + image_tokens * W * b
        if cpu:
            act += pixels * (b + 4) + W * sig["patch_size"] ** 2 * 3 * 4 + image_tokens * W * 4 + \
                H._cpu_norm_temporaries(image_tokens * W, b)
        out["image encoder"] = encoded + H._weights_bytes(info, dit=False, itemsize=b) + max(
            H._cast_bytes(info, b), act)

    dit_info, dit_cfg = parts["transformer"]
    sizes = H._sizes_of(HunyuanVideo15Transformer, dit_cfg, dit_info, _shapes, transformer[0] or folder /
                        "transformer", "transformer")
    video = math.prod(H.patch_grid(height, width, num_frames))
    text = QWEN_LENGTH + BYT5_LENGTH + image_tokens
    # held besides the LLM's states: byT5's and the image's, as encoded and cast (each prompt's, with true CFG)
    held = prompts * (BYT5_LENGTH * sizes["text_embed_2_dim"] + image_tokens * sizes["image_embed_dim"]) * 2 * b
    out["denoise"] = held + H.denoise_bytes(
        dit_info, sizes, video, text, size["transformer"], cpu, quantization, modulation, low_memory, steps, cfg,
        cache, cache_options, attention, quantized_matmul, ranks,
        values=(sizes["in_channels"], sizes["out_channels"]), refined=QWEN_LENGTH)

    vae_info, vae_cfg = parts["vae"]
    vae = H._sizes_of(HunyuanVideo15VAE, vae_cfg, vae_info, _vae_shapes, folder / "vae", "VAE")
    out["decode"] = H._weights_bytes(vae_info, itemsize=size["vae"], dit=False) + _decode_activations(
        num_frames, height, width, tile, vae, size["vae"], cpu)
    if ranks > 1:  # the tiles of every rank, kept until they are blended (overlapping: at most twice the video)
        out["decode"] += 2 * num_frames * height * width * 3 * size["vae"]
    return out


# ---------------------------------------------------------------------------------------------------
# The pipeline: HunyuanVideo_Apple's, running 1.5's encoders, DiT and VAE
# ---------------------------------------------------------------------------------------------------
# The stream of events, the phases (each one's weights freed before the next), the sampler, true CFG, the step
# caches, LoRAs, quantization, block streaming and several ranks are HunyuanVideo_Apple.HunyuanVideoPipeline's; this
# class replaces what is the model's, and gives its memory plan (estimate_memory above). Image to video: the image is
# fitted to the video's size (fit_image), its VAE latents go in as input channels (the first frame, with a mask) and
# SigLIP's tokens of it into the text stream; the reference picks the size from the image (bucket_size), which the
# caller passes as height and width.

# MagCache's calibration for 1.5 by MagCache's authors (ComfyUI-MagCache, "hunyuan_video1.5"), made with true CFG at
# 20 steps and at 40 (the table for runs of more than 20 steps, as theirs picks it): each step's magnitude ratio for
# the prompt's branch and for the negative prompt's, interleaved. Their recommended settings for 1.5: threshold 0.03,
# at most 2 steps skipped in a row, from a quarter of the steps on (13B's: 0.24, 6, a fifth).
MAG_RATIOS = {
    20: [1.0] * 2 + [1.01172, 1.00293, 0.9873, 1.0127, 1.01465, 0.98926, 0.99805, 1.00098, 0.99512, 0.99365, 0.99512,
                     0.99561, 0.99316, 0.99365, 0.99365, 0.99365, 0.99316, 0.99316, 0.99268, 0.99268, 0.9917, 0.9917,
                     0.99023, 0.99023, 0.98828, 0.98877, 0.98633, 0.98633, 0.9834, 0.9834, 0.97949, 0.97998,
                     0.97363, 0.97363, 0.96436, 0.96436, 0.94824, 0.94873],
    40: [1.0] * 2 + [1.04199, 1.01953, 1.01172, 1.01855, 1.00293, 1.00586, 1.00098, 1.00195, 1.0, 1.00098, 0.99805,
                     0.99902, 0.99854, 0.99805, 0.99658, 0.99756, 0.99707, 0.99512, 0.99609, 0.99609, 0.99658,
                     0.99658, 0.99658, 0.99805, 0.99658, 0.99707, 0.99561, 0.99561, 0.99561, 0.99658, 0.99658,
                     0.99658, 0.99609, 0.99658, 0.99512, 0.99561, 0.99463, 0.99512, 0.99463, 0.99512, 0.99463,
                     0.99512, 0.99365, 0.99414, 0.99365, 0.99365, 0.99219, 0.99219, 0.99219, 0.99268, 0.99072,
                     0.99121, 0.99072, 0.99072, 0.98926, 0.98975, 0.9873, 0.98779, 0.98535, 0.98584, 0.9834, 0.9834,
                     0.97998, 0.97998, 0.97607, 0.97607, 0.96973, 0.96973, 0.96338, 0.96338, 0.9502, 0.9502,
                     0.93066, 0.93066, 0.896, 0.896, 0.81787, 0.81836],
}


def magcache(steps, branch):
    """MagCache's 1.5 calibration for a run of `steps` steps and a branch (0 the prompt's, 1 true CFG's negative
    prompt's): its ratios (nearest-interpolated to the steps by MagCache, as for 13B), threshold, K and retention."""
    return dict(ratios=MAG_RATIOS[40 if steps > 20 else 20][branch::2], threshold=0.03, K=2, retention=0.25)


class HunyuanVideo15Pipeline(H.HunyuanVideoPipeline):
    """A HunyuanVideo 1.5 checkpoint in diffusers' layout (transformer/, vae/, text_encoder/ (Qwen2.5-VL's language
    model), text_encoder_2/ (byT5), tokenizer/, tokenizer_2/; for image to video image_encoder/ (SigLIP) and
    feature_extractor/), run as HunyuanVideo_Apple's pipeline is: from_pretrained(folder), then generate(request) or
    pipe(prompt, **settings). 1.5's base checkpoints run true CFG: give negative_prompt ("" is the reference's default)
    and cfg_scale (6)."""

    dit_class = HunyuanVideo15Transformer
    text_parts = ("states", "mask", "byt5", "byt5_mask")
    prompt_template = QWEN_TEMPLATE
    estimate_memory = staticmethod(estimate_memory)
    smaller_size = (480, 848)  # 480p
    longest_clip = 121  # 5 s at 24 fps: the reference's default and longest
    # the reference's buckets at 480p's and 720p's target sizes, for --quality and --aspect-ratio (width:height)
    buckets = {quality: {ar: bucket_size(int(ar.split(":")[1]), int(ar.split(":")[0]), target)
                         for ar in ("16:9", "9:16", "4:3", "3:4", "1:1")} for quality, target in (("480p", 640),
                                                                                                 ("720p", 960))}
    unused_settings = {"guidance": "HunyuanVideo 1.5 embeds no guidance scale; leave it out (its base checkpoints "
                                   "take true CFG: {negative_prompt} and {cfg_scale})."}
    image_models = ("tiny15-i2v, or a 1.5 I2V checkpoint such as "
                    "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v")
    build_tiny_checkpoint = staticmethod(build_tiny_checkpoint)
    checkpoint_settings = staticmethod(checkpoint_settings)

    @staticmethod
    def diffusers_folder(folder, transformer=None):
        """Tencent's own checkpoint folder as a folder in diffusers' layout (tencent_view); others as they are."""
        return tencent_view(folder, transformer) if is_tencent_checkpoint(folder) else folder
    bucket_size = staticmethod(bucket_size)
    image_fit = "cropped"  # fit_image keeps the middle of an image, scaled to cover the video
    magcache = staticmethod(magcache)
    uncalibrated_caches = {"teacache": "{cache} teacache rescales its indicator by a polynomial fitted on HunyuanVideo "
                                       "(13B) and none is published for 1.5, so its skips are not calibrated for this "
                                       "model; fbcache, magcache (calibrated for 1.5), easycache and taylorseer adapt "
                                       "to it."}

    def image_condition(self):
        """None (text to video), or "latents_and_tokens" for an image-to-video checkpoint: its DiT's config.json says
        task_type "i2v", or Tencent's ideal_task (a DiT without one: the folder has an image_encoder/)."""
        if not hasattr(self, "_condition"):
            _, config = H._components(self.folder, self.hub, self.transformer, self.transformer_hub,
                                      only=("transformer",))["transformer"]
            task = HunyuanVideo15Transformer.diffusers_config(config).get("task_type") or (
                "i2v" if (self.folder / "image_encoder").is_dir() else "t2v")
            self._condition = "latents_and_tokens" if task == "i2v" else None
        return self._condition

    def _encode(self, items, progress=None):
        """The text encoders, inside the text encoders' phase: [(states, mask, byt5, byt5_mask)] for [(prompt, None,
        None)], each prompt on its own, Qwen loaded once and gone before byT5 loads."""
        tokenizer = H.load_tokenizer(self.folder / "tokenizer")
        llm = load_text_encoder(self.folder / "text_encoder", self.dtypes["text_encoders"], self.quantization,
                                H._reporter(progress, "loading the LLM"))
        out = []
        for p, _, _ in items:
            out.append(encode_qwen(p, tokenizer, llm, progress=H._reporter(progress, "encoding the prompt")))
            mx.eval(out[-1])
        del llm
        gc.collect()
        mx.clear_cache()
        byt5 = load_byt5(self.folder / "text_encoder_2", self.dtypes["text_encoders"])
        tokenizer_2 = H.load_tokenizer(self.folder / "tokenizer_2")
        for i, (p, _, _) in enumerate(items):
            out[i] = (*out[i], *encode_byt5(p, tokenizer_2, byt5))
            mx.eval(out[i])
        return out

    def encode_image(self, image, height, width):
        """Image to video: the image fitted to the video (fit_image), its VAE latents (1, 1, h, w, 32) scaled, as
        HunyuanVideo_Apple's; then SigLIP's tokens of it (1, 729, 1152), in a phase of their own, kept for the DiT's
        text stream."""
        image = fit_image(image, height, width)
        latents = super().encode_image(image, height, width)
        f = self.folder / "feature_extractor" / "preprocessor_config.json"
        with self._phase("image encoder"):
            tower = load_image_encoder(self.folder / "image_encoder", self.dtypes["text_encoders"])
            self.image_tokens = tower(siglip_pixels(image, json.loads(f.read_text()) if f.exists() else {}))
            mx.eval(self.image_tokens)
            del tower
        return latents

    def _dit_text(self, text):
        states, mask, byt5, byt5_mask = text
        image = None
        if self.image_condition():  # the same image tokens for every row (the negative prompt's too)
            image = mx.broadcast_to(self.image_tokens, (states.shape[0], *self.image_tokens.shape[1:]))
        return states, mask, Conditions(byt5, byt5_mask, image)

    def _extra_channels(self, image, shape, condition):
        """The image's latents on the first frame and zeros after, and a mask of the first frame (13B's latent
        concat's channels); for text to video, zeros."""
        if condition is None:
            B, T, h, w, C = shape
            return mx.zeros((B, T, h, w, C + 1))
        return H._image_channels(image, shape, "latent_concat")

    def _load_vae(self):
        return load_vae(self.folder / "vae", self.dtypes["vae"])

    def decode(self, latents, tile=VAE_TILE, stride=VAE_STRIDE, progress=None):
        return super().decode(latents, tile, stride, progress)

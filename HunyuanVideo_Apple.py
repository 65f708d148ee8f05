"""HunyuanVideo (Tencent's 13B text-to-video model) in plain MLX.

One module, in the order data flows through the model:
  1. the text encoders: LLaVA-Llama-3 (per-token states) and CLIP-L (a pooled vector);
  2. the diffusion transformer (DiT): embedders, token refiner, 3D RoPE, 20 double-stream and
     40 single-stream blocks, final layer;
  3. the causal 3D VAE: latents to video (and back), tiled in space and time like the reference;
  4. quantization of the DiT's blocks and the LLM (int8, int4, fp8);
  5. loading: diffusers folders, Tencent's .pt state dicts (fp8 too), ComfyUI single files and converted
     MLX folders, strictly;
  6. the flow-matching Euler sampler, and the pipeline that runs it all in phases;
  7. the offline demo: a tiny random checkpoint in the real layout;
  8. the memory plan: each phase's peak, estimated before anything loads.

Conventions: video tensors are channels-last, (B, T, H, W, C), from the input to the output. Module
attribute names are Tencent's checkpoint names (the original layout, with fused q|k|v projections), so
Tencent and ComfyUI files load by name and the diffusers layout needs a short renaming table.
The reference for every number here is diffusers (its HunyuanVideo transformer, VAE and pipeline).
"""

import gc
import inspect
import json
import math
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

__version__ = "0.1.0"


class HunyuanVideoError(Exception):
    """A problem the user can fix: the message is one sentence that says how."""


# ---------------------------------------------------------------------------------------------------
# Text encoders: LLaVA-Llama-3 (per-token states) and CLIP-L (one pooled vector)
# ---------------------------------------------------------------------------------------------------
# The prompt is read twice. The language model of LLaVA-Llama-3-8B reads it inside a fixed system
# template; its third-to-last hidden state (the output of layer n-2, no final norm) gives one vector per
# token, and the template's first 95 tokens are cropped off. CLIP-L's text model gives one pooled vector.

PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video.2. The color, shape, size, texture, quantity, text, and spatial "
    "relationships of the objects.3. Actions, events, behaviors temporal relationships, physical movement changes "
    "of the objects.4. background environment, light, style and atmosphere.5. camera angles, movements, and "
    "transitions used in the video:<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>")
CROP_START = 95  # <|begin_of_text|> + the template's 94 tokens before the prompt, in the Llama-3 vocabulary
TEXT_LENGTH = 256  # LLM states after cropping: right-padded (mask 0) or truncated to this many
CLIP_LENGTH = 77


class LlamaAttention(nn.Module):
    """Grouped-query attention, causal, with Llama's RoPE (halves rotated, theta 500000)."""

    def __init__(self, dim, heads, kv_heads, head_dim, rope_theta):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.rope_theta = heads, kv_heads, head_dim, rope_theta
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def __call__(self, x):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)  # (B, heads, L, hd)
        k = self.k_proj(x).reshape(B, L, self.kv_heads, -1).transpose(0, 2, 1, 3)  # (B, kv_heads, L, hd)
        v = self.v_proj(x).reshape(B, L, self.kv_heads, -1).transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask="causal")
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class LlamaMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, dim, hidden, heads, kv_heads, head_dim, eps, rope_theta):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.self_attn = LlamaAttention(dim, heads, kv_heads, head_dim, rope_theta)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.mlp = LlamaMLP(dim, hidden)

    def __call__(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaTextEncoder(nn.Module):
    """transformers' LlamaModel up to hidden_states[-(skip_layers + 1)]: the last skip_layers layers and the
    final norm never reach that output, so they are not built (nor loaded). Keywords: its config.json names."""

    def __init__(self, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                 head_dim=None, skip_layers=2):
        super().__init__()
        head_dim = head_dim or hidden_size // num_attention_heads
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = [LlamaLayer(hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
                                  rms_norm_eps, rope_theta) for _ in range(num_hidden_layers - skip_layers)]

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def __call__(self, ids):
        """ids (B, L) -> states (B, L, hidden). Causal: a position never sees the ones after it, so right
        padding leaves the valid positions as they are."""
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPLayer(nn.Module):
    def __init__(self, dim, hidden, heads, eps, act):
        super().__init__()
        self.heads = heads
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(dim, dim))
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def __call__(self, x):
        B, L, D = x.shape
        a = self.self_attn
        h = self.layer_norm1(x)
        q, k, v = (p(h).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3) for p in (a.q_proj, a.k_proj, a.v_proj))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=(D // self.heads) ** -0.5, mask="causal")
        x = x + a.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEncoder(nn.Module):
    """transformers' CLIPTextModel, returning its pooler_output: the final-normed state at the end token."""

    def __init__(self, vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu",
                 eos_token_id=2):
        super().__init__()
        if hidden_act not in ("quick_gelu", "gelu"):
            raise HunyuanVideoError(f"CLIP hidden_act {hidden_act!r} is not supported: use quick_gelu or gelu.")
        act = (lambda x: x * mx.sigmoid(1.702 * x)) if hidden_act == "quick_gelu" else nn.gelu
        self.eos_token_id = eos_token_id
        tm = self.text_model = nn.Module()
        tm.embeddings = nn.Module()
        tm.embeddings.token_embedding = nn.Embedding(vocab_size, hidden_size)
        tm.embeddings.position_embedding = nn.Embedding(max_position_embeddings, hidden_size)
        tm.encoder = nn.Module()
        tm.encoder.layers = [CLIPLayer(hidden_size, intermediate_size, num_attention_heads, layer_norm_eps, act)
                             for _ in range(num_hidden_layers)]
        tm.final_layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    @property
    def dtype(self):
        return self.text_model.final_layer_norm.weight.dtype

    def __call__(self, ids):
        """ids (B, L) -> pooled (B, hidden)."""
        tm = self.text_model
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding(mx.arange(ids.shape[1]))
        for layer in tm.encoder.layers:
            x = layer(x)
        x = tm.final_layer_norm(x)
        # the end token: the largest id in configs that say eos_token_id 2 (CLIP-L's, from before
        # transformers fixed it), else the first eos_token_id, as transformers decides
        end = mx.argmax(ids, axis=1) if self.eos_token_id == 2 else mx.argmax(ids == self.eos_token_id, axis=1)
        return mx.take_along_axis(x, end[:, None, None], axis=1)[:, 0]


def _tokenize(tokenizer, texts, length, what, template_tokens=0):
    """Right-padded or truncated to `length` ids, as the reference tokenizes, warning about what is cut
    (counted without the template's tokens, which are not the user's)."""
    for ids in tokenizer(texts, verbose=False).input_ids:  # uncut, to measure
        if len(ids) > length:
            warnings.warn(f"the prompt is {len(ids) - template_tokens} tokens for {what}, which reads "
                          f"{length - template_tokens}: the last {len(ids) - length} were cut "
                          f"(...{tokenizer.decode(ids[length - 8:length])!r} is where it stops).", stacklevel=3)
    enc = tokenizer(texts, max_length=length, padding="max_length", truncation=True, return_tensors="np")
    return enc.input_ids, enc.attention_mask


def encode_llama(prompts, tokenizer, model, max_length=TEXT_LENGTH, template=PROMPT_TEMPLATE, crop_start=CROP_START):
    """Prompts -> (states (B, max_length, hidden) in the model's dtype, zero where padded; mask (B, max_length)).
    Only the longest prompt's tokens are run: the causal model gives valid positions the same states either way."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, mask = _tokenize(tokenizer, [template.format(p) for p in prompts], max_length + crop_start,
                          "the LLaVA-Llama-3 text encoder", crop_start)
    n = int(mask.sum(axis=1).max())
    states = model(mx.array(ids[:, :n]))[:, crop_start:]  # (B, n - crop_start, hidden)
    mask = mx.array(mask[:, crop_start:].astype(np.int32))  # (B, max_length)
    states = mx.pad(states, [(0, 0), (0, max_length - states.shape[1]), (0, 0)])
    return states * mask[..., None].astype(states.dtype), mask


def encode_clip(prompts, tokenizer, model, max_length=CLIP_LENGTH):
    """Prompts -> CLIP's pooled vectors (B, hidden)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, _ = _tokenize(tokenizer, prompts, max_length, "CLIP")
    return model(mx.array(ids))


def encode_prompt(prompt, tokenizer, text_encoder, tokenizer_2, text_encoder_2):
    """The DiT's text inputs for a prompt: text_states (B, 256, 4096), text_mask (B, 256), pooled (B, 768)."""
    states, mask = encode_llama(prompt, tokenizer, text_encoder)
    return states, mask, encode_clip(prompt, tokenizer_2, text_encoder_2)


# ---------------------------------------------------------------------------------------------------
# DiT: small fused pieces
# ---------------------------------------------------------------------------------------------------
# mx.compile fuses each of these elementwise chains into one kernel per shape.

@mx.compile
def _modulate(x, shift, scale):
    """LayerNorm without affine (eps 1e-6), then adaLN: x (B, N, D); shift, scale (B, 1, D)."""
    return mx.fast.layer_norm(x, None, None, 1e-6) * (1 + scale) + shift


@mx.compile
def _gated(x, gate, y):
    """Gated residual: x + gate * y, gate (B, 1, D)."""
    return x + gate * y


@mx.compile
def _rope(x, cos, sin):
    """Rotate ADJACENT pairs (x[2i], x[2i+1]) by angle i, in float32 like the reference.

    x (B, heads, N, head_dim); cos, sin (N, head_dim/2)."""
    xf = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)  # (B, heads, N, head_dim/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _heads(x, n_proj, heads):
    """(B, N, n_proj*D) projections -> n_proj arrays (B, heads, N, head_dim)."""
    B, N, _ = x.shape
    x = x.reshape(B, N, n_proj, heads, -1).transpose(2, 0, 3, 1, 4)  # (n_proj, B, heads, N, head_dim)
    return [x[i] for i in range(n_proj)]


def _attention(q, k, v, mask):
    """q, k, v (B, heads, N, head_dim); mask None or bool (B, 1, 1|N, N), True = attend -> (B, N, D)."""
    B, H, N, Dh = q.shape
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=Dh ** -0.5, mask=mask)
    return o.transpose(0, 2, 1, 3).reshape(B, N, H * Dh)  # (B, heads, N, hd) -> (B, N, D)


def _timestep_freqs(t, dtype, dim=256, max_period=10000.0):
    """Sinusoidal embedding [cos | sin] of t (B,), computed in float32 and then cast, as the reference."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]  # (B, half)
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1).astype(dtype)


@lru_cache(maxsize=16)
def _rope_table(grid, axes_dim, theta, n_text):
    """cos, sin (N_video + n_text, head_dim/2) float32 for the patchified grid (t, h, w).

    Each axis gets its own slice of the head: angles = position * theta^(-2i/dim_axis), axes
    concatenated [t | h | w], positions in the token order (t, h, w). Computed in float32 as the
    reference does. The text rows are the identity rotation (cos 1, sin 0), so that the single-stream
    blocks rotate [video ; text] in one pass and leave the text untouched."""
    coords = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in grid], indexing="ij")
    angles = []
    for pos, d in zip(coords, axes_dim):
        freqs = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
        angles.append(np.outer(pos.reshape(-1), freqs).astype(np.float32))  # (N_video, d/2)
    angles = np.concatenate(angles, axis=1)
    cos = np.concatenate([np.cos(angles), np.ones((n_text, angles.shape[1]), np.float32)])
    sin = np.concatenate([np.sin(angles), np.zeros((n_text, angles.shape[1]), np.float32)])
    return mx.array(cos), mx.array(sin)


# ---------------------------------------------------------------------------------------------------
# DiT: embedders
# ---------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = patch, written as a Linear over flattened channels-last patches.
    The checkpoint's conv weight (D, C, pt, ph, pw) is stored as (D, pt*ph*pw*C) at load."""

    def __init__(self, in_channels, dim, patch):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(in_channels * patch[0] * patch[1] * patch[2], dim)

    def __call__(self, x):
        B, T, H, W, C = x.shape
        pt, ph, pw = self.patch
        x = x.reshape(B, T // pt, pt, H // ph, ph, W // pw, pw, C)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # (B, T', H', W', pt, ph, pw, C)
        return self.proj(x.reshape(B, -1, pt * ph * pw * C))  # (B, T'*H'*W', D)


class TimestepEmbedder(nn.Module):
    """256-d sinusoid -> Linear -> SiLU -> Linear (Tencent's mlp.0 / mlp.2)."""

    def __init__(self, dim):
        super().__init__()
        self.mlp = [nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim)]

    def __call__(self, t, dtype):
        x = _timestep_freqs(t, dtype)
        for layer in self.mlp:
            x = layer(x)
        return x


class MLPEmbedder(nn.Module):
    """vector_in: the CLIP pooled vector -> Linear -> SiLU -> Linear."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim)
        self.out_layer = nn.Linear(dim, dim)

    def __call__(self, x):
        return self.out_layer(nn.silu(self.in_layer(x)))


class TextProjection(nn.Module):
    """The token refiner's pooled-text embedder (same shape as MLPEmbedder, other names)."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x):
        return self.linear_2(nn.silu(self.linear_1(x)))


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = act

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Modulation(nn.Module):
    """adaLN: SiLU -> Linear(D, n*D) of the conditioning vector, split into n (B, 1, D) pieces."""

    def __init__(self, dim, n):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def __call__(self, vec):
        return mx.split(self.linear(nn.silu(vec))[:, None], self.n, axis=-1)


# ---------------------------------------------------------------------------------------------------
# DiT: token refiner (txt_in)
# ---------------------------------------------------------------------------------------------------
# The LLM's states (B, L, 4096) are projected to D and refined by 2 small transformer blocks among the
# valid text tokens, conditioned on the timestep and the mask-weighted mean of the raw states.

class RefinerBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn_qkv = nn.Linear(dim, 3 * dim)
        self.self_attn_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), nn.silu)
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(dim, 2 * dim)]  # Tencent: Sequential(SiLU, Linear)

    def __call__(self, x, c, mask):
        gate_msa, gate_mlp = mx.split(self.adaLN_modulation[1](nn.silu(c))[:, None], 2, axis=-1)
        q, k, v = _heads(self.self_attn_qkv(self.norm1(x)), 3, self.heads)
        x = _gated(x, gate_msa, self.self_attn_proj(_attention(q, k, v, mask)))
        return _gated(x, gate_mlp, self.mlp(self.norm2(x)))


class TokenRefiner(nn.Module):
    def __init__(self, text_dim, dim, heads, num_layers, mlp_ratio=4.0):
        super().__init__()
        self.input_embedder = nn.Linear(text_dim, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.c_embedder = TextProjection(text_dim, dim)
        # a plain dict keeps Tencent's key path individual_token_refiner.blocks.N
        self.individual_token_refiner = {"blocks": [RefinerBlock(dim, heads, mlp_ratio) for _ in range(num_layers)]}

    def __call__(self, x, timestep, mask):
        """x (B, L, text_dim) in the compute dtype; mask (B, L) bool numpy, True = valid."""
        m = mx.array(mask.astype(np.float32))[..., None]  # (B, L, 1)
        pooled = ((x.astype(mx.float32) * m).sum(axis=1) / m.sum(axis=1)).astype(x.dtype)  # (B, text_dim)
        c = self.t_embedder(timestep, x.dtype) + self.c_embedder(pooled)
        x = self.input_embedder(x)
        # valid queries see valid keys; key 0 stays visible so that a fully padded row is not empty
        keys = mask.copy()
        keys[:, 0] = True
        attn_mask = None if keys.all() else mx.array(keys)[:, None, None, :]  # (B, 1, 1, L)
        for block in self.individual_token_refiner["blocks"]:
            x = block(x, c, attn_mask)
        return x


# ---------------------------------------------------------------------------------------------------
# DiT: double-stream and single-stream blocks
# ---------------------------------------------------------------------------------------------------

class DoubleBlock(nn.Module):
    """Video and text keep their own weights (img_* / txt_*) and meet in one joint attention."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(dim, 6))
            setattr(self, f"{s}_attn_qkv", nn.Linear(dim, 3 * dim))
            setattr(self, f"{s}_attn_q_norm", nn.RMSNorm(head_dim, eps=1e-6))
            setattr(self, f"{s}_attn_k_norm", nn.RMSNorm(head_dim, eps=1e-6))
            setattr(self, f"{s}_attn_proj", nn.Linear(dim, dim))
            setattr(self, f"{s}_mlp", MLP(dim, int(dim * mlp_ratio), nn.gelu_approx))

    def _qkv(self, s, x, shift, scale):
        q, k, v = _heads(getattr(self, f"{s}_attn_qkv")(_modulate(x, shift, scale)), 3, self.heads)
        return getattr(self, f"{s}_attn_q_norm")(q), getattr(self, f"{s}_attn_k_norm")(k), v

    def _rest(self, s, x, attn, mod):
        """Attention output projection and MLP, both gated, for stream s."""
        _, _, gate1, shift2, scale2, gate2 = mod
        x = _gated(x, gate1, getattr(self, f"{s}_attn_proj")(attn))
        return _gated(x, gate2, getattr(self, f"{s}_mlp")(_modulate(x, shift2, scale2)))

    def __call__(self, img, txt, vec, rope, mask):
        """img (B, Ni, D), txt (B, Nt, D), vec (B, D); rope = (cos, sin) for the Ni video tokens."""
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        qi, ki, vi = self._qkv("img", img, img_mod[0], img_mod[1])
        qi, ki = _rope(qi, *rope), _rope(ki, *rope)  # RoPE on video only
        qt, kt, vt = self._qkv("txt", txt, txt_mod[0], txt_mod[1])
        attn = _attention(mx.concatenate([qi, qt], axis=2), mx.concatenate([ki, kt], axis=2),
                          mx.concatenate([vi, vt], axis=2), mask)  # over [video ; text]
        n = img.shape[1]
        return self._rest("img", img, attn[:, :n], img_mod), self._rest("txt", txt, attn[:, n:], txt_mod)


class SingleBlock(nn.Module):
    """One stream over [video ; text]: linear1 -> [q | k | v | mlp], linear2 over [attn | gelu(mlp)]."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.dim = dim
        self.linear1 = nn.Linear(dim, 3 * dim + int(dim * mlp_ratio))
        self.linear2 = nn.Linear(dim + int(dim * mlp_ratio), dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.modulation = Modulation(dim, 3)

    def __call__(self, x, vec, rope, mask):
        """x (B, Ni + Nt, D); rope covers all tokens, identity on the text rows."""
        shift, scale, gate = self.modulation(vec)
        h = self.linear1(_modulate(x, shift, scale))  # (B, N, 3D + mlp)
        q, k, v = _heads(h[..., : 3 * self.dim], 3, self.heads)
        q, k = _rope(self.q_norm(q), *rope), _rope(self.k_norm(k), *rope)
        attn = _attention(q, k, v, mask)
        return _gated(x, gate, self.linear2(mx.concatenate([attn, nn.gelu_approx(h[..., 3 * self.dim:])], axis=-1)))


class FinalLayer(nn.Module):
    def __init__(self, dim, out_features):
        super().__init__()
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(dim, 2 * dim)]  # Tencent order: shift, scale

    def __call__(self, x, vec):
        shift, scale = mx.split(self.adaLN_modulation[1](nn.silu(vec))[:, None], 2, axis=-1)
        return self.linear(_modulate(x, shift, scale))


# ---------------------------------------------------------------------------------------------------
# DiT: the model
# ---------------------------------------------------------------------------------------------------

class HunyuanVideoTransformer(nn.Module):
    """HYVideo-T/2-cfgdistill. The defaults are the real model; tests build smaller ones by keyword.
    The keywords are diffusers' config names, so a diffusers config.json passes straight through."""

    def __init__(self, in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                 num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
                 patch_size_t=1, guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                 rope_theta=256.0, rope_axes_dim=(16, 56, 56)):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        if sum(rope_axes_dim) != attention_head_dim or any(d % 2 for d in rope_axes_dim):
            raise HunyuanVideoError(f"rope_axes_dim {tuple(rope_axes_dim)} must be even numbers adding up to "
                                    f"the head width {attention_head_dim}.")
        self.patch = (patch_size_t, patch_size, patch_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.rope_axes_dim = tuple(rope_axes_dim)
        self.rope_theta = float(rope_theta)
        self.img_in = PatchEmbed(in_channels, dim, self.patch)
        self.txt_in = TokenRefiner(text_embed_dim, dim, num_attention_heads, num_refiner_layers)  # its MLP: always 4x
        self.time_in = TimestepEmbedder(dim)
        self.vector_in = MLPEmbedder(pooled_projection_dim, dim)
        if guidance_embeds:
            self.guidance_in = TimestepEmbedder(dim)
        self.double_blocks = [DoubleBlock(dim, num_attention_heads, mlp_ratio) for _ in range(num_layers)]
        self.single_blocks = [SingleBlock(dim, num_attention_heads, mlp_ratio) for _ in range(num_single_layers)]
        self.final_layer = FinalLayer(dim, out_channels * self.patch[0] * self.patch[1] * self.patch[2])

    # --low-memory: `stream` (set by load_transformer) gives a block's weights freshly read from disk; they are
    # evaluated with the block and dropped after it. `eval_per_block` evaluates the activations block by block.
    stream = None
    eval_per_block = False

    @property
    def dtype(self):
        return self.img_in.proj.weight.dtype

    def _run(self, kind, i, block, *args):
        """Call one block; with --low-memory, evaluate its output, and (streaming) read its weights just
        before and drop them just after."""
        if self.stream:
            block.update(self.stream(kind, i))
        out = block(*args)
        if self.stream or self.eval_per_block:
            mx.eval(out)
        if self.stream:
            block.update(self.stream(kind, i))  # fresh and unevaluated: the weights just used are freed
        return out

    def __call__(self, latents, timestep, text_states, text_mask, pooled, guidance=None):
        """latents (B, T, H, W, C); timestep (B,) in 0..1000; text_states (B, L, text_dim);
        text_mask (B, L), 1 = valid; pooled (B, pooled_dim); guidance (B,) already x1000, or None for
        a checkpoint without a guidance embedding. Returns the velocity (B, T, H, W, C), model dtype."""
        B, T, H, W, C = latents.shape
        pt, ph, pw = self.patch
        if T % pt or H % ph or W % pw:
            raise HunyuanVideoError(f"latent size {T}x{H}x{W} (frames x height x width) must be a multiple of "
                                    f"the patch {pt}x{ph}x{pw}: use a video height and width divisible by 16.")
        if "guidance_in" in self and guidance is None:
            raise HunyuanVideoError("this checkpoint embeds the guidance scale: pass guidance (B,), the scale x 1000.")
        dtype = self.dtype
        # Text padding. The reference keeps all L slots and masks keys past [video ; first count(mask)
        # text tokens]; in the refiner, keys where the mask is 0. Slots after the last valid one therefore
        # never reach a valid output, and dropping them changes nothing but the work. What is left is
        # masked only when the batch's lengths differ.
        mask = np.array(text_mask.astype(mx.float32)) > 0  # (B, L) on the host: tiny
        valid = mask.any(axis=0)
        keep = int(np.nonzero(valid)[0][-1]) + 1 if valid.any() else 1
        mask, text_states = mask[:, :keep], text_states[:, :keep]
        counts = mask.sum(axis=1)  # (B,)

        timestep = timestep.astype(mx.float32)
        vec = self.time_in(timestep, dtype)
        if "guidance_in" in self:
            vec = vec + self.guidance_in(guidance.astype(mx.float32), dtype)
        vec = vec + self.vector_in(pooled.astype(dtype))  # (B, D), summed in the reference's order
        txt = self.txt_in(text_states.astype(dtype), timestep, mask)  # (B, keep, D)
        img = self.img_in(latents.astype(dtype))  # (B, Ni, D)

        ni = img.shape[1]
        cos, sin = _rope_table((T // pt, H // ph, W // pw), self.rope_axes_dim, self.rope_theta, keep)
        attn_mask = None
        if (counts != keep).any():
            attn_mask = mx.array(np.arange(ni + keep)[None] < (ni + counts)[:, None])[:, None, None, :]  # (B,1,1,N)

        for i, block in enumerate(self.double_blocks):
            img, txt = self._run("double_blocks", i, block, img, txt, vec, (cos[:ni], sin[:ni]), attn_mask)
        x = mx.concatenate([img, txt], axis=1)  # (B, Ni + keep, D)
        for i, block in enumerate(self.single_blocks):
            x = self._run("single_blocks", i, block, x, vec, (cos, sin), attn_mask)
        x = self.final_layer(x[:, :ni], vec)  # (B, Ni, C*pt*ph*pw), channel-major

        x = x.reshape(B, T // pt, H // ph, W // pw, self.out_channels, pt, ph, pw)
        x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)  # (B, T', pt, H', ph, W', pw, C)
        return x.reshape(B, T, H, W, self.out_channels)


# ---------------------------------------------------------------------------------------------------
# VAE: causal 3D convolutions, resnets, up/down sampling, the mid block
# ---------------------------------------------------------------------------------------------------
# "884-16c-hy": 8x smaller in height and width, 4x fewer frames, 16 channels. Every convolution is
# causal in time: frame t sees frames <= t only, so the first frame is encoded on its own (an image).
# Channels-last throughout: (B, T, H, W, C). Conv weights are MLX's (O, kt, kh, kw, I); the checkpoints'
# PyTorch (O, I, kt, kh, kw) is transposed once at load.

class CausalConv3d(nn.Module):
    """Replicate-pad H and W by k//2 on both sides and T by k-1 in front only, then convolve unpadded."""

    def __init__(self, cin, cout, kernel=3, stride=(1, 1, 1)):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride)

    def __call__(self, x):
        k = self.kernel
        if k > 1:
            x = mx.pad(x, [(0, 0), (k - 1, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)], mode="edge")
        return self.conv(x)


def _nearest(x, ft, fh, fw):
    """Nearest-neighbour upsampling by integer factors: (B, T, H, W, C) -> (B, ft*T, fh*H, fw*W, C)."""
    B, T, H, W, C = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :, None], (B, T, ft, H, fh, W, fw, C))
    return x.reshape(B, T * ft, H * fh, W * fw, C)


class Upsample(nn.Module):
    """Frame 0 is upsampled in space only; later frames in time too (T -> 2T - 1 when ft = 2)."""

    def __init__(self, channels, factor):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels, 3)

    def __call__(self, x):
        ft, fh, fw = self.factor
        first = _nearest(x[:, :1], 1, fh, fw)
        if x.shape[1] > 1:
            first = mx.concatenate([first, _nearest(x[:, 1:], ft, fh, fw)], axis=1)
        return self.conv(first)


class Downsample(nn.Module):
    def __init__(self, channels, stride):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride)

    def __call__(self, x):
        return self.conv(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6, pytorch_compatible=True)
        self.conv1 = CausalConv3d(cin, cout, 3)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6, pytorch_compatible=True)
        self.conv2 = CausalConv3d(cout, cout, 3)
        if cin != cout:
            self.conv_shortcut = CausalConv3d(cin, cout, 1)

    def __call__(self, x):
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        return h + (self.conv_shortcut(x) if "conv_shortcut" in self else x)


class VAEAttention(nn.Module):
    """Single-head self-attention over all T*H*W positions, each frame seeing itself and earlier frames."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6, pytorch_compatible=True)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x):
        B, T, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, T * H * W, C)  # one head over (t, h, w) positions
        frame = mx.arange(T * H * W) // (H * W)
        causal = frame[None, :] <= frame[:, None]  # (N, N): key frame <= query frame
        o = mx.fast.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h), scale=C ** -0.5,
                                                 mask=causal)
        return x + self.to_out[0](o).reshape(B, T, H, W, C)


class MidBlock(nn.Module):
    def __init__(self, channels, groups, attention=True):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)]
        self.attentions = [VAEAttention(channels, groups)] if attention else []

    def __call__(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


def _vae_factors(n_blocks, spatial_ratio, temporal_ratio):
    """(ft, fh, fw) of each level's down- (or up-) sampler, None where it has none: the first
    log2(spatial) levels halve H and W, the levels just before the last one halve T too."""
    n_space, n_time = int(math.log2(spatial_ratio)), int(math.log2(temporal_ratio))
    factors = []
    for i in range(n_blocks):
        s = i < n_space
        t = n_blocks - 1 - n_time <= i < n_blocks - 1
        factors.append((2 if t else 1, 2 if s else 1, 2 if s else 1) if s or t else None)
    return factors


class VAEEncoder(nn.Module):
    def __init__(self, cin, latent, block_out, layers, groups, spatial_ratio, temporal_ratio, attention):
        super().__init__()
        self.conv_in = CausalConv3d(cin, block_out[0], 3)
        self.down_blocks = []
        prev = block_out[0]
        for cout, factor in zip(block_out, _vae_factors(len(block_out), spatial_ratio, temporal_ratio)):
            block = nn.Module()
            block.resnets = [ResnetBlock(prev if j == 0 else cout, cout, groups) for j in range(layers)]
            if factor:
                block.downsamplers = [Downsample(cout, factor)]
            self.down_blocks.append(block)
            prev = cout
        self.mid_block = MidBlock(block_out[-1], groups, attention)
        self.conv_norm_out = nn.GroupNorm(groups, block_out[-1], eps=1e-6, pytorch_compatible=True)
        self.conv_out = CausalConv3d(block_out[-1], 2 * latent, 3)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            for layer in block.resnets + block.get("downsamplers", []):
                x = layer(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class VAEDecoder(nn.Module):
    def __init__(self, latent, cout, block_out, layers, groups, spatial_ratio, temporal_ratio, attention):
        super().__init__()
        self.conv_in = CausalConv3d(latent, block_out[-1], 3)
        self.mid_block = MidBlock(block_out[-1], groups, attention)
        self.up_blocks = []
        prev = block_out[-1]
        for c, factor in zip(block_out[::-1], _vae_factors(len(block_out), spatial_ratio, temporal_ratio)):
            block = nn.Module()
            block.resnets = [ResnetBlock(prev if j == 0 else c, c, groups) for j in range(layers + 1)]
            if factor:
                block.upsamplers = [Upsample(c, factor)]
            self.up_blocks.append(block)
            prev = c
        self.conv_norm_out = nn.GroupNorm(groups, block_out[0], eps=1e-6, pytorch_compatible=True)
        self.conv_out = CausalConv3d(block_out[0], cout, 3)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            for layer in block.resnets + block.get("upsamplers", []):
                x = layer(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


# ---------------------------------------------------------------------------------------------------
# VAE: the model, with tiled decode and encode
# ---------------------------------------------------------------------------------------------------
# Tiling follows the reference exactly, so that the same tiles and strides give the same video: the clip
# is cut in time into chunks of tile_t (+1 causal context) frames every stride_t frames; each chunk, if
# larger than a tile in space, into tile_h x tile_w tiles every stride_h x stride_w; the overlaps are
# blended linearly, each tile with its already-blended neighbours above, to the left and before it.
# Each tile is evaluated before the next one starts, so the peak memory is set by the tile.

DEFAULT_VAE_TILE = (16, 256, 256)  # (frames, height, width) in pixels, the reference's defaults
DEFAULT_VAE_STRIDE = (12, 192, 192)


def _tile_settings(tile, stride):
    """Check tile and stride (frames, height, width); stride defaults to 3/4 of the tile, as the reference's."""
    stride = tuple(stride) if stride is not None else tuple(3 * n // 4 for n in tile)
    if len(tile) != 3 or len(stride) != 3 or not all(0 < s <= t for s, t in zip(stride, tile)):
        raise HunyuanVideoError(f"VAE tile {tuple(tile)} and stride {stride} must each be (frames, height, width) "
                                f"with 0 < stride <= tile, e.g. tile {DEFAULT_VAE_TILE}, stride {DEFAULT_VAE_STRIDE}.")
    return tuple(tile), stride


def _blend(a, b, extent, axis):
    """b's first `extent` slices along axis fade in from a's last ones: a*(1 - i/extent) + b*(i/extent)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    w = (mx.arange(extent, dtype=mx.float32) / extent).reshape(shape).astype(b.dtype)
    a_end = mx.take(a, mx.arange(a.shape[axis] - extent, a.shape[axis]), axis=axis)
    b_start, b_rest = mx.split(b, [extent], axis=axis)
    return mx.concatenate([a_end * (1 - w) + b_start * w, b_rest], axis=axis)


def _tiled_space(fn, x, tile, stride, blend, keep, out_hw):
    """fn over tile x tile windows of x (B, T, H, W, C) every stride, blended and cropped to keep each."""
    rows, prev = [], None
    for i in range(0, x.shape[2], stride[0]):
        row = []
        for j in range(0, x.shape[3], stride[1]):
            t = fn(x[:, :, i:i + tile[0], j:j + tile[1]])
            if prev is not None:
                t = _blend(prev[len(row)], t, blend[0], axis=2)
            if row:
                t = _blend(row[-1], t, blend[1], axis=3)
            mx.eval(t)
            row.append(t)
        rows.append(mx.concatenate([t[:, :, :keep[0], :keep[1]] for t in row], axis=3))
        prev = row
    return mx.concatenate(rows, axis=2)[:, :, :out_hw[0], :out_hw[1]]


def _tiled_time(fn, x, tile, stride, blend, keep, out_t):
    """fn over chunks x[:, i : i + tile + 1] every stride frames; chunks after the first drop their first
    output frame (the causal context), fade in from the previous chunk and keep `keep` frames."""
    out, prev = [], None
    for n, i in enumerate(range(0, x.shape[1], stride)):
        t = fn(x[:, i:i + tile + 1])
        if n:
            t = _blend(prev, t[:, 1:], blend, axis=1)
        mx.eval(t)
        out.append(t[:, :keep + (0 if n else 1)])
        prev = t
    return mx.concatenate(out, axis=1)[:, :out_t]


class HunyuanVideoVAE(nn.Module):
    """AutoencoderKLHunyuanVideo. The defaults are the real model; keywords are diffusers' config names."""

    def __init__(self, in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, norm_num_groups=32, scaling_factor=0.476986, spatial_compression_ratio=8,
                 temporal_compression_ratio=4, mid_block_add_attention=True):
        super().__init__()
        if temporal_compression_ratio != 4:
            raise HunyuanVideoError(f"temporal_compression_ratio {temporal_compression_ratio}: the HunyuanVideo "
                                    f"VAE compresses time by 4; use its own config.")
        args = (tuple(block_out_channels), layers_per_block, norm_num_groups, spatial_compression_ratio,
                temporal_compression_ratio, mid_block_add_attention)
        self.encoder = VAEEncoder(in_channels, latent_channels, *args)
        self.decoder = VAEDecoder(latent_channels, out_channels, *args)
        self.quant_conv = nn.Conv3d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(latent_channels, latent_channels, 1)
        self.scaling_factor = scaling_factor
        self.ratio = (temporal_compression_ratio, spatial_compression_ratio)

    @property
    def dtype(self):
        return self.post_quant_conv.weight.dtype

    def _decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def _encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, z, tile=None, stride=None):
        """z (B, t, h, w, latent), already divided by scaling_factor -> video (B, 4(t-1)+1, 8h, 8w, 3) in
        about [-1, 1], model dtype. tile and stride, (frames, height, width) in pixels, tile it as the
        reference does with the same settings (stride defaults to 3/4 of the tile); tile=None decodes in one
        piece, with no splitting in time either."""
        z = z.astype(self.dtype)
        if tile is None:
            return self._decode(z)
        (ft, fh, fw), (st, sh, sw) = _tile_settings(tile, stride)
        rt, rs = self.ratio
        t = z.shape[1]

        def space(z):
            if z.shape[2] > fh // rs or z.shape[3] > fw // rs:
                out_hw = (z.shape[2] * rs, z.shape[3] * rs)
                return _tiled_space(self._decode, z, (fh // rs, fw // rs), (sh // rs, sw // rs), (fh - sh, fw - sw),
                                    (sh, sw), out_hw)
            return self._decode(z)

        if t > ft // rt:
            return _tiled_time(space, z, ft // rt, st // rt, ft - st, st, (t - 1) * rt + 1)
        return space(z)

    def encode(self, x, tile=None, stride=None):
        """video (B, F, H, W, 3) in [-1, 1] -> posterior mean (B, (F-1)/4+1, H/8, W/8, latent), unscaled.
        tile and stride as in decode, in pixels."""
        x = x.astype(self.dtype)
        if tile is None:
            h = self._encode(x)
        else:
            (ft, fh, fw), (st, sh, sw) = _tile_settings(tile, stride)
            rt, rs = self.ratio

            def space(x):
                if x.shape[2] > fh or x.shape[3] > fw:
                    out_hw = (x.shape[2] // rs, x.shape[3] // rs)
                    return _tiled_space(self._encode, x, (fh, fw), (sh, sw), (fh // rs - sh // rs, fw // rs - sw // rs),
                                        (sh // rs, sw // rs), out_hw)
                return self._encode(x)

            F = x.shape[1]
            if F > ft:
                h = _tiled_time(space, x, ft, st, ft // rt - st // rt, st // rt, (F - 1) // rt + 1)
            else:
                h = space(x)
        return h[..., : h.shape[-1] // 2]  # the posterior's mean; the other half is its log-variance


# ---------------------------------------------------------------------------------------------------
# Quantization: the DiT's blocks and the LLM, with MLX's quantized kernels
# ---------------------------------------------------------------------------------------------------
# int8 and int4 are affine (a scale and a bias per 64 weights). fp8 is MLX's mxfp8: E4M3 values, the
# format of Tencent's own fp8 checkpoint, sharing a power-of-two scale per 32 weights (E5M2's two mantissa
# bits are too coarse for weights). Quantized: the Linear layers of the DiT's double and single blocks, and
# every Linear layer of the LLM. Kept in the checkpoint's precision: embeddings and embedders, norms, the
# token refiner, the final layer, CLIP, the VAE, the DiT's adaLN modulation unless asked (it is 3.4 of the
# 12.8B parameters, but it sets every token's scale, shift and gate), and any layer whose input width is not
# a multiple of the group size.

QUANTIZATIONS = {"int8": dict(mode="affine", bits=8, group_size=64),
                 "int4": dict(mode="affine", bits=4, group_size=64),
                 "fp8": dict(mode="mxfp8", bits=8, group_size=32)}


def quantize(model, quantization, modulation=False, prefix=""):
    """Quantize model's large Linear layers in place: a HunyuanVideoTransformer (or one of its blocks, prefix
    being its path) or a LlamaTextEncoder. Lazy, like everything in MLX: a weight is quantized when evaluated."""
    if quantization not in QUANTIZATIONS:
        raise HunyuanVideoError(f"quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}.")
    spec = QUANTIZATIONS[quantization]
    dit = isinstance(model, (HunyuanVideoTransformer, DoubleBlock, SingleBlock))

    def wanted(path, module):
        path = prefix + path
        if not isinstance(module, nn.Linear) or module.weight.shape[1] % spec["group_size"]:
            return False
        if dit:
            return path.startswith(("double_blocks.", "single_blocks.")) and (
                modulation or not path.endswith(("_mod.linear", "modulation.linear")))
        return True

    nn.quantize(model, class_predicate=wanted, **spec)
    model.quantization, model.quantized_modulation = quantization, modulation
    return model


def _quantization_record(model):
    """What config.json says of a quantized model, so that it loads without quantizing again."""
    q = getattr(model, "quantization", None)
    return {"quantization": q, "quantized_modulation": model.quantized_modulation, **QUANTIZATIONS[q]} if q else {}


# ---------------------------------------------------------------------------------------------------
# Loading: files
# ---------------------------------------------------------------------------------------------------

def _read_safetensors(f):
    try:
        return mx.load(str(f))
    except Exception as e:  # MLX checks the header and that every tensor lies inside the file
        raise HunyuanVideoError(f"{f} could not be read as safetensors ({e}); it is probably truncated or "
                                f"corrupt: download it again.") from None


def _torch_to_mx(t):
    import torch

    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the bits
        return mx.array(t.contiguous().view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.contiguous().numpy())


def _read_pt(f):
    """A PyTorch pickle, opened only with weights_only=True (no code runs); state dict under 'module'."""
    try:
        import torch
    except ImportError:
        raise HunyuanVideoError(f"{f} is a PyTorch pickle: install torch (pip install torch) to read it safely, "
                                f"or use a .safetensors checkpoint.") from None
    try:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) serialization cannot be memory-mapped
            sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HunyuanVideoError(f"{f} could not be read as a weights-only PyTorch checkpoint "
                                f"({str(e).splitlines()[0]}); it may be truncated or corrupt: download it again.") from None
    for key in ("module", "state_dict"):  # Tencent's DiT nests under 'module'; training files under 'state_dict'
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise HunyuanVideoError(f"{f} holds no state dict: pass a HunyuanVideo checkpoint.")
    fp8 = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.dtype == torch.float8_e4m3fn]
    if fp8:  # Tencent's fp8 DiT: W = W_fp8 * scale, one scale per layer in <name>_map.pt, as Tencent computes it
        scales_file = f.with_name(f.stem + "_map.pt")
        if not scales_file.exists():
            raise HunyuanVideoError(f"{f} holds fp8 weights whose scales are in {scales_file.name}, which is not "
                                    f"beside it: download it too.")
        scales = torch.load(scales_file, map_location="cpu", weights_only=True)
        for k in fp8:
            scale = scales[k.removesuffix(".weight")].to(torch.bfloat16)
            sd[k] = sd[k].to(torch.bfloat16) * scale
    return {k: _torch_to_mx(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _read_weights(path, hint):
    """All tensors of a checkpoint file or folder, and the folder's config.json (or {}). hint: what to pass."""
    path = Path(path).expanduser()
    if not path.exists():
        raise HunyuanVideoError(f"{path} does not exist: {hint}.")
    config = {}
    if path.is_dir():
        if (path / "config.json").exists():
            try:
                config = json.loads((path / "config.json").read_text())
            except ValueError as e:
                raise HunyuanVideoError(f"{path / 'config.json'} is not valid JSON ({e}): download it again.") from None
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).exists()]
            if missing:
                raise HunyuanVideoError(f"{path} lacks {len(missing)} of the {len(shards)} shards its index lists "
                                        f"({', '.join(missing[:3])}): the download is incomplete; download it again.")
            files = [path / s for s in shards]
        else:
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("mp_rank_00_model_states.pt")) \
                or sorted(path.glob("*.pt"))
        if not files:
            raise HunyuanVideoError(f"{path} holds no .safetensors or .pt weights: {hint}.")
        if len(files) > 1 and files[0].suffix == ".pt":
            raise HunyuanVideoError(f"{path} holds several .pt files ({', '.join(f.name for f in files[:3])}): "
                                    f"pass the one to load.")
    else:
        files = [path]
    weights = {}
    for f in files:
        if f.suffix == ".safetensors":
            weights.update(_read_safetensors(f))
        elif f.suffix in (".pt", ".pth", ".bin"):
            weights.update(_read_pt(f))
        else:
            raise HunyuanVideoError(f"{f} is neither .safetensors nor .pt: {hint}.")
    return weights, config


# ---------------------------------------------------------------------------------------------------
# Loading: layouts
# ---------------------------------------------------------------------------------------------------
# diffusers -> Tencent names, scope by scope: (diffusers scope, Tencent scope, {diffusers module: Tencent
# module}), {} standing for a block index. A tuple of diffusers modules is fused, in that row order, into
# one Tencent module. This is the
# inverse of diffusers' convert_hunyuan_video_transformer_to_diffusers, against which the tests check it.

_FROM_DIFFUSERS = [
    ("transformer_blocks.{}", "double_blocks.{}", {
        "norm1.linear": "img_mod.linear", "norm1_context.linear": "txt_mod.linear",
        ("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn_qkv",
        ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn_qkv",
        "attn.norm_q": "img_attn_q_norm", "attn.norm_k": "img_attn_k_norm",
        "attn.norm_added_q": "txt_attn_q_norm", "attn.norm_added_k": "txt_attn_k_norm",
        "attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj",
        "ff.net.0.proj": "img_mlp.fc1", "ff.net.2": "img_mlp.fc2",
        "ff_context.net.0.proj": "txt_mlp.fc1", "ff_context.net.2": "txt_mlp.fc2"}),
    ("single_transformer_blocks.{}", "single_blocks.{}", {
        ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"): "linear1", "proj_out": "linear2",
        "attn.norm_q": "q_norm", "attn.norm_k": "k_norm", "norm.linear": "modulation.linear"}),
    ("context_embedder.token_refiner.refiner_blocks.{}", "txt_in.individual_token_refiner.blocks.{}", {
        "norm1": "norm1", "norm2": "norm2", ("attn.to_q", "attn.to_k", "attn.to_v"): "self_attn_qkv",
        "attn.to_out.0": "self_attn_proj", "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2",
        "norm_out.linear": "adaLN_modulation.1"}),
    ("context_embedder", "txt_in", {
        "proj_in": "input_embedder",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "c_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2": "c_embedder.linear_2"}),
    ("", "", {
        "x_embedder.proj": "img_in.proj",
        "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "norm_out.linear": "final_layer.adaLN_modulation.1",  # halves swapped below
        "proj_out": "final_layer.linear"}),
]


def _match_scope(scope, key):
    """key = scope (with {} for a block index) + module + .weight|.bias -> groups (*index, module, param)."""
    pattern = re.escape(scope).replace(r"\{\}", r"(\d+)") + r"\." if scope else ""
    return re.fullmatch(pattern + r"(.+)\.(weight|bias)", key)


def _from_diffusers(sd):
    """Rename (and fuse) a diffusers state dict to Tencent's names. Keys it does not know keep their name,
    so that the strict check reports them."""
    out, groups = {}, {}  # groups: fused Tencent key -> {diffusers module: tensor}
    for key, value in sd.items():
        for scope, target, table in _FROM_DIFFUSERS:
            m = _match_scope(scope, key)
            if not m:
                continue
            *idx, module, param = m.groups()
            prefix = target.format(*idx) + "." if target else ""
            for src, dst in table.items():
                parts = src if isinstance(src, tuple) else (src,)
                if module in parts:
                    break
            else:
                continue
            if isinstance(src, tuple):
                groups.setdefault((prefix + dst + "." + param, src), {})[module] = value
            else:
                out[prefix + dst + "." + param] = value
            break
        else:
            out[key] = value
    for (key, parts), found in groups.items():
        if len(found) == len(parts):
            out[key] = mx.concatenate([found[p] for p in parts], axis=0)
        else:  # incomplete: leave the pieces under names the strict check will report
            out.update({f"{key} (part {p})": v for p, v in found.items()})
    for param in ("weight", "bias"):  # diffusers' final modulation is (scale, shift); Tencent's (shift, scale)
        key = f"final_layer.adaLN_modulation.1.{param}"
        if key in out:
            scale, shift = mx.split(out[key], 2, axis=0)
            out[key] = mx.concatenate([shift, scale], axis=0)
    return out


def _to_diffusers(sd):
    """Tencent names -> diffusers names, splitting the fused tensors: the inverse of _from_diffusers."""
    out = {}
    dim = sd["img_in.proj.weight"].shape[0]
    for key, value in sd.items():
        if key.startswith("final_layer.adaLN_modulation.1."):  # (shift, scale) -> (scale, shift)
            value = mx.concatenate(mx.split(value, 2, axis=0)[::-1], axis=0)
        for scope, target, table in _FROM_DIFFUSERS:
            m = _match_scope(target, key)
            dst = next((src for src, t in table.items() if m and t == m.groups()[-2]), None)
            if dst is None:
                continue
            *idx, _, param = m.groups()
            prefix = scope.format(*idx) + "." if scope else ""
            if isinstance(dst, tuple):  # q | k | v (| mlp): dim rows each, the MLP takes the rest
                cuts = [dim * (i + 1) for i in range(3)] if len(dst) == 4 else [dim, 2 * dim]
                out.update({f"{prefix}{d}.{param}": part for d, part in zip(dst, mx.split(value, cuts, axis=0))})
            else:
                out[f"{prefix}{dst}.{param}"] = value
            break
        else:
            out[key] = value
    return out


def _strip_prefix(sd):
    """ComfyUI and other single files may prefix every key (model.diffusion_model., ...)."""
    for prefix in ("model.diffusion_model.", "diffusion_model.", "model.", "first_stage_model."):
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _count(sd, prefix):
    idx = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"\.(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def _transformer_shapes(sd):
    """The DiT's constructor keywords, read off its tensors' shapes (Tencent names)."""
    dim, cin, pt, ph, pw = sd["img_in.proj.weight"].shape
    head_dim = sd.get("double_blocks.0.img_attn_q_norm.weight", sd.get("single_blocks.0.q_norm.weight")).shape[0]
    fc1 = sd.get("double_blocks.0.img_mlp.fc1.weight")
    mlp = fc1.shape[0] if fc1 is not None else sd["single_blocks.0.linear1.weight"].shape[0] - 3 * dim
    return dict(
        in_channels=cin, out_channels=sd["final_layer.linear.weight"].shape[0] // (pt * ph * pw),
        num_attention_heads=dim // head_dim, attention_head_dim=head_dim,
        num_layers=_count(sd, "double_blocks"), num_single_layers=_count(sd, "single_blocks"),
        num_refiner_layers=_count(sd, "txt_in.individual_token_refiner.blocks"), mlp_ratio=mlp / dim,
        patch_size=ph, patch_size_t=pt, guidance_embeds="guidance_in.mlp.0.weight" in sd,
        text_embed_dim=sd["txt_in.input_embedder.weight"].shape[1],
        pooled_projection_dim=sd["vector_in.in_layer.weight"].shape[1])


def _vae_shapes(sd):
    """The VAE's constructor keywords, read off its tensors' shapes."""
    levels = _count(sd, "encoder.down_blocks")
    return dict(
        in_channels=sd["encoder.conv_in.conv.weight"].shape[1],
        out_channels=sd["decoder.conv_out.conv.weight"].shape[0],
        latent_channels=sd["post_quant_conv.weight"].shape[0],
        block_out_channels=tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight"].shape[0]
                                 for i in range(levels)),
        layers_per_block=_count(sd, "encoder.down_blocks.0.resnets"),
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in sd)


def _sizes(cls, read, sd, config, source, what):
    """Constructor keywords: read(sd) from the tensors' shapes, then what config.json says on top."""
    try:
        sizes = read(sd)
    except (KeyError, ValueError, AttributeError):
        some = ", ".join(sorted(sd)[:3])
        raise HunyuanVideoError(f"{source} does not look like a HunyuanVideo {what} checkpoint (its keys start "
                                f"{some}): pass the {what}'s weights.") from None
    return {**sizes, **_hf_sizes(cls, config)}


def _check_class(config, expected, source, folder):
    if config.get("_class_name", expected) != expected:
        raise HunyuanVideoError(f"{source} holds a {config['_class_name']} where a {expected} was expected: pass "
                                f"the checkpoint's {folder}/ folder.")


def _load_strict(model, weights, dtype, source, prepare=None, skip=()):
    """Put weights into model, refusing any missing, unexpected or mis-shaped key in one sentence. Then
    prepare(model) (quantization, say) and evaluate one tensor at a time: the model holds the only
    references to the lazily read sources, so each is freed once used and the peak stays near the result."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = [f"{k} {tuple(weights[k].shape)} instead of {tuple(expected[k].shape)}"
                 for k in expected if k in weights and weights[k].shape != expected[k].shape]
    problems = [f"{len(names)} {what} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
                for what, names in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("mis-shaped tensors", misshaped)) if names]
    if problems:
        raise HunyuanVideoError(f"{source} does not fit the model: {'; '.join(problems)}; check that it is a "
                                f"complete checkpoint of the right model.")
    model.update(tree_unflatten(list(_cast(weights, dtype).items())))
    weights.clear()
    if prepare is not None:
        prepare(model)
    for k, p in tree_flatten(model.parameters()):
        if not k.startswith(skip):  # skipped: streamed blocks, read only when they run
            mx.eval(p)
    return model


def _cast(weights, dtype):
    """Floating tensors to dtype; quantized data (integers) as it is. Lazy."""
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def _quantized_loading(config, quantization, modulation, source):
    """(structure, prepare): quantize the model's structure before loading a converted checkpoint (its tensors
    are already quantized), or quantize the loaded weights after; None where nothing is to be done."""
    stored = config.get("quantization")
    if stored and quantization not in (None, stored):
        raise HunyuanVideoError(f"{source} is stored in {stored}; it cannot become {quantization}: convert the "
                                f"original checkpoint to {quantization} instead.")
    if stored:
        return (lambda m: quantize(m, stored, config.get("quantized_modulation", False))), None
    if quantization:
        return None, (lambda m: quantize(m, quantization, modulation))
    return None, None


# ---------------------------------------------------------------------------------------------------
# Loading: entry points
# ---------------------------------------------------------------------------------------------------

def _transformer_weights(source):
    """A transformer checkpoint's tensors under Tencent's names (lazy for safetensors), and its config."""
    weights, config = _read_weights(source, "pass the transformer/ folder of a diffusers checkpoint, or a Tencent "
                                            ".pt or ComfyUI .safetensors file")
    _check_class(config, "HunyuanVideoTransformer3DModel", source, "transformer")
    if config.get("image_condition_type"):
        raise HunyuanVideoError(f"{source} is an image-to-video variant ({config['image_condition_type']}), which "
                                f"this port does not support yet: use the text-to-video checkpoint.")
    weights = _strip_prefix(weights)
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in weights):
        weights = _from_diffusers(weights)
    return weights, config


def load_transformer(path, dtype=mx.bfloat16, quantization=None, quantize_modulation=False, stream=False, **sizes):
    """The HunyuanVideo DiT from a diffusers transformer/ folder (config.json + safetensors shards), a
    Tencent state dict (mp_rank_00_model_states.pt, its fp8 variant with the _map.pt beside it, or their
    folder), a ComfyUI single .safetensors file, or a folder written by convert_weights.py.

    quantization: None, "int8", "int4" or "fp8" (see quantize); a converted folder loads as it was stored.
    stream: leave the 60 blocks on disk and read each one when it runs (--low-memory; safetensors only).
    Sizes come from the tensors' shapes and the folder's config.json; keyword arguments override them
    (Tencent files carry no RoPE settings, for instance)."""
    source = Path(path).expanduser()
    weights, config = _transformer_weights(source)
    sizes = {**_sizes(HunyuanVideoTransformer, _transformer_shapes, weights, config, source, "transformer"),
             **sizes}
    if sizes["attention_head_dim"] != 128 and "rope_axes_dim" not in sizes:
        raise HunyuanVideoError(f"{source} has {sizes['attention_head_dim']}-wide heads and no config.json saying how "
                                f"RoPE splits them: pass rope_axes_dim=(t, h, w) to load_transformer.")
    model = HunyuanVideoTransformer(**sizes)
    structure, prepare = _quantized_loading(config, quantization, quantize_modulation, source)
    if structure:
        structure(model)
    conv = weights.get("img_in.proj.weight")
    if conv is not None and conv.ndim == 5:  # Conv3d (D, C, pt, ph, pw) -> Linear (D, pt*ph*pw*C)
        weights["img_in.proj.weight"] = conv.transpose(0, 2, 3, 4, 1).reshape(conv.shape[0], -1)
    skip = ()
    if stream:
        if source.suffix == ".pt" or not (source.is_dir() and any(source.glob("*.safetensors")) or
                                          source.suffix == ".safetensors"):
            raise HunyuanVideoError(f"{source}: streaming blocks from disk needs safetensors; convert it once with "
                                    f"convert_weights.py.")
        model.stream = _block_streamer(source, model, dtype)
        skip = ("double_blocks.", "single_blocks.")
    return _load_strict(model, weights, dtype, source, prepare, skip)


def _block_streamer(source, model, dtype):
    """stream(kind, i): block i's weights, freshly (and lazily) read from disk, cast and quantized exactly as
    load_transformer does: nothing is read until they are evaluated, and nothing stays once dropped."""
    def stream(kind, i):
        prefix = f"{kind}.{i}."
        weights, _ = _transformer_weights(source)
        w = _cast({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, dtype)
        for name, m in getattr(model, kind)[i].named_modules():
            if isinstance(m, nn.QuantizedLinear) and f"{name}.scales" not in w:  # quantize on load, as quantize()
                q = mx.quantize(w[f"{name}.weight"], group_size=m.group_size, bits=m.bits, mode=m.mode)
                w[f"{name}.weight"], w[f"{name}.scales"] = q[0], q[1]
                if m.mode == "affine":
                    w[f"{name}.biases"] = q[2]
        return tree_unflatten(list(w.items()))
    return stream


def _save_component(folder, weights, config, filename="model.safetensors"):
    """One component folder: safetensors + config.json, each written under a temporary name and renamed."""
    folder = Path(folder)
    tmp = folder / ".partial"  # MLX appends .safetensors to any name, so stage in a hidden folder
    tmp.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(tmp / filename), weights, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in (filename, "config.json"):
        (tmp / f).replace(folder / f)
    tmp.rmdir()


def _checkpoint_weights(model):
    """The DiT's tensors as checkpoints hold them: Tencent's names, the patch embedding as its Conv3d."""
    weights = dict(tree_flatten(model.parameters()))
    pt, ph, pw = model.patch
    w = weights["img_in.proj.weight"]  # Linear (D, pt*ph*pw*C) -> Conv3d (D, C, pt, ph, pw)
    weights["img_in.proj.weight"] = w.reshape(w.shape[0], pt, ph, pw, -1).transpose(0, 4, 1, 2, 3)
    return weights


def save_transformer(model, folder):
    """The DiT as one safetensors file under Tencent's names (quantized layers as MLX stores them) and a
    config.json with what the tensors cannot say (RoPE, quantization): load_transformer reads it directly."""
    _save_component(folder, _checkpoint_weights(model), {"_class_name": "HunyuanVideoTransformer3DModel", "layout": "tencent",
                                      "rope_axes_dim": list(model.rope_axes_dim), "rope_theta": model.rope_theta,
                                      "hunyuan_apple_version": __version__, **_quantization_record(model)})


def save_text_encoder(model, folder, config):
    """The LLM's used layers (quantized as they are) with its transformers config.json plus the quantization."""
    _save_component(folder, dict(tree_flatten(model.parameters())), {**config, **_quantization_record(model)})


def load_vae(path, dtype=mx.bfloat16, **sizes):
    """The HunyuanVideo VAE from a diffusers vae/ folder, Tencent's vae/pytorch_model.pt or ComfyUI's
    hunyuan_video_vae_bf16.safetensors (all three use diffusers' key names). Keywords override sizes."""
    source = Path(path).expanduser()
    weights, config = _read_weights(source, "pass the vae/ folder of a diffusers checkpoint, Tencent's "
                                            "vae/pytorch_model.pt or ComfyUI's hunyuan_video_vae_bf16.safetensors")
    if config.get("_class_name") != "AutoencoderKLCausal3D":  # Tencent's own name for the same VAE
        _check_class(config, "AutoencoderKLHunyuanVideo", source, "vae")
    if any(k.startswith("vae.") for k in weights):  # as Tencent's loader: only the vae.* part of a bigger file
        weights = {k[4:]: v for k, v in weights.items() if k.startswith("vae.")}
    weights = _strip_prefix(weights)
    model = HunyuanVideoVAE(**{**_sizes(HunyuanVideoVAE, _vae_shapes, weights, config, source, "VAE"), **sizes})
    # every source is PyTorch-layout: Conv3d (O, I, kt, kh, kw) -> MLX (O, kt, kh, kw, I)
    weights = {k: v.transpose(0, 2, 3, 4, 1) if v.ndim == 5 else v for k, v in weights.items()}
    return _load_strict(model, weights, dtype, source)


def _hf_sizes(cls, config):
    """The constructor keywords a transformers config.json gives (its names are the constructor's)."""
    return {k: config[k] for k in inspect.signature(cls).parameters if k in config and config[k] is not None}


def load_text_encoder(path, dtype=mx.bfloat16, quantization=None):
    """LLaVA-Llama-3-8B's language model from a diffusers text_encoder/ folder (transformers' LlamaModel),
    or one written by convert_weights.py. The last two layers and the final norm do not reach
    hidden_states[-3]: they are left on disk. quantization: None, "int8", "int4" or "fp8"."""
    source = Path(path).expanduser()
    weights, config = _read_weights(source, "pass the text_encoder/ folder of a diffusers HunyuanVideo checkpoint")
    if config.get("model_type") != "llama":
        raise HunyuanVideoError(f"{source} holds a {config.get('model_type', 'model without config.json')} where "
                                f"LLaVA-Llama-3's language model (model_type llama) was expected: pass text_encoder/.")
    if config.get("rope_scaling"):
        raise HunyuanVideoError(f"{source} uses rope_scaling {config['rope_scaling']}, which HunyuanVideo's text "
                                f"encoder does not: pass the checkpoint's own text_encoder/.")
    model = LlamaTextEncoder(**_hf_sizes(LlamaTextEncoder, config))
    structure, prepare = _quantized_loading(config, quantization, False, source)
    if structure:
        structure(model)
    weights = _strip_prefix(weights)
    used = len(model.layers)
    weights = {k: v for k, v in weights.items() if k not in ("norm.weight", "lm_head.weight")
               and not (k.startswith("layers.") and int(k.split(".")[1]) >= used)}
    return _load_strict(model, weights, dtype, source, prepare)


def load_clip_text_encoder(path, dtype=mx.bfloat16):
    """CLIP-L's text model from a diffusers text_encoder_2/ folder (transformers' CLIPTextModel)."""
    source = Path(path).expanduser()
    weights, config = _read_weights(source, "pass the text_encoder_2/ folder of a diffusers HunyuanVideo checkpoint")
    if config.get("model_type") not in ("clip_text_model", "clip"):
        raise HunyuanVideoError(f"{source} holds a {config.get('model_type', 'model without config.json')} where "
                                f"CLIP's text model was expected: pass text_encoder_2/.")
    config = config.get("text_config", config)  # a full CLIPModel config nests the text part
    model = CLIPTextEncoder(**_hf_sizes(CLIPTextEncoder, config))
    if any(k.startswith("text_model.") for k in weights):  # transformers 4's layout, or a whole CLIPModel
        weights = {k: v for k, v in weights.items() if k.startswith("text_model.")}
    else:  # transformers 5 saves a CLIPTextModel without the prefix
        weights = {"text_model." + k: v for k, v in weights.items()}
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}  # a buffer, not a weight
    return _load_strict(model, weights, dtype, source)


def _transformers():
    """transformers, imported for its tokenizers only: without its advice that PyTorch is missing (we never
    need PyTorch models)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    return transformers


def load_tokenizer(path):
    """A transformers tokenizer from a tokenizer/ or tokenizer_2/ folder."""
    AutoTokenizer = _transformers().AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_dir():
        raise HunyuanVideoError(f"{path} is not a folder: pass the checkpoint's tokenizer/ or tokenizer_2/ folder.")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise HunyuanVideoError(f"{path} holds no readable tokenizer ({str(e).splitlines()[0]}): download the "
                                f"checkpoint's tokenizer folders again.") from None


# ---------------------------------------------------------------------------------------------------
# Sampler: flow matching, Euler
# ---------------------------------------------------------------------------------------------------
# The DiT predicts the velocity v = d(latents)/d(sigma) from noise (sigma 1) to video (sigma 0). The
# schedule is linear in sigma, then shifted towards the noisy end; the model sees sigma x 1000 as its
# timestep. Embedded guidance (the model was distilled with it) needs one forward per step.

def flow_sigmas(steps, shift=7.0):
    """steps + 1 noise levels from 1 to 0: s' = shift*s / (1 + (shift-1)*s), in float32 like the reference."""
    s = np.linspace(1.0, 0.0, steps + 1)[:-1].astype(np.float32)
    s = shift * s / (1 + (shift - 1) * s)
    return np.append(s, np.float32(0.0)).astype(np.float32)


def timestep(sigma, batch):
    """The DiT's timestep for noise level sigma: sigma x 1000 in float32, one per video."""
    return mx.full((batch,), np.float32(sigma) * np.float32(1000), dtype=mx.float32)


def euler_step(latents, velocity, sigma, sigma_next):
    """latents + (sigma_next - sigma) * velocity, in float32."""
    return latents + float(np.float32(sigma_next) - np.float32(sigma)) * velocity.astype(mx.float32)


def check_request(height, width, num_frames, num_inference_steps=1, prompt="x"):
    """None, or one sentence naming what is wrong with a generation request and how to fix it."""
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        return f"height {height} and width {width} must be positive multiples of 16 (544 x 960 is HunyuanVideo's 540p)."
    if num_frames < 1 or (num_frames - 1) % 4:
        n = max(1, round((num_frames - 1) / 4)) * 4 + 1
        return f"{num_frames} frames: the frame count must be 4n+1 (1, 5, 9, ... 129); try {n}."
    if num_inference_steps < 1:
        return f"{num_inference_steps} steps: use at least 1 (50 is the default)."
    if not any(p.strip() for p in ([prompt] if isinstance(prompt, str) else prompt)):
        return "the prompt is empty: describe the video to generate."
    return None


# ---------------------------------------------------------------------------------------------------
# Pipeline: text to video in phases
# ---------------------------------------------------------------------------------------------------

DEFAULT_MODEL = "hunyuanvideo-community/HunyuanVideo"
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def _download(repo_id):
    """The hub checkpoint's files that the pipeline reads, fetched once (resumable, with progress)."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "scheduler/*"] + [f"{c}/*" for c in COMPONENTS]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise HunyuanVideoError(f"could not download {repo_id} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                                f"check the network and the hub id, or pass a local folder.") from None


class HunyuanVideoPipeline:
    """Prompt in, frames out, in phases that each load what they need and free it before the next: the text
    encoders (the 16 GB LLM, then CLIP), the DiT, the VAE. Weights are read when their phase starts.
    self.stats holds each phase's seconds and peak memory (GB) of the last run."""

    def __init__(self, folder, dtype=mx.bfloat16, quantization=None, quantize_modulation=False, low_memory=False):
        self.folder, self.dtype = Path(folder), dtype
        self.quantization, self.quantize_modulation, self.low_memory = quantization, quantize_modulation, low_memory
        self.stats = {}
        if low_memory:
            mx.set_cache_limit(0)  # give freed buffers back at once rather than keeping them for reuse

    @classmethod
    def from_pretrained(cls, path_or_hub_id=DEFAULT_MODEL, dtype=mx.bfloat16, quantization=None,
                        quantize_modulation=False, low_memory=False):
        """A local folder in the diffusers layout, or a hub id, downloaded on first use. quantization: None
        (as stored), "int8", "int4" or "fp8" for the DiT's blocks and the LLM (see quantize). low_memory: no
        buffer cache, activations evaluated block by block, the DiT's blocks streamed from disk (slower)."""
        folder = Path(path_or_hub_id).expanduser()
        if not folder.exists():
            if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_hub_id)) is None:
                raise HunyuanVideoError(f"{folder} does not exist: pass a HunyuanVideo folder in the diffusers layout "
                                        f"or a hub id such as {DEFAULT_MODEL}.")
            folder = _download(path_or_hub_id)
        missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
        if missing:
            raise HunyuanVideoError(f"{folder} lacks {', '.join(missing)}: pass a complete HunyuanVideo checkpoint "
                                    f"in the diffusers layout (or download it again).")
        if quantization not in (None, *QUANTIZATIONS):
            raise HunyuanVideoError(f"quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}, or none.")
        return cls(folder, dtype, quantization, quantize_modulation, low_memory)

    def check_memory(self, height, width, num_frames):
        """The memory plan for a request: its estimated peaks, or HunyuanVideoError if it would not fit."""
        return check_memory(self.folder, height, width, num_frames, self.quantization, self.quantize_modulation,
                            self.low_memory)

    @contextmanager
    def _phase(self, name):
        mx.reset_peak_memory()
        start = time.perf_counter()
        try:
            yield
        finally:
            gc.collect()  # what the phase loaded is garbage now: give its memory back before the next one
            self.stats[name] = (time.perf_counter() - start, mx.get_peak_memory() / 2**30)
            mx.clear_cache()

    def encode_prompt(self, prompt):
        """text_states (B, 256, 4096), text_mask (B, 256), pooled (B, 768), as in encode_prompt."""
        with self._phase("text encoders"):
            tokenizer = load_tokenizer(self.folder / "tokenizer")
            crop_start = len(tokenizer(PROMPT_TEMPLATE.split("{}")[0]).input_ids)  # 95 with Llama-3's vocabulary
            llm = load_text_encoder(self.folder / "text_encoder", self.dtype, self.quantization)
            states, mask = encode_llama(prompt, tokenizer, llm, crop_start=crop_start)
            mx.eval(states, mask)
            del llm
            gc.collect()
            clip = load_clip_text_encoder(self.folder / "text_encoder_2", self.dtype)
            pooled = encode_clip(prompt, load_tokenizer(self.folder / "tokenizer_2"), clip)
            mx.eval(pooled)
        return states, mask, pooled

    def denoise(self, text_states, text_mask, pooled, height=544, width=960, num_frames=13, num_inference_steps=50,
                guidance_scale=6.0, flow_shift=7.0, seed=None, latents=None, callback=None):
        """Final latents (B, t, h, w, 16), float32, unscaled. callback(step, steps, latents) runs after each
        step (progress, previews); returning False cancels."""
        with self._phase("denoise"):
            model = load_transformer(self.folder / "transformer", self.dtype, self.quantization,
                                     self.quantize_modulation, stream=self.low_memory)
            model.eval_per_block = self.low_memory
            B = text_states.shape[0]
            shape = (B, (num_frames - 1) // 4 + 1, height // 8, width // 8, model.in_channels)
            if latents is None:
                key = mx.random.key(seed if seed is not None else int(time.time_ns() % 2**32))
                latents = mx.random.normal(shape, key=key)
            elif tuple(latents.shape) != shape:
                raise HunyuanVideoError(f"latents of shape {tuple(latents.shape)} do not fit {num_frames} frames of "
                                        f"{height} x {width}: pass latents of shape {shape}.")
            x = latents.astype(mx.float32)
            guidance = mx.full((B,), guidance_scale, dtype=model.dtype) * 1000 if "guidance_in" in model else None
            text_states, pooled = text_states.astype(model.dtype), pooled.astype(model.dtype)
            sigmas = flow_sigmas(num_inference_steps, flow_shift)
            for i in range(num_inference_steps):
                v = model(x.astype(model.dtype), timestep(sigmas[i], B), text_states, text_mask, pooled, guidance)
                x = euler_step(x, v, sigmas[i], sigmas[i + 1])
                mx.eval(x)
                if callback is not None and callback(i + 1, num_inference_steps, x) is False:
                    raise HunyuanVideoError(f"cancelled after step {i + 1} of {num_inference_steps}.")
        return x

    def decode(self, latents, tile=DEFAULT_VAE_TILE, stride=DEFAULT_VAE_STRIDE):
        """Latents (B, t, h, w, 16) -> uint8 frames (F, H, W, 3), or (B, F, H, W, 3) for B > 1. Tiled by
        default (the reference's tiles); tile=None decodes in one piece."""
        with self._phase("decode"):
            vae = load_vae(self.folder / "vae", self.dtype)
            video = vae.decode(latents.astype(vae.dtype) / vae.scaling_factor, tile=tile, stride=stride)
            frames = (mx.clip(video.astype(mx.float32) / 2 + 0.5, 0, 1) * 255).round().astype(mx.uint8)
            frames = np.array(frames)
        return frames[0] if frames.shape[0] == 1 else frames

    def __call__(self, prompt, height=544, width=960, num_frames=13, num_inference_steps=50, guidance_scale=6.0,
                 flow_shift=7.0, seed=None, latents=None, output_type="np", callback=None, force=False):
        """output_type "np": uint8 frames (F, H, W, 3); "latent": the final latents (B, t, h, w, 16).
        A request that the memory plan says would not fit is refused before anything loads, unless force."""
        problem = check_request(height, width, num_frames, num_inference_steps, prompt)
        if problem:
            raise HunyuanVideoError(problem)
        if output_type not in ("np", "latent"):
            raise HunyuanVideoError(f"output_type {output_type!r}: use 'np' (frames) or 'latent'.")
        if not force:
            self.check_memory(height, width, num_frames)
        self.stats = {}
        states, mask, pooled = self.encode_prompt(prompt)
        latents = self.denoise(states, mask, pooled, height, width, num_frames, num_inference_steps, guidance_scale,
                               flow_shift, seed, latents, callback)
        return latents if output_type == "latent" else self.decode(latents)


# ---------------------------------------------------------------------------------------------------
# The offline demo: a tiny random HunyuanVideo in the real layout
# ---------------------------------------------------------------------------------------------------

_TINY_WORDS = ("a an the and of in on at with to from by is are was cat dog fox bird fish horse person man woman "
               "child car city street forest sea beach sky sun moon night rain snow water fire tree flower grass "
               "mountain river house room light dark red blue green yellow white black small big old young walks "
               "runs flies swims jumps sits looks plays dances smiles camera slow fast close wide shot view "
               "realistic cinematic style video scene")


def _word_tokenizer(words, specials, template, lowercase, max_length, folder):
    """A word-level tokenizer in transformers' format (no network needed): words, then the special tokens,
    so that the end token has the largest id as in CLIP's vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    PreTrainedTokenizerFast = _transformers().PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>"] + sorted(set(words)) + specials)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.add_special_tokens(specials)
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if lowercase:
        tk.normalizer = normalizers.Lowercase()
    tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(s, vocab[s]) for s in specials
                                                                                      if s in template])
    bos, eos = template.split()[0], specials[-1]
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=eos, unk_token="<unk>",
                                  model_max_length=max_length, padding_side="right")
    tok.save_pretrained(folder)
    return len(vocab)


def build_tiny_checkpoint(folder, seed=0):
    """A tiny random-weight HunyuanVideo in the diffusers layout, tokenizers included, built without torch or
    network: every file the real checkpoint has, in the same format, so the whole path runs in seconds. Its
    videos are noise. Built in a temporary folder, then renamed."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.random.seed(seed)
    words = re.findall(r"\w+|[^\w\s]", re.sub(r"<\|\w+\|>", " ", PROMPT_TEMPLATE)) + _TINY_WORDS.split()
    llama_specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>"]
    n_llama = _word_tokenizer(words, llama_specials, "<|begin_of_text|> $A", False, 1024, tmp / "tokenizer")
    n_clip = _word_tokenizer(words, ["<|startoftext|>", "<|endoftext|>"], "<|startoftext|> $A <|endoftext|>", True,
                             CLIP_LENGTH, tmp / "tokenizer_2")

    # widths are multiples of 64, so that --quantization has layers to quantize here too
    llama_cfg = dict(vocab_size=n_llama, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0)
    llama = LlamaTextEncoder(**llama_cfg, skip_layers=0)  # all layers, as the real file has them
    _save_component(tmp / "text_encoder", {**dict(tree_flatten(llama.parameters())), "norm.weight": mx.ones((64,))},
                     {"model_type": "llama", "architectures": ["LlamaModel"], **llama_cfg})
    clip_cfg = dict(vocab_size=n_clip, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=CLIP_LENGTH, hidden_act="quick_gelu", eos_token_id=2)
    clip = CLIPTextEncoder(**clip_cfg)
    _save_component(tmp / "text_encoder_2", dict(tree_flatten(clip.parameters())),
                    {"model_type": "clip_text_model", "architectures": ["CLIPTextModel"], **clip_cfg})

    dit_cfg = dict(num_attention_heads=2, attention_head_dim=32, num_layers=1, num_single_layers=1,
                   num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=16, rope_axes_dim=[8, 12, 12])
    dit = HunyuanVideoTransformer(**dit_cfg)
    _save_component(tmp / "transformer", _to_diffusers(_checkpoint_weights(dit)), {"_class_name": "HunyuanVideoTransformer3DModel", **dit_cfg},
                    "diffusion_pytorch_model.safetensors")
    vae_cfg = dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4)
    vae = HunyuanVideoVAE(**vae_cfg)
    _save_component(tmp / "vae", {k: v.transpose(0, 4, 1, 2, 3) if v.ndim == 5 else v  # PyTorch's conv layout
                                  for k, v in tree_flatten(vae.parameters())},
                    {"_class_name": "AutoencoderKLHunyuanVideo", "scaling_factor": 0.476986, **vae_cfg},
                    "diffusion_pytorch_model.safetensors")

    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 7.0}))
    (tmp / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline", "tiny_demo": True, "hunyuan_apple_version": __version__}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


# ---------------------------------------------------------------------------------------------------
# Memory plan: know before loading anything whether the request fits
# ---------------------------------------------------------------------------------------------------
# Peak of a phase = its weights (counted exactly from the safetensors headers, at the precision asked) +
# its activations (per token or per voxel, times a coefficient). The coefficients differ by backend. CPU:
# measured with mx.get_peak_memory on this project's Linux machine (its GEMMs and convolutions keep float32
# copies, and its attention keeps the scores). GPU (Metal, CUDA): counted from the tensors alive at once in a
# single-stream block and in a VAE resnet at full resolution; they match diffusers' peaks on an H100 (13 GB
# of DiT activations at 720x1280x129, 3.3 GB for a 16x256x256 VAE tile) and are to be confirmed there.

ACTIVATIONS = {"cpu": dict(per_token=60, scores=True, per_voxel=lambda c0: 18.5 * c0 * c0),
               "gpu": dict(per_token=18, scores=False, per_voxel=lambda c0: 12 * c0)}
GB = 2 ** 30


def _tensor_shapes(folder):
    """{name: (shape, safetensors dtype)} from the headers of a component folder, read without loading."""
    shapes = {}
    for f in Path(folder).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        shapes.update({k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def _weights_bytes(folder, quantization=None, modulation=False, dit=True, keep=lambda name: True):
    """Bytes of a component's weights once loaded: bf16 floats, quantized layers as MLX stores them."""
    spec = QUANTIZATIONS.get(quantization)
    modulation_names = ("norm1.linear", "norm1_context.linear", "norm.linear", "_mod.linear", "modulation.linear")
    total = 0
    for name, (shape, dtype) in _tensor_shapes(folder).items():
        if not keep(name):
            continue
        n = math.prod(shape)
        if dtype not in ("BF16", "F16", "F32"):  # already quantized (a converted checkpoint): as stored
            total += n * {"U32": 4, "I32": 4, "U16": 2}.get(dtype, 1)
            continue
        in_block = not dit or name.startswith(("double_blocks.", "single_blocks.", "transformer_blocks.",
                                               "single_transformer_blocks."))
        if (spec and len(shape) == 2 and name.endswith(".weight") and shape[1] % spec["group_size"] == 0
                and in_block and "embed" not in name and (modulation or not name.removesuffix(".weight")
                                                          .endswith(modulation_names))):
            groups = n // spec["group_size"]
            total += n * spec["bits"] // 8 + (groups * 4 if spec["mode"] == "affine" else groups)
        else:
            total += n * 2  # floats load as bf16
    return total


def _backend():
    return "cpu" if mx.default_device() == mx.cpu else "gpu"


def estimate_memory(folder, height, width, num_frames, quantization=None, modulation=False,
                    tile=DEFAULT_VAE_TILE, low_memory=False, backend=None):
    """Estimated peak bytes of each phase of a generation: {"text encoders", "denoise", "decode"}.
    low_memory: the DiT's blocks are streamed from disk, so about two of them are in memory at once."""
    folder, act = Path(folder), ACTIVATIONS[backend or _backend()]
    dit_cfg = json.loads((folder / "transformer" / "config.json").read_text())
    llm_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    used = llm_cfg["num_hidden_layers"] - 2
    llm = _weights_bytes(folder / "text_encoder", quantization, dit=False,
                         keep=lambda k: not (k.startswith("layers.") and int(k.split(".")[1]) >= used))
    clip = _weights_bytes(folder / "text_encoder_2")
    width_llm, heads_llm = llm_cfg["hidden_size"], llm_cfg["num_attention_heads"]
    L = TEXT_LENGTH + CROP_START
    text = max(llm + act["per_token"] * L * width_llm * 2 + act["scores"] * heads_llm * L * L * 2, clip)

    heads = dit_cfg.get("num_attention_heads", 24)
    D = heads * dit_cfg.get("attention_head_dim", 128)
    t = (num_frames - 1) // 4 + 1
    N = t * (height // 16) * (width // 16) + TEXT_LENGTH
    blocks = ("double_blocks.", "single_blocks.", "transformer_blocks.", "single_transformer_blocks.")
    first = ("double_blocks.0.", "transformer_blocks.0.")
    dit = _weights_bytes(folder / "transformer", quantization, modulation)
    if low_memory:  # the blocks stay on disk but for the one running and the one just dropped
        dit = min(dit, _weights_bytes(folder / "transformer", quantization, modulation,
                                      keep=lambda k: not k.startswith(blocks))
                  + 2 * _weights_bytes(folder / "transformer", quantization, modulation,
                                       keep=lambda k: k.startswith(first)))
    denoise = dit + act["per_token"] * N * D * 2 + act["scores"] * heads * N * N * 2

    c0 = vae_cfg.get("block_out_channels", [128])[0]
    ft, fh, fw = tile or (num_frames - 1, height, width)
    voxels = (min(ft, num_frames - 1) + 1) * min(fh, height) * min(fw, width)
    video = num_frames * height * width * 3
    decode = _weights_bytes(folder / "vae") + act["per_voxel"](c0) * voxels * 2 + video * 7  # bf16, f32, uint8
    return {"text encoders": text, "denoise": denoise, "decode": decode}


def available_memory():
    """What this machine can give a generation, in bytes: HUNYUAN_APPLE_MEMORY_GB if set (to keep memory for
    other work), else on a Mac the GPU's recommended working set, on an NVIDIA GPU its memory, elsewhere the
    memory the OS reports available."""
    if os.environ.get("HUNYUAN_APPLE_MEMORY_GB"):
        return int(float(os.environ["HUNYUAN_APPLE_MEMORY_GB"]) * GB)
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    try:
        return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(folder, height, width, num_frames, quantization=None, modulation=False, low_memory=False,
                 budget=None):
    """Refuse, in one sentence, a request whose estimated peak does not fit (with 10% to spare), naming what
    would fit; return the estimate otherwise. Nothing is loaded."""
    budget = budget or available_memory()
    request = dict(height=height, width=width, num_frames=num_frames, quantization=quantization,
                   modulation=modulation, low_memory=low_memory)
    est = estimate_memory(folder, **request)
    phase = max(est, key=est.get)
    if est[phase] <= 0.9 * budget:
        return est

    def fits(**change):
        return max(estimate_memory(folder, **{**request, **change}).values()) <= 0.9 * budget

    options = []
    for q in ("int8", "int4"):
        if q != quantization and QUANTIZATIONS[q]["bits"] < QUANTIZATIONS.get(quantization, {"bits": 16})["bits"] \
                and fits(quantization=q):
            options.append(f"--quantization {q}")
            break
    frames = next((f for f in range(num_frames - 4, 0, -4) if fits(num_frames=f)), None)
    if frames:
        options.append(f"--frames {frames}")
    if (height, width) != (544, 960) and height * width > 544 * 960 and fits(height=544, width=960):
        options.append("--resolution 544 960")
    if not low_memory and fits(low_memory=True):
        options.append("--low-memory")
    raise HunyuanVideoError(
        f"this request needs about {est[phase] / GB:.1f} GB at its peak ({phase}) and this machine can give "
        f"{budget / GB:.1f} GB: try {' or '.join(options) if options else 'a smaller request'}, or --force to run "
        f"it anyway.")

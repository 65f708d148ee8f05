"""HunyuanVideo (Tencent's 13B text-to-video model, and its image-to-video variants) in plain MLX.

One module, in the order data flows. The model (arrays and numbers in, arrays out):
  1. the text encoders: LLaVA-Llama-3 (per-token states) and CLIP-L (a pooled vector); for image to video,
     LLaVA's CLIP vision tower and projector, the image read with the prompt;
  2. the diffusion transformer (DiT): small fused pieces and attention, Radial Attention (sparse attention between
     far frames, only the kept blocks computed), sequence parallel (the video's tokens split over several processes,
     each attention gathering every one's keys and values), embedders, the token refiner, 20 double-stream and 40
     single-stream blocks (token replace: the image's first frame modulated at timestep 0), the model, which takes
     a step's state (its precomputed modulation rows, its attention pattern) as arguments;
  3. the causal 3D VAE: latents to video (and back), tiled in space and time like the reference;
  4. quantization of the DiT's blocks and the LLM (int8, int4, fp8), by MLX's kernel or on weights dequantized a
     block at a time;
  5. the flow-matching Euler sampler: its step caches (First-Block Cache, MagCache, TeaCache, EasyCache,
     TaylorSeer), the pieces of its loop (start_latents, GuidedDiT, sampler_step, the work ledger) and the
     latent preview.
The application (files and settings in, a stream of events out):
  6. files and folders: the cache folder, atomic writes;
  7. loading: diffusers folders, Tencent's .pt state dicts, ComfyUI single files, fp8 files (dequantized as their
     makers do) and converted MLX folders, strictly (keys, shapes, types), each component in its own precision;
     LoRAs in four key layouts, merged before quantizing or as low-rank branches beside quantized layers;
  8. checkpoints on the hub (their sizes read there, before a download), and the offline demos: tiny random
     checkpoints in the real layout;
  9. the inputs: an image or a video to start from, and the prompt's optional rewrite by a small local model;
 10. the request: every setting of a generation in one table (SETTINGS: the Python API's keywords, the command
     line's flags, the page's fields and the sidecar are made from it), and its one check (check_request);
 11. the memory plan: each phase's peak, derived from what this code allocates, before anything loads;
 12. the pipeline: a request run as a stream of events (generate: the plan, the rewritten prompt, the text
     encodings, each step, the final latents, the frames), phase by phase, each phase's weights freed before the
     next; a prompt cache; under mlx.launch, the same on every rank: they agree on the request, rank 0 encodes the
     prompt for all, the tokens (and true CFG's branches) are split, the decode's tiles shared.

Conventions: video tensors are channels-last, (B, T, H, W, C), from the input to the output. Module
attribute names are Tencent's checkpoint names (the original layout, with fused q|k|v projections), so
Tencent and ComfyUI files load by name and the diffusers layout needs a short renaming table.
The reference for every number here is diffusers (its HunyuanVideo transformer, VAE and pipelines).
"""

import difflib
import gc
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections import namedtuple
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

__version__ = "0.2.0"


def worded(text, names=None):
    """A sentence whose settings appear as {name} (names of SETTINGS or NAMES), each worded as names says (a table:
    setting -> words, such as the command line's flags or the page's fields), else as NAMES says, else by its name."""
    for p in (*SETTINGS, *NAMES):
        text = text.replace("{" + p + "}", (names or {}).get(p) or NAMES.get(p, p))
    return text


class Worded:
    """A message that names the settings it is about as {name}: str() words them as the Python API names them,
    sentence(names) as a front end does (see worded)."""

    def __init__(self, text):
        super().__init__(text)
        self.text = text

    def sentence(self, names=None):
        return worded(self.text, names)

    __str__ = sentence

    @property
    def settings(self):
        """The settings the message is about (named in it as {name})."""
        return [p for p in SETTINGS if "{" + p + "}" in self.text]


class HunyuanVideoError(Worded, Exception):
    """A problem the user can fix: the message is one sentence that says how."""


class HunyuanVideoWarning(Worded, UserWarning):
    """Something the user may want to change; the run goes on."""


def _counted(items, progress):
    """Iterate over items, calling progress(0, n) first and progress(i + 1, n) once item i's work is done:
    the progress reports of every long loop (layers, tensors read, steps). progress may be None."""
    items = list(items)
    if progress:
        progress(0, len(items))
    for i, item in enumerate(items):
        yield item
        if progress:
            progress(i + 1, len(items))


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
    """Grouped-query attention, causal, with Llama's RoPE (halves rotated, theta 500000). bias: on q, k and v
    (Qwen2's, the HunyuanVideo 1.5 text encoder's)."""

    def __init__(self, dim, heads, kv_heads, head_dim, rope_theta, bias=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.rope_theta = heads, kv_heads, head_dim, rope_theta
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
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


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = act

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LlamaMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, dim, hidden, heads, kv_heads, head_dim, eps, rope_theta, bias=False):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.self_attn = LlamaAttention(dim, heads, kv_heads, head_dim, rope_theta, bias)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.mlp = LlamaMLP(dim, hidden)

    def __call__(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaTextEncoder(nn.Module):
    """transformers' LlamaModel up to hidden_states[-(skip_layers + 1)]: the last skip_layers layers and the
    final norm never reach that output, so they are not built (nor loaded). Keywords: its config.json names;
    attention_bias=True is Qwen2's text model (HunyuanVideo 1.5's encoder), the same layers with biased q, k, v."""

    def __init__(self, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                 head_dim=None, skip_layers=2, attention_bias=False):
        super().__init__()
        head_dim = head_dim or hidden_size // num_attention_heads
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = [LlamaLayer(hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
                                  rms_norm_eps, rope_theta, attention_bias)
                       for _ in range(num_hidden_layers - skip_layers)]

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def __call__(self, ids, progress=None, embeds=None):
        """ids (B, L) -> states (B, L, hidden). Causal: a position never sees the ones after it, so right
        padding leaves the valid positions as they are. Each layer is evaluated on its own: one layer's
        intermediates are alive at a time (what the memory plan counts). progress(done, total) after each.
        embeds: the input embeddings (B, L, hidden) instead of ids' (LLaVA's, with the image in them)."""
        x, embeds = (self.embed_tokens(ids) if embeds is None else embeds), None  # held by x alone
        for layer in _counted(self.layers, progress):
            x = layer(x)
            mx.eval(x)
        return x


class CLIPLayer(nn.Module):
    def __init__(self, dim, hidden, heads, eps, act, causal=True):
        super().__init__()
        self.heads, self.causal = heads, causal
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
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=(D // self.heads) ** -0.5,
                                                 mask="causal" if self.causal else None)
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


def encode_llama(prompts, tokenizer, model, max_length=TEXT_LENGTH, template=PROMPT_TEMPLATE, crop_start=CROP_START,
                 progress=None, what="the LLaVA-Llama-3 text encoder"):
    """Prompts -> (states (B, max_length, hidden) in the model's dtype, zero where padded; mask (B, max_length)).
    Only the longest prompt's tokens are run: the causal model gives valid positions the same states either way.
    progress(done, total): after each layer. what: the encoder's name, in a warning that the prompt was cut."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, mask = _tokenize(tokenizer, [template.format(p) for p in prompts], max_length + crop_start, what,
                          crop_start)
    n = int(mask.sum(axis=1).max())
    states = model(mx.array(ids[:, :n]), progress)[:, crop_start:]  # (B, n - crop_start, hidden)
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


# The image-to-video checkpoints read the prompt with the image: LLaVA's CLIP ViT-L/14-336 vision tower and
# projector turn the image into 576 embeddings, which take the place of the <image> token of an I2V template
# in the LLM's input. From the LLM's states, the image's (every 4th for token replace, every 2nd for latent
# concat) come first, then the prompt's, the template cropped off as the reference crops it.

I2V_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following aspects "
    "according to the reference image: 1. The main content and theme of the video.2. The color, shape, size, "
    "texture, quantity, text, and spatial relationships of the objects.3. Actions, events, behaviors temporal "
    "relationships, physical movement changes of the objects.4. background environment, light, style and "
    "atmosphere.5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n<|start_header_id|>"
    "user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 x 336: 24 x 24 patches
I2V_CROP_START = 103  # the template's tokens before the prompt, <image> counted once (Llama-3's vocabulary)
IMAGE_EMBED_INTERLEAVE = {"token_replace": 4, "latent_concat": 2}  # the reference's defaults by conditioning


class CLIPVisionTower(nn.Module):
    """transformers' CLIPVisionModel up to hidden_states[vision_feature_layer] (-2: the last layer is not
    built), its class token dropped (LLaVA's "default" strategy): pixels (B, 336, 336, 3) -> (B, 576, width)."""

    def __init__(self, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, layer_norm_eps=1e-5, hidden_act="quick_gelu", num_channels=3,
                 skip_layers=1):
        super().__init__()
        act = (lambda x: x * mx.sigmoid(1.702 * x)) if hidden_act == "quick_gelu" else nn.gelu
        vm = self.vision_model = nn.Module()
        vm.embeddings = nn.Module()
        vm.embeddings.patch_embedding = nn.Conv2d(num_channels, hidden_size, patch_size, stride=patch_size, bias=False)
        vm.embeddings.class_embedding = mx.zeros((hidden_size,))
        vm.embeddings.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + 1, hidden_size)
        vm.pre_layrnorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        vm.encoder = nn.Module()
        vm.encoder.layers = [CLIPLayer(hidden_size, intermediate_size, num_attention_heads, layer_norm_eps, act,
                                       causal=False) for _ in range(num_hidden_layers - skip_layers)]

    def __call__(self, pixels):
        vm, e = self.vision_model, self.vision_model.embeddings
        x = e.patch_embedding(pixels.astype(e.class_embedding.dtype))  # (B, 24, 24, width)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, 576, width), row by row as the reference flattens
        cls = mx.broadcast_to(e.class_embedding, (x.shape[0], 1, x.shape[-1]))
        x = mx.concatenate([cls, x], axis=1) + e.position_embedding(mx.arange(x.shape[1] + 1))
        x = vm.pre_layrnorm(x)
        for layer in vm.encoder.layers:
            x = layer(x)
        return x[:, 1:]


class LlavaProjector(nn.Module):
    def __init__(self, vision_width, text_width, act):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, text_width)
        self.linear_2 = nn.Linear(text_width, text_width)
        self.act = nn.gelu if act == "gelu" else nn.gelu_approx

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def _hf_sizes(cls, config):
    """The constructor keywords a transformers config.json gives (its names are the constructor's)."""
    return {k: config[k] for k in inspect.signature(cls).parameters if k in config and config[k] is not None}


class LlavaTextEncoder(nn.Module):
    """LlavaForConditionalGeneration as HunyuanVideo-I2V reads it: the vision tower and projector, and the
    language model (LlamaTextEncoder) reading the image's embeddings in place of its <image> tokens. Keywords:
    its config.json's."""

    def __init__(self, text_config, vision_config, image_token_index, pad_token_id=None, projector_hidden_act="gelu",
                 vision_feature_layer=-2, vision_feature_select_strategy="default"):
        super().__init__()
        if vision_feature_select_strategy != "default" or vision_feature_layer >= 0:
            raise HunyuanVideoError(f"a LLaVA with vision_feature_layer {vision_feature_layer} and strategy "
                                    f"{vision_feature_select_strategy!r}: HunyuanVideo-I2V's uses -2 and 'default'.")
        self.language_model = LlamaTextEncoder(**_hf_sizes(LlamaTextEncoder, text_config))
        self.vision_tower = CLIPVisionTower(**_hf_sizes(CLIPVisionTower, vision_config),
                                            skip_layers=-1 - vision_feature_layer)
        self.multi_modal_projector = LlavaProjector(vision_config.get("hidden_size", 1024),
                                                    text_config.get("hidden_size", 4096), projector_hidden_act)
        self.image_token_index, self.pad_token_id = image_token_index, pad_token_id

    @property
    def dtype(self):
        return self.language_model.dtype

    def image_embeddings(self, pixels):
        """pixels (B, 336, 336, 3), normalized as CLIP's processor does -> (B, 576, LLM width)."""
        out = self.multi_modal_projector(self.vision_tower(pixels))
        mx.eval(out)
        return out


def encode_llava(prompt, pixels, tokenizer, model, interleave, max_length=TEXT_LENGTH, template=I2V_TEMPLATE,
                 crop_start=I2V_CROP_START, progress=None):
    """A prompt read with its image, as the reference's _get_llama_prompt_embeds reads it: (states (1, n, width),
    mask (1, n)), n = 576 / interleave image embeddings + max_length - 4 prompt positions. The <image> token
    becomes the image's 576 embeddings; the LLM's hidden_states[-3] are cropped to the prompt (the template's
    last four tokens, <|eot_id|><|start_header_id|>assistant<|end_header_id|>, dropped too), and every
    interleave-th image state goes first."""
    n_img = IMAGE_TOKENS
    ids, mask = _tokenize(tokenizer, [template.format(prompt)], max_length + crop_start,
                          "the LLaVA-Llama-3 text encoder", crop_start)
    ids, mask = ids[0], mask[0]
    where = np.nonzero(ids == model.image_token_index)[0]  # position 5 with Llama-3's vocabulary
    if len(where) != 1:
        raise HunyuanVideoError(f"the tokenizer puts {len(where)} <image> tokens in the I2V template (1 expected): "
                                f"pass the I2V checkpoint's own tokenizer/.")
    start = int(where[0])
    expanded = np.concatenate([ids[:start], np.full(n_img, model.image_token_index), ids[start + 1:]])  # (L + 575,)
    valid = expanded != model.pad_token_id  # the reference's attention mask: what is not padding
    n = int(np.nonzero(valid)[0][-1]) + 1 if valid.any() else 1  # causal: the valid prefix is all that counts
    lm = model.language_model
    text = lm.embed_tokens(mx.array(np.where(expanded[:n] == model.image_token_index, 0, expanded[:n]))[None])
    image = model.image_embeddings(pixels).astype(text.dtype)  # (1, 576, width)
    x = [mx.concatenate([text[:, :start], image, text[:, start + n_img:]], axis=1)]
    del text, image  # only the LLM holds its input: gone after its first layer
    states = lm(None, progress, embeds=x.pop())  # (1, n, width)
    states = mx.pad(states, [(0, 0), (0, len(expanded) - n), (0, 0)])  # the padded positions: zeros
    # the reference's crop, in the unexpanded positions: the assistant header ends at the last
    # <|end_header_id|> (or, when the prompt was cut, at the end)
    ends = np.nonzero(ids == tokenizer.convert_tokens_to_ids("<|end_header_id|>"))[0]
    assistant = (ends[-1] if len(ends) > 2 else len(ids) - 1) + 1
    text_start, shift = crop_start - 1 + n_img, n_img - 1
    prompt_states = mx.concatenate([states[:, text_start:assistant - 4 + shift], states[:, assistant + shift:]], axis=1)
    prompt_mask = np.concatenate([mask[crop_start:assistant - 4], mask[assistant:]])
    image_states = states[:, start:start + n_img:interleave]
    out = mx.concatenate([image_states, prompt_states], axis=1)
    out_mask = mx.array(np.concatenate([np.ones(image_states.shape[1], np.int32), prompt_mask.astype(np.int32)]))[None]
    return out * out_mask[..., None].astype(out.dtype), out_mask


def clip_pixels(image, config):
    """An image (PIL) as CLIP's image processor (transformers' CLIPImageProcessor, config: the checkpoint's
    image_processor/preprocessor_config.json) prepares it: RGB, the short side resized to 336 (bicubic), the
    centre 336 x 336 cropped, scaled to [0, 1] and normalized by CLIP's mean and std. -> (1, 336, 336, 3) float32."""
    from PIL import Image

    image = image.convert("RGB")
    short = config.get("size", {}).get("shortest_edge", 336)
    crop = config.get("crop_size", {"height": 336, "width": 336})
    w, h = image.size
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    image = image.resize(size, resample=config.get("resample", Image.BICUBIC))
    x = np.asarray(image)
    top, left = (x.shape[0] - crop["height"]) // 2, (x.shape[1] - crop["width"]) // 2
    x = x[top:top + crop["height"], left:left + crop["width"]]
    x = (x.astype(np.float64) * config.get("rescale_factor", 1 / 255)).astype(np.float32)
    mean = np.array(config.get("image_mean", [0.48145466, 0.4578275, 0.40821073]), np.float32)
    std = np.array(config.get("image_std", [0.26862954, 0.26130258, 0.27577711]), np.float32)
    return mx.array((x - mean) / std)[None]


# ---------------------------------------------------------------------------------------------------
# DiT: small fused pieces
# ---------------------------------------------------------------------------------------------------
# mx.compile fuses each of these elementwise chains into one kernel per shape.

@mx.compile
def _modulate_batch(x, shift, scale):
    return mx.fast.layer_norm(x, None, None, 1e-6) * (1 + scale) + shift


def _modulate(x, shift, scale):
    """LayerNorm without affine (eps 1e-6), then adaLN: x (B, N, D); shift, scale (B, 1, D). For one video
    the adaLN is the norm's own affine, one kernel and one output; a batch needs a weight per video."""
    if x.shape[0] == 1:
        return mx.fast.layer_norm(x, 1 + scale.reshape(-1), shift.reshape(-1), 1e-6)
    return _modulate_batch(x, shift, scale)


@mx.compile
def _gated(x, gate, y):
    """Gated residual: x + gate * y, gate (B, 1, D)."""
    return x + gate * y


# Token replace (HunyuanVideo-I2V): the first n video tokens, the clean first frame, are modulated by the
# modulation of timestep 0 (`first`), the other tokens by the step's, as the reference does it: in two parts.

def _modulate_split(x, shift, scale, first=None, n=0):
    """_modulate of x (B, N, D); its first n tokens by first = (shift, scale) instead, where n > 0."""
    if not n:
        return _modulate(x, shift, scale)
    return mx.concatenate([_modulate(x[:, :n], *first), _modulate(x[:, n:], shift, scale)], axis=1)


def _gated_split(x, gate, y, first=None, n=0):
    """_gated; its first n tokens gated by first instead, where n > 0."""
    if not n:
        return _gated(x, gate, y)
    return mx.concatenate([_gated(x[:, :n], first, y[:, :n]), _gated(x[:, n:], gate, y[:, n:])], axis=1)


_PAIR = mx.array([1.0, 0.0])  # the even (1) and odd (0) slot of each rotated pair


@mx.compile
def _rope(x, cos, sin):
    """Rotate ADJACENT pairs (x[2i], x[2i+1]) by angle i, in float32 like the reference, rounding once.

    x (B, heads, N, head_dim); cos, sin (N, head_dim/2, 1). Elementwise only, so that it compiles to one
    kernel: the float32 values never exist as whole arrays (no stack, no float32 copies of q and k)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)  # (B, heads, N, head_dim/2, 2), free: x is contiguous
    x0, x1 = pairs[..., :1].astype(mx.float32), pairs[..., 1:].astype(mx.float32)
    out = (x0 * cos - x1 * sin) * _PAIR + (x1 * cos + x0 * sin) * (1 - _PAIR)  # (..., head_dim/2, 2)
    return out.astype(x.dtype).reshape(x.shape)


def _heads(x, n, heads, dim):
    """The first n projections of x (B, N, n*dim + rest), [q | k | v | ...] -> n arrays (B, heads, N, head_dim),
    views of x where its width splits into whole heads (no copy of q, k and v)."""
    B, N, width = x.shape
    head_dim = dim // heads
    if width % head_dim:
        x, width = x[..., : n * dim], n * dim  # a copy: the rest does not split into heads
    x = x.reshape(B, N, width // head_dim, head_dim)  # (B, N, width / head_dim, head_dim)
    return [x[:, :, i * heads:(i + 1) * heads].transpose(0, 2, 1, 3) for i in range(n)]


# The most FLOP one attention call may do. macOS stops a GPU command buffer that runs for seconds (the
# watchdog), and one full attention at 720x1280x129 is 1.7e14 FLOP; 4e12 is about 0.3 s on an M-series Max
# and 1.5 s on a base chip, so larger attentions run as query chunks, each evaluated on its own.
ATTENTION_FLOP = 4e12


def _query_chunk(batch, heads, queries, keys, head_dim):
    """How many queries one attention call takes: all of them, or as many as ATTENTION_FLOP allows (Q K^T and
    A V: 4 FLOP per query, key and head channel)."""
    per_query = 4 * batch * heads * keys * head_dim
    return max(1, min(queries, int(ATTENTION_FLOP // per_query)))


def _attention(q, k, v, mask, radial=None):
    """q, k, v (B, heads, N, head_dim); mask None or bool (B, 1, 1|N, N), True = attend -> (B, N, D). Over
    query chunks when one call would exceed ATTENTION_FLOP: each query's result is the same either way.
    radial: a RadialAttention for the video's blocks (the DiT's blocks, on its sparse steps), or None (dense)."""
    if radial is not None:
        return radial.attend(q, k, v, mask)
    B, H, N, Dh = q.shape
    rows = _query_chunk(B, H, N, k.shape[2], Dh)
    parts = []
    for s in range(0, N, rows):
        m = mask[:, :, s:s + rows] if mask is not None and mask.shape[2] > 1 else mask
        o = mx.fast.scaled_dot_product_attention(q[:, :, s:s + rows], k, v, scale=Dh ** -0.5, mask=m)
        parts.append(o.transpose(0, 2, 1, 3).reshape(B, -1, H * Dh))  # (B, heads, n, hd) -> (B, n, D)
        if rows < N:
            mx.eval(parts[-1])
    return parts[0] if rows == N else mx.concatenate(parts, axis=1)


def _timestep_freqs(t, dtype, dim=256, max_period=10000.0):
    """Sinusoidal embedding [cos | sin] of t (B,), computed in float32 and then cast, as the reference."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]  # (B, half)
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1).astype(dtype)


@lru_cache(maxsize=1)  # the steps of a generation share one table (61 MB at 720x1280x129); no more is kept
def _rope_table(grid, axes_dim, theta, n_text):
    """cos, sin (N_video + n_text, head_dim/2, 1) float32 for the patchified grid (t, h, w).

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
    return mx.array(cos)[..., None], mx.array(sin)[..., None]


# ---------------------------------------------------------------------------------------------------
# DiT: Radial Attention (the video's attention between far frames made sparse)
# ---------------------------------------------------------------------------------------------------
# Radial Attention (mit-han-lab/radial-attention, NeurIPS 2025, built on diffusers' HunyuanVideoPipeline): a
# static mask over blocks of 128 video tokens whose window shrinks as the distance between the query's frame and
# the key's grows, training-free. Its rule as of commit 72788d4 (radial_attn/attn_mask.py, gen_log_mask_shrinked
# with model_type "hunyuan": no attention sink, which that code keeps for Wan alone), for each pair of latent frames
# (i queries, j keys), tokens per frame f, d = 2^bits(f) / 2^bits(|i-j|): the diagonal split first, for every pair
# (adjacent ones too): when d < block, only the pairs with |i-j| a multiple of int(block / d) are kept (the
# reference fixes that threshold at 128, its block size; here it is the block size, so at 128 the rule is the
# reference's exactly); frames at most 1 apart keep everything; farther pairs keep the band |r - c| <=
# max(d * decay, block). Each pair's token mask, at its offset in a block-aligned canvas, becomes blocks: a block is
# kept when more than 60% of its non-empty columns are over a third full. Text keys and queries, and the video
# tokens of a last partial block, stay dense (as the reference keeps the block that holds the video/text border);
# text padding is masked as in dense attention. The FLOPs really drop: for each run of query blocks keeping the same
# key blocks, those blocks are gathered and given to the fused attention with the keys every video query sees;
# nothing is masked away. Dense for the first steps (the reference: 12 of 50, kept as that fraction of the steps)
# and for the first `dense_layers` blocks (double blocks 0..19, then the single blocks 20 on).

RADIAL_DENSE_STEPS = 12 / 50  # scripts/hunyuan_t2v_inference.sh: dense_timesteps 12 of 50 steps
# None: RADIAL_DENSE_STEPS; decay: scripts/hunyuan_t2v_inference.sh's --decay_factor 0.95
RADIAL_DEFAULTS = dict(dense_steps=None, dense_layers=0, decay=0.95, block=128)
ATTENTIONS = ("dense", "radial")


def radial_dense_steps(steps):
    """The dense steps Radial Attention leaves at the start of `steps` when none are given: the reference's share,
    rounded to the nearest step."""
    return int(RADIAL_DENSE_STEPS * steps + 0.5)


@lru_cache(maxsize=4096)
def _radial_blocks(per_frame, window, row_offset, col_offset, block):
    """The reference's shrinkMaskStrict of one frame pair's band |r - c| <= window (math.inf: all), placed at
    (row_offset, col_offset) in a canvas of n = ceil(per_frame / block) blocks a side (cut there, as the reference
    cuts it): (n, n) bool. Counted per column rather than drawn: O(n x per_frame)."""
    n = -(-per_frame // block)
    R = np.arange(n)[:, None]
    a = np.clip(R * block - row_offset, 0, per_frame)  # the frame's rows in block row R: [a, b)
    b = np.clip((R + 1) * block - row_offset, 0, per_frame)
    c = np.arange(per_frame)[None]
    if window == math.inf:
        count = np.broadcast_to(b - a, (n, per_frame))
    else:  # rows r with c - window <= r <= c + window
        count = np.clip(np.minimum(b, np.floor(c + window).astype(int) + 1) - np.maximum(a, np.ceil(c - window)
                                                                                           .astype(int)), 0, None)
    canvas = np.zeros((n, n * block), np.int64)  # (block rows, canvas columns) of row counts
    cols = min(per_frame, n * block - col_offset)
    canvas[:, col_offset:col_offset + cols] = count[:, :cols]
    canvas = canvas.reshape(n, n, block)
    high = (3 * canvas > block).sum(-1)  # columns over a third full (count / block > 1/3, exactly)
    nonzero = (canvas > 0).sum(-1)
    return 5 * high > 3 * nonzero  # more than 60% of the non-empty columns


def radial_block_mask(frames, per_frame, block=128, decay=0.95):
    """Which blocks of `block` video tokens Radial Attention keeps: (n, n) bool over the n = frames x per_frame //
    block whole blocks of the video (tokens frame-major, per_frame tokens a latent frame)."""
    n = frames * per_frame // block
    out = np.zeros((n, n), bool)
    bits = 2 ** per_frame.bit_length()
    for i, j in itertools.product(range(frames), repeat=2):
        dist = abs(i - j)
        d = bits / 2 ** dist.bit_length()
        if d < block and dist % int(block / d):  # the diagonal split: this frame pair is dropped
            continue
        window = math.inf if dist <= 1 else max(d * decay, block)
        kept = _radial_blocks(per_frame, window, i * per_frame % block, j * per_frame % block, block)
        r, c = i * per_frame // block, j * per_frame // block
        part = out[r:r + kept.shape[0], c:c + kept.shape[1]]
        part |= kept[:part.shape[0], :part.shape[1]]
    return out


def patch_grid(height, width, num_frames):
    """The DiT's patches of a video (t, h, w): its latent frames, and its height and width over 16 (the VAE's 8 times
    the patch's 2)."""
    return (num_frames - 1) // 4 + 1, height // 16, width // 16


def _runs(mask):
    """[(first, end)] of the runs of equal consecutive rows of a 2-D bool array."""
    if not mask.shape[0]:
        return []
    starts = [0] + [r for r in range(1, mask.shape[0]) if not np.array_equal(mask[r], mask[r - 1])]
    return list(zip(starts, starts[1:] + [mask.shape[0]]))


class RadialAttention:
    """One generation's Radial Attention over a latent grid (t, h, w) of patches: its block mask, the steps and
    layers it leaves dense, and the sparse attention itself (attend)."""

    def __init__(self, grid, steps, dense_steps=None, dense_layers=0, decay=0.95, block=128):
        self.frames, self.per_frame = grid[0], grid[1] * grid[2]
        self.video = self.frames * self.per_frame
        self.dense_steps = radial_dense_steps(steps) if dense_steps is None else dense_steps
        self.dense_layers, self.decay, self.block = dense_layers, decay, block
        self.mask = radial_block_mask(self.frames, self.per_frame, block, decay)
        self.sparse = self.mask.shape[0] * block  # the video tokens in whole blocks; the rest are dense
        # runs of query blocks that keep the same key blocks: (first, end, kept key blocks)
        self.runs = [(s, e, np.nonzero(self.mask[s])[0]) for s, e in _runs(self.mask)]

    @property
    def density(self):
        """The share of the video-video blocks kept."""
        return float(self.mask.mean()) if self.mask.size else 1.0

    def at(self, step):
        """self for a step that runs sparse, or None (dense)."""
        return self if step >= self.dense_steps else None

    def pairs(self, n_text):
        """Query-key pairs that attend computes over the video and n_text text tokens (dense: N^2)."""
        n = self.video + n_text
        rest = n - self.sparse  # the keys every video query sees, and the queries that see every key
        return int(self.mask.sum()) * self.block ** 2 + self.sparse * rest + rest * n

    def attend(self, q, k, v, mask, offset=0):
        """_attention's result with the radial mask: k, v (B, heads, N, head_dim), N = video + text tokens; q the
        queries of the video tokens from `offset` on (a rank's slice, see SequenceSplit; all of them by default),
        then the text's; mask None or (B, 1, 1, N) bool over the keys. Runs of query blocks each take their kept
        key blocks (gathered) and the rest; the dense rows go through _attention. Evaluated every ATTENTION_FLOP (the
        watchdog) or whenever the keys gathered since reach k's size (memory: at most about twice k and v)."""
        B, H, _, Dh = q.shape
        S, bs = self.sparse, self.block
        local = q.shape[2] - (k.shape[2] - self.video)  # the video queries here: [offset, offset + local)
        dense = min(max(S - offset, 0), local)  # the first query row past the sparse blocks
        kb, vb = (a[:, :, :S].reshape(B, H, S // bs, bs, Dh) for a in (k, v))  # (B, heads, blocks, bs, hd)
        parts, budget, gathered = [], 0, 0
        for first, end, cols in self.runs:
            first, end = max(first * bs - offset, 0), min(end * bs - offset, dense)  # this run's query rows here
            if first >= end:
                continue
            idx = mx.array(cols)
            keys, values = (mx.concatenate([mx.take(blocks, idx, axis=2).reshape(B, H, -1, Dh), a[:, :, S:]], axis=2)
                            for blocks, a in ((kb, k), (vb, v)))  # (B, heads, kept blocks x bs + N - S, hd)
            m = None if mask is None else mx.concatenate(
                [mx.ones((B, 1, 1, len(cols) * bs), mx.bool_), mask[..., S:]], axis=-1)
            rows = _query_chunk(B, H, end - first, keys.shape[2], Dh)
            gathered += keys.size
            for s in range(first, end, rows):
                o = mx.fast.scaled_dot_product_attention(q[:, :, s:min(s + rows, end)], keys, values,
                                                         scale=Dh ** -0.5, mask=m)
                parts.append(o.transpose(0, 2, 1, 3).reshape(B, -1, H * Dh))  # (B, heads, n, hd) -> (B, n, D)
                budget += 4 * B * H * o.shape[2] * keys.shape[2] * Dh
                if budget >= ATTENTION_FLOP or gathered >= k.size:
                    mx.eval(parts)
                    budget = gathered = 0
        if dense < q.shape[2]:
            parts.append(_attention(q[:, :, dense:], k, v, mask))
        return mx.concatenate(parts, axis=1)


# ---------------------------------------------------------------------------------------------------
# DiT: sequence parallel (one video's tokens over several processes)
# ---------------------------------------------------------------------------------------------------
# Started by mlx.launch (its ring over TCP, jaccl over Thunderbolt 5, mpi, nccl), N processes, the ranks, each hold
# the whole DiT and a slice of the video's tokens: rank r the tokens [r p, (r + 1) p), p = ceil(video / N), the last
# slice shorter. Every linear layer, norm and modulation is token-wise, so only attention needs the other ranks'
# tokens: each attention gathers the keys and values of all ranks and computes its own queries. all_gather, because
# MLX has no all-to-all (Ulysses' exchange of heads for tokens) and one gather of K and V receives (N - 1) / N of
# them, as many bytes as a ring pass of K and V, and leaves the fused attention whole. The text's few hundred
# tokens are on every rank, and every rank computes their queries (the same rows everywhere). The velocity is
# gathered at the end of each forward: 64 numbers a token against the 60 x 2 x 3072 of the keys and values (1/5760
# of the bytes), and then the sampler, the step caches' inputs and outputs, checkpoints and previews are whole on
# every rank, the same as in one process. Only the caches' norms over hidden states (First-Block Cache's, TeaCache's)
# are summed over the ranks, so that every rank decides the same.

class Ranks:
    """The processes of one generation (mx.distributed's `group`), or those of them, `members` (world ranks in
    order), that share its work (all of them, or with CFG parallel one half, or a pair): this one's rank among them,
    their collectives, and the bytes this process received through them."""

    def __init__(self, group, members=None):
        self.group, self.members = group, list(range(group.size())) if members is None else list(members)
        self.rank, self.size, self.received = self.members.index(group.rank()), len(self.members), 0
        # a group of the members alone; the ring backend cannot split, and gathers over all the ranks (so both
        # halves of CFG parallel must then make the same collectives: no step cache, see cfg_mode)
        self.part = group.split(self.members[0]) if self.size < group.size() and self.splits else None

    @property
    def splits(self):
        """Whether the backend makes groups of some of the ranks (the ring backend does not). Every rank asks at the
        same point: on the backends that split, splitting is a collective."""
        if not hasattr(self, "_splits"):
            try:
                self.group.split(0)
                self._splits = True
            except RuntimeError:
                self._splits = False
        return self._splits

    @property
    def host(self):
        import socket

        return socket.gethostname()

    def gather(self, x):
        """The members' x (each the same shape), concatenated along axis 0 in their order."""
        if self.size == 1:
            return x
        whole = self.part is None and self.size < self.group.size()
        out = mx.distributed.all_gather(x, group=self.part or self.group)
        self.received += x.nbytes * ((self.group.size() if whole else self.size) - 1)
        if whole:
            out = out.reshape(self.group.size(), *x.shape)[mx.array(self.members)].reshape(-1, *x.shape[1:])
        return out

    def sum(self, x):
        """The sum of the members' x."""
        return self.gather(x[None]).sum(axis=0) if self.size > 1 else x

    def exchange(self, data):
        """Every world rank's bytes (data, this one's), in rank order: how ranks agree on settings and share what
        one of them made (the text encodings, the step caches' states)."""
        sizes = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int64), group=self.group).tolist()
        padded = np.zeros(max(sizes), np.uint8)
        padded[:len(data)] = np.frombuffer(data, np.uint8)
        out = np.array(mx.distributed.all_gather(mx.array(padded), group=self.group)).reshape(len(sizes), -1)
        self.received += out.nbytes - padded.nbytes
        return [out[i, :n].tobytes() for i, n in enumerate(sizes)]

    def first(self, arrays):
        """Rank 0's arrays (a dict, or None elsewhere) on every rank, dtypes kept."""
        data = b""
        if self.group.rank() == 0:
            data = _pack(arrays)
        return _unpack(self.exchange(data)[0])


def _pack(arrays, meta=None):
    """Arrays (a dict of mx arrays) and a JSON-able meta as bytes: an .npz (float32 for bfloat16, which numpy lacks;
    read back exactly) whose "_meta" holds the dtypes and meta. No pickle: what comes back is only arrays."""
    import io

    names = {k: str(v.dtype).split(".")[-1] for k, v in arrays.items()}
    out = io.BytesIO()
    np.savez(out, _meta=np.frombuffer(json.dumps([names, meta]).encode(), np.uint8),
             **{k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in arrays.items()})
    return out.getvalue()


def _unpack(data, meta=False):
    """_pack's arrays (and its meta, with meta=True)."""
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        names, info = json.loads(f["_meta"].tobytes())
        arrays = {k: mx.array(f[k]).astype(getattr(mx, dtype)) for k, dtype in names.items()}
    return (arrays, info) if meta else arrays


class SequenceSplit:
    """One forward's video tokens over the ranks of `ranks`: this rank's are [start, end)."""

    def __init__(self, ranks, video):
        self.ranks, self.video = ranks, video
        self.per = -(-video // ranks.size)
        self.start = min(ranks.rank * self.per, video)
        self.end = min(self.start + self.per, video)

    def gather(self, a, axis=1):
        """Every rank's slice of a's token axis, concatenated: a whole along it."""
        a = mx.moveaxis(a, axis, 0)  # (local, ...)
        a = mx.pad(a, [(0, self.per - a.shape[0])] + [(0, 0)] * (a.ndim - 1))  # (per, ...): one shape on all ranks
        return mx.moveaxis(self.ranks.gather(a)[:self.video], 0, axis)

    def keys(self, a):
        """Keys or values of this rank's video tokens then the text (B, heads, local + text, head_dim) -> of all the
        video tokens then the text."""
        n = self.end - self.start
        return mx.concatenate([self.gather(a[:, :, :n], axis=2), a[:, :, n:]], axis=2)

    def attention(self, radial=None):
        """The attention of a layer, dense or radial (its RadialAttention), over the keys of every rank."""
        return SplitAttention(self, radial)


class SplitAttention(namedtuple("SplitAttention", "split radial")):
    def attend(self, q, k, v, mask):
        """_attention's, for this rank's queries (its video tokens, then the text) and every rank's keys."""
        k, v = self.split.keys(k), self.split.keys(v)
        if self.radial is not None:
            return self.radial.attend(q, k, v, mask, self.split.start)
        return _attention(q, k, v, mask)


def world():
    """All the processes mlx.launch started for this run (Ranks), or None in one process."""
    group = mx.distributed.init()
    return Ranks(group) if group.size() > 1 else None


# each rank's (host, process id), once the ranks have agreed on a request (HunyuanVideoPipeline.agree)
PEERS = []
DISTRIBUTED_ERROR = re.compile(r"\[(ring|jaccl|mpi|nccl)\]")  # how MLX's backends begin their errors


class RanksLost(HunyuanVideoError):
    """Another rank of the run stopped (it failed, was killed or ran out of memory): this one stops too, naming
    the rank and host that went where it can tell (a rank on this host whose process is gone, or the one rank on
    other hosts), else the ranks on other hosts."""

    def __init__(self):
        ranks = world()
        me, host = ranks.group.rank(), ranks.host
        gone = []
        for rank, (h, pid) in enumerate(PEERS):
            if h == host and rank != me:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    gone.append(rank)
                except OSError:
                    pass
        elsewhere = [r for r, (h, _) in enumerate(PEERS) if h != host]  # those whose processes this host cannot see
        if gone:
            who = " and ".join(f"rank {r} on {PEERS[r][0]}" for r in gone) + " stopped (its process is gone)"
        elif len(elsewhere) == 1:  # this host's other ranks live: the one elsewhere stopped
            who = f"rank {elsewhere[0]} on {PEERS[elsewhere[0]][0]} stopped"
        elif not PEERS and ranks.size == 2:  # before the ranks met: the other one
            who = f"rank {1 - me} stopped"
        else:
            who = "another rank stopped" + (f" (one of ranks {', '.join(f'{r} on {PEERS[r][0]}' for r in elsewhere)})"
                                            if elsewhere else "")
        super().__init__(f"rank {me} on {host}: {who}, so every rank of the run stops.")


def split_bytes(video, batch, dim, double, single, out, ranks, itemsize=2):
    """The bytes one rank receives in a DiT forward over `ranks` (sequence parallel): every block's keys and values
    of the other ranks (the slices padded to one size), and the velocity's (out numbers a token) at the end."""
    per = -(-video // ranks)
    return (ranks - 1) * per * batch * itemsize * (2 * dim * (double + single) + out)


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

    def __call__(self, x, tokens=slice(None)):
        """x (B, T, H, W, C) -> the embeddings of its patches, or of those in `tokens` (a rank's slice)."""
        B, T, H, W, C = x.shape
        pt, ph, pw = self.patch
        x = x.reshape(B, T // pt, pt, H // ph, ph, W // pw, pw, C)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # (B, T', H', W', pt, ph, pw, C)
        return self.proj(x.reshape(B, -1, pt * ph * pw * C)[:, tokens])  # (B, T'*H'*W', D)


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
    """Linear -> SiLU -> Linear of a pooled vector: vector_in (CLIP's, Tencent's names in_layer / out_layer) and
    the token refiner's c_embedder (the mean text state, named linear_1 / linear_2)."""

    def __init__(self, in_dim, dim, names=("in_layer", "out_layer")):
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Linear(in_dim, dim))
        setattr(self, names[1], nn.Linear(dim, dim))

    def __call__(self, x):
        first, second = (getattr(self, n) for n in self.names)
        return second(nn.silu(first(x)))


class Modulation(nn.Module):
    """adaLN: SiLU -> Linear(D, n*D) of the conditioning vector, split into n (B, 1, D) pieces; or, given `row`, the
    same pieces of its output computed ahead (a row of the tables of HunyuanVideoTransformer.modulation_tables)."""

    def __init__(self, dim, n):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def __call__(self, vec, row=None):
        row = self.linear(nn.silu(vec)) if row is None else row  # (B, n*D)
        return mx.split(row[:, None], self.n, axis=-1)


# ---------------------------------------------------------------------------------------------------
# DiT: token refiner (txt_in)
# ---------------------------------------------------------------------------------------------------
# The LLM's states (B, L, 4096) are projected to D and refined by 2 small transformer blocks among the
# valid text tokens, conditioned on the timestep and the mask-weighted mean of the raw states.

def _valid_prefix(text_mask, states):
    """Text padding: (mask (B, keep) bool on the host, states (B, keep, ...)) cut after the batch's last valid token.
    The reference keeps all L slots and masks keys past [video ; first count(mask) text tokens]; in the refiner, keys
    where the mask is 0. Slots after the last valid one therefore never reach a valid output, and dropping them
    changes nothing but the work. What is left is masked only when the batch's lengths differ."""
    mask = np.array(text_mask.astype(mx.float32)) > 0  # (B, L) on the host: tiny
    valid = mask.any(axis=0)
    keep = int(np.nonzero(valid)[0][-1]) + 1 if valid.any() else 1
    return mask[:, :keep], states[:, :keep]


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
        q, k, v = _heads(self.self_attn_qkv(self.norm1(x)), 3, self.heads, x.shape[-1])
        x = _gated(x, gate_msa, self.self_attn_proj(_attention(q, k, v, mask)))
        return _gated(x, gate_mlp, self.mlp(self.norm2(x)))


class TokenRefiner(nn.Module):
    def __init__(self, text_dim, dim, heads, num_layers, mlp_ratio=4.0):
        super().__init__()
        self.input_embedder = nn.Linear(text_dim, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.c_embedder = MLPEmbedder(text_dim, dim, names=("linear_1", "linear_2"))
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

def _modulation(module, vec, replace=None, rows=None):
    """A block's modulation pieces at this step, and token replace's for the first frame (or None): from the step's
    rows computed ahead, (row, first row), where given; else from the conditioning vectors, vec and replace[0]."""
    row, first_row = rows or (None, None)
    return module(vec, row), module(replace[0], first_row) if replace else None


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

    def _qkv(self, s, x, mod, first=None, n=0):
        modulated = _modulate_split(x, mod[0], mod[1], first and first[:2], n)
        q, k, v = _heads(getattr(self, f"{s}_attn_qkv")(modulated), 3, self.heads, x.shape[-1])
        return getattr(self, f"{s}_attn_q_norm")(q), getattr(self, f"{s}_attn_k_norm")(k), v

    def _rest(self, s, x, attn, mod, first=None, n=0):
        """Attention output projection and MLP, both gated, for stream s (its first n tokens by `first`)."""
        _, _, gate1, shift2, scale2, gate2 = mod
        first = first or [None] * 6
        x = _gated_split(x, gate1, getattr(self, f"{s}_attn_proj")(attn), first[2], n)
        y = getattr(self, f"{s}_mlp")(_modulate_split(x, shift2, scale2, first[3:5], n))
        return _gated_split(x, gate2, y, first[5], n)

    def __call__(self, img, txt, vec, rope, mask, replace=None, radial=None, rows=None):
        """img (B, Ni, D), txt (B, Nt, D), vec (B, D); rope = (cos, sin) for the Ni video tokens. replace: token
        replace's (timestep-0 vector (B, D), n): the first n video tokens are modulated by it. radial: see
        _attention. rows: {"img_mod", "txt_mod": (row, token replace's row)}, this step's modulation computed
        ahead (HunyuanVideoTransformer.modulation_tables), or None: computed here from vec."""
        img_mod, first = _modulation(self.img_mod, vec, replace, rows and rows["img_mod"])
        txt_mod, _ = _modulation(self.txt_mod, vec, None, rows and rows["txt_mod"])
        n = replace[1] if replace else 0
        attn = self._attend(img, txt, img_mod, txt_mod, rope, mask, first, n, radial)
        ni = img.shape[1]
        return self._rest("img", img, attn[:, :ni], img_mod, first, n), self._rest("txt", txt, attn[:, ni:], txt_mod)

    def _attend(self, img, txt, img_mod, txt_mod, rope, mask, first=None, n=0, radial=None):
        """The joint attention over [video ; text], evaluated on its own: its q, k, v, norms and rotations (this
        function's) are freed before the MLPs run, which lowers the block's peak (the plan counts the halves)."""
        qi, ki, vi = self._qkv("img", img, img_mod, first, n)
        qi, ki = _rope(qi, *rope), _rope(ki, *rope)  # RoPE on video only
        qt, kt, vt = self._qkv("txt", txt, txt_mod)
        attn = _attention(mx.concatenate([qi, qt], axis=2), mx.concatenate([ki, kt], axis=2),
                          mx.concatenate([vi, vt], axis=2), mask, radial)
        mx.eval(attn)
        return attn


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

    def __call__(self, x, vec, rope, mask, replace=None, radial=None, rows=None):
        """x (B, Ni + Nt, D); rope covers all tokens, identity on the text rows. replace, radial: as DoubleBlock's;
        rows: {"modulation": (row, token replace's row)} or None, as DoubleBlock's."""
        (shift, scale, gate), first = _modulation(self.modulation, vec, replace, rows and rows["modulation"])
        first, n = (first, replace[1]) if replace else ([None] * 3, 0)
        attn, mlp = self._attend(x, shift, scale, rope, mask, first[:2], n, radial)
        return _gated_split(x, gate, self.linear2(mx.concatenate([attn, mlp], axis=-1)), first[2], n)

    def _attend(self, x, shift, scale, rope, mask, first=None, n=0, radial=None):
        """Attention and the GELU of the MLP branch, evaluated on their own: linear1's output and the q, k, v
        made from it (this function's) are freed before linear2 runs (the plan counts the two halves)."""
        h = self.linear1(_modulate_split(x, shift, scale, first, n))  # (B, N, 3D + mlp)
        q, k, v = _heads(h, 3, self.heads, self.dim)  # views of h
        q, k = _rope(self.q_norm(q), *rope), _rope(self.k_norm(k), *rope)
        out = _attention(q, k, v, mask, radial), nn.gelu_approx(h[..., 3 * self.dim:])
        mx.eval(out)
        return out


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

_MODULATION = re.compile(r"(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.\d+\."
                         r"(img_mod|txt_mod|modulation|norm1|norm1_context|norm)\.linear\.")


def _is_modulation(name):
    """Whether a DiT tensor (Tencent or diffusers name, whole model or one block) belongs to a block's adaLN
    modulation: img_mod, txt_mod, modulation (diffusers: norm1, norm1_context, norm)."""
    return bool(_MODULATION.match(name) or re.match(r"(img_mod|txt_mod|modulation)\.linear\.", name))


# what DiT.embed gives its blocks: the tokens and vectors, the step's modulation rows and attention pattern, and the
# split of the video's tokens over ranks (SequenceSplit, or None in one process)
Tokens = namedtuple("Tokens", "img txt vec rope mask shape replace radial modulation split")


class StepModulation(namedtuple("StepModulation", "tables step rows")):
    def block(self, kind, i):
        """Block i's rows at this step: {name: (row (b, n*D), token replace's row or None)}."""
        firsts = self.tables.firsts.get((kind, i), {})
        return {name: (table[self.step][self.rows], firsts[name][self.rows] if name in firsts else None)
                for name, table in self.tables.tables[kind, i].items()}


class ModulationTables:
    """One generation's adaLN modulation, every block's for every step (HunyuanVideoTransformer.modulation_tables):
    tables {(kind, i): {name: (steps, B, n*D)}}, and token replace's timestep-0 rows {(kind, i): {name: (B, n*D)}}."""

    def __init__(self, tables, firsts):
        self.tables, self.firsts = tables, firsts

    def at(self, step, rows=slice(None)):
        """What a forward at `step` over the batch's `rows` (true CFG's branches one after the other) takes."""
        return StepModulation(self, step, rows)


def dit_work(tokens, dim=3072, mlp=12288, double=20, single=40, pairs=None, sparse=0):
    """(attention, linear) FLOP of the DiT's blocks over `tokens` (video + valid text): their token-wise linear
    layers (2 per multiply-add) and attention (Q K^T and A V: 4 x dim per query-key pair; tokens^2 pairs, or
    `pairs` in `sparse` of the layers). The embedders, the refiner and the final layer are under 0.1% at real
    sizes and not counted. 544x960x129 (N = 67,576 with 256 text tokens): 4.3 PFLOP a forward, 78.5% attention."""
    linear = double * (4 * dim * dim + 2 * dim * mlp) + single * (dim * (3 * dim + mlp) + (dim + mlp) * dim)
    layers = double + single
    attention = 4 * dim * (tokens * tokens * (layers - sparse) + (pairs or 0) * sparse)
    return attention, 2 * tokens * linear


def dit_flops(tokens, dim=3072, mlp=12288, double=20, single=40):
    """FLOP of a dense forward of the DiT's blocks: dit_work's sum."""
    return sum(dit_work(tokens, dim, mlp, double, single))



class HunyuanVideoTransformer(nn.Module):
    """HYVideo-T/2-cfgdistill. The defaults are the real model; tests build smaller ones by keyword.
    The keywords are diffusers' config names, so a diffusers config.json passes straight through."""

    def __init__(self, in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                 num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
                 patch_size_t=1, guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                 rope_theta=256.0, rope_axes_dim=(16, 56, 56), image_condition_type=None):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        if image_condition_type not in (None, "token_replace", "latent_concat"):
            raise HunyuanVideoError(f"image_condition_type {image_condition_type!r}: HunyuanVideo-I2V uses "
                                    f"token_replace or latent_concat (or none, for text to video).")
        # token_replace (HunyuanVideo-I2V): the clean first frame's tokens modulated at timestep 0; latent_concat
        # (its 33-channel variant) needs nothing here: the image comes in as input channels
        self.image_condition_type = image_condition_type
        if sum(rope_axes_dim) != attention_head_dim or any(d % 2 for d in rope_axes_dim):
            raise HunyuanVideoError(f"rope_axes_dim {tuple(rope_axes_dim)} must be even numbers adding up to "
                                    f"the head width {attention_head_dim}.")
        self.patch = (patch_size_t, patch_size, patch_size)
        self.block_args = (dim, num_attention_heads, mlp_ratio)  # DoubleBlock's and SingleBlock's
        self.in_channels, self.out_channels = in_channels, out_channels
        self.rope_axes_dim = tuple(rope_axes_dim)
        self.rope_theta = float(rope_theta)
        self.img_in = PatchEmbed(in_channels, dim, self.patch)
        self.txt_in = TokenRefiner(text_embed_dim, dim, num_attention_heads, num_refiner_layers)  # its MLP: always 4x
        self.time_in = TimestepEmbedder(dim)
        if pooled_projection_dim:  # (HunyuanVideo 1.5 has no pooled vector)
            self.vector_in = MLPEmbedder(pooled_projection_dim, dim)
        if guidance_embeds:
            self.guidance_in = TimestepEmbedder(dim)
        self.double_blocks = [DoubleBlock(dim, num_attention_heads, mlp_ratio) for _ in range(num_layers)]
        self.single_blocks = [SingleBlock(dim, num_attention_heads, mlp_ratio) for _ in range(num_single_layers)]
        self.final_layer = FinalLayer(dim, out_channels * self.patch[0] * self.patch[1] * self.patch[2])

    diffusers_class = "HunyuanVideoTransformer3DModel"  # the _class_name of its config.json in diffusers' layout
    family = "HunyuanVideo (13B)"  # what a DiT file or LoRA of another of the family's models is told (dit_family)

    @staticmethod
    def names(weights):
        """A checkpoint's tensors (all of them, or one block's) under this model's names, whatever its layout."""
        return _tencent_names(weights)

    @staticmethod
    def shapes(weights):
        """The constructor's keywords read off the tensors' shapes (this model's names)."""
        return _transformer_shapes(weights)

    @staticmethod
    def diffusers_names():
        """The rows that rename diffusers' layout to this model's names (a LoRA's keys too): _FROM_DIFFUSERS."""
        return _FROM_DIFFUSERS

    @staticmethod
    def original_names():
        """The rows that fuse pieces of Tencent's layout into this model's layers (a LoRA's keys too): none here,
        Tencent's names are this model's."""
        return []

    @staticmethod
    def diffusers_config(config):
        """A DiT folder's config.json in diffusers' names (this model's keywords): here as it is."""
        return config

    saved = ("image_condition_type",)  # the settings a converted checkpoint's config.json keeps, besides RoPE's

    def settings(self):
        """What a converted checkpoint's config.json says beyond the tensors' shapes."""
        return {"rope_axes_dim": list(self.rope_axes_dim), "rope_theta": self.rope_theta,
                **{name: getattr(self, name) for name in self.saved}}

    # Blocks whose weights stay on disk until used (set by load_transformer): read_block(kind, i, keep) gives a
    # fresh block of that kind with the weights keep(name) admits read from disk now, prepared as at load. With
    # `streamed` (low_memory) every block is read so when it runs and dropped after it; otherwise it serves
    # modulation_tables, whose adaLN weights are read block by block and dropped (the model's own stay unread).
    read_block = None
    streamed = False

    @property
    def dtype(self):
        return self.img_in.proj.weight.dtype

    @property
    def depth(self):
        """(double blocks, single blocks): what a full forward runs."""
        return len(self.double_blocks), len(self.single_blocks)

    def _run(self, kind, i, *args, fn=None, read=None):
        """Call block i of `kind` (or fn(block, *args), for a part of it) and evaluate its output. One block's
        intermediates (half of them: a block evaluates its attention first) are then all that is alive (the
        memory plan counts them) and no GPU command buffer spans more than a block. read(name): the weights to read
        from disk just before (read_block) and drop just after, the block holding again what it held."""
        block = getattr(self, kind)[i]
        held = None
        if read is not None:
            fresh = self.read_block(kind, i, read)
            held = [(k, v) for k, v in tree_flatten(block.parameters()) if k in fresh]
            block.update(tree_unflatten(list(fresh.items())))
        out = fn(block, *args) if fn else block(*args)
        mx.eval(out)
        if held is not None:  # placeholders, or weights never read: the ones just used are freed
            block.update(tree_unflatten(held))
        return out

    def __call__(self, latents, timestep, text_states, text_mask, pooled, guidance=None, modulation=None,
                 radial=None, split=None):
        """latents (B, T, H, W, C) (with token replace, the first latent frame the clean image's); timestep (B,)
        in 0..1000; text_states (B, L, text_dim); text_mask (B, L), 1 = valid; pooled (B, pooled_dim); guidance
        (B,) already x1000, or None for a checkpoint without a guidance embedding. The step's state, all of it
        here: modulation, this step's rows of modulation_tables (their .at(step, rows)), or None: computed from
        the weights; radial, the step's RadialAttention, or None: dense attention. split: a SequenceSplit (this
        rank's video tokens; the latents are whole), or None. Returns the velocity (B, T, H, W, C), model dtype,
        whole. In three parts, which the step caches call one by one: embed, blocks, final."""
        tokens = self.embed(latents, timestep, text_states, text_mask, pooled, guidance, modulation, radial, split)
        img, txt = tokens.img, tokens.txt
        tokens = tokens._replace(img=None, txt=None)  # each block's input is freed once the next has run
        return self.final(self.blocks(tokens, img, txt)[0], tokens)

    def embed(self, latents, timestep, text_states, text_mask, pooled, guidance=None, modulation=None, radial=None,
              split=None):
        """The embedders and the token refiner: Tokens(img (B, Ni, D), txt (B, Nt, D), vec (B, D), the RoPE
        tables, the attention mask or None, the latents' shape, token replace's (vector, n) or None, and the
        step's modulation rows, attention pattern and split as given). With a split, img and the RoPE tables' video
        rows are this rank's tokens', and token replace's n counts its first frame's tokens among them."""
        B, T, H, W, C = latents.shape
        pt, ph, pw = self.patch
        if T % pt or H % ph or W % pw:
            raise HunyuanVideoError(f"latent size {T}x{H}x{W} (frames x height x width) must be a multiple of "
                                    f"the patch {pt}x{ph}x{pw}: use a video height and width divisible by 16.")
        if "guidance_in" in self and guidance is None:
            raise HunyuanVideoError("this checkpoint embeds the guidance scale: pass guidance (B,), the scale x 1000.")
        dtype = self.dtype
        timestep = timestep.astype(mx.float32)
        vec = self.conditioning(timestep, pooled, guidance)  # the final layer's (and the blocks', unless tabulated)
        txt, mask = self.text(text_states, text_mask, timestep, pooled)  # (B, keep, D), each row's valid ones first
        keep, counts = mask.shape[1], mask.sum(axis=1)  # counts (B,)
        ni = (T // pt) * (H // ph) * (W // pw)  # the video's tokens
        if split is not None and split.video != ni:
            raise HunyuanVideoError(f"the sequence split was set up for {split.video} video tokens, not {ni}: make it "
                                    f"for this video's size.")
        start, end = (split.start, split.end) if split is not None else (0, ni)
        img = self.img_in(latents.astype(dtype), slice(start, end))  # (B, end - start, D)
        replace = None
        if self.image_condition_type == "token_replace":  # the first latent frame's tokens: (H/ph) (W/pw)
            replace = (self.first_frame_conditioning(pooled), min(max((H // ph) * (W // pw) - start, 0), end - start))
        # the embedders and the refiner on their own, before the blocks (see _run)
        mx.eval([vec, txt, img] + ([replace[0]] if replace else []))

        rope = _rope_table((T // pt, H // ph, W // pw), self.rope_axes_dim, self.rope_theta, keep)
        if split is not None:  # this rank's video rows, then the text's
            rope = tuple(mx.concatenate([a[start:end], a[ni:]]) for a in rope)
        attn_mask = None
        if (counts != keep).any():
            attn_mask = mx.array(np.arange(ni + keep)[None] < (ni + counts)[:, None])[:, None, None, :]  # (B,1,1,N)
        if radial is not None and radial.video != ni:
            raise HunyuanVideoError(f"Radial Attention was set up for {radial.video} video tokens, not {ni}: make it "
                                    f"for this video's size.")
        return Tokens(img, txt, vec, rope, attn_mask, latents.shape, replace, radial, modulation, split)

    def text(self, text_states, text_mask, timestep, pooled):
        """The text stream: the LLM's states refined, (B, keep, D), and its mask (B, keep) bool on the host, True
        for each row's first count tokens (the valid ones)."""
        mask, text_states = _valid_prefix(text_mask, text_states)
        return self.txt_in(text_states.astype(self.dtype), timestep, mask), mask

    def conditioning(self, timestep, pooled, guidance=None):
        """The conditioning vector (B, D) of every adaLN modulation: time_in(t) + guidance_in(g) +
        vector_in(pooled), summed in the reference's order."""
        vec = self.time_in(timestep.astype(mx.float32), self.dtype)
        if "guidance_in" in self:
            vec = vec + self.guidance_in(guidance.astype(mx.float32), self.dtype)
        return vec + self.vector_in(pooled.astype(self.dtype))

    def first_frame_conditioning(self, pooled):
        """Token replace's conditioning vector (B, D): time_in at timestep 0 + vector_in(pooled), no guidance (as
        the reference's HunyuanVideoConditionEmbedding makes it)."""
        t0 = self.time_in(mx.zeros((pooled.shape[0],), mx.float32), self.dtype)
        return t0 + self.vector_in(pooled.astype(self.dtype))

    def modulation_tables(self, vecs, first=None):
        """Every block's adaLN modulation for every step of one generation, computed ahead from the steps'
        conditioning vectors vecs (steps, B, D) (first (B, D): token replace's, or None): ModulationTables,
        whose .at(step, rows) is a forward's `modulation`. Built block by block; where the model reads its
        blocks from disk (read_block), each block's modulation weights (3.4 of the 12.8B parameters) are read
        for its table and dropped, so that they are never all held. The model itself is not changed. The
        tables: steps x B x 360 D values (110 MB for 50 steps in bf16)."""
        rows = vecs if first is None else mx.concatenate([vecs, first[None]], axis=0)  # first: the last row
        tables, firsts = {}, {}
        read = _is_modulation if self.read_block is not None else None  # its modulation layers, fresh from disk
        for kind, names in (("double_blocks", ("img_mod", "txt_mod")), ("single_blocks", ("modulation",))):
            for i in range(len(getattr(self, kind))):
                made = self._run(kind, i, rows, read=read,
                                 fn=lambda block, rows: [getattr(block, n).linear(nn.silu(rows)) for n in names])
                for name, t in zip(names, made):
                    tables.setdefault((kind, i), {})[name] = t[:len(vecs)]
                    if first is not None and name != "txt_mod":  # the text is never token replace's
                        firsts.setdefault((kind, i), {})[name] = t[-1]
        return ModulationTables(tables, firsts)

    def blocks(self, tokens, img=None, txt=None, first=0, last=None):
        """The double blocks from `first` (img and txt as they enter it) up to `last`, or else all of them and
        then the single blocks. Returns (img, txt) as they leave the last block run."""
        img = tokens.img if img is None else img
        txt = tokens.txt if txt is None else txt
        cos, sin = tokens.rope
        ni = img.shape[1]
        radial, split = tokens.radial, tokens.split  # sparse from layer radial.dense_layers on (double, then single)

        def sparse(layer):  # the layer's attention: None (dense), radial, or either over the ranks' keys
            pattern = radial if radial is not None and layer >= radial.dense_layers else None
            return pattern if split is None else split.attention(pattern)
        rows = tokens.modulation.block if tokens.modulation is not None else lambda kind, i: None  # noqa: E731
        read = None  # a streamed block's weights, all of them but the modulation when it is tabulated
        if self.streamed:
            read = (lambda name: True) if tokens.modulation is None else (lambda name: not _is_modulation(name))
        for i in range(first, len(self.double_blocks) if last is None else last):
            img, txt = self._run("double_blocks", i, img, txt, tokens.vec, (cos[:ni], sin[:ni]), tokens.mask,
                                 tokens.replace, sparse(i), rows("double_blocks", i), read=read)
        if last is not None or not self.single_blocks:
            return img, txt
        x = mx.concatenate([img, txt], axis=1)  # (B, Ni + Nt, D)
        for i in range(len(self.single_blocks)):
            x = self._run("single_blocks", i, x, tokens.vec, (cos, sin), tokens.mask, tokens.replace,
                          sparse(len(self.double_blocks) + i), rows("single_blocks", i), read=read)
        return x[:, :ni], x[:, ni:]

    def block_modulation(self, kind, i, name, tokens):
        """The modulation pieces of block i's `name` at the step tokens were embedded for (TeaCache's indicator)."""
        rows = tokens.modulation.block(kind, i)[name] if tokens.modulation is not None else None
        return self._run(kind, i, read=_is_modulation if self.streamed and rows is None else None,
                         fn=lambda block: _modulation(getattr(block, name), tokens.vec, None, rows)[0])

    def final(self, img, tokens):
        """The final layer on the video tokens (B, Ni, D) -> the velocity (B, T, H, W, C), gathered from every rank
        when the tokens are split."""
        B, T, H, W, _ = tokens.shape
        pt, ph, pw = self.patch
        x = self.final_layer(img, tokens.vec)  # (B, Ni, C*pt*ph*pw), channel-major
        if tokens.split is not None:
            x = tokens.split.gather(x)
        x = x.reshape(B, T // pt, H // ph, W // pw, self.out_channels, pt, ph, pw)
        x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)  # (B, T', pt, H', ph, W', pw, C)
        return x.reshape(B, T, H, W, self.out_channels)

    def work(self, tokens, double=None, single=None, radial=None):
        """(attention, linear) FLOP of a forward over `tokens` that runs `double` and `single` blocks (all by
        default), with Radial Attention's kept pairs in its sparse layers: dit_work."""
        d, _, mlp_ratio = self.block_args
        double = len(self.double_blocks) if double is None else double
        single = len(self.single_blocks) if single is None else single
        sparse, pairs = 0, None
        if radial is not None:  # the layers run from radial.dense_layers on (double blocks, then single)
            dense = radial.dense_layers
            sparse = max(0, double - dense) + max(0, single - max(0, dense - len(self.double_blocks)))
            pairs = radial.pairs(tokens - radial.video)
        return dit_work(tokens, d, int(d * mlp_ratio), double, single, pairs, sparse)

    def flops(self, tokens, double=None, single=None, radial=None):
        """FLOP of such a forward: the sum of work's."""
        return sum(self.work(tokens, double, single, radial))


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

    def __call__(self, x, cache=None):
        """cache: a dict, for a video decoded a piece of frames at a time (HunyuanVideo 1.5's VAE): the k-1 frames
        before this piece, kept there by the piece before, stand in for the padding in front, so that the pieces
        convolve as the whole video would."""
        k = self.kernel
        if k > 1 and cache is None:
            x = mx.pad(x, [(0, 0), (k - 1, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)], mode="edge")
        elif k > 1:
            before = cache.get(id(self))
            x = mx.concatenate([mx.repeat(x[:, :1], k - 1, axis=1) if before is None else before, x], axis=1)
            cache[id(self)] = mx.contiguous(x[:, 1 - k:])  # a copy: a slice would keep all of x alive
            x = mx.pad(x, [(0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)], mode="edge")
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
        h = self.group_norm(x)
        return x + self.to_out[0](_frame_causal_attention(self.to_q(h), self.to_k(h), self.to_v(h)))


def _frame_causal_attention(q, k, v):
    """One head over all T*H*W positions of q (B, T, H, W, C), each frame seeing itself and earlier ones; k and v
    (B, T', H, W, C) may hold T' - T earlier frames first (a piece decoded after others)."""
    B, T, H, W, C = q.shape
    Tk = k.shape[1]
    query, key = mx.arange(T * H * W) // (H * W) + Tk - T, mx.arange(Tk * H * W) // (H * W)  # each position's frame
    causal = key[None, :] <= query[:, None]  # (N, N'): key frame <= query frame
    q = q.reshape(B, 1, T * H * W, C)  # one head over (t, h, w) positions
    k, v = (a.reshape(B, 1, Tk * H * W, C) for a in (k, v))
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=C ** -0.5, mask=causal).reshape(B, T, H, W, C)


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

    def decode(self, z, tile=None, stride=None, progress=None, ranks=None):
        """z (B, t, h, w, latent), already divided by scaling_factor -> video (B, 4(t-1)+1, 8h, 8w, 3) in
        about [-1, 1], model dtype. tile and stride, (frames, height, width) in pixels, tile it as the
        reference does with the same settings (stride defaults to 3/4 of the tile); tile=None decodes in one
        piece, with no splitting in time either. progress(done, total): after each tile. ranks: several processes
        (Ranks) that share the tiles, each decoding every N-th and gathering the others' (all of them get the
        video)."""
        z = z.astype(self.dtype)
        if tile is None:
            return self._decode(z)
        (ft, fh, fw), (st, sh, sw) = _tile_settings(tile, stride)
        rt, rs = self.ratio
        t, h, w = z.shape[1:4]
        in_space = h > fh // rs or w > fw // rs
        total = (len(range(0, t, st // rt)) if t > ft // rt else 1) * (
            len(range(0, h, sh // rs)) * len(range(0, w, sw // rs)) if in_space else 1)
        done = [0]

        def decode_tile(z):
            out = self._decode(z)
            if progress:
                mx.eval(out)
                done[0] += 1
                progress(done[0], total)
            return out

        def tiled(decode_tile):
            def space(z):
                if in_space:
                    out_hw = (z.shape[2] * rs, z.shape[3] * rs)
                    return _tiled_space(decode_tile, z, (fh // rs, fw // rs), (sh // rs, sw // rs),
                                        (fh - sh, fw - sw), (sh, sw), out_hw)
                return decode_tile(z)

            if t > ft // rt:
                return _tiled_time(space, z, ft // rt, st // rt, ft - st, st, (t - 1) * rt + 1)
            return space(z)

        if progress:
            progress(0, total)
        if ranks is None or ranks.size == 1:
            return tiled(decode_tile)
        # several ranks: the tiles' inputs first (their outputs' shapes are known without decoding: zeros stand in
        # for them while the tiling is walked), then each round of N tiles decoded one per rank and gathered,
        # padded to the round's largest, then the same tiling over the decoded tiles: the one-process video
        inputs, shapes = [], []  # each tile's input and its output's shape (causal: T latent frames, 4T - 3 frames)
        channels = self.decoder.conv_out.conv.weight.shape[0]

        def walk(z):
            inputs.append(z)
            shapes.append((z.shape[0], (z.shape[1] - 1) * rt + 1, z.shape[2] * rs, z.shape[3] * rs, channels))
            return mx.zeros(shapes[-1], self.dtype)
        tiled(walk)
        tiles = []
        for first in range(0, len(inputs), ranks.size):
            round_shapes = shapes[first:first + ranks.size]
            big = [max(n) for n in zip(*round_shapes)]
            i = first + ranks.rank
            mine = self._decode(inputs[i]) if i < len(inputs) else mx.zeros(big, self.dtype)
            got = ranks.gather(mx.pad(mine, [(0, b - n) for b, n in zip(big, mine.shape)])[None])
            tiles += [got[k][tuple(slice(0, n) for n in shape)] for k, shape in enumerate(round_shapes)]
            mx.eval(tiles[first:])
            if progress:
                progress(len(tiles), total)
        order = iter(tiles)
        return tiled(lambda z: next(order))

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


# Two ways to multiply by a quantized weight. MLX's kernel (mx.quantized_matmul) reads the packed weights; the other
# way dequantizes the layer's weight to the activations' dtype just before its matmul, inside the block's own graph
# (so one block's weights at a time, freed once the block is evaluated) and multiplies in bf16. The rule (matmul
# "auto"), from measurements on Apple GPUs (docs/memory.md gives them and their sources): dequantized on an Apple
# GPU other than an M5 when the activations have 768 rows or more (the DiT's always do: rows are video tokens), the
# kernel elsewhere (the CPU and CUDA backends: nothing measured). The results agree to the dtype's rounding.
QUANTIZED_MATMULS = ("auto", "kernel", "dequantized")
DEQUANTIZE_ROWS = 768


def dequantize_matmul(rows, choice="auto"):
    """Whether the DiT's quantized layers run on dequantized weights (True) or MLX's kernel (False): choice
    "kernel" or "dequantized", or "auto" by the rule above for activations of `rows` rows."""
    if choice not in QUANTIZED_MATMULS:
        raise HunyuanVideoError(f"quantized matmul {choice!r}: use one of {', '.join(QUANTIZED_MATMULS)}.")
    if choice != "auto":
        return choice == "dequantized"
    name = mx.device_info().get("device_name", "") if mx.metal.is_available() else ""
    return bool(name) and "M5" not in name and rows >= DEQUANTIZE_ROWS


class QuantizedLinear(nn.QuantizedLinear):
    """A DiT block's quantized Linear layer: MLX's kernel, or (dequantized True) a matmul on its weight dequantized
    to the activations' dtype just in time (see dequantize_matmul)."""

    dequantized = False

    def __call__(self, x):
        if not self.dequantized:
            return super().__call__(x)
        w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits,
                          mode=self.mode)
        y = x @ w.astype(x.dtype).T
        return y + self["bias"] if "bias" in self else y


def set_quantized_matmul(model, dequantized):
    """Every quantized layer of the DiT `model` runs its matmul dequantized (True) or by the kernel (False)."""
    for _, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            module.dequantized = dequantized


def quantize(model, quantization, modulation=False):
    """Quantize model's large Linear layers in place: a HunyuanVideoTransformer (or one of its blocks), a
    LlamaTextEncoder, or a LlavaTextEncoder's language model. Lazy, like everything in MLX: a weight is
    quantized when evaluated."""
    if quantization not in QUANTIZATIONS:
        raise HunyuanVideoError(f"quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}.")
    spec = QUANTIZATIONS[quantization]
    block = isinstance(model, (DoubleBlock, SingleBlock))

    def wanted(path, module):
        if not isinstance(module, nn.Linear) or module.weight.shape[1] % spec["group_size"]:
            return False
        if isinstance(model, HunyuanVideoTransformer) or block:
            return (block or path.startswith(("double_blocks.", "single_blocks."))) and (
                modulation or not _is_modulation(path + "."))
        if isinstance(model, LlavaTextEncoder):  # the vision tower and projector stay as they are
            return path.startswith("language_model.")
        return True

    nn.quantize(model, class_predicate=wanted, **spec)
    if isinstance(model, HunyuanVideoTransformer) or block:  # the DiT's layers can also run dequantized
        for _, module in model.named_modules():
            if type(module) is nn.QuantizedLinear:
                module.__class__ = QuantizedLinear  # the same object and parameters; only its call changes
    model.quantization, model.quantized_modulation = quantization, modulation
    return model


def _quantization_record(model):
    """What config.json says of a quantized model, so that it loads without quantizing again."""
    q = getattr(model, "quantization", None)
    return {"quantization": q, "quantized_modulation": model.quantized_modulation, **QUANTIZATIONS[q]} if q else {}


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


# ---------------------------------------------------------------------------------------------------
# Sampler: step caches (fewer DiT forwards)
# ---------------------------------------------------------------------------------------------------
# Neighbouring steps of a real model's trajectory change little, so a cache reuses what an earlier step
# computed instead of running the 60 blocks, whenever its rule predicts the change to be small. Each cache
# is one object per generation (its state is gone with it) called in place of the DiT at every step; it
# returns the velocity and how many double and single blocks it ran. Each follows its reference exactly:
# First-Block Cache, MagCache and TaylorSeer (lite) as diffusers' hooks (FirstBlockCacheConfig, MagCacheConfig,
# TaylorSeerCacheConfig), TeaCache and EasyCache as their authors' HunyuanVideo scripts. At threshold 0 (for
# TaylorSeer, interval 1) no rule skips a step, and what is computed is what the uncached sampler computes, to
# the bit.

# MagCache's magnitude ratios for HunyuanVideo's 50 steps, calibrated by its authors at 544p and 720p
# (MagCache4HunyuanVideo): the mean ratio of a step's residual norm to the previous step's, token by token
MAG_RATIOS = {
    544: [1.0, 1.06971, 1.29073, 1.11245, 1.09596, 1.05233, 1.01415, 1.05672, 1.00848, 1.03632, 1.02974, 1.00984,
          1.03028, 1.00681, 1.06614, 1.05022, 1.02592, 1.01776, 1.02985, 1.00726, 1.03727, 1.01502, 1.00992,
          1.03371, 0.9976, 1.02742, 1.0093, 1.01869, 1.00815, 1.01461, 1.01152, 1.03082, 1.0061, 1.02162, 1.01999,
          0.99063, 1.01186, 1.0217, 0.99947, 1.01711, 0.9904, 1.00258, 1.00878, 0.97039, 0.97686, 0.94315,
          0.97728, 0.91154, 0.86139, 0.76592],
    720: [1.0, 1.0754, 1.27807, 1.11596, 1.09504, 1.05188, 1.00844, 1.05779, 1.00657, 1.04142, 1.03101, 1.00679,
          1.02556, 1.00908, 1.06949, 1.05438, 1.02214, 1.02321, 1.03019, 1.00779, 1.03381, 1.01886, 1.01161,
          1.02968, 1.00544, 1.02822, 1.00689, 1.02119, 1.0105, 1.01044, 1.01572, 1.02972, 1.0094, 1.02368, 1.0226,
          0.98965, 1.01588, 1.02146, 1.0018, 1.01687, 0.99436, 1.00283, 1.01139, 0.97122, 0.98251, 0.94513,
          0.97656, 0.90943, 0.85703, 0.75456],
}


def _mean_abs(a, b=None, split=None):
    """mean |a - b| (or mean |a|) over every element, in float32; of hidden states (B, tokens, D) split over ranks
    (split: their SequenceSplit), over every rank's."""
    a = a.astype(mx.float32)
    d = mx.abs(a if b is None else a - b.astype(mx.float32))
    if split is None:
        return d.mean().item()
    return split.ranks.sum(d.sum()).item() / (d.shape[0] * split.video * d.shape[2])


def _rel_l1(a, b, split=None):
    """mean |a - b| / mean |b|: how much a step changed something."""
    return _mean_abs(a, b, split) / _mean_abs(b, None, split)


def _full(model, args, i, steps):
    """No cache: the whole DiT."""
    return model(*args), model.depth


class FirstBlockCache:
    """Run the first double block; if its video residual changed by at most `threshold` (relative mean
    absolute difference) since the last step that ran in full, add the remaining blocks' cached residual to
    its output instead of running them (diffusers' FirstBlockCacheConfig; ParaAttention's idea). The text
    stream's residual, which diffusers also keeps, never reaches the output of a skipped step: not kept."""

    default = 0.06  # ParaAttention's for HunyuanVideo

    def __init__(self, threshold, steps, size):
        self.threshold, self.head, self.tail = threshold, None, None

    def __call__(self, model, args, i, steps):
        tokens = model.embed(*args)
        img, txt = model.blocks(tokens, last=1)
        residual = img - tokens.img
        if self.head is not None and _rel_l1(residual, self.head, tokens.split) <= self.threshold:
            return model.final(img + self.tail, tokens), (1, 0)
        self.head = residual
        out, _ = model.blocks(tokens, img, txt, first=1)
        self.tail = out - img
        return model.final(out, tokens), model.depth


class MagCache:
    """From step int(0.2 steps + 0.5) on, accumulate the calibrated magnitude ratio of each step and the error
    |1 - accumulated ratio|; while that error stays within `threshold` and at most K = 6 steps in a row were
    skipped, the video tokens get the last computed residual of all blocks instead of running them (diffusers'
    MagCacheConfig, with the 50-step ratios nearest-interpolated to the step count; the 544p or 720p table,
    whichever is nearer the video's shorter side). Accumulated in float32, as diffusers does. Another model's
    calibration (HunyuanVideo 1.5's) comes as its ratios, K and retention."""

    default = 0.24  # MagCache4HunyuanVideo's, with K 6 and retention 0.2

    def __init__(self, threshold, steps, size, K=6, retention=0.2, ratios=None):
        if ratios is None:
            ratios = MAG_RATIOS[min(MAG_RATIOS, key=lambda h: abs(h - min(size)))]
        table = np.array(ratios, dtype=np.float32)
        index = [len(table) - 1] if steps == 1 else np.round(np.arange(steps) * (len(table) - 1) / (steps - 1))
        self.ratios = table[np.asarray(index, dtype=int)]
        self.threshold, self.K, self.start = np.float32(threshold), K, int(retention * steps + 0.5)
        self.ratio, self.err, self.count, self.residual = np.float32(1), np.float32(0), 0, None

    def __call__(self, model, args, i, steps):
        tokens = model.embed(*args)
        if i >= self.start:
            self.ratio = self.ratio * self.ratios[i]  # since the last step run in full
            self.count += 1
            self.err = self.err + np.abs(np.float32(1) - self.ratio)
            if self.residual is not None and self.err <= self.threshold and self.count <= self.K:
                return model.final(tokens.img + self.residual, tokens), (0, 0)
            self.ratio, self.err, self.count = np.float32(1), np.float32(0), 0
        img, _ = model.blocks(tokens)
        self.residual = img - tokens.img
        return model.final(img, tokens), model.depth


class TeaCache:
    """The first double block's modulated video input (its LayerNorm, then img_mod's shift and scale) is the
    indicator: its relative mean absolute change, rescaled by a polynomial fitted on HunyuanVideo, is
    accumulated, and while the sum stays below `threshold` the video tokens get the last computed residual
    of all blocks. As the authors' script counts steps (modulo steps - 1), the first and the last two steps
    always run in full."""

    COEFFICIENTS = [7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02]
    default = 0.15  # TeaCache4HunyuanVideo's (0.1 is its slower, closer setting)

    def __init__(self, threshold, steps, size):
        self.threshold, self.acc, self.previous, self.residual = threshold, 0.0, None, None

    def __call__(self, model, args, i, steps):
        tokens = model.embed(*args)
        shift, scale, *_ = model.block_modulation("double_blocks", 0, "img_mod", tokens)
        modulated = _modulate(tokens.img, shift, scale)
        skip = False
        if i == 0 or i >= steps - 2:
            self.acc = 0.0
        else:
            self.acc += float(np.polyval(self.COEFFICIENTS, _rel_l1(modulated, self.previous, tokens.split)))
            skip = self.acc < self.threshold
            if not skip:
                self.acc = 0.0
        self.previous = modulated
        if skip:
            return model.final(tokens.img + self.residual, tokens), (0, 0)
        img, _ = model.blocks(tokens)
        self.residual = img - tokens.img
        return model.final(img, tokens), model.depth


class EasyCache:
    """The whole DiT's output change: between the last two steps that ran in full, the transformation rate
    k = mean |delta output| / mean |delta input|; at a later step the predicted change k * mean |delta input|
    / mean |last output| is accumulated, and while the sum stays below `threshold` the output is the input
    plus the last computed (output - input), without running the DiT at all. The first 5 steps and the last
    step always run in full (EasyCache4HunyuanVideo)."""

    default = 0.025  # EasyCache4HunyuanVideo's

    def __init__(self, threshold, steps, size, warmup=5):
        self.threshold, self.warmup, self.acc, self.k = threshold, warmup, 0.0, None
        self.input = self.computed_input = self.output = self.cache = None

    def __call__(self, model, args, i, steps):
        x = args[0]
        skip = False
        if i < self.warmup or i >= steps - 1:
            self.acc = 0.0
        elif self.input is not None and self.output is not None and self.k is not None:
            self.acc += self.k * _mean_abs(x, self.input) / _mean_abs(self.output)
            skip = self.acc < self.threshold
            if not skip:
                self.acc = 0.0
        self.input = x
        if skip:
            return x + self.cache, (0, 0)
        out = model(*args)
        mx.eval(out)
        self.cache = out - x
        if self.output is not None and self.computed_input is not None:
            self.k = _mean_abs(out, self.output) / _mean_abs(x, self.computed_input)
        self.computed_input, self.output = x, out
        return out, model.depth


class TaylorSeer:
    """Forecast the DiT's output by a Taylor expansion in the forward count from the outputs of the forwards
    that ran, as diffusers' TaylorSeerCacheConfig(use_lite_mode=True) hooks it (TaylorSeer, Liu et al. 2025): its
    lite mode skips every block on a forecast forward and forecasts only the final projection's output, so it
    holds order + 1 arrays of the velocity's size (not every module's features). Forward s (counted from 0, as
    the hook counts its calls) runs in full when s < warmup or (s - warmup - 1) is a multiple of `interval`;
    each full forward updates f_0 = its output and f_(k+1) = (f_k - f_k of the previous full forward) / (s - its
    s), up to `order`; a forecast forward gives sum_k f_k (s - s_last)^k / k!. The factors are kept in float32
    (diffusers' default is bf16; they are 64 numbers a token)."""

    default = None  # no threshold: interval, order and warmup instead
    options = dict(interval=5, order=1, warmup=3)  # diffusers' defaults (cache_interval, max_order,
    #                                                disable_cache_before_step)

    def __init__(self, threshold, steps, size, interval, order, warmup):
        self.interval, self.order, self.warmup = interval, order, warmup
        self.count, self.last = -1, None  # the forward now; the last one run in full

    def computes(self, s):
        """Whether forward s runs in full (the hook's rule)."""
        return s < self.warmup or (s - self.warmup - 1) % self.interval == 0

    def __call__(self, model, args, i, steps):
        self.count += 1
        s = self.count
        if self.computes(s):
            out = model(*args)
            factors = [out.astype(mx.float32)]
            for k in range(self.order):
                previous = getattr(self, f"factor{k}", None)
                if self.last is None or previous is None:
                    break
                factors.append((factors[k] - previous) / (s - self.last))
            for k, f in enumerate(factors):
                setattr(self, f"factor{k}", f)
            mx.eval(factors)
            self.last = s
            return out, model.depth
        out, k = 0, 0
        while hasattr(self, f"factor{k}"):
            out = out + getattr(self, f"factor{k}") * ((s - self.last) ** k / math.factorial(k))
            k += 1
        return out.astype(model.dtype), (0, 0)


def cache_state(forward):
    """What a step cache has learnt so far, to continue its generation in another process (resume): its arrays,
    and its numbers as [value, type name]. Its settings (thresholds, MagCache's ratios) come from its name."""
    arrays, numbers = {}, {}
    for k, v in vars(forward).items():  # the uncached forward, a function, has none
        if isinstance(v, mx.array):
            arrays[k] = v
        elif v is None or isinstance(v, (bool, int, float, np.floating)):
            numbers[k] = [None if v is None else v.item() if isinstance(v, np.floating) else v, type(v).__name__]
    return arrays, numbers


def _set_cache_state(forward, arrays, numbers):
    for k, (v, kind) in numbers.items():
        setattr(forward, k, np.float32(v) if kind == "float32" else v)
    for k, v in arrays.items():
        setattr(forward, k, v)


def _prefixed_states(states):
    """[(prefix, (arrays, numbers))] -> one (arrays, numbers), each name under its state's prefix."""
    arrays, numbers = {}, {}
    for prefix, (a, n) in states:
        arrays.update({prefix + name: v for name, v in a.items()})
        numbers.update({prefix + name: v for name, v in n.items()})
    return arrays, numbers


def _joined_cache_state(forwards):
    """cache_state of a generation's forwards: the prompt's branch as it is, the negative prompt's (true CFG) under
    names that begin "uncond."."""
    return _prefixed_states((prefix, cache_state(f)) for prefix, f in zip(("", "uncond."), forwards))


def _split_cache_state(state, branches):
    """The inverse of _joined_cache_state: [(arrays, numbers)] per branch."""
    arrays, numbers = state
    def part(d, uncond):
        return {k.removeprefix("uncond."): v for k, v in d.items() if k.startswith("uncond.") == uncond}
    return [(part(arrays, bool(b)), part(numbers, bool(b))) for b in range(branches)]


STEP_CACHES = {"fbcache": FirstBlockCache, "teacache": TeaCache, "magcache": MagCache, "easycache": EasyCache,
               "taylorseer": TaylorSeer}
CACHES = {name: cache.default for name, cache in STEP_CACHES.items()}  # their published HunyuanVideo defaults


# The sampler's pieces, which the pipeline's denoising loop (HunyuanVideoPipeline._denoise) calls in turn: the
# starting latents, the guided DiT (its branches, caches and attention pattern for the step), the Euler step, and
# the ledger of the work done.

def start_latents(shape, seed, latents, video_latents, sigma, image, condition, resume):
    """The latents the first step starts from, float32 (B, t, h, w, C): seeded noise; for video to video the video
    noised to sigma (flow matching's forward process: sigma noise + (1 - sigma) video); or the latents given
    (resume's, or the caller's). HunyuanVideo-I2V's start as the reference's: 0.999 x + 0.001 image."""
    if latents is None:
        x = mx.random.normal(shape, key=mx.random.key(seed if seed is not None else time.time_ns() % 2**32))
        if video_latents is not None:
            s = float(sigma)
            x = s * x + (1 - s) * mx.broadcast_to(video_latents.astype(mx.float32), shape)
    elif tuple(latents.shape) != shape:
        raise HunyuanVideoError(f"latents of shape {tuple(latents.shape)} do not fit this video: pass latents of "
                                f"shape {shape} (frames, height and width as the request's).")
    else:
        x = latents.astype(mx.float32)
    if condition in ("token_replace", "latent_concat") and not resume:
        t = np.float32(0.999)
        x = x * float(t) + mx.broadcast_to(image, shape) * float(np.float32(1) - t)
    return x


def sampler_step(x, v, sigma, sigma_next, image=None):
    """One Euler step of all frames; with token replace (image: the clean first frame's latents) the first frame
    stays the image's and the others step."""
    if image is None:
        return euler_step(x, v, sigma, sigma_next)
    return mx.concatenate([image, euler_step(x[:, 1:], v[:, 1:], sigma, sigma_next)], axis=1)


def new_ledger(cache=None, attention="dense", resume=None):
    """The work ledger of a generation (pipe.stats["work"], the log line, the video's metadata): DiT forwards
    computed and skipped, which steps ran in full, how quantized layers multiplied (matmul: None when the DiT is
    not quantized, "kernel" or "dequantized"), and the PFLOP computed (pflop, as attention_pflop +
    linear_pflop) and skipped (by step caches and sparse attention, against dense full forwards). resume: a
    checkpoint's ledger to go on from."""
    ledger = dict(cache=cache, attention=attention, matmul=None, forwards=0, skipped=0, pflop=0.0, attention_pflop=0.0,
                  linear_pflop=0.0, skipped_attention_pflop=0.0, skipped_linear_pflop=0.0, steps=[], ranks=1,
                  received_bytes=0)
    if resume:
        ledger.update(json.loads(json.dumps(resume["work"])))  # a copy
    return ledger


def _record(ledger, model, videos, tokens, ran, radial):
    """Add a forward over `videos` videos of `tokens` tokens that ran `ran` (double, single) blocks to the ledger."""
    full, done = model.work(tokens), model.work(tokens, *ran, radial=radial)
    ledger["forwards" if ran == model.depth else "skipped"] += videos
    for name, f, d in zip(("attention", "linear"), full, done):
        ledger[f"{name}_pflop"] += videos * d / 1e15
        ledger[f"skipped_{name}_pflop"] += videos * (f - d) / 1e15
    ledger["pflop"] += videos * sum(done) / 1e15


def _each(x, fn):
    """fn(x) of an array, or of each array of a tuple (a namedtuple stays one; None stays None)."""
    if isinstance(x, tuple):
        return type(x)(*(None if a is None else fn(a) for a in x))
    return fn(x)


class GuidedDiT:
    """The DiT as the sampler calls it at step i: the prompt's branch alone, or with true CFG the negative
    prompt's too (one forward of batch 2, or one after the other, each through its own step cache), at the step's
    modulation row and attention pattern; the guided velocity, float32, and the ledger kept."""

    def __init__(self, model, states, mask, pooled, guidance_scale, sigmas, B, cfg_scale, batched, forwards,
                 sparse, condition, precompute, video_tokens, split=None, pair=None):
        self.model, self.mask, self.B, self.cfg_scale, self.forwards = model, mask, B, cfg_scale, forwards
        self.sparse, self.steps, self.batched = sparse, len(sigmas) - 1, batched
        # over several ranks: this rank's video tokens (split), and with CFG parallel (pair: this rank and its
        # counterpart in the other half of the ranks) the one branch this rank runs, its half's
        self.split, self.pair = split, pair
        self.sigmas = sigmas
        n = states.shape[0]  # B, or 2B with true CFG
        # the reference makes the guidance in the DiT's dtype: 6.0 x 1000 is 6016 in bf16
        self.guidance = mx.full((n,), guidance_scale, dtype=model.dtype) * 1000 if "guidance_in" in model else None
        self.mean_flow = "time_r_in" in model  # 1.5's mean-flow checkpoints: the next step's timestep, not guidance
        # pooled: CLIP's vector (B, 768), or in its place another model's inputs (a tuple of arrays or None: 1.5's)
        self.states, self.vector = states.astype(model.dtype), _each(pooled, lambda a: a.astype(model.dtype))
        self.tables = None  # every step's modulation, computed now (its weights never all held), or at each step
        if precompute:
            first_frame = model.first_frame_conditioning(self.vector) if condition == "token_replace" else None
            self.tables = model.modulation_tables(mx.stack([model.conditioning(timestep(s, n), self.vector,
                                                                               self.second(i, n))
                                                            for i, s in enumerate(sigmas[:-1])]), first_frame)
        self.branches = [slice(None)] if batched or cfg_scale is None else [slice(0, B), slice(B, 2 * B)]
        counts = mask.sum(axis=1)
        self.tokens = [video_tokens + int(counts[rows].max().item()) for rows in self.branches]  # video + text
        if pair is not None:
            self.branches = [self.branches[pair.rank]]

    def second(self, i, n, rows=slice(None)):
        """The DiT's second input at step i for n rows: 13B's embedded guidance; a mean-flow DiT's (1.5's with
        use_meanflow) timestep of the step it moves to, 0 at the last (as the references pass timestep_r)."""
        if self.mean_flow:
            return timestep(self.sigmas[i + 1], n)
        return None if self.guidance is None else self.guidance[rows]

    def __call__(self, inputs, i, ledger):
        model, B = self.model, self.B
        radial = self.sparse.at(i) if self.sparse else None  # the step's attention pattern
        velocities, full = [], True
        k = B * (2 if self.batched else 1)
        done = []
        for rows, forward in zip(self.branches, self.forwards):
            args = (mx.broadcast_to(inputs, (k, *inputs.shape[1:])).astype(model.dtype), timestep(self.sigmas[i], k),
                    self.states[rows], self.mask[rows], _each(self.vector, lambda a: a[rows]), self.second(i, k, rows),
                    None if self.tables is None else self.tables.at(i, rows), radial, self.split)
            v, ran = forward(model, args, i, self.steps)
            mx.eval(v)  # what made it is freed before the other branch runs
            velocities.append(v)
            done.append(ran)
        if self.pair is not None:  # CFG parallel: the two halves' velocities and work, combined once a step
            velocities = mx.split(self.pair.gather(velocities[0]), 2, axis=0)
            done = [tuple(ran) for ran in self.pair.gather(mx.array([done[0]])).tolist()]
        for ran, tokens in zip(done, self.tokens):
            full = full and ran == model.depth
            _record(ledger, model, k // B, tokens, ran, radial)
        ledger["steps"].append(full)
        if self.batched:
            velocities = mx.split(velocities[0], 2, axis=0)
        v = velocities[0].astype(mx.float32)
        if self.cfg_scale is not None:
            v_neg = velocities[1].astype(mx.float32)
            v = v_neg + self.cfg_scale * (v - v_neg)
        return v


# Live preview: the video the current step predicts, without the VAE. The step's estimate of the clean latents
# is x0 = x - sigma * v (flow matching: x = (1 - sigma) x0 + sigma noise, v = noise - x0), and a fixed linear
# map from its 16 channels to RGB approximates the VAE's colours at 1/8 the size: ComfyUI's factors for
# HunyuanVideo (comfy/latent_formats.py, HunyuanVideo.latent_rgb_factors and latent_rgb_factors_bias; 1.5's,
# for its 32 channels at 1/16 the size, are HunyuanVideo15_Apple's).
LATENT_RGB = np.array([[-0.0395, -0.0331, 0.0445], [0.0696, 0.0795, 0.0518], [0.0135, -0.0945, -0.0282],
                       [0.0108, -0.0250, -0.0765], [-0.0209, 0.0032, 0.0224], [-0.0804, -0.0254, -0.0639],
                       [-0.0991, 0.0271, -0.0669], [-0.0646, -0.0422, -0.0400], [-0.0696, -0.0595, -0.0894],
                       [-0.0799, -0.0208, -0.0375], [0.1166, 0.1627, 0.0962], [0.1165, 0.0432, 0.0407],
                       [-0.2315, -0.1920, -0.1355], [-0.0270, 0.0401, -0.0821], [-0.0616, -0.0997, -0.0727],
                       [0.0249, -0.0469, -0.1703]], dtype=np.float32)
LATENT_RGB_BIAS = np.array([0.0259, -0.0192, -0.0761], dtype=np.float32)


# by the latents' channels: 16, HunyuanVideo's; HunyuanVideo15_Apple adds 1.5's 32
LATENT_RGB_FACTORS = {16: (LATENT_RGB, LATENT_RGB_BIAS)}


def latent_preview(latents):
    """Latents in the DiT's space (B, t, h, w, C) -> uint8 (t, h, w, 3) of the first video: ComfyUI's linear
    latent-to-RGB preview for the model of C channels (LATENT_RGB_FACTORS), mapped from [-1, 1] as ComfyUI maps
    it; latents of other widths (the tiny 1.5 demo's 4) show their first three channels."""
    x = np.array(latents[0].astype(mx.float32))
    factors = LATENT_RGB_FACTORS.get(x.shape[-1])
    rgb = x @ factors[0] + factors[1] if factors else x[..., [c % x.shape[-1] for c in range(3)]]  # (t, h, w, 3)
    return (np.clip((rgb + 1) / 2, 0, 1) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# The application, from here on: files, folders and sizes
# ---------------------------------------------------------------------------------------------------
# Above: the model, what a generation computes (the encoders, the DiT, the VAE, quantization, the sampler), which
# takes arrays and numbers. Below: what runs it for a person, which reads files and settings: checkpoints, the
# offline demos, the inputs, the request and its check, the memory plan and the pipeline's stream.


def cache_dir():
    """Where this port keeps what it builds (the tiny checkpoint): $HUNYUAN_APPLE_CACHE, else
    ~/.cache/hunyuan_apple. Hub downloads stay in the Hugging Face cache (~/.cache/huggingface, $HF_HOME)."""
    return Path(os.environ.get("HUNYUAN_APPLE_CACHE") or Path.home() / ".cache" / "hunyuan_apple").expanduser()


# the offline demos: text to video, image to video (HunyuanVideo 1.5's: tiny15, tiny15-i2v)
TINY_MODELS = {"tiny": None, "tiny-i2v": "token_replace", "tiny15": None, "tiny15-i2v": "latents_and_tokens"}


def is_hunyuanvideo15(folder):
    """Whether a checkpoint folder (diffusers' layout) is a HunyuanVideo 1.5: its model_index.json or its DiT's
    config.json names 1.5's classes; or Tencent's own 1.5 folder (HunyuanVideo15_Apple.is_tencent_checkpoint)."""
    import HunyuanVideo15_Apple as H15  # it imports this module

    if H15.is_tencent_checkpoint(folder):
        return True
    for name in ("model_index.json", "transformer/config.json"):
        try:
            if json.loads((Path(folder) / name).read_text()).get("_class_name", "").startswith("HunyuanVideo15"):
                return True
        except (OSError, ValueError, AttributeError):
            pass
    return False


def _pipeline_class(model):
    """The pipeline class of a model (a name or folder) where it can be told before loading: HunyuanVideo 1.5's for
    its demos, hunyuanvideo-community's 1.5 checkpoints and local 1.5 folders, else this module's."""
    if str(model) in ("tiny15", "tiny15-i2v") or str(model).startswith(HUNYUANVIDEO15_HUB) \
            or is_hunyuanvideo15(Path(str(model)).expanduser()):
        import HunyuanVideo15_Apple as H15  # it imports this module
        return H15.HunyuanVideo15Pipeline
    return HunyuanVideoPipeline


def is_tiny(model):
    """Whether a model (a name or folder) is a tiny demo: "tiny", "tiny-i2v", or a folder built (or converted) from
    one."""
    if str(model) in TINY_MODELS:
        return True
    try:
        return json.loads((Path(model).expanduser() / "model_index.json").read_text()).get("tiny_demo") is True
    except (OSError, ValueError, AttributeError):
        return False


def write_atomic(path, write):
    """write(tmp) to a hidden temporary file beside path, then rename it to path: path is always either the
    earlier file or the whole new one. If writing fails (a full disk, say) the temporary file is removed and the
    failure is one sentence naming the file; an interrupt removes it too."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # MLX reports a failed write as a RuntimeError ("[write] Unable to write ...")
        if isinstance(e, OSError) or isinstance(e, RuntimeError) and "write" in str(e).lower():
            why = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise HunyuanVideoError(f"could not write {path} ({why}): free some disk space, or write elsewhere; "
                                    f"the earlier file of that name, if any, is as it was.") from None
        raise


GB = 2 ** 30


def gib(nbytes):
    """Bytes as GiB, labelled, with three significant digits (so a tiny model's megabytes are not 0.0)."""
    return f"{nbytes / GB:.3g} GiB"


# ---------------------------------------------------------------------------------------------------
# Loading: files
# ---------------------------------------------------------------------------------------------------
# Safetensors are read lazily by MLX (a tensor is read from disk when it is evaluated); PyTorch pickles are
# opened weights-only and converted one tensor at a time. fp8 weights (E4M3 or E5M2) are dequantized as
# their makers dequantize them, W = W_fp8.to(bf16) * scale.to(bf16) in bfloat16, with the scale of the layer
# that Tencent's _map.pt or a ComfyUI scaled-fp8 file gives (1 where the file has none): Tencent's own
# values, at bf16's size (quantize them again with quantization=..., at the cost the README states).

_DTYPES = {"F64": mx.float64, "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "I64": mx.int64,
           "I32": mx.int32, "I16": mx.int16, "I8": mx.int8, "U64": mx.uint64, "U32": mx.uint32, "U16": mx.uint16,
           "U8": mx.uint8, "BOOL": mx.bool_, "F8_E4M3": mx.uint8, "F8_E5M2": mx.uint8}  # fp8: the raw bytes
_FP8_SCALES = ("scale_weight", "weight_scale")  # a layer's weight scale: ComfyUI's scaled fp8; newer layouts
_FP8_UNUSED = ("scale_input", "input_scale", "scaled_fp8")  # scales of activations (fp8 matmuls), a marker


def _again(path):
    """How to get a broken checkpoint file back: download it again, or, one of a tiny demo's own files (built here:
    its model_index.json or a file of its components' folders), build it anew."""
    path = Path(path).expanduser().absolute()
    for folder in path.parents:
        if is_tiny(folder) and path.relative_to(folder).parts[0] in ("model_index.json", *COMPONENTS):
            return "the tiny demo is built on this machine: delete its folder and it is built anew"
    return "download it again"


def given_file(path, what, expected):
    """The file a user named (what: "the LoRA", "the image", ...), which must exist and not be a folder: its Path,
    or one sentence saying which and what to pass instead (expected)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise HunyuanVideoError(f"{what} {path} is a folder: pass {expected}.")
    if not path.is_file():
        raise HunyuanVideoError(f"{what} {path} does not exist: check the path.")
    return path


def _safetensors_header(f):
    """{name: (shape, dtype, (start, end))} of a safetensors file and the offset of its data, read without the
    data; HunyuanVideoError in one sentence if the file is cut short or is not safetensors."""
    try:
        with open(f, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
        tensors = {k: (tuple(v["shape"]), v["dtype"], tuple(v["data_offsets"])) for k, v in header.items()
                   if k != "__metadata__"}
        if any(8 + n + end > size for _, _, (_, end) in tensors.values()):
            raise ValueError("tensors past the end of the file")
        unknown = sorted({dtype for _, dtype, _ in tensors.values()} - set(_DTYPES))
        if unknown:
            raise ValueError(f"tensors of type {', '.join(unknown)}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise HunyuanVideoError(f"{f} could not be read as safetensors ({str(e)[:120]}); it is probably truncated "
                                f"or corrupt: {_again(f)}.") from None
    return tensors, 8 + n


def _read_tensors(f, tensors, start):
    """The tensors of a safetensors file that `tensors` lists (entries of its header), read now rather than lazily:
    for the types MLX does not read (fp8 E5M2), and for streamed blocks, whose file must not stay open."""
    out = {}
    with open(f, "rb") as fh:
        for name, (shape, dtype, (a, b)) in tensors.items():
            fh.seek(start + a)
            raw = mx.array(np.frombuffer(fh.read(b - a), dtype=np.uint8))
            out[name] = raw.view(_DTYPES[dtype]).reshape(shape)
    return out


def _fp8_dequantized(weights, dtypes):
    """Replace each fp8 weight by bf16(W_fp8) * bf16(scale), dropping the scales; lazy. dtypes: safetensors names."""
    for name in [k for k in weights if dtypes.get(k, "").startswith("F8_")]:
        raw, layer = weights[name], name.rpartition(".")[0]
        w = mx.from_fp8(raw, mx.bfloat16) if dtypes[name] == "F8_E4M3" else \
            (raw.astype(mx.uint16) << 8).view(mx.float16).astype(mx.bfloat16)  # E5M2 is float16's upper byte
        scale = next((weights.pop(f"{layer}.{s}") for s in _FP8_SCALES if f"{layer}.{s}" in weights), None)
        if scale is not None and scale.size > 1:  # one scale per output row
            scale = scale.reshape(-1, *[1] * (w.ndim - 1))
        weights[name] = w if scale is None else w * scale.astype(mx.bfloat16)
        for s in _FP8_UNUSED:
            weights.pop(f"{layer}.{s}", None)
    weights.pop("scaled_fp8", None)
    return weights


def _read_safetensors(f):
    tensors, start = _safetensors_header(f)
    dtypes = {k: dtype for k, (_, dtype, _) in tensors.items()}
    if "F8_E5M2" in dtypes.values():  # MLX cannot read the file: read it ourselves, all at once
        weights = _read_tensors(f, tensors, start)
    else:
        try:
            weights = mx.load(str(f))
        except Exception as e:  # MLX checks the header and that every tensor lies inside the file
            raise HunyuanVideoError(f"{f} could not be read as safetensors ({e}); it is probably truncated or "
                                    f"corrupt: {_again(f)}.") from None
    return _fp8_dequantized(weights, dtypes)


def _torch():
    try:
        import torch
    except ImportError:
        raise HunyuanVideoError("PyTorch pickles (.pt) are read with torch: install it (pip install torch), or use "
                                "a .safetensors checkpoint.") from None
    return torch


def _load_pt(f):
    """A PyTorch pickle's state dict, opened only with weights_only=True (no code runs) and memory-mapped, so that
    a tensor is read when it is used; the state dict under 'module' (Tencent) or 'state_dict' (training files)."""
    torch = _torch()
    try:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) serialization cannot be memory-mapped
            sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HunyuanVideoError(f"{f} could not be read as a weights-only PyTorch checkpoint "
                                f"({str(e).splitlines()[0][:160]}); it may be truncated or corrupt: download it "
                                f"again.") from None
    for key in ("module", "state_dict"):  # Tencent's DiT nests under 'module'; training files under 'state_dict'
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise HunyuanVideoError(f"{f} holds no state dict: pass a HunyuanVideo checkpoint.")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _read_pt(f):
    """A PyTorch pickle's tensors in MLX, converted one at a time (the peak is the result plus one tensor). fp8
    weights (Tencent's fp8 DiT) are dequantized with the scale of their layer from <name>_map.pt beside it."""
    torch = _torch()
    sd = _load_pt(f)
    fp8 = {k for k, v in sd.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)}
    scales_file = f.with_name(f.stem + "_map.pt")
    if fp8 and not scales_file.exists():
        raise HunyuanVideoError(f"{f} holds fp8 weights whose scales are in {scales_file.name}, which is not beside "
                                f"it: download it too.")
    scales = _load_pt(scales_file) if fp8 else {}
    out = {}
    for k in list(sd):
        v = sd.pop(k)  # torch keeps no reference: each converted tensor is freed once copied to MLX
        if k in fp8:
            layer = k.removesuffix(".weight")
            if layer not in scales:
                raise HunyuanVideoError(f"{scales_file.name} has no scale for {layer}, whose weights in {f.name} are "
                                        f"fp8: the two files do not belong together; download both again.")
            v = v.to(torch.bfloat16) * scales[layer].to(torch.bfloat16)  # Tencent's own dequantization
        if v.dtype == torch.bfloat16:  # numpy has no bfloat16: move the bits
            out[k] = mx.array(v.contiguous().view(torch.int16).numpy()).view(mx.bfloat16)
        elif v.dtype in (torch.float32, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8,
                         torch.int8, torch.bool):
            out[k] = mx.array(v.contiguous().numpy())
        else:
            raise HunyuanVideoError(f"{f} holds {k} as {str(v.dtype).removeprefix('torch.')}, which no HunyuanVideo "
                                    f"checkpoint uses: pass a bf16, fp16, fp32 or Tencent fp8 checkpoint.")
    return out


def _component_files(path, hint):
    """The weight files of a checkpoint file or folder, and the folder's config.json (or {}). hint: what to pass."""
    path = Path(path).expanduser()
    if not path.exists():
        raise HunyuanVideoError(f"{path} does not exist: {hint}.")
    if not path.is_dir():
        if path.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
            raise HunyuanVideoError(f"{path} is neither .safetensors nor .pt: {hint}.")
        return [path], {}
    config = {}
    if (path / "config.json").exists():
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise HunyuanVideoError(f"{path / 'config.json'} is not valid JSON ({e}): {_again(path)}.") from None
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        try:
            shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise HunyuanVideoError(f"{index[0]} is not a valid safetensors index ({e}): {_again(path)}.") from None
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise HunyuanVideoError(f"{path} lacks {len(missing)} of the {len(shards)} shards its index lists "
                                    f"({', '.join(missing[:3])}): it is incomplete; {_again(path)}.")
        return [path / s for s in shards], config
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("mp_rank_00_model_states.pt")) or \
        [f for f in sorted(path.glob("*.pt")) if not f.name.endswith("_map.pt")]  # an fp8 file's scales go with it
    if not files:
        raise HunyuanVideoError(f"{path} holds no .safetensors or .pt weights: {hint}.")
    if len(files) > 1 and files[0].suffix == ".pt":
        raise HunyuanVideoError(f"{path} holds several .pt files ({', '.join(f.name for f in files[:3])}): "
                                f"pass the one to load.")
    return files, config


def _read_weights(path, hint):
    """All tensors of a checkpoint file or folder (lazy for safetensors), and the folder's config.json (or {})."""
    files, config = _component_files(path, hint)
    weights = {}
    for f in files:
        weights.update(_read_safetensors(f) if f.suffix == ".safetensors" else _read_pt(f))
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


def _from_diffusers(sd, tables=_FROM_DIFFUSERS):
    """Rename (and fuse) a diffusers state dict to Tencent's names (tables: _FROM_DIFFUSERS's rows, or another
    model's). Keys it does not know keep their name, so that the strict check reports them."""
    out, groups = {}, {}  # groups: fused Tencent key -> {diffusers module: tensor}
    for key, value in sd.items():
        for scope, target, table in tables:
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
                groups.setdefault((prefix + dst + "." + param, src), {})[module] = (key, value)
            else:
                out[prefix + dst + "." + param] = value
            break
        else:
            out[key] = value
    for (key, parts), found in groups.items():
        if len({v.shape[1:] for _, v in found.values()}) > 1:  # pieces that cannot be fused: name them
            raise HunyuanVideoError("the checkpoint's tensors do not fit together: " + ", ".join(
                f"{name} {tuple(v.shape)}" for name, v in found.values()) + "; check that it is a complete "
                "checkpoint of the right model, or one written by convert_weights.py.")
        if len(found) == len(parts):
            out[key] = mx.concatenate([found[p][1] for p in parts], axis=0)
        else:  # incomplete: leave the pieces under names the strict check will report
            out.update({f"{key} (part {p})": v for p, (_, v) in found.items()})
    for param in ("weight", "bias"):  # diffusers' final modulation is (scale, shift); Tencent's (shift, scale)
        key = f"final_layer.adaLN_modulation.1.{param}"
        if key in out and f"norm_out.linear.{param}" in sd:
            scale, shift = mx.split(out[key], 2, axis=0)
            out[key] = mx.concatenate([shift, scale], axis=0)
    return out


def _to_diffusers(sd, tables=_FROM_DIFFUSERS):
    """Tencent names -> diffusers names, splitting the fused tensors: the inverse of _from_diffusers."""
    out = {}
    dim = sd["img_in.proj.weight"].shape[0]
    for key, value in sd.items():
        if key.startswith("final_layer.adaLN_modulation.1."):  # (shift, scale) -> (scale, shift)
            value = mx.concatenate(mx.split(value, 2, axis=0)[::-1], axis=0)
        for scope, target, table in tables:
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


def _same_kind(a, b):
    """Floating point where floating point is expected; quantized data (integers) of exactly the expected type."""
    return mx.issubdtype(a, mx.floating) and mx.issubdtype(b, mx.floating) or a == b


def _cast(weights, dtype):
    """Floating tensors to dtype; quantized data (integers) as it is. Lazy."""
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def _load_strict(model, weights, dtype, source, prepare=None, skip=lambda name: False, progress=None):
    """Put weights into model, refusing any missing, unexpected, mis-shaped or mis-typed key in one sentence. Then
    prepare(model) (quantization, say) and evaluate one tensor at a time: the model holds the only
    references to the lazily read sources, so each is freed once used and the peak stays near the result.
    Parameters for which skip(name) is true stay lazy: read when first used."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = [f"{k} {tuple(weights[k].shape)} instead of {tuple(expected[k].shape)}"
                 for k in expected if k in weights and weights[k].shape != expected[k].shape]
    def name(dtype):
        return "floating point" if mx.issubdtype(dtype, mx.floating) else str(dtype).removeprefix("mlx.core.")
    mistyped = [f"{k} {str(weights[k].dtype).removeprefix('mlx.core.')} where {name(p.dtype)} is expected"
                for k, p in expected.items() if k in weights and not _same_kind(weights[k].dtype, p.dtype)]
    problems = [f"{len(names)} {what} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
                for what, names in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("mis-shaped tensors", misshaped), ("tensors of the wrong type", mistyped))
                if names]
    if problems:
        raise HunyuanVideoError(f"{source} does not fit the model: {'; '.join(problems)}; check that it is a "
                                f"complete checkpoint of the right model, in bf16, fp16, fp32 or fp8, or one written "
                                f"by convert_weights.py.")
    model.update(tree_unflatten(list(_cast(weights, dtype).items())))
    weights.clear()
    if prepare is not None:
        prepare(model)
    read = [p for k, p in tree_flatten(model.parameters()) if not skip(k)]  # skipped: read later, or never
    for p in _counted(read, progress):  # read from disk (and quantized) now, one tensor at a time
        mx.eval(p)
    return model


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
# Loading: LoRA
# ---------------------------------------------------------------------------------------------------
# A LoRA adds scale x up @ down (rank r) to some of the DiT's Linear layers. Four key layouts are shared; each
# key is read by its own (the layout is in the key), and every key is used or reported:
#   diffusers / PEFT   transformer.transformer_blocks.0.attn.to_q.lora_A.weight   diffusers names; q, k, v apart
#   original           diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight (or transformer.): Tencent names
#   musubi / kohya     lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight, .lora_up.weight, .alpha
#   ComfyUI            diffusion_model.double_blocks.0.img_mod.lin.lora_down.weight, img_mlp.0; .diff_b, .diff
# HunyuanVideo 1.5's original layout (Tencent's own training, musubi's) has q, k and v apart: img_attn_q, _k, _v.
# scale = the user's x alpha / r where the file gives an alpha (a kohya alpha tensor, or the LoraConfig that PEFT
# and diffusers save in the file's metadata; else 1, as diffusers' loaders take alpha = r). A piece of a fused
# layer (diffusers' to_k, 1.5's img_attn_k: rows D..2D of img_attn_qkv) adds to those rows only. Into float weights
# the delta is merged on load, in float32, before any quantization; beside a layer that a converted checkpoint
# holds quantized it stays a low-rank branch (LoRAQuantizedLinear), never a dequantized copy.

_LORA_SUFFIXES = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
                  "lora_B.bias": "up_bias", "alpha": "alpha", "diff": "diff", "diff_b": "diff_b"}
_LORA_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
# ComfyUI's module names (its Flux-style blocks) -> Tencent's, anchored at the name's end
_COMFY_NAMES = [(r"_mod\.lin$", "_mod.linear"), (r"(^|\.)modulation\.lin$", r"\1modulation.linear"),
                (r"_attn\.qkv$", "_attn_qkv"), (r"_attn\.proj$", "_attn_proj"), (r"mlp\.0$", "mlp.fc1"),
                (r"mlp\.2$", "mlp.fc2"), (r"(time_in|guidance_in|t_embedder)\.in_layer$", r"\1.mlp.0"),
                (r"(time_in|guidance_in|t_embedder)\.out_layer$", r"\1.mlp.2"),
                (r"c_embedder\.in_layer$", "c_embedder.linear_1"), (r"c_embedder\.out_layer$", "c_embedder.linear_2")]
_DIFFUSERS_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                    "time_text_embed.", "norm_out.", "proj_out",
                    "time_embed.", "context_embedder_2.", "image_embedder.")  # (the last three: HunyuanVideo 1.5's)

# One LoRA piece of a layer: the parameter ("weight" or "bias") and its output rows [start, stop) it adds to
# (stop None: to the end), down (r, in) or None, and up: (rows, r) already scaled, or the delta itself
LoraPart = namedtuple("LoraPart", "param start stop down up")


def _lora_layers(model):
    """{Tencent name: (out, in)} of the DiT's Linear layers (built, not loaded: the shapes are all that is read)."""
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _piece_rows(j, parts, dim):
    """The output rows [start, stop) of a fused layer that piece j of `parts` (its pieces' names) fills: dim each,
    the last of four (a single block's MLP) to the end."""
    return (j * dim, None if j == 3 else (j + 1) * dim) if len(parts) > 1 else (0, None)


def _lora_pieces(layers, dim, tables):
    """{piece's module name: (fused layer, first row, last row or None)} for the layers a DiT fuses from pieces of
    its original layout (tables: its original_names(); 1.5's q, k and v): a LoRA trained on that layout names the
    pieces."""
    pieces = {}
    for scope, target, table in tables:
        fused = {dst: src for src, dst in table.items() if isinstance(src, tuple)}  # layer -> its pieces' names
        for layer in layers:
            m = _match_scope(target, layer + ".weight")
            if m and m.group(m.lastindex - 1) in fused:
                *idx, name, _ = m.groups()
                where = scope.format(*idx) + "." if scope else ""
                pieces.update({where + piece: (layer, *_piece_rows(j, fused[name], dim))
                               for j, piece in enumerate(fused[name])})
    return pieces


def _lora_target(module, layers, dim, flat, tables=_FROM_DIFFUSERS, pieces=None):
    """A LoRA key's module (prefix stripped) -> (Tencent layer, first row, last row or None, from diffusers), or
    None where it names no layer of this DiT. flat: {kohya name: module name}. tables: the DiT's renaming from
    diffusers' layout (its diffusers_names()); pieces: _lora_pieces's, for its original layout's pieces."""
    pieces = pieces or {}
    if module.startswith("lora_unet_"):  # kohya: the module path with every '.' written '_'
        module = flat.get(module[10:], "")
    elif module.startswith(_DIFFUSERS_ROOTS):
        for scope, target, table in tables:
            m = _match_scope(scope, module + ".weight")
            if not m:
                continue
            *idx, name, _ = m.groups()
            for src, dst in table.items():
                parts = src if isinstance(src, tuple) else (src,)
                if name in parts:
                    layer = (target.format(*idx) + "." if target else "") + dst
                    return (layer, *_piece_rows(parts.index(name), parts, dim), True) if layer in layers else None
        return None
    elif module not in layers and module not in pieces:  # ComfyUI's names (its mlp.0 is not Tencent's time_in.mlp.0)
        for pattern, repl in _COMFY_NAMES:
            module = re.sub(pattern, repl, module)
    if module in pieces:
        return (*pieces[module], False)
    return (module, 0, None, False) if module in layers else None


def _lora_scale(text, what):
    try:
        scale = float(text)
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale):
        raise HunyuanVideoError(f"{what}: the LoRA's scale {text!r} is not a number: give one such as 0.8 "
                                f"(1.0 by default).")
    return scale


def parse_lora(text):
    """A command line's FILE[:SCALE] -> [file, scale]; the scale is 1.0 unless given after the last ':'."""
    path, sep, scale = text.rpartition(":")
    if not sep or Path(text).exists() or "/" in scale:
        return [text, 1.0]
    return [path, _lora_scale(scale, f"{{loras}} {text}")]


def _linear_order(w):
    """A Conv3d's weight (O, C, t, h, w), img_in's as checkpoints and LoRAs hold it, in the order of the Linear
    layer that stands for it here, (O, t*h*w*C); anything else as it is."""
    return w.transpose(0, 2, 3, 4, 1).reshape(w.shape[0], -1) if w.ndim == 5 else w


def _peft_config(path):
    """The LoraConfig that diffusers and PEFT save in a LoRA's safetensors metadata ("lora_adapter_metadata": a
    model's save_lora_adapter, such as HunyuanVideo 1.5's training script, unprefixed; a pipeline's save_lora_weights
    under "transformer."), or {}."""
    if path.suffix != ".safetensors":
        return {}
    with open(path, "rb") as fh:  # the header was read whole before: the file is safetensors
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    try:
        config = json.loads((header.get("__metadata__") or {}).get("lora_adapter_metadata", "{}"))
    except (TypeError, ValueError):
        return {}
    if any(k.startswith("transformer.") for k in config):
        config = {k[12:]: v for k, v in config.items() if k.startswith("transformer.")}
    return config if isinstance(config, dict) else {}


def _peft_scaling(config, module, r):
    """PEFT's scaling of a LoRA module of rank r under a saved LoraConfig: lora_alpha / r (/ sqrt(r) with
    use_rslora), with alpha_pattern's alpha for a module it names; 1 without a config (alpha = r, as diffusers'
    loaders take it)."""
    if not config:
        return 1.0
    patterns = config.get("alpha_pattern") or {}
    alpha = next((a for p, a in patterns.items() if re.fullmatch(rf"(.*\.)?(?:{p})", module)),
                 config.get("lora_alpha", r))
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def read_lora(path, scale, layers, dim, ignore_unmatched=False, tables=_FROM_DIFFUSERS, family=None, original=()):
    """A LoRA file (safetensors, or a weights-only .pt) -> {Tencent layer: [LoraPart, ...]} for a DiT whose
    Linear layers are `layers` ({name: (out, in)}), width `dim`, renaming from diffusers' layout `tables` (its
    diffusers_names()), from its original layout `original` (its original_names()) and family (its family,
    dit_family's words). Keys that match no layer stop the load in
    one sentence (a warning with ignore_unmatched); a LoRA that matches nothing, whose shapes do not fit, or whose
    keys are another of the family's models', is for another model and is refused either way."""
    path = given_file(path, "the LoRA", "a LoRA file (.safetensors, or a .pt)")
    scale = _lora_scale(scale, path.name)
    tensors, _ = _read_weights(path, "pass a LoRA .safetensors file")
    made_for = dit_family(tensors)
    if family and made_for and made_for != family:
        raise HunyuanVideoError(f"the LoRA {path.name} is for {made_for}'s DiT, and this model is {family}: use a "
                                f"LoRA made for {family}.")
    integers = sorted(k for k, v in tensors.items() if not mx.issubdtype(v.dtype, mx.floating))
    if integers:
        raise HunyuanVideoError(f"the LoRA {path.name} holds integer tensors ({', '.join(integers[:3])}): LoRAs are "
                                f"read in bf16, fp16 or fp32; pass a float LoRA.")
    pieces, peft = _lora_pieces(layers, dim, original), _peft_config(path)
    modules, unmatched, flat = {}, [], {name.replace(".", "_"): name for name in [*layers, *pieces]}
    for key, value in tensors.items():
        name = next((key[len(p):] for p in _LORA_PREFIXES if key.startswith(p)), key)
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith("." + s)), None)
        target = suffix and _lora_target(name[:-len(suffix) - 1], layers, dim, flat, tables, pieces)
        if not target:
            unmatched.append(key)
        else:
            modules.setdefault(target, {"module": name[:-len(suffix) - 1]})[_LORA_SUFFIXES[suffix]] = value
    if not modules:
        some = ", ".join(sorted(tensors)[:3])
        raise HunyuanVideoError(f"the LoRA {path.name} matches no layer of HunyuanVideo's DiT (its keys start {some}): "
                                f"it is a LoRA for another model.")
    if unmatched:
        said = (f"{len(unmatched)} of the {len(tensors)} keys of the LoRA {path.name} match no layer of the DiT "
                f"({', '.join(sorted(unmatched)[:3])}{', ...' if len(unmatched) > 3 else ''})")
        if not ignore_unmatched:
            raise HunyuanVideoError(f"{said}: it may be for another model; set {{lora_ignore_unmatched}} to load the "
                                    f"rest anyway.")
        warnings.warn(HunyuanVideoWarning(f"{said}: they are ignored ({{lora_ignore_unmatched}})."))
    lora = {}
    for (layer, start, stop, swap), t in modules.items():
        out, fan_in = layers[layer]
        rows = (stop or out) - start
        parts = []
        if "down" in t or "up" in t:
            if "down" not in t or "up" not in t:
                raise HunyuanVideoError(f"the LoRA {path.name} has only one of the two matrices for {layer}: the file "
                                        f"is incomplete; download it again.")
            down, up = t["down"].astype(mx.float32), t["up"].astype(mx.float32)
            r = down.shape[0]
            down = _linear_order(down).reshape(r, -1)  # (r, in)
            up = up.reshape(up.shape[0], -1)  # (rows, r)
            if down.shape[1] != fan_in or up.shape != (rows, r):
                raise HunyuanVideoError(f"the LoRA {path.name} gives {layer} matrices of {tuple(up.shape)} and "
                                        f"{tuple(down.shape)}, where this DiT's layer is {out} x {fan_in}: it is a "
                                        f"LoRA for another model (or another size of this one).")
            s = scale * (t["alpha"].astype(mx.float32).item() / r if "alpha" in t else
                         _peft_scaling(peft, t["module"], r))
            parts.append(LoraPart("weight", start, stop, down, up * s))
            if "up_bias" in t:
                parts.append(LoraPart("bias", start, stop, None, t["up_bias"].astype(mx.float32) * s))
        for kind, param, shape in (("diff", "weight", (rows, fan_in)), ("diff_b", "bias", (rows,))):
            if kind in t:
                delta = _linear_order(t[kind].astype(mx.float32))
                if delta.size != math.prod(shape):
                    raise HunyuanVideoError(f"the LoRA {path.name} gives {layer} a {kind} of {tuple(delta.shape)}, "
                                            f"where this DiT's layer is {out} x {fan_in}: it is for another model.")
                parts.append(LoraPart(param, start, stop, None, delta.reshape(shape) * scale))
        if swap and layer == "final_layer.adaLN_modulation.1":  # diffusers' (scale, shift) -> Tencent's (shift, scale)
            parts = [p._replace(up=mx.concatenate(mx.split(p.up, 2, axis=0)[::-1], axis=0)) for p in parts]
        lora.setdefault(layer, []).extend(parts)
    return lora


def read_loras(loras, model, ignore_unmatched=False):
    """[(file, scale) or file, ...] -> one {Tencent layer: [LoraPart, ...]} holding them all, for model's DiT (its
    layers, width, names and family; built lazily, its weights need not be there)."""
    layers, dim, tables = _lora_layers(model), model.block_args[0], model.diffusers_names()
    out, seen = {}, set()
    for item in loras:
        path, scale = (item, 1.0) if isinstance(item, (str, Path)) else item
        where = Path(path).expanduser().resolve()
        if where in seen:
            raise HunyuanVideoError(f"the LoRA {where.name} is given twice: give it once, with the sum of the scales "
                                    f"if that is what you want.")
        seen.add(where)
        for layer, parts in read_lora(path, scale, layers, dim, ignore_unmatched, tables, model.family,
                                      model.original_names()).items():
            out.setdefault(layer, []).extend(parts)
    return out


def merge_lora(weights, lora):
    """Add lora's deltas to the float tensors of `weights` (Tencent names, img_in already a Linear: a whole DiT,
    or one block with its full names), lazily, in float32. Returns {layer: parts} for the layers `weights` holds
    quantized (a converted checkpoint): those become low-rank branches beside them (attach_lora)."""
    branches = {}
    for layer, parts in lora.items():
        for param in ("weight", "bias"):
            key, mine = f"{layer}.{param}", [p for p in parts if p.param == param]
            if key not in weights or not mine:
                continue
            if param == "weight" and f"{layer}.scales" in weights:
                if any(p.down is None for p in mine):
                    raise HunyuanVideoError(f"a LoRA gives {layer} a whole weight delta (.diff), which a quantized "
                                            f"layer cannot take: apply it to the bf16 checkpoint (convert_weights.py "
                                            f"--lora bakes it in).")
                branches[layer] = mine
                continue
            w = weights[key].astype(mx.float32)
            for p in mine:
                w = w.at[p.start:p.stop].add(p.up if p.down is None else p.up @ p.down)
            weights[key] = w
    return branches


class LoRAQuantizedLinear(QuantizedLinear):
    """A quantized Linear layer with LoRA branches beside it: y = layer(x) + (x down^T) up^T on each part's rows.
    The branches are held under _lora, which is not a parameter: the layer's parameters keep their names, so
    streamed blocks (low_memory) update them as before. Memory: the LoRA's matrices, in the layer's dtype."""

    def __call__(self, x):
        y = super().__call__(x)
        for p in self._lora:
            delta = (x @ p.down.T) @ p.up.T
            y = y + delta if (p.start, p.stop) == (0, None) else y.at[..., p.start:p.stop].add(delta)
        return y


def attach_lora(model, branches, dtype):
    """Turn each quantized layer that `branches` names ({layer: parts}, from merge_lora) into a
    LoRAQuantizedLinear; its parameters stay as they are."""
    for layer, parts in branches.items():
        module = model
        for name in layer.split("."):
            module = module[int(name)] if isinstance(module, list) else getattr(module, name)
        module.__class__ = LoRAQuantizedLinear  # the same object and parameters; only its call changes
        module._lora = [p._replace(down=p.down.astype(dtype), up=p.up.astype(dtype)) for p in parts]
        mx.eval([(p.down, p.up) for p in module._lora])


# ---------------------------------------------------------------------------------------------------
# Loading: entry points
# ---------------------------------------------------------------------------------------------------
# Each component loads in its own precision by default, the reference's (Tencent's defaults, diffusers'
# documented use): the DiT in bf16, the VAE and the text encoders in fp16. On the tests' tiny VAE, fp16
# decodes within 2 levels of 255 of float32 where bf16 is 10 to 14 levels away.

DEFAULT_DTYPES = {"transformer": mx.bfloat16, "vae": mx.float16, "text_encoders": mx.float16}
DTYPES = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}  # the precisions by name
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_DTYPE_SETTINGS = (("dit", "transformer"), ("vae", "vae"), ("text", "text_encoders"))  # dit_dtype: the DiT's, ...


def _tencent_names(weights):
    """A DiT's tensors under Tencent's names, whatever the file's layout (or a part of the file: one block)."""
    weights = _strip_prefix(weights)
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in weights):
        weights = _from_diffusers(weights)
    return weights


# Which of the family's models a DiT's or a LoRA's tensor names are for, in any layout (diffusers', Tencent's,
# ComfyUI's, kohya's underscores): 13B's DiT has single-stream blocks (and 20 double-stream ones), 1.5's has 54
# double-stream blocks, no single-stream one, modules of its own (byT5's and the image's projections, the tokens'
# type embedding, mean-flow's timestep), and in Tencent's layout q, k and v apart (13B's are fused there).
_KEYS_13B = re.compile(r"single_(?:transformer_)?blocks[._]\d")
_KEYS_15 = re.compile(r"byt5_in|cond_type_embed|context_embedder_2|vision_in|image_embedder|time_r_in"
                      r"|(?:double|transformer)_blocks[._](?:[2-9]\d|\d{3})[._]|(?:img|txt)_attn_[qkv]\.")


def dit_family(keys):
    """"HunyuanVideo (13B)" or "HunyuanVideo 1.5": the model a DiT's or a LoRA's tensor names are for, or None
    where they do not tell."""
    names = "\n".join(keys)
    return "HunyuanVideo (13B)" if _KEYS_13B.search(names) else "HunyuanVideo 1.5" if _KEYS_15.search(names) else None


def _transformer_weights(source, model_class):
    """A transformer checkpoint's tensors under Tencent's names (lazy for safetensors), and its config."""
    weights, config = _read_weights(source, "pass the transformer/ folder of a diffusers checkpoint, or a Tencent "
                                            ".pt or ComfyUI .safetensors file")
    _check_family(weights, model_class, source)
    config = model_class.diffusers_config(config)
    _check_class(config, model_class.diffusers_class, source, "transformer")
    return model_class.names(weights), config


def _check_family(keys, model_class, source):
    """One sentence if a DiT's tensor names are another of the family's models' than model_class's."""
    family = dit_family(keys)
    if family and family != model_class.family:  # the other model's DiT: its encoders and VAE are its own too
        raise HunyuanVideoError(f"{source} is {family}'s DiT, and this model is {model_class.family}: its text "
                                f"encoders and VAE are {family}'s too; give a {family} checkpoint as {{model}} (its "
                                f"DiT as {{transformer}}, if you like).")


_BLOCK_KEY = re.compile(r"(?:.+\.)?(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_BLOCK_KINDS = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}


def _block_reader(files, model, dtype, structure, prepare, lora):
    """read(kind, i, keep) -> {name in the block: array} of block i's weights whose names keep(name) admits, read
    from disk now. The files are indexed once: a call reads only those tensors, each file opened and closed, then
    names them, merges the LoRAs, casts and quantizes them as load_transformer does, through the same functions."""
    index = {}  # (kind, i) -> {file: ({name: header entry}, data offset)}
    for f in files:
        tensors, start = _safetensors_header(f)
        for name, entry in tensors.items():
            if m := _BLOCK_KEY.match(name):
                entries = index.setdefault((_BLOCK_KINDS.get(m[1], m[1]), int(m[2])), {})
                entries.setdefault(f, ({}, start))[0][name] = entry
    args = model.block_args

    def read(kind, i, keep):
        weights = {}
        for f, (tensors, start) in index[(kind, i)].items():
            wanted = {k: t for k, t in tensors.items()  # an fp8 layer's scales go with its weight
                      if keep(k.rpartition(".")[0] + ".weight" if k.endswith(_FP8_SCALES + _FP8_UNUSED) else k)}
            weights.update(_fp8_dequantized(_read_tensors(f, wanted, start), {k: t[1] for k, t in wanted.items()}))
        prefix = f"{kind}.{i}."
        weights = model.names(weights)
        merge_lora(weights, lora)  # the quantized layers' branches are attached to the model once, at load
        weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        block = (DoubleBlock if kind == "double_blocks" else SingleBlock)(*args)
        if structure:
            structure(block)
        block.update(tree_unflatten(list(_cast(weights, dtype).items())))
        if prepare:
            prepare(block)
        modules = {k.rpartition(".")[0] for k in weights}  # what was read (a quantized layer's scales too)
        return {k: v for k, v in tree_flatten(block.parameters()) if k.rpartition(".")[0] in modules}
    return read


def load_transformer(path, dtype=DEFAULT_DTYPES["transformer"], quantization=None, quantize_modulation=False,
                     stream=False, progress=None, lazy_modulation=False, loras=(), lora_ignore_unmatched=False,
                     model_class=HunyuanVideoTransformer, **sizes):
    """The HunyuanVideo DiT from a diffusers transformer/ folder (config.json + safetensors shards), a
    Tencent state dict (mp_rank_00_model_states.pt, its fp8 variant with the _map.pt beside it, or their
    folder), a ComfyUI single .safetensors file, or a folder written by convert_weights.py.

    quantization: None, "int8", "int4" or "fp8" (see quantize); a converted folder loads as it was stored.
    stream: leave the 60 blocks on disk and read each one when it runs (low_memory; safetensors only).
    progress(done, total): after each tensor read (safetensors are read lazily: loading happens here).
    lazy_modulation: leave the blocks' adaLN modulation weights unread, for modulation_tables (safetensors).
    loras: [(file, scale) or file, ...] in any of the four layouts (see read_lora), merged into the weights before
    any quantization, or beside the layers of a converted quantized checkpoint as low-rank branches.
    Sizes come from the tensors' shapes and the folder's config.json; keyword arguments override them
    (Tencent files carry no RoPE settings, for instance). model_class: this DiT, or HunyuanVideo 1.5's."""
    source = Path(path).expanduser()
    weights, config = _transformer_weights(source, model_class)
    sizes = {**_sizes(model_class, model_class.shapes, weights, config, source, "transformer"), **sizes}
    if sizes["attention_head_dim"] != 128 and "rope_axes_dim" not in sizes:
        raise HunyuanVideoError(f"{source} has {sizes['attention_head_dim']}-wide heads and no config.json saying how "
                                f"RoPE splits them: pass rope_axes_dim=(t, h, w) to load_transformer.")
    model = model_class(**sizes)
    lora = read_loras(loras, model, lora_ignore_unmatched)
    structure, prepare = _quantized_loading(config, quantization, quantize_modulation, source)
    if structure:
        structure(model)
    conv = weights.get("img_in.proj.weight")
    if conv is not None and conv.ndim == 5:  # Conv3d (D, C, pt, ph, pw) -> Linear (D, pt*ph*pw*C)
        weights["img_in.proj.weight"] = _linear_order(conv)
    branches = merge_lora(weights, lora)
    files, _ = _component_files(source, "")
    on_disk = all(f.suffix == ".safetensors" for f in files)  # blocks can be read again, one at a time
    if stream and not on_disk:
        raise HunyuanVideoError(f"{source}: streaming blocks from disk needs safetensors; convert it once with "
                                f"convert_weights.py.")
    blocks = ("double_blocks.", "single_blocks.")
    unread = (lambda k: k.startswith(blocks)) if stream else _is_modulation if lazy_modulation and on_disk else \
        (lambda k: False)
    _load_strict(model, weights, dtype, source, prepare, unread, progress)
    if stream:  # placeholders (never evaluated): nothing stays open
        model.update(tree_unflatten([(k, mx.zeros(v.shape, v.dtype)) for k, v in tree_flatten(model.parameters())
                                     if k.startswith(blocks)]))
    if stream or lazy_modulation and on_disk:
        model.read_block, model.streamed = _block_reader(files, model, dtype, structure, prepare, lora), stream
    attach_lora(model, branches, dtype)
    return model


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
    complete config.json (its sizes, RoPE, quantization): load_transformer reads it directly."""
    weights = _checkpoint_weights(model)
    _save_component(folder, weights, {"_class_name": model.diffusers_class, "layout": "tencent",
                                      **model.shapes(weights), **model.settings(),
                                      "hunyuan_apple_version": __version__, **_quantization_record(model)})


def save_text_encoder(model, folder, config):
    """The LLM's used layers (quantized as they are; LLaVA's vision tower and projector too) with its transformers
    config.json plus the quantization."""
    _save_component(folder, dict(tree_flatten(model.parameters())), {**config, **_quantization_record(model)})


def load_vae(path, dtype=DEFAULT_DTYPES["vae"], **sizes):
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


def _llava_name(name):
    """A LLaVA tensor's name in transformers 5's layout (model.language_model.*, model.vision_tower.*) or 4's
    (language_model.model.*, vision_tower.vision_model.*) -> this module's (language_model.*,
    vision_tower.vision_model.*, multi_modal_projector.*)."""
    name = name.removeprefix("model.").replace("language_model.model.", "language_model.")
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


def _llava_keeps(name, used):
    """Whether a LLaVA tensor (this module's name) reaches the outputs used; used: {"language_model": layers,
    "vision_tower": layers} that do."""
    layer = re.match(r"(language_model|vision_tower)\..*layers\.(\d+)\.", name)
    return not ((layer and int(layer[2]) >= used[layer[1]]) or name.endswith(("position_ids", "lm_head.weight"))
                or name.startswith(("language_model.norm.", "vision_tower.vision_model.post_layernorm.")))


def _llm_keeps(name, used):
    """Whether the LLM's tensor `name` reaches hidden_states[-3]: not the layers from `used` on, the final norm
    or the head."""
    name = name.removeprefix("model.")
    if name in ("norm.weight", "lm_head.weight"):
        return False
    return not (name.startswith("layers.") and int(name.split(".")[1]) >= used)


def load_llava(source, weights, config, dtype, quantization=None, progress=None):
    """HunyuanVideo-I2V's text encoder, LLaVA (transformers 4's or 5's key layout, or convert_weights.py's): its
    language model (quantized if asked), vision tower and projector (never quantized). Left on disk: what does
    not reach the outputs used (the LLM's last two layers, final norm and head; the tower's last layer)."""
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    if (text.get("model_type", "llama"), vision.get("model_type", "clip_vision_model")) != ("llama",
                                                                                         "clip_vision_model"):
        raise HunyuanVideoError(f"{source} is a LLaVA of {text.get('model_type')} and {vision.get('model_type')}, not "
                                f"HunyuanVideo-I2V's (Llama and a CLIP vision tower): pass its own text_encoder/.")
    if text.get("rope_scaling"):
        raise HunyuanVideoError(f"{source} uses rope_scaling {text['rope_scaling']}, which HunyuanVideo's text "
                                f"encoder does not: pass the checkpoint's own text_encoder/.")
    model = LlavaTextEncoder(text, vision, config.get("image_token_index"), config.get("pad_token_id"),
                             config.get("projector_hidden_act", "gelu"), config.get("vision_feature_layer", -2),
                             config.get("vision_feature_select_strategy", "default"))
    structure, prepare = _quantized_loading(config, quantization, False, source)
    if structure:
        structure(model)
    used = {"language_model": len(model.language_model.layers),
            "vision_tower": len(model.vision_tower.vision_model.encoder.layers)}
    channels = model.vision_tower.vision_model.embeddings.patch_embedding.weight.shape[-1]
    out = {}
    for k, v in weights.items():
        k = _llava_name(k)
        if not _llava_keeps(k, used):
            continue  # never reaches the outputs used
        if k.endswith("patch_embedding.weight") and v.shape[1] == channels:
            v = v.transpose(0, 2, 3, 1)  # PyTorch's Conv2d (O, I, kh, kw) -> MLX's (O, kh, kw, I)
        out[k] = v
    weights.clear()  # the caller's dict too: a source read must be freed once cast, not kept to the end
    return _load_strict(model, out, dtype, source, prepare, progress=progress)


def load_text_encoder(path, dtype=DEFAULT_DTYPES["text_encoders"], quantization=None, progress=None):
    """LLaVA-Llama-3-8B's language model from a diffusers text_encoder/ folder (transformers' LlamaModel),
    or one written by convert_weights.py; for image to video the whole LLaVA (LlavaForConditionalGeneration:
    see load_llava). The last two layers and the final norm do not reach hidden_states[-3]: they are left on
    disk. quantization: None, "int8", "int4" or "fp8". progress(done, total): after each tensor read."""
    source = Path(path).expanduser()
    weights, config = _read_weights(source, "pass the text_encoder/ folder of a diffusers HunyuanVideo checkpoint")
    if config.get("model_type") == "llava":
        return load_llava(source, weights, config, dtype, quantization, progress)
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
    weights = {k: v for k, v in _strip_prefix(weights).items() if _llm_keeps(k, len(model.layers))}
    return _load_strict(model, weights, dtype, source, prepare, progress=progress)


def load_clip_text_encoder(path, dtype=DEFAULT_DTYPES["text_encoders"]):
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
# Checkpoints on the hub
# ---------------------------------------------------------------------------------------------------

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def _dtypes(dtype=None, dtypes=None):
    """Each component's dtype: the defaults, then dtype for all of them, then dtypes={component: dtype}."""
    dtypes = dict(dtypes or {})
    unknown = set(dtypes) - set(DEFAULT_DTYPES)
    if unknown:
        raise HunyuanVideoError(f"dtypes for {', '.join(sorted(unknown))}: the components are "
                                f"{', '.join(DEFAULT_DTYPES)}.")
    out = {**DEFAULT_DTYPES, **({c: dtype for c in DEFAULT_DTYPES} if dtype is not None else {}), **dtypes}
    if any(d not in DTYPES.values() for d in out.values()):
        raise HunyuanVideoError("a component's dtype must be mx.bfloat16, mx.float16 or mx.float32.")
    return out


def _hub_file(spec):
    """(repository id, path inside) of one hub file named as owner/name/path/in/repository (AccVideo's DiT), or
    None for a repository id."""
    parts = str(spec).split("/")
    return ("/".join(parts[:2]), "/".join(parts[2:])) if len(parts) > 2 else None


def _download(repo_id, weights=True, transformer_only=False):
    """The hub checkpoint's files that the pipeline reads, fetched once (resumable, with progress); without
    the weights, only what the memory plan reads (configs, indexes, tokenizers): a few MB. transformer_only:
    a repository that holds a DiT alone, at its root (SkyReels-V1), or one file of a repository (owner/name/path:
    its local path; before the weights, where it will be)."""
    from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache

    file = _hub_file(repo_id) if transformer_only else None
    if file and not weights:
        cached = try_to_load_from_cache(*file)
        return Path(cached) if isinstance(cached, str) else Path(repo_id)  # not there yet: the plan asks the hub
    patterns = ["model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*", "image_processor/*"]
    patterns += [f"{c}/*" if weights else f"{c}/*.json" for c in COMPONENTS[:4]]
    if transformer_only:
        patterns = ["*.json"] + (["*.safetensors"] if weights else [])
    try:
        return Path(hf_hub_download(*file) if file else snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise HunyuanVideoError(f"could not download {repo_id} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                                f"check the network and the hub id, or pass a local folder.") from None


@lru_cache(maxsize=8)
def _hub_file_info(spec, folder, hub):
    """{name: (shape, dtype)} of a DiT that is one hub file not downloaded yet: a safetensors file's header read
    on the hub; a PyTorch file (AccVideo's, Tencent's layout) cannot be read without downloading it, so the plan
    takes the checkpoint's own DiT for it (the same architecture; the load checks every shape)."""
    repo, inside = _hub_file(spec)
    if inside.endswith(".safetensors"):
        from huggingface_hub import HfApi
        try:
            meta = HfApi().parse_safetensors_file_metadata(repo, inside)
        except Exception as e:
            raise HunyuanVideoError(f"could not read the sizes of {spec} from the hub ({type(e).__name__}): check "
                                    f"the network, or pass a local file.") from None
        return {k: (tuple(t.shape), t.dtype) for k, t in meta.tensors.items()}
    return _components(folder, hub, only=("transformer",))["transformer"][0]


@lru_cache(maxsize=8)  # the plan asks again for each change it tries; the hub is asked once
def _hub_tensor_info(repo_id, folder, component):
    """{name: (shape, dtype)} of a hub component's safetensors, from their headers on the hub (no download)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        index = sorted((folder / component).glob("*.safetensors.index.json"))  # component "": the root
        inside = f"{component}/" if component else ""
        files = sorted(set(json.loads(index[0].read_text())["weight_map"].values())) if index else \
            [f[len(inside):] for f in api.list_repo_files(repo_id) if f.startswith(inside)
             and "/" not in f[len(inside):] and f.endswith(".safetensors")]
        info = {}
        for f in files:
            meta = api.parse_safetensors_file_metadata(repo_id, inside + f)
            info.update({k: (tuple(t.shape), t.dtype) for k, t in meta.tensors.items()})
    except Exception as e:
        raise HunyuanVideoError(f"could not read the sizes of {repo_id}'s {component} from the hub "
                                f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}): check the network, "
                                f"or pass a local folder.") from None
    return info


def _tensor_info(files):
    """{name: (shape, safetensors dtype)} of weight files, read without their data (headers; a .pt is mapped)."""
    info = {}
    for f in files:
        if f.suffix == ".safetensors":
            info.update({k: (shape, dtype) for k, (shape, dtype, _) in _safetensors_header(f)[0].items()})
        else:
            torch = _torch()
            names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
                     torch.float8_e5m2: "F8_E5M2"}
            info.update({k: (tuple(v.shape), names.get(v.dtype, "F32")) for k, v in _load_pt(f).items()})
    return info


def _components(folder, hub=None, transformer=None, transformer_hub=None,
                only=("transformer", "vae", "text_encoder", "text_encoder_2")):
    """{component: (tensor info, config)} of a checkpoint in the diffusers layout, from its files' headers, or
    for a hub checkpoint whose weights are not downloaded yet, from the hub's safetensors metadata. transformer:
    the DiT's own file or folder when it comes from elsewhere (transformer_hub: its hub id, the DiT at its root).
    only: the components to read."""
    out = {}
    for c in only:
        path, repo, inside = (transformer, transformer_hub, "") if c == "transformer" and transformer else \
            (folder / c, hub, c)
        try:
            files, config = _component_files(path, _again(path))
            out[c] = (_tensor_info(files), config)
        except HunyuanVideoError:
            if repo is None:
                raise
            root = path.parent if inside else path
            if c == "transformer" and _hub_file(repo):  # one file, not downloaded yet
                out[c] = (_hub_file_info(repo, folder, hub), {})
            else:
                out[c] = (_hub_tensor_info(repo, root, inside), json.loads((path / "config.json").read_text()))
    return out


def _sizes_of(cls, config, info=None, read=None, source=None, what=None):
    """A model's constructor keywords as the loader finds them: from its tensors' shapes (info, by read) and
    its config.json, its defaults (the real model's) for the rest. The shapes are lazy zeros, never made."""
    if read is None:
        found = _hf_sizes(cls, config)
    else:
        shapes = {k: mx.zeros(shape, mx.bfloat16) for k, (shape, _) in info.items()}
        if issubclass(cls, HunyuanVideoTransformer):
            _check_family(shapes, cls, source)
            config = cls.diffusers_config(config)
        found = _sizes(cls, read, cls.names(shapes) if issubclass(cls, HunyuanVideoTransformer) else
                       _strip_prefix(shapes), config, source, what)
    return {**{k: p.default for k, p in inspect.signature(cls).parameters.items()}, **found}


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
    bos, eos = next((t for t in template.split() if t in specials), None), specials[-1]  # Qwen's has no BOS
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=eos, unk_token="<unk>",
                                  model_max_length=max_length, padding_side="right")
    tok.save_pretrained(folder)
    return len(vocab)


def build_tiny_checkpoint(folder, seed=0, image_condition=None):
    """A tiny random-weight HunyuanVideo in the diffusers layout, tokenizers included, built without torch or
    network: every file the real checkpoint has, in the same format, so the whole path runs in seconds. Its
    videos are noise. image_condition "token_replace": HunyuanVideo-I2V's kind instead, its text encoder a tiny
    LLaVA (Llama and a CLIP vision tower at 336 x 336) with an image processor. Built in a temporary folder, then
    renamed."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.random.seed(seed)
    template = I2V_TEMPLATE if image_condition else PROMPT_TEMPLATE
    words = re.findall(r"\w+|[^\w\s]", re.sub(r"<\|?\w+\|?>", " ", template)) + _TINY_WORDS.split()
    llama_specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                      *(["<image>"] if image_condition else []), "<|begin_of_text|>", "<|end_of_text|>"]
    n_llama = _word_tokenizer(words, llama_specials, "<|begin_of_text|> $A", False, 1024, tmp / "tokenizer")
    n_clip = _word_tokenizer(words, ["<|startoftext|>", "<|endoftext|>"], "<|startoftext|> $A <|endoftext|>", True,
                             CLIP_LENGTH, tmp / "tokenizer_2")

    # widths are multiples of 64, so that quantization has layers to quantize here too
    llama_cfg = dict(vocab_size=n_llama, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0)
    if image_condition:  # LLaVA: <image> and the end token (its padding) are the last two of the vocabulary
        vision_cfg = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, image_size=336, patch_size=14, hidden_act="quick_gelu")
        llava_cfg = dict(model_type="llava", text_config=dict(model_type="llama", **llama_cfg),
                         vision_config=vision_cfg, image_token_index=n_llama - 3, pad_token_id=n_llama - 1,
                         projector_hidden_act="gelu", vision_feature_layer=-2)
        llava = LlavaTextEncoder(llava_cfg["text_config"], vision_cfg, n_llama - 3, n_llama - 1)
        _save_component(tmp / "text_encoder", dict(tree_flatten(llava.parameters())), llava_cfg)
        (tmp / "image_processor").mkdir()
        (tmp / "image_processor" / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 336},
             "do_center_crop": True, "crop_size": {"height": 336, "width": 336}, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3}))
    else:
        llama = LlamaTextEncoder(**llama_cfg, skip_layers=0)  # all layers, as the real file has them
        _save_component(tmp / "text_encoder", {**dict(tree_flatten(llama.parameters())), "norm.weight": mx.ones((64,))},
                        {"model_type": "llama", "architectures": ["LlamaModel"], **llama_cfg})
    clip_cfg = dict(vocab_size=n_clip, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=CLIP_LENGTH, hidden_act="quick_gelu", eos_token_id=2)
    clip = CLIPTextEncoder(**clip_cfg)
    _save_component(tmp / "text_encoder_2", dict(tree_flatten(clip.parameters())),
                    {"model_type": "clip_text_model", "architectures": ["CLIPTextModel"], **clip_cfg})

    dit_cfg = dict(num_attention_heads=2, attention_head_dim=32, num_layers=1, num_single_layers=1,
                   num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=16, rope_axes_dim=[8, 12, 12],
                   **({"image_condition_type": image_condition} if image_condition else {}))
    dit = HunyuanVideoTransformer(**dit_cfg)
    _save_component(tmp / "transformer", _to_diffusers(_checkpoint_weights(dit)),
                    {"_class_name": "HunyuanVideoTransformer3DModel", **dit_cfg}, "diffusion_pytorch_model.safetensors")
    vae_cfg = dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4)
    vae = HunyuanVideoVAE(**vae_cfg)
    _save_component(tmp / "vae", {k: v.transpose(0, 4, 1, 2, 3) if v.ndim == 5 else v  # PyTorch's conv layout
                                  for k, v in tree_flatten(vae.parameters())},
                    {"_class_name": "AutoencoderKLHunyuanVideo", "scaling_factor": 0.476986, **vae_cfg},
                    "diffusion_pytorch_model.safetensors")

    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 7.0}))
    kind = "HunyuanVideoImageToVideoPipeline" if image_condition else "HunyuanVideoPipeline"
    (tmp / "model_index.json").write_text(json.dumps({"_class_name": kind, "tiny_demo": True,
                                                      "hunyuan_apple_version": __version__}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


def tiny_checkpoint(name="tiny"):
    """The tiny demo checkpoint of this version ("tiny", or "tiny-i2v": image to video by token replace; "tiny15" and
    "tiny15-i2v": HunyuanVideo 1.5's), built in cache_dir() on first use (a few MB, seconds)."""
    folder = cache_dir() / f"{name}-{__version__}"
    if not (folder / "model_index.json").exists():
        print(f"building the tiny offline demo checkpoint in {folder} (once; its videos are noise)", file=sys.stderr)
        try:
            _pipeline_class(name).build_tiny_checkpoint(folder, image_condition=TINY_MODELS[name])
        except OSError as e:
            raise HunyuanVideoError(f"cannot build the tiny demo checkpoint in {folder} ({e.strerror or e}): set "
                                    f"HUNYUAN_APPLE_CACHE to a writable folder.") from None
    return folder


# ---------------------------------------------------------------------------------------------------
# Image and video inputs
# ---------------------------------------------------------------------------------------------------
# Image to video: the image is read as RGB, resized to the video's size for the VAE as the reference's
# VideoProcessor resizes it (Lanczos, to exactly height x width), and separately prepared for LLaVA's vision
# tower (clip_pixels); the DiT takes its latents as its checkpoint was trained to (_image_input).
# Video to video: a video to start from is read whole, fitted to the size asked (resized to cover it, cropped
# at the centre), and encoded by the VAE's tiled encoder (HunyuanVideoPipeline.encode_video); the sampler
# noises it to where its schedule is cut (the request's strength).

def read_image(image):
    """A path, a PIL image or a uint8 array (H, W), (H, W, 3) or (H, W, 4) -> a PIL image in RGB (grayscale and
    RGBA converted), or one sentence on why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = given_file(image, "the image", "an image file (PNG, JPEG or WebP)")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise HunyuanVideoError(f"the image {path} could not be read ({type(e).__name__}): pass a PNG, JPEG or "
                                    f"WebP file.") from None
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
            raise HunyuanVideoError(f"an image array of shape {image.shape} and type {image.dtype}: pass uint8 "
                                    f"(height, width, 3), a PIL image or a file.")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    elif not isinstance(image, Image.Image):
        raise HunyuanVideoError(f"an image of type {type(image).__name__}: pass a file, a PIL image or a uint8 array.")
    return _rgb(image)


def _rgb(image):
    """A PIL image of any mode PIL opens -> 8-bit RGB. Gray of 16 or 32 bits (a 16-bit PNG opens as I;16 or I) is
    scaled from 16 bits to 8 (PIL's own convert clips it at 255: a 16-bit picture would come out almost white); gray
    with premultiplied alpha (La, which PIL does not convert to RGB) is unpremultiplied first; alpha is then dropped,
    as the reference pipelines drop it (diffusers' load_image, Tencent's: convert("RGB")); the rest (palette, CMYK,
    CIELAB, YCbCr, HSV, 1-bit, float gray clipped to 0..255) convert as PIL converts them."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        gray = np.asarray(image).astype(np.float64) / 257  # 65535 -> 255
        image = Image.fromarray(np.clip(np.round(gray), 0, 255).astype(np.uint8))
    elif image.mode == "La":
        image = image.convert("LA")
    return image if image.mode == "RGB" else image.convert("RGB")


def check_image(image, height, width, fitted="stretched"):
    """The image, with a warning where it is far smaller than the video (enlarged more than 4 times), or of another
    shape (fitted: what the model's reference does to it, "stretched" or "cropped": the middle of it, enlarged to
    cover the video)."""
    if image.size[0] * 4 < width or image.size[1] * 4 < height:
        warnings.warn(HunyuanVideoWarning(f"the image is {image.size[0]} x {image.size[1]}, far smaller than the "
                                          f"{width} x {height} video: it is enlarged more than 4 times and the video "
                                          f"will be blurred; give a larger image."))
    if abs(math.log(image.size[0] / image.size[1] * height / width)) > math.log(1.25):
        warnings.warn(HunyuanVideoWarning(f"the image is {image.size[0]} x {image.size[1]} and the video {width} x "
                                          f"{height}: the image is {fitted} to the video's shape (as the reference "
                                          f"does); crop it as you want it, or choose a {{resolution}} of its aspect "
                                          f"ratio."))
    return image


def vae_pixels(image, height, width):
    """An image (PIL, RGB) as the reference's VideoProcessor prepares it for the VAE: resized to width x height
    (Lanczos), in [-1, 1] -> (1, 1, height, width, 3) float32, one frame."""
    from PIL import Image

    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    x = np.asarray(image).astype(np.float32) / 255.0
    return mx.array(2 * x - 1)[None, None]


def _image_channels(image, shape, condition):
    """What the DiT takes beside the latents as input channels, the same at every step: latent concat's image
    latents (the first frame; zeros after) and a mask (1 on the first frame), SkyReels' image latents; else None.
    image (B, 1, h, w, 16); shape: the latents'."""
    if condition not in ("latent_concat", "concat"):
        return None
    B, T, h, w, _ = shape
    z = mx.concatenate([image, mx.zeros((B, T - 1, h, w, image.shape[-1]))], axis=1)  # (B, T, h, w, 16)
    if condition == "concat":
        return z
    mask = mx.concatenate([mx.ones((B, 1, h, w, 1)), mx.zeros((B, T - 1, h, w, 1))], axis=1)
    return mx.concatenate([z, mask], axis=-1)  # (B, T, h, w, 17)


def _image_input(x, image, extra, condition):
    """The DiT's input at a step: token replace's has the image's latents as its first frame; latent concat's and
    SkyReels' the latents and then the extra channels (_image_channels); text to video's the latents."""
    if condition == "token_replace":
        return mx.concatenate([image, x[:, 1:]], axis=1)
    return x if extra is None else mx.concatenate([x, extra], axis=-1)

def read_video(path):
    """All frames of a video file, (F, H, W, 3) uint8, or one sentence on why it cannot be read."""
    import imageio.v2 as iio

    path = given_file(path, "the video", "a video file (mp4, mov, webm or GIF)")
    try:
        with iio.get_reader(path) as reader:
            frames = np.stack([np.asarray(frame) for frame in reader])
    except Exception as e:
        raise HunyuanVideoError(f"the video {path} could not be read ({type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:120]}): pass an mp4, mov, webm or GIF.") from None
    if frames.ndim == 3:  # grayscale
        frames = np.repeat(frames[..., None], 3, axis=-1)
    return np.ascontiguousarray(frames[..., :3].astype(np.uint8))


def check_video(frames, num_frames):
    """None, or one sentence on why these frames cannot start a video of num_frames frames."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        return f"video frames of shape {frames.shape}: pass (frames, height, width, 3) uint8."
    if len(frames) < num_frames:
        return f"the video has {len(frames)} frames, fewer than the {num_frames} asked: ask for " \
               f"{(len(frames) - 1) // 4 * 4 + 1} or fewer (4n+1)."
    return None


def video_size(frames):
    """A video's own size rounded to multiples of 16, (height, width): what video to video keeps when no size is
    asked."""
    h, w = frames.shape[1:3]
    return max(16, int(h / 16 + 0.5) * 16), max(16, int(w / 16 + 0.5) * 16)  # halves up


def fit_frames(frames, height, width, num_frames):
    """The first num_frames frames (F, H, W, 3) uint8, each resized to cover height x width (Lanczos, aspect kept)
    and cropped at the centre, as diffusers' image processors do it (resize_mode "crop")."""
    from PIL import Image

    frames = np.asarray(frames)
    problem = check_video(frames, num_frames)
    if problem:
        raise HunyuanVideoError(problem)
    H, W = frames.shape[1:3]
    # diffusers' VaeImageProcessor._resize_and_crop: the side that overflows is W * height // H (or H * width // W)
    size = (width, H * width // W) if width / height > W / H else (W * height // H, height)  # PIL: (width, height)
    top, left = size[1] // 2 - height // 2, size[0] // 2 - width // 2
    out = []
    for frame in frames[:num_frames]:
        image = Image.fromarray(frame.astype(np.uint8))
        if image.size != size:
            image = image.resize(size, Image.LANCZOS)
        out.append(np.asarray(image)[top:top + height, left:left + width])
    return np.stack(out)


# ---------------------------------------------------------------------------------------------------
# Prompt rewrite (optional): a short prompt written out as the long captions HunyuanVideo learned from
# ---------------------------------------------------------------------------------------------------
# Tencent rewrites prompts with a Hunyuan-Large fine-tune, in a "normal" and a "master" mode; a small local
# instruct model run by mlx-lm (the ".[rewrite]" extra) stands in for it here, told the two modes' rules in our
# own words. Greedy decoding by default, so that a prompt gives the same rewrite every time; rewrites are kept
# in cache_dir() / "rewrites", keyed by everything that makes them.

REWRITE_MODEL = "mlx-community/Qwen2.5-3B-Instruct-4bit"  # Qwen2.5-3B-Instruct in 4 bits: about 1.7 GB
REWRITE_MAX_TOKENS = 240  # the LLM text encoder reads 256 tokens; a rewrite not finished by then is not used
REWRITE_RULES = (
    "You turn a short idea for a video into the prompt a text-to-video model reads. Keep everything the user "
    "asked for: every subject, action, object, number, colour and word of text, and add nothing that contradicts "
    "it. Whatever language the user writes in, write in English. Describe what the camera sees, in the present "
    "tense, as one paragraph of plain prose: no title, no list, no quotation marks, no comment about the task.")
REWRITE_MODES = {
    "normal": "Add what the idea leaves open, chosen to suit it: the setting, the lighting, the style and the mood. "
              "A word or two becomes one or two sentences; a longer prompt keeps its length, clarified.",
    "master": "Write it as a cinematographer would: describe each visual element with care (subjects and their "
              "look, their motion, the place, light and colour, composition, camera angle and movement, texture "
              "and atmosphere) so that the video has a distinct, refined look. Three to five sentences.",
}


def rewrite_messages(prompt, mode):
    """The chat messages a rewrite sends: our instructions for the mode, then the user's prompt."""
    if mode not in REWRITE_MODES:
        raise HunyuanVideoError(f"rewrite {mode!r}: use one of {', '.join(REWRITE_MODES)}.")
    return [{"role": "system", "content": f"{REWRITE_RULES} {REWRITE_MODES[mode]}"},
            {"role": "user", "content": prompt}]


def _rewrite_file(prompt, mode, model, temperature, seed, max_tokens):
    """Where the rewrite of these settings is kept: a hash of the prompt, the instructions, the model (a local
    folder by its files' names, sizes and times) and the sampling."""
    what = [prompt, rewrite_messages("", mode), str(model), float(temperature), seed, max_tokens]
    folder = Path(model).expanduser()
    if folder.is_dir():
        what += [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file()]
    return cache_dir() / "rewrites" / f"{hashlib.sha256(json.dumps(what).encode()).hexdigest()}.json"


def kept_rewrite(prompt, mode="normal", model=None, temperature=0.0, seed=None, max_tokens=REWRITE_MAX_TOKENS):
    """The rewrite of these settings kept in the cache, or None (none kept, or unreadable: a warning). Nothing of the
    model is read but its folder's listing, so that a kept rewrite needs neither mlx-lm nor the model."""
    path = _rewrite_file(prompt, mode, model or REWRITE_MODEL, temperature, seed, max_tokens)
    if path.is_file():
        try:
            return json.loads(path.read_text())["rewritten"]
        except (OSError, ValueError, KeyError):
            warnings.warn(f"the kept rewrite {path} could not be read: the prompt is rewritten again.")
    return None


def _mlx_lm():
    """mlx-lm, which runs the rewrite model, or one sentence naming what to install."""
    try:
        import mlx_lm
    except ImportError:
        raise HunyuanVideoError('prompt rewrite runs a small language model through mlx-lm: pip install '
                                '"hunyuan-apple[rewrite]" (or pip install mlx-lm), or leave rewrite out.') from None
    return mlx_lm


def generate_rewrite(llm, tokenizer, messages, temperature=0.0, seed=None, max_tokens=REWRITE_MAX_TOKENS,
                     progress=None):
    """What the model writes for the messages, through mlx-lm's chat template and sampler: (text, finished),
    finished False when max_tokens ran out first. temperature 0 is greedy; seed makes sampling repeatable."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if seed is not None:
        mx.random.seed(seed)
    out, reason = "", None
    for i, r in enumerate(stream_generate(llm, tokenizer, text, max_tokens=max_tokens,
                                          sampler=make_sampler(temp=temperature))):
        out, reason = out + r.text, r.finish_reason
        if progress:
            progress(i + 1, max_tokens)
    return out, reason == "stop"


def rewrite_prompt(prompt, mode="normal", model=None, temperature=0.0, seed=None, max_tokens=REWRITE_MAX_TOKENS,
                   cache=True, progress=None):
    """The prompt rewritten in mode ("normal" or "master") by a local instruct model (REWRITE_MODEL, or model: a
    hub id or a folder in mlx-lm's layout): (rewritten prompt, whether it came from the cache). A rewrite that
    is empty or not finished within max_tokens gives the original prompt back, with a warning. The model is
    loaded only on a cache miss, and freed before this returns."""
    model = model or REWRITE_MODEL
    messages = rewrite_messages(prompt, mode)
    if not 0 <= temperature < math.inf:
        raise HunyuanVideoError(f"rewrite temperature {temperature}: use 0 (the same rewrite every time) or more.")
    kept = kept_rewrite(prompt, mode, model, temperature, seed, max_tokens) if cache else None
    if kept is not None:
        return kept, True
    mlx_lm = _mlx_lm()
    try:
        llm, tokenizer = mlx_lm.load(str(Path(model).expanduser()) if Path(model).expanduser().exists() else model)
    except Exception as e:
        raise HunyuanVideoError(f"the rewrite model {model} could not be loaded ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:100] if str(e) else ''}): give a hub id or a folder of an "
                                f"instruct model in mlx-lm's layout (the default is {REWRITE_MODEL}).") from None
    try:
        text, finished = generate_rewrite(llm, tokenizer, messages, temperature, seed, max_tokens, progress)
    finally:
        del llm
        gc.collect()
        mx.clear_cache()
    text = text.strip()
    if not text or not finished:
        warnings.warn(f"the rewrite was {'empty' if not text else f'longer than {max_tokens} tokens'}: the prompt "
                      f"is used as written.")
        return prompt, False
    if cache:
        try:
            path = _rewrite_file(prompt, mode, model, temperature, seed, max_tokens)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda tmp: tmp.write_text(json.dumps({"prompt": prompt, "mode": mode, "model": model,
                                                                      "rewritten": text})))
        except (OSError, HunyuanVideoError) as e:
            warnings.warn(f"the rewrite could not be kept ({e}); it is used all the same.")
    return text, False


# ---------------------------------------------------------------------------------------------------
# The request: every setting of a generation in one table, and its one check
# ---------------------------------------------------------------------------------------------------
# A generation is one flat set of named settings. The Python API takes them as keywords (from_pretrained those that
# load the pipeline, generate and __call__ the rest), the command line as flags (--frames for frames), the page as
# fields, and the video's sidecar records them: all four are made from SETTINGS, so a setting added here appears in
# each. check_request is the one check: every rule is in it, applied before any work, and its sentences name the
# settings as {name}, which each front end words as its own (HunyuanVideoError.sentence).

DEFAULT_MODEL = "hunyuanvideo-community/HunyuanVideo"
# Checkpoints of the family that want their own settings, by name: the hub id, and the settings their makers
# publish (settings given too win). Same architecture and layout as HunyuanVideo.
PRESETS = {
    "fasthunyuan": dict(model="FastVideo/FastHunyuan-diffusers", steps=6, shift=17.0, guidance=6.0,
                        about="FastVideo's step-distilled HunyuanVideo: 6 steps instead of 50, flow shift 17, "
                              "embedded guidance 6 (its model card: 6 or more)"),
    # AccVideo (aejion/AccVideo): a 5-step distillation; its DiT is one Tencent-layout .pt file in that repository.
    # Its README runs 544x960x93, embedded guidance 6, flow shift 7, no CFG; the 5 steps are every 10th of the
    # 50-step schedule (its pipeline's start_latent_list), which is the 5-step schedule itself
    "accvideo": dict(model=DEFAULT_MODEL, transformer="aejion/AccVideo/accvideo-t2v-5-steps/diffusion_pytorch_model.pt",
                     steps=5, shift=7.0, guidance=6.0, height=544, width=960, frames=93,
                     about="AccVideo's 5-step distilled HunyuanVideo (its DiT from aejion/AccVideo, the rest "
                           "HunyuanVideo's): 5 steps, flow shift 7, embedded guidance 6, 544x960, 93 frames"),
    # SkyReels-V1 ships its DiT alone (a diffusers transformer folder at the repository's root); the rest is
    # HunyuanVideo's. Its video_generate.py: true CFG 6 with this negative prompt, embedded guidance 1.0, 30 steps
    "skyreels": dict(model=DEFAULT_MODEL, transformer="Skywork/SkyReels-V1-Hunyuan-T2V", steps=30, guidance=1.0,
                     cfg_scale=6.0, height=544, width=960, frames=97, prompt_prefix="FPS-24, ",
                     negative_prompt="Aerial view, aerial view, overexposed, low quality, deformation, a poor "
                                     "composition, bad hands, bad teeth, bad eyes, bad limbs, distortion",
                     about="Skywork's SkyReels-V1 fine-tune (human-centric film): true CFG 6 with its negative "
                           "prompt, embedded guidance 1, 30 steps, 544x960, 97 frames, prompts begin 'FPS-24, '"),
}
PRESETS["skyreels-i2v"] = dict(PRESETS["skyreels"], transformer="Skywork/SkyReels-V1-Hunyuan-I2V", needs_image=True,
                               about="SkyReels-V1's image-to-video fine-tune (give an image), with its T2V settings")
# HunyuanVideo 1.5's published checkpoints in hunyuanvideo-community's diffusers layout, each with the settings of
# Tencent's README ("optimal inference configurations"): true CFG 6 on the base checkpoints and none on the
# CFG-distilled ones (which it says need their 50 steps), flow shift 5 at 480p and 9 (T2V) or 7 (I2V) at 720p; the
# step-distilled one 8 steps (made for 8 to 12), shift 7. 121 frames (generate.py's default), 16:9 at the
# checkpoint's size; image to video takes the image's aspect, at about target_size^2 pixels (the reference's bucket).
HUNYUANVIDEO15_HUB = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-"


def _hunyuanvideo15_preset(variant, shift, cfg_scale, steps):
    """The preset of a 1.5 checkpoint, by Tencent's name for it (its transformer/ folder): "480p_i2v_distilled"."""
    i2v, hd, fewer = "i2v" in variant, variant.startswith("720p"), steps < 50
    return dict(model=HUNYUANVIDEO15_HUB + variant, steps=steps, shift=float(shift), cfg_scale=float(cfg_scale),
                frames=121, height=720 if hd else 480, width=1280 if hd else 848, target_size=960 if hd else 640,
                needs_image=i2v, **({"most_steps": 12} if fewer else {}),
                about=f"HunyuanVideo 1.5 {variant[:4]} {'image' if i2v else 'text'} to video"
                      + (", step-distilled" if fewer else ", CFG-distilled" if cfg_scale == 1 else "")
                      + f": {steps} steps, flow shift {shift}" + (", true CFG 6" if cfg_scale > 1 else "")
                      + (", the image's aspect" if i2v else f", {'720x1280' if hd else '480x848'}") + ", 121 frames")


PRESETS.update({"1.5-" + v.replace("_", "-"): _hunyuanvideo15_preset(v, *rest) for v, *rest in (
    ("480p_t2v", 5, 6, 50), ("480p_i2v", 5, 6, 50), ("720p_t2v", 9, 6, 50), ("720p_i2v", 7, 6, 50),
    ("480p_t2v_distilled", 5, 1, 50), ("480p_i2v_distilled", 5, 1, 50), ("720p_i2v_distilled", 7, 1, 50),
    ("480p_i2v_step_distilled", 7, 1, 8))})
TINY_DEMO = dict(height=96, width=160, frames=9, steps=8)  # the offline demos run in seconds at this size
MAX_FRAMES = 129  # the model's longest clip (5.4 s at 24 fps); longer ones loop back to their start
MAX_STEPS = 1000  # the sampler's schedule has 1000 timesteps; the modulation table grows with the steps
SEEDS = 2 ** 64  # a seed is a 64-bit key: 0 <= seed < 2**64
MAX_FPS = 120

# default, kind (str, int, float, bool, list, or a tuple of the choices), group ("generation"; "loading": how the
# pipeline loads, from_pretrained's; "video": the file's; "record": kept, never set), the page's label, the help
Setting = namedtuple("Setting", "default kind group label help")
SETTINGS = {
    "prompt": Setting(None, str, "generation", "Prompt", "what the video shows"),
    "negative_prompt": Setting(None, str, "generation", "Negative prompt", "what the video should not show: true "
                               "classifier-free guidance, two DiT forwards a step (cfg_scale 6 unless given)"),
    "rewrite": Setting(None, tuple(REWRITE_MODES), "generation", "Rewrite the prompt first", "first rewrite the "
                       "prompt with a small local language model (mlx-lm): normal adds setting, light, style and "
                       "mood; master a richer cinematographic description. In English, whatever the prompt's language"),
    "rewrite_model": Setting(None, str, "generation", "Rewrite model", f"the rewrite's instruct model: a hub id or a "
                             f"folder in mlx-lm's layout ({REWRITE_MODEL} when left out)"),
    "rewrite_temperature": Setting(None, float, "generation", "Rewrite temperature", "0 (when left out): the same "
                                   "rewrite every time; above 0 samples, for variety"),
    "rewrite_seed": Setting(None, int, "generation", "Rewrite seed",
                            "the rewrite's sampling seed (with a temperature)"),
    "original_prompt": Setting(None, str, "record", None, "the prompt as typed, when it was rewritten"),
    "image": Setting(None, str, "generation", "Image", "image to video, for the checkpoints that take one "
                     "(HunyuanVideo-I2V and its 33-channel variant, SkyReels-V1 I2V, HunyuanVideo 1.5's I2V): the "
                     "video starts from it"),
    "video": Setting(None, str, "generation", "Video", "video to video: start from this video (its own size rounded "
                     "to 16 and its length, unless the size and the frames are given)"),
    "strength": Setting(None, float, "generation", "Strength", "with a video: how much to change it, 0 (keep) to 1 "
                        "(text to video from the same noise); the last strength x steps steps run (0.8 when left "
                        "out)"),
    "height": Setting(544, int, "generation", "Height", "the video's height, a multiple of 16"),
    "width": Setting(960, int, "generation", "Width", "the video's width, a multiple of 16"),
    "frames": Setting(13, int, "generation", "Frames", f"4n+1 frames (the longest trained: {MAX_FRAMES}, 1.5's 121)"),
    "steps": Setting(50, int, "generation", "Steps", "denoising steps"),
    "guidance": Setting(6.0, float, "generation", "Guidance", "embedded guidance scale, 0 or more"),
    "cfg_scale": Setting(1.0, float, "generation", "True CFG scale", "true CFG scale, above 1 to guide (SkyReels-V1: "
                         "6); without a negative prompt the negative prompt is empty"),
    "shift": Setting(7.0, float, "generation", "Flow shift", "flow shift"),
    "seed": Setting(None, int, "generation", "Seed", "0 to 2**64 - 1; random if left out (and saved with the video)"),
    "cache": Setting(None, tuple(STEP_CACHES), "generation", "Step cache", "skip DiT forwards that a step cache "
                     "predicts: " + ", ".join(f"{k} (threshold {c.default})" if c.default is not None else
                                              f"{k} (interval, order, warmup)" for k, c in STEP_CACHES.items())),
    "cache_threshold": Setting(None, float, "generation", "Cache threshold", "the cache's threshold: higher skips "
                               "more; 0 never skips (its published default when left out; magcache on 1.5: "
                               "0.03, its authors' for 1.5)"),
    **{f"cache_{k}": Setting(None, int, "generation", f"TaylorSeer {k}", f"taylorseer: {what} ({v} when left out)")
       for (k, v), what in zip(TaylorSeer.options.items(), ("a full forward every N (1 computes every step)",
                                                             "the Taylor expansion's order, 1 to 4",
                                                             "the first N steps computed"))},
    "attention": Setting("dense", ATTENTIONS, "generation", "Attention", "dense, or radial: Radial Attention, sparse "
                         "attention between far frames after the first steps"),
    **{f"radial_{k}": Setting(None, float if k == "decay" else int, "generation", f"Radial {k.replace('_', ' ')}",
                              f"radial: {what}") for k, what in (
        ("dense_steps", f"the first N steps dense ({RADIAL_DENSE_STEPS:.0%} of the steps when left out, the "
                        f"reference's 12 of 50)"),
        ("dense_layers", "the first N of the DiT's blocks dense (0 when left out)"),
        ("decay", f"scales the windows of far frames ({RADIAL_DEFAULTS['decay']} when left out)"),
        ("block", f"tokens a block, a power of two ({RADIAL_DEFAULTS['block']} when left out)"))},
    "preset": Setting(None, tuple(PRESETS), "loading", "Preset", "a checkpoint of the family with its own settings: "
                      + "; ".join(f"{k}: {p['about']}" for k, p in PRESETS.items()) + " (settings given too win)"),
    "model": Setting(DEFAULT_MODEL, str, "loading", "Model", "a local folder in the diffusers layout (or Tencent's own "
                     "HunyuanVideo 1.5 folder), a hub id, or 'tiny' / 'tiny-i2v' for the offline demos (text / image "
                     "to video; HunyuanVideo 1.5's: 'tiny15' / 'tiny15-i2v')"),
    "transformer": Setting(None, str, "loading", "Transformer", "the DiT from another checkpoint (a fine-tune): its "
                           "diffusers folder, a single .safetensors or .pt file, or a hub id; the rest from the model"),
    "loras": Setting([], list, "loading", "LoRAs", "LoRAs for the DiT, [file, scale] each: diffusers, original, "
                     "musubi/kohya and ComfyUI files"),
    "lora_ignore_unmatched": Setting(False, bool, "loading", "Ignore a LoRA's unmatched keys", "load a LoRA even if "
                                     "some of its keys match no layer (they are listed in a warning)"),
    "quantization": Setting(None, tuple(QUANTIZATIONS), "loading", "Quantization", "quantize the DiT's blocks and "
                            "the LLM"),
    "quantized_matmul": Setting(None, QUANTIZED_MATMULS, "loading", "Quantized matmul", "with quantization: how the "
                                "DiT's quantized layers multiply, by MLX's kernel or on weights dequantized a block at "
                                "a time (auto: dequantized on Apple GPUs but M5, as measured there)"),
    "quantize_modulation": Setting(False, bool, "loading", "Quantize the modulation", "also quantize the DiT's adaLN "
                                   "modulation (3.4B parameters, tabulated for all steps before the first either way: "
                                   "no memory saved, may cost quality)"),
    **{f"{c}_dtype": Setting(DTYPE_NAMES[DEFAULT_DTYPES[component]], tuple(DTYPES), "loading", f"{what} precision",
                             f"precision of the {what}") for c, component, what in (
        ("dit", "transformer", "DiT"), ("vae", "vae", "VAE"), ("text", "text_encoders", "text encoders"))},
    "low_memory": Setting(False, bool, "loading", "Low memory", "trade speed for memory: no buffer cache, the "
                          "DiT's blocks read from disk as they run"),
    "force": Setting(False, bool, "generation", "Force", "run even if the memory plan says it will not fit"),
    "fps": Setting(24, int, "video", "Frame rate", f"frame rate of the video, 1 to {MAX_FPS}"),
}
UNSAVED = ("low_memory", "force")  # how to run, not what: not in the sidecar
LOADING = tuple(k for k, s in SETTINGS.items() if s.group == "loading")  # from_pretrained's: how the pipeline loads
# words of the Python API for what its errors name besides the settings ({resolution}: a size to try)
NAMES = {"resolution": "height and width"}
# diffusers' keywords for some settings, which a "did you mean" names as ours
DIFFUSERS_NAMES = {"num_frames": "frames", "num_inference_steps": "steps", "guidance_scale": "guidance",
                   "flow_shift": "shift", "true_cfg_scale": "cfg_scale"}
Request = namedtuple("Request", SETTINGS)  # a checked request: check_request makes them


def check_kind(name, value):
    """One sentence if value is not of the setting's kind (None is always allowed: left out)."""
    kind = SETTINGS[name].kind
    if value is None or name in ("image", "video") and not isinstance(value, str):  # in Python: an image or frames
        return
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    ok = {str: lambda: isinstance(value, (str, Path))
          or name in ("prompt", "negative_prompt") and isinstance(value, list)
          and all(isinstance(p, str) for p in value),  # prompts: one, or one a video of the batch
          int: lambda: whole, float: lambda: whole or isinstance(value, (float, np.floating)) and math.isfinite(value),
          bool: lambda: isinstance(value, (bool, np.bool_)),
          list: lambda: isinstance(value, (list, tuple))}.get(kind, lambda: value in kind)()
    if not ok:
        what = {str: "text", int: "a whole number", float: "a finite number", bool: "true or false",
                list: "a list"}.get(kind) or f"one of {', '.join(map(str, kind))}"
        shown = json.dumps(value) if isinstance(value, (str, int, float, list)) else repr(value)
        raise HunyuanVideoError(f"{{{name}}} is {shown}, where {what} is expected.")
    for text in ([str(value)] if isinstance(value, (str, Path)) else value) if name in ("prompt", "negative_prompt") \
            else ():
        try:  # bytes a terminal passed on that are not UTF-8 arrive as lone surrogates, which no tokenizer takes
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise HunyuanVideoError(f"{{{name}}} holds bytes that are not UTF-8 text ({ascii(text)[1:-1][:60]}): "
                                    f"type it again in UTF-8, or set the terminal to UTF-8.") from None


@lru_cache(maxsize=2)
def _read_video_once(path):
    return read_video(path)


def _video_frames(video):
    """A video's frames (F, H, W, 3) uint8: a file's, read once (its size and length set defaults, then the
    pipeline encodes them), or the frames given."""
    return _read_video_once(str(video)) if isinstance(video, (str, Path)) else np.asarray(video)


def radial_settings(request):
    """Radial Attention's settings of a request (a Request, or its dict): {dense_steps, dense_layers, decay, block},
    those left out at RADIAL_DEFAULTS (dense_steps: RADIAL_DENSE_STEPS of the steps)."""
    get = request.get if isinstance(request, dict) else request._asdict().get
    o = {k: get(f"radial_{k}") if get(f"radial_{k}") is not None else v for k, v in RADIAL_DEFAULTS.items()}
    if o["dense_steps"] is None:
        o["dense_steps"] = radial_dense_steps(get("steps"))
    return o


def cache_options(request):
    """TaylorSeer's options of a request, {interval, order, warmup}, those left out at their defaults."""
    return {k: v if getattr(request, f"cache_{k}") is None else getattr(request, f"cache_{k}")
            for k, v in TaylorSeer.options.items()}


def cache_default(cache, model, steps):
    """The threshold a step cache runs at when none is given (None without a cache, or for TaylorSeer): its
    published default, or for MagCache the model's own calibration's (1.5's), at that many steps."""
    if cache is None:
        return None
    own = _pipeline_class(model).magcache(steps, 0) if cache == "magcache" else None
    return (own or {}).get("threshold", STEP_CACHES[cache].default)


def step_cache(request, magcache=None):
    """The forward of one generation, from a checked request's cache settings: the whole DiT (no cache), or a fresh
    cache at its threshold (its published default when left out), TaylorSeer at its options. magcache: another
    model's MagCache calibration, {threshold (its default), K, retention, ratios}, or None for 13B's."""
    name, size = request.cache, (request.height, request.width)
    if name is None:
        return _full
    if STEP_CACHES[name].default is None:
        return STEP_CACHES[name](None, request.steps, size, **cache_options(request))
    calibration = dict(magcache or {}) if name == "magcache" else {}
    default = calibration.pop("threshold", STEP_CACHES[name].default)
    threshold = default if request.cache_threshold is None else request.cache_threshold
    return STEP_CACHES[name](threshold, request.steps, size, **calibration)


def _resolved(given, pipe, text):
    """check_request's defaults and rules for settings given as a dict: the resolved settings, a dict."""
    for k, v in given.items():
        if k not in SETTINGS:
            close = difflib.get_close_matches(k, [*SETTINGS, *DIFFUSERS_NAMES], 1)
            meant = close and DIFFUSERS_NAMES.get(close[0], close[0])
            raise HunyuanVideoError(f"{k} is not a setting: " + (f"did you mean {meant}?" if meant else
                                                                  f"the settings are {', '.join(SETTINGS)}."))
        check_kind(k, v)
    given = {k: str(v) if isinstance(v, Path) else v for k, v in given.items() if v is not None}  # None: left out
    if pipe is not None:  # the pipeline's loading settings are what it loaded; given ones must agree (see above)
        given = {**pipe.loading, **given}
    preset = dict(PRESETS.get(given.get("preset"), {}))
    model = given.get("model") or preset.get("model") or DEFAULT_MODEL
    if given.get("preset") is None:  # a checkpoint a preset names alone, named by its hub id: the preset's settings
        preset = dict(next((p for p in PRESETS.values() if p["model"] == model and "transformer" not in p), {}))
    kind = _pipeline_class(model)
    defaults = {k: s.default for k, s in SETTINGS.items()}
    own = {}
    if is_tiny(model):  # the demo's own DiT and sizes, a preset's other settings
        defaults.update(TINY_DEMO)
        preset = {k: v for k, v in preset.items() if k not in ("height", "width", "frames", "transformer",
                                                                "target_size")}
    else:  # a local checkpoint's own settings (1.5's folders name their shift, CFG scale and size)
        own = kind.checkpoint_settings(model, given.get("transformer"))
    defaults.update({k: v for k, v in {**own, **preset}.items() if k in SETTINGS})
    target, picture = preset.get("target_size") or own.get("target_size"), None  # the image, once read
    if target and given.get("image") is not None and "height" not in given and "width" not in given:
        picture = read_image(given["image"])  # image to video at the image's aspect, as the reference sizes it
        defaults["height"], defaults["width"] = kind.bucket_size(picture.height, picture.width, target)
    video = given.get("video")
    if video is not None:  # video to video: the video's own size and length, up to 129 frames
        frames = _video_frames(video)
        if "height" not in given and "width" not in given:
            defaults["height"], defaults["width"] = video_size(frames)
        if "frames" not in given:
            n = len(frames)
            if n < 5:
                what = f"{{video}} {video}" if isinstance(video, (str, Path)) else "{video}"
                raise HunyuanVideoError(f"{what} has {n} "
                                        f"frame{'s' * (n != 1)}: video to video starts from a video of 5 frames or "
                                        f"more (for an image, give {{image}} to an image-to-video checkpoint), or set "
                                        f"{{frames}} 1.")
            defaults["frames"] = min((n - 1) // 4 * 4 + 1, kind.longest_clip)
    s = {**defaults, **given}

    # what the video shows
    prompts = s["prompt"] if isinstance(s["prompt"], list) else [s["prompt"]]
    if s["prompt"] is None and not text:
        raise HunyuanVideoError("{prompt} is missing: describe the video to generate.")
    if s["prompt"] is not None and not any(p.strip() for p in prompts):
        raise HunyuanVideoError("{prompt} is empty: describe the video to generate.")
    prefix = preset.get("prompt_prefix", "")
    if s["prompt"] is not None and prefix:
        s["prompt"] = [p if p.startswith(prefix) else prefix + p for p in prompts]
        s["prompt"] = s["prompt"] if isinstance(given.get("prompt"), list) else s["prompt"][0]
    if s["negative_prompt"] is not None and "cfg_scale" not in given and s["cfg_scale"] <= 1:
        s["cfg_scale"] = 6.0  # a negative prompt alone: true CFG at SkyReels-V1's scale
    elif s["cfg_scale"] > 1 and s["negative_prompt"] is None:
        s["negative_prompt"] = ""  # a true CFG scale alone: the plain unconditional branch
    if not 0 <= s["cfg_scale"] < math.inf:
        raise HunyuanVideoError(f"{{cfg_scale}} {s['cfg_scale']}: use a number of 0 or more (above 1 to guide; "
                                f"SkyReels-V1 uses 6).")
    negatives = s["negative_prompt"]
    if isinstance(negatives, list) and len(negatives) != len(prompts):
        raise HunyuanVideoError(f"{len(negatives)} of the {{negative_prompt}} for {len(prompts)} of the {{prompt}}: "
                                f"give one, or one for each.")
    if negatives is not None and s["cfg_scale"] <= 1:
        warnings.warn(HunyuanVideoWarning(f"{{negative_prompt}} with {{cfg_scale}} {s['cfg_scale']} has no "
                                          f"effect: the negative prompt is used above 1 (SkyReels-V1 uses 6)."))
    elif s["cfg_scale"] != 1 and s["cfg_scale"] <= 1:
        warnings.warn(HunyuanVideoWarning(f"{{cfg_scale}} {s['cfg_scale']} has no effect: true CFG runs above 1, "
                                          f"with a negative prompt (SkyReels-V1 uses 6)."))
    if s["rewrite"] is None and any(k in given for k in ("rewrite_model", "rewrite_temperature", "rewrite_seed")):
        raise HunyuanVideoError("{rewrite_model}, {rewrite_temperature} and {rewrite_seed} set the prompt rewrite: "
                                "give {rewrite} normal or master too.")
    if s["rewrite_temperature"] is not None and not 0 <= s["rewrite_temperature"] < math.inf:
        raise HunyuanVideoError(f"{{rewrite_temperature}} {s['rewrite_temperature']}: use 0 (the same rewrite every "
                                f"time) or more.")

    # its size and length, the sampler
    h, w, f = s["height"], s["width"], s["frames"]
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise HunyuanVideoError(f"{{height}} {h} and {{width}} {w} must be positive multiples of 16 (544 x 960 is "
                                f"HunyuanVideo's 540p).")
    if f < 1 or (f - 1) % 4:
        n = min(max(1, round((f - 1) / 4)) * 4 + 1, kind.longest_clip)
        raise HunyuanVideoError(f"{{frames}} {f}: the frame count must be 4n+1 (1, 5, 9, ... {kind.longest_clip}); "
                                f"try {n}.")
    if not 1 <= s["steps"] <= MAX_STEPS:
        raise HunyuanVideoError(f"{{steps}} {s['steps']}: use 1 to {MAX_STEPS} (50 is the default).")
    if s["seed"] is None:
        s["seed"] = int.from_bytes(os.urandom(4), "little") >> 1  # chosen now: printed and saved with the video
    if not 0 <= s["seed"] < SEEDS:
        raise HunyuanVideoError(f"{{seed}} {s['seed']}: use a whole number from 0 to 2**64 - 1 ({SEEDS - 1}), or "
                                f"leave it out for a random one.")
    if not 0 <= s["guidance"] < math.inf:
        raise HunyuanVideoError(f"{{guidance}} {s['guidance']}: the embedded guidance scale is a number of 0 or more "
                                f"(6.0 is the default).")
    if not 0 < s["shift"] < math.inf:
        raise HunyuanVideoError(f"{{shift}} {s['shift']}: use a number above 0 (7.0 is the default; FastHunyuan uses "
                                f"17).")
    if not 1 <= s["fps"] <= MAX_FPS:
        raise HunyuanVideoError(f"{{fps}} {s['fps']}: use a frame rate from 1 to {MAX_FPS} (24 is HunyuanVideo's).")
    if f > kind.longest_clip:
        warnings.warn(HunyuanVideoWarning(f"{{frames}} {f} is more than {kind.dit_class.family}'s longest clip "
                                          f"({kind.longest_clip}): past it the video tends to loop back to its start."))
    if preset.get("most_steps") and s["steps"] > preset["most_steps"]:
        warnings.warn(HunyuanVideoWarning(f"{{steps}} {s['steps']}: {s['preset'] or s['model']} is step-distilled, "
                                          f"made for {preset['steps']} to {preset['most_steps']} steps; more take "
                                          f"longer and may look worse."))
    if s["guidance"] > 20:
        warnings.warn(HunyuanVideoWarning(f"{{guidance}} {s['guidance']} is far above what HunyuanVideo is run with "
                                          f"(6.0 by default; its fine-tunes use 1 to 10)."))

    # faster: a step cache, Radial Attention
    options = [f"cache_{k}" for k in TaylorSeer.options if s[f"cache_{k}"] is not None]
    named = ", ".join("{" + k + "}" for k in options)
    if s["cache"] is None and s["cache_threshold"] is not None:
        raise HunyuanVideoError(f"{{cache_threshold}} without {{cache}}: name the cache too (one of "
                                f"{', '.join(STEP_CACHES)}).")
    if s["cache"] != "taylorseer" and options:
        raise HunyuanVideoError(f"{named} set the TaylorSeer cache: give {{cache}} taylorseer too" + (
            f" ({{cache}} {s['cache']} takes {{cache_threshold}})." if s["cache"] else "."))
    if s["cache"] == "taylorseer":
        if s["cache_threshold"] is not None:
            raise HunyuanVideoError("{cache} taylorseer takes no {cache_threshold}: set its {cache_interval}, "
                                    "{cache_order} or {cache_warmup} instead.")
        for k, default in TaylorSeer.options.items():
            v, low = s[f"cache_{k}"], 0 if k == "warmup" else 1
            if v is not None and not (low <= v and (k != "order" or v <= 4)):
                raise HunyuanVideoError(f"{{cache_{k}}} {v}: use a whole number " + (
                    "from 1 to 4" if k == "order" else f"of {low} or more") + f" (its default {default}" + (
                    "; 1 computes every step)." if k == "interval" else ")."))
    elif s["cache"] is not None and s["cache_threshold"] is not None and not 0 <= s["cache_threshold"] < math.inf:
        raise HunyuanVideoError(f"{{cache_threshold}} {s['cache_threshold']}: use 0 or more (0 never skips; "
                                f"{s['cache']}'s published default is "
                                f"{cache_default(s['cache'], s['model'], s['steps'])}).")
    radial = [f"radial_{k}" for k in RADIAL_DEFAULTS if s[f"radial_{k}"] is not None]
    if s["attention"] == "dense" and radial:
        raise HunyuanVideoError(f"{', '.join('{' + k + '}' for k in radial)} set Radial Attention: give {{attention}} "
                                f"radial too, or leave them out.")
    if s["attention"] == "radial":
        o = radial_settings(s)
        if not 0 <= o["dense_steps"] <= s["steps"]:
            raise HunyuanVideoError(f"{{radial_dense_steps}} {o['dense_steps']}: use 0 to {s['steps']} (the steps); "
                                    f"its default is {RADIAL_DENSE_STEPS:.0%} of them "
                                    f"({radial_dense_steps(s['steps'])}).")
        if o["dense_layers"] < 0:
            raise HunyuanVideoError(f"{{radial_dense_layers}} {o['dense_layers']}: use a whole number of 0 or more "
                                    f"(the blocks from the first, double then single, left dense; its default is 0).")
        if not 0 < o["decay"] <= 4:
            raise HunyuanVideoError(f"{{radial_decay}} {o['decay']}: use a number above 0 and at most 4 (it scales the "
                                    f"windows of far frames; the reference uses {RADIAL_DEFAULTS['decay']}).")
        if not (8 <= o["block"] <= 1024 and o["block"] & (o["block"] - 1) == 0):
            raise HunyuanVideoError(f"{{radial_block}} {o['block']}: use a power of two from 8 to 1024 (the "
                                    f"reference's is 128).")
        tokens = math.prod(patch_grid(h, w, f))
        if tokens < o["block"]:
            raise HunyuanVideoError(f"{{attention}} radial at this size: the video has {tokens} tokens, less than one "
                                    f"block of {o['block']}; use dense attention (or a smaller {{radial_block}}).")

    # where it starts from: an image, a video
    if s["image"] is not None and video is not None:
        raise HunyuanVideoError("{image} and {video}: give one of them (an image to start from, or a video).")
    if preset.get("needs_image") and s["image"] is None and s["prompt"] is not None:  # a generation (not loading)
        what = f"{{preset}} {s['preset']}" if s["preset"] else s["model"]
        raise HunyuanVideoError(f"{what} makes video from an image: give {{image}}.")
    if video is None and "strength" in given:
        raise HunyuanVideoError("{strength} applies to video to video: give {video} too.")
    if video is not None:
        s["strength"] = 0.8 if s["strength"] is None else s["strength"]
        if not 0 <= s["strength"] <= 1:
            raise HunyuanVideoError(f"{{strength}} {s['strength']}: use a number from 0 (keep the video) to 1 (text "
                                    f"to video from the same noise).")
        problem = check_video(_video_frames(video), f)
        if problem:
            raise HunyuanVideoError(problem)
    if s["image"] is not None:
        picture = read_image(s["image"]) if picture is None else picture
        check_image(picture, h, w, kind.image_fit)  # readable, and not far too small

    # how it loads
    if s["quantized_matmul"] is not None and s["quantization"] is None:
        raise HunyuanVideoError("{quantized_matmul} chooses how quantized layers multiply: give {quantization} too.")
    s["loras"] = [[f, _lora_scale(scale, f"the LoRA {f}")] for f, scale in
                  ((lora, 1.0) if isinstance(lora, (str, Path)) else lora for lora in s["loras"])]
    # input files by their absolute paths, so that a request repeats from any folder
    for key in ("image", "video", "transformer", "model"):
        if isinstance(s[key], (str, Path)) and Path(s[key]).expanduser().exists() and s[key] not in TINY_MODELS:
            s[key] = str(Path(s[key]).expanduser().resolve())
    s["loras"] = [[str(Path(f).expanduser().resolve()) if Path(f).expanduser().exists() else str(f), scale]
                  for f, scale in s["loras"]]
    return s


def check_request(settings, pipe=None, text=False):
    """The one check of a request: the settings given (a dict by SETTINGS' names; a Request, checked already, passes)
    -> a Request with every default filled in (in this order: the settings given, a video's own size and length, a
    preset's, the tiny demos' sizes, SETTINGS'), every rule applied and its warnings given, or HunyuanVideoError in
    one sentence naming the setting. pipe: the loaded pipeline, whose loading settings the request takes (given ones
    must agree) and whose checkpoint's rules apply (an image for an image-to-video one). text: the text encodings
    are given, so no prompt is needed."""
    r = settings if isinstance(settings, Request) else Request(**_resolved(dict(settings), pipe, text))
    if not isinstance(settings, Request):  # the settings given that the model has no use for
        kind = pipe if pipe is not None else _pipeline_class(r.model)
        unused = [k for k in kind.unused_settings if settings.get(k) is not None]
        if unused:
            raise HunyuanVideoError(f"{{{unused[0]}}} {settings[unused[0]]}: {kind.unused_settings[unused[0]]}")
        if r.cache in kind.uncalibrated_caches:
            warnings.warn(HunyuanVideoWarning(kind.uncalibrated_caches[r.cache]), stacklevel=2)
    if pipe is None:
        return r
    differ = [k for k, v in pipe.loading.items() if getattr(r, k) != v]
    if differ:
        k = differ[0]
        raise HunyuanVideoError(f"{{{k}}} {getattr(r, k)}: this pipeline was loaded with {pipe.loading[k]}; load "
                                f"another for it, or leave it out.")
    condition = pipe.image_condition()
    if condition and r.image is None:
        raise HunyuanVideoError(f"{r.model} is an image-to-video checkpoint: give {{image}}.")
    if r.image is not None and not condition:
        raise HunyuanVideoError(f"{r.model} is a text-to-video checkpoint, which takes no image: leave {{image}} "
                                f"out, or use an image-to-video one ({pipe.image_models}).")
    if condition == "latent_concat" and r.frames < 5:
        raise HunyuanVideoError(f"{{frames}} {r.frames}: this checkpoint's video leaves out its first 4 frames; ask "
                                f"for 5 or more (4n+1).")
    return r


# ---------------------------------------------------------------------------------------------------
# Memory plan: know before loading anything whether the request fits
# ---------------------------------------------------------------------------------------------------
# Peak of a phase = its weights (counted from the files' headers, at the precision and quantization asked)
# + its activations, derived from the tensors this module's code has alive at once. MLX keeps an array
# until the command buffer (GPU) or task (CPU) that uses it has run, so the code evaluates the DiT block by
# block, the LLM layer by layer and the VAE tile by tile, and the count is everything one of those
# allocates, per token (DiT, LLM) or per voxel of a tile (VAE), with the model's own widths. On the CPU
# backend, MLX runs attention, the norms and the 3D convolutions as general kernels, which add attention
# scores and float32 temporaries (sized below from their code and measured per op); the tests check the
# whole estimate against measured peaks on tiny models of several widths. On a GPU (Metal, CUDA) the fused
# kernels add nothing: those figures are derived, not yet measured on one.

def _weights_bytes(info, quantization=None, modulation=False, dit=True, itemsize=2, keep=lambda name: True):
    """Bytes of a component's weights once loaded: floats (fp8 dequantized too) at itemsize, the layers that
    quantization affects as MLX stores them, a converted checkpoint's quantized data as stored."""
    spec = QUANTIZATIONS.get(quantization)
    total = 0
    for name, (shape, dtype) in info.items():
        if not keep(name) or name.endswith(_FP8_SCALES + _FP8_UNUSED):
            continue
        n = math.prod(shape)
        if dtype not in ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"):  # quantized data: as stored
            total += n * {"U32": 4, "I32": 4, "U16": 2}.get(dtype, 1)
            continue
        in_block = not dit or name.startswith(("double_blocks.", "single_blocks.", "transformer_blocks.",
                                               "single_transformer_blocks."))
        if (spec and len(shape) == 2 and name.endswith(".weight") and shape[1] % spec["group_size"] == 0
                and in_block and "embed" not in name and (modulation or not _is_modulation(name))):
            groups = n // spec["group_size"]
            total += n * spec["bits"] // 8 + groups * (2 * itemsize if spec["mode"] == "affine" else 1)
        else:
            total += n * itemsize
    return total


def _cast_bytes(info, itemsize, keep=lambda name: True):
    """While a component loads, tensor by tensor, the largest one stored in another precision (float32 for an
    fp16 model, say) is alive as read beside its cast: the load's peak over the weights (0 where the file holds
    the precision asked, as the released checkpoints do)."""
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
    return max([math.prod(shape) * sizes[dtype] for name, (shape, dtype) in info.items()
                if keep(name) and dtype in sizes and sizes[dtype] != itemsize], default=0)


def _cpu_norm_temporaries(elements, itemsize, rms=False):
    """Bytes MLX's CPU layer_norm (or rms_norm) allocates besides its output: float32 copies of the input, 2
    for layer_norm (1 for rms_norm), 2 more when the input must be converted to float32 first."""
    return elements * 4 * ((1 if rms else 2) + (0 if itemsize == 4 else 2))


def _attention_bytes(heads, queries, keys, width, itemsize, cpu):
    """What attention allocates besides its output: on the CPU, the scores (heads x queries x keys, for one
    chunk of queries) and one more (queries, width); nothing on a GPU, whose fused kernel keeps them on chip."""
    chunk = _query_chunk(1, heads, queries, keys, width // heads)
    return (heads * chunk * keys + queries * width) * itemsize if cpu else 0


def _dit_activations(tokens, text, video_tokens, D, heads, mlp, text_dim, itemsize, cpu, token_replace=False,
                     single_blocks=True, values=(64, 64), refined=None, batch=1):
    """Peak activation bytes of one DiT forward. A block is evaluated in two halves, the attention first (its
    q, k, v are freed before the MLP runs), so its peak is the larger half. Per token, in elements:
      single block, attention half: its input and the [video ; text] concatenation it starts from (2D), the
        modulated input (D), linear1's [q|k|v|mlp] (3D + M), q and k after RMSNorm (2D) and after RoPE (2D),
        the attention output and its (N, D) copy (2D), GELU of the MLP (M): 12D + 2M; the other half: the
        input (2D), the attention and GELU kept (D + M), [attention | MLP] (D + M), linear2 and the gated
        residual (2D): 6D + 2M;
      double block, per video token, attention half: its input (D), modulated (D), q|k|v (3D), q and k normed
        (2D) and rotated (2D), the joint [video ; text] q, k, v (3D), the attention output and its copy (2D):
        14D; the other half: the input and the attention kept (2D), output projection, residual, modulated
        (3D), fc1 and GELU (2M), fc2 and residual (2D): 7D + 2M;
      both: what mx.compile's fused functions still hold of their last call in the previous block, its input
        and residual branch (2D; measured: each block otherwise leaves an (N, D) array alive until the next);
      token refiner, per text token: its input (text_dim), projected (D), normed (D), q|k|v (3D), attention
        output and copy (2D), projection and residual (2D), normed (D), fc1 and SiLU (2M), fc2 and residual
        (2D): 12D + 2M + text_dim.
    CPU: attention scores and the RMS norms' float32 temporaries in the attention half, a LayerNorm's in each.
    Token replace modulates and gates in two parts joined: one more (N, D) copy in each half. single_blocks: the model
    has single-stream blocks. values: (in, out), the DiT's input and output values per video token (13B: 64 and 64).
    refined: the text tokens the refiner reads (and whose states, of width text_dim, are held), where not all of the
    text stream's (1.5's other sources join it after the refiner). batch: the videos in one forward (true CFG's
    branches batched: 2), all of the above each but the RoPE table, which they share."""
    b = itemsize
    ln = _cpu_norm_temporaries(tokens * D, b) if cpu else 0
    rms = _cpu_norm_temporaries(tokens * D, b, rms=True) if cpu else 0
    attention = _attention_bytes(heads, tokens, tokens, D, b, cpu) + ln + 2 * rms
    split = D if token_replace else 0
    single = max(tokens * (14 * D + 2 * mlp + split) * b + attention,
                 tokens * (8 * D + 2 * mlp + split) * b + ln) if single_blocks else 0
    double = max(tokens * (16 * D + split) * b + attention, tokens * (9 * D + 2 * mlp + split) * b + ln)
    refined = text if refined is None else refined
    refiner = refined * (12 * D + 2 * mlp + text_dim) * b + _attention_bytes(heads, refined, refined, D, b, cpu)
    if cpu:
        refiner += _cpu_norm_temporaries(refined * D, b)
    # held throughout: the RoPE table, the text states (as encoded and cast), the latents and velocity in float32,
    # the DiT's input
    held = refined * text_dim * 2 * b + video_tokens * (8 * values[1] + b * values[0])
    return batch * (max(single, double, refiner) + held) + tokens * (D // heads) * 4


def _llm_activations(tokens, W, I, heads, kv_heads, itemsize, cpu):
    """Peak activation bytes of the LLM (width W, MLP width I) over `tokens` tokens, one layer at a time. Per
    token, in elements: the layer's input, normed, q, its RoPE, attention output and copy, o_proj, residual,
    normed, down_proj and residual (11W), k, v and k's RoPE (3 x kv width), gate, up, SiLU and product (4I).
    CPU: the attention scores (with k and v repeated to all heads) and two rms_norm temporaries. CLIP, counted
    the same way, is far below this bound."""
    kv = W // heads * kv_heads
    b = itemsize
    act = tokens * (11 * W + 3 * kv + 4 * I) * b + _attention_bytes(heads, tokens, tokens, W, b, cpu)
    if cpu:
        act += tokens * 2 * W * b * (heads // kv_heads > 1) + 2 * _cpu_norm_temporaries(tokens * W, b, rms=True)
    return act


def _vae_activations(frames, height, width, tile, chans, itemsize, cpu):
    """Peak activation bytes of a tiled decode. The largest tensors live at full resolution, in the upsampler
    into it (c1 = block_out[1] channels) and the first resnet of the last level (c0 = block_out[0]). Per voxel
    of a tile, in elements: nearest upsampling, its padded copy, the convolution (3 c1); norm, SiLU, padded
    copy (3 c1); conv1, norm, SiLU, padded copy, conv2, shortcut, sum (7 c0). CPU: each 3x3x3 convolution
    unfolds its input into 27 columns per channel and output voxel, in float32, beside float32 copies of its
    padded input (6 at most, measured per op), and two such convolutions are alive at once; the norms keep
    float32 temporaries. Then the decoded video: the tiles, the blended rows and the whole clip in the VAE's
    dtype, its float32 and uint8 conversions."""
    c0, c1 = chans[0], chans[1] if len(chans) > 1 else chans[0]
    ft, fh, fw = tile or (frames - 1, height, width)
    t, h, w = min(ft, frames - 1) + 1, min(fh, height), min(fw, width)  # one tile's output
    voxels, padded = t * h * w, (t + 2) * (h + 2) * (w + 2)
    b = itemsize
    act = (3 * c1 + 3 * c1 + 7 * c0) * voxels * b + (2 * c1 + 2 * c0) * (padded - voxels) * b
    if cpu:
        act += 2 * c1 * (27 * voxels + 6 * padded) * 4 + 2 * _cpu_norm_temporaries(voxels * c1, b)
    video = frames * height * width * 3
    return act + video * (3 * b + 4 + 1)


def denoise_bytes(dit_info, sizes, video, text_tokens, itemsize, cpu, quantization=None, modulation=False,
                  low_memory=False, steps=50, cfg=None, cache=None, cache_options=None, attention="dense",
                  quantized_matmul="auto", ranks=1, token_replace=False, values=(64, 64), refined=None):
    """The denoising phase's peak bytes on each rank, for a DiT of this module's blocks (13B's; 1.5's too): dit_info
    its tensors' (shape, dtype) by name, sizes its constructor's keywords, `video` and `text_tokens` its tokens,
    itemsize its dtype's bytes; the settings are estimate_memory's; values and refined: _dit_activations'."""
    branches, videos = (2, 2 if cfg == "batched" else 1) if cfg in ("batched", "sequential") else (1, 1)
    split = ranks // 2 if cfg == "parallel" else ranks  # the ranks that share one branch's tokens
    heads, D, b = sizes["num_attention_heads"], sizes["num_attention_heads"] * sizes["attention_head_dim"], itemsize

    def weigh(**keep):
        return _weights_bytes(dit_info, quantization, modulation, itemsize=b, **keep)
    # the modulation weights are never all held: each block's is read to make its table, then dropped
    dit = weigh(keep=lambda k: not _is_modulation(k))
    first = ("double_blocks.0.", "transformer_blocks.0.")
    if low_memory:  # the blocks stay on disk but for the one running (and its float copy while quantizing)
        blocks = ("double_blocks.", "single_blocks.", "transformer_blocks.", "single_transformer_blocks.")
        dit = min(dit, weigh(keep=lambda k: not k.startswith(blocks)) + 2 * weigh(keep=lambda k: k.startswith(first)))
    single = sizes.get("num_single_layers", 0)
    table = branches * steps * D * (12 * sizes["num_layers"] + 3 * single) * b
    making = weigh(keep=lambda k: _is_modulation(k) and k.startswith(first)) + branches * 12 * D * steps * b
    loading = _cast_bytes(dit_info, b, lambda k: not _is_modulation(k))  # a tensor as stored beside its cast
    local = -(-video // split)  # this rank's video tokens
    denoise = dit + table + max(making, loading, _dit_activations(
        local + text_tokens, text_tokens, video, D, heads, int(D * sizes["mlp_ratio"]), sizes["text_embed_dim"], b,
        cpu, token_replace=token_replace, single_blocks=single > 0, values=values, refined=refined, batch=videos))
    if split > 1:  # every rank's keys and values, gathered (padded to one slice each) and joined with the text's
        denoise += videos * 2 * (split * local + video + text_tokens) * D * b
    # what a step cache keeps, in the DiT's dtype: video-token tensors of width D (First-Block Cache and TeaCache
    # two between steps, MagCache one, and each the blocks' video input during a step), or for EasyCache four
    # latent-sized ones (values[1] a token); one cache a branch
    denoise += branches * ({"fbcache": 3 * D, "teacache": 3 * D, "magcache": 2 * D}.get(cache, 0) * local +
                           (4 * values[1] * video if cache == "easycache" else 0)) * b
    if cache == "taylorseer":  # order + 1 float32 factors of the output, twice while a full step updates them
        order = {**TaylorSeer.options, **(cache_options or {})}["order"]
        denoise += branches * (2 * (order + 1) * 4 + b) * values[1] * video
    if quantization and dequantize_matmul(video, quantized_matmul):  # one block's weights dequantized at a time
        denoise += max(sum(math.prod(shape) for k, (shape, _) in dit_info.items() if k.startswith(p) and
                           not _is_modulation(k)) for p in first) * b
    if attention == "radial":  # the gathered keys and values: at most twice k and v of one attention
        denoise += videos * 2 * 2 * (video + text_tokens) * D * b
    if cfg == "sequential":  # the prompt's velocity, kept while the negative prompt's is made, and in float32
        denoise += video * values[1] * (b + 4)
    return denoise


def _backend():
    return "cpu" if mx.default_device() == mx.cpu else "gpu"


def estimate_memory(folder, height, width, num_frames, quantization=None, modulation=False,
                    tile=DEFAULT_VAE_TILE, low_memory=False, backend=None, dtypes=None, hub=None, cache=None,
                    steps=50, cfg=None, transformer=(None, None), cache_options=None, attention="dense",
                    quantized_matmul="auto", ranks=1):
    """Estimated peak bytes of each phase of a generation, on each rank: {"text encoders", "denoise", "decode"}.
    dtypes: each component's (DEFAULT_DTYPES). low_memory: the DiT's blocks are streamed from disk, so about
    two of them are in memory at once. hub: the hub id, to read the headers there before a download.
    cache: the step cache, whose kept tensors count too. steps: for the table of precomputed modulation (the
    modulation weights themselves are never held, see modulation_tables). cfg: true CFG's two branches,
    "batched" (activations of two videos) or "sequential" (one at a time, a velocity kept); both hold two
    modulation tables and, with a step cache, two caches. transformer: (path, hub id) of a DiT from elsewhere.
    cache_options: TaylorSeer's (its order sets how many factors it keeps). attention: "radial" adds the key
    blocks it gathers (at most twice the keys and values between evaluations). quantized_matmul: with quantization,
    dequantized matmuls hold one block's weights in the DiT's dtype (dequantize_matmul decides "auto"). ranks: the
    processes that make it (sequence parallel; with cfg "parallel", each half of them one branch): each holds the
    whole DiT, its share of the video's tokens and every rank's keys and values, and the decoded tiles."""
    folder, cpu = Path(folder), (backend or _backend()) == "cpu"
    size = {c: d.size for c, d in {**DEFAULT_DTYPES, **(dtypes or {})}.items()}  # bytes per value
    parts = _components(folder, hub, *transformer)
    llm_info, llm_cfg = parts["text_encoder"]
    llava = llm_cfg.get("model_type") == "llava"  # image to video: LLaVA reads the prompt with the image
    llm = _sizes_of(LlamaTextEncoder, llm_cfg.get("text_config", {}) if llava else llm_cfg)
    used = llm["num_hidden_layers"] - llm["skip_layers"]
    if llava:
        vision = _sizes_of(CLIPVisionTower, llm_cfg.get("vision_config", {}))
        names = {_llava_name(k): v for k, v in llm_info.items()}
        keeps = {"language_model": used, "vision_tower": vision["num_hidden_layers"] + 1 +
                 llm_cfg.get("vision_feature_layer", -2)}
        lm = {k: v for k, v in names.items() if k.startswith("language_model.")}
        weights = _weights_bytes(lm, quantization, dit=False, itemsize=size["text_encoders"],
                                 keep=lambda k: _llava_keeps(k, keeps)) + \
            _weights_bytes({k: v for k, v in names.items() if k not in lm}, dit=False, itemsize=size["text_encoders"],
                           keep=lambda k: _llava_keeps(k, keeps))  # the vision tower and projector: never quantized
        tokens = TEXT_LENGTH + I2V_CROP_START + IMAGE_TOKENS - 1
        # encode_llava's own (tokens, width) arrays beside the layers': the token embeddings, the input with the
        # image's in place, the states padded, their crops and the result
        around = 6 * tokens * llm["hidden_size"] * size["text_encoders"]
        patches = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
        vision_act = _llm_activations(patches, vision["hidden_size"], vision["intermediate_size"],
                                      vision["num_attention_heads"], vision["num_attention_heads"],
                                      size["text_encoders"], cpu)
    else:
        weights = _weights_bytes(llm_info, quantization, dit=False, itemsize=size["text_encoders"],
                                 keep=lambda k: _llm_keeps(k, used))
        tokens, vision_act, around = TEXT_LENGTH + CROP_START, 0, 0
    cast = _cast_bytes({_llava_name(k) if llava else k: v for k, v in llm_info.items()}, size["text_encoders"],
                       (lambda k: _llava_keeps(k, keeps)) if llava else (lambda k: _llm_keeps(k, used)))
    text = weights + max(cast, vision_act, around + _llm_activations(
        tokens, llm["hidden_size"], llm["intermediate_size"], llm["num_attention_heads"], llm["num_key_value_heads"],
        size["text_encoders"], cpu))
    clip_info, clip_cfg = parts["text_encoder_2"]
    clip = _sizes_of(CLIPTextEncoder, clip_cfg.get("text_config", clip_cfg))
    text = max(text, _weights_bytes(clip_info, dit=False, itemsize=size["text_encoders"]) + _llm_activations(
        CLIP_LENGTH, clip["hidden_size"], clip["intermediate_size"], clip["num_attention_heads"],
        clip["num_attention_heads"], size["text_encoders"], cpu))

    dit_info, dit_cfg = parts["transformer"]
    sizes = _sizes_of(HunyuanVideoTransformer, dit_cfg, dit_info, _transformer_shapes,
                      transformer[0] or folder / "transformer", "transformer")
    # the text tokens: LLaVA's image states (every 4th or 2nd; a negative prompt's every 2nd) before the prompt's
    condition = sizes.get("image_condition_type")
    text_tokens = TEXT_LENGTH - 4 + IMAGE_TOKENS // (2 if cfg else IMAGE_EMBED_INTERLEAVE[condition]) \
        if llava and condition in IMAGE_EMBED_INTERLEAVE else TEXT_LENGTH
    denoise = denoise_bytes(dit_info, sizes, math.prod(patch_grid(height, width, num_frames)), text_tokens,
                            size["transformer"], cpu, quantization, modulation, low_memory, steps, cfg, cache,
                            cache_options, attention, quantized_matmul, ranks, condition == "token_replace")

    vae_info, vae_cfg = parts["vae"]
    vae = _sizes_of(HunyuanVideoVAE, vae_cfg, vae_info, _vae_shapes, folder / "vae", "VAE")
    decode = _weights_bytes(vae_info, itemsize=size["vae"], dit=False) + _vae_activations(
        num_frames, height, width, tile, vae["block_out_channels"], size["vae"], cpu)
    if ranks > 1:  # the tiles of every rank, kept until they are blended (overlapping: at most twice the video)
        decode += 2 * num_frames * height * width * 3 * size["vae"]
    return {"text encoders": text, "denoise": denoise, "decode": decode}


def available_memory():
    """What this machine can give a generation, in bytes: HUNYUAN_APPLE_MEMORY_GB if set (to keep memory for
    other work), else on a Mac the GPU's recommended working set, on an NVIDIA GPU its memory, elsewhere the
    memory the OS reports available."""
    if os.environ.get("HUNYUAN_APPLE_MEMORY_GB"):
        value = os.environ["HUNYUAN_APPLE_MEMORY_GB"]
        try:
            gb = float(value)
        except ValueError:
            gb = -1
        if not 0 < gb <= 2 ** 20:
            raise HunyuanVideoError(f"HUNYUAN_APPLE_MEMORY_GB={value!r}: set it to the GiB a generation may use, "
                                    f"above 0 and at most 1048576 (such as 24), or unset it.")
        return int(gb * GB)
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    try:
        return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate_rewrite(model=None, prompt="", max_tokens=REWRITE_MAX_TOKENS, backend=None):
    """Estimated peak bytes of the prompt rewrite (rewrite_prompt): the model's weights, read from its
    safetensors' headers (a hub model's from the hub's list of files, nothing downloaded), one layer's
    activations over the instructions and the prompt (taken as a token every 2 bytes of UTF-8: BPE vocabularies
    give English about 4 bytes a token, Chinese about 3), the KV cache of every layer over those and
    max_tokens, and a step's logits in float32."""
    model = model or REWRITE_MODEL
    folder, cpu = Path(model).expanduser(), (backend or _backend()) == "cpu"
    _mlx_lm()  # without it there is no rewrite to plan
    try:
        if folder.is_dir():
            why = "its config.json could not be read"
            config = json.loads((folder / "config.json").read_text())
            why = "a weights file is cut short or is not safetensors"
            weights = sum(np.prod(shape, dtype=np.int64) * _DTYPES[dtype].size for f in folder.glob("*.safetensors")
                          for shape, dtype, _ in _safetensors_header(f)[0].values())
            why = "its config.json is not a model's configuration"
        else:
            from huggingface_hub import HfApi, hf_hub_download, snapshot_download
            try:  # downloaded before: its files, without asking the hub
                return estimate_rewrite(snapshot_download(model, local_files_only=True), prompt, max_tokens, backend)
            except Exception:
                pass
            why = "it is not downloaded here and the hub could not be asked for its files"
            config = json.loads(Path(hf_hub_download(model, "config.json")).read_text())
            files = HfApi().model_info(model, files_metadata=True).siblings
            weights = sum(f.size or 0 for f in files if f.rfilename.endswith(".safetensors"))
        config = config.get("text_config", config)
        missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                               "vocab_size") if k not in config]
        why = f"its config.json lacks {', '.join(missing)}: it is not a language model" if missing else \
            "it has no .safetensors weights" if not weights else None
    except Exception as e:
        why = f"{why} ({type(e).__name__})"
    if why:
        raise HunyuanVideoError(f"the rewrite model {model} cannot be used: {why}; give a folder of an instruct model "
                                f"in mlx-lm's layout, or a hub id (the default is {REWRITE_MODEL}).")
    W, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    kv_heads = config.get("num_key_value_heads", heads)
    tokens = (len(rewrite_messages(prompt, "master")[0]["content"].encode()) + len(prompt.encode())) // 2 + 64
    kv = 2 * layers * (tokens + max_tokens) * config.get("head_dim", W // heads) * kv_heads * 2
    return int(weights + _llm_activations(tokens, W, config["intermediate_size"], heads, kv_heads, 2, cpu) + kv +
               2 * config["vocab_size"] * 4)


def _rewrite_asked(r):
    """What a request's rewrite asks (a preset's prompt prefix is kept out of it, and put back after): (the prefix,
    (prompt, mode, model, temperature, seed))."""
    prefix = PRESETS.get(r.preset, {}).get("prompt_prefix", "")
    return prefix, (r.prompt.removeprefix(prefix), r.rewrite, r.rewrite_model, r.rewrite_temperature or 0.0,
                    r.rewrite_seed)


class OverBudget(HunyuanVideoError):
    """check_memory's refusal: the request would not fit."""


def check_memory(folder, height, width, num_frames, quantization=None, modulation=False, low_memory=False,
                 budget=None, dtypes=None, hub=None, cache=None, steps=50, cfg=None, transformer=(None, None),
                 rewrite=None, cache_options=None, attention="dense", quantized_matmul="auto", ranks=1,
                 estimate=estimate_memory, smaller=(544, 960)):
    """Refuse, in one sentence, a request whose estimated peak does not fit (with 10% to spare), naming what
    would fit: the fewest changes that do (a quantization, low_memory, the smaller size (height, width)), together
    where no single one is enough, and fewer frames only where nothing else fits; return the estimate otherwise.
    Nothing is loaded. rewrite: (model, prompt) when the prompt is rewritten first, a phase of its own
    (estimate_rewrite). estimate: the model's estimate_memory (HunyuanVideo 1.5's for its checkpoints)."""
    budget = budget or available_memory()
    request = dict(height=height, width=width, num_frames=num_frames, quantization=quantization,
                   modulation=modulation, low_memory=low_memory, dtypes=dtypes, hub=hub, cache=cache, steps=steps,
                   cfg=cfg, transformer=transformer, cache_options=cache_options, attention=attention,
                   quantized_matmul=quantized_matmul, ranks=ranks)
    first = {"rewrite": estimate_rewrite(*rewrite)} if rewrite else {}
    est = {**first, **estimate(folder, **request)}
    phase = max(est, key=est.get)
    if est[phase] <= 0.9 * budget:
        return est

    def fits(change):
        return max({**first, **estimate(folder, **{**request, **change})}.values()) <= 0.9 * budget

    bits = QUANTIZATIONS.get(quantization, {"bits": 16})["bits"]
    levers = [(f"{{quantization}} {q}", dict(quantization=q)) for q in ("int8", "int4")
              if QUANTIZATIONS[q]["bits"] < bits]
    if not low_memory:
        levers.append(("{low_memory}", dict(low_memory=True)))
    if height * width > smaller[0] * smaller[1]:
        levers.append((f"{{resolution}} {smaller[0]} {smaller[1]}", dict(height=smaller[0], width=smaller[1])))
    combos = [combo for n in range(len(levers) + 1) for combo in itertools.combinations(levers, n)
              if sum(flag.startswith("{quantization}") for flag, _ in combo) <= 1]
    options = []
    for shorter in (False, True):  # the clip as asked first; fewer frames only where nothing else fits
        for n in range(len(levers) + 1):
            for combo in (c for c in combos if len(c) == n):
                flags, change = [flag for flag, _ in combo], {k: v for _, c in combo for k, v in c.items()}
                if not shorter and n and fits(change):
                    options.append(" ".join(flags))
                elif shorter:  # the longest 4n+1 clip that fits: the estimate grows with the frames
                    lo, hi = 0, (num_frames - 1) // 4  # clips of 4 lo + 1 frames fit (lo = 0: maybe), of 4 hi + 1 not
                    while hi - lo > 1:
                        mid = (lo + hi) // 2
                        lo, hi = (mid, hi) if fits({**change, "num_frames": 4 * mid + 1}) else (lo, mid)
                    frames = 4 * lo + 1 if hi and (lo or fits({**change, "num_frames": 1})) else None
                    if frames:
                        options.append(" ".join(flags + [f"{{frames}} {frames}"]))
            if options:
                break
        if options:
            break
    raise OverBudget(
        f"this request needs about {gib(est[phase])} at its peak ({phase}) and this machine can give "
        f"{gib(budget)}: try {' or '.join(options[:3]) if options else 'a smaller request'}, or {{force}} to "
        f"run it anyway.")


# ---------------------------------------------------------------------------------------------------
# Pipeline: a request run as a stream of events, phase by phase
# ---------------------------------------------------------------------------------------------------
# HunyuanVideoPipeline.generate runs one request and yields what happened, in order: the plan (before anything
# loads), the rewritten prompt, the text encodings, a Step after each denoising step (what a checkpoint and a
# preview need), the final latents (before any decode) and the frames. The caller decides between events: it
# writes checkpoints, previews and files, and stops the run by leaving its loop (closing the generator).
# __call__, the command line and the page are each a loop over it. progress(what, done, total), if given, is told
# of every long activity as it goes (the tensors read, the layers run, the steps, the tiles decoded): for display.

# cfg: None, "batched", "sequential", "parallel" (GuidedDiT); memory: each phase's peak, per rank; problem: the error
Plan = namedtuple("Plan", "request cfg memory problem")
Rewritten = namedtuple("Rewritten", "request cached")  # the request with its prompt rewritten (original_prompt set)
Encoded = namedtuple("Encoded", "text cached")  # (states, mask, pooled): the prompts' rows, then the negatives'
Step = namedtuple("Step", "step steps latents x0 cache work")  # after step `step`: what resuming needs, and x0
Denoised = namedtuple("Denoised", "latents request work")  # the final latents (B, t, h, w, 16), float32
Decoded = namedtuple("Decoded", "frames")  # uint8 (F, H, W, 3), or (B, F, H, W, 3) for B > 1


def _reporter(progress, what):
    """progress(done, total) for one activity ("loading the DiT", "denoising", ...), or None."""
    return None if progress is None else lambda done, total: progress(what, done, total)


class HunyuanVideoPipeline:
    """Prompt (and an image or video to start from) in, frames out, in phases that each load what they need and
    free it before the next: the text encoders (the LLM, 14 GB in fp16, or LLaVA with its vision tower, then
    CLIP), the VAE's encoder (the image or video), the DiT, the VAE's decoder. Weights are read when their phase
    starts. self.loading holds the loading settings it was made with (SETTINGS' names); self.stats each phase's
    seconds and peak memory (GiB) of the last run, and under "work" the DiT's ledger (new_ledger)."""

    def __init__(self, folder, dtypes=None, quantization=None, quantize_modulation=False, low_memory=False, hub=None,
                 prompt_cache=False, loras=(), lora_ignore_unmatched=False, transformer=None, transformer_hub=None,
                 quantized_matmul=None, model=None):
        self.folder, self.dtypes, self.hub = Path(folder), _dtypes(dtypes=dtypes), hub
        self.quantized_matmul = quantized_matmul  # how the DiT's quantized layers multiply (dequantize_matmul)
        self.quantization, self.quantize_modulation, self.low_memory = quantization, quantize_modulation, low_memory
        self.prompt_cache = prompt_cache  # keep the text encoders' outputs in cache_dir() / "prompts"
        self.prompt_hit = False  # whether the last encode_prompt read all its prompts from the prompt cache
        # the DiT's adaLN modulation computed for all steps before the first, its weights never all held (see
        # HunyuanVideoTransformer.modulation_tables); False computes it at every step from the weights
        self.precompute_modulation = True
        self.loras, self.lora_ignore_unmatched = [list(lora) for lora in loras], lora_ignore_unmatched
        # the DiT from elsewhere than folder/transformer (a fine-tune's): a local file or folder, or a hub id
        self.transformer, self.transformer_hub = (Path(transformer) if transformer else None), transformer_hub
        self.loading = dict(  # what a request of this pipeline says of its loading (SETTINGS' names)
            model=model or str(self.folder), transformer=transformer_hub or (transformer and str(transformer)),
            loras=self.loras, lora_ignore_unmatched=lora_ignore_unmatched, quantization=quantization,
            quantized_matmul=quantized_matmul, quantize_modulation=quantize_modulation, low_memory=low_memory,
            **{f"{c}_dtype": DTYPE_NAMES[self.dtypes[component]] for c, component in _DTYPE_SETTINGS})
        self.stats = {}
        # started by mlx.launch on several processes: they make one video together (see "sequence parallel")
        self.ranks = world()

    # What is the model's (HunyuanVideo15_Apple.HunyuanVideo15Pipeline replaces them): its DiT, the names of the
    # text encoders' outputs (in the prompt cache's entries), the template that reads a prompt, its memory plan's
    # estimate, the size the plan suggests when a larger one does not fit, its trained sizes, the settings it has no
    # use for (refused when given, with why) and the step caches it has no calibration of (warned), where its
    # image-to-video checkpoints are, what builds its offline demos and its MagCache calibration.
    dit_class = HunyuanVideoTransformer
    text_parts = ("states", "mask", "pooled")
    prompt_template = PROMPT_TEMPLATE
    estimate_memory = staticmethod(estimate_memory)
    smaller_size = (544, 960)
    longest_clip = MAX_FRAMES  # frames; longer clips tend to loop back to their start
    # its trained sizes, as the command line's --quality and --aspect-ratio (width:height) pick them: (height, width)
    buckets = {"540p": {"16:9": (544, 960), "9:16": (960, 544), "4:3": (624, 832), "3:4": (832, 624),
                        "1:1": (720, 720)},
               "720p": {"16:9": (720, 1280), "9:16": (1280, 720), "4:3": (832, 1104), "3:4": (1104, 832),
                        "1:1": (960, 960)}}
    unused_settings = {}
    uncalibrated_caches = {}  # step caches whose published calibration is another model's: warned, with why
    image_fit = "stretched"  # what the reference does to an image of another shape than the video (vae_pixels)
    image_models = "HunyuanVideo-I2V, the skyreels-i2v {preset}"
    build_tiny_checkpoint = staticmethod(build_tiny_checkpoint)  # its offline demos (TINY_MODELS)

    @staticmethod
    def checkpoint_settings(model, transformer=None):
        """A local checkpoint's own defaults, read from its files before loading (with the DiT `transformer` names):
        none for 13B's (SETTINGS' are HunyuanVideo's)."""
        return {}

    @staticmethod
    def diffusers_folder(folder, transformer=None):
        """The checkpoint folder to load from, in diffusers' layout: 13B's as it is."""
        return folder

    @staticmethod
    def magcache(steps, branch):
        """MagCache's calibration for a run of `steps` steps, for the prompt's branch (0) or true CFG's negative
        prompt's (1), as step_cache takes it: None, MagCache's own (13B's)."""
        return None

    @classmethod
    def from_pretrained(cls, model=None, dtype=None, dtypes=None, prompt_cache=False, **loading):
        """model: a local folder in the diffusers layout, a hub id, or "tiny" / "tiny-i2v" (the offline demos, see
        tiny_checkpoint); a preset's (or DEFAULT_MODEL) when left out. A hub checkpoint's configs are fetched now,
        its weights (about 40 GB) when a phase first needs them, after the memory plan. loading: the loading
        settings of SETTINGS (transformer, loras, lora_ignore_unmatched, quantization, quantized_matmul,
        quantize_modulation, dit_dtype, vae_dtype, text_dtype, low_memory) and preset (its model and DiT); dtype:
        one mx dtype for every component, dtypes: {"transformer" | "vae" | "text_encoders": mx dtype}, over the
        *_dtype settings. prompt_cache: reuse the text encoders' outputs for a prompt seen before (see
        encode_prompt; the command line turns it on). A bad LoRA is refused now."""
        unknown = set(loading) - set(LOADING)
        if unknown:
            raise HunyuanVideoError(f"{', '.join(sorted(unknown))}: from_pretrained takes the loading settings "
                                    f"({', '.join(LOADING)}); give the others to the generation.")
        r = check_request({**loading, "model": model}, text=True)
        for c, component in _DTYPE_SETTINGS:  # mx dtypes given win over the named ones
            if dtype is not None or component in (dtypes or {}):
                r = r._replace(**{f"{c}_dtype": DTYPE_NAMES[(dtypes or {}).get(component, dtype)]})
        folder, hub, transformer, transformer_hub = Path(r.model).expanduser(), None, r.transformer, None
        if r.model in TINY_MODELS:  # the offline demos (a folder of that name: ./tiny)
            folder = tiny_checkpoint(r.model)
        elif not folder.exists():
            if re.fullmatch(r"[\w.-]+/[\w.-]+", r.model) is None:
                raise HunyuanVideoError(f"the {{model}} {folder} does not exist: pass a HunyuanVideo folder in the "
                                        f"diffusers layout or a hub id such as {DEFAULT_MODEL}.")
            folder, hub = _download(r.model, weights=False), r.model
        if cls is HunyuanVideoPipeline:  # 1.5's pipeline, from its own module, for a 1.5 checkpoint
            cls = _pipeline_class(folder)
        folder = cls.diffusers_folder(folder, transformer)  # Tencent's own 1.5 folder: a view of it
        missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
        if missing:
            raise HunyuanVideoError(f"{folder} lacks {', '.join(missing)}: pass a complete HunyuanVideo checkpoint "
                                    f"in the diffusers layout (or download it again).")
        if transformer is not None and not Path(transformer).expanduser().exists():
            if re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w.-]+)*", str(transformer)) is None:
                raise HunyuanVideoError(f"the {{transformer}} {transformer} does not exist: pass a DiT's folder or "
                                        f"file, a hub id, or a file in a hub repository (owner/name/path).")
            transformer, transformer_hub = _download(transformer, weights=False, transformer_only=True), transformer
        pipe = cls(folder, {component: DTYPES[getattr(r, f"{c}_dtype")] for c, component in _DTYPE_SETTINGS},
                   r.quantization, r.quantize_modulation, r.low_memory, hub, prompt_cache, r.loras,
                   r.lora_ignore_unmatched, transformer and Path(transformer).expanduser(), transformer_hub,
                   r.quantized_matmul, model=r.model)
        if pipe.loras:  # a bad LoRA is refused now, not after the text encoders have run
            dit = pipe.dit_class(**pipe._dit_sizes())  # built lazily: no weights are made
            read_loras(pipe.loras, dit, r.lora_ignore_unmatched)
        return pipe

    @property
    def transformer_path(self):
        return self.transformer or self.folder / "transformer"

    def _dit_sizes(self):
        """The DiT's constructor keywords, from its files' headers (or the hub's), nothing loaded."""
        info, config = _components(self.folder, self.hub, self.transformer, self.transformer_hub,
                                   only=("transformer",))["transformer"]
        return _sizes_of(self.dit_class, config, info, self.dit_class.shapes, self.transformer_path, "transformer")

    def image_condition(self):
        """How the checkpoint's DiT takes an image, read from its config and shapes: None (text to video),
        "token_replace" or "latent_concat" (HunyuanVideo-I2V, and its 33-channel variant), or "concat"
        (SkyReels-V1 I2V: twice the output's channels, the latents and the image's)."""
        if not hasattr(self, "_condition"):
            sizes = self._dit_sizes()
            self._condition = sizes["image_condition_type"] or (
                "concat" if sizes["in_channels"] == 2 * sizes["out_channels"] else None)
        return self._condition

    # ---- the stream ----

    def generate(self, request=None, text=None, latents=None, resume=None, progress=None, **settings):
        """Run a request (a Request, or a dict of settings; keywords add settings) and yield its events: Plan,
        Rewritten (when the prompt is rewritten), Encoded, a Step after each denoising step, Denoised, Decoded.
        A request that the memory plan says would not fit is refused after the Plan, before anything loads, unless
        its `force` is set. text: the text encoders' outputs to use (encode_prompt's: the prompts' rows, then the
        negative prompts'), no prompt needed. latents: the initial latents (B, t, h, w, 16) instead of the seed's
        noise. resume: a checkpoint's state, {"step", "latents", "cache", "work", "text"} as the last Step and the
        Encoded event gave them, from which the run continues to what the uninterrupted one gives. progress: see
        above. Leaving the loop stops the run there (after a Denoised: the latents, without decoding). Over several
        ranks (mlx.launch), a rank that stops stops the others with RanksLost."""
        try:
            return (yield from self._generate(request, text, latents, resume, progress, **settings))
        except RuntimeError as e:
            if self.ranks is None or not DISTRIBUTED_ERROR.search(str(e)):
                raise
            raise RanksLost() from None

    def _generate(self, request=None, text=None, latents=None, resume=None, progress=None, **settings):
        given = request if isinstance(request, Request) else {**(request or {}), **settings}
        r = check_request(given, self, text=text is not None or resume is not None)
        if self.ranks is not None:
            r = self.agree(r, resume)
        if resume:  # a step cache's state is per rank when the run was split: it resumes on as many
            kept = {k.split(".")[0] for d in resume["cache"] for k in d if re.match(r"rank\d+\.", k)}
            ranks = self.ranks.group.size() if self.ranks else 1
            if (kept or ranks > 1) and any(resume["cache"]) and len(kept) != ranks:
                raise HunyuanVideoError(f"this checkpoint's step cache was split over {len(kept) or 1} process(es), "
                                        f"not {ranks}: resume it with {len(kept) or 1}, or start afresh.")
        plan = self.plan(r, text is None and resume is None)
        yield plan
        if plan.problem is not None and not r.force:
            raise plan.problem
        self.stats = {}
        first = self.ranks is None or self.ranks.rank == 0  # the rank that rewrites and encodes the prompt
        if r.rewrite and not r.original_prompt and text is None and resume is None and first:
            prefix, asked = _rewrite_asked(r)
            rewritten, cached = self.rewrite(*asked, progress=progress)
            r = r._replace(prompt=prefix + rewritten, original_prompt=r.prompt)
            yield Rewritten(r, cached)
        image = read_image(r.image) if r.image is not None else None
        if resume is not None:
            text, latents = resume["text"], resume["latents"]
        if text is None:
            prompts = r.prompt if isinstance(r.prompt, list) else [r.prompt]
            negatives = [] if plan.cfg is None else r.negative_prompt if isinstance(r.negative_prompt, list) else \
                [r.negative_prompt] * len(prompts)
            if first:
                text = self.encode_prompt(self.prompt_requests(prompts, negatives, image, r.height, r.width), progress)
            if self.ranks is not None:  # rank 0's encodings, sent to the others
                text = tuple(self.ranks.first(first and {str(i): a for i, a in enumerate(text)}).values())
            yield Encoded(text, self.prompt_hit)
        video = None
        if r.video is not None and resume is None:
            video = self.encode_video(_video_frames(r.video), r.height, r.width, r.frames, progress=progress)
        image = self.encode_image(image, r.height, r.width) if image is not None else None
        with self._phase("denoise"):
            try:
                x = yield from self._denoise(r, plan.cfg, text, latents, resume, video, image, progress)
            finally:
                _rope_table.cache_clear()  # the steps' RoPE table goes with their phase
        yield Denoised(x, r, self.stats["work"])
        yield Decoded(self.decode(x, progress=progress))

    def __call__(self, prompt=None, *, output_type="np", text=None, latents=None, resume=None, progress=None,
                 **settings):
        """generate's run to its end: uint8 frames (F, H, W, 3) (or (B, F, H, W, 3) for a list of B prompts), or
        with output_type "latent" the final latents (B, t, h, w, 16), not decoded. settings: SETTINGS' generation
        settings by name (frames, steps, guidance, cfg_scale, shift, seed, cache, attention, image, video, ...);
        the other arguments: generate's."""
        if output_type not in ("np", "latent"):
            raise HunyuanVideoError(f"output_type {output_type!r}: use 'np' (frames) or 'latent'.")
        events = self.generate({"prompt": prompt, **settings}, text, latents, resume, progress)
        try:
            for event in events:
                if isinstance(event, Denoised) and output_type == "latent":
                    return event.latents
                if isinstance(event, Decoded):
                    return event.frames
        finally:
            events.close()

    def agree(self, r, resume=None):
        """Over several ranks, before anything loads: the request with rank 0's seed (a rank given none picks its
        own), or, on every rank, one sentence naming the first rank (and its host) that would not make the same
        video: another version of this code or of MLX, another DiT, VAE or LoRA file, another setting or
        checkpoint."""
        files = [self.transformer_path, self.folder / "vae", *(Path(f) for f, _ in self.loras)]
        mine = dict(host=self.ranks.host, pid=os.getpid(), seed=r.seed, versions=[__version__, mx.__version__],
                    files=[[f.name, f.stat().st_size] for p in files if p.exists()
                           for f in sorted(p.rglob("*") if p.is_dir() else [p]) if f.is_file()],
                    settings={k: v for k, v in r._asdict().items() if k != "seed"},
                    resume=resume and resume["step"])
        everyone = [json.loads(b) for b in self.ranks.exchange(json.dumps(mine).encode())]
        PEERS[:] = [(o["host"], o["pid"]) for o in everyone]
        for rank, other in enumerate(everyone[1:], 1):
            differ = [what for key, what in (
                ("versions", "the version of hunyuan_apple or MLX"), ("files", "the DiT's, VAE's or LoRAs' files"),
                ("settings", "the settings"), ("resume", "the checkpoint's step")) if other[key] != everyone[0][key]]
            if differ:
                settings = [k for k in mine["settings"] if other["settings"].get(k) != everyone[0]["settings"].get(k)]
                raise HunyuanVideoError(f"rank {rank} on {other['host']} would make another video than rank 0 on "
                                        f"{everyone[0]['host']}: {', '.join(differ)} differ"
                                        f"{' (' + ', '.join(settings) + ')' if settings else ''}; give every rank the "
                                        f"same version, checkpoint files and command.")
        return r._replace(seed=everyone[0]["seed"])

    def plan(self, request, encode=True):
        """The memory plan of a checked request, before anything loads: Plan(request, cfg: how true CFG runs its two
        branches, "batched" or "sequential", or None without it; memory: each phase's estimated peak, or None;
        problem: None, or the HunyuanVideoError that says it will not fit). encode: the text encoders will run (the
        prompt rewrite too, if asked)."""
        r = request
        cfg = self.cfg_mode(r.height, r.width, r.frames, r.cache, r.steps) \
            if r.negative_prompt is not None and r.cfg_scale > 1 else None
        rewrite = (r.rewrite_model, max(r.prompt if isinstance(r.prompt, list) else [r.prompt], key=len)) \
            if encode and r.rewrite and not r.original_prompt else None
        if rewrite and self.prompt_cache and kept_rewrite(*_rewrite_asked(r)[1]) is not None:
            rewrite = None  # kept from an earlier run: the model is not needed
        try:
            return Plan(r, cfg, check_memory(self.folder, r.height, r.width, r.frames, self.quantization,
                                  self.quantize_modulation, self.low_memory, dtypes=self.dtypes, hub=self.hub,
                                  cache=r.cache, steps=r.steps, cfg=cfg, transformer=(self.transformer,
                                                                                      self.transformer_hub),
                                  rewrite=rewrite, cache_options=cache_options(r), attention=r.attention,
                                  quantized_matmul=self.quantized_matmul or "auto",
                                  ranks=self.ranks.size if self.ranks else 1, estimate=self.estimate_memory,
                                  smaller=self.smaller_size), None)
        except OverBudget as e:
            return Plan(r, cfg, None, e)

    def cfg_mode(self, height, width, num_frames, cache=None, steps=50):
        """How true CFG runs its two DiT forwards a step: over an even number of ranks "parallel" (each half of them
        runs one; with a step cache only where the halves' collectives are their own: two ranks, or a backend that
        splits its group, since each branch's cache skips its own steps); else "batched" (one forward of batch 2)
        when the memory plan says the denoising phase fits so, else "sequential"; always sequential with a step
        cache, which keeps one per branch."""
        if self.ranks is not None and self.ranks.size % 2 == 0 and (
                self.ranks.size == 2 or cache is None or self.ranks.splits):
            return "parallel"  # each half of the ranks runs one branch
        if cache is None and self._batch_fits(height, width, num_frames, steps):
            return "batched"
        return "sequential"

    def _batch_fits(self, height, width, num_frames, steps):
        """Whether the memory plan says true CFG's two branches fit as one batch."""
        est = self.estimate_memory(self.folder, height, width, num_frames, self.quantization,
                                   self.quantize_modulation, low_memory=self.low_memory, dtypes=self.dtypes,
                                   hub=self.hub, steps=steps, cfg="batched",
                                   transformer=(self.transformer, self.transformer_hub))
        return est["denoise"] <= 0.9 * available_memory()

    # ---- the phases ----

    def download(self):
        """Fetch a hub checkpoint's weights (once; the phases call this)."""
        if self.hub:
            self.folder, self.hub = _download(self.hub), None
        if self.transformer_hub:
            self.transformer, self.transformer_hub = _download(self.transformer_hub, transformer_only=True), None

    @contextmanager
    def _phase(self, name, download=True):
        """One phase, around the work inside it: timed, its peak recorded, and its memory given back before the next
        phase. The phase's models live in a function called inside (gone once it returns), so the cache is cleared
        after that."""
        if download:
            self.download()
        gc.collect()  # garbage from before is freed now: not counted in this phase's peak, nor held through it
        mx.reset_peak_memory()
        limit = mx.set_cache_limit(0) if self.low_memory else None  # give freed buffers back at once
        start = time.perf_counter()
        try:
            yield
        finally:
            gc.collect()
            self.stats[name] = (time.perf_counter() - start, mx.get_peak_memory() / GB)
            if limit is not None:
                mx.set_cache_limit(limit)
            mx.clear_cache()

    def rewrite(self, prompt, mode="normal", model=None, temperature=0.0, seed=None, progress=None):
        """The prompt rewritten by a small local instruct model before the text encoders read it (see
        rewrite_prompt; its cache is the prompt cache's setting), as a phase of its own, "rewrite", before any
        of the checkpoint's weights are fetched: (text, whether it came from the cache)."""
        with self._phase("rewrite", download=False):
            return rewrite_prompt(prompt, mode, model, temperature, seed, cache=self.prompt_cache,
                                  progress=_reporter(progress, "rewriting the prompt"))

    def _prompt_entry(self, prompt, image=None, interleave=None):
        """The prompt cache's file for a prompt (and an image read with it): named by a hash of all that changes
        the text encoders' outputs (the prompt, the image's pixels and interleave, the template, the tokenizers'
        files, the encoders' and image processor's configs and weight files by name, size and time, the dtype,
        the quantization and this version)."""
        what = [prompt, self.prompt_template, str(self.dtypes["text_encoders"]), self.quantization, __version__]
        if image is not None:
            what += [I2V_TEMPLATE, interleave, image.size, hashlib.sha256(image.tobytes()).hexdigest()]
        h = hashlib.sha256(json.dumps(what).encode())
        for part in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "image_processor"):
            if not (self.folder / part).is_dir():
                continue
            for f in sorted(p for p in (self.folder / part).iterdir() if p.is_file()):
                small = part.startswith("tokenizer") or f.suffix == ".json"
                h.update(f"{part}/{f.name}".encode())
                h.update(f.read_bytes() if small else f"{f.stat().st_size} {f.stat().st_mtime_ns}".encode())
        return cache_dir() / "prompts" / f"{h.hexdigest()}.safetensors"

    def encode_prompt(self, prompt, progress=None):
        """text_states (B, L, 4096), text_mask (B, L), pooled (B, 768), as in encode_prompt, for a prompt or a
        list of them (each encoded on its own, as the reference encodes a prompt and its negative; the shorter
        right-padded, mask 0). For the I2V checkpoints' LLaVA a prompt is (prompt, image, interleave): a PIL image
        read with it (encode_llava; L = 576 / interleave + 252). With the prompt cache on, each prompt seen
        before is read back, and the text encoders load only for the others, which are stored (atomically; an
        entry that cannot be written or read gives a warning, and the encoders run). self.prompt_hit: whether
        every prompt came from the cache."""
        items = [prompt] if isinstance(prompt, (str, tuple)) else list(prompt)
        items = [(p, None, None) if isinstance(p, str) else tuple(p) for p in items]
        prompts = [(p, None if image is None else (image.size, hashlib.sha256(image.tobytes()).hexdigest()), interleave)
                   for p, image, interleave in items]  # what identifies each, hashable
        by_key = dict(zip(prompts, items))
        if self.prompt_cache:
            self.download()  # the entries are named by the files of the text encoders
        entries = {k: self._prompt_entry(*by_key[k]) for k in prompts} if self.prompt_cache else {}
        found = {}
        for p, entry in entries.items():
            if entry.exists():
                try:
                    saved = mx.load(str(entry))
                    found[p] = tuple(saved[name] for name in self.text_parts)
                    mx.eval(found[p])
                except Exception as e:
                    warnings.warn(f"the prompt cache entry {entry} is unreadable ({type(e).__name__}): encoding the "
                                  f"prompt again.")
                    found.pop(p, None)
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        with self._phase("text encoders", download=bool(missing)):
            encoded = dict(zip(missing, self._encode([by_key[p] for p in missing], progress))) if missing else {}
        self.prompt_hit = not missing
        for p in missing if self.prompt_cache else ():
            entry = entries[p]
            try:
                entry.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(entry, lambda tmp: mx.save_safetensors(str(tmp), dict(zip(self.text_parts,
                                                                                      encoded[p]))))
            except (OSError, HunyuanVideoError) as e:
                warnings.warn(f"the prompt cache cannot be written in {entry.parent} "
                              f"({getattr(e, 'strerror', None) or e}): going on without it (set HUNYUAN_APPLE_CACHE "
                              f"to a writable folder, or turn the prompt cache off).")
        outs = [{**found, **encoded}[p] for p in prompts]

        def joined(parts):  # one part of every prompt's, the shorter right-padded to the longest (LLaVA's)
            longest = max(a.shape[1] for a in parts)
            return mx.concatenate([mx.pad(a, [(0, 0), (0, longest - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
                                   for a in parts], axis=0)
        return tuple(joined(parts) for parts in zip(*outs))

    def _encode(self, items, progress=None):
        """The text encoders, inside the text encoders' phase: [(states, mask, pooled)] for [(prompt, image or
        None, interleave)], each on its own, the LLM (LLaVA with its vision tower for the I2V checkpoints) loaded
        once and gone before CLIP loads."""
        tokenizer = load_tokenizer(self.folder / "tokenizer")
        llm = load_text_encoder(self.folder / "text_encoder", self.dtypes["text_encoders"], self.quantization,
                                _reporter(progress, "loading the LLM"))
        llava = isinstance(llm, LlavaTextEncoder)
        # the template's tokens before the prompt: 95 (T2V) or 103 (I2V, <image> once) with Llama-3's vocabulary
        crop_start = len(tokenizer((I2V_TEMPLATE if llava else PROMPT_TEMPLATE).split("{}")[0]).input_ids)
        if llava and any(image is None for _, image, _ in items):
            raise HunyuanVideoError(f"{self.folder / 'text_encoder'} is LLaVA, which reads the prompt with an image: "
                                    f"pass the image with the prompt.")
        if not llava and any(image is not None for _, image, _ in items):
            raise HunyuanVideoError(f"{self.folder / 'text_encoder'} reads no image (it is not LLaVA): use an "
                                    f"image-to-video checkpoint's text encoder.")
        out = []
        for p, image, interleave in items:
            report = _reporter(progress, "encoding the prompt")
            if llava:
                pixels = clip_pixels(image, self._image_processor())
                out.append(encode_llava(p, pixels, tokenizer, llm, interleave, crop_start=crop_start, progress=report))
            else:
                out.append(encode_llama(p, tokenizer, llm, crop_start=crop_start, progress=report))
            mx.eval(out[-1])
        del llm
        gc.collect()
        mx.clear_cache()
        clip = load_clip_text_encoder(self.folder / "text_encoder_2", self.dtypes["text_encoders"])
        tokenizer_2 = load_tokenizer(self.folder / "tokenizer_2")
        for i, (p, _, _) in enumerate(items):
            out[i] = (*out[i], encode_clip(p, tokenizer_2, clip))
            mx.eval(out[i])
        return out

    def _image_processor(self):
        """The checkpoint's CLIP image processor settings (image_processor/preprocessor_config.json), or CLIP's."""
        f = self.folder / "image_processor" / "preprocessor_config.json"
        try:
            return json.loads(f.read_text()) if f.exists() else {}
        except ValueError as e:
            raise HunyuanVideoError(f"{f} is not valid JSON ({e}): {_again(f)}.") from None

    def prompt_requests(self, prompts, negatives=(), image=None, height=544, width=960):
        """What encode_prompt reads for these prompts and negative prompts: with HunyuanVideo-I2V's LLaVA, each
        prompt with the image (every 4th or 2nd image state, by the checkpoint's conditioning) and each negative
        prompt with a black image of the video's size, every 2nd (as the reference reads them); else the text."""
        condition = self.image_condition()
        if image is None or condition not in IMAGE_EMBED_INTERLEAVE:
            return list(prompts) + list(negatives)
        from PIL import Image

        black = Image.new("RGB", (width, height), 0)
        return [(p, image, IMAGE_EMBED_INTERLEAVE[condition]) for p in prompts] + [(n, black, 2) for n in negatives]

    def encode_video(self, video, height, width, num_frames, tile=DEFAULT_VAE_TILE, stride=DEFAULT_VAE_STRIDE,
                     progress=None):
        """Video to video: frames (F, H, W, 3) uint8 (or a file imageio reads) -> the DiT's latents (1, t, h, w,
        16): the first num_frames frames, fitted to height x width (fit_frames), encoded by the VAE's tiled encoder
        (the posterior's mean) and scaled by its scaling factor."""
        frames = fit_frames(_video_frames(video), height, width, num_frames)
        x = mx.array(frames)[None].astype(mx.float32) / 127.5 - 1  # (1, F, H, W, 3) in [-1, 1]
        return self._vae_encode("encode video", x, tile, stride)

    def encode_image(self, image, height, width):
        """Image to video: an image (read_image's) -> its latents (1, 1, h, w, 16), the VAE's posterior mean
        scaled by its scaling factor, as one frame of height x width (where SkyReels' pipeline samples the
        posterior, the mean is taken: the deterministic choice)."""
        return self._vae_encode("encode image", vae_pixels(image, height, width))

    def _vae_encode(self, name, pixels, tile=DEFAULT_VAE_TILE, stride=DEFAULT_VAE_STRIDE):
        """The VAE's encoder as the phase `name`: pixels (1, F, H, W, 3) in [-1, 1] -> the posterior's mean times
        the scaling factor, float32 (the DiT's latents)."""
        def work():
            vae = self._load_vae()
            z = vae.encode(pixels, tile, stride) * vae.scaling_factor
            mx.eval(z)
            return z.astype(mx.float32)
        with self._phase(name):
            return work()

    def _split(self, cfg, video):
        """How this rank shares the denoising (several ranks, else (None, None)): the SequenceSplit of its video
        tokens (None when it runs them all), and with CFG parallel (cfg "parallel") the Ranks of its pair: it and
        its counterpart in the other half, which runs the other branch (the first half the prompt, the second the
        negative prompt), each half splitting the tokens among its ranks."""
        if self.ranks is None:
            return None, None
        group, pair = self.ranks.group, None
        members = range(group.size())
        if cfg == "parallel":
            half, me = group.size() // 2, group.rank()
            members = range(me // half * half, me // half * half + half)
            pair = Ranks(group, [me % half, me % half + half])
        ranks = Ranks(group, members)
        return (SequenceSplit(ranks, video) if ranks.size > 1 else None), pair

    def _rank_state(self, state):
        """This rank's part of a checkpoint's step-cache state (over several ranks, each rank's is kept under
        "rank{r}.", see shared_cache_state)."""
        if self.ranks is None:
            return state
        prefix = f"rank{self.ranks.group.rank()}."
        return tuple({k.removeprefix(prefix): v for k, v in d.items() if k.startswith(prefix)} for d in state)

    def shared_cache_state(self, state):
        """A Step's cache state as a checkpoint keeps it: in one process as it is; over several ranks every rank's
        (their hidden states are their own tokens', and with CFG parallel their own branch's) under "rank{r}.", on
        every rank. Every rank calls it at the same step."""
        if self.ranks is None:
            return state
        parts = self.ranks.exchange(_pack(*state))
        return _prefixed_states((f"rank{rank}.", _unpack(data, meta=True)) for rank, data in enumerate(parts))

    def _denoise(self, r, cfg, text, latents, resume, video_latents, image_latents, progress):
        """The denoising phase of a checked request: yields a Step after each step, returns the final latents (B, t,
        h, w, 16), float32, unscaled. text: the prompts' rows, then with true CFG (cfg "batched" or "sequential") the
        negative prompts'. True CFG: v = v_neg + s (v - v_neg), two forwards a step, as one of batch 2 or one after
        the other, each branch with its own step cache. Video to video: video_latents noised to the noise level of
        step steps - int(steps x strength) (as diffusers' and musubi-tuner's video-to-video do), and the steps from
        there run; strength 1 is text to video from the same noise. Image to video: image_latents taken as the
        checkpoint's DiT takes them (image_condition): token replace's first latent frame is the image's at every
        step; latent concat's input channels are the latents, the image's (first frame, zeros after) and a mask of
        the first frame; SkyReels' the latents and the image's. The initial noise is the reference's: 0.999 noise +
        0.001 image for HunyuanVideo-I2V. The DiT is this function's: gone when it returns."""
        condition = self.image_condition()
        grid = patch_grid(r.height, r.width, r.frames)
        sparse = RadialAttention(grid, r.steps, **radial_settings(r)) if r.attention == "radial" else None
        batched = cfg == "batched"
        split, pair = self._split(cfg, math.prod(grid))
        # a step cache a branch run on its own: both with sequential CFG, the one of this rank's half with parallel
        branches = range(2) if cfg == "sequential" else [pair.rank] if pair is not None else [0]
        forwards = [step_cache(r, self.magcache(r.steps, branch)) for branch in branches]
        if resume:
            for forward, state in zip(forwards, _split_cache_state(self._rank_state(resume["cache"]), len(forwards))):
                _set_cache_state(forward, *state)
        states, mask, pooled = self._dit_text(text)
        B = states.shape[0] // (2 if cfg else 1)  # rows [0, B): the prompt; [B, 2B): the negative prompt
        strength = r.strength if video_latents is not None else 1.0
        first = r.steps - min(int(r.steps * strength), r.steps)
        steps = range(resume["step"] if resume else first, r.steps)
        model = load_transformer(self.transformer_path, self.dtypes["transformer"], self.quantization,
                                 self.quantize_modulation, self.low_memory, _reporter(progress, "loading the DiT"),
                                 lazy_modulation=self.precompute_modulation, loras=self.loras,
                                 lora_ignore_unmatched=self.lora_ignore_unmatched, model_class=self.dit_class)
        shape = (B, grid[0], grid[1] * model.patch[1], grid[2] * model.patch[2], model.out_channels)  # the latents
        dequantized = dequantize_matmul(math.prod(grid), self.quantized_matmul or "auto")
        set_quantized_matmul(model, dequantized)
        sigmas = flow_sigmas(r.steps, r.shift)
        image = None if condition is None else mx.broadcast_to(image_latents.astype(mx.float32), (B, 1, *shape[2:]))
        x = start_latents(shape, r.seed, latents, video_latents, sigmas[first], image, condition, resume)
        extra = self._extra_channels(image, shape, condition)
        dit = GuidedDiT(model, states, mask, pooled, r.guidance, sigmas, B, r.cfg_scale if cfg else None, batched,
                        forwards, sparse, condition, self.precompute_modulation, math.prod(grid), split, pair)
        work = self.stats["work"] = new_ledger(r.cache, r.attention, resume)
        work["matmul"] = ("dequantized" if dequantized else "kernel") if self.quantization else None
        work["ranks"], received = self.ranks.size if self.ranks else 1, work["received_bytes"]
        for i in _counted(steps, _reporter(progress, "denoising")):
            v = dit(_image_input(x, image, extra, condition), i, work)  # the velocity, guided
            work["received_bytes"] = received + sum(p.received for p in (split and split.ranks, pair) if p)
            x0 = x - float(sigmas[i]) * v  # the step's estimate of the clean latents (the preview's)
            x = sampler_step(x, v, sigmas[i], sigmas[i + 1], image if condition == "token_replace" else None)
            mx.eval(x, x0)
            if not mx.isfinite(x).all().item():  # black frames later: stop now, naming the phase
                raise HunyuanVideoError(f"denoising gave NaN or infinite latents at step {i + 1}: the DiT's weights, "
                                        f"a LoRA or the settings are broken; check them (nothing was written).")
            yield Step(i + 1, r.steps, x, x0, _joined_cache_state(forwards), {**work, "steps": list(work["steps"])})
        return x

    def _dit_text(self, text):
        """The DiT's text inputs from the text encoders' outputs: (states, mask, pooled)."""
        return text

    def _extra_channels(self, image, shape, condition):
        """What the DiT takes beside the latents as input channels (see _image_channels), or None."""
        return _image_channels(image, shape, condition)

    def _load_vae(self):
        return load_vae(self.folder / "vae", self.dtypes["vae"])

    def decode(self, latents, tile=DEFAULT_VAE_TILE, stride=DEFAULT_VAE_STRIDE, progress=None):
        """Latents (B, t, h, w, C) -> uint8 frames (F, H, W, 3), or (B, F, H, W, 3) for B > 1. Tiled by
        default (the reference's tiles); tile=None decodes in one piece. A latent-concat I2V checkpoint's first 4
        frames are dropped, as the reference drops them."""
        def work():
            vae = self._load_vae()
            video = vae.decode(latents.astype(vae.dtype) / vae.scaling_factor, tile, stride,
                               _reporter(progress, "decoding"), self.ranks)
            if self.image_condition() == "latent_concat":
                video = video[:, 4:]
            if not mx.isfinite(video).all().item():
                raise HunyuanVideoError("decoding gave NaN or infinite frames: the VAE's weights (or the latents) are "
                                        "broken; check them.")
            return np.array((mx.clip(video.astype(mx.float32) / 2 + 0.5, 0, 1) * 255).round().astype(mx.uint8))
        with self._phase("decode"):
            frames = work()
        return frames[0] if frames.shape[0] == 1 else frames

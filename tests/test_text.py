"""Text encoding against diffusers' HunyuanVideoPipeline.encode_prompt, run live on the same random tiny
encoders, with the real vocabularies (see conftest.py).

Tolerances, float32, relative error (max |ours - ref| / max |ref|) over valid positions, about 10x what was measured
on this project's Linux machine: the LLM's states 1e-5 (measured 8.1e-7 to 1.2e-6), CLIP's pooled vector and
last states 2e-6 (1.4e-7 to 3.0e-7); masks equal.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import make_clip_tokenizer, make_llama_tokenizer, randomize, rel_err
from diffusers import HunyuanVideoPipeline
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

import HunyuanVideo_Apple as H
from safetensors.torch import load_file, save_file

STATES_TOL = 1e-5
POOLED_TOL = 2e-6
PROMPTS = [
    "A cat walks on the grass, realistic style.",
    "Ein Hund läuft über die Straße — 東京の夜景、ネオンの光が雨に映る。",
    "🐱🚀 a cat astronaut floats past the moon 🌕✨",
    "cat",
    " ".join(["a red fox runs through a snowy forest at dawn, its breath visible in the cold air;"] * 16),  # > 256
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny diffusers-layout text side: tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/."""
    root = tmp_path_factory.mktemp("hunyuan")
    llama = randomize(LlamaModel(LlamaConfig(
        vocab_size=128256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=512)), seed=0).eval()
    clip = randomize(CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2)), seed=1).eval()
    llama.save_pretrained(root / "text_encoder")
    clip.save_pretrained(root / "text_encoder_2")
    # the hub checkpoint was written by transformers 4, whose keys start with text_model.
    f = root / "text_encoder_2" / "model.safetensors"
    save_file({"text_model." + k: v for k, v in load_file(f).items()}, f)
    tokenizers = make_llama_tokenizer(root / "tokenizer"), make_clip_tokenizer(root / "tokenizer_2")
    return root, llama, clip, tokenizers


def reference(checkpoint, prompts):
    root, llama, clip, (tok, tok2) = checkpoint
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tok, transformer=None, vae=None, scheduler=None,
                                text_encoder_2=clip, tokenizer_2=tok2)
    with torch.no_grad():
        states, pooled, mask = pipe.encode_prompt(prompts, device="cpu", dtype=torch.float32)
    return states.numpy(), mask.numpy(), pooled.numpy()


def ours(checkpoint, prompts):
    root = checkpoint[0]
    return H.encode_prompt(prompts, H.load_tokenizer(root / "tokenizer"),
                           H.load_text_encoder(root / "text_encoder", dtype=mx.float32),
                           H.load_tokenizer(root / "tokenizer_2"),
                           H.load_clip_text_encoder(root / "text_encoder_2", dtype=mx.float32))


def test_encode_prompt_matches_diffusers(checkpoint):
    with pytest.warns(UserWarning, match="were cut"):  # the long prompt
        states, mask, pooled = ours(checkpoint, PROMPTS)
    ref_states, ref_mask, ref_pooled = reference(checkpoint, PROMPTS)
    assert states.shape == (len(PROMPTS), 256, 64) and pooled.shape == (len(PROMPTS), 32)
    mask = np.array(mask)
    assert np.array_equal(mask, ref_mask), "masks differ"
    assert mask[3].sum() < 10 and mask[4].sum() == 256  # 'cat' is short; the long prompt fills all 256
    valid = mask.astype(bool)
    err = rel_err(np.array(states)[valid], ref_states[valid])
    assert err <= STATES_TOL, f"LLM states: relative error {err:.2e} > {STATES_TOL}"
    assert not np.array(states)[~valid].any(), "padded positions are zero"
    err = rel_err(np.array(pooled), ref_pooled)
    assert err <= POOLED_TOL, f"CLIP pooled: relative error {err:.2e} > {POOLED_TOL}"


@pytest.mark.parametrize("prompt", PROMPTS[:4])
def test_single_prompts_match_diffusers(checkpoint, prompt):
    """One prompt at a time, as the pipeline encodes: only its own tokens are run."""
    states, mask, pooled = ours(checkpoint, prompt)
    ref_states, ref_mask, ref_pooled = reference(checkpoint, prompt)
    valid = np.array(mask).astype(bool)
    assert np.array_equal(np.array(mask), ref_mask)
    assert rel_err(np.array(states)[valid], ref_states[valid]) <= STATES_TOL
    assert rel_err(np.array(pooled), ref_pooled) <= POOLED_TOL


def test_crop_start_is_95_with_the_llama3_vocabulary(checkpoint):
    tok = checkpoint[3][0]
    prefix = H.PROMPT_TEMPLATE.split("{}")[0]
    ids = tok(prefix).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert len(ids) == H.CROP_START == 95
    # and the prompt's first token starts right there
    full = tok(H.PROMPT_TEMPLATE.format("cat")).input_ids
    assert full[:95] == ids and tok.decode(full[95:96]).strip() == "cat"


def test_unused_llama_layers_stay_on_disk(checkpoint):
    model = H.load_text_encoder(checkpoint[0] / "text_encoder", dtype=mx.float32)
    assert len(model.layers) == 4 - 2


def test_clip_end_token_rule(checkpoint, tmp_path):
    """A config whose eos_token_id is not 2 pools at the first such token, not at the largest id: ours must
    follow transformers there too (2368 makes the two rules pick different positions)."""
    clip = checkpoint[2]
    clip.config.eos_token_id = clip.eos_token_id = 2368
    clip.save_pretrained(tmp_path / "text_encoder_2")  # transformers 5's layout: no text_model. prefix
    ids = torch.tensor([[49406, 320, 2368, 49407, 49407, 49407], [49406, 320, 49407, 49407, 49407, 49407]])
    with torch.no_grad():
        ref = clip(ids).pooler_output.numpy()
    clip.config.eos_token_id = clip.eos_token_id = 2
    out = H.load_clip_text_encoder(tmp_path / "text_encoder_2", dtype=mx.float32)(mx.array(ids.numpy()))
    assert rel_err(np.array(out), ref) <= POOLED_TOL


def test_wrong_folders_are_named(checkpoint):
    root = checkpoint[0]
    with pytest.raises(H.HunyuanVideoError, match="CLIP's text model was expected"):
        H.load_clip_text_encoder(root / "text_encoder")
    with pytest.raises(H.HunyuanVideoError, match="model_type llama"):
        H.load_text_encoder(root / "text_encoder_2")
    with pytest.raises(H.HunyuanVideoError, match="no readable tokenizer"):
        H.load_tokenizer(root / "text_encoder")

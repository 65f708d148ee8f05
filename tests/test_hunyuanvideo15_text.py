"""HunyuanVideo 1.5's encoders against the reference, live: Qwen2.5-VL's language model (transformers'
Qwen2_5_VLTextModel) read through diffusers' HunyuanVideo15Pipeline._get_mllm_prompt_embeds with Qwen2.5's real
vocabulary, byT5 (transformers' T5EncoderModel, ByT5Tokenizer) through its _get_byt5_prompt_embeds, and SigLIP's vision
tower through HunyuanVideo15ImageToVideoPipeline._get_image_embeds, on tiny random weights in float32; the quoted-text
formatter against diffusers' extract_glyph_texts.

Tolerances (relative error = max |ours - ref| / max |ref|), about 10x what was measured on this project's Linux
machine: Qwen 8e-6 (measured 7.7e-7), byT5 2e-5 (measured 1.8e-6), SigLIP 3e-6 (measured 2.4e-7).
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import make_qwen_tokenizer, randomize, rel_err
from diffusers import HunyuanVideo15Pipeline
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts
from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

import HunyuanVideo15_Apple as H15
import HunyuanVideo_Apple as H

QWEN_TOL = 8e-6
BYT5_TOL = 2e-5
SIGLIP_TOL = 3e-6
PROMPTS = ['A neon sign that says "OPEN" over a café door, and a cat', "a dog runs on the beach at sunset",
           "“Hello”, then \"world\", then \"Hello\" again; it's 12:30", ""]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    tok = make_qwen_tokenizer(folder / "tokenizer")
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}  # sections of the 4 rotated pairs
    config = Qwen2_5_VLTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_parameters=rope)
    ref = randomize(Qwen2_5_VLTextModel(config), seed=0).eval()
    ref.save_pretrained(folder / "text_encoder")
    return tok, ref, folder


def test_the_template_crop_is_the_system_message_in_qwen_s_real_vocabulary(qwen):
    """The 108 tokens cropped are exactly the chat format and system message before the user's text, as the
    reference's tokenizer (its chat template) writes them with the real vocabulary."""
    tok, _, _ = qwen
    ids = tok.apply_chat_template([{"role": "system", "content": H15.QWEN_SYSTEM},
                                   {"role": "user", "content": "a cat"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    assert ids == tok(H15.QWEN_TEMPLATE.format("a cat")).input_ids
    assert tok.decode(ids[:H15.QWEN_CROP_START]).endswith("<|im_start|>user\n") and tok.decode(
        ids[H15.QWEN_CROP_START:]).startswith("a cat<|im_end|>")


def test_qwen_states_match_the_reference(qwen):
    tok, ref, folder = qwen
    ours = H15.load_text_encoder(folder / "text_encoder", dtype=mx.float32)
    assert len(ours.layers) == 2  # hidden_states[-3]: the last two layers are never run
    with torch.no_grad():
        expected, expected_mask = HunyuanVideo15Pipeline._get_mllm_prompt_embeds(ref, tok, PROMPTS, "cpu")
    states, mask = H15.encode_qwen(PROMPTS, tok, ours)
    assert np.array_equal(np.array(mask), expected_mask.numpy())
    expected = (expected * expected_mask[..., None]).numpy()
    err = rel_err(np.array(states), expected)
    assert err <= QWEN_TOL, f"relative error {err:.2e} > {QWEN_TOL}"


def test_glyph_text_is_the_reference_s():
    for prompt in PROMPTS + ['"a" "b" "a"', 'one "quote', '""', "“only curly”", '"x" and “x”']:
        assert H15.glyph_text(prompt) == extract_glyph_texts(prompt), prompt


def test_byt5_states_match_the_reference(tmp_path):
    tok = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128)
    ref = randomize(T5EncoderModel(config), seed=1).eval()
    ref.save_pretrained(tmp_path / "text_encoder_2")
    ours = H15.load_byt5(tmp_path / "text_encoder_2", dtype=mx.float32)
    prompts = PROMPTS + ['a long one: "' + "the quick brown fox jumps over the lazy dog " * 4 + '"']  # past 128 bytes
    with torch.no_grad():
        expected, expected_mask = HunyuanVideo15Pipeline._get_byt5_prompt_embeds(tok, ref, prompts, "cpu")
    states, mask = H15.encode_byt5(prompts, tok, ours)
    assert np.array_equal(np.array(mask), expected_mask.numpy()) and np.array(mask)[1].sum() == 0
    expected = (expected * expected_mask[..., None]).numpy()
    err = rel_err(np.array(states), expected)
    assert err <= BYT5_TOL, f"relative error {err:.2e} > {BYT5_TOL}"


def test_a_13b_text_encoder_is_refused_in_one_sentence(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "llama")
    with pytest.raises(H.HunyuanVideoError, match="holds a llama where Qwen2.5-VL's language model was expected"):
        H15.load_text_encoder(tmp_path / "llama")


def test_the_whole_qwen2_5_vl_loads_as_its_language_model(tmp_path):
    """Tencent's text_encoder/llm/ is the whole Qwen2.5-VL-7B-Instruct (vision tower, head): its language model is
    read, the rest left on disk, and gives transformers' hidden_states[-3] (measured 5.3e-7; bound 5e-6)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0])
    ref = randomize(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)), 2)
    ref.eval().save_pretrained(tmp_path / "llm")
    ours = H15.load_text_encoder(tmp_path / "llm", dtype=mx.float32)
    ids = torch.tensor([[5, 17, 200, 3, 9, 41]])
    with torch.no_grad():
        expected = ref.model.language_model(input_ids=ids, output_hidden_states=True).hidden_states[-3].numpy()
    err = rel_err(np.array(ours(mx.array(ids.numpy()))), expected)
    assert err <= 5e-6, f"relative error {err:.2e}"


def test_siglip_image_tokens_match_the_reference(tmp_path):
    """SigLIP's tokens of an image (not square: resized without keeping its aspect, bicubic) as diffusers'
    HunyuanVideo15ImageToVideoPipeline._get_image_embeds makes them with transformers' SiglipVisionModel and its
    image processor."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from PIL import Image
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                image_size=28, patch_size=7)
    ref = randomize(SiglipVisionModel(config), seed=3).eval()
    ref.save_pretrained(tmp_path / "image_encoder")
    processor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    processor.save_pretrained(tmp_path / "feature_extractor")
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    with torch.no_grad():
        expected = HunyuanVideo15ImageToVideoPipeline._get_image_embeds(ref, processor, image, "cpu").numpy()
    config = json.loads((tmp_path / "feature_extractor" / "preprocessor_config.json").read_text())
    tower = H15.load_image_encoder(tmp_path / "image_encoder", dtype=mx.float32)
    out = np.array(tower(H15.siglip_pixels(image, config)))
    assert out.shape == expected.shape == (1, 16, 32)
    err = rel_err(out, expected)
    assert err <= SIGLIP_TOL, f"relative error {err:.2e} > {SIGLIP_TOL}"

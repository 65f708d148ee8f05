"""HunyuanVideo 1.5's memory plan: its derived estimate of each phase against the measured peaks of tiny runs, and a
request over budget refused before any weights load, in 1.5's terms.

Stated margin (CPU backend, where the tests run): each phase's estimate is at least its measured peak
(mx.get_peak_memory, less what the process held before the run) and at most 1.2x it, for two checkpoints whose every
component differs in width: text to video at three sizes (the second tiled, the third decoded in two pieces of
latent frames), and image to video with true CFG's
branches batched at the first; each with the default precisions (DiT bf16, VAE and encoders fp16) and at the first
in float32. The prompt fills the 1000 LLM tokens and the 256 byT5 ones. Measured: text encoders 1.00x to 1.03x (the
peak is the load of Qwen's vocabulary, stored float32 here, beside its cast), denoise 1.01x to 1.17x, decode 1.04x to
1.11x. Two bounds are wider. Denoise with the branches batched: 1.15x to 1.21x, bound 1.25 (a block's count takes
each op's float32 norm temporaries as alive beside the attention scores, as 13B's does; the CPU frees them op by op,
and here the 1320 text tokens outweigh the video's 48). The image encoder: 1.01x to 1.14x quiet, 1.32x once in the
two-process suite, bound 1.4 (a phase of a few hundred KB here, most of it the held text encodings, whose SigLIP
convolution's temporaries are freed on MLX's worker thread as scheduling allows). Nothing in the estimate was fitted
to these runs: it counts the tensors the code allocates (see HunyuanVideo15_Apple.estimate_memory).
"""

import gc
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import hunyuanvideo15_reference
from PIL import Image

import HunyuanVideo_Apple as H
import HunyuanVideo15_Apple as H15

ROOT = Path(__file__).resolve().parents[1]
MARGIN = {"text encoders": 1.2, "image encoder": 1.4, "denoise": 1.25, "decode": 1.2}  # see above
LONG = (" ".join(["a red fox runs through the snow in the forest at night"] * 100) +  # past 1000 Qwen tokens
        ' under a sign that says "' + "OPEN ALL NIGHT " * 30 + '"')  # past 256 bytes of quoted text
# (heads x head width, LLM width, VAE block_out, SigLIP (width, image size, patch)); the second is image to video
CHECKPOINTS = {"t2v": ((2, 32), 64, (8, 16, 16, 16, 16), None),
               "i2v": ((2, 64), 128, (16, 32, 32, 32, 32), (64, 112, 14))}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_estimate_brackets_the_measured_peak(name, tmp_path):
    (heads, head_dim), llm, block_out, siglip = CHECKPOINTS[name]
    # text to video: a CFG-distilled checkpoint (its guider's scale 1: one branch); image to video: a base one (6)
    hunyuanvideo15_reference(tmp_path, 6.0 if siglip else 1.0, i2v=siglip is not None, heads=heads, head_dim=head_dim,
                             llm=llm, block_out=block_out, **(dict(siglip=siglip) if siglip else {}))
    folder = tmp_path / "ckpt"
    settings = {}
    if siglip:  # true CFG, its branches as one batch where the plan says they fit (they do here)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), np.uint8))
        settings = dict(image=image, negative_prompt="", cfg_scale=6.0)
    ratios = {}
    # the second is tiled (width 272 > 256); the third decodes in two pieces (6 latent frames, DECODE_FRAMES 4)
    for size in [(64, 96, 5), (64, 272, 9), (64, 96, 21)][:1 if siglip else 3]:
        for dtype in (None, mx.float32)[:2 if size == (64, 96, 5) else 1]:  # the default precisions; float32
            pipe = H15.HunyuanVideo15Pipeline.from_pretrained(folder, dtype=dtype)
            gc.collect()
            held = mx.get_active_memory()  # what this process held before: not the run's
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the prompt is cut at 1000 tokens, on purpose
                pipe(LONG, **dict(zip(("height", "width", "frames"), size)), steps=1, seed=0, **settings)
            cfg = pipe.cfg_mode(*size, None, 1) if siglip else None
            assert cfg == ("batched" if siglip else None)
            est = H15.estimate_memory(folder, *size, dtypes=pipe.dtypes, steps=1, cfg=cfg)
            assert set(est) == {"text encoders", "denoise", "decode"} | ({"image encoder"} if siglip else set())
            for phase in est:
                ratios[phase, size, dtype] = est[phase] / (pipe.stats[phase][1] * H.GB - held)
    print({k: f"{v:.3f}" for k, v in ratios.items()})
    for (phase, *case), ratio in ratios.items():
        assert 1.0 <= ratio <= MARGIN[phase], f"{phase} {case}: estimate {ratio:.3f}x the measured peak"


def test_over_budget_is_refused_before_loading_in_1_5_s_sizes(tmp_path, monkeypatch):
    """A 720p request on a machine too small for it: refused before any weights load, in one sentence naming 1.5's
    480p size (not 13B's 544x960) among what fits."""
    hunyuanvideo15_reference(tmp_path, 6.0)
    folder = tmp_path / "ckpt"
    at = lambda h, w, f=9: max(H15.estimate_memory(folder, h, w, f).values())  # noqa: E731
    budget = (at(720, 1280) + at(480, 848)) / 2 / 0.9  # between what 480p and 720p need (with the 10% kept free)
    assert at(480, 848) <= 0.9 * budget < at(720, 1280)
    monkeypatch.setenv("HUNYUAN_APPLE_MEMORY_GB", f"{budget / H.GB:.6f}")
    for name in ("load_transformer", "load_text_encoder", "load_byt5", "load_vae"):
        monkeypatch.setattr(H15, name, lambda *a, **k: pytest.fail("weights were loaded"))
    pipe = H15.HunyuanVideo15Pipeline.from_pretrained(folder)
    with pytest.raises(H.HunyuanVideoError) as e:
        pipe("a cat", height=720, width=1280, frames=9, steps=1)
    msg = str(e.value)
    assert f"needs about {H.gib(at(720, 1280))} at its peak" in msg, msg
    assert "height and width 480 848" in msg and "544" not in msg, msg


def test_plan_counts_the_real_model_exactly(tmp_path):
    """The full-size plan's DiT, from header-only files of the real shapes: each of the 54 double blocks holds
    2 x (18 D^2 + 15 D + 256) parameters at D = 2048 (per stream: modulation 6 D^2 + 6 D, q|k|v 3 D^2 + 3 D, the
    q and k norms 2 x 128, the projection D^2 + D, the MLP 4 D^2 + 4 D and 4 D^2 + D): 8.15B of the 8.3B; the
    denoise estimate is the weights less the modulation (never held whole), plus its table for 50 steps and the
    activations, exactly. bench_hunyuan_apple.py --plan prints 1.5's rows."""
    import bench_hunyuan_apple as B
    folder = B.header_only_checkpoint15(tmp_path / "t2v")
    info = H._tensor_info(H._component_files(folder / "transformer", "")[0])
    D = 2048
    blocks = {k: v for k, v in info.items() if k.startswith("double_blocks.")}
    assert H._weights_bytes(blocks) == 2 * 54 * 2 * (18 * D * D + 15 * D + 256)
    modulation = 2 * 54 * 2 * (6 * D * D + 6 * D)
    table = 2 * 50 * 54 * 12 * D
    video, text = 31 * 30 * 53, H15.QWEN_LENGTH + H15.BYT5_LENGTH  # 480x848x121: 31 x 30 x 53 latents
    activations = H._dit_activations(video + text, text, video, D, 16, 4 * D, 3584, 2, cpu=False, single_blocks=False,
                                     values=(65, 32), refined=H15.QWEN_LENGTH)
    held = H15.BYT5_LENGTH * 1472 * 2 * 2  # byT5's states, as encoded and cast
    assert H15.estimate_memory(folder, 480, 848, 121, backend="gpu")["denoise"] == \
        H._weights_bytes(info) - modulation + table + activations + held
    r = subprocess.run([sys.executable, str(ROOT / "bench_hunyuan_apple.py"), "--plan"], capture_output=True,
                       text=True, timeout=300)
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["480x848x121"],
                                                                                 ["720x1280x121"])]
    assert r.returncode == 0 and {(s, m, q) for s, m, q, *_ in rows} == {
        (s, m, q) for s in ("480x848x121", "720x1280x121") for m, q in (("T2V", "bf16"), ("T2V", "int8"),
                                                                         ("T2V", "int4"), ("I2V", "bf16"))}, r.stdout


def test_the_plan_counts_what_the_decode_s_pieces_carry():
    """What a decode in pieces hands from piece to piece (two frames of every causal convolution's input, the
    attention's keys and values of every latent frame so far), summed over the cache after the last piece, is what
    the plan counts for it, to the byte."""
    sizes = dict(block_out_channels=(8, 16, 16, 32, 32), layers_per_block=2, latent_channels=4)
    vae = H15.HunyuanVideo15VAE(**sizes)
    vae.set_dtype(mx.float16)
    z = mx.random.normal((1, 6, 4, 6, 4)).astype(mx.float16)  # 6 latent frames of 64 x 96 pixels: pieces of 4 and 2
    cache = {}
    for t in range(0, 6, H15.DECODE_FRAMES):
        mx.eval(vae.decoder(z[:, t:t + H15.DECODE_FRAMES], cache))
    carried = sum(a.nbytes for value in cache.values() for a in (value if isinstance(value, tuple) else (value,)))
    assert carried == H15._decode_context(6, 64, 96, {**H._sizes_of(H15.HunyuanVideo15VAE, {}), **sizes}, 2)

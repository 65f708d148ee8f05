"""Step caches against their references, run live on a tiny random DiT in float32, whole denoising runs from
the same initial latents and text embeddings (no text encoders: the caches act on the DiT alone).

- First-Block Cache and MagCache against diffusers' own hooks (FirstBlockCacheConfig, MagCacheConfig with the
  same magnitude ratios) inside diffusers' HunyuanVideoPipeline.
- TaylorSeer against diffusers' TaylorSeerCacheConfig(use_lite_mode=True) (its factors in float32).
- TeaCache and EasyCache have no diffusers hook: their authors' HunyuanVideo rules are written below on
  diffusers' transformer (its blocks wrapped), from TeaCache4HunyuanVideo/teacache_sample_video.py and
  EasyCache4HunyuanVideo/easycache_sample_video.py.

Each comparison: the same steps skipped, and final latents within LATENT_TOL (max |ours - ref| / max |ref|),
at thresholds where some steps are skipped and some are not. On random weights the skip counts say nothing
about real ones (the README quotes the published figures).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import denoise_with_diffusers, dit_run_inputs, rel_err
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

import HunyuanVideo_Apple as H

LATENT_TOL = 1e-4  # measured 2.6e-5 to 3.6e-5 (TaylorSeer 2.9e-5 to 3.6e-5) on this project's Linux machine
F, HEIGHT, WIDTH, STEPS = 9, 48, 64, 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random transformer saved where our pipeline reads it, random text inputs (20 of 32 tokens
    valid) and initial latents (conftest.dit_run_inputs)."""
    return dit_run_inputs(tmp_path_factory.mktemp("caches"), F, HEIGHT, WIDTH, 7, 11)


def reference(setup, wrap=None, **cache):
    """diffusers' pipeline over the transformer alone; `cache` enables a diffusers cache config, `wrap`
    patches the transformer with a reference rule. Returns the final latents (channels-last) and which steps
    ran the last block."""
    transformer = setup[1]()  # make()
    ran, step = [], [0]
    transformer.single_transformer_blocks[-1].attn.register_forward_hook(lambda *a: ran.append(step[0]))
    if cache:
        transformer.enable_cache(*cache.values())
    rule = wrap(transformer) if wrap else None
    latents = denoise_with_diffusers(transformer, setup, F, HEIGHT, WIDTH, STEPS, step)
    computed = [i in ran for i in range(STEPS)]
    if rule is not None:
        assert rule.computed == computed  # the rule's own record agrees with what ran
    return latents, computed


def ours(setup, cache=None, threshold=None, options=None, **kw):
    """Our run of the setup's DiT over its text inputs and initial latents; options: TaylorSeer's {interval, ...}."""
    folder, _, states, mask, pooled, init = setup
    pipe = H.HunyuanVideoPipeline(folder, dtypes=dict.fromkeys(H.DEFAULT_DTYPES, mx.float32))
    latents = pipe(text=(mx.array(states.numpy()), mx.array(mask.numpy()), mx.array(pooled.numpy())), height=HEIGHT,
                   width=WIDTH, frames=F, steps=STEPS, guidance=6.0, shift=7.0, output_type="latent",
                   latents=mx.array(init.permute(0, 2, 3, 4, 1).numpy()), cache=cache, cache_threshold=threshold,
                   **{f"cache_{k}": v for k, v in (options or {}).items()}, **kw)
    return np.array(latents), pipe.stats["work"]


def mixed_threshold(setup, cache, candidates=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)):
    """The first threshold at which our cache both skips and computes steps beyond the ones always run."""
    for threshold in candidates:
        _, work = ours(setup, cache, threshold)
        if 0 < work["skipped"] and work["forwards"] > 3:
            return threshold
    pytest.fail(f"{cache}: no threshold among {candidates} gives a mix of skipped and computed steps")


class TeaCacheRule:
    """TeaCache4HunyuanVideo's rule on diffusers' transformer. Indicator: the first double block's modulated
    video input (diffusers' norm1: LayerNorm, then img_mod's shift and scale); its relative L1 change,
    rescaled by the published polynomial, accumulated; skip while below the threshold. The script counts
    steps modulo (steps - 1) and always computes at count 0 and steps - 2. On a skip, the video tokens get
    the cached residual (after the last block minus before the first) and the final layer runs."""

    def __init__(self, transformer, threshold):
        self.threshold, self.cnt, self.num_steps, self.acc = threshold, 0, STEPS - 1, 0.0
        self.previous = self.residual = None
        self.computed = []
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        head, tail, original = blocks[0], blocks[-1], {b: b.forward for b in blocks}
        poly = np.poly1d([7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02])

        def head_forward(img, txt, temb, *args):
            modulated = head.norm1(img, emb=temb)[0]
            if self.cnt == 0 or self.cnt == self.num_steps - 1:
                calc, self.acc = True, 0.0
            else:
                self.acc += poly(((modulated - self.previous).abs().mean() / self.previous.abs().mean()).item())
                calc = self.acc >= self.threshold
                if calc:
                    self.acc = 0.0
            self.previous = modulated
            self.cnt = 0 if self.cnt == self.num_steps - 1 else self.cnt + 1
            self.computed.append(calc)
            self.start = img
            return original[head](img, txt, temb, *args) if calc else (img + self.residual, txt)

        def tail_forward(img, txt, *args):
            if not self.computed[-1]:
                return img, txt
            out = original[tail](img, txt, *args)
            self.residual = out[0] - self.start
            return out

        for b in blocks[1:-1]:
            b.forward = lambda img, txt, *args, b=b: original[b](img, txt, *args) if self.computed[-1] else (img, txt)
        head.forward, tail.forward = head_forward, tail_forward


class EasyCacheRule:
    """EasyCache4HunyuanVideo's rule around diffusers' transformer: after 5 full steps, accumulate
    k * mean|x - x_prev| / mean|last output| (k: mean |output change| / mean |input change| between the last
    two computed steps); skip while below the threshold, returning x + (last output - its input); the last
    step always computed."""

    def __init__(self, transformer, threshold):
        self.threshold, self.cnt, self.acc, self.k = threshold, 0, 0.0, None
        self.previous_input = self.previous_output = self.prev_prev_input = self.cache = None
        self.computed = []
        original = transformer.forward

        def forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                    guidance=None, attention_kwargs=None, return_dict=True):
            raw = hidden_states.clone()
            if self.cnt < 5 or self.cnt >= STEPS - 1:
                calc, self.acc = True, 0.0
            elif self.previous_input is not None and self.previous_output is not None and self.k is not None:
                change = (raw - self.previous_input).abs().mean()
                self.acc += (self.k * (change / self.previous_output.abs().mean())).item()
                calc = self.acc >= self.threshold
                if calc:
                    self.acc = 0.0
            else:
                calc = True
            self.previous_input = raw
            self.cnt += 1
            self.computed.append(calc)
            if not calc:
                return (raw + self.cache,)
            result = original(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                              pooled_projections, guidance, attention_kwargs, return_dict=False)[0]
            self.cache = result - raw
            if self.previous_output is not None and self.prev_prev_input is not None:
                self.k = (result - self.previous_output).abs().mean() / (raw - self.prev_prev_input).abs().mean()
            self.prev_prev_input, self.previous_output = raw, result.clone()
            return (result,)

        transformer.forward = forward


def check(mine, ref):
    (latents, work), (ref_latents, computed) = mine, ref
    assert work["steps"] == computed, (work["steps"], computed)
    assert 0 < work["skipped"] < STEPS and work["forwards"] == sum(computed)
    err = rel_err(latents, ref_latents)
    assert err <= LATENT_TOL, f"final latents: relative error {err:.2e} > {LATENT_TOL}"


def test_first_block_cache_matches_diffusers_hook(setup):
    threshold = mixed_threshold(setup, "fbcache")
    check(ours(setup, "fbcache", threshold), reference(setup, config=FirstBlockCacheConfig(threshold=threshold)))


@pytest.mark.parametrize("threshold", [H.CACHES["magcache"], 0.06])
def test_mag_cache_matches_diffusers_hook(setup, threshold):
    """The decisions follow the ratios alone: the published 544p table (nearest-interpolated to 10 steps by
    both), K 6, retention 0.2."""
    config = MagCacheConfig(threshold=threshold, max_skip_steps=6, retention_ratio=0.2, num_inference_steps=STEPS,
                            mag_ratios=H.MAG_RATIOS[544])
    check(ours(setup, "magcache", threshold), reference(setup, config=config))


def test_teacache_follows_the_published_rule(setup):
    threshold = mixed_threshold(setup, "teacache")
    check(ours(setup, "teacache", threshold), reference(setup, wrap=lambda t: TeaCacheRule(t, threshold)))


def test_easycache_follows_the_published_rule(setup):
    threshold = mixed_threshold(setup, "easycache")
    check(ours(setup, "easycache", threshold), reference(setup, wrap=lambda t: EasyCacheRule(t, threshold)))


@pytest.mark.parametrize("interval, order, warmup", [(5, 1, 3), (3, 2, 2), (2, 3, 1)])
def test_taylorseer_matches_diffusers_lite_hook(setup, interval, order, warmup):
    """diffusers' defaults (interval 5, order 1, warmup 3: forwards 0, 1, 2, 4, 9 computed, 3 and 5 to 8
    forecast) and two settings with higher orders; the skipped blocks and the forecast final projection."""
    config = TaylorSeerCacheConfig(cache_interval=interval, max_order=order, disable_cache_before_step=warmup,
                                   taylor_factors_dtype=torch.float32, use_lite_mode=True)
    mine = ours(setup, "taylorseer", options=dict(interval=interval, order=order, warmup=warmup))
    computed = [s < warmup or (s - warmup - 1) % interval == 0 for s in range(STEPS)]  # the hook's rule
    assert mine[1]["steps"] == computed
    check(mine, reference(setup, config=config))


def test_threshold_zero_is_the_uncached_run_to_the_bit(setup):
    plain, work = ours(setup)
    assert work["skipped"] == 0 and work["forwards"] == STEPS
    for cache, default in H.CACHES.items():  # TaylorSeer has no threshold: interval 1 computes every step
        latents, work = ours(setup, cache, 0.0) if default is not None else ours(setup, cache, options=dict(interval=1))
        assert work["skipped"] == 0 and np.array_equal(latents, plain), cache
    # the work ledger: 10 full forwards over 3 x 3 x 4 video tokens and 20 valid text tokens
    model = H.load_transformer(setup[0] / "transformer", mx.float32)
    assert work["pflop"] == pytest.approx(STEPS * model.flops(36 + 20) / 1e15)


@pytest.mark.parametrize("kw, words", [
    (dict(cache="deepcache"), 'cache is "deepcache", where one of fbcache, teacache, magcache, easycache'),
    (dict(cache="teacache", cache_threshold=-0.1), "cache_threshold -0.1: use 0 or more"),
    (dict(cache_threshold=0.1), "cache_threshold without cache: name the cache too"),
    (dict(cache="taylorseer", cache_threshold=0.1), "cache taylorseer takes no cache_threshold: set its cache_interval"),
    (dict(cache="teacache", cache_interval=2), r"cache_interval set the TaylorSeer cache: give cache taylorseer too "
                                               r"\(cache teacache takes cache_threshold\)"),
    (dict(cache="taylorseer", cache_interval=0), "cache_interval 0: use a whole number of 1 or more"),
    (dict(cache="taylorseer", cache_order=7), "cache_order 7: use a whole number from 1 to 4"),
    (dict(cache="taylorseer", cache_depth=2), "cache_depth is not a setting"),
    (dict(cache_order=2), "cache_order set the TaylorSeer cache: give cache taylorseer too."),
])
def test_bad_cache_requests(setup, kw, words):
    pipe = H.HunyuanVideoPipeline(setup[0])
    with pytest.raises(H.HunyuanVideoError, match=words):
        pipe("a cat", height=32, width=32, frames=5, steps=2, **kw)


def test_the_memory_plan_counts_what_a_cache_keeps(tmp_path):
    """At 544x960x129 (33 x 34 x 60 video tokens, width 3072, bf16), First-Block Cache and TeaCache keep two
    video-token tensors between steps, MagCache one, and each the blocks' video input during a step, TaylorSeer
    its factors; the plan adds them to the denoising peak."""
    import bench_hunyuan_apple as B
    folder = B.header_only_checkpoint(tmp_path)
    peak = lambda cache: H.estimate_memory(folder, 544, 960, 129, backend="gpu", cache=cache)["denoise"]  # noqa: E731
    one = 33 * 34 * 60 * 3072 * 2
    assert (peak("fbcache") - peak(None), peak("teacache") - peak(None), peak("magcache") - peak(None)) == \
        (3 * one, 3 * one, 2 * one)
    assert 0 < peak("easycache") - peak(None) < one / 10
    # TaylorSeer (lite): order + 1 float32 factors of 64 values a token, twice while a full step updates them, and
    # the forecast velocity in bf16
    video = 33 * 34 * 60
    assert peak("taylorseer") - peak(None) == (2 * 2 * 4 + 2) * 64 * video
    third = H.estimate_memory(folder, 544, 960, 129, backend="gpu", cache="taylorseer",
                              cache_options=dict(order=3))["denoise"]
    assert third - peak(None) == (2 * 4 * 4 + 2) * 64 * video


# ---- the rules where they bind ----------------------------------------------------------------------------

def test_mag_cache_limit_of_consecutive_skips_matches_diffusers(setup):
    """At a threshold no error reaches, only MagCache's limit K = 6 stops the skipping: from step 2 (retention
    0.2 of 10 steps) six steps are skipped, the seventh computed, as diffusers' hook decides."""
    config = MagCacheConfig(threshold=100.0, max_skip_steps=6, retention_ratio=0.2, num_inference_steps=STEPS,
                            mag_ratios=H.MAG_RATIOS[544])
    ref = reference(setup, config=config)
    assert ref[1] == [True, True] + [False] * 6 + [True, False]
    check(ours(setup, "magcache", 100.0), ref)


def test_teacache_always_computes_its_last_steps(setup):
    """At a threshold the accumulated change never reaches, TeaCache skips every step but the first and, as its
    authors' script counts steps, the last two."""
    ref = reference(setup, wrap=lambda t: TeaCacheRule(t, 1e9))
    assert ref[1] == [True] + [False] * (STEPS - 3) + [True, True]
    check(ours(setup, "teacache", 1e9), ref)


def test_first_block_cache_at_its_threshold(setup, monkeypatch):
    """diffusers' hook computes the remaining blocks when the first block's relative change is above the threshold
    (`diff > threshold`): at a threshold equal to step 1's change, step 1 is skipped; just below it, computed."""
    seen = []
    real = H._rel_l1
    monkeypatch.setattr(H, "_rel_l1", lambda a, b, split=None: seen.append(real(a, b, split)) or seen[-1])
    ours(setup, "fbcache", 0.0)
    change = seen[0]  # step 1 against step 0
    assert ours(setup, "fbcache", change)[1]["steps"][1] is False
    assert ours(setup, "fbcache", float(np.nextafter(change, 0)))[1]["steps"][1] is True

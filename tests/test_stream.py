"""The one generation path: a loaded pipeline (and a loaded DiT) serves any number of generations with any settings;
a run stopped by leaving its stream's loop keeps the checkpoint the run had reached, and resuming it gives the
uninterrupted video; the one request form reaches the command line and the page whole. Checked against fresh
pipelines and models, and the uninterrupted run, to the bit."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_to_end

import HunyuanVideo_Apple as H
import hunyuan_apple as cli
import hunyuan_apple_ui as ui

SIZE = dict(height=64, width=96, frames=9)  # 3 latent frames of 4 x 6 patches: 72 video tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return H.build_tiny_checkpoint(tmp_path_factory.mktemp("stream") / "tiny")


def test_one_pipeline_generates_three_times_as_fresh_ones_do(tiny):
    """Dense attention, then Radial Attention with TeaCache, then true CFG with First-Block Cache, one after the other
    on one pipeline: each run's latents and ledger equal those of a fresh pipeline given the same request."""
    runs = [dict(steps=4, seed=1),
            dict(steps=6, seed=2, attention="radial", radial_block=16, radial_dense_steps=1, cache="teacache",
                 cache_threshold=0.3),
            dict(steps=5, seed=3, negative_prompt="blurry", cfg_scale=4.0, cache="fbcache", cache_threshold=0.2)]
    one = H.HunyuanVideoPipeline.from_pretrained(tiny)
    for kw in runs:
        kw = dict(prompt="a red fox runs through the snow", output_type="latent", **SIZE, **kw)
        mine, work = np.array(one(**kw)), one.stats["work"]
        fresh = H.HunyuanVideoPipeline.from_pretrained(tiny)
        assert np.array_equal(mine, np.array(fresh(**kw))) and work == fresh.stats["work"], kw
        assert work["attention"] == kw.get("attention", "dense") and work["cache"] == kw.get("cache")
    assert one.stats["work"]["forwards"] + one.stats["work"]["skipped"] == 2 * 5  # the last run: two branches


def test_one_loaded_dit_serves_any_steps_and_settings(tiny):
    """The DiT takes its step's state as arguments: one loaded model, called for two generations' modulation tables
    (other steps, other conditioning), a Radial Attention step and a step computed from its weights, gives at each
    call what a freshly loaded model gives."""
    rng = np.random.default_rng(0)
    args = (mx.array(rng.standard_normal((1, 3, 8, 12, 16)), mx.float32), mx.array([700.0]),
            mx.array(rng.standard_normal((1, 20, 64)), mx.float32), mx.ones((1, 20)),
            mx.array(rng.standard_normal((1, 16)), mx.float32), mx.array([6000.0]))

    def tables(model, steps, scale):
        t = mx.array(np.linspace(1000, 0, steps, endpoint=False), mx.float32)
        return model.modulation_tables(mx.stack([model.conditioning(t[i:i + 1], args[4] * scale, args[5])
                                                 for i in range(steps)]))
    radial = H.RadialAttention((3, 4, 6), 4, dense_steps=0, block=16)
    calls = [lambda m: dict(modulation=tables(m, 3, 1.0).at(2)), lambda m: dict(modulation=tables(m, 7, 0.5).at(5)),
             lambda m: dict(modulation=tables(m, 4, 1.0).at(1), radial=radial), lambda m: {}]
    load = lambda: H.load_transformer(tiny / "transformer", mx.float32, lazy_modulation=True)  # noqa: E731
    model = load()
    for call in calls:
        fresh = load()
        assert np.array_equal(np.array(model(*args, **call(model))), np.array(fresh(*args, **call(fresh))))


def stopped_run(tmp_path, stop, **flags):
    """The command line's stream for a tiny run, driven to its end or stopped by stop(events, event): the events."""
    argv = ["--model", "tiny", "--prompt", "a paper boat on a river", "--steps", "8", "--seed", "5", "--cache",
            "teacache", "--cache-threshold", "0.3", "--output", str(tmp_path / "boat.mp4"), "--checkpoint-every",
            "1000", *(f"--{k.replace('_', '-')}={v}" for k, v in flags.items())]
    events = cli.stream(cli.parse_args(argv))
    return run_to_end(events, lambda event: stop(events, event))


@pytest.mark.parametrize("how", ["leave the loop", "ctrl-c"])
def test_leaving_the_loop_keeps_the_checkpoint_and_resume_finishes_the_run(tmp_path, monkeypatch, how):
    """Stopped after step 3 of 8 (the page's Cancel leaves the loop; the command line's Ctrl-C is thrown into the
    stream), with no timed checkpoint before: the checkpoint holds step 3's latents, step cache and ledger, the
    request and the text encodings the stream gave; --resume gives the frames and ledger of the uninterrupted run."""
    import imageio.v2 as iio

    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "full").mkdir()
    full = stopped_run(tmp_path / "full", lambda events, e: False)
    assert isinstance(full[-1], cli.Outcome) and full[-1].code == 0, full[-1]

    def stop(events, event):
        if isinstance(event, H.Step) and event.step == 3:
            if how == "ctrl-c":
                seen.append(events.throw(KeyboardInterrupt))
            return True
    seen = []
    seen = stopped_run(tmp_path, stop) + seen
    steps = [e for e in seen if isinstance(e, H.Step)]
    assert [e.step for e in steps] == [1, 2, 3] and not (tmp_path / "boat.mp4").exists()
    if how == "ctrl-c":
        assert seen[-1].code == 130 and seen[-1].stopped == (3, tmp_path / "boat.partial.safetensors")
        assert "interrupted after step 3 of 8: continue with" in seen[-1].message
    tensors, meta = mx.load(str(tmp_path / "boat.partial.safetensors"), return_metadata=True)
    last, text = steps[-1], next(e.text for e in seen if isinstance(e, H.Encoded))
    assert int(meta["step"]) == 3 and json.loads(meta["work"]) == last.work
    assert mx.array_equal(tensors["latents"], last.latents).item()
    assert all(mx.array_equal(tensors[k], t).item() for k, t in zip(("text_states", "text_mask", "pooled"), text))
    arrays, numbers = last.cache
    assert json.loads(meta["cache"]) == numbers and all(mx.array_equal(tensors[f"cache.{k}"], v).item()
                                                        for k, v in arrays.items())
    plan = next(e for e in seen if isinstance(e, H.Plan))
    assert json.loads(meta["settings"]) == cli.sidecar(plan.request)

    assert cli.main(["--resume", str(tmp_path / "boat.partial.safetensors")]) == 0
    read = lambda p: np.stack(list(iio.get_reader(str(p), format="FFMPEG").iter_data()))  # noqa: E731
    assert np.array_equal(read(tmp_path / "boat.mp4"), read(tmp_path / "full" / "boat.mp4"))
    assert json.loads((tmp_path / "boat.json").read_text()) == json.loads((tmp_path / "full" / "boat.json").read_text())
    assert not (tmp_path / "boat.partial.safetensors").exists()


def test_every_setting_has_its_flag_and_its_field():
    """The one form: each setting of the table is a flag of the command line (its name in the command line's
    messages is that flag, or the words of the flags that set it) and a field of the page or one the page leaves
    out on purpose; the sidecar records every setting but how a run is made to run."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    parser_flags = {w.rstrip(",") for w in out.getvalue().split() if w.startswith("--")}
    for name in H.SETTINGS:
        assert cli.FLAGS[name] in parser_flags or name in cli.OWN_FLAGS, name
        assert name in ui.FIELDS or name in ui.OWN, name
        assert ui.PAGE_NAMES.get(name) or name == "original_prompt", name
    for name in ("height", "width", "loras", "resolution"):  # the flags that set them, in the messages' words
        assert cli.FLAGS[name] in parser_flags or name in ("height", "width"), name
    assert set(cli.sidecar(H.check_request({"prompt": "x"}))) == set(H.SETTINGS) - set(H.UNSAVED) | {"version"}

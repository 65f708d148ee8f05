"""The generations the several-processes tests make, in one process and under mlx.launch (this file is the script
it starts): `python distributed_scenarios.py FOLDER I2V_FOLDER IMAGE OUT [NAME ...]` runs the named scenarios (all by
default, and the VAE's decode) on the tiny checkpoints in float32 (HunyuanVideo 1.5's: the folder t2v15 beside
FOLDER); rank 0 writes each one's final latents and work ledger to OUT/NAME.npz.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import HunyuanVideo15_Apple as H15  # noqa: E402
import HunyuanVideo_Apple as H  # noqa: E402

# 4 x 7 x 11 = 308 video tokens: over 3 ranks 103, 103 and 102 (an uneven split)
BASE = dict(prompt="a cat walks on the grass", height=112, width=176, frames=13, steps=4, seed=3)
SCENARIOS = {  # name: (checkpoint, loading settings, generation settings)
    "t2v": ("t2v", {}, {}),
    # First-Block Cache at a threshold between the first block's changes of this run, which skips some steps
    "fbcache": ("t2v", {}, dict(steps=8, cache="fbcache", cache_threshold=0.28)),
    "radial": ("t2v", {}, dict(attention="radial", radial_block=16, radial_dense_steps=1)),
    "cfg": ("t2v", {}, dict(negative_prompt="blurry", cfg_scale=4.0)),
    # true CFG with a step cache: each branch's own cache, which skips its own steps (on 2 ranks, each rank one
    # branch; on 4 over the ring backend, both branches over all four ranks)
    "cfg_fbcache": ("t2v", {}, dict(negative_prompt="blurry", cfg_scale=4.0, steps=8, cache="fbcache",
                                    cache_threshold=0.28)),
    "i2v": ("i2v", {}, {}),
    "int8": ("t2v", dict(quantization="int8"), {}),
    # HunyuanVideo 1.5 (its 16x VAE: the same 308 tokens), true CFG with the reference's empty negative prompt
    "t2v15": ("t2v15", {}, dict(negative_prompt="", cfg_scale=4.0, shift=5.0)),
}


def generate(name, folders, image):
    """A scenario's final latents (float32 numpy) and the pipeline's work ledger, with under "changes" the relative
    changes a step cache measured; for "decode", the VAE's tiled decode (27 tiles of 48 x 48 pixels and 8 frames) of
    random latents, and no ledger."""
    if name == "decode":
        vae = H.load_vae(Path(folders["t2v"]) / "vae", mx.float32)
        z = mx.random.normal((1, 3, 10, 10, 16), key=mx.random.key(0))
        return np.array(vae.decode(z, (8, 48, 48), (4, 32, 32), ranks=H.world())), {}
    which, loading, settings = SCENARIOS[name]
    pipeline = H15.HunyuanVideo15Pipeline if which == "t2v15" else H.HunyuanVideoPipeline
    pipe = pipeline.from_pretrained(str(folders[which]), dtype=mx.float32, **loading)
    extra = dict(image=str(image)) if which == "i2v" else {}
    changes, measure = [], H._rel_l1  # the changes a step cache decides from, as it measures them
    H._rel_l1 = lambda a, b, split=None: changes.append(measure(a, b, split)) or changes[-1]
    try:
        latents = pipe(**{**BASE, **extra, **settings}, output_type="latent")
    finally:
        H._rel_l1 = measure
    return np.array(latents), {**pipe.stats["work"], "changes": changes}


if __name__ == "__main__":
    folder, i2v, image, out = sys.argv[1:5]
    names = sys.argv[5:] or [*SCENARIOS, "decode"]
    rank = mx.distributed.init().rank()
    for name in names:
        latents, work = generate(name, {"t2v": folder, "i2v": i2v, "t2v15": Path(folder).parent / "t2v15"}, image)
        if rank == 0:
            np.savez(Path(out) / f"{name}.npz", latents=latents, work=json.dumps(work))

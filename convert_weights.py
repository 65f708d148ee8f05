"""Convert HunyuanVideo weights to an MLX checkpoint, quantized or not, that loads without torch and
without quantizing again.

    python convert_weights.py --model SRC --quantization int8 --output DIR
    python convert_weights.py --model SRC --transformer mp_rank_00_model_states_fp8.pt --output DIR
    python convert_weights.py --model hunyuan_video_t2v_720p_bf16.safetensors --output DIR
    python convert_weights.py --model SRC --lora style.safetensors:0.8 --quantization int8 --output DIR

SRC is a complete HunyuanVideo or HunyuanVideo 1.5 in the diffusers layout (a folder, or a hub id such as
hunyuanvideo-community/HunyuanVideo, hunyuanvideo-community/HunyuanVideo-I2V or
hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v): DIR gets the same layout, with transformer/ and
text_encoder/ (the LLM: LLaVA-Llama, or 1.5's Qwen2.5-VL) in MLX's format (quantized if asked) and the other parts
copied, so from_pretrained(DIR) and load_transformer(DIR/transformer) read it directly. --transformer takes the DiT
from another file instead: Tencent's .pt (its fp8 variant too, with the _map.pt beside it) or a ComfyUI
.safetensors (fp8 ones too). When SRC is a transformer alone (a file, or a transformer/ folder), DIR gets that
transformer alone; its tensors' names tell which of the two models it is. --lora merges LoRAs into
the DiT's weights before quantizing them. DIR must not exist: it is built under a temporary name and renamed
when complete.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx

import HunyuanVideo15_Apple as H15
import HunyuanVideo_Apple as H

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
# 13B's CLIP and I2V image processor; 1.5's byT5, SigLIP, its image processor and its guider (true CFG's scale)
COPIED = ("text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler", "image_processor", "image_encoder",
          "feature_extractor", "guider", "model_index.json")


def module_of(src):
    """The module of the model a transformer alone is for: HunyuanVideo 1.5's where its config's class or its
    tensors' names say so (read from the files' headers), else the 13B's."""
    files, config = H._component_files(src, "pass a checkpoint folder or hub id, or a transformer file or folder")
    names = [k for f in files if f.suffix == ".safetensors" for k in H._safetensors_header(f)[0]]
    fifteen = str(config.get("_class_name", "")).startswith("HunyuanVideo15") or \
        H.dit_family(names) == H15.HunyuanVideo15Transformer.family
    return H15 if fifteen else H


def convert_transformer(src, out, args, module, image_condition_type=None):
    if args.image_condition_type and module is H15:
        raise H.HunyuanVideoError("--image-condition-type is for a Tencent HunyuanVideo-I2V (13B) DiT file; "
                                  "HunyuanVideo 1.5's DiT takes its image as its own config says: leave it out.")
    sizes = {"image_condition_type": args.image_condition_type or image_condition_type}
    model = module.load_transformer(src, DTYPES.get(args.dtype, H.DEFAULT_DTYPES["transformer"]),
                                    quantization=args.quantization, quantize_modulation=args.quantize_modulation,
                                    loras=[H.parse_lora(text) for text in args.lora or ()],
                                    lora_ignore_unmatched=args.lora_ignore_unmatched,
                                    **{k: v for k, v in sizes.items() if v})
    if any(isinstance(m, H.LoRAQuantizedLinear) for _, m in model.named_modules()):
        raise H.HunyuanVideoError(f"{src} is already quantized, so a LoRA would stay a branch beside it and not be "
                                  f"baked in: convert the original (bf16) checkpoint with --lora, or pass the LoRA to "
                                  f"hunyuan_apple.py --lora at run time.")
    H.save_transformer(model, out)


def convert(args, out):
    src = Path(args.model).expanduser()
    if src.is_file() or (src / "config.json").exists() or (src.is_dir() and not (src / "transformer").exists()
                                                            and any(src.glob("*.pt"))):
        return convert_transformer(src, out, args, module_of(src))  # a transformer alone
    kind = H._pipeline_class(args.model)  # 13B's pipeline or 1.5's
    module = H15 if kind is H15.HunyuanVideo15Pipeline else H
    folder = kind.from_pretrained(args.model).folder  # checks, or downloads, the whole
    rest = f", the rest {args.dtype or '{}'}" if args.quantization else ""
    print(f"transformer ({args.quantization or args.dtype or 'bf16'}{rest.format('bf16')})", file=sys.stderr)
    config = json.loads((folder / "transformer" / "config.json").read_text())  # an I2V one says how it takes images
    convert_transformer(Path(args.transformer).expanduser() if args.transformer else folder / "transformer",
                        out / "transformer", args, module, config.get("image_condition_type"))
    print(f"text_encoder ({args.quantization or args.dtype or 'fp16'}{rest.format('fp16')})", file=sys.stderr)
    llm = module.load_text_encoder(folder / "text_encoder",
                                   DTYPES.get(args.dtype, H.DEFAULT_DTYPES["text_encoders"]), args.quantization)
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    H.save_text_encoder(llm, out / "text_encoder", config)
    del llm
    for name in COPIED:
        if (folder / name).is_dir():
            shutil.copytree(folder / name, out / name)
        elif (folder / name).exists():
            shutil.copy2(folder / name, out / name)


def parser():
    """The command's flags."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a diffusers-layout folder or hub id, or a transformer alone")
    ap.add_argument("--transformer", help="take the DiT from this file or folder (Tencent .pt, ComfyUI .safetensors)")
    ap.add_argument("--output", required=True, help="the folder to create")
    ap.add_argument("--quantization", choices=list(H.QUANTIZATIONS), help="quantize the DiT's blocks and the LLM")
    ap.add_argument("--quantize-modulation", action="store_true", help="also quantize the DiT's adaLN modulation")
    ap.add_argument("--dtype", choices=list(DTYPES), help="for what is not quantized (default: each part's own, "
                    "the DiT bfloat16, the text encoder float16, as the pipeline runs them)")
    ap.add_argument("--image-condition-type", choices=["token_replace", "latent_concat"], help="for a Tencent "
                    "HunyuanVideo-I2V DiT file, which does not say how it takes the image (its diffusers folder does)")
    ap.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="bake a LoRA into the DiT (merged "
                    "before any quantization; repeat for several)")
    ap.add_argument("--lora-ignore-unmatched", action="store_true", help="bake a LoRA even if some of its keys "
                    "match no layer (listed in a warning)")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    out = Path(args.output).expanduser().absolute()
    tmp = out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    try:
        if not args.output.strip():
            raise H.HunyuanVideoError("--output is empty: name the folder to create.")
        if out.exists():
            raise H.HunyuanVideoError(f"{out} already exists: choose a new --output folder.")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            convert(args, tmp)
            tmp.replace(out)
        except (OSError, RuntimeError) as e:  # MLX: RuntimeError "[write] Unable to write ..." on a full disk
            if isinstance(e, RuntimeError) and "write" not in str(e).lower():
                raise
            why = getattr(e, "strerror", None) or (str(e).splitlines() or [""])[0][:120]
            raise H.HunyuanVideoError(f"cannot write {out} ({why}): choose a writable --output folder with room for "
                                      f"the model.") from None
    except H.HunyuanVideoError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        flags = {a.dest: a.option_strings[-1] for a in ap._actions if a.option_strings}  # settings as its flags
        print(f"error: {e.sentence({**flags, 'loras': '--lora'})}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.quantization or args.dtype or 'each part in its own dtype'}) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

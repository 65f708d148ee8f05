"""The prompt rewrite (rewrite_prompt, --rewrite) on a tiny random instruct model built here in mlx-lm's own
layout (a Llama with the real Llama-3 vocabulary and its chat template), against mlx-lm called directly."""

import json
import os
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import HunyuanVideo_Apple as H
import hunyuan_apple as cli
from conftest import make_llama_tokenizer

import mlx_lm  # the ".[rewrite]" extra; requirements-dev.txt installs it
from mlx_lm.sample_utils import make_sampler

PROMPT = "a cat on a sofa"
# Llama 3's chat template (its tokenizer_config.json), without the date line of 3.1
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                 "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONFIG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128256, rope_theta=500000.0,
              tie_word_embeddings=True)


def instruct_models(root):
    """Tiny random Llamas in mlx-lm's layout (config.json, model.safetensors, the tokenizer with its chat
    template), one set of weights under three configs: "runs_on" ends only at the vocabulary's end-of-text
    tokens, which it never writes; "finishes" has the 13th token it writes greedily for PROMPT's normal rewrite
    as an end-of-text token too, so that it finishes there; "empty" the first, so that it writes nothing."""
    import shutil

    from mlx_lm.generate import generate_step
    from mlx_lm.models.llama import Model, ModelArgs

    base = root / "runs_on"
    base.mkdir(parents=True)
    tok = make_llama_tokenizer(base)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    mx.random.seed(0)
    params = {k: mx.random.normal(v.shape) * (1.0 if "norm" in k else 0.3) + (1.0 if "norm" in k else 0.0)
              for k, v in tree_flatten(Model(ModelArgs(**CONFIG)).parameters())}
    mx.save_safetensors(str(base / "model.safetensors"), {k: v.astype(mx.float16) for k, v in params.items()})
    eos = [tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")]
    (base / "config.json").write_text(json.dumps({**CONFIG, "eos_token_id": eos}))
    model, wrapper = mlx_lm.load(str(base))
    text = wrapper.apply_chat_template(H.rewrite_messages(PROMPT, "normal"), add_generation_prompt=True,
                                       tokenize=False)
    written = [int(t) for t, _ in generate_step(mx.array(wrapper.encode(text, add_special_tokens=False)), model,
                                                max_tokens=13, sampler=make_sampler(0.0))]
    assert written[12] not in written[:12] and not set(written) & set(eos)  # it stops there, not earlier
    folders = {"runs_on": base}
    for name, stop in (("finishes", written[12]), ("empty", written[0])):
        folders[name] = shutil.copytree(base, root / name)
        (folders[name] / "config.json").write_text(json.dumps({**CONFIG, "eos_token_id": eos + [stop]}))
    return folders


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return instruct_models(tmp_path_factory.mktemp("instruct"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def loaded():
    """Each tiny model loaded once by mlx-lm, for the references."""
    return {}


def reference(loaded, folder, messages, temperature=0.0, seed=None, max_tokens=H.REWRITE_MAX_TOKENS):
    """mlx-lm's own generate, given the messages through the tokenizer's chat template."""
    model, tok = loaded.get(folder) or loaded.setdefault(folder, mlx_lm.load(str(folder)))
    if seed is not None:
        mx.random.seed(seed)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return mlx_lm.generate(model, tok, text, max_tokens=max_tokens, sampler=make_sampler(temp=temperature))


def test_the_messages_sent_are_our_instructions_and_the_prompt(models, cache, monkeypatch):
    from transformers import AutoTokenizer

    sent = []
    real = mlx_lm.stream_generate
    monkeypatch.setattr(mlx_lm, "stream_generate", lambda model, tok, prompt, **kw: sent.append(prompt) or
                        real(model, tok, prompt, **kw))
    with pytest.warns(UserWarning, match="longer than 4 tokens"):  # the messages are what is looked at here
        H.rewrite_prompt("一只猫在沙发上", "master", model=str(models["finishes"]), cache=False, max_tokens=4)
    tok = AutoTokenizer.from_pretrained(models["finishes"])  # transformers' own rendering of the chat
    system = H.rewrite_messages("", "master")[0]["content"]
    assert sent == [tok.apply_chat_template([{"role": "system", "content": system},
                                             {"role": "user", "content": "一只猫在沙发上"}],
                                            add_generation_prompt=True, tokenize=False)]
    # the two modes' rules, in our words: keep every detail, write English, the mode's own
    for mode, words in (("normal", "one or two sentences"), ("master", "cinematographer")):
        rules = H.rewrite_messages("x", mode)[0]["content"]
        assert "Keep everything the user asked for" in rules and "write in English" in rules and words in rules


def test_the_rewrite_is_what_mlx_lm_writes(models, cache, loaded):
    ours, hit = H.rewrite_prompt(PROMPT, "normal", model=str(models["finishes"]), cache=False)
    ref = reference(loaded, models["finishes"], H.rewrite_messages(PROMPT, "normal"))
    assert ours == ref.strip() and ours and ours != PROMPT and not hit
    # sampling: a temperature and a seed, the same as mlx-lm's sampler seeded alike (cut at 16 tokens)
    master = H.rewrite_messages(PROMPT, "master")
    reference(loaded, models["runs_on"], master, max_tokens=1)  # loaded
    model, tok = loaded[models["runs_on"]]
    text, finished = H.generate_rewrite(model, tok, master, 0.9, 5, max_tokens=16)
    assert text == reference(loaded, models["runs_on"], master, 0.9, 5, 16) and not finished
    assert text != reference(loaded, models["runs_on"], master, 0.9, 6, 16)


def test_a_repeated_rewrite_comes_from_the_cache(models, cache, monkeypatch):
    first = H.rewrite_prompt(PROMPT, "normal", model=str(models["finishes"]))
    monkeypatch.setattr(mlx_lm, "load", lambda *a, **k: pytest.fail("the rewrite model was loaded"))
    assert H.rewrite_prompt(PROMPT, "normal", model=str(models["finishes"])) == (first[0], True)
    assert json.loads(next((cache / "rewrites").glob("*.json")).read_text())["rewritten"] == first[0]
    for change in (dict(mode="master"), dict(temperature=0.5), dict(seed=1)):  # another key: the model runs
        with pytest.raises(pytest.fail.Exception, match="was loaded"):
            H.rewrite_prompt(PROMPT, **{"mode": "normal", "model": str(models["finishes"]), **change})


def test_a_retrained_model_of_the_same_size_rewrites_again(models, cache, tmp_path, monkeypatch):
    """The cache's key holds the model's files by name, size AND time: new weights of the same size (here the same
    bytes, written later) miss it, and the model runs."""
    import shutil

    model = shutil.copytree(models["finishes"], tmp_path / "model")
    H.rewrite_prompt(PROMPT, "normal", model=str(model))
    monkeypatch.setattr(mlx_lm, "load", lambda *a, **k: pytest.fail("the rewrite model was loaded"))
    assert H.rewrite_prompt(PROMPT, "normal", model=str(model))[1]  # the same files: kept
    weights = model / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # retrained: same size, a later time
    with pytest.raises(pytest.fail.Exception, match="was loaded"):
        H.rewrite_prompt(PROMPT, "normal", model=str(model))


def test_a_kept_rewrite_needs_neither_the_model_nor_mlx_lm(models, cache, tmp_path, monkeypatch, capsys):
    """A rewrite kept for a hub model that is not downloaded, offline, with mlx-lm not installed: the command line
    plans and runs from the kept rewrite (no rewrite phase in the plan); a prompt not kept asks for mlx-lm."""
    model = "someone/not-downloaded-3B"
    path = H._rewrite_file(PROMPT, "normal", model, 0.0, None, H.REWRITE_MAX_TOKENS)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"rewritten": "a grey cat naps on a red sofa"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    small = ["--model", "tiny", "--resolution", "32", "48", "--frames", "5", "--steps", "1"]
    args = ["--prompt", PROMPT, "--rewrite", "normal", "--rewrite-model", model, *small]
    assert cli.main([*args, "--output", str(tmp_path / "a.mp4")]) == 0
    err = capsys.readouterr().err
    assert "kept from an earlier rewrite): a grey cat naps on a red sofa" in err
    assert "memory plan: text encoders" in err and "rewrite" not in err.split("memory plan:")[1].split("\n")[0]
    assert cli.main(["--prompt", "a dog", *args[2:], "--output", str(tmp_path / "b.mp4")]) == 2
    assert 'pip install "hunyuan-apple[rewrite]"' in capsys.readouterr().err


@pytest.mark.parametrize("make, words", [
    (lambda d: H.build_tiny_checkpoint(d) / "vae", "its config.json lacks hidden_size, num_attention_heads, "
                                                   "num_hidden_layers, intermediate_size, vocab_size: it is not a "
                                                   "language model"),
    (lambda d: (d / "x.bin").write_bytes(os.urandom(64)) and d, "its config.json could not be read"),
    (lambda d: (d / "config.json").write_text(json.dumps(CONFIG)) and (d / "model.safetensors").write_bytes(
        os.urandom(64)) and d, "a weights file is cut short or is not safetensors"),
])
def test_a_folder_that_is_not_a_language_model_is_named(cache, tmp_path, make, words):
    """A VAE's folder, random files, cut weights as --rewrite-model: one sentence naming the rewrite model and what
    is wrong with it (not the tiny demo's advice)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    folder = make(folder)
    code = cli.main(["--model", "tiny", "--prompt", PROMPT, "--rewrite", "normal", "--rewrite-model", str(folder)])
    assert code == 2
    with pytest.raises(H.HunyuanVideoError, match=f"^the rewrite model {folder} cannot be used: {words}"):
        H.estimate_rewrite(str(folder), PROMPT)


def test_an_empty_or_unfinished_rewrite_keeps_the_prompt(models, cache):
    for model, words in ((models["empty"], "was empty"), (models["runs_on"], "longer than 8 tokens")):
        with pytest.warns(UserWarning, match=words):
            assert H.rewrite_prompt(PROMPT, "normal", model=str(model), max_tokens=8) == (PROMPT, False)
    assert not (cache / "rewrites").exists()  # nothing kept


def test_bad_rewrite_settings_are_one_sentence(models, cache, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(H.HunyuanVideoError, match=r"^the rewrite model .* could not be loaded .*: give a hub id"):
        H.rewrite_prompt(PROMPT, model=str(broken))
    with pytest.raises(H.HunyuanVideoError, match="rewrite 'poetic': use one of normal, master"):
        H.rewrite_prompt(PROMPT, "poetic", model=str(models["finishes"]))
    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    with pytest.raises(H.HunyuanVideoError, match=r'pip install "hunyuan-apple\[rewrite\]"'):
        H.rewrite_prompt(PROMPT, model=str(models["finishes"]), cache=False)
    for argv, words in ((["--rewrite-model", "x"], "give --rewrite normal or master too"),
                        (["--rewrite", "normal", "--rewrite-temperature", "-1"], "use 0")):
        assert cli.main(["--model", "tiny", "--prompt", PROMPT, *argv]) == 2


def test_the_command_line_keeps_both_prompts_and_repeats_the_rewritten_one(models, cache, loaded, tmp_path,
                                                                         monkeypatch, capsys):
    small = ["--model", "tiny", "--resolution", "32", "48", "--frames", "5", "--steps", "2", "--seed", "1"]
    assert cli.main(["--prompt", PROMPT, "--rewrite", "normal", "--rewrite-model", str(models["finishes"]), *small,
                     "--output", str(tmp_path / "a.mp4")]) == 0
    rewritten = reference(loaded, models["finishes"], H.rewrite_messages(PROMPT, "normal")).strip()
    err = capsys.readouterr().err
    assert f"the prompt, rewritten (normal, {models['finishes']}): {rewritten}" in err
    estimate = H.estimate_rewrite(str(models["finishes"]), PROMPT)
    assert f"memory plan: rewrite {H.gib(estimate)}, text encoders" in err  # its own phase in the plan, first
    settings = json.loads((tmp_path / "a.json").read_text())
    assert (settings["prompt"], settings["original_prompt"], settings["rewrite"]) == (rewritten, PROMPT, "normal")
    assert cli.read_metadata(tmp_path / "a.mp4")["original_prompt"] == PROMPT  # in the mp4's metadata too
    monkeypatch.setattr(mlx_lm, "load", lambda *a, **k: pytest.fail("the rewrite model was loaded"))
    assert cli.main(["--from-metadata", str(tmp_path / "a.json"), "--no-prompt-cache",
                     "--output", str(tmp_path / "b.mp4")]) == 0
    again = json.loads((tmp_path / "b.json").read_text())
    assert (again["prompt"], again["original_prompt"]) == (rewritten, PROMPT)


def test_the_memory_plan_counts_the_rewrite(models, cache, tmp_path):
    """The plan's rewrite phase against the peak measured while the rewrite runs, above what was held before.
    Measured: 1.20x (17.7 MB measured, 21.1 MB planned; the plan takes a token every 2 bytes of the
    instructions and prompt, 2.3x the tokens this vocabulary makes of them). The command line prints it first in
    its plan (the test above)."""
    pipe = H.HunyuanVideoPipeline(tmp_path)  # the rewrite phase needs none of the checkpoint
    held = mx.get_active_memory()
    assert pipe.rewrite(PROMPT, "normal", str(models["finishes"])) != PROMPT and "rewrite" in pipe.stats
    measured = pipe.stats["rewrite"][1] * H.GB - held
    estimate = H.estimate_rewrite(str(models["finishes"]), PROMPT)
    assert measured <= estimate <= 1.35 * measured, (estimate, measured)

"""The README and docs/ say what the code does: the flag table is the parser's, every command shown parses with
the script it runs, the README's Python example runs as written, the names the docs' Python uses exist and take
the keywords shown, and the README's memory table is the memory plan's."""

import ast
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import bench_hunyuan_apple as bench
import convert_weights as convert
import HunyuanVideo15_Apple as H15
import HunyuanVideo_Apple as H
import hunyuan_apple as cli
import hunyuan_apple_ui as ui

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page, language):
    """The fenced code blocks of one language in a Markdown page."""
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.S | re.M)


def test_readme_is_short_and_links_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 12_000, "the README is a first screen: move detail into docs/"
    links = re.findall(r"\]\(([^)#:]+)\)", readme)
    assert links and all((ROOT / link).is_file() for link in links), links


def test_flag_table_is_the_parsers():
    page = (ROOT / "docs" / "command-line.md").read_text()
    table = re.search(r"<!-- flags: hunyuan_apple.flag_reference\(\) -->\n(.*?)<!-- end of flags -->", page, re.S)
    assert table and table.group(1) == cli.flag_reference()
    assert all(f"`{flag}" in table.group(1) for flag in cli.FLAGS.values() if flag.startswith("--"))


# Each script shown, by its file name and its installed command: its parser
PARSERS = {"hunyuan_apple.py": cli.parser, "bench_hunyuan_apple.py": bench.parser, "convert_weights.py": convert.parser,
           "hunyuan_apple_ui.py": ui.parser}
PARSERS.update({"hunyuan-apple": cli.parser, "hunyuan-apple-bench": bench.parser,
                "hunyuan-apple-convert": convert.parser, "hunyuan-apple-ui": ui.parser})


def shown_commands():
    """(page, words, whole) for every command of ours the pages show: whole commands in bash blocks (continued
    lines joined, comments dropped, `&&` chains split) and inline as `python SCRIPT ...`; inline mentions such as
    `hunyuan-apple-ui --rewrite-model` (whole=False) name flags without their values."""
    found = []
    for page in PAGES:
        text = page.read_text()
        inline = re.findall(r"`((?:python3? |\.venv/bin/)?(?:hunyuan[-_]apple|bench_hunyuan|convert_weights)[^`]*)`",
                            text.replace("\n", " "))
        lines = [(line, True) for b in blocks(page, "bash") for line in b.replace("\\\n", " ").splitlines()]
        lines += [(code, code.startswith(("python", ".venv"))) for code in inline]
        for line, whole in lines:
            chain = shlex.split(line, comments=True)
            while chain:
                words, chain = (chain[:chain.index("&&")], chain[chain.index("&&") + 1:]) if "&&" in chain \
                    else (chain, [])
                while words and (words[0].endswith(("python", "python3")) or "=" in words[0]):
                    words = words[1:]  # the interpreter, and environment variables set before the command
                if words and Path(words[0]).name == "mlx.launch":  # its own flags, then our script's command
                    words = words[next((i for i, w in enumerate(words) if Path(w).name in PARSERS), len(words)):]
                if words and Path(words[0]).name in PARSERS:
                    found.append((page.name, words, whole))
    return found


def test_every_command_shown_parses():
    """The parsers refuse an unknown flag or a bad value by exiting, which fails the test naming the command."""
    commands = shown_commands()
    scripts = {Path(words[0]).name for _, words, whole in commands if whole and len(words) > 1}
    # each script is shown whole at least once (a change in what is found fails here, not silently)
    assert {"hunyuan_apple.py", "hunyuan-apple", "convert_weights.py", "bench_hunyuan_apple.py"} <= scripts, scripts
    for page, words, whole in commands:
        ap = PARSERS[Path(words[0]).name]()
        if whole:
            try:
                ap.parse_args(words[1:])
            except SystemExit:
                pytest.fail(f"{page}: {shlex.join(words)} does not parse")
        else:
            flags = [w for w in words[1:] if w.startswith("--")]
            assert all(f in ap._option_string_actions for f in flags), f"{page}: {shlex.join(words)}"


def test_the_readmes_python_runs(tmp_path):
    """As written, on the offline demo (built in a fresh cache folder), in a fresh interpreter: its comment's
    shape is what it gives, and the stream's loop sees every step."""
    [code] = blocks(ROOT / "README.md", "python")
    shape = re.search(r"# uint8 \((\d+), (\d+), (\d+), 3\)", code).groups()
    check = f"\nassert frames.dtype.name == 'uint8' and frames.shape == ({', '.join(shape)}, 3), frames.shape\n"
    (tmp_path / "example.py").write_text(code + check)
    env = {**os.environ, "HUNYUAN_APPLE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    steps = int(re.search(r"steps=(\d+)", code).group(1))
    assert r.stdout.split("\n")[:-1] == [f"step {i} of {steps}" for i in range(1, steps + 1)]


def called(node):
    """The function a call in the docs' Python means, by the names the docs use (H, pipe, model, vae, event)."""
    f = node.func
    if isinstance(f, ast.Name):
        return {"pipe": H.HunyuanVideoPipeline.__call__, "model": H.HunyuanVideoTransformer.__call__}.get(f.id)
    if isinstance(f, ast.Attribute):
        owner = ast.unparse(f.value)
        classes = {"pipe": H.HunyuanVideoPipeline, "model": H.HunyuanVideoTransformer, "vae": H.HunyuanVideoVAE,
                   "H.HunyuanVideoPipeline": H.HunyuanVideoPipeline}
        if owner in classes:
            return getattr(classes[owner], f.attr)
        if owner == "H":
            return getattr(H, f.attr)
        if owner == "H15":
            return getattr(H15, f.attr)
        if owner == "H15.HunyuanVideo15Pipeline":
            return getattr(H15.HunyuanVideo15Pipeline, f.attr)
    return None


def test_the_docs_python_names_what_exists():
    """Every H.name exists, and every call of ours takes the arguments shown (positional count and keywords;
    keywords that go to **settings or **loading are settings of H.SETTINGS)."""
    checked = 0
    for page in PAGES:
        for code in blocks(page, "python"):
            for node in ast.walk(ast.parse(code)):
                if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "H":
                    assert hasattr(H, node.attr), f"{page.name}: H.{node.attr}"
                if not isinstance(node, ast.Call) or (fn := called(node)) is None:
                    continue
                sig = inspect.signature(fn)
                method = next(iter(sig.parameters)) == "self"
                words = {k.arg: None for k in node.keywords if k.arg}
                try:
                    bound = sig.bind(*[None] * (len(node.args) + method), **words)
                except TypeError as e:
                    pytest.fail(f"{page.name}: {ast.unparse(node)}: {e}")
                for name, value in bound.arguments.items():
                    if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                        assert set(value) <= set(H.SETTINGS), f"{page.name}: {ast.unparse(node)}"
                checked += 1
    assert checked >= 15, checked  # the pages' calls were found


def test_readmes_memory_table_is_the_plans(tmp_path):
    """Each cell is the memory plan's peak (GPU, 50 steps) on header-only files of the real model, in GiB to 0.1;
    the HunyuanVideo 1.5 rows 1.5's plan with true CFG's branches one after the other."""
    import HunyuanVideo15_Apple as H15

    readme = (ROOT / "README.md").read_text()
    head, _, *rows = re.search(r"^\| size \| bf16 .*?\n\n", readme, re.S | re.M).group(0).strip().split("\n")
    columns = [c.strip() for c in head.strip("|").split("|")][1:]
    folder, folder15 = bench.header_only_checkpoint(tmp_path / "13b"), bench.header_only_checkpoint15(tmp_path / "15")
    settings = {"bf16": {}, "int8": dict(quantization="int8"), "int4": dict(quantization="int4"),
                "int8, `--low-memory`": dict(quantization="int8", low_memory=True)}
    assert columns == list(settings) and len(rows) == 5
    for row in rows:
        size, *cells = [c.strip() for c in row.strip("|").split("|")]
        v15 = size.startswith("HunyuanVideo 1.5, ")
        h, w, f = map(int, re.search(r"(\d+)x(\d+)x(\d+)", size).groups())
        for column, cell in zip(columns, cells):
            plan = H15.estimate_memory(folder15, h, w, f, backend="gpu", cfg="sequential", **settings[column]) if v15 \
                else H.estimate_memory(folder, h, w, f, backend="gpu", **settings[column])
            assert cell == f"{max(plan.values()) / H.GB:.1f}", (size, column)

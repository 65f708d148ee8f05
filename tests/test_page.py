"""The web page (hunyuan_apple_ui.py) as a person uses it: a real server on 127.0.0.1 with the tiny models,
called through gradio_client and clicked through in a real headless Chromium (Debian's chromium and its
chromedriver, which .ci/run installs). Each video it makes is compared with the command line's for the same
settings and seed."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import HunyuanVideo_Apple as H
import hunyuan_apple as cli
import hunyuan_apple_ui as ui

ROOT = Path(__file__).resolve().parents[1]
MEMORY_GB = "8"  # what the page's server may use: 720p x 129 frames of the tiny model plans 53 GiB, 96 x 160 0.4 GiB
# every field of the page's form, as gradio_client names them: a small, quick text-to-video request
FORM = dict(prompt="a red fox runs through snow", rewrite="none", negative_prompt="", model="tiny", preset="none",
            size="custom", aspect_ratio="16:9", height=32, width=48, frames="5", steps="4", guidance="", cfg_scale="",
            shift="", random_seed=False, seed=3, quantization="none", cache="none", cache_threshold="", loras=[],
            lora_files=None, lora_scales="", image=None, video=None, strength=0.8, low_memory=False, force=False)
# the page's outputs, in the order gradio_client returns them (the resume state stays in the page)
OUTPUTS = ("progress", "preview", "video", "settings", "ledger", "message", "log", "gallery")


def read_frames(path):
    import imageio.v2 as iio
    with iio.get_reader(str(path), format="FFMPEG") as r:
        return np.stack([f for f in r.iter_data()])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """hunyuan-apple-ui started as a user starts it, in a folder of its own, its output in a log file."""

    def __init__(self, root):
        self.root, self.models, self.outputs = root, root / "models", root / "outputs"
        self.models.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.env = {**os.environ, "HUNYUAN_APPLE_CACHE": str(root / "cache"), "HUNYUAN_APPLE_MEMORY_GB": MEMORY_GB,
                    "GRADIO_TEMP_DIR": str(root / "uploads")}
        self.log = root / "server.log"
        from test_rewrite import instruct_models  # a tiny instruct model for the page's prompt rewrite
        self.rewriter = instruct_models(root / "instruct")["finishes"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "hunyuan_apple_ui.py"), "--models", "models",
                                          "--outputs", "outputs", "--model", "tiny", "--port", str(self.port),
                                          "--rewrite-model", str(self.rewriter)],
                                         cwd=root, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=5).read()
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.5)

    def command_line(self, monkeypatch, tmp_path, *flags):
        """The command line's video for the same settings, on the server's tiny checkpoint: (frames, settings)."""
        monkeypatch.setenv("HUNYUAN_APPLE_CACHE", self.env["HUNYUAN_APPLE_CACHE"])
        out = tmp_path / "cli.mp4"
        assert cli.main([*flags, "--output", str(out)]) == 0
        return read_frames(out), json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("page"))
    yield s
    s.proc.terminate()
    s.proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through its own chromedriver (Debian's packages; nothing downloaded). Missing, the tests
    that drive it fail, unless HUNYUAN_APPLE_NO_BROWSER is set (.ci/run sets it where it cannot install them)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        why = ("chromium and chromedriver are not on the PATH: install them (Debian: apt-get install chromium "
               "chromium-driver; a Mac: brew install --cask chromium chromedriver)")
        if os.environ.get("HUNYUAN_APPLE_NO_BROWSER"):
            pytest.skip(why)
        pytest.fail(why + ", or set HUNYUAN_APPLE_NO_BROWSER=1 to skip these tests")

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


class Person:
    """What a person does on the page: type, choose, tick, upload, click, and read what it says."""

    def __init__(self, driver, url):
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.wait = driver, WebDriverWait(driver, 60)
        driver.get(url)
        self.wait.until(lambda d: self.text("plan"))  # the page has loaded and planned its first settings

    def find(self, css):
        from selenium.webdriver.common.by import By
        return self.d.find_element(By.CSS_SELECTOR, css)

    def text(self, elem_id):
        return self.find(f"#{elem_id}").text

    def type(self, elem_id, text):
        from selenium.webdriver.common.keys import Keys
        box = self.find(f"#{elem_id} input, #{elem_id} textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(str(text))

    def choose(self, elem_id, value):
        self.find(f"#{elem_id} input").click()
        self.wait.until(lambda d: self.find(f"#{elem_id} li[aria-label='{value}']")).click()

    def open(self, elem_id):
        """Opens an accordion (if closed)."""
        header = self.find(f"#{elem_id} .label-wrap")
        if "open" not in header.get_attribute("class").split():
            header.click()

    def upload(self, elem_id, path):
        from selenium.webdriver.common.by import By
        self.open("more")
        self.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} input[type=file]"))[0].send_keys(
            str(path))
        self.wait.until(lambda d: Path(path).suffix in self.text(elem_id))  # the uploaded file listed

    def click(self, elem_id):
        self.find(f"#{elem_id}").click()

    def says(self, elem_id, words):
        """Waits until the element's text holds words, and returns it."""
        self.wait.until(lambda d: words in self.text(elem_id))
        return self.text(elem_id)


def small(person, steps=4, seed=3):
    """The form set to FORM's size, steps and seed, as a person would set them."""
    person.choose("size", "custom")
    person.type("height", 32)
    person.type("width", 48)
    person.type("frames", 5)
    person.type("steps", steps)
    person.find("#random_seed input").click()
    person.type("seed", seed)


SMALL_FLAGS = ["--model", "tiny", "--resolution", "32", "48", "--frames", "5"]


# ------------------------------------------------------------------------------------------------------------
# Through gradio_client: the page's API

def test_a_generation_from_the_page_is_the_command_lines(server, monkeypatch, tmp_path):
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    form = {**FORM, "prompt": "a heron stands in a misty pond"}
    first = dict(zip(OUTPUTS, client.predict(**form, api_name="/generate")))
    assert first["message"].startswith("Done: ") and first["message"].endswith("_3.mp4, seed 3."), first["message"]
    frames, settings = server.command_line(monkeypatch, tmp_path, "--prompt", form["prompt"], *SMALL_FLAGS,
                                           "--steps", "4", "--seed", "3")
    assert np.array_equal(read_frames(first["video"]), frames)  # the same video, to the bit
    saved = server.outputs / first["message"].split()[1].rstrip(",")
    # the same settings and work ledger, saved as the command line saves them, and shown
    assert json.loads(saved.with_suffix(".json").read_text()) == settings == first["settings"] and saved.exists()
    assert "DiT forwards: 4 computed, 0 skipped" in first["ledger"] and "peak" in first["ledger"]
    # the same prompt again: the pipeline kept by the page reads it from the prompt cache
    assert "prompt cache" not in first["log"]
    again = dict(zip(OUTPUTS, client.predict(**{**form, "seed": 4}, api_name="/generate")))
    assert "the prompt's encoding comes from the prompt cache" in again["log"]
    assert any(item["caption"].startswith(form["prompt"]) for item in again["gallery"])


def test_the_page_rewrites_the_prompt_first(server, monkeypatch):
    from gradio_client import Client

    from test_rewrite import PROMPT

    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(server.root / "elsewhere"))  # not the server's rewrite cache
    expected, _ = H.rewrite_prompt(PROMPT, "normal", model=str(server.rewriter))
    done = dict(zip(OUTPUTS, Client(server.url, verbose=False).predict(**{**FORM, "prompt": PROMPT,
                                                                           "rewrite": "normal"},
                                                                        api_name="/generate")))
    assert (done["settings"]["prompt"], done["settings"]["original_prompt"]) == (expected, PROMPT) != (PROMPT,) * 2
    assert f"the prompt, rewritten (normal, {server.rewriter}): {expected}" in done["log"]


def test_one_generation_at_a_time_and_cancel_leaves_a_checkpoint(server):
    from gradio_client import Client
    from gradio_client.utils import Status

    first, second = Client(server.url, verbose=False), Client(server.url, verbose=False)  # two tabs
    long = first.submit(**{**FORM, "steps": "1000"}, api_name="/generate")
    deadline = time.monotonic() + 60
    while long.status().code != Status.PROCESSING:
        assert time.monotonic() < deadline and not long.done()
        time.sleep(0.05)
    short = second.submit(**FORM, api_name="/generate")
    while short.status().code != Status.IN_QUEUE:  # the other tab waits its turn
        assert time.monotonic() < deadline and not short.done(), short.status()
        time.sleep(0.05)
    assert not long.done()
    assert second.predict(api_name="/cancel") == "Nothing of this page is running."  # a tab cancels only its own
    assert first.predict(api_name="/cancel") == "Cancelling after the current step..."
    stopped = dict(zip(OUTPUTS, long.result()))
    assert "Cancelled after step" in stopped["message"] and "of 1000: Resume finishes it." in stopped["message"]
    assert dict(zip(OUTPUTS, short.result()))["message"].startswith("Done: ")
    assert list(server.outputs.glob("*.partial.safetensors"))  # the checkpoint Resume continues from


# ------------------------------------------------------------------------------------------------------------
# In a real browser

def test_a_person_makes_a_video(server, browser, tmp_path):
    page = Person(browser, server.url)
    assert "Plan" in page.text("plan") and "96, width 160, 9 frames, 8 steps" in page.text("plan")  # the demo's
    page.type("prompt", "a lighthouse on a cliff at dusk")
    page.click("generate")
    page.wait.until(lambda d: page.find("#progress progress") and "denoising" in page.text("progress"))
    page.wait.until(lambda d: page.find("#preview img").get_attribute("src"))  # the step's preview strip
    message = page.says("message", "Done: ")
    video = page.wait.until(lambda d: page.find("#video_out video"))
    assert video.get_attribute("src").endswith(message.split()[1].rstrip(","))
    assert "denoising" in page.text("progress") and "8/8" in page.text("progress")
    # the files as the page names its folders (as given: "outputs"), never by the server's full path
    assert f"wrote outputs/{message.split()[1].rstrip(',')}" in page.text("ledger")
    assert str(server.root) not in browser.find_element("tag name", "body").text
    shot = Path(os.environ.get("HUNYUAN_APPLE_SCREENSHOT") or tmp_path / "page.png")
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    # an earlier video's settings back in the form
    page.open("earlier")
    from selenium.webdriver.common.by import By
    thumbnail = page.wait.until(lambda d: page.find("#gallery button video"))
    thumbnail.find_element(By.XPATH, "./ancestor::button[1]").click()
    page.says("chosen", "lighthouse")
    page.click("use")
    page.wait.until(lambda d: page.find("#prompt textarea").get_attribute("value") == "a lighthouse on a cliff at dusk")
    page.wait.until(lambda d: page.find("#height input").get_attribute("value") == "96")
    assert page.find("#seed input").get_attribute("value") == message.split()[-1].rstrip(".")  # its seed
    assert not page.find("#random_seed input").is_selected()


def test_cancel_then_resume_gives_the_uninterrupted_video(server, browser, monkeypatch, tmp_path):
    page = Person(browser, server.url)
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")  # a second tab, which will ask while the first one's video is made
    other = Person(browser, server.url)
    other.type("prompt", "a kite over a beach")
    second = browser.current_window_handle
    browser.switch_to.window(first)
    page.type("prompt", "a paper boat on a river")
    small(page, steps=600, seed=7)
    page.click("generate")
    page.wait.until(lambda d: "denoising" in page.text("progress"))
    browser.switch_to.window(second)
    other.click("generate")
    other.says("progress", "queue: 1/1")  # it waits its turn, and shows its place
    browser.switch_to.window(first)
    page.click("cancel")
    stopped = page.says("message", "Cancelled after step")
    assert stopped.endswith("of 600: Resume finishes it."), stopped
    page.click("resume")
    message = page.says("message", "Done: ")
    frames, _ = server.command_line(monkeypatch, tmp_path, "--prompt", "a paper boat on a river", *SMALL_FLAGS,
                                    "--steps", "600", "--seed", "7")
    assert np.array_equal(read_frames(server.outputs / message.split()[1].rstrip(",")), frames)
    browser.switch_to.window(second)
    other.says("message", "Done: ")  # the other tab's video, made while the first waited to resume
    browser.close()
    browser.switch_to.window(first)


def test_image_to_video_from_an_uploaded_image(server, browser, monkeypatch, tmp_path):
    image = tmp_path / "meadow.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8)).save(image)
    page = Person(browser, server.url)
    page.type("prompt", "wind moves through the grass")
    page.choose("model", "tiny-i2v")
    small(page)
    page.type("height", 48)
    page.type("width", 80)  # the image's aspect ratio, 5:3
    page.upload("image", image)
    page.says("plan", "image")
    page.click("generate")
    message = page.says("message", "Done: ")
    out = server.outputs / message.split()[1].rstrip(",")
    settings = json.loads(out.with_suffix(".json").read_text())
    frames, _ = server.command_line(monkeypatch, tmp_path, "--prompt", "wind moves through the grass", "--model",
                                    "tiny-i2v", "--image", str(image), "--resolution", "48", "80", "--frames", "5",
                                    "--steps", "4", "--seed", "3")
    assert settings["model"] == "tiny-i2v" and Path(settings["image"]).read_bytes() == image.read_bytes()
    assert (settings["height"], settings["width"], settings["seed"]) == (48, 80, 3)
    assert np.array_equal(read_frames(out), frames)


def test_bad_input_is_one_sentence_in_the_page_and_the_next_request_runs(server, browser, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    lora = tmp_path / "sd_lora.safetensors"  # a Stable Diffusion LoRA's keys
    mx.save_safetensors(str(lora), {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": mx.zeros((4, 8)),
                                    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": mx.zeros((8, 4))})
    cases = []
    page = Person(browser, server.url)
    page.type("prompt", "a bird")
    page.type("frames", 6)
    page.click("generate")
    cases.append(page.says("message", "Frames 6: the frame count must be 4n+1"))
    page.type("frames", "")
    page.choose("size", "720p")
    page.type("frames", 129)
    assert "Will not fit" in page.says("plan", "this machine can give 8 GiB")  # the plan, before anything runs
    page.click("generate")
    cases.append(page.says("message", "this machine can give 8 GiB"))
    page.choose("size", "model default")
    page.type("frames", "")
    page.upload("lora_files", lora)
    page.click("generate")
    cases.append(page.says("message", "it is a LoRA for another model"))
    browser.refresh()
    page = Person(browser, server.url)
    page.type("prompt", "a bird")
    page.choose("model", "tiny-i2v")
    page.upload("image", text)
    page.click("generate")
    cases.append(page.says("message", "could not be read"))
    print(*cases, sep="\n")
    for message in cases:  # one sentence each, no traceback
        assert "\n" not in message and "Traceback" not in message and message.count(". ") <= 1, message
    page.choose("model", "tiny")
    page.find("#image button[aria-label='Clear']").click()
    small(page)
    page.click("generate")
    page.says("message", "Done: ")


# ------------------------------------------------------------------------------------------------------------
# The server's own settings, in this process

def test_the_page_listens_on_this_machine_only_unless_told(server, monkeypatch):
    listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if line.split()[3] == "0A"]  # sockets in LISTEN state: address:port in hex
    assert f"0100007F:{server.port:04X}" in listening  # 127.0.0.1
    import warnings

    import gradio as gr

    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.append(kw))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main routes warnings to its page
    monkeypatch.chdir(server.root)
    assert ui.main(["--port", "1"]) == 0
    assert ui.main(["--listen", "--auth", "ann:secret", "--port", "1"]) == 0
    assert [(kw["server_name"], kw["auth"]) for kw in launched] == [("127.0.0.1", None), ("0.0.0.0", ("ann", "secret"))]
    assert ui.main(["--auth", "ann"]) == 2


def test_paths_typed_into_the_page_stay_in_its_folders(tmp_path):
    folders = ui.Folders(tmp_path / "models", tmp_path / "outputs", tmp_path / "uploads")
    for f in folders:
        f.mkdir()
    (folders.models / "style_lora.safetensors").write_bytes(b"")
    flags = ui.flags({**FORM, "loras": ["style_lora.safetensors"], "lora_scales": "0.5"}, folders)
    assert flags[flags.index("--lora") + 1] == f"{folders.models / 'style_lora.safetensors'}:0.5"
    for form, words in (({"loras": ["../outputs/x.safetensors"]}, "lies outside the folders"),
                        ({"lora_files": ["/etc/passwd"]}, "lies outside the folders"),
                        ({"image": "/etc/hostname"}, "lies outside the folders"),
                        ({"model": "/etc"}, "lies outside the folders"),
                        ({"model": "my model"}, "is neither a folder in"),
                        ({"model": "../outputs"}, "lies outside the folders"),
                        ({"frames": "five"}, "type a whole number")):
        with pytest.raises(ui.Refused, match=words):
            ui.flags({**FORM, **form}, folders)
    assert ui.model_argument("hunyuanvideo-community/HunyuanVideo", folders) == "hunyuanvideo-community/HunyuanVideo"


def test_use_these_settings_gives_back_the_same_run(tmp_path, monkeypatch):
    """A video's settings, put back into the form ("use these settings") and read as the page reads the form:
    the same settings."""
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path / "cache"))
    folders = ui.Folders(tmp_path / "models", tmp_path / "outputs", tmp_path / "uploads")
    (folders.models / "loras").mkdir(parents=True)
    (folders.models / "loras/a_lora.safetensors").write_bytes(b"")
    saved = cli.resolve(cli.parse_args(["--prompt", "a crane", "--model", "tiny", "--preset", "fasthunyuan",
                                        "--resolution", "48", "80", "--frames", "13", "--steps", "7", "--seed", "11",
                                        "--guidance", "3.5", "--shift", "5", "--cache", "teacache",
                                        "--cache-threshold", "0.2", "--negative-prompt", "blur", "--cfg-scale", "4",
                                        "--quantization", "int8", "--lora",
                                        f"{folders.models / 'loras/a_lora.safetensors'}:0.7"]))._asdict()
    again = cli.resolve(ui.parse(ui.flags({**FORM, **ui.form_values(saved, folders)}, folders)))._asdict()
    assert {**again, "seed": saved["seed"]} == saved and again["seed"] == 11
    # a rewritten prompt: the form gets the words typed and the mode, and the run rewrites them again
    rewritten = {**saved, "prompt": "A crane wades through a misty marsh at dawn.", "original_prompt": "a crane",
                 "rewrite": "normal"}
    form = ui.form_values(rewritten, folders)
    assert (form["prompt"], form["rewrite"]) == ("a crane", "normal")
    again = cli.resolve(ui.parse(ui.flags({**FORM, **form}, folders)))._asdict()
    assert (again["prompt"], again["original_prompt"], again["rewrite"]) == ("a crane", None, "normal")


def test_the_page_keeps_its_pipeline_while_the_model_is_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("HUNYUAN_APPLE_CACHE", str(tmp_path))
    page = ui.Page(ui.Folders(tmp_path, tmp_path, tmp_path), "tiny")
    args = cli.parse_args(["--prompt", "x", "--model", "tiny"])
    settings = cli.resolve(args)._asdict()
    pipe = page.load(settings, args)
    assert page.load({**settings, "seed": 5, "steps": 3}, args) is pipe
    assert page.load({**settings, "quantization": "int8"}, args) is not pipe


def test_without_gradio_the_page_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio.utils", None)  # import gradio.utils raises ImportError
    assert ui.main([]) == 2
    assert capsys.readouterr().err == 'error: the page needs Gradio: pip install "hunyuan-apple[ui]" (or pip ' \
                                      'install gradio).\n'

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
OUTPUTS = ("progress", "preview", "video", "settings", "ledger", "message", "log", "gallery", "rewritten",
           "checkpoints")


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
    # get() returns once the page's document is parsed: Person waits for the page itself to say it is ready, and a
    # load event that never comes (seen after many runs in one browser) must not hang the suite for minutes
    options.page_load_strategy = "eager"
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
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
        from selenium.webdriver.common.by import By
        self.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} input"))[0].click()
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
    assert done["rewritten"] == expected  # shown by the prompt, to edit and use


def started(job, deadline=60):
    """Waits until a submitted request runs (its generator has begun), and returns the job."""
    from gradio_client.utils import Status

    end = time.monotonic() + deadline
    while job.status().code not in (Status.PROCESSING, Status.ITERATING):
        assert time.monotonic() < end and not job.done(), job.status()
        time.sleep(0.05)
    return job


def latest(job, key, words, deadline=60):
    """Waits until the request's latest update shows words in its output `key`, and returns that update."""
    end = time.monotonic() + deadline
    while True:
        shown = [dict(zip(OUTPUTS, o)) for o in job.outputs()]
        if shown and words in str(shown[-1][key]):
            return shown[-1]
        assert time.monotonic() < end and not job.done(), shown[-1:] or job.status()
        time.sleep(0.05)


def test_one_generation_at_a_time_and_a_waiting_one_says_so(server):
    """A second tab's request waits while the first runs, and says so (what runs, its place in the queue); a tab
    with nothing running or waiting cancels nothing; a waiting request cancelled by its tab never runs; the first
    tab's Cancel leaves a checkpoint, and the waiting request then runs."""
    from gradio_client import Client

    first, second, third = (Client(server.url, verbose=False) for _ in range(3))  # three tabs
    long = started(first.submit(**{**FORM, "steps": "1000"}, api_name="/generate"))
    latest(long, "progress", "denoising")
    short = second.submit(**FORM, api_name="/generate")
    waiting = latest(short, "message", "Waiting: another generation is running (denoising ")
    assert "this one is number 1 in the queue" in waiting["message"], waiting["message"]
    removed = third.submit(**{**FORM, "seed": 99}, api_name="/generate")
    latest(removed, "message", "this one is number 2 in the queue")
    assert Client(server.url, verbose=False).predict(api_name="/cancel") == "Nothing of this page is running."
    assert third.predict(api_name="/cancel") == "Removing it from the queue..."
    assert dict(zip(OUTPUTS, removed.result()))["message"] == "Removed from the queue: it did not run."
    assert not long.done()
    assert first.predict(api_name="/cancel") == "Cancelling after the current step..."
    stopped = dict(zip(OUTPUTS, long.result()))
    assert "Cancelled after step" in stopped["message"] and "of 1000: Resume finishes it." in stopped["message"]
    assert dict(zip(OUTPUTS, short.result()))["message"].startswith("Done: ")
    assert list(server.outputs.glob("*.partial.safetensors"))  # the checkpoint Resume continues from
    assert not list(server.outputs.glob("*_99.*"))  # the request removed from the queue wrote nothing


def test_resume_takes_this_pages_stopped_run_or_the_one_picked(server):
    """Two tabs each stop a run; the first tab's Resume finishes its own run, not the newer checkpoint of the
    other tab; a tab that stopped nothing resumes nothing unless it picks a checkpoint, and then that one."""
    from gradio_client import Client

    mine, other, third = (Client(server.url, verbose=False) for _ in range(3))
    stopped = {}
    for tab, seed in ((mine, 21), (other, 22)):
        run = started(tab.submit(**{**FORM, "steps": "300", "seed": seed}, api_name="/generate"))
        latest(run, "progress", "denoising")
        tab.predict(api_name="/cancel")
        done = dict(zip(OUTPUTS, run.result()))
        assert "Cancelled after step" in done["message"], done["message"]
        stopped[seed] = next(server.outputs.glob(f"*_{seed}.partial.safetensors")).name
        assert stopped[seed] in done["checkpoints"]["choices"][0]  # listed to pick, newest first
    nothing = dict(zip(OUTPUTS, third.predict(None, api_name="/resume")))
    assert nothing["message"].startswith("Nothing of this page to resume"), nothing["message"]
    assert dict(zip(OUTPUTS, mine.predict(None, api_name="/resume")))["message"].endswith("_21.mp4, seed 21.")
    picked = dict(zip(OUTPUTS, third.predict(stopped[22], api_name="/resume")))
    assert picked["message"].endswith("_22.mp4, seed 22."), picked["message"]


# ------------------------------------------------------------------------------------------------------------
# In a real browser

def test_a_person_makes_a_video(server, browser, tmp_path):
    page = Person(browser, server.url)
    assert "Plan" in page.text("plan") and "96, width 160, 9 frames, 8 steps" in page.text("plan")  # the demo's
    # the form shows what the run will use: the tiny demo's size, frames and steps, the model's guidance and shift
    placeholder = lambda key: page.find(f"#{key} input, #{key} textarea").get_attribute("placeholder")  # noqa: E731
    page.wait.until(lambda d: page.find("#height input").get_attribute("value") == "96")
    assert page.find("#width input").get_attribute("value") == "160"
    assert [placeholder(k) for k in ("frames", "steps", "guidance", "shift", "cfg_scale", "cache_threshold")] == [
        "default 9", "default 8", "default 6", "default 7", "default 1", "not used"]
    page.choose("preset", "fasthunyuan")  # FastVideo's model card: 6 steps, flow shift 17
    page.wait.until(lambda d: placeholder("steps") == "default 6" and placeholder("shift") == "default 17")
    page.choose("preset", "none")
    page.open("settings_more")  # Radial Attention's and TaylorSeer's settings have their fields too
    page.choose("attention", "radial")
    page.wait.until(lambda d: placeholder("radial_decay") == "default 0.95" and placeholder("radial_block") ==
                    "default 128" and placeholder("cache_interval") == "not used")
    page.choose("attention", "dense")
    page.find("#settings_more .label-wrap").click()  # closed again
    page.type("prompt", "a lighthouse on a cliff at dusk")
    page.click("generate")
    page.wait.until(lambda d: page.find("#progress progress") and "denoising" in page.text("progress"))
    page.wait.until(lambda d: page.find("#preview img").get_attribute("src"))  # the step's preview strip
    message = page.says("message", "Done: ")
    assert "step 8 of 8" in page.text("preview")
    video = page.wait.until(lambda d: page.find("#video_out video"))
    assert video.get_attribute("src").endswith(message.split()[1].rstrip(","))
    assert "denoising" in page.text("progress") and "8/8" in page.text("progress")
    # the files as the page names its folders (as given: "outputs"), never by the server's full path
    assert f"wrote outputs/{message.split()[1].rstrip(',')}" in page.text("ledger")
    ledger = page.find("#ledger pre")
    assert browser.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", ledger)
    assert str(server.root) not in browser.find_element("tag name", "body").text
    shot = Path(os.environ.get("HUNYUAN_APPLE_SCREENSHOT") or tmp_path / "page.png")
    browser.execute_script("window.scrollTo(0, 0)")
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


def test_a_page_opened_later_lists_the_videos_made_since(server, browser):
    """The gallery is read when a page opens: a video made after the server started (through the API here) is
    there, with its prompt; and the rewritten prompt's box gives the prompt field its text, rewrite off."""
    from gradio_client import Client

    Client(server.url, verbose=False).predict(**{**FORM, "prompt": "a snail crosses a wet leaf"}, api_name="/generate")
    page = Person(browser, server.url)
    page.open("earlier")
    page.wait.until(lambda d: page.find("#gallery button video"))
    made = len(list(server.outputs.glob("*.mp4")))
    assert len(browser.find_elements("css selector", "#gallery button video")) == made
    newest = browser.find_elements("css selector", "#gallery button video")[0]  # the newest first
    newest.find_element("xpath", "./ancestor::button[1]").click()
    page.says("chosen", "a snail crosses a wet leaf")
    page.type("rewritten", "a snail, slowly, on a leaf after rain")
    page.choose("rewrite", "normal")
    page.click("use_rewritten")
    page.wait.until(lambda d: page.find("#prompt textarea").get_attribute("value") ==
                    "a snail, slowly, on a leaf after rain")
    assert page.find("#rewrite input").get_attribute("value") == "none"


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
    other.says("message", "Waiting: another generation is running (denoising")  # it waits its turn, and says so
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
    page = Person(browser, server.url)  # the page opened anew: no LoRA
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
    port = free_port()
    assert ui.main(["--port", str(port)]) == 0
    assert ui.main(["--listen", "--auth", "ann:secret", "--port", str(port)]) == 0
    assert [(kw["server_name"], kw["auth"]) for kw in launched] == [("127.0.0.1", None), ("0.0.0.0", ("ann", "secret"))]
    assert ui.main(["--auth", "ann"]) == 2


@pytest.mark.parametrize("args, words", [
    (["--port", "99999"], "--port 99999: use a port from 1 to 65535"),
    (["--port", "-1"], "--port -1: use a port from 1 to 65535"),
    (["--port", "0"], "--port 0: use a port from 1 to 65535"),
    (["--listen", "::"], "--listen :: is an IPv6 address: the page serves IPv4 only"),
    (["--listen", "999.1.1.1"], "--listen 999.1.1.1: not an address"),
    (["--listen", "192.0.2.1"], "--listen 192.0.2.1: cannot serve there (Cannot assign requested address)"),
    (["--port", "taken"], "is in use (another program serves there): choose another --port"),
])
def test_where_the_page_cannot_serve_is_one_sentence(monkeypatch, capsys, tmp_path, args, words):
    """Checked before the server starts (launch is never called): exit 2 and one sentence, no traceback."""
    import gradio as gr

    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: pytest.fail("the server was started"))
    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = [str(taken.getsockname()[1]) if a == "taken" else a for a in args]
        assert ui.main(args) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err, err


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
        with pytest.raises(ui.Refused, match=words) as refused:
            ui.flags({**FORM, **form}, folders)
        assert str(tmp_path) not in str(refused.value) and "upload" not in str(refused.value) * ("model" in form)
    assert ui.model_argument("hunyuanvideo-community/HunyuanVideo", folders) == "hunyuanvideo-community/HunyuanVideo"


def test_random_seed_ticked_leaves_the_typed_seed_out(tmp_path):
    """The seed typed is the run's only while "Random seed" is unticked; ticked, no --seed reaches the command line
    (Generate then picks one and shows it)."""
    folders = ui.Folders(tmp_path, tmp_path, tmp_path)
    assert "--seed" not in ui.flags({**FORM, "random_seed": True, "seed": 5}, folders)
    typed = ui.flags({**FORM, "random_seed": False, "seed": 5}, folders)
    assert typed[typed.index("--seed") + 1] == "5"


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

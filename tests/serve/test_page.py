"""The page at `/` in a real headless browser (Debian's chromium + chromedriver, driven by selenium): type a prompt,
click Generate, see the image appear (the Python API's image for that seed), read its parameters, reuse them; an
error shows in #error; the LoRA picker writes A1111's tag into the prompt."""
from __future__ import annotations

import base64
import io
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from latentdiff.serve.settings import ServeSettings
from tests._support.server import running_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MODEL = "latentdiff/shapes-64"
PROMPT = "a yellow square at the top, black background"
STEPS, SEED = 4, 1234
WAIT_S = 60


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not (os.access(path, os.X_OK) or shutil.which(path))]
    if missing:
        pytest.skip(f"the browser test needs Debian's chromium and chromedriver: {', '.join(missing)} not found "
                    "(.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    write_lora(loras / "tinystyle.safetensors")
    with running_server(ServeSettings(max_batch=1, max_steps=30, lora_dirs=(loras,))) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, WAIT_S)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 1)   # choices loaded
        wait.until(lambda d: d.find_element(By.ID, "width").get_attribute("value") == "64")   # the model's size
        yield browser


def write_lora(path):
    """A LoRA file the catalog lists (kohya key names; never applied here: the picker only writes its tag)."""
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 1)}, str(path))


def fill(driver, element_id, value):
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(str(value))


def reference(seed, steps=STEPS, *, sampler=None, schedule=None, **call):
    from latentdiff import LatentDiffusionPipeline
    from latentdiff.diffusion.samplers.names import sampler_from_name

    pipe = LatentDiffusionPipeline.from_pretrained(MODEL)
    if sampler is not None:
        pipe.sampler = sampler_from_name(sampler, schedule=schedule, base=pipe.sampler)
    image = pipe(PROMPT, height=64, width=64, num_inference_steps=steps, guidance_scale=3.0,
                 generator=[torch.Generator().manual_seed(seed)], **call).images[0]
    return np.asarray(image.convert("RGB"))


def shown_pixels(image):
    source = image.get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB"))


def test_generate_shows_the_image_and_its_parameters_and_reuse_fills_the_form(page):
    fill(page, "prompt", PROMPT)
    fill(page, "steps", STEPS)
    fill(page, "cfg", 3)
    fill(page, "seed", SEED)
    Select(page.find_element(By.ID, "sampler")).select_by_value("DPM++ 2M")
    Select(page.find_element(By.ID, "scheduler")).select_by_value("exponential")
    page.find_element(By.ID, "generate").click()
    wait = WebDriverWait(page, WAIT_S)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .result img"))
    image = page.find_element(By.CSS_SELECTOR, "#gallery .result img")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64)
    params = page.find_element(By.CSS_SELECTOR, "#gallery .result .params").text
    assert PROMPT in params and f"Seed: {SEED}" in params and f"Steps: {STEPS}" in params
    assert "Sampler: DPM++ 2M" in params and "Schedule type: Exponential" in params
    np.testing.assert_array_equal(shown_pixels(image), reference(SEED, sampler="DPM++ 2M", schedule="exponential"))
    assert float(page.find_element(By.ID, "progress").get_attribute("value")) == 1.0
    assert not page.find_element(By.ID, "error").is_displayed()

    fill(page, "seed", -1)
    fill(page, "prompt", "something else")
    fill(page, "steps", 9)
    Select(page.find_element(By.ID, "sampler")).select_by_value("")
    Select(page.find_element(By.ID, "scheduler")).select_by_value("")
    page.find_element(By.CSS_SELECTOR, "#gallery .result .reuse").click()
    assert page.find_element(By.ID, "seed").get_attribute("value") == str(SEED)
    assert page.find_element(By.ID, "prompt").get_attribute("value") == PROMPT
    assert page.find_element(By.ID, "steps").get_attribute("value") == str(STEPS)
    assert page.find_element(By.ID, "sampler").get_attribute("value") == "DPM++ 2M"
    assert page.find_element(By.ID, "scheduler").get_attribute("value") == "exponential"


def test_cfg_truncation_field_generates_reuses_and_refuses_out_of_range(page):
    """The guided fraction goes out as `cfg_truncation` (the Python API's image with it); "Reuse parameters" puts
    it back, and empties it for an image made without; a value outside [0, 1] is refused before anything is sent."""
    fill(page, "prompt", PROMPT)
    fill(page, "steps", STEPS)
    fill(page, "cfg", 3)
    fill(page, "seed", SEED + 1)
    Select(page.find_element(By.ID, "sampler")).select_by_value("")
    Select(page.find_element(By.ID, "scheduler")).select_by_value("")
    shown = {}
    for fraction in ("", 0.5):
        fill(page, "cfg_truncation", fraction)
        shown[fraction] = shown_pixels(generated(page))
    expected = reference(SEED + 1, cfg_truncation=0.5)
    np.testing.assert_array_equal(shown[0.5], expected)
    np.testing.assert_array_equal(shown[""], reference(SEED + 1))
    assert not np.array_equal(shown[""], expected)   # the truncation changes the image

    newest, older = page.find_elements(By.CSS_SELECTOR, "#gallery .result .reuse")[:2]
    fill(page, "cfg_truncation", "")
    newest.click()
    assert float(page.find_element(By.ID, "cfg_truncation").get_attribute("value")) == 0.5
    older.click()
    assert page.find_element(By.ID, "cfg_truncation").get_attribute("value") == ""

    before = len(page.find_elements(By.CSS_SELECTOR, "#gallery .result"))
    assert page.find_element(By.ID, "status").text == "done"
    fill(page, "cfg_truncation", 1.5)
    assert page.execute_script("return document.getElementById('cfg_truncation').checkValidity()") is False
    page.find_element(By.ID, "generate").click()
    time.sleep(0.5)
    assert page.find_element(By.ID, "status").text == "done"   # not "queued": the form refused the value
    assert len(page.find_elements(By.CSS_SELECTOR, "#gallery .result")) == before
    fill(page, "cfg_truncation", "")


def generated(page):
    """Click Generate and return the new result's image, once it has loaded."""
    before = len(page.find_elements(By.CSS_SELECTOR, "#gallery .result"))
    page.find_element(By.ID, "generate").click()
    wait = WebDriverWait(page, WAIT_S)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .result")) == before + 1)
    image = page.find_element(By.CSS_SELECTOR, "#gallery .result img")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64)
    return image


def test_progress_preview_and_interrupt(page, monkeypatch):
    """A slowed-down call (each step waits SLOW_STEP_S): the bar moves, the live preview shows, and Interrupt stops
    the call early: the image that arrives is the partly denoised one, not the full run's."""
    from latentdiff.serve import engine

    steps, seed, slow_step_s = 30, 77, 0.25
    render = engine.render

    def slowed(pipe, units, *, callback, **options):
        def step(*args):
            time.sleep(slow_step_s)
            callback(*args)
        return render(pipe, units, callback=step, **options)

    monkeypatch.setattr(engine, "render", slowed)
    before = len(page.find_elements(By.CSS_SELECTOR, "#gallery .result"))
    fill(page, "prompt", PROMPT)
    fill(page, "steps", steps)
    fill(page, "cfg", 3)
    fill(page, "seed", seed)
    Select(page.find_element(By.ID, "sampler")).select_by_value("")
    Select(page.find_element(By.ID, "scheduler")).select_by_value("")
    page.find_element(By.ID, "generate").click()
    wait = WebDriverWait(page, WAIT_S, poll_frequency=0.05)
    wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
    progress = float(page.find_element(By.ID, "progress").get_attribute("value"))
    assert 0 < progress < 1 and page.find_element(By.ID, "status").text.startswith("step ")
    assert page.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png;base64,")
    assert not page.find_element(By.ID, "generate").is_enabled()
    page.find_element(By.ID, "interrupt").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .result")) == before + 1)
    image = page.find_element(By.CSS_SELECTOR, "#gallery .result img")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64)
    assert f"Seed: {seed}" in page.find_element(By.CSS_SELECTOR, "#gallery .result .params").text
    assert not np.array_equal(shown_pixels(image), reference(seed, steps))   # stopped before the last step
    assert page.find_element(By.ID, "generate").is_enabled() and not page.find_element(By.ID, "interrupt").is_enabled()


def test_an_error_shows_in_the_error_box(page):
    fill(page, "prompt", PROMPT)
    fill(page, "steps", 31)   # past --max-steps 30
    before = len(page.find_elements(By.CSS_SELECTOR, "#gallery .result"))
    page.find_element(By.ID, "generate").click()
    error = page.find_element(By.ID, "error")
    WebDriverWait(page, WAIT_S).until(lambda d: error.is_displayed())
    assert "steps" in error.text and "30" in error.text
    assert len(page.find_elements(By.CSS_SELECTOR, "#gallery .result")) == before
    assert page.find_element(By.ID, "generate").is_enabled()


def test_lora_picker_inserts_the_tag_and_every_control_has_a_label(page):
    fill(page, "prompt", PROMPT)
    Select(page.find_element(By.ID, "lora")).select_by_value("tinystyle")
    assert page.find_element(By.ID, "prompt").get_attribute("value") == f"{PROMPT} <lora:tinystyle:1>"
    for element_id in ("prompt", "negative", "width", "height", "steps", "cfg", "cfg_truncation", "sampler",
                       "scheduler", "seed", "lora"):
        labels = page.find_elements(By.CSS_SELECTOR, f"label[for='{element_id}']")
        assert len(labels) == 1 and labels[0].text.strip(), element_id
    for element_id in ("generate", "interrupt", "progress", "preview", "gallery", "error"):
        assert page.find_element(By.ID, element_id)

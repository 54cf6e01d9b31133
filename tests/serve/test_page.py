"""The page at `/` in a real headless browser (Debian's chromium + chromedriver, driven by selenium): type a prompt,
click Generate, see the image appear (the Python API's image for that seed), read its parameters, reuse them; an
error shows in #error; the LoRA picker writes A1111's tag into the prompt."""
from __future__ import annotations

import base64
import io
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("uvicorn")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from latentdiff.serve.settings import ServeSettings  # noqa: E402
from tests._support.server import running_server  # noqa: E402

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


def reference(seed):
    from latentdiff import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(MODEL)
    image = pipe(PROMPT, height=64, width=64, num_inference_steps=STEPS, guidance_scale=3.0,
                 generator=[torch.Generator().manual_seed(seed)]).images[0]
    return np.asarray(image.convert("RGB"))


def test_generate_shows_the_image_and_its_parameters_and_reuse_fills_the_form(page):
    fill(page, "prompt", PROMPT)
    fill(page, "steps", STEPS)
    fill(page, "cfg", 3)
    fill(page, "seed", SEED)
    page.find_element(By.ID, "generate").click()
    wait = WebDriverWait(page, WAIT_S)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .result img"))
    image = page.find_element(By.CSS_SELECTOR, "#gallery .result img")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64)
    params = page.find_element(By.CSS_SELECTOR, "#gallery .result .params").text
    assert PROMPT in params and f"Seed: {SEED}" in params and f"Steps: {STEPS}" in params
    source = image.get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB"))
    np.testing.assert_array_equal(shown, reference(SEED))
    assert float(page.find_element(By.ID, "progress").get_attribute("value")) == 1.0
    assert not page.find_element(By.ID, "error").is_displayed()

    fill(page, "seed", -1)
    fill(page, "prompt", "something else")
    fill(page, "steps", 9)
    page.find_element(By.CSS_SELECTOR, "#gallery .result .reuse").click()
    assert page.find_element(By.ID, "seed").get_attribute("value") == str(SEED)
    assert page.find_element(By.ID, "prompt").get_attribute("value") == PROMPT
    assert page.find_element(By.ID, "steps").get_attribute("value") == str(STEPS)


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
    for element_id in ("prompt", "negative", "width", "height", "steps", "cfg", "sampler", "seed", "lora"):
        labels = page.find_elements(By.CSS_SELECTOR, f"label[for='{element_id}']")
        assert len(labels) == 1 and labels[0].text.strip(), element_id
    for element_id in ("generate", "interrupt", "progress", "preview", "gallery", "error"):
        assert page.find_element(By.ID, element_id)

"""`latentdiff generate` as A1111 users type it (cli/generate_a1111.py): samplers by A1111 / diffusers names and
`--schedule`, recorded as the registered name and schedule and read back by `--from`; the A1111 `parameters` text
in every image, and `--from` on images A1111 made (PNG chunk, JPEG / WebP EXIF UserComment); `latentdiff models`
listing every name. On a tiny stand-in for the built-in model (tests/_support/tiny_builtin.py), except the
subprocess runs, which use the real one."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from latentdiff.cli import main
from latentdiff.diffusion.samplers import DPMSolverMultistepSampler
from latentdiff.diffusion.samplers.names import A1111_GRID
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import read_image_params, read_png_params, save_image
from tests._support.cli import BUILTIN, PROMPT, pixels
from tests._support.cli import generate_at_seed_0 as generate

pytestmark = pytest.mark.usefixtures("offline_builtin")
SRC = Path(__file__).resolve().parents[2] / "src"
A1111_TEXT = (f"{PROMPT}\nNegative prompt: green, (blurry:1.3)\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, "
              "CFG scale: 2.5, Seed: 42, Size: 64x64, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
              'Lora hashes: "detail: 2a3f9b1c7d0e", Version: v1.10.1')


@pytest.fixture(scope="module")
def pipe(model):
    return LatentDiffusionPipeline.from_pretrained(model)


def dpm_image(pipe, schedule: str, *, seed: int, steps: int, guidance: float, negative=None) -> np.ndarray:
    """What the pipeline makes with DPM-Solver++ 2M switched from its own sampler (as --sampler does)."""
    dpm_pipe = copy.copy(pipe)
    dpm_pipe.sampler = DPMSolverMultistepSampler.from_config(pipe.sampler, sigma_schedule=schedule)
    image = dpm_pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator().manual_seed(seed), progress=False).images[0]
    return np.asarray(image)


def a1111_png(path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    return path


def a1111_exif(path: Path, text: str, image_format: str) -> Path:
    """A JPEG / WebP file as A1111 writes it: the text as EXIF UserComment, piexif's "unicode" encoding."""
    exif = Image.Exif()
    exif[0x8769] = {0x9286: b"UNICODE\0" + text.encode("utf-16-be")}
    Image.new("RGB", (64, 64)).save(path, format=image_format, exif=exif.tobytes())
    return path


def never_load(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", never)


# ---- sampler names and --schedule -------------------------------------------------------------------------------
def test_an_a1111_sampler_name_is_recorded_by_its_registered_name_and_schedule(pipe, capsys):
    assert generate(PROMPT, "--sampler", "DPM++ 2M Karras", "--steps", 3, "--seed", 5, "-o", "a.png") == 0
    params = read_png_params("a.png")
    assert (params["sampler"], params["schedule"]) == ("dpmpp_2m", "karras")
    assert np.array_equal(pixels("a.png"), dpm_image(pipe, "karras", seed=5, steps=3, guidance=3.0))
    with Image.open("a.png") as image:
        assert image.text["parameters"].endswith(f"{PROMPT}\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, "
                                                 f"CFG scale: 3, Seed: 5, Size: 64x64, Model: {BUILTIN}, "
                                                 f"Version: latentdiff {params['latentdiff']}")
    assert generate("--from", "a.png", "-o", "again.png") == 0
    assert np.array_equal(pixels("again.png"), pixels("a.png")) and read_png_params("again.png") == params


def test_a_diffusers_class_name_and_the_schedule_flag(pipe):
    assert generate(PROMPT, "--sampler", "DPMSolverMultistepScheduler", "--schedule", "exponential", "--steps", 3,
                    "-o", "b.png") == 0
    params = read_png_params("b.png")
    assert (params["sampler"], params["schedule"]) == ("dpmpp_2m", "exponential")
    assert np.array_equal(pixels("b.png"), dpm_image(pipe, "exponential", seed=0, steps=3, guidance=3.0))
    # --from with another --sampler: the stored schedule belonged to the sampler replaced
    assert generate("--from", "b.png", "--sampler", "ddim", "-o", "c.png") == 0
    assert (read_png_params("c.png")["sampler"], read_png_params("c.png")["schedule"]) == ("ddim", None)
    # ... and with --schedule alone, the stored sampler takes the new schedule
    assert generate("--from", "b.png", "--schedule", "Karras", "-o", "d.png") == 0
    assert np.array_equal(pixels("d.png"), dpm_image(pipe, "karras", seed=0, steps=3, guidance=3.0))


def test_a_dpm_family_name_and_an_a1111_schedule(pipe):
    """DPM++ SDE (A1111's Automatic schedule: karras) on its Brownian tree, recorded and reproduced by --from; and
    A1111's "Align Your Steps" schedule on DPM2 a (with A1111's dropped next-to-last sigma)."""
    from latentdiff.diffusion.samplers import DPM2AncestralSampler, DPMSolverSDESampler

    assert generate(PROMPT, "--sampler", "DPM++ SDE", "--steps", 3, "--seed", 5, "-o", "sde.png") == 0
    params = read_png_params("sde.png")
    assert (params["sampler"], params["schedule"]) == ("dpmpp_sde", "karras")
    sde_pipe = copy.copy(pipe)
    sde_pipe.sampler = DPMSolverSDESampler.from_config(pipe.sampler, sigma_schedule="karras", **A1111_GRID)
    expected = sde_pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(5),
                        progress=False).images[0]
    assert np.array_equal(pixels("sde.png"), np.asarray(expected))
    with Image.open("sde.png") as image:
        assert "Sampler: DPM++ SDE, Schedule type: Karras" in image.text["parameters"]
    assert generate("--from", "sde.png", "-o", "sde2.png") == 0
    assert np.array_equal(pixels("sde2.png"), pixels("sde.png"))
    assert generate(PROMPT, "--sampler", "DPM2 a", "--schedule", "Align Your Steps", "--steps", 3, "-o", "ays.png") == 0
    ays = read_png_params("ays.png")       # A1111 drops DPM2 a's next-to-last sigma on every schedule
    assert (ays["schedule"], ays["sampler_options"]) == ("align_your_steps",
                                                         {"discard_next_to_last_sigma": True, **A1111_GRID})
    ays_pipe = copy.copy(pipe)
    ays_pipe.sampler = DPM2AncestralSampler.from_config(pipe.sampler, sigma_schedule="align_your_steps",
                                                        discard_next_to_last_sigma=True, **A1111_GRID)
    expected = ays_pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                        progress=False).images[0]
    assert np.array_equal(pixels("ays.png"), np.asarray(expected))


def test_unipc_by_its_a1111_name(pipe):
    """A1111's "UniPC" is uni_pc (bh1, third order), recorded by that name and read back by --from."""
    from latentdiff.diffusion.samplers.names import sampler_from_name

    assert generate(PROMPT, "--sampler", "UniPC", "--steps", 3, "-o", "u.png") == 0
    params = read_png_params("u.png")
    assert (params["sampler"], params["schedule"]) == ("uni_pc", "default")
    unipc_pipe = copy.copy(pipe)
    unipc_pipe.sampler = sampler_from_name("UniPC", base=pipe.sampler)
    assert (unipc_pipe.sampler.solver_type, unipc_pipe.sampler.solver_order) == ("bh1", 3)
    expected = unipc_pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                          progress=False).images[0]
    assert np.array_equal(pixels("u.png"), np.asarray(expected))
    with Image.open("u.png") as image:
        assert "Sampler: UniPC, Schedule type: Uniform" in image.text["parameters"]
    assert generate("--from", "u.png", "-o", "u2.png") == 0
    assert np.array_equal(pixels("u2.png"), pixels("u.png"))


def test_dpmpp_2m_sde_heun_by_its_a1111_name(pipe):
    """A1111's "DPM++ 2M SDE Heun" is dpmpp_2m_sde with solver_type heun, Brownian noise and the exponential
    schedule: recorded as the registered name with those options, written as A1111's label, read back by --from;
    --sampler with a registered name drops the options the file's label fixed."""
    from latentdiff.diffusion.samplers.names import sampler_from_name

    assert generate(PROMPT, "--sampler", "DPM++ 2M SDE Heun", "--steps", 3, "-o", "h.png") == 0
    params = read_png_params("h.png")
    assert (params["sampler"], params["schedule"]) == ("dpmpp_2m_sde", "exponential")
    assert params["sampler_options"] == {"noise_type": "brownian", "solver_type": "heun", **A1111_GRID}
    heun_pipe = copy.copy(pipe)
    heun_pipe.sampler = sampler_from_name("DPM++ 2M SDE Heun", base=pipe.sampler)
    assert (heun_pipe.sampler.solver_type, heun_pipe.sampler.noise_type) == ("heun", "brownian")
    expected = heun_pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                         progress=False).images[0]
    assert np.array_equal(pixels("h.png"), np.asarray(expected))
    with Image.open("h.png") as image:
        assert "Sampler: DPM++ 2M SDE Heun, Schedule type: Exponential" in image.text["parameters"]
    assert generate("--from", "h.png", "-o", "h2.png") == 0
    assert np.array_equal(pixels("h2.png"), pixels("h.png")) and read_png_params("h2.png") == params
    assert generate("--from", "h.png", "--sampler", "dpmpp_2m_sde", "-o", "h3.png") == 0
    assert "sampler_options" not in read_png_params("h3.png")
    assert not np.array_equal(pixels("h3.png"), pixels("h.png"))


PNG_ORIGIN = {"sampler": "x.png: sampler", "schedule": "x.png: schedule", "sampler_options": "x.png: sampler_options"}


@pytest.mark.parametrize("options, words", [
    ({"noise_type": "pink"}, ["bad sampler options", "x.png: sampler_options", "dpmpp_2m_sde"]),
    ({"rho": 7}, ["bad sampler options", "solver_type"]),
    ({"sigma_schedule": "karras"}, ["bad sampler options"]),      # the schedule is recorded apart
    ("heun", ["bad sampler options", "'heun'"]),
])
def test_a_pngs_bad_sampler_options_are_refused(options, words):
    from latentdiff.cli.generate_a1111 import settle_sampler
    from latentdiff.errors import UsageError

    values = {"sampler": "dpmpp_2m_sde", "schedule": "exponential", "sampler_options": options}
    with pytest.raises(UsageError) as info:
        settle_sampler(values, dict(PNG_ORIGIN), print)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_the_refiner_carries_on_with_an_a1111_labels_grid():
    """A1111 runs the refiner with the base's sampler on its own model's sigmas: an A1111 label's grid (the model's
    sigmas alone) goes over to the refiner; a registered name leaves the refiner's folder spacing."""
    from types import SimpleNamespace

    from latentdiff.cli.generate_sdxl import refiner_sampler
    from latentdiff.diffusion.samplers import EulerSampler
    from latentdiff.diffusion.samplers.names import sampler_from_name

    folder = EulerSampler(timestep_spacing="leading", steps_offset=1)       # SDXL's scheduler_config.json
    refiner = SimpleNamespace(sampler=folder)
    a1111 = refiner_sampler(refiner, sampler_from_name("DPM2", base=folder))
    assert a1111 == sampler_from_name("DPM2", base=folder)
    registered = refiner_sampler(refiner, sampler_from_name("dpm_2", base=folder, schedule="karras"))
    assert (registered.timestep_spacing, registered.steps_offset, registered.sigma_interpolation) == \
        ("leading", 1, "linear")


def test_a_pngs_sampler_options_are_kept_unless_a_flag_names_the_sampler():
    from latentdiff.cli.generate_a1111 import settle_sampler

    stored = {"noise_type": "brownian", "solver_type": "heun"}
    values = {"sampler": "dpmpp_2m_sde", "schedule": "exponential", "sampler_options": dict(stored)}
    settle_sampler(values, dict(PNG_ORIGIN), print)
    assert values["sampler_options"] == stored
    values = {"sampler": "dpmpp_2m_sde", "schedule": None, "sampler_options": dict(stored)}
    settle_sampler(values, {**PNG_ORIGIN, "sampler": "--sampler"}, print)
    assert values["sampler_options"] is None
    values = {"sampler": "DPM2", "schedule": None, "sampler_options": None}
    settle_sampler(values, {**PNG_ORIGIN, "sampler": "--sampler"}, print)
    assert (values["sampler"], values["schedule"], values["sampler_options"]) == (
        "dpm_2", "karras", {"discard_next_to_last_sigma": True, **A1111_GRID})


@pytest.mark.parametrize("argv, words", [
    (["--sampler", "ddim", "--schedule", "karras"], ["--schedule", "--sampler", "ddim", "karras"]),
    (["--schedule", "karras"], ["--schedule", "sampler", "ddim"]),            # the model's own (ddim)
    (["--sampler", "Euler a Karras"], ["euler_ancestral", "karras"]),
    (["--sampler", "Restart"], ["not implemented yet", "--sampler", "heun"]),
    (["--sampler", "DPM fast"], ["not implemented yet", "dpmpp_2m"]),
    (["--sampler", "DPM++ 2M", "--schedule", "KL Optimal"], ["not implemented yet", "--schedule"]),
    (["--sampler", "euler", "--schedule", "rho7"], ["unknown schedule", "--schedule"]),
])
def test_bad_names_are_one_line_before_any_loading(argv, words, monkeypatch, capsys):
    never_load(monkeypatch)
    assert generate(PROMPT, *argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("latentdiff: error: "), err
    for word in words:
        assert word in err[0], (word, err[0])


def test_a_schedule_the_loaded_model_s_sampler_lacks_names_the_flags(tmp_path, capsys):
    """A folder that does not name its sampler (known only once it loads: DDIM, no schedule): the error, raised in
    latentdiff.generation, names the command line's flags."""
    from tests._support.tiny_builtin import make_tiny_shapes_model

    folder = make_tiny_shapes_model(tmp_path / "ddim", settings={"num_inference_steps": 2})
    assert generate(PROMPT, "--model", folder, "--schedule", "karras", "-o", "x.png") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("latentdiff: error: the model's sampler DDIMSampler has no schedule to set"), err
    assert "where: --schedule; expected: no --schedule, or --sampler with a schedule" in err[0]


# ---- --from on images A1111 made ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["png", "jpg", "webp"])
def test_from_reads_a1111_parameters(kind, pipe, capsys):
    path = Path(f"a1111.{kind}")
    if kind == "png":
        a1111_png(path, A1111_TEXT)
    else:
        a1111_exif(path, A1111_TEXT, {"jpg": "JPEG", "webp": "WEBP"}[kind])
    assert generate("--from", path, "-o", "made.png") == 0
    params = read_png_params("made.png")
    assert {k: params[k] for k in ("prompt", "negative", "steps", "sampler", "schedule", "guidance", "seed",
                                   "width", "height", "model")} == {
        "prompt": PROMPT, "negative": "green, (blurry:1.3)", "steps": 3, "sampler": "dpmpp_2m",
        "schedule": "karras", "guidance": 2.5, "seed": 42, "width": 64, "height": 64, "model": BUILTIN}
    assert np.array_equal(pixels("made.png"), dpm_image(pipe, "karras", seed=42, steps=3, guidance=2.5,
                                                        negative="green, (blurry:1.3)"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "vocabulary" not in line
                and not line.startswith("latentdiff: step ")]
    assert warnings == [
        f"latentdiff: warning: {path}: A1111 settings latentdiff does not use, ignored: Model hash, Lora hashes",
        f"latentdiff: warning: {path} was made with the A1111 model 'v1-5-pruned-emaonly', not a latentdiff model: "
        f"using the default model {BUILTIN} (pass --model to choose one)"]


def test_from_an_a1111_text_a1111_ignores_the_schedule_of_ddim(capsys):
    a1111_png(Path("ddim.png"), f"{PROMPT}\nSteps: 2, Sampler: DDIM, Schedule type: Karras, CFG scale: 2, Seed: 3, "
                                f"Size: 64x64, Model: {BUILTIN}")
    assert generate("--from", "ddim.png", "-o", "made.png") == 0
    params = read_png_params("made.png")
    assert (params["sampler"], params["schedule"], params["model"]) == ("ddim", None, BUILTIN)
    assert "the karras schedule is not implemented for the ddim sampler" in capsys.readouterr().err


@pytest.mark.parametrize("text, words", [
    ("a prompt only", ["no A1111 settings line", "bad.png: parameters"]),
    (f"{PROMPT}\nSteps: 3, Sampler: DPM fast, CFG scale: 7, Seed: 1", ["not implemented yet", "bad.png: sampler"]),
    (f"{PROMPT}\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 10x10000000",
     ["bad.png: height", "16384", "10000000"]),
    (f"{PROMPT}\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: -5", ["seed", "-5"]),
    (f"{PROMPT}\nSteps: 3, Sampler: Euler, CFG scale: nan, Seed: 1", ["CFG scale", "a number"]),
])
def test_bad_a1111_parameters_are_one_line_before_any_loading(text, words, monkeypatch, capsys):
    never_load(monkeypatch)
    a1111_png(Path("bad.png"), text)
    assert generate("--from", "bad.png", "-o", "out.png") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("latentdiff: error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert not Path("out.png").exists()


# ---- JPEG / WebP written by latentdiff ------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_jpeg_and_webp_carry_both_texts_and_from_reads_them(suffix, pipe):
    assert generate(PROMPT, "--sampler", "Euler a", "--steps", 2, "--seed", 9, "-o", "ref.png") == 0
    params = read_png_params("ref.png")
    with Image.open("ref.png") as image:
        save_image(image, Path(f"copy{suffix}"), params)
        infotext = image.text["parameters"]
    stored, text = read_image_params(f"copy{suffix}")
    assert stored == params and text == infotext            # the JSON in XMP, A1111's text in EXIF UserComment
    with Image.open(f"copy{suffix}") as image:              # as A1111 (piexif) reads a UserComment
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment[:8] == b"UNICODE\0" and comment[8:].decode("utf-16-be") == infotext
    assert generate("--from", f"copy{suffix}", "-o", "again.png") == 0
    assert np.array_equal(pixels("again.png"), pixels("ref.png")) and read_png_params("again.png") == params


# ---- latentdiff models, and the entry point -----------------------------------------------------------------------
def test_models_lists_every_accepted_name(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for words in (["registered: ddim", "euler_ancestral"], ["A1111: DDIM", "Euler a", "DPM++ 2M Karras"],
                  ["diffusers: DDIMScheduler", "DPMSolverMultistepScheduler"], ["schedules: default, karras"],
                  ["not implemented yet:", "DPM fast", "Restart"], ["A1111: DDIM", "DPM2 a", "DPM++ 2M SDE Heun"],
                  ["schedules: default, karras", "sgm_uniform", "align_your_steps"]):
        line = next(line for line in out.splitlines() if words[0] in line)
        assert all(word in line for word in words), (words, line)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def test_the_entry_point_with_a1111_names_on_the_real_builtin_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "latentdiff", "generate", PROMPT, "--sampler", "Euler a",
                          "--steps", "2", "-o", str(tmp_path / "e.png")], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    params = read_png_params(tmp_path / "e.png")
    assert (params["sampler"], params["schedule"]) == ("euler_ancestral", None)
    with Image.open(tmp_path / "e.png") as image:
        assert "Sampler: Euler a, CFG scale: 1.5" in image.text["parameters"]


def test_the_installed_console_script_lists_the_samplers():
    """The `latentdiff` console script of the installed package (what CI installs): behaviour it has had since
    before this change."""
    script = shutil.which("latentdiff")
    assert script is not None, "the latentdiff console script is not installed"
    out = subprocess.run([script, "models"], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("samplers: "))
    assert {"ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "euler", "euler_ancestral", "heun", "lms", "plms", "dpm_2",
            "dpmpp_sde", "dpmpp_3m_sde"} <= set(line.removeprefix("samplers: ").split(", "))


def test_the_command_starts_without_torch():
    """The sampler tables import torch: they are imported where a sampler is named, not when the command starts
    (an argument error stays instant)."""
    code = "import sys, latentdiff.cli.main, latentdiff.cli.generate_a1111; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr

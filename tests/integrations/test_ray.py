"""latentdiff.integrations.ray: the Ray Data batch predictor, called directly and on a local Ray instance.

The reference for every image is the Python API on the same seed: `pipe(prompt, generator=Generator().manual_seed
(seed))` with the predictor's settings. Rows made one by one (batch_images=False) must give those pixels exactly;
rows made in one batched call may differ by 1/255 (a batched matrix product rounds differently).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.diffusion.samplers import switch_sampler
from latentdiff.diffusion.samplers.names import resolve_sampler
from latentdiff.errors import ConfigError, InputError
from latentdiff.integrations import ray as ray_integration
from latentdiff.integrations.ray import LatentDiffusionPredictor
from tests._support import load_script

pytestmark = pytest.mark.usefixtures("one_thread")   # Ray's actors run one thread too (OMP_NUM_THREADS=1)
STEPS, GUIDANCE = 4, 1.5     # 1.5: shapes-64's own guidance (its latentdiff_generate.json), the predictor's default
PROMPTS = ["a red circle on the left, blue background", "a blue square at the top, white background",
           "a yellow triangle in the center, black background"]


@pytest.fixture(scope="module")
def pipe():
    from latentdiff import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")


def reference(pipe, prompt: str, seed: int, negative: str | None = None, steps: int = STEPS) -> np.ndarray:
    image = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=GUIDANCE,
                 generator=torch.Generator().manual_seed(seed), progress=False).images[0]
    return np.asarray(image)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def recorded(png: bytes) -> dict:
    return json.loads(Image.open(io.BytesIO(png)).text["latentdiff"])


def load_example():
    return load_script("examples/ray_batch.py", "ray_batch_example")


# ---- the predictor called directly (no Ray) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return LatentDiffusionPredictor(steps=STEPS, seed=100, batch_images=False, device="cpu",
                                    output_dir=tmp_path_factory.mktemp("direct"))


def test_direct_call_gives_the_python_api_images(predictor, pipe):
    batch = {"prompt": np.array(PROMPTS, dtype=object), "seed": np.array([7, 8, 9]),
             "negative_prompt": np.array([None, "red", None], dtype=object), "steps": np.array([None, None, 6])}
    out = predictor(batch)
    assert list(out["seed"]) == [7, 8, 9] and list(out["prompt"]) == PROMPTS      # the batch comes back, plus
    for i, (prompt, negative, steps) in enumerate([(PROMPTS[0], None, 4), (PROMPTS[1], "red", 4),
                                                   (PROMPTS[2], None, 6)]):
        np.testing.assert_array_equal(pixels(out["image"][i]), reference(pipe, prompt, 7 + i, negative, steps))
        params = recorded(out["image"][i])
        assert (params["prompt"], params["seed"], params["steps"], params["negative"]) == (prompt, 7 + i, steps,
                                                                                           negative)
        assert (params["guidance"], params["sampler"], params["model"]) == (GUIDANCE, "ddim", "latentdiff/shapes-64")
        assert f"Seed: {7 + i}," in Image.open(io.BytesIO(out["image"][i])).text["parameters"]
        path = Path(out["path"][i])
        assert path.name == f"{7 + i}.png" and path.read_bytes() == out["image"][i]
    assert not [p for p in path.parent.iterdir() if p.suffix != ".png"]     # no temporary files left


def test_seeds_from_the_base_seed_and_id_in_a_pandas_batch(predictor, pipe):
    import pandas

    out = predictor(pandas.DataFrame({"id": [3, 5], "prompt": PROMPTS[:2]}))
    assert isinstance(out, pandas.DataFrame) and list(out["seed"]) == [103, 105]
    np.testing.assert_array_equal(pixels(out["image"][1]), reference(pipe, PROMPTS[1], 105))
    assert Path(out["path"][1]).name == "000005-105.png"


@pytest.mark.parametrize("batch, message", [
    ({"text": np.array(["a red circle"]), "seed": np.array([1])}, "no 'prompt' column"),
    ({"prompt": np.array(["a red circle"])}, "needs a 'seed' column or an id column"),
    ({"prompt": np.array([""]), "seed": np.array([1])}, "non-empty string"),
    ({"prompt": np.array(["a red circle"]), "seed": np.array([-1])}, "0 <= seed"),
], ids=["no-prompt", "no-seed-or-id", "empty-prompt", "negative-seed"])
def test_bad_batches_are_refused_by_name(predictor, batch, message):
    with pytest.raises(InputError, match=message):
        predictor(batch)


@pytest.mark.parametrize("options, message", [
    ({"dtype": "float8"}, "unknown dtype"), ({"model": "/no/such/folder"}, "no such model"),
    ({"seed": -3}, "0 <= seed"),
], ids=["dtype", "model", "seed"])
def test_bad_options_are_refused_before_loading(options, message):
    with pytest.raises(InputError, match=message):
        LatentDiffusionPredictor(**options)


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)     # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "latentdiff\[ray\]"'):
        ray_integration.import_ray()
    with pytest.raises(ConfigError, match="Ray is not installed"):
        ray_integration.generate_dataset(["a red circle"])


def test_importing_the_module_does_not_import_ray():
    import subprocess

    code = ("import sys, latentdiff.integrations.ray as m; assert 'ray' not in sys.modules, 'ray imported'; "
            "print(m.LatentDiffusionPredictor.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(latentdiff.__file__).parents[1])})
    assert done.returncode == 0 and done.stdout.strip() == "LatentDiffusionPredictor", done.stderr


# ---- on a local Ray instance ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    src = str(Path(latentdiff.__file__).parents[1])     # the workers import the latentdiff under test
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def example():
    return load_example()


def read_rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return sorted(pq.read_table(str(folder)).to_pylist(), key=lambda row: row["id"])


def test_example_rows_are_the_python_api_images(local_ray, example, pipe, tmp_path):
    """batch_images=False: every Parquet row's PNG is bit-identical to the Python API's image for its seed."""
    example.generate(tmp_path, count=4, steps=STEPS, seed=40, batch_size=4, batch_images=False)
    rows = read_rows(tmp_path / "parquet")
    assert [row["id"] for row in rows] == list(range(4)) and [row["seed"] for row in rows] == list(range(40, 44))
    assert [row["prompt"] for row in rows] == example.shape_prompts(4) and "path" not in rows[0]
    for row in rows:
        np.testing.assert_array_equal(pixels(row["image"]), reference(pipe, row["prompt"], row["seed"]))
        assert recorded(row["image"])["seed"] == row["seed"]
        assert (tmp_path / "png" / f"{row['id']:06d}-{row['seed']}.png").read_bytes() == row["image"]
    assert len(list((tmp_path / "png").iterdir())) == 4


def test_batched_rows_within_one_level(local_ray, pipe, tmp_path):
    """generate_dataset, batch_images=True (one call per Ray batch of up to 4 rows): each image within 1/255 of its
    seed's image alone; the Parquet files hold the same rows."""
    prompts = PROMPTS + PROMPTS[:2]
    images = ray_integration.generate_dataset(prompts, output=tmp_path / "parquet", seed=70, batch_size=4,
                                              steps=STEPS)
    rows = sorted(images.take_all(), key=lambda row: row["id"])
    assert [(row["prompt"], row["seed"]) for row in rows] == [(p, 70 + i) for i, p in enumerate(prompts)]
    assert [row["image"] for row in read_rows(tmp_path / "parquet")] == [row["image"] for row in rows]
    differing = 0
    for row in rows:
        diff = np.abs(pixels(row["image"]).astype(int) - reference(pipe, row["prompt"], row["seed"]).astype(int))
        assert diff.max() <= 1, row["id"]
        differing += int((diff > 0).sum())
    batches = [recorded(row["image"])["batch"] for row in rows]
    assert max(batches) > 1, batches     # some rows were made together
    print(f"{differing} pixel values of {len(rows) * 64 * 64 * 3} off by one")


def test_a_missing_column_fails_the_ray_job_with_the_message(local_ray):
    ds = local_ray.data.from_items([{"text": "a red circle", "seed": 1}])
    mapped = ds.map_batches(LatentDiffusionPredictor, fn_constructor_kwargs={"steps": STEPS}, batch_size=1,
                            batch_format="numpy", num_gpus=0,
                            compute=local_ray.data.ActorPoolStrategy(size=1))
    with pytest.raises(Exception, match="the batch has no 'prompt' column") as caught:
        mapped.materialize()
    assert "InputError" in str(caught.value) or isinstance(caught.value, InputError)


# ---- the model folder's sampler by any name, as `latentdiff generate` applies it -----------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A copy of shapes-64 whose latentdiff_generate.json a test rewrites (`storing`)."""
    copy = tmp_path_factory.mktemp("folder") / "model"
    shutil.copytree(Path(latentdiff.__file__).parent / "builtin" / "shapes-64", copy)
    return copy


def storing(folder: Path, **settings) -> str:
    """The folder, its latentdiff_generate.json storing `settings` (and shapes-64's guidance and size)."""
    stored = {"guidance_scale": GUIDANCE, "height": 64, "width": 64, **settings}
    (folder / "latentdiff_generate.json").write_text(json.dumps(stored))
    return str(folder)


def generate_sampler(pipe, name: str, schedule: str | None = None, options: dict | None = None):
    """The sampler `latentdiff generate` runs for a sampler name and schedule (cli/generate_a1111.settle_sampler, then
    cli/generate.load_pipeline): the registered sampler switched from the folder's, its schedule, then the settings
    the name fixes, else the stored ones."""
    resolved = resolve_sampler(name, schedule=schedule)
    sampler = switch_sampler(pipe.sampler, resolved.name)
    if resolved.schedule is not None and hasattr(sampler, "sigma_schedule"):
        sampler = sampler.with_options(sigma_schedule=resolved.schedule)
    return sampler.with_options(**(dict(resolved.options) or options or {}))


@pytest.mark.parametrize("name", ["DPM2 a", "DPM++ 2M Exponential", "Euler", "KDPM2DiscreteScheduler"])
def test_the_folders_sampler_by_an_a1111_or_diffusers_name(folder, pipe, name):
    """A folder's stored sampler may be any name `latentdiff generate` takes: an A1111 label brings its schedule and
    the settings it fixes (Ray applied none of them, and refused A1111's labels)."""
    predictor = LatentDiffusionPredictor(model=storing(folder, sampler=name), steps=STEPS, seed=7,
                                         batch_images=False, device="cpu")
    want = generate_sampler(pipe, name)
    assert predictor.pipe.sampler == want and type(want) is not type(pipe.sampler)
    out = predictor({"id": np.array([0]), "prompt": np.array([PROMPTS[0]])})
    base = pipe.sampler
    pipe.sampler = want
    try:
        assert np.array_equal(pixels(out["image"][0]), reference(pipe, PROMPTS[0], 7))
    finally:
        pipe.sampler = base
    params = recorded(out["image"][0])       # as `latentdiff generate` records them: --from makes the same image
    assert (params["sampler"], params["schedule"]) == (want.registry_name, getattr(want, "sigma_schedule", None))
    assert params.get("sampler_options") == (dict(resolve_sampler(name).options) or None)


def test_stored_schedule_and_options_apply_as_generate_applies_them(pipe):
    """folder_sampler over what `latentdiff generate` reads (a PNG's keys): a registered name's stored schedule and
    options are applied; a `sampler` argument replaces the sampler and drops both; a stored schedule on a sampler
    without one is dropped with a warning."""
    stored = {"sampler": "dpmpp_2m_sde", "schedule": "karras", "sampler_options": {"noise_type": "brownian"}}
    sampler, options = ray_integration.folder_sampler(pipe, None, stored, where="x.json")
    assert sampler == generate_sampler(pipe, "dpmpp_2m_sde", "karras", {"noise_type": "brownian"})
    assert options == {"noise_type": "brownian"}
    sampler, options = ray_integration.folder_sampler(pipe, "dpmpp_2m_sde", stored, where="x.json")
    assert (sampler, options) == (switch_sampler(pipe.sampler, "dpmpp_2m_sde"), None)
    sampler, _ = ray_integration.folder_sampler(pipe, "DPM++ 2M SDE", stored, where="x.json")
    assert sampler == generate_sampler(pipe, "DPM++ 2M SDE")
    sampler, _ = ray_integration.folder_sampler(pipe, None, {"schedule": "karras", "sampler": "euler"}, where="x")
    assert sampler.sigma_schedule == "karras"
    with pytest.warns(UserWarning, match="karras schedule is not implemented for the DDIMSampler"):
        sampler, _ = ray_integration.folder_sampler(pipe, None, {"sampler": "ddim", "schedule": "karras"}, where="x")
    assert sampler == pipe.sampler


@pytest.mark.parametrize("sampler, stored, key", [
    (None, {"sampler": "dpmpp_2m_sde", "sampler_options": {"noise_type": "pink"}}, "x.json: sampler_options"),
    (None, {"sampler": "dpmpp_2m_sde", "sampler_options": {"warp": 9}}, "x.json: sampler_options"),
    (None, {"sampler": "dpmpp_2m_sde", "sampler_options": [1]}, "x.json: sampler_options"),
    (None, {"sampler": "warp_drive"}, "x.json: sampler"), (None, {"sampler": "euler", "schedule": "rho7"},
                                                           "x.json: schedule"),
    ("Euler a Karras", {}, "sampler"), ("warp_drive", {}, "sampler"),
])
def test_bad_sampler_settings_name_the_argument_or_the_files_key(pipe, sampler, stored, key):
    with pytest.raises(InputError) as caught:
        ray_integration.folder_sampler(pipe, sampler, stored, where="x.json")
    assert caught.value.where == key


def test_a_bad_stored_sampler_is_refused_naming_the_folders_file(folder):
    with pytest.raises(InputError) as caught:
        LatentDiffusionPredictor(model=storing(folder, sampler="warp_drive"), device="cpu")
    assert caught.value.where.endswith("latentdiff_generate.json: sampler")

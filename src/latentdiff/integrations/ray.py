"""Batch generation on Ray Data: `LatentDiffusionPredictor`, a callable class for `Dataset.map_batches`.

    import ray
    from latentdiff.integrations.ray import LatentDiffusionPredictor

    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    images = ds.map_batches(LatentDiffusionPredictor, fn_constructor_kwargs={"model": "latentdiff/shapes-64"},
                            batch_size=8, num_gpus=1,                  # num_gpus=0 on a CPU-only cluster
                            compute=ray.data.ActorPoolStrategy(size=4))   # Ray < 2.51: or concurrency=4
    images.write_parquet("out/")                       # columns: id, prompt, seed, image (PNG bytes)

Ray makes the pool's actors (4 here); each loads the pipeline once in `__init__` (on the GPU Ray gave it, else on
the CPU) and then turns batches of rows into images. (`concurrency=N` does the same; Ray 2.51 deprecated it for
`compute`.) Example: examples/ray_batch.py. A row's image is the one the Python API gives for its seed:

    pipe(prompt, negative_prompt=..., num_inference_steps=..., guidance_scale=...,
         generator=torch.Generator().manual_seed(seed)).images[0]

Rows of a batch that share steps, guidance and size are made in one pipeline call, with one generator per row:
the noise of each image is then exactly its own, but a batched matrix product may round differently from a batch
of one, so a pixel can differ by 1/255 from the image made alone. `batch_images=False` makes one call per row:
bit-identical to the Python API, at the cost of throughput.

Columns read (numpy or pandas batches, `batch_format="numpy"` or `"pandas"`):
    prompt            required
    negative_prompt, steps, guidance_scale, height, width
                      optional, per row; a missing column or a null value takes the predictor's setting
    seed              optional; without it, row seed = `seed` (the predictor's base seed) + the row's `id`
                      (the column named by `id_column`); with neither column the batch is refused, since
                      Ray's batches carry no row numbers and a seed must not depend on how rows were batched
Columns added: `image` (PNG bytes whose text chunks record the settings, as `latentdiff generate` writes them),
`seed` (int), and with `output_dir` also `path` (the PNG file written there, atomically, named `{id:06d}-{seed}.png`
with an id column, else `{seed}.png`).

Ray is optional (`pip install "latentdiff[ray]"`): this module imports it only when asked to pick a device inside
a Ray worker or to build a dataset (`generate_dataset`); a predictor called directly runs without it.
"""
from __future__ import annotations

import math
import os
import sys
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..builtin import DEFAULT_MODEL, GENERATE_SETTINGS
from ..errors import ConfigError, InputError, UsageError
from ..version import __version__

INSTALL_HINT = 'pip install "latentdiff[ray]"'
PER_ROW = ("negative_prompt", "steps", "guidance_scale", "height", "width")   # optional per-row columns
MAX_SEED = 2**63 - 1             # seeds are int64 in Arrow / Parquet


def import_ray() -> Any:
    """The `ray` module, or a latentdiff error that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError("Ray is not installed", where="latentdiff.integrations.ray", expected=INSTALL_HINT,
                          found=f"ImportError: {e}") from e
    return ray


def actor_device() -> str:
    """"cuda" when this process is a Ray worker that Ray gave a GPU (Ray then sets CUDA_VISIBLE_DEVICES so that
    its GPU is cuda:0), "cpu" in a worker without one; outside Ray, cuda when torch sees one."""
    import torch

    ray = sys.modules.get("ray")       # a Ray worker has imported it; a process that has not is not under Ray
    if ray is not None and ray.is_initialized():
        return "cuda" if ray.get_gpu_ids() else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class LatentDiffusionPredictor:
    """One pipeline per Ray actor; `__call__` maps a batch of rows (prompt, ...) to their images (the columns: see
    the module docstring).

    model: a built-in name, a pipeline folder, a Hub id or a single .safetensors/.ckpt file (as `latentdiff
    generate --model`); steps, guidance_scale, negative_prompt, height, width: the defaults of the per-row columns
    (None: the model folder's latentdiff_generate.json, else the pipeline's own); sampler: a sampler by any name
    `latentdiff generate --sampler` takes (a registered name, an A1111 label with the settings it fixes, a diffusers
    class name; None: the model folder's stored sampler, by any of those names, applied as `latentdiff generate`
    applies it: `folder_sampler`); seed: the base seed of rows without a seed; device: None = the
    GPU Ray gave this actor, else the CPU; dtype: float32 | float16 | bfloat16; batch_images: one pipeline call for
    the compatible rows of a batch (False: one call per row, bit-identical to the Python API); output_dir: also
    write each PNG there."""

    def __init__(self, model: str = DEFAULT_MODEL, *, steps: int | None = None, guidance_scale: float | None = None,
                 negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
                 sampler: str | None = None, seed: int = 0, id_column: str = "id", device: str | None = None,
                 dtype: str = "float32", batch_images: bool = True, output_dir: str | os.PathLike | None = None):
        import torch

        from ..model_source import locate_model
        from ..pipelines.latent_diffusion import LatentDiffusionPipeline

        check_seed(seed, where="seed")
        try:
            source = locate_model(model)
        except UsageError as e:     # its messages name the CLI's --model flag
            raise InputError(e.message, where="model", expected=e.expected, found=e.found) from None
        torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        if not isinstance(torch_dtype, torch.dtype):
            raise InputError("unknown dtype", where="dtype", expected="float32, float16 or bfloat16", found=dtype)
        self.device = device or actor_device()
        load: dict[str, Any] = {"torch_dtype": torch_dtype, "device": self.device}
        where = source.name if source.kind == "hub" else source.path
        self.pipe: Any      # a LatentDiffusionPipeline (or the subclass a single file makes)
        if source.kind == "single_file":
            self.pipe = LatentDiffusionPipeline.from_single_file(where, **load)
        else:
            self.pipe = LatentDiffusionPipeline.from_pretrained(where, **load)
        stored = source.settings     # the model folder's latentdiff_generate.json, as `latentdiff generate` reads it
        self.pipe.sampler, self.sampler_options = folder_sampler(
            self.pipe, sampler, stored, where=f"{source.name}: {GENERATE_SETTINGS}")
        self.defaults: dict[str, Any] = {
            "negative_prompt": negative_prompt if negative_prompt is not None else stored.get("negative"),
            "steps": int(steps or stored.get("steps") or 50),
            "guidance_scale": float(guidance_scale if guidance_scale is not None else stored.get("guidance", 7.5)),
            "height": height or stored.get("height"), "width": width or stored.get("width")}
        self.model, self.dtype, self.base_seed, self.id_column = source.name, dtype, seed, id_column
        self.batch_images = batch_images
        self.output_dir = None if output_dir is None else Path(output_dir)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: Any) -> Any:
        """batch: dict of column -> numpy array (batch_format="numpy") or a pandas DataFrame; returns the same
        kind, with the columns `image`, `seed` (and `path`) added."""
        is_frame = hasattr(batch, "to_dict") and hasattr(batch, "columns")
        columns = {name: np.asarray(batch[name]) for name in batch.columns} if is_frame else dict(batch)
        rows = self.rows(columns)
        images: list[bytes | None] = [None] * len(rows)
        for group in self.groups(rows):
            for i, png in zip(group, self.render([rows[i] for i in group]), strict=True):
                images[i] = png
        out = dict(columns)
        out["image"] = np.array(images, dtype=object)
        out["seed"] = np.array([row["seed"] for row in rows], dtype=np.int64)
        if self.output_dir is not None:
            out["path"] = np.array([self.write(row, png) for row, png in zip(rows, images, strict=True)], dtype=object)
        if is_frame:
            import pandas

            return pandas.DataFrame(out)
        return out

    # ---- the rows of a batch --------------------------------------------------------------------------------
    def rows(self, columns: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One dict per row: prompt, seed, id (or None) and the per-row settings, defaults filled in, checked."""
        if "prompt" not in columns:
            raise InputError("the batch has no 'prompt' column", where="batch", expected="a 'prompt' column",
                             found=f"columns {sorted(columns)}")
        prompts = list(columns["prompt"])
        ids = list(columns[self.id_column]) if self.id_column in columns else None
        if "seed" not in columns and ids is None:
            raise InputError("a row's seed needs a 'seed' column or an id column", where="batch",
                             expected=f"a 'seed' column, or an {self.id_column!r} column (seed = base seed + id)",
                             found=f"columns {sorted(columns)}")
        rows = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt:
                raise InputError("a prompt must be a non-empty string", where=f"batch row {i}, column 'prompt'",
                                 expected="str", found=repr(prompt))
            row: dict[str, Any] = {"prompt": str(prompt), "id": None if ids is None else int(ids[i])}
            for name in PER_ROW:
                value = columns[name][i] if name in columns else None
                row[name] = self.defaults[name] if is_null(value) else value
            row["steps"], row["guidance_scale"] = int(row["steps"]), float(row["guidance_scale"])
            row["negative_prompt"] = None if row["negative_prompt"] is None else str(row["negative_prompt"])
            row["seed"] = self.seed_of(columns["seed"][i] if "seed" in columns else None, row["id"],
                                       where=f"batch row {i}, column 'seed'")
            rows.append(row)
        return rows

    def seed_of(self, seed: Any, row_id: int | None, *, where: str) -> int:
        """The row's seed, else the base seed + its id; checked (pandas hands integer columns with nulls over as
        floats: 7.0 is taken as 7)."""
        if is_null(seed):
            if row_id is None:
                raise InputError("this row has no seed and no id", where=where,
                                 expected=f"a seed, or an {self.id_column!r} column", found="null")
            seed = self.base_seed + row_id
        if isinstance(seed, float | np.floating) and float(seed).is_integer():
            seed = int(seed)
        check_seed(seed, where=where)
        return int(seed)

    def groups(self, rows: Sequence[dict[str, Any]]) -> list[list[int]]:
        """Indices of the rows one pipeline call makes: rows with equal steps, guidance and size together (with
        batch_images), else one row per call."""
        if not self.batch_images:
            return [[i] for i in range(len(rows))]
        keyed: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            keyed.setdefault((row["steps"], row["guidance_scale"], row["height"], row["width"]), []).append(i)
        return list(keyed.values())

    # ---- images ---------------------------------------------------------------------------------------------
    def render(self, rows: Sequence[dict[str, Any]]) -> list[bytes]:
        """One pipeline call for rows sharing steps, guidance and size; a generator per row seeded with its seed."""
        import torch

        from ..utils.images import png_bytes

        first = rows[0]
        negatives = [row["negative_prompt"] or "" for row in rows]
        generators = [torch.Generator().manual_seed(row["seed"]) for row in rows]
        images = self.pipe([row["prompt"] for row in rows],
                           negative_prompt=None if not any(negatives) else negatives,
                           num_inference_steps=first["steps"], guidance_scale=first["guidance_scale"],
                           height=first["height"], width=first["width"],
                           generator=generators[0] if len(rows) == 1 else generators, progress=False).images
        return [png_bytes(image, self.params(row, image, batch=len(rows)))
                for row, image in zip(rows, images, strict=True)]

    def params(self, row: Mapping[str, Any], image: Any, *, batch: int) -> dict[str, Any]:
        """What the PNG records: the keys `latentdiff generate` writes (utils.infotext reads them for A1111)."""
        sampler = self.pipe.sampler
        return {"prompt": row["prompt"], "negative": row["negative_prompt"], "seed": row["seed"],
                "steps": row["steps"], "guidance": row["guidance_scale"], "sampler": sampler.registry_name,
                "eta": getattr(sampler, "eta", None), "schedule": getattr(sampler, "sigma_schedule", None),
                "height": image.height, "width": image.width, "n": 1, "model": self.model, "dtype": self.dtype,
                "latentdiff": __version__, "batch": batch,
                **({"sampler_options": self.sampler_options} if self.sampler_options else {})}

    def write(self, row: Mapping[str, Any], png: bytes | None) -> str:
        """Write one PNG into output_dir atomically (a temporary file renamed into place); returns its path."""
        assert self.output_dir is not None and png is not None
        name = f"{row['seed']}.png" if row["id"] is None else f"{row['id']:06d}-{row['seed']}.png"
        path = self.output_dir / name
        tmp = path.with_name(f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(png)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return str(path)


def folder_sampler(pipe: Any, sampler: str | None, stored: Mapping[str, Any], *,
                   where: str) -> tuple[Any, dict[str, Any] | None]:
    """The predictor's sampler and the settings an A1111 label fixed (what the PNG records as `sampler_options`), as
    `latentdiff generate` makes them: `sampler` by name, else the stored sampler with the stored schedule and
    sampler_options (`stored`: the settings `latentdiff generate` reads, of which a folder's latentdiff_generate.json
    holds the sampler only; a schedule or options stored for the stored sampler are dropped when `sampler` replaces
    it; a stored schedule on a sampler without one is dropped with a warning, as A1111 ignores it); Align Your
    Steps takes the pipeline's table. An InputError names the argument or the file's key."""
    from ..diffusion.samplers import switch_sampler
    from ..diffusion.samplers.names import resolve_sampler, resolve_schedule, schedule_options

    given = sampler is not None
    name = sampler if given else stored.get("sampler")
    schedule, options = (None, None) if given else (stored.get("schedule"), stored.get("sampler_options"))
    current = pipe.sampler
    try:
        if name is None:
            chosen = None if schedule is None else resolve_schedule(schedule, where=f"{where}: schedule")
        else:
            resolved = resolve_sampler(name, schedule=schedule, where="sampler" if given else f"{where}: sampler",
                                       schedule_where=f"{where}: schedule")
            current, chosen = switch_sampler(current, resolved.name), resolved.schedule
            options = dict(resolved.options) or options
    except UsageError as e:
        raise InputError(e.message, where=e.where, expected=e.expected, found=e.found) from None
    if chosen not in (None, "default") and not hasattr(current, "sigma_schedule"):
        if given:           # "Euler a Karras": a name that asks for a schedule its sampler has not
            raise InputError(f"the {type(current).__name__} sampler has no schedule to set", where="sampler",
                             expected="a sampler with a schedule, or its name without one", found=sampler)
        warnings.warn(f"{where}: the {chosen} schedule is not implemented for the {type(current).__name__} sampler: "
                      "using its own timesteps", UserWarning, stacklevel=3)
    elif chosen is not None and hasattr(current, "sigma_schedule"):
        current = current.with_options(**schedule_options(chosen, pipeline=pipe))
    if options:
        try:
            current = current.with_options(**options)
        except (ConfigError, TypeError, ValueError) as e:
            raise InputError(f"bad sampler options for {type(current).__name__} ({str(e)[:200]})",
                             where=f"{where}: sampler_options",
                             expected="an object of settings the sampler has, with values it takes",
                             found=repr(options)[:120]) from None
    return current, (dict(options) if options else None)


def is_null(value: Any) -> bool:
    """None, or a float NaN (how pandas and Arrow hand over a missing number)."""
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


def check_seed(seed: Any, *, where: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) <= MAX_SEED:
        raise InputError("a seed must be an integer", where=where, expected=f"0 <= seed <= {MAX_SEED}",
                         found=repr(seed))


def generate_dataset(prompts: Iterable[str], *, model: str = DEFAULT_MODEL, output: str | os.PathLike | None = None,
                     image_dir: str | os.PathLike | None = None, seed: int = 0, batch_size: int = 4,
                     concurrency: int = 1, num_gpus: float | None = None, **options: Any) -> Any:
    """Prompts -> a materialized Ray dataset of id, prompt, seed, image (PNG bytes); written as Parquet files to
    `output` and PNG files to `image_dir` when given. Row i has seed `seed + i`. num_gpus: per actor; None: 1 when
    the cluster has GPUs, else 0. `options`: the other LatentDiffusionPredictor options (steps, ...)."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init()
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    items = [{"id": i, "prompt": prompt} for i, prompt in enumerate(prompts)]
    kwargs = {"model": model, "seed": seed, "output_dir": None if image_dir is None else str(image_dir), **options}
    ds = ray.data.from_items(items).map_batches(LatentDiffusionPredictor, fn_constructor_kwargs=kwargs,
                                                batch_size=batch_size, batch_format="numpy", num_gpus=num_gpus,
                                                compute=ray.data.ActorPoolStrategy(size=concurrency)).materialize()
    if output is not None:
        ds.write_parquet(str(output))
    return ds

"""What both training stages share: accelerate setup, optimizers and schedule, gradient averaging,
checkpoints that resume exactly, logging, and the loop itself (`Trainer.fit`).

Exactness on any number of processes. Everything random in a step (noise, timesteps, conditioning
dropout, posterior samples) is drawn for the *global* batch from a generator seeded by (seed, step,
micro-step), and each process takes its slice (`StepRandom`); the data sampler deals global batches the
same way. So P processes with batch B/P each compute the same per-sample quantities as one process with
batch B, and a resumed run the same as an uninterrupted one. Gradients are averaged explicitly after the
last micro-batch of a step (`average_gradients`) rather than by DDP wrapping: this works for any graph (the
first stage's discriminator runs twice per backward, its adaptive weight calls autograd.grad), needs no
no_sync bookkeeping for accumulation over several modules, and leaves model objects unwrapped. The cost is
that communication does not overlap the backward pass.
Checkpoints are in `checkpoints.py`; `run.train_from_file` (the CLI's entry) builds a stage's trainer.
"""
from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hub
from ..errors import CheckpointError, ConfigError
from .checkpoints import (
    CONFIG_FILE,
    Checkpoints,
    check_resumable,
    load_modules,
    output_lock,
    read_json_file,
    read_progress,
    restore_accelerate_state,
    save_modules,
)
from .config import OptimConfig, TrainConfig
from .ema import EMA

BUCKET_BYTES = 64 * 2**20  # gradients are all-reduced in flat buckets of about this size
_notes_shown: dict[str, bool] = {}  # one-time notes already printed by this process


# ---- accelerate, optimizers, schedule ----------------------------------------------------------------
def make_accelerator(config: TrainConfig) -> Any:
    """An Accelerator for the run: CPU / one GPU / many (under `accelerate launch`), with autocast."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    settings = dict(cpu=config.train.cpu, mixed_precision=config.train.mixed_precision,
                    project_dir=config.train.output_dir)
    try:
        accelerator = Accelerator(**settings)
    except ValueError as e:
        # accelerate keeps one AcceleratorState per process; a second run in the same single process (a
        # notebook, a test session) with another precision must replace it. Never under a launcher.
        if "already been initialized" not in str(e) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(**settings)
    if accelerator.device.type == "cpu" and config.train.mixed_precision == "fp16":
        raise ConfigError("fp16 autocast needs a GPU (on a CPU it would silently run in fp32)",
                          where="train.mixed_precision", expected="'bf16' or 'no' on a CPU", found="fp16")
    return accelerator


def learning_rate(optim: OptimConfig, *, batch_size: int, accumulation: int) -> float:
    """The peak learning rate: LDM's scaled rate (base rate x images per update) when scale_lr."""
    return optim.learning_rate * (batch_size * accumulation if optim.scale_lr else 1)


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak rate at optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "constant":
        return 1.0
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine


def make_adamw(params: Sequence[nn.Parameter], optim: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters) where every parameter is a float tensor on the CPU or a
    CUDA device: the per-parameter loop it replaces costs host time per step that bounds small models on a GPU
    (the figure for the built-in LDM: benchmarks/RESULTS.md). Same update rule; torch's default elsewhere."""
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=optim.betas, weight_decay=optim.weight_decay, eps=optim.eps,
                             fused=True if fused else None)


def average_gradients(params: Sequence[nn.Parameter], accelerator: Any) -> None:
    """Mean of every gradient over the processes, in flat buckets (a missing gradient counts as zero)."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads: list[torch.Tensor] = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for i, grad in enumerate(grads):
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
        if size >= BUCKET_BYTES or i == len(grads) - 1:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= accelerator.num_processes
            for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                g.copy_(reduced)
            bucket, size = [], 0


def optimizer_step(accelerator: Any, optimizer: Any, params: Sequence[nn.Parameter],
                   max_grad_norm: float | None) -> torch.Tensor | None:
    """Average the gradients over processes, unscale (fp16), clip, step, zero. -> the gradient norm (or None)."""
    average_gradients(params, accelerator)
    norm = None
    if max_grad_norm is not None:
        if accelerator.scaler is not None:
            accelerator.scaler.unscale_(optimizer.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


class StepRandom:
    """Random numbers for one micro-step, drawn for the global batch and sliced to this process.

    Seeded by (seed, step, micro-step, stream), so they are the same whatever the number of processes and
    whether the run was resumed; `stream` separates independent draws of one step (noise, timesteps ...).
    """

    def __init__(self, seed: int, step: int, micro: int, *, device: torch.device, num_processes: int,
                 process_index: int):
        self.key = (seed, step, micro)
        self.device = device if device.type != "mps" else torch.device("cpu")
        self.target, self.num_processes, self.process_index = device, num_processes, process_index

    def _generator(self, stream: int) -> torch.Generator:
        from .data import mix_seed

        return torch.Generator(device=self.device).manual_seed(mix_seed(*self.key, stream))

    def _local(self, full: torch.Tensor) -> torch.Tensor:
        b = full.shape[0] // self.num_processes
        return full[self.process_index * b:(self.process_index + 1) * b].to(self.target)

    def randn(self, local_shape: Sequence[int], *, stream: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = (local_shape[0] * self.num_processes, *local_shape[1:])
        return self._local(torch.randn(shape, generator=self._generator(stream), device=self.device, dtype=dtype))

    def rand(self, local_batch: int, *, stream: int) -> torch.Tensor:
        return self._local(torch.rand(local_batch * self.num_processes, generator=self._generator(stream),
                                      device=self.device))

    def randint(self, high: int, local_batch: int, *, stream: int) -> torch.Tensor:
        return self._local(torch.randint(0, high, (local_batch * self.num_processes,),
                                         generator=self._generator(stream), device=self.device))


def enable_gradient_checkpointing(module: nn.Module, block_types: tuple[type, ...]) -> int:
    """Recompute the activations of every block of `block_types` in the backward pass (less memory; one more
    forward pass of those blocks per step). Blocks must be pure functions of their inputs. -> the number of blocks
    wrapped."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    def run(forward: Callable, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    count = 0
    for block in module.modules():
        if isinstance(block, block_types) and "forward" not in vars(block):
            block.forward = partial(run, block.forward)  # an instance attribute: the class stays untouched
            count += 1
    return count


# ---- logging --------------------------------------------------------------------------------------
class MetricLog:
    """Loss curves to `logs/losses.csv` (step, wall time, name, value) and to TensorBoard when installed."""

    def __init__(self, folder: Path, *, csv_file: bool = True, tensorboard: bool = True, enabled: bool = True):
        self.folder, self.enabled = folder, enabled
        self.csv_path = folder / "losses.csv" if csv_file else None
        self.writer = None
        self.note = None
        if enabled and tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tensorboard"))
            else:
                self.note = "tensorboard is not installed: losses go to the CSV only (pip install tensorboard)"

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (written by a run that was killed after its last checkpoint)."""
        if not (self.enabled and self.csv_path and self.csv_path.is_file()):
            return
        with open(self.csv_path, newline="") as f:
            rows = [r for r in csv.reader(f)]
        kept = rows[:1] + [r for r in rows[1:] if int(r[0]) <= step]
        tmp = self.csv_path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, self.csv_path)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.csv_path is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            new = not self.csv_path.is_file()
            with open(self.csv_path, "a", newline="") as f:
                out = csv.writer(f)
                if new:
                    out.writerow(["step", "wall_time", "name", "value"])
                now = f"{time.time():.3f}"
                out.writerows([step, now, k, f"{v:.6g}"] for k, v in sorted(values.items()))
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- the loop ----------------------------------------------------------------------------------------
class Trainer:
    """The loop both stages share. A stage builds its modules in __init__ (after `super().__init__`), fills
    `self.modules` (trained, checkpointed), `self.train_set`, calls `add_optimizer`, optionally sets
    `self.ema`, and implements:

        train_step(micro_batches) -> {name: 0-d tensor}   one optimizer update over the accumulated batches
        evaluate(step)                                    samples / validation (main process; no global RNG)
        export() -> Path                                  the final model folder
    """

    stage = "train"

    def __init__(self, config: TrainConfig, *, accelerator: Any = None):
        from accelerate.utils import set_seed

        from .data import local_batch_size

        self.config = config
        self.accelerator = accelerator or make_accelerator(config)
        self.local_batch = local_batch_size(config.train.batch_size, self.accelerator.num_processes)
        set_seed(config.train.seed)  # the same initial weights on every process
        self.device = self.accelerator.device
        self.output_dir = Path(config.train.output_dir)
        self.checkpoints = Checkpoints(self.output_dir / "checkpoints", keep_last=config.checkpoint.keep_last)
        self.log = MetricLog(self.output_dir / "logs", csv_file=config.logging.csv,
                             tensorboard=config.logging.tensorboard, enabled=self.accelerator.is_main_process)
        self.step = self.batches = self.skipped = 0
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, tuple[Any, list[nn.Parameter], float]] = {}
        self.ema: EMA | None = None
        self.train_set: Any = None
        self._evaluated = -1  # the step of the last evaluation

    # ---- pieces for the stages ----------------------------------------------------------------
    def add_optimizer(self, name: str, params: Iterable[nn.Parameter], optim: OptimConfig) -> Any:
        """AdamW over the trainable `params`, prepared by accelerate (so save_state holds its state)."""
        t = self.config.train
        peak = learning_rate(optim, batch_size=t.batch_size, accumulation=t.gradient_accumulation_steps)
        params = [p for p in params if p.requires_grad]
        optimizer = self.accelerator.prepare(make_adamw(params, optim, peak))
        self.optimizers[name] = (optimizer, params, peak)
        return optimizer

    def step_optimizer(self, name: str, *, max_grad_norm: float | None) -> torch.Tensor | None:
        optimizer, params, _ = self.optimizers[name]
        return optimizer_step(self.accelerator, optimizer, params, max_grad_norm)

    def random(self, micro: int) -> StepRandom:
        acc = self.accelerator
        return StepRandom(self.config.train.seed, self.step, micro, device=self.device,
                          num_processes=acc.num_processes, process_index=acc.process_index)

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, step: int) -> None:
        """Samples or validation at `step`; the default does nothing."""

    def export(self) -> Path:
        raise NotImplementedError

    # ---- the loop -------------------------------------------------------------------------------
    def export_folder(self) -> Path:
        """Where `export` writes: checkpoint.export_dir, else OUTPUT_DIR/<export_name>."""
        return Path(self.config.checkpoint.export_dir or self.output_dir / self.export_name)

    export_name = "model"   # the stages name their export folder ("pipeline", "autoencoder")

    def fit(self) -> Path:
        """Train to train.max_steps (resuming when asked), checkpoint, evaluate, export. -> the export folder.
        The main process holds OUTPUT_DIR/.lock throughout: a second run into the same folder is refused."""
        with output_lock(self.output_dir, enabled=self.accelerator.is_main_process):
            self._start()
            self._train()
            return self._finish()

    def _start(self) -> None:
        """Prepare the output folder and resume: from the checkpoint asked for, or fresh in a folder with none
        (and no earlier export, unless train.overwrite)."""
        acc, cfg = self.accelerator, self.config
        if acc.is_main_process:
            self.checkpoints.clean_partial()
        acc.wait_for_everyone()
        resume = self.checkpoints.resolve(cfg.checkpoint.resume)
        earlier = self.checkpoints.complete()
        if resume is None and earlier:
            raise CheckpointError("the output folder holds checkpoints of an earlier run; a fresh start would mix "
                                  "with them", where=str(self.checkpoints.root),
                                  expected="checkpoint.resume: latest (to continue), or another train.output_dir",
                                  found=[p.name for p in earlier])
        export = self.export_folder()
        if resume is None and export.exists() and not cfg.train.overwrite:
            raise CheckpointError("the output folder holds the exported model of an earlier run; a fresh run would "
                                  "replace it", where=str(export),
                                  expected="another train.output_dir, or --overwrite (train.overwrite: true) to "
                                           "replace it", found="an existing export")
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            hub.write_json(cfg.to_dict(), self.output_dir / CONFIG_FILE)
        acc.wait_for_everyone()
        if resume is not None:
            self.load_checkpoint(resume)
        self.log.truncate_after(self.step)
        if self.log.note and not _notes_shown.get(self.log.note):
            _notes_shown[self.log.note] = True
            acc.print(f"latentdiff: {self.log.note}")

    def _train(self) -> None:
        """The steps from the current one to max_steps: log, checkpoint, evaluate on their schedules."""
        from .data import ResumableBatchSampler, make_loader

        acc, cfg = self.accelerator, self.config
        sampler = ResumableBatchSampler(len(self.train_set), global_batch=cfg.train.batch_size,
                                        num_processes=acc.num_processes, process_index=acc.process_index,
                                        seed=cfg.train.seed, start=self.batches)
        loader = iter(make_loader(self.train_set, sampler, num_workers=cfg.data.num_workers,
                                  pin_memory=self.device.type == "cuda"))
        with _progress_bar(cfg, initial=self.step, enabled=acc.is_main_process) as bar:
            while self.step < cfg.train.max_steps:
                self._set_learning_rates()
                micro = [next(loader) for _ in range(cfg.train.gradient_accumulation_steps)]
                self.batches += len(micro)
                self.skipped += sum(b["skipped"] for b in micro)
                logs = self.train_step(micro)
                self.step += 1
                bar.update(1)
                if self.step % cfg.logging.every_n_steps == 0 or self.step == cfg.train.max_steps:
                    values = self._reduce(logs)
                    self.log.log(self.step, values)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k.startswith("loss")})
                if self.step % cfg.checkpoint.every_n_steps == 0 or self.step == cfg.train.max_steps:
                    self.save_checkpoint()
                if cfg.sample.every_n_steps and self.step % cfg.sample.every_n_steps == 0:
                    self._evaluate_all()
        del loader  # stops the loader's workers

    def _finish(self) -> Path:
        """A last evaluation (unless this step had one), the export, the optional Hub upload."""
        acc, cfg = self.accelerator, self.config
        if self._evaluated != self.step:
            self._evaluate_all()
        skipped = int(acc.reduce(torch.tensor(self.skipped, device=self.device), "sum"))
        if skipped:
            acc.print(f"latentdiff: {skipped} unreadable image load(s) were skipped (see the warnings)")
        folder = self.export()
        if cfg.checkpoint.push_to_hub and acc.is_main_process:
            hub.push_folder_to_hub(folder, cfg.checkpoint.push_to_hub, private=cfg.checkpoint.hub_private)
        acc.wait_for_everyone()
        self.log.close()
        return folder

    def _set_learning_rates(self) -> None:
        factor = lr_factor(self.step, self.config.optim, self.config.train.max_steps)
        for optimizer, _, peak in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = peak * factor

    def _reduce(self, logs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean of each logged value over the processes (one collective), plus lr and skipped images."""
        logs = logs | {"data/skipped_images": torch.tensor(float(self.skipped), device=self.device)
                       * self.accelerator.num_processes}  # the mean over processes times P: their sum
        names = sorted(logs)
        values = torch.stack([logs[n].detach().float().reshape(()).to(self.device) for n in names])
        out = dict(zip(names, self.accelerator.reduce(values, "mean").tolist(), strict=True))
        for name, (optimizer, _, _) in self.optimizers.items():
            out[f"lr/{name}"] = optimizer.param_groups[0]["lr"]
        return out

    def _evaluate_all(self) -> None:
        if self.accelerator.is_main_process:
            self.evaluate(self.step)
        self.accelerator.wait_for_everyone()
        self._evaluated = self.step

    # ---- checkpoints ------------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        return {"step": self.step, "batches": self.batches, "skipped": self.skipped, "stage": self.stage,
                "num_processes": self.accelerator.num_processes}

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step, self.accelerator, lambda folder: save_modules(
            folder, self.modules, self.ema, self.progress(), self.config.to_dict()))

    def load_checkpoint(self, folder: Path) -> None:
        saved = read_json_file(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
        check_resumable(saved, self.config.to_dict(), where=str(folder))
        read_progress(folder)  # a corrupt progress.json is named before anything is restored
        restore_accelerate_state(self.accelerator, folder)
        progress = load_modules(folder, self.modules, self.ema)
        self.step, self.batches, self.skipped = progress["step"], progress["batches"], progress["skipped"]
        self.accelerator.print(f"latentdiff: resumed from {folder} at step {self.step}")


class _progress_bar:
    """tqdm with the loss and the ETA on the main process; a no-op elsewhere or when switched off."""

    def __init__(self, config: TrainConfig, *, initial: int, enabled: bool):
        self.bar = None
        if enabled and config.logging.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.train.max_steps, initial=initial, desc=f"train {config.kind}",
                            dynamic_ncols=True, smoothing=0.1)

    def __enter__(self) -> _progress_bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, values: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)


def save_image_grid(images: torch.Tensor, path: Path, *, rows: int = 1, params: dict[str, Any] | None = None) -> Path:
    """images: (N, 3, H, W) in [-1, 1] -> one PNG grid of `rows` rows (written atomically)."""
    from ..pipelines.base import to_output
    from ..utils.images import make_grid, save_png

    path.parent.mkdir(parents=True, exist_ok=True)
    pil = to_output(images.detach().float().cpu(), "pil")
    return save_png(make_grid(pil, cols=math.ceil(len(pil) / max(1, rows))), path, params=params)

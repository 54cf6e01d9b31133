"""Where OpenVINO's SD 1.5 and latentdiff's part ways: each stage on the same inputs, one precision (issue 20).

latentdiff (this interpreter) and optimum-intel's OVStableDiffusionPipeline (its own venv, benchmarks/PEERS.md) run
the same random SD 1.5 (cpu_peers' weights) on the same inputs; printed: the max relative error of each OpenVINO
stage against latentdiff's (max |ov - ours| / max |ours|, the tests' measure):

- text encoder: the prompt and the negative prompt, each through the IR folder's tokenizer and text encoder;
- UNet: one call on the same latents, timestep and latentdiff's embeddings (CFG batch of 2), at the first
  timestep of the Euler grid and at a fractional one (the IR's timestep input is int64: is the fraction dropped?);
- VAE: one decode of the same latents;
- schedule: Euler's timesteps, sigmas and initial noise scale (diffusers' EulerDiscreteScheduler from the
  folder's config, as cpu_peers gives OpenVINO, against latentdiff's EulerSampler from the same config);
- image: cpu_peers' image (same prompt, latents, steps, guidance 7.5), in levels of 255 (mean / max), once with
  OpenVINO's own text encoder and once with latentdiff's embeddings as prompt_embeds (the rest of the pipeline).

    python benchmarks/probe_ov_parity.py --size 256 --steps 4 --threads 2
    python benchmarks/probe_ov_parity.py --ir /work/peers/weights/openvino-int8 --hint bf16

The two processes run one after the other (one copy of the weights in memory at a time). Offline.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import common
from cpu_peers import OV_PYTHON, WEIGHTS, level_difference, run_code

FRACTIONAL_T = 500.5   # a timestep between two integers: does the IR see the fraction?

REFERENCE = '''
import numpy as np, torch
from latentdiff import LatentDiffusionPipeline
from latentdiff.diffusion.samplers import EulerSampler
A = {args!r}
torch.set_num_threads(A["threads"])
pipe = LatentDiffusionPipeline.from_pretrained(A["folder"], torch_dtype=torch.float32)
pipe.scheduler = EulerSampler.from_config(pipe.scheduler.config)
plan = pipe.scheduler.plan(pipe.noise_scheduler, A["steps"])
side = A["size"] // 8
g = torch.Generator().manual_seed(1)
cond, uncond = pipe.encode_prompt(A["prompt"], A["negative"])
context = torch.cat([uncond, cond])                      # diffusers' order: negative first
x = torch.randn(2, 4, side, side, generator=g) * plan.init_scale
z = torch.randn(1, 4, side, side, generator=g)
latents = torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(0))   # cpu_peers' latents
with torch.no_grad():
    unet = pipe.unet(x, plan.timesteps[0], context)
    unet_fractional = pipe.unet(x, torch.tensor(A["fractional_t"]), context)
    unet_truncated = pipe.unet(x, torch.tensor(float(int(A["fractional_t"]))), context)
    vae = pipe.vae.decode(z)
image = pipe(A["prompt"], negative_prompt=A["negative"], num_inference_steps=A["steps"], guidance_scale=7.5,
             height=A["size"], width=A["size"], latents=latents, output_type="np", progress=False).images
np.savez(A["out"], context=context.numpy(), x=x.numpy(), t=plan.timesteps[0].numpy(), unet=unet.numpy(),
         unet_fractional=unet_fractional.numpy(), unet_truncated=unet_truncated.numpy(), z=z.numpy(),
         vae=vae.numpy(), latents=latents.numpy(),
         timesteps=plan.timesteps.numpy(), sigmas=np.array(plan.sigmas), init_scale=np.array(plan.init_scale),
         image=np.asarray(image, dtype=np.float32))
'''

OPENVINO = '''
import numpy as np, torch
from diffusers import EulerDiscreteScheduler
from optimum.intel import OVStableDiffusionPipeline
A = {args!r}
torch.set_num_threads(A["threads"])
ref = np.load(A["ref"])
config = {{"INFERENCE_NUM_THREADS": str(A["threads"]), "CACHE_DIR": "", "INFERENCE_PRECISION_HINT": A["hint"]}}
pipe = OVStableDiffusionPipeline.from_pretrained(A["ir"], compile=False, ov_config=config)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
pipe.reshape(batch_size=1, height=A["size"], width=A["size"], num_images_per_prompt=1)
pipe.compile()

def encode(text):
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0].numpy()

def unet(t):
    return pipe.unet(sample=ref["x"], timestep=np.array([t]), encoder_hidden_states=ref["context"])[0].numpy()

def image(**prompts):
    return pipe(**prompts, num_inference_steps=A["steps"], guidance_scale=7.5, height=A["size"], width=A["size"],
                latents=torch.from_numpy(ref["latents"]), output_type="np").images

pipe.scheduler.set_timesteps(A["steps"])
context = torch.from_numpy(ref["context"])
np.savez(A["out"], context=np.concatenate([encode(A["negative"]), encode(A["prompt"])]),
         unet=unet(int(ref["t"])), unet_fractional=unet(A["fractional_t"]),
         vae=pipe.vae_decoder(latent_sample=ref["z"])[0].numpy(),
         timesteps=pipe.scheduler.timesteps.numpy(), sigmas=pipe.scheduler.sigmas.numpy(),
         init_scale=np.array(float(pipe.scheduler.init_noise_sigma)),
         image=np.asarray(image(prompt=A["prompt"], negative_prompt=A["negative"]), dtype=np.float32),
         image_embeds=np.asarray(image(prompt_embeds=context[1:], negative_prompt_embeds=context[:1]),
                                 dtype=np.float32))
'''


def run(python: str, code: str, threads: int, timeout: float) -> None:
    try:
        run_code(python, code, threads=threads, timeout=timeout)
    except RuntimeError as error:
        raise SystemExit(f"{python}: {error}") from None


def rows(ours: Any, theirs: Any) -> list[tuple[str, str]]:
    """(stage, OpenVINO against latentdiff) for each stage of the two .npz files."""
    import numpy as np

    def rel(name: str, theirs_name: str | None = None) -> str:
        """OpenVINO's `theirs_name` (default: `name`) against our `name`."""
        return f"{common.max_rel_error(np.asarray(theirs[theirs_name or name], dtype=np.float64), ours[name]):.2e}"

    def levels(name: str) -> str:
        mean, most = level_difference(ours["image"], theirs[name])
        return f"{mean:.3f} / {most:.2f}"

    same_grid = ours["timesteps"].shape == theirs["timesteps"].shape
    return [
        ("text encoder (negative, prompt)", rel("context")),
        (f"UNet, one call at t = {float(ours['t']):g}", rel("unet")),
        (f"UNet, one call at t = {FRACTIONAL_T}", rel("unet_fractional")),
        (f"UNet, OpenVINO at t = {FRACTIONAL_T} against ours at {int(FRACTIONAL_T)}", rel("unet_truncated",
                                                                                    "unet_fractional")),
        ("VAE decode", rel("vae")),
        ("Euler timesteps", rel("timesteps") if same_grid else f"{theirs['timesteps']} vs {ours['timesteps']}"),
        ("Euler sigmas", rel("sigmas") if same_grid else f"{theirs['sigmas']} vs {ours['sigmas']}"),
        ("initial noise scale", f"{float(theirs['init_scale']):.6g} vs {float(ours['init_scale']):.6g}"),
        ("image, OpenVINO's text encoder (levels, mean / max)", levels("image")),
        ("image, latentdiff's embeddings (levels, mean / max)", levels("image_embeds")),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=WEIGHTS / "sd15", help="the diffusers folder latentdiff reads")
    p.add_argument("--ir", type=Path, default=WEIGHTS / "openvino-fp32", help="the OpenVINO IR folder")
    p.add_argument("--ov-python", default=str(OV_PYTHON), help="the OpenVINO venv's interpreter")
    p.add_argument("--hint", default="f32", help="OpenVINO's INFERENCE_PRECISION_HINT (default f32)")
    p.add_argument("--size", type=int, default=256, help="image side (default 256)")
    p.add_argument("--steps", type=int, default=4, help="Euler steps of the image (default 4)")
    p.add_argument("--threads", type=int, default=2, help="threads per process (default 2)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per process")
    args = p.parse_args(argv)
    import numpy as np

    shared = dict(size=args.size, steps=args.steps, threads=args.threads, prompt=common.PROMPT,
                  negative=common.NEGATIVE, fractional_t=FRACTIONAL_T)
    with tempfile.TemporaryDirectory() as tmp:
        ours_path, theirs_path = f"{tmp}/latentdiff.npz", f"{tmp}/openvino.npz"
        run(sys.executable, REFERENCE.format(args=dict(shared, folder=str(args.folder), out=ours_path)),
            args.threads, args.timeout)
        run(args.ov_python, OPENVINO.format(args=dict(shared, ir=str(args.ir), hint=args.hint, ref=ours_path,
                                                      out=theirs_path)), args.threads, args.timeout)
        ours, theirs = np.load(ours_path), np.load(theirs_path)
        table = rows(ours, theirs)
    print(f"OpenVINO ({args.ir}, {args.hint}) against latentdiff fp32 ({args.folder}), {args.size} px, "
          f"{args.steps} Euler steps\n\n| stage | OpenVINO vs latentdiff (max rel err) |\n|---|---|")
    for stage, value in table:
        print(f"| {stage} | {value} |")
    print(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=dict(table))))


if __name__ == "__main__":
    main()

"""`latentdiff serve`: the HTTP server (AUTOMATIC1111's /sdapi/v1 subset, OpenAI's /v1/images/generations, a web
page at /), on uvicorn (docs/serving.md).

    latentdiff serve                                    # the built-in model, http://127.0.0.1:7860
    latentdiff serve --models-dir models/Stable-diffusion --lora-dir models/Lora --port 7861
    latentdiff serve --host 0.0.0.0 --api-auth me:secret # reachable from other machines: only with auth

Every flag is checked, and the startup model loaded, before the server listens: a mistake is an error line here,
not a failing first request. Without --api-auth the server binds to loopback only; another host needs --api-auth
(or --insecure-no-auth, said out loud).
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import sys
from pathlib import Path
from typing import Any

from ..builtin import DEFAULT_MODEL
from ..errors import UsageError
from ..generation.quantize import QUANTIZATIONS, check_int8_dtype, check_static_calibration, on_cpu
from ..limits import MAX_SIDE, MAX_STEPS

MAX_PORT = 65_535


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from ..serve import settings as defaults

    serve = sub.add_parser("serve", help="an HTTP server: A1111's /sdapi/v1 API, OpenAI's images API, a web page",
                           description="Serve the model over HTTP (docs/serving.md): AUTOMATIC1111's /sdapi/v1 "
                                       "subset, OpenAI's /v1/images/generations, and a page at /.")
    serve.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"the model loaded at start (default {DEFAULT_MODEL}): a built-in name, a diffusers "
                            "folder, a Hub id or a single file")
    serve.add_argument("--models-dir", default=None, metavar="DIR",
                       help="checkpoints clients may switch to (sd_model_checkpoint): single files and folders")
    serve.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                       help="where <lora:NAME:W> tags find NAME (repeatable)")
    serve.add_argument("--embeddings-dir", default=None, metavar="DIR",
                       help="textual-inversion files, loaded with every model (the token is the file's stem)")
    serve.add_argument("--vae-dir", default=None, metavar="DIR", help="VAE files clients may pick (sd_vae)")
    serve.add_argument("--controlnet-dir", action="append", default=[], metavar="DIR",
                       help="ControlNet files and folders that sd-webui-controlnet units (alwayson_scripts) can "
                            "name; /controlnet/model_list lists them (repeatable)")
    serve.add_argument("--outputs-dir", default=None, metavar="DIR",
                       help="where requests with save_images=true are written (default: nothing is written)")
    serve.add_argument("--host", default=defaults.DEFAULT_HOST,
                       help=f"address to bind (default {defaults.DEFAULT_HOST}: this machine only)")
    serve.add_argument("--port", type=int, default=defaults.DEFAULT_PORT, help=f"default {defaults.DEFAULT_PORT}")
    serve.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS]",
                       help="HTTP basic auth on every route, as A1111's --api-auth")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="allow a non-loopback --host without --api-auth (anyone who reaches it can use it)")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    serve.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    serve.add_argument("--preview-vae", default=None, metavar="PATH",
                       help="a tiny autoencoder (TAESD folder or files) for the live preview of /sdapi/v1/progress "
                            "(default: the built-in model's; else a linear latent -> RGB map)")
    serve.add_argument("--deepcache", type=int, default=None, metavar="N",
                       help="DeepCache on every model: a full UNet pass every N steps (docs/fast.md)")
    serve.add_argument("--deepcache-branch", type=int, default=None, metavar="B",
                       help="DeepCache's skip branch (default 0: conv_in's skip)")
    serve.add_argument("--freeu", default=None, metavar="S1,S2,B1,B2",
                       help="FreeU on every model, diffusers' order (SD 1.x: 0.9,0.2,1.5,1.6; SDXL: 0.6,0.4,1.1,1.2)")
    serve.add_argument("--tome", type=float, default=None, metavar="R",
                       help="token merging on every model: the ratio of tokens merged, in [0, 1) (tomesd's reach)")
    serve.add_argument("--optimize-cpu", action="store_true", default=False,
                       help="CPU: optimize_for_cpu on every model (weights packed once, fused feed-forward; faster, "
                            "weights held once: docs/fast.md)")
    serve.add_argument("--quantize", default=None, choices=QUANTIZATIONS,
                       help="CPU: every model's UNet in int8 (lossy, recorded in the PNGs): int8-static = calibrated "
                            "int8 convolutions and linear layers; int8 = dynamic int8 linear layers (--dtype float32)")
    serve.add_argument("--max-batch", type=int, default=defaults.DEFAULT_MAX_BATCH,
                       help=f"images one pipeline call makes, across requests (default {defaults.DEFAULT_MAX_BATCH}; "
                            "1: every image exactly the one the Python API gives alone)")
    serve.add_argument("--max-pixels", type=int, default=defaults.DEFAULT_MAX_PIXELS,
                       help="width x height x images of one request")
    serve.add_argument("--max-steps", type=int, default=defaults.DEFAULT_MAX_STEPS)
    serve.add_argument("--max-side", type=int, default=defaults.DEFAULT_MAX_SIDE, help="width or height")
    serve.add_argument("--max-images", type=int, default=defaults.DEFAULT_MAX_IMAGES,
                       help="batch_size x n_iter of one request")
    serve.add_argument("--max-queue", type=int, default=defaults.DEFAULT_MAX_QUEUE,
                       help="requests waiting; more are refused with 503")
    serve.add_argument("--model-budget-gb", type=float, default=defaults.DEFAULT_MODEL_BUDGET_BYTES / 1024**3,
                       help="weights of the models kept loaded (least recently used ones are dropped)")


def parse_auth(text: str | None) -> tuple[tuple[str, str], ...]:
    if text is None:
        return ()
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise UsageError("--api-auth takes user:password pairs", where="--api-auth",
                             expected="USER:PASS[,USER:PASS]", found="an item without user or password")
        pairs.append((user, password))
    return tuple(pairs)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def folder(value: str | None, flag: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UsageError("no such folder", where=flag, expected="an existing folder", found=value)
    return path.resolve()


def settings_from(args: argparse.Namespace) -> Any:
    """ServeSettings from the flags, every value checked."""
    from ..serve.settings import ServeSettings

    def at_least(value: float, flag: str, low: float, high: float | None = None) -> None:
        if not value >= low or (high is not None and value > high):
            raise UsageError(f"{flag} is out of range", where=flag,
                             expected=f">= {low}" + (f" and <= {high}" if high is not None else ""), found=value)

    at_least(args.port, "--port", 0, MAX_PORT)
    at_least(args.max_batch, "--max-batch", 1, 1024)
    at_least(args.max_pixels, "--max-pixels", 64)
    at_least(args.max_steps, "--max-steps", 1, MAX_STEPS)
    at_least(args.max_side, "--max-side", 8, MAX_SIDE)
    at_least(args.max_images, "--max-images", 1, 4096)
    at_least(args.max_queue, "--max-queue", 1)
    at_least(args.model_budget_gb, "--model-budget-gb", 0)
    auth = parse_auth(args.api_auth)
    if not auth and not is_loopback(args.host) and not args.insecure_no_auth:
        raise UsageError("a server reachable from other machines needs --api-auth", where="--host",
                         expected="a loopback address (127.0.0.1, ::1, localhost), or --api-auth USER:PASS",
                         found=args.host, hint="add --api-auth user:password (or --insecure-no-auth on a trusted "
                                               "network)")
    if args.device is not None:
        from .generate import check_device

        check_device(args.device)
    return ServeSettings(
        model=args.model, models_dir=folder(args.models_dir, "--models-dir"),
        lora_dirs=tuple(p for p in (folder(d, "--lora-dir") for d in args.lora_dir) if p is not None),
        embeddings_dir=folder(args.embeddings_dir, "--embeddings-dir"), vae_dir=folder(args.vae_dir, "--vae-dir"),
        controlnet_dirs=tuple(p for p in (folder(d, "--controlnet-dir") for d in args.controlnet_dir) if p is not None),
        outputs_dir=folder(args.outputs_dir, "--outputs-dir"), host=args.host, port=args.port, api_auth=auth,
        device=args.device, dtype=args.dtype, max_batch=args.max_batch, max_pixels=args.max_pixels,
        max_steps=args.max_steps, max_side=args.max_side, max_images=args.max_images, max_queue=args.max_queue,
        model_budget_bytes=int(args.model_budget_gb * 1024**3), preview_vae=preview_vae(args.preview_vae),
        **step_switches(args))


def step_switches(args: argparse.Namespace) -> dict[str, Any]:
    """--deepcache / --deepcache-branch / --freeu / --tome as ServeSettings fields, checked (the branch against a
    model's UNet when it loads: `serve.switches`)."""
    interval, branch = getattr(args, "deepcache", None), getattr(args, "deepcache_branch", None)
    if branch is not None and interval is None:
        raise UsageError("--deepcache-branch needs --deepcache", where="--deepcache-branch", expected="--deepcache N",
                         found=branch)
    if interval is not None and not 1 <= interval <= MAX_STEPS:
        raise UsageError("--deepcache is out of range", where="--deepcache", expected=f"1 .. {MAX_STEPS}",
                         found=interval)
    if branch is not None and branch < 0:
        raise UsageError("--deepcache-branch is out of range", where="--deepcache-branch", expected=">= 0",
                         found=branch)
    freeu = getattr(args, "freeu", None)
    if freeu is not None:
        try:
            factors = tuple(float(v) for v in freeu.split(","))
        except ValueError:
            factors = ()
        if len(factors) != 4 or not all(0 < v < math.inf for v in factors):
            raise UsageError("bad value for --freeu", where="--freeu",
                             expected="four positive numbers S1,S2,B1,B2 (e.g. 0.9,0.2,1.5,1.6)", found=freeu)
        freeu = factors
    tome = getattr(args, "tome", None)
    if tome is not None and not 0.0 <= tome < 1.0:
        raise UsageError("--tome is out of range", where="--tome", expected="a ratio in [0, 1)", found=tome)
    return {"deepcache": None if interval is None else (interval, branch or 0), "freeu": freeu, "tome": tome,
            "optimize_cpu": bool(getattr(args, "optimize_cpu", False)), "quantize": quantize_flag(args)}


def quantize_flag(args: argparse.Namespace) -> str | None:
    """--quantize, checked where it will act (the CPU): dynamic int8 takes float32 only; int8-static calibrates each
    model when it loads, on prompts alone, so not with --controlnet-dir (its units bring hints with requests,
    later; `latentdiff generate` has its hint first and calibrates with it)."""
    method = getattr(args, "quantize", None)
    dtype = getattr(args, "dtype", "float32")
    device = getattr(args, "device", None)
    if method is None or not on_cpu(None if device is None else _device(device)):
        return method
    check_int8_dtype(method, dtype, where="--quantize", found=f"--quantize int8 with --dtype {dtype}")
    control = "--controlnet-dir" if getattr(args, "controlnet_dir", None) else None
    check_static_calibration(method, control=control, where="--quantize", model=getattr(args, "model", None))
    return method


def _device(spec: str) -> Any:
    import torch

    return torch.device(spec)


def preview_vae(path: str | None) -> str | None:
    """--preview-vae as an absolute path (or a Hub id / built-in name as given), checked to be a tiny autoencoder."""
    if path is None:
        return None
    from ..models.autoencoder_tiny import is_tiny_autoencoder

    local = Path(path).expanduser()
    if local.exists() and not is_tiny_autoencoder(local):
        raise UsageError("not a tiny autoencoder", where="--preview-vae",
                         expected="an AutoencoderTiny folder, or a folder with taesd_encoder/taesd_decoder files",
                         found=path)
    return str(local.resolve()) if local.exists() else path


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UsageError("the server needs the optional packages of latentdiff[serve]", where="latentdiff serve",
                         expected="fastapi and uvicorn installed", found=f"not installed ({e.name})",
                         hint='pip install "latentdiff[serve]"') from None
    from ..serve.app import create_app
    from ..serve.engine import Engine
    from ..serve.models import ModelCatalog

    settings = settings_from(args)
    catalog = ModelCatalog(settings)
    catalog.pipeline(catalog.current)          # load (and check) the startup model before listening
    app = create_app(settings, catalog=catalog, engine=Engine(catalog, settings))
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"latentdiff: serving {catalog.current} on http://{shown}:{settings.port} "
          f"(A1111 API /sdapi/v1, OpenAI /v1, page /)", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0

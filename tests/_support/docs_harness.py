"""Run every fenced block of the documentation, offline and fast: the machinery of tests/test_docs.py.

A page's blocks run in document order in a fresh working directory; its Python blocks share one namespace.
What each fence language means:

    python            executed (exec)
    pyi               signatures: parsed, and every `def` inside `class Name:` must match latentdiff.Name's
    bash, sh, console command lines (console: the lines after "$ "), split at && and ;: `latentdiff ...` runs
                      through latentdiff.cli.main and must return 0; `python examples/...` runs a script of
                      RUNNABLE_SCRIPTS in-process; NOT_RUN lists the other commands a page may show; any
                      other command fails
    yaml              parsed; a training config (a `train:` section) loads through latentdiff.training.config
    json              parsed
    text              output samples and layouts: nothing to run

Any other fence language (or none) fails, so nothing slips through.

Nothing is downloaded: the Hub ids, files and weights the pages name are tiny random stand-ins (STAND-INS
below), the Hub runs offline (HF_HUB_OFFLINE=1, a private cache) and sockets refuse to connect. The few
textual changes that keep the run short are in one table, SUBSTITUTIONS.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import json
import re
import runpy
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tests._support import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"
BUILTIN_NAME = "latentdiff/shapes-64"

# ---- SUBSTITUTIONS: the only changes made to the text of a block (pattern, replacement, why) ----------------
SUBSTITUTIONS: tuple[tuple[str, str, str], ...] = (
    (r"^(latentdiff train \S+ \S+)", r"\1 --set train.max_steps=2 --set logging.progress_bar=false",
     "a training command trains 2 steps (the configs' own max_steps run for minutes)"),
    (r"^(latentdiff data shapes \S+ -n) \d+", r"\1 64", "the tiny training data sets have 64 images, not 512"),
    (r"--subsets \d+ --subset-size \d+", "--subsets 2 --subset-size 4", "KID on the 4-image folders below"),
    (r"(--splits |splits=)\d+", r"\g<1>2", "the Inception Score of a 4-image folder"),
    (r"(?<![\w-])(--height |--width |height=|width=)512\b", r"\g<1>16",
     "the Stable Diffusion stand-in draws 16 x 16 images, not 512 x 512"),
    (r"(?<![\w-])(--height |--width |height=|width=)1024\b", r"\g<1>32",
     "the SDXL stand-ins draw 32 x 32 images, not 1024 x 1024"),
)


def substitute(code: str) -> str:
    for pattern, replacement, _ in SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code, flags=re.MULTILINE)
    if _served:   # a page's clients talk to the server page_server started, on a free port
        code = code.replace(SERVED, _served[-1])
    return code


# ---- commands a page may show that are not run -----------------------------------------------------------
NOT_RUN: tuple[tuple[tuple[str, ...], str], ...] = (
    (("pip", "install"), "installs packages"),
    (("python", "-m", "pytest"), "the test suite itself"),
    (("accelerate", "launch"), "a multi-process launch (tests/training/test_training_distributed.py runs one)"),
    (("curl",), "a download"),
    (("python", "examples/train/build_shapes_64.py"), "trains the built-in model: hours"),
    (("python", "examples/train/build_shapes_64_silhouette.py"), "trains the built-in silhouette ControlNet: an hour"),
    (("python", "examples/train/build_shapes_64_tiny_autoencoder.py"), "trains the built-in tiny autoencoder: 20 min"),
    (("latentdiff", "serve"), "serves until stopped (the page's client blocks talk to the server page_server starts)"),
)
# scripts under examples/ that a page may run (`python SCRIPT ARGS`), in-process (none now: the data the tiny
# training examples need comes from `latentdiff data shapes`, which a pip user has)
RUNNABLE_SCRIPTS: tuple[str, ...] = ()


# ---- fenced blocks ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int       # of the opening fence, 1-based
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line} ({self.lang or 'no language'})"


OPEN_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")


def read_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order (indented fences too, e.g. inside lists)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = OPEN_FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        info = opening["info"].strip()
        lang = re.split(r"[\s{]", info, maxsplit=1)[0].lstrip(".") if info else ""
        body, j = [], i + 1
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j][indent:] if not lines[j][:indent].strip() else lines[j])
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.name}:{i + 1}: unclosed code fence")
        blocks.append(Block(path.name, i + 1, lang, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def rendered_code_blocks(path: Path) -> int:
    """How many code blocks the site shows for a page (rendered with mkdocs.yml's Markdown extensions): more
    than `read_blocks` finds means an indented code block, which would never run."""
    import markdown
    import yaml

    extensions, settings = [], {}
    for entry in yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["markdown_extensions"]:
        name, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        extensions.append(name)
        settings[name] = options or {}
    html = markdown.markdown(path.read_text(encoding="utf-8"), extensions=extensions, extension_configs=settings)
    return html.count("<pre")


def pages() -> list[Path]:
    """Every documentation page, and the README."""
    return sorted(DOCS.glob("*.md")) + [README]


# ---- runners ---------------------------------------------------------------------------------------------
def run_python(block: Block, namespace: dict[str, Any]) -> None:
    # Leading blank lines put the block's lines at their line numbers in the page, for tracebacks.
    code = "\n" * block.line + substitute(block.code)
    exec(compile(code, block.page, "exec"), namespace)


def check_signatures(block: Block, namespace: dict[str, Any]) -> None:
    """`class Name:` with `def method(...)` stubs: each must have latentdiff.Name.method's parameters
    (names, kinds, order) and defaults. Annotations and bodies are not compared."""
    import latentdiff

    tree = ast.parse(block.code)
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            raise AssertionError(f"a pyi block holds `class Name:` stubs, found {ast.dump(node)[:60]}")
        cls = getattr(latentdiff, node.name)
        for stub in node.body:
            if isinstance(stub, ast.Expr) and isinstance(stub.value, ast.Constant):
                continue   # a docstring
            if not isinstance(stub, ast.FunctionDef):
                raise AssertionError(f"class {node.name}: only `def` stubs, found {ast.dump(stub)[:60]}")
            documented = stub_parameters(stub)
            actual = [(p.name, p.kind.name, None if p.default is p.empty else repr(p.default))
                      for p in inspect.signature(getattr(cls, stub.name)).parameters.values()]
            assert documented == actual, (f"{node.name}.{stub.name}: the documented signature differs from the "
                                          f"code:\n  documented {documented}\n  code       {actual}")


def stub_parameters(stub: ast.FunctionDef) -> list[tuple[str, str, str | None]]:
    """[(name, kind, repr(default) or None)] of a `def` stub, in inspect.Parameter's terms."""
    args = stub.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [(a.arg, "POSITIONAL_ONLY" if a in args.posonlyargs else "POSITIONAL_OR_KEYWORD", d)
              for a, d in zip(positional, defaults, strict=True)]
    if args.vararg:
        params.append((args.vararg.arg, "VAR_POSITIONAL", None))
    params += [(a.arg, "KEYWORD_ONLY", d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    if args.kwarg:
        params.append((args.kwarg.arg, "VAR_KEYWORD", None))
    return [(name, kind, None if d is None else repr(ast.literal_eval(d))) for name, kind, d in params]


def run_shell(block: Block, namespace: dict[str, Any]) -> None:
    if block.lang != "console":
        for argv in shell_commands(substitute(block.code)):
            run_command(argv)
        return
    # console: "$ command" lines, each followed by its output; an output line "latentdiff: error: ..." says the
    # command fails (status 2) with exactly that message, any other output is a sample and not compared.
    for command, output in console_commands(block.code):
        error = next((line for line in output if line.startswith("latentdiff: error: ")), None)
        for argv in shell_commands(substitute(command)):
            run_command(argv, expect_error=error)


def console_commands(code: str) -> list[tuple[str, list[str]]]:
    """[(command, its output lines)] of a console block ("$ " prompts, backslash continuations)."""
    commands: list[tuple[list[str], list[str]]] = []
    continued = False
    for line in code.splitlines():
        is_command = continued or line.startswith("$ ")
        if continued:
            commands[-1][0].append(line)
        elif is_command:
            commands.append(([line[2:]], []))
        elif commands:
            commands[-1][1].append(line)
        else:
            raise AssertionError(f"console output before any '$ ' command: {line!r}")
        continued = is_command and line.endswith("\\")
    return [("\n".join(command), output) for command, output in commands]


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split at && and ;."""
    text = re.sub(r"\\\n", " ", code)
    commands = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", ";"):
                if argv:
                    commands.append(argv)
                argv = []
            elif token and set(token) <= set("();<>|&"):
                raise AssertionError(f"shell operator {token!r} in {line!r}: write one plain command per line")
            else:
                argv.append(token)
    return commands


def run_command(argv: list[str], *, expect_error: str | None = None) -> None:
    for prefix, _ in NOT_RUN:
        if tuple(argv[:len(prefix)]) == prefix:
            assert expect_error is None, f"`{shlex.join(argv)}` is not run, so its error cannot be shown"
            return
    if argv[0] == "latentdiff":
        from latentdiff.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv[1:])
        if expect_error is None:
            assert rc == 0, f"`{shlex.join(argv)}` returned {rc}:\n{err.getvalue()[-2000:]}"
        else:
            assert rc == 2 and expect_error in err.getvalue().splitlines(), (
                f"`{shlex.join(argv)}` returned {rc}; the page shows\n  {expect_error}\n"
                f"stderr:\n{err.getvalue()[-2000:]}")
        return
    assert expect_error is None, f"`{shlex.join(argv)}`: only latentdiff commands may show an error"
    if argv[0] == "python" and len(argv) > 1 and argv[1] in RUNNABLE_SCRIPTS:
        saved = sys.argv
        sys.argv = argv[1:]
        try:
            runpy.run_path(str(Path(argv[1])), run_name="__main__")
        except SystemExit as e:
            assert e.code in (None, 0), f"`{shlex.join(argv)}` exited with {e.code}"
        finally:
            sys.argv = saved
    else:
        raise AssertionError(f"`{shlex.join(argv)}`: not a command the docs may show (latentdiff ..., "
                             f"python {' | '.join(RUNNABLE_SCRIPTS) or '(no scripts at present)'}, "
                             "or one of NOT_RUN in tests/_support/docs_harness.py)")


def check_yaml(block: Block, namespace: dict[str, Any]) -> None:
    import yaml

    data = yaml.safe_load(block.code)
    if isinstance(data, dict) and "train" in data:
        from latentdiff.training.config import train_config_from_dict

        model = data.get("model") or {}
        kind = "controlnet" if "pipeline" in model else "diffusion" if "autoencoder" in model else "autoencoder"
        train_config_from_dict(data, kind, source=block.where)


def check_json(block: Block, namespace: dict[str, Any]) -> None:
    json.loads(block.code)


def nothing_to_run(block: Block, namespace: dict[str, Any]) -> None:
    pass


RUNNERS: dict[str, Callable[[Block, dict[str, Any]], None]] = {
    "python": run_python, "pyi": check_signatures, "bash": run_shell, "sh": run_shell, "console": run_shell,
    "yaml": check_yaml, "json": check_json, "text": nothing_to_run,
}


def run_page(path: Path, *, skip_languages: tuple[str, ...] = ()) -> list[tuple[str, float, float]]:
    """Run every block of a page in order, in the current directory (set up by `docs_environment`).
    -> [(block, wall seconds, CPU seconds)]"""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    timings = []
    blocks = read_blocks(path)
    shown = rendered_code_blocks(path)
    assert shown == len(blocks), (f"{path.name}: the page shows {shown} code blocks, {shown - len(blocks)} of them "
                                  "indented rather than fenced: they would never run; fence them with a language")
    for block in blocks:
        runner = RUNNERS.get(block.lang)
        if runner is None:
            raise AssertionError(f"{block.where}: unknown fence language; use one of {sorted(RUNNERS)}")
        if block.lang in skip_languages:
            continue
        start, cpu = time.perf_counter(), time.process_time()
        try:
            runner(block, namespace)
        except Exception as e:
            raise AssertionError(f"{block.where} failed: {type(e).__name__}: {e}") from e
        timings.append((block.where, time.perf_counter() - start, time.process_time() - cpu))
    return timings


# ---- STAND-INS: what the pages name that cannot be downloaded here -----------------------------------------
# Hub ids saved into a private offline Hub cache (tiny random models in the same layouts):
#   stable-diffusion-v1-5/stable-diffusion-v1-5  a Stable Diffusion v1 folder, tiny but by SD's conventions
#                                                (CLIP with 64-wide heads, 8 UNet heads, GroupNorm(32)), f = 2
#   openai/clip-vit-large-patch14                its CLIP text model and tokenizer
#   CompVis/ldm-text2im-large-256               an LDM-layout folder (the built-in stand-in's; its index names
#                                                latentdiff's class where the real one names LDMTextToImagePipeline:
#                                                latentdiff loads both alike)
#   stabilityai/stable-diffusion-xl-base-1.0    tests/_support/sdxl.py's tiny diffusers SDXL base (32 x 32 images),
#   stabilityai/stable-diffusion-xl-refiner-1.0  and refiner, each built on first use by a page that names it
#   lllyasviel/sd-controlnet-canny, lllyasviel/sd-controlnet-scribble   ControlNets of the SD stand-in (hint
#                                                factor 2, every zero convolution randomised), built on first use
# The built-in name "latentdiff/shapes-64" resolves to tests/_support/tiny_builtin.py's stand-in (random weights),
# "latentdiff/shapes-64-silhouette" to a ControlNet made from that stand-in's UNet (ControlNet.from_unet),
# "latentdiff/shapes-64-tiny-vae" to a random AutoencoderTiny in that stand-in's latent space.
# FILES: put into a page's working directory when the page names them (folders copied, files linked):
#   v1-5-pruned-emaonly.safetensors      the SD stand-in as an original single file (no latentdiff metadata)
#   vae-ft-mse-840000-ema-pruned.ckpt    its autoencoder as a stand-alone Lightning .ckpt
#   v1-inference.yaml                    its original (CompVis) inference config
#   data/val, samples, originals, reconstructions   4 shapes images each (64 x 64)
#   prompts.txt                          three shapes captions
#   pt_inception-2015-12-05-6726825d.pth random FID Inception weights (also where the release is cached,
#                                        TORCH_HOME, for every page that runs metrics)
# On pages that run metrics the Inception network resizes images to 75 x 75 (its smallest input), not 299:
# 16 times less work, the same code path.
# examples/ is linked into every working directory, so pages can name the shipped configs and scripts.
SD_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD_TEXT_WIDTH = 64


class StandIns:
    """The stand-ins under `root`: the Hub cache, the built-in model and the SD folder now (`build`), FILES
    on first use (`file`)."""

    def __init__(self, root: Path):
        self.root, self.hub_cache, self.torch_home = root, root / "hub-cache", root / "torch-home"
        self.builtin, self.sd = root / "builtin" / "shapes-64", root / "sd"
        self._files: dict[str, Path] = {}

    def build(self) -> StandIns:
        from tests._support.hub_cache import make_hub_cache
        from tests._support.tiny_builtin import (
            make_tiny_shapes_model,
            make_tiny_shapes_tiny_vae,
            make_tiny_silhouette_controlnet,
        )

        make_tiny_shapes_model(self.builtin)
        make_tiny_silhouette_controlnet(self.builtin.with_name("shapes-64-silhouette"), self.builtin)
        make_tiny_shapes_tiny_vae(self.builtin.with_name("shapes-64-tiny-vae"), self.builtin)
        clip = tiny_stable_diffusion(self.sd)
        make_hub_cache(self.hub_cache, SD_ID, self.sd)
        make_hub_cache(self.hub_cache, "openai/clip-vit-large-patch14", clip)
        make_hub_cache(self.hub_cache, "CompVis/ldm-text2im-large-256", self.builtin)
        return self

    def file(self, name: str) -> Path:
        """The stand-in for FILES[name], built on first use."""
        if name not in self._files:
            path = self.root / "files" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            self._files[name] = FILES[name](self, path)
        return self._files[name]


def tiny_stable_diffusion(folder: Path) -> Path:
    """Write a tiny Stable Diffusion v1 pipeline folder; -> the folder of its CLIP model and tokenizer."""
    from latentdiff import (
        AutoencoderKL,
        DDIMSampler,
        LatentDiffusionPipeline,
        NoiseScheduler,
        TextEncoder,
        UNet2DConditional,
    )
    from latentdiff.models.autoencoder_kl import AutoencoderKLConfig
    from latentdiff.models.unet import UNetConfig
    from tests._support.tiny_clip import make_tiny_clip

    clip = folder.with_name(folder.name + "-clip")
    make_tiny_clip(clip, hidden_size=SD_TEXT_WIDTH, num_attention_heads=1, text_encoder_subfolder=".",
                   tokenizer_subfolder=".")
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderKLConfig(latent_channels=4, channels=(32, 64), layers_per_level=1,
                                            sample_size=16)).eval()
    unet = UNet2DConditional(UNetConfig(in_channels=4, out_channels=4, sample_size=8, channels=(32, 64),
                                        attention_levels=(True, False), attention_heads=8, layers_per_level=1,
                                        cross_attention_dim=SD_TEXT_WIDTH)).eval()
    pipe = LatentDiffusionPipeline(vae=vae, unet=unet, text_encoder=TextEncoder.from_pretrained(clip),
                                   noise_scheduler=NoiseScheduler(), sampler=DDIMSampler(steps_offset=1))
    pipe.save_pretrained(folder)
    return clip


def _single_file(stand_ins: StandIns, path: Path) -> Path:
    """The SD stand-in in the original layout, without latentdiff's metadata, as the released files are."""
    from safetensors.torch import load_file, save_file

    from latentdiff import LatentDiffusionPipeline

    LatentDiffusionPipeline.from_pretrained(stand_ins.sd).save_single_file(path)
    save_file(load_file(path), path)
    return path


def _vae_ckpt(stand_ins: StandIns, path: Path) -> Path:
    from safetensors.torch import load_file

    from latentdiff import AutoencoderKL

    standalone = path.with_suffix(".safetensors")
    AutoencoderKL.from_pretrained(stand_ins.sd, subfolder="vae").save_single_file(standalone)
    torch.save({"state_dict": load_file(standalone), "global_step": 840000}, path)
    return path


def _original_config(stand_ins: StandIns, path: Path) -> Path:
    """The CompVis inference YAML of the SD stand-in (v1-inference.yaml's layout, tiny sizes)."""
    import yaml

    unet = {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 2],
            "attention_resolutions": [1], "num_res_blocks": 1, "num_heads": 8, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": SD_TEXT_WIDTH, "use_checkpoint": True, "legacy": False}
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 8, "channels": 4,
        "scale_factor": 0.18215, "conditioning_key": "crossattn", "cond_stage_key": "txt",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"embed_dim": 4, "ddconfig": ddconfig}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _image_folder(seed: int) -> Callable[[StandIns, Path], Path]:
    def build(stand_ins: StandIns, path: Path) -> Path:
        from latentdiff.data.shapes import ShapesDataset

        path.mkdir()
        for i, (image, _) in enumerate(ShapesDataset(4, seed=seed)):
            image.save(path / f"{i:05d}.png")
        return path
    return build


def _prompts(stand_ins: StandIns, path: Path) -> Path:
    path.write_text("a red circle on the left, blue background\na yellow square at the top, black background\n"
                    "a white triangle in the center, green background\n", encoding="utf-8")
    return path


def _inception_weights(stand_ins: StandIns, path: Path) -> Path:
    from latentdiff.metrics.inception import FID_WEIGHTS, InceptionV3

    cached = stand_ins.torch_home / "hub" / "checkpoints" / FID_WEIGHTS.filename
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(InceptionV3(pretrained=False, seed=0).state_dict(), cached)
    path.symlink_to(cached)
    return path


FILES: dict[str, Callable[[StandIns, Path], Path]] = {
    "v1-5-pruned-emaonly.safetensors": _single_file,
    "vae-ft-mse-840000-ema-pruned.ckpt": _vae_ckpt,
    "v1-inference.yaml": _original_config,
    "data/val": _image_folder(seed=1),
    "samples": _image_folder(seed=2),
    "originals": _image_folder(seed=3),
    "reconstructions": _image_folder(seed=4),
    "prompts.txt": _prompts,
    "pt_inception-2015-12-05-6726825d.pth": _inception_weights,
}
METRICS_WORDS = ("pt_inception", "latentdiff eval", "load_inception")   # pages that need the Inception stand-in
# Hub ids of SDXL pages -> the tiny diffusers SDXL kind (tests/_support/sdxl.py) put in the Hub cache for them
SDXL_IDS = {"stabilityai/stable-diffusion-xl-base-1.0": "base",
            "stabilityai/stable-diffusion-xl-refiner-1.0": "refiner"}


def sdxl_hub_entries(stand_ins: StandIns, page_text: str) -> None:
    """The tiny SDXL base / refiner in the stand-ins' Hub cache under the real ids a page names (built once)."""
    from tests._support.hub_cache import make_hub_cache
    from tests._support.sdxl import tiny_sdxl

    for repo_id, kind in SDXL_IDS.items():
        folder = stand_ins.root / "sdxl" / kind
        if repo_id in page_text and not folder.is_dir():
            tiny_sdxl(folder, kind=kind)
            make_hub_cache(stand_ins.hub_cache, repo_id, folder)


# Hub ids of ControlNet pages -> the seed of a tiny ControlNet of the SD stand-in put in the Hub cache for them
CONTROLNET_IDS = {"lllyasviel/sd-controlnet-canny": 1, "lllyasviel/sd-controlnet-scribble": 2}


def controlnet_hub_entries(stand_ins: StandIns, page_text: str) -> None:
    """Tiny diffusers-layout ControlNets of the SD stand-in under the real ids a page names (built once)."""
    from latentdiff import ControlNet, UNet2DConditional
    from tests._support.hub_cache import make_hub_cache
    from tests._support.parity import randomize_

    for repo_id, seed in CONTROLNET_IDS.items():
        folder = stand_ins.root / "controlnet" / str(seed)
        if repo_id in page_text and not folder.is_dir():
            torch.manual_seed(seed)
            unet = UNet2DConditional.from_pretrained(stand_ins.sd, subfolder="unet")
            randomize_(ControlNet.from_unet(unet, conditioning_embedding_out_channels=(16, 32))).save_pretrained(folder)
            make_hub_cache(stand_ins.hub_cache, repo_id, folder)


def docs_environment(monkeypatch: Any, stand_ins: StandIns, workdir: Path, page_text: str) -> None:
    """Make `workdir` the current directory with what the page names in it; the stand-ins in place of the
    Hub, the built-in model and downloads; the network off. Undone by `monkeypatch`."""
    import huggingface_hub.constants

    from latentdiff import builtin

    monkeypatch.setattr(builtin, "ROOT", stand_ins.builtin.parent)
    monkeypatch.setattr(builtin, "BUILTIN_MODELS", {**builtin.BUILTIN_MODELS, BUILTIN_NAME: stand_ins.builtin.name})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(stand_ins.hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(stand_ins.hub_cache))
    monkeypatch.setenv("TORCH_HOME", str(stand_ins.torch_home))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    from latentdiff.registry import COMPONENTS, PIPELINES, SAMPLERS, _load_builtins

    _load_builtins()
    for registry in (COMPONENTS, SAMPLERS, PIPELINES):   # a page may register parts of its own: not for long
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "examples").symlink_to(ROOT / "examples")
    for name in FILES:
        if name in page_text:
            source, target = stand_ins.file(name), workdir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target)   # a page may write into it: its own copy
            else:
                target.symlink_to(source)
    sdxl_hub_entries(stand_ins, page_text)
    controlnet_hub_entries(stand_ins, page_text)
    if any(word in page_text for word in METRICS_WORDS):
        from latentdiff.metrics import inception

        stand_ins.file("pt_inception-2015-12-05-6726825d.pth")   # the cached release that the default loads
        monkeypatch.setattr(inception, "INPUT_SIZE", inception.MIN_SIZE)
    monkeypatch.chdir(workdir)


def _no_network(*args: Any, **kwargs: Any) -> None:
    raise OSError("the docs tests run offline: a block tried to open a network connection")


# ---- a server for the pages whose client blocks talk to one (docs/serving.md) ----------------------------
SERVED = "127.0.0.1:7860"        # `latentdiff serve`'s default address, as a page's client blocks write it
_CONNECT = socket.socket.connect
_served: list[str] = []          # the address that replaces SERVED while page_server runs


@contextlib.contextmanager
def page_server(monkeypatch: Any, page_text: str) -> Iterator[None]:
    """For a page that names SERVED: a real `latentdiff serve` (uvicorn, the stand-in built-in model) on a free
    loopback port while its blocks run, its address in place of SERVED, and connections to it, and only to it,
    let through. Call after `docs_environment` (which turns the network off)."""
    if SERVED not in page_text:
        yield
        return
    from tests._support.server import running_server

    with running_server() as url:
        address = url.removeprefix("http://")
        host, port = address.rsplit(":", 1)

        def loopback_only(sock: socket.socket, target: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(target, tuple) and target[:2] in ((host, int(port)), ("localhost", int(port))):
                return _CONNECT(sock, target)
            return _no_network()

        monkeypatch.setattr(socket.socket, "connect", loopback_only)
        _served.append(address)
        try:
            yield
        finally:
            _served.remove(address)

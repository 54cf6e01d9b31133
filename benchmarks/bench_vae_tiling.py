"""Tiled VAE decode of a large image: peak memory and time, latentdiff against diffusers, same weights.

- The SD VAE (Stable Diffusion 1.5's config, the random weights of common.py's sd15 folder) decodes one
  256x256 latent (2048 px; 128x128 = 1024 px with --quick) in fp32 with tiling on (512 px tiles, overlap 0.25,
  both libraries' defaults). Each library runs in its own fresh process, which reports its RSS after loading,
  its peak RSS (ru_maxrss) and the decode time. An untiled 2048 px decode would need a 65536 x 65536 mid-block
  attention and 128-channel activations at 2048 x 2048 (sizes in RESULTS.md): it is not run.
- How far tiled is from untiled, where untiled fits (--error-size, default 512 px, in 256 px tiles): the max
  relative error of each library's tiled decode against the untiled decode (the same in both libraries).

    python benchmarks/bench_vae_tiling.py [--quick] [--size 2048] [--no-diffusers] [--error-size 0]

The 2048 px run decodes 25 tiles of 512 px here and 36 in diffusers (6 x 6, the last row and column 128 px
wide): on 2 idle cores it takes a while, on a machine busy with other jobs many times longer (timings in
RESULTS.md, "Figures moved from docstrings"). Run it on a quiet machine.
"""
from __future__ import annotations

import common

CHILD = """
import time, torch
def rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * {page} / 2**20
{load}
rss_after_load = rss_mb()
z = torch.randn((1, 4, {size} // 8, {size} // 8), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    t0 = time.perf_counter()
    image = {decode}
    seconds = time.perf_counter() - t0
RESULT = dict(seconds=seconds, rss_after_load_mb=rss_after_load, shape=list(image.shape),
              finite=bool(torch.isfinite(image).all()), std=float(image.std()))
"""
LIBS = {
    "latentdiff": ("from latentdiff import AutoencoderKL\n"
                   "vae = AutoencoderKL.from_pretrained({folder!r}, subfolder='vae')\n"
                   "vae.enable_tiling(tile_sample_size={tile}, overlap={overlap})",
                   "vae.decode(z)"),
    "diffusers": ("import diffusers\n"
                  "vae = diffusers.AutoencoderKL.from_pretrained({folder!r}, subfolder='vae').eval()\n"
                  "vae.enable_tiling()\n"
                  "vae.tile_sample_min_size, vae.tile_latent_min_size = {tile}, {tile} // 8\n"
                  "vae.tile_overlap_factor = {overlap}",
                  "vae.decode(z).sample"),
}


def child_code(lib: str, folder, *, size: int, tile: int, overlap: float) -> str:
    import os

    load, decode = LIBS[lib]
    load = load.format(folder=str(folder), tile=tile, overlap=overlap)
    return CHILD.format(page=os.sysconf("SC_PAGE_SIZE"), load=load, size=size, decode=decode) + common.CHILD_EXIT


def memory_rows(table: common.Table, args, folder) -> None:
    size = args.size or (1024 if args.quick else 2048)
    libs = ["latentdiff"] + ([] if args.no_diffusers else ["diffusers"])
    for lib in libs:
        code = child_code(lib, folder, size=size, tile=args.tile, overlap=args.overlap)
        result, wall, peak = common.run_child(code, timeout=args.child_timeout)
        tiles = len(tile_grid(size // 8, args.tile // 8, args.overlap, lib)) ** 2
        table.add(lib, f"{size} px", tiles, f"{result['rss_after_load_mb']:.0f} MB", f"{peak:.0f} MB",
                  common.fmt_time(result["seconds"]), "yes" if result["finite"] else "NO",
                  data=dict(lib=lib, size=size, tiles=tiles, **result, peak_rss_mb=peak, wall_s=wall))


def tile_grid(latent: int, tile: int, overlap: float, lib: str) -> list[int]:
    """Tile starts along one axis: ours from vae_tiling, diffusers' a fixed stride of (1 - overlap) * tile."""
    if lib == "diffusers":
        return list(range(0, latent, int(tile * (1 - overlap))))
    from latentdiff.models.vae_tiling import TileSettings, tile_starts

    tile_units, overlap_units = TileSettings(tile_sample_size=tile * 8, overlap=overlap).in_latent_pixels(8)
    return tile_starts(latent, tile_units, overlap_units)


def error_rows(table: common.Table, args, folder) -> None:
    """Tiled against untiled at a size where untiled fits, tiles of half the image side."""
    import diffusers
    import torch

    from latentdiff import AutoencoderKL

    size, tile = args.error_size, args.error_size // 2
    ours = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    theirs = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    z = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ours.decode(z)
        ours.enable_tiling(tile_sample_size=tile, overlap=args.overlap)
        theirs.enable_tiling()
        theirs.tile_sample_min_size, theirs.tile_latent_min_size = tile, tile // 8
        theirs.tile_overlap_factor = args.overlap
        for lib, decode in (("latentdiff", lambda: ours.decode(z)), ("diffusers", lambda: theirs.decode(z).sample)):
            actual = decode()
            mean = float((actual - expected).abs().mean() / expected.abs().mean())
            table.add(lib, f"{size} px in {tile} px tiles", f"{common.max_rel_error(actual, expected):.3f}",
                      f"{mean:.3f}", data=dict(lib=lib, size=size, tile=tile,
                                               max_rel_error=common.max_rel_error(actual, expected),
                                               mean_rel_error=mean))


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="image side in px (default 2048; quick: 1024)")
    p.add_argument("--tile", type=int, default=512, help="tile side in px (default 512, both libraries' default)")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap, a fraction of the tile (default 0.25)")
    p.add_argument("--no-diffusers", action="store_true", help="latentdiff only (diffusers' run is the longer one)")
    p.add_argument("--error-size", type=int, default=512, help="side of the tiled-vs-untiled check (0: skip)")
    p.add_argument("--child-timeout", type=float, default=4 * 3600,
                   help="seconds allowed to each library's process (default 4 h: a loaded machine is slow)")
    args = p.parse_args()
    if common.device_of(args) != "cpu":
        raise SystemExit("this benchmark measures CPU memory (RSS): run it with --device cpu")
    common.header("Tiled VAE decode: peak memory and time", args)
    common.quiet_diffusers()
    folder = common.folder("sd15")
    memory = common.Table("SD VAE tiled decode, fp32, batch 1, each in a fresh process",
                          ("library", "image", "tiles", "RSS after load", "peak RSS", "decode time", "finite"))
    memory_rows(memory, args, folder)
    memory.print()
    tables = [memory]
    if args.error_size:
        error = common.Table("Tiled against untiled decode (same weights)",
                             ("library", "image", "max rel err", "mean rel err"))
        error_rows(error, args, folder)
        error.print()
        tables.append(error)
    common.footer()
    common.write_json(args.json, tables)


if __name__ == "__main__":
    main()

"""The tiny autoencoder (TAESD): latentdiff's AutoencoderTiny against diffusers' on the same random weights, and
against the full Stable Diffusion VAE (the decode it replaces), encode and decode, batch 1, fp32.

Random weights in TAESD's published architecture (diffusers' AutoencoderTiny defaults) and in SD 1.5's VAE
architecture, written once by diffusers and loaded by both libraries; outputs compared first. Rows: latentdiff
AutoencoderTiny / diffusers AutoencoderTiny (the parity peer), then latentdiff AutoencoderTiny / latentdiff
AutoencoderKL (the speed-up of a fast decode or preview).

    python benchmarks/tiny_autoencoder.py [--quick] [--sizes 256 512]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import common
import torch


def build(folder: Path) -> None:
    import diffusers

    torch.manual_seed(0)
    diffusers.AutoencoderTiny().save_pretrained(folder / "taesd")
    sd_vae = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    diffusers.AutoencoderKL(**sd_vae).save_pretrained(folder / "vae")


def calls(ours, theirs, full, image: torch.Tensor, latent: torch.Tensor) -> dict:
    """Zero-argument encode / decode calls of the three first stages on fixed inputs."""
    return {"ours_dec": lambda: ours.decode(latent), "theirs_dec": lambda: theirs.decode(latent).sample,
            "full_dec": lambda: full.decode(latent), "ours_enc": lambda: ours.encode(image),
            "theirs_enc": lambda: theirs.encode(image).latents, "full_enc": lambda: full.encode(image).mode()}


def main() -> None:
    import diffusers

    from latentdiff import AutoencoderKL, AutoencoderTiny

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides (default 256 512; quick: 256)")
    args = p.parse_args()
    common.header("Tiny autoencoder (TAESD)", args)
    sizes = args.sizes or ([256] if args.quick else [256, 512])
    reps = args.reps or (3 if args.quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder)
        ours = AutoencoderTiny.from_pretrained(folder / "taesd").eval()
        theirs = diffusers.AutoencoderTiny.from_pretrained(folder / "taesd").eval()
        full = AutoencoderKL.from_pretrained(folder / "vae").eval()
    peer = common.Table("AutoencoderTiny: latentdiff / diffusers (same weights)", common.COMPARE_COLUMNS)
    speed = common.Table("tiny / full first stage, both latentdiff (ratio column: tiny / full)",
                         common.COMPARE_COLUMNS)
    for size in sizes:
        g = torch.Generator().manual_seed(0)
        image = torch.rand(1, 3, size, size, generator=g) * 2 - 1
        latent = torch.randn(1, 4, size // 8, size // 8, generator=g)
        with torch.inference_mode():
            cases = calls(ours, theirs, full, image, latent)
            dec_err = common.max_rel_error(cases["ours_dec"](), cases["theirs_dec"]())
            enc_err = common.max_rel_error(cases["ours_enc"](), cases["theirs_enc"]())
            times = common.alternate(cases, reps=reps)
        peer.compare(f"decode {size} px", times["ours_dec"], times["theirs_dec"], error=dec_err)
        peer.compare(f"encode {size} px", times["ours_enc"], times["theirs_enc"], error=enc_err)
        speed.compare(f"decode {size} px", times["ours_dec"], times["full_dec"], note="diffusers column: full VAE")
        speed.compare(f"encode {size} px", times["ours_enc"], times["full_enc"], note="diffusers column: full VAE")
    peer.print()
    speed.print()
    common.write_json(args.json, [peer, speed])
    common.footer()


if __name__ == "__main__":
    main()

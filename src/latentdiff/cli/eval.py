"""`latentdiff eval fid|kid|pr|is|stats|psnr|ssim ...`: sample-quality and reconstruction metrics over image
folders (docs/metrics.md). The parser is here; the checks and the computing are `metrics.evaluate.run_eval`'s."""
from __future__ import annotations

import argparse


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="FID, KID, IS, precision/recall, PSNR, SSIM over image folders",
                        description="Sample-quality and reconstruction metrics (see docs/metrics.md).")
    metric = ev.add_subparsers(dest="metric", required=True)
    net = argparse.ArgumentParser(add_help=False)
    net.add_argument("--batch-size", type=int, default=50, help="images per Inception batch")
    net.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    net.add_argument("--workers", type=int, default=0, help="image-decoding processes")
    net.add_argument("--inception-weights", default=None, metavar="PATH",
                     help="FID Inception weights (.pth / .safetensors); default: the release, downloaded once "
                          "(the value 'random' is an untrained network, for testing only)")
    two = {"fid": "Frechet Inception distance (REAL or FAKE may be an .npz of mu, sigma)",
           "kid": "kernel Inception distance", "pr": "improved precision and recall (k-NN manifolds)"}
    for name, text in two.items():
        parser = metric.add_parser(name, parents=[net], help=text, description=text)
        or_stats = " (or its .npz statistics)" if name == "fid" else ""
        parser.add_argument("real", help="folder of real images" + or_stats)
        parser.add_argument("fake", help="folder of generated images" + or_stats)
        if name == "kid":
            parser.add_argument("--subsets", type=int, default=100, help="number of random subsets")
            parser.add_argument("--subset-size", type=int, default=1000, help="images per subset")
        if name == "pr":
            parser.add_argument("--k", type=int, default=3, help="neighbourhood size of the manifold balls")
    score = metric.add_parser("is", parents=[net], help="Inception Score of a folder of generated images")
    score.add_argument("dir")
    score.add_argument("--splits", type=int, default=10)
    stats = metric.add_parser("stats", parents=[net], help="save a folder's FID statistics (mu, sigma) as .npz")
    stats.add_argument("dir")
    stats.add_argument("output", help="the .npz file to write")
    for name in ("psnr", "ssim"):
        paired = metric.add_parser(name, help=f"mean {name.upper()} of images paired by file name")
        paired.add_argument("dir_a")
        paired.add_argument("dir_b")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..metrics.evaluate import run_eval

    return run_eval(args)

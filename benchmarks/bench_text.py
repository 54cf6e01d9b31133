"""The prompt stage: CLIP ViT-L/14 text encoder (Stable Diffusion 1.5), latentdiff against diffusers.

Both pipelines are loaded from the same SD 1.5-size folder (their weights are memory-mapped, so the
UNet and VAE cost nothing here) and their own prompt stage is timed: tokenize the prompt and the negative
prompt, run the text model on each (classifier-free guidance needs both), as a generation does. A second
row times the text model's forward alone on the same token ids (batch 2): both libraries run transformers'
CLIPTextModel, so it should read 1.0x; the difference between the rows is each library's own overhead.

    python benchmarks/bench_text.py [--quick]
"""
from __future__ import annotations

import common
import torch


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    common.header("Text encoder (CLIP ViT-L/14)", args)
    common.quiet_diffusers()
    import diffusers

    from latentdiff import LatentDiffusionPipeline

    device = common.device_of(args)
    folder = common.folder("sd15")
    ours = LatentDiffusionPipeline.from_pretrained(folder, device=device)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder).to(device)
    reps = args.reps or (5 if args.quick else 15)

    def prompt_ours():
        with torch.inference_mode():
            return ours.encode_prompt([common.PROMPT], [common.NEGATIVE])

    def prompt_theirs():
        with torch.inference_mode():
            return theirs.encode_prompt(common.PROMPT, device, 1, True, common.NEGATIVE)

    (cond, uncond), (cond_ref, uncond_ref) = prompt_ours(), prompt_theirs()
    error = max(common.max_rel_error(cond, cond_ref), common.max_rel_error(uncond, uncond_ref))
    ids = ours.text_encoder.tokenize([common.PROMPT, common.NEGATIVE]).to(device)

    def forward_ours():
        with torch.inference_mode():
            return ours.text_encoder.encode_ids(ids)

    def forward_theirs():
        with torch.inference_mode():
            return theirs.text_encoder(ids)[0]

    forward_error = common.max_rel_error(forward_ours(), forward_theirs())
    table = common.Table("CLIP-L text encoder, fp32", common.COMPARE_COLUMNS)
    times = common.alternate({"ours": prompt_ours, "theirs": prompt_theirs}, reps=reps, warmup=1, device=device)
    table.compare("encode prompt + negative prompt (pipeline stage)", times["ours"], times["theirs"], error=error)
    times = common.alternate({"ours": forward_ours, "theirs": forward_theirs}, reps=reps, warmup=1, device=device)
    table.compare("text model forward on token ids, batch 2", times["ours"], times["theirs"], error=forward_error)
    table.print()
    common.footer()
    common.write_json(args.json, [table])


if __name__ == "__main__":
    main()

"""Generating images as `latentdiff generate` and `latentdiff serve` both do, on a layer below both (the server
never imports the command line): the settings of a run and the pipeline they load (`settings`), Stable Diffusion
XL's calls (`sdxl`). The command line's modules (`cli.generate`, `cli.generate_settings`, `cli.generate_sdxl` ...)
re-export these names where they were.
"""

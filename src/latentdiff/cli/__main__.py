"""`python -m latentdiff.cli ...` (what `accelerate launch -m latentdiff.cli` runs): the `latentdiff` command."""
import sys

from .main import main

sys.exit(main())

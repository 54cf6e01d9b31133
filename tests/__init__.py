"""Tests of latentdiff; the subpackages mirror src/latentdiff/ (see CONTRIBUTING.md)."""

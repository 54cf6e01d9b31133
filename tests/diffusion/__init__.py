"""Tests of latentdiff.diffusion."""

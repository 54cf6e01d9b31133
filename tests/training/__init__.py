"""Tests of latentdiff.training."""

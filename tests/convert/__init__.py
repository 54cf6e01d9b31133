"""Tests of latentdiff.convert."""

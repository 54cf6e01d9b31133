"""Tests of latentdiff.layers."""

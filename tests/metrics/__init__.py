"""Tests of latentdiff.metrics."""

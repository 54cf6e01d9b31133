"""Tests of latentdiff.utils."""

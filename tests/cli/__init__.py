"""Tests of latentdiff.cli."""

"""Tests of latentdiff.models."""

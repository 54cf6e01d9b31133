"""Tests of latentdiff.pipelines."""

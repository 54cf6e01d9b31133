"""Tests of latentdiff.data; public_api.json here is the reference of tests/test_public_api.py."""

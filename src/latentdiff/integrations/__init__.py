"""Bridges to engines that run latentdiff at scale (`integrations.ray`: a batch predictor for Ray Data)."""

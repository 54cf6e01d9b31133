"""Evaluation metrics: image fidelity (PSNR, SSIM) and, later, sample quality (FID, IS)."""

"""Training: losses (first stage: LPIPS, patch discriminator, AutoencoderLoss), loops, EMA."""

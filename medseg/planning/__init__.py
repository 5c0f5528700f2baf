"""Dataset fingerprint and nnU-Net-style self-configuration."""

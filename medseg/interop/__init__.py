"""Bridges to other frameworks' trained models (nnU-Net v2 results folders)."""

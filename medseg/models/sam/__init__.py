"""Segment-Anything family: TinyViT (LiteMedSAM) encoder, SAM prompt encoder and mask decoder."""

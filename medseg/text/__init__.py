"""Frozen sentence encoders for text-conditioned models (optional extra ``medseg[text]``)."""

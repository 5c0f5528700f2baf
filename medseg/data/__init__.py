"""Training data: the preprocessed cache, splits and the patch sampler."""

"""Pure array functions: crop to non-zero, resample, normalise."""

"""Applications built on the spine."""

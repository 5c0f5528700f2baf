"""``python -m medseg.cli``: the medseg command line."""

from medseg.cli import main

main()

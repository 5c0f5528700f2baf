"""``python -m medseg``: the same as the ``medseg`` command (useful under torchrun: ``torchrun -m medseg``)."""

from medseg.cli import main

if __name__ == "__main__":
    main()

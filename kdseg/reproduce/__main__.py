"""``python -m kdseg.reproduce``: see :mod:`kdseg.reproduce.main`."""

from kdseg.reproduce.main import main

main()

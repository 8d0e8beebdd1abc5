"""``python -m mergescale`` is the ``mergescale`` command."""

from mergescale.cli import main

main()

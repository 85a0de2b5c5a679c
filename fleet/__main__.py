"""``python -m fleet``: the same as the ``fleet`` console script."""

from fleet._cli import main

main()

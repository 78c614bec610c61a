"""``python -m pvt`` (see :mod:`pvt.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()

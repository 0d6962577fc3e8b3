"""``python -m diffserve ...`` is the ``diffserve`` command."""
from diffserve.api.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

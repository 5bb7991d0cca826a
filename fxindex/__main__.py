"""``python -m fxindex``: the same command as the ``fxindex`` console script."""

from __future__ import annotations

from fxindex._cli import main

if __name__ == "__main__":
    raise SystemExit(main())

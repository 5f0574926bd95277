"""``python -m ndo``: the ``ndo`` command (the same as the ``ndo`` script)."""

from ndo.ops.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())

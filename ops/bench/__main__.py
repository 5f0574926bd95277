"""``python -m ndo.ops.bench``: the same as ``ndo bench`` without the ``ndo`` command."""

from ndo.ops.bench._cli import main

__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())

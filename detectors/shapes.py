"""``python -m detectors.shapes --out DIR``: write the synthetic shapes dataset (see detectors.data.shapes)."""

from detectors.data.shapes import main

if __name__ == "__main__":
    raise SystemExit(main())

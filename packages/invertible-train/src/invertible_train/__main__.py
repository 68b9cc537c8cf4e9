"""``python -m invertible_train MODEL DATASET [options]``: the same as ``invertible-train``."""

from invertible_train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Run ``invertible-train`` in a subprocess with the tiny test models registered."""

import sys

import tiny_model

from invertible_train.cli import main

if __name__ == "__main__":
    tiny_model.register()
    sys.exit(main(sys.argv[1:]))

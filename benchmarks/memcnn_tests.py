"""MemCNN's own model tests, run against invertible-core through a thin alias.

MemCNN 1.5.2 ships its tests inside its wheel (``memcnn/models/tests``). This script copies
them into a scratch folder beside a package named ``memcnn`` whose modules re-export
invertible-core's names under MemCNN's (``memcnn.AdditiveCoupling`` is
``invertible_core.AdditiveCoupling``, ...), runs them with pytest, and prints the counts
(``--json`` writes them). Install MemCNN first, without its dependencies
(``pip install --no-deps memcnn==1.5.2``; ``tox -e bench`` does).

Two adaptations, each a documented difference (packages/invertible-core/README.md, "Migrating
from MemCNN"), are made and reported, never hidden:

- MemCNN's ``is_memory_cleared`` asserts that the wrapper *freed* its input's storage;
  invertible-core never frees a caller's tensor, so the helper asserts the storage intact.
- Tests that need CUDA, torchvision's CIFAR download or MemCNN's own ResNets/trainers are
  not copied (``test_amp``, ``test_resnet``, ``test_memory_saving``).

    python benchmarks/memcnn_tests.py [--json benchmarks/results/memcnn_tests.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata, util
from pathlib import Path

ALIAS = {
    "__init__.py": "from invertible_core import (AdditiveCoupling, AffineAdapterNaive, "
    "AffineAdapterSigmoid, AffineCoupling, InvertibleModuleWrapper, ReversibleBlock, "
    "create_coupling, is_invertible_module)\n",
    "models/__init__.py": "",
    "models/additive.py": "from invertible_core import AdditiveCoupling\nAdditiveBlock = AdditiveCoupling\n",
    "models/affine.py": "from invertible_core import AffineAdapterNaive, AffineAdapterSigmoid, "
    "AffineCoupling\nAffineBlock = AffineCoupling\n",
    "models/revop.py": "from invertible_core import InvertibleModuleWrapper, ReversibleBlock, "
    "create_coupling, is_invertible_module\n"
    "from torch.utils.checkpoint import get_device_states, set_device_states\n",
}
NOT_COPIED = ("test_amp.py", "test_resnet.py", "test_memory_saving.py")
INTACT = """def is_memory_cleared(var, isclear, shape):
    # invertible-core never frees a caller's storage (MemCNN freed it): intact either way
    return var.storage().size() > 0 and var.shape == shape
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the counts here")
    args = parser.parse_args(argv)
    spec = util.find_spec("memcnn")
    if spec is None or spec.origin is None:
        print("memcnn is not installed: pip install --no-deps memcnn==1.5.2", file=sys.stderr)
        return 2
    tests = Path(spec.origin).parent / "models" / "tests"
    with tempfile.TemporaryDirectory(prefix="memcnn-alias-") as scratch:
        root = Path(scratch)
        for name, text in ALIAS.items():
            (root / "memcnn" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "memcnn" / name).write_text(text)
        target = root / "memcnn" / "models" / "tests"
        shutil.copytree(tests, target, ignore=shutil.ignore_patterns("__pycache__", *NOT_COPIED))
        revop = target / "test_revop.py"
        revop.write_text(
            re.sub(
                r"def is_memory_cleared\(var, isclear, shape\):\n(    .*\n)+",
                INTACT,
                revop.read_text(),
            )
        )
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-W",
                "ignore",
                str(target),
            ],
            cwd=root,
            capture_output=True,
            text=True,
        )
    tail = run.stdout.strip().splitlines()
    counts = {
        k: int(v)
        for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail[-1] if tail else "")
    }
    failed = [line.split(" ")[1] for line in tail if line.startswith("FAILED")]
    print(f"MemCNN {metadata.version('memcnn')}'s model tests against invertible-core: {counts}")
    for name in failed:
        print(f"  failed: {name}")
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "failed": failed}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Rewrite the READMEs' headline tables from the benchmark records (or check them).

    python docs/_ext/readme_headlines.py           # rewrite every README's marked block
    python docs/_ext/readme_headlines.py --check    # exit 1 when a README's block is stale

What goes in each table: ``docs/_ext/benchmark_results/headline.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_results.headline import HEADLINES, headline_block, replace_block
from benchmark_results.records import RecordError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    args = parser.parse_args(argv)
    stale = []
    for headline in HEADLINES:
        text = headline.path.read_text(encoding="utf-8")
        try:
            new = replace_block(text, headline_block(headline), headline.readme)
        except (RecordError, ValueError) as error:
            print(f"{headline.readme}: {error}", file=sys.stderr)
            return 2
        if new != text:
            stale.append(headline.readme)
            if not args.check:
                headline.path.write_text(new, encoding="utf-8")
    verb = "stale" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "every headline table is up to date")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())

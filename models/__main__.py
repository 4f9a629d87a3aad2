"""Offline commands.

python -m models eval --data DIR [--out artifacts]   train all strategies, write the report
python -m models precision-cost --data DIR [--out artifacts]   float16 / int8 serving cost
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m models", description="fusionrank offline jobs")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser(
        "eval", help="train every fusion strategy and baseline, write artifacts/eval/"
    )
    ev.add_argument("--data", type=Path, default=Path("data/sample"), help="catalogue directory")
    ev.add_argument("--out", type=Path, default=Path("artifacts"), help="artifacts directory")
    cost = sub.add_parser(
        "precision-cost",
        help="ranking quality with float16 features and the int8 query encoder (vs float32)",
    )
    cost.add_argument("--data", type=Path, default=Path("data/sample"), help="catalogue directory")
    cost.add_argument("--out", type=Path, default=Path("artifacts"), help="artifacts directory")
    args = parser.parse_args()

    if args.command == "precision-cost":
        from models.precision_cost import precision_cost

        print(json.dumps(precision_cost(args.data, args.out), indent=2))
        return

    from models.evaluate import run

    report = run(args.data, args.out)
    print((args.out / "eval" / "report.md").read_text())
    print(json.dumps({"default": report["default"], "wall_seconds": report["wall_seconds"]}))


if __name__ == "__main__":
    main()

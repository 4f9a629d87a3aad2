"""python -m export --data DIR [--out artifacts] [--strategy S] [--redis-url URL]

Train (when no checkpoint fits) -> export -> publish. Idempotent: rerunning on unchanged
inputs reuses the exported version and publishes nothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from models.ranker import STRATEGIES


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path("data/sample"), help="catalogue directory"
    )
    parser.add_argument("--out", type=Path, default=Path("artifacts"), help="artifacts directory")
    parser.add_argument("--strategy", choices=STRATEGIES, help="default: the evaluation's choice")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("FUSIONRANK_REDIS_URL") or None,
        help="publish features to this Redis (default: $FUSIONRANK_REDIS_URL, else embedded store)",
    )
    parser.add_argument(
        "--redis-prefix", default=os.environ.get("FUSIONRANK_REDIS_PREFIX", "fusionrank")
    )
    parser.add_argument("--index-factory", default="auto", help="FAISS factory string or auto")
    parser.add_argument(
        "--index-shards",
        type=int,
        default=1,
        help="cut the index into N shard files (a new export only: an exported version is reused)",
    )
    args = parser.parse_args()

    from export.pipeline import run

    report = run(
        args.data,
        args.out,
        strategy=args.strategy,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        index_factory=args.index_factory,
        index_shards=args.index_shards,
    )
    print(f"current model: {report.version} ({report.version_dir})")


if __name__ == "__main__":
    main()

"""python -m export --data DIR [--out artifacts] [--strategy S] [--redis-url URL]

Train (when no checkpoint fits) -> export -> publish. Idempotent: rerunning on unchanged
inputs reuses the exported version and publishes nothing. Publishing keeps the newest
--keep-versions feature versions and every version superseded less than --retention-grace-s
ago (replicas may still serve them) and removes the rest; --retire-only applies that rule
and does nothing else.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from models.ranker import STRATEGIES
from service.features import Retention


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
    parser.add_argument(
        "--keep-versions",
        type=int,
        default=int(os.environ.get("FUSIONRANK_FEATURE_KEEP_VERSIONS", "2")),
        help="newest feature versions kept in the store (default: "
        "$FUSIONRANK_FEATURE_KEEP_VERSIONS, else 2)",
    )
    parser.add_argument(
        "--retention-grace-s",
        type=float,
        default=float(os.environ.get("FUSIONRANK_FEATURE_RETENTION_GRACE_S", "600")),
        help="older versions are kept until superseded this long ago (default: "
        "$FUSIONRANK_FEATURE_RETENTION_GRACE_S, else 600)",
    )
    parser.add_argument(
        "--retire-only",
        action="store_true",
        help="only remove the feature versions the retention rule no longer keeps",
    )
    parser.add_argument("--index-factory", default="auto", help="FAISS factory string or auto")
    parser.add_argument(
        "--index-shards",
        type=int,
        default=1,
        help="cut the index into N shard files (a new export only: an exported version is reused)",
    )
    args = parser.parse_args()
    try:
        retention = Retention(keep=args.keep_versions, grace_s=args.retention_grace_s)
    except ValueError as exc:
        parser.error(str(exc))

    if args.retire_only:
        from service.features import open_feature_store

        store = open_feature_store(args.redis_url, args.out / "features", prefix=args.redis_prefix)
        try:
            removed = store.retire(retention)
            print(f"current features: {store.current_version()}; kept {store.versions()}")
        finally:
            store.close()
        print(f"removed feature versions: {', '.join(removed) or 'none'}")
        return

    from export.pipeline import run

    report = run(
        args.data,
        args.out,
        strategy=args.strategy,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        index_factory=args.index_factory,
        index_shards=args.index_shards,
        retention=retention,
    )
    print(f"current model: {report.version} ({report.version_dir})")


if __name__ == "__main__":
    main()

"""``python -m service``: serve the app with uvicorn (uvloop + httptools) as Settings say.

Every setting comes from a FUSIONRANK_* environment variable (see service/settings.py), e.g.

    FUSIONRANK_ARTIFACTS_DIR=artifacts FUSIONRANK_WORKERS=2 python -m service
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from service.settings import Settings


def main() -> None:
    settings = Settings()
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Set before any worker imports prometheus_client: each worker then writes its metrics
        # to files here and /metrics merges them, whichever worker answers.
        directory = tempfile.mkdtemp(prefix="fusionrank-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        atexit.register(shutil.rmtree, directory, ignore_errors=True)

    import uvicorn

    uvicorn.run(
        "service.app:create_app",
        factory=True,  # each worker builds its app from the same environment
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=settings.access_log,
        log_level=settings.log_level,
        # SIGTERM: stop accepting, let in-flight requests finish (at most this long), then
        # run the lifespan's shutdown.
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


if __name__ == "__main__":
    main()

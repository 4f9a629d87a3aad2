"""``python -m service.healthcheck``: exit 0 when this host's service answers /readyz with 200.

The container image's HEALTHCHECK. It reads FUSIONRANK_HOST and FUSIONRANK_PORT as the
service does, and imports nothing but the standard library (it runs every few seconds).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
TIMEOUT_S = 3.0


def readyz_url() -> str:
    host = os.environ.get("FUSIONRANK_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in WILDCARD_HOSTS else host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{os.environ.get('FUSIONRANK_PORT', '8000')}/readyz"


def main() -> int:
    url = readyz_url()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status, body = response.status, response.read(2000)
    except urllib.error.HTTPError as exc:  # 503: not ready, with the reason in the body
        status, body = exc.code, exc.read(2000)
    except (OSError, ValueError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: {status} {body.decode(errors='replace')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

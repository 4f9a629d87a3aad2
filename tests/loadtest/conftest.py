from __future__ import annotations

import socket

import pytest

# The service suite's real-Redis fixtures, for the commands that need stores (cluster_rank).
from tests.service.conftest import (  # noqa: F401
    redis_cluster_ports,
    redis_cluster_url,
    redis_url,
    sample_redis_store,
    sample_version_dir,
)


@pytest.fixture
def closed_port() -> int:
    """A local port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

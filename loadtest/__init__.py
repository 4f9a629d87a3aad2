"""Load and latency tools that drive a running service (never run by the tests)."""

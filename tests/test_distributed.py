"""Sharded quantization and inference on 4 CPU devices (issue: scale past one device). The cases live in
distributed_cases.py and run in a subprocess, because the device count is fixed when JAX starts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def test_distributed_cases():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(here, "distributed_cases.py")], cwd=os.path.dirname(here), env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

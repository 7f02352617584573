"""Shared fixtures: tiny random-config models written as Hugging Face directories."""

from __future__ import annotations

import os

import sys

from mlx_dupq._env import preload_env

os.environ.setdefault("MLX_DUPQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mlx_dupq"))

import pytest  # noqa: E402

from tests.tiny import make_hf_dir  # noqa: E402


def pytest_configure(config):
    """Restart pytest once with OpenBLAS preloaded: mlx's Linux CPU fp32 matmuls get ~80x faster."""
    env = preload_env()
    if env is None:
        return
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.stop_global_capturing()  # give the new process the real stdout/stderr
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        pass  # run without the preload


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{model_type: path} of tiny random HF model directories (qwen2, llama, deepseek)."""
    root = tmp_path_factory.mktemp("tiny")
    return {t: make_hf_dir(root / t, t) for t in ("qwen2", "llama", "deepseek")}


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory):
    """A small English calibration file (the MoE tests' default; modules with other text override it)."""
    p = tmp_path_factory.mktemp("calib_en") / "calib.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. hello world, this is a tiny test corpus. " * 100)
    return p

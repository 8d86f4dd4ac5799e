"""The embedded server's allocator: the preload it is started with, and what it reads back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.ops import embedded


def test_mimalloc_goes_first_and_keeps_a_preload_already_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(embedded, "mimalloc_library", lambda: Path("/opt/m/libmimalloc.so"))
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    env = embedded.server_env("mimalloc")
    assert env is not None and env["LD_PRELOAD"] == "/opt/m/libmimalloc.so /opt/other.so"
    monkeypatch.delenv("LD_PRELOAD")
    env = embedded.server_env("mimalloc")
    assert env is not None and env["LD_PRELOAD"] == "/opt/m/libmimalloc.so"


@pytest.mark.parametrize("where", ["/opt/a b/libmimalloc.so", "/opt/a:b/libmimalloc.so"])
def test_a_path_the_loader_would_split_is_not_preloaded(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setattr(embedded, "mimalloc_library", lambda: Path(where))
    assert embedded.server_env("mimalloc") is None


def test_libc_or_no_wheel_leaves_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert embedded.server_env("libc") is None
    monkeypatch.setattr(embedded, "mimalloc_library", lambda: None)
    assert embedded.server_env("mimalloc") is None


def test_the_installed_wheel_is_found() -> None:
    lib = embedded.mimalloc_library()
    assert lib is not None and lib.is_file() and lib.name == "libmimalloc.so"


def test_what_runs_is_read_from_the_process_mappings() -> None:
    assert embedded.running_allocator(os.getpid()) == "libc"  # pytest itself: glibc's
    assert embedded.running_allocator(2**22 + 7) == "libc"  # no such process

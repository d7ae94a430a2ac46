"""Shared test fixtures: a private BLAZIL_HOME so tests never touch the user's cache."""

from __future__ import annotations

import os
import pathlib

import pytest


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _offline_hub() -> None:
    # Nothing may reach a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny random Qwen2 checkpoint (fixed seed) with the Qwen2.5 tokenizer; tests copy it before changing it."""
    from blazil_ai.pipeline.random_model import save_tiny_checkpoint
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), seed=0)


def _process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def process_gone():
    """``process_gone(pid)``: whether that process has exited (for tests that kill things)."""
    return _process_gone


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module whose stage processes run with ``threads=1``.

    Hugging Face's reference must use the same thread count as the stages: float32 sums on a CPU split
    by thread count, so one thread and two give other last bits.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tigerbeetle(tmp_path_factory: pytest.TempPathFactory):
    """A fresh single-replica TigerBeetle cluster (formatted in a temp dir) when BLAZIL_TIGERBEETLE_BIN names the
    server binary; the test is skipped, with that reason, otherwise. Yields the running replica (``.address``)."""
    from blazil_ai.ledger.tigerbeetle_replica import ENV_BINARY, TigerBeetleReplica, binary_from_env

    binary = binary_from_env()
    if binary is None:
        pytest.skip(f"{ENV_BINARY} is not set: no TigerBeetle server binary to start a replica from "
                    "(.ci/run sets it when ../shared/tigerbeetle/tigerbeetle exists)")
    with TigerBeetleReplica(binary, tmp_path_factory.mktemp("tigerbeetle")) as replica:
        yield replica

"""Shared test fixtures. Every test runs with a private BLAZIL_HOME and HF_HOME (``_private_caches``), so no
test reads or writes the user's cache."""

from __future__ import annotations

import os
import pathlib

import pytest


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory: pytest.TempPathFactory):
    """Point the project's cache (BLAZIL_HOME: built models, sample sets) and Hugging Face's (HF_HOME) at
    empty folders of this run; restore them afterwards.

    The project reads BLAZIL_HOME at each use, and every process a test starts inherits both. Hugging Face
    reads HF_HOME once, when first imported, which in this process may come before the fixture (with
    HF_HUB_OFFLINE set nothing is fetched into it either way).
    """
    names = {"BLAZIL_HOME": "blazil-home", "HF_HOME": "hf-home"}
    before = {name: os.environ.get(name) for name in names}
    for name, folder in names.items():
        os.environ[name] = str(tmp_path_factory.mktemp(folder))
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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

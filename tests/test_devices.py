"""Which device and process-group backend each data-parallel rank takes, with a faked GPU count
(CI has no GPU): torchrun's LOCAL_RANK picks the rank's GPU, CUDA tensors go over nccl and CPU
ones over gloo; without CUDA every rank stays on the CPU with gloo, as before."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from mlsae_core import train
from mlsae_core.config import ConfigError, resolve_device


@pytest.fixture
def gpus(monkeypatch):
    """`gpus(n)`: torch.cuda reports n devices; returns the list `set_device` calls append to."""

    def install(count: int) -> list:
        chosen: list = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen

    return install


@pytest.fixture
def group(monkeypatch) -> list[str]:
    """torch.distributed without processes: the backends `init_process_group` was given."""
    inits: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(inits))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: inits.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: int(os.environ["RANK"]))
    monkeypatch.setattr(dist, "get_world_size", lambda: int(os.environ["WORLD_SIZE"]))
    return inits


def _torchrun(monkeypatch, rank: int, world: int, local_rank: int) -> None:
    """The environment torchrun gives one of its processes."""
    for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)):
        monkeypatch.setenv(key, str(value))


@pytest.mark.parametrize("setting", ["auto", "cuda"])
def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch, gpus, group, setting):
    """4 GPUs per machine, 2 machines: global rank r runs on cuda:<r mod 4>, set as the current
    device before the group is joined (nccl's collectives use the current device)."""
    chosen = gpus(4)
    for rank in range(8):
        _torchrun(monkeypatch, rank, 8, rank % 4)
        group.clear()
        chosen.clear()
        assert train.dist_info() == (rank, 8)
        assert chosen == [f"cuda:{rank % 4}"]
        assert group == ["cpu:gloo,cuda:nccl"]
        assert resolve_device(setting) == f"cuda:{rank % 4}"
        assert resolve_device("cpu") == "cpu"  # a CPU run on a GPU machine: gloo carries it


def test_without_cuda_every_rank_stays_on_cpu_with_gloo(monkeypatch, gpus, group):
    chosen = gpus(0)
    for rank in range(2):
        _torchrun(monkeypatch, rank, 2, rank)
        group.clear()
        assert train.dist_info() == (rank, 2)
        assert group == ["gloo"] and chosen == []
        assert resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device is visible; use 'cpu'"):
        resolve_device("cuda")


def test_more_ranks_than_gpus_is_refused_naming_nproc_per_node(monkeypatch, gpus, group):
    gpus(2)
    _torchrun(monkeypatch, 2, 3, 2)
    with pytest.raises(ConfigError, match="LOCAL_RANK=2 .* 2 are visible.*--nproc_per_node 2"):
        train.dist_info()
    assert group == []  # refused before joining a group the other ranks would wait on


def test_one_process_uses_the_first_gpu_and_no_group(monkeypatch, gpus, group):
    chosen = gpus(2)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert train.dist_info() == (0, 1)
    assert group == [] and chosen == []
    assert resolve_device("auto") == "cuda:0"

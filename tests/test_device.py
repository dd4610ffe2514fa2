"""One device setting (train.device, eval.device): auto | cpu | cuda | cuda:N, resolved the same way
by every stage; CUDA asked for where there is none is a ConfigError naming the field."""

from __future__ import annotations

import pytest
import torch

from common.config import ConfigError, TrainConfig
from gptbert.device import DeviceError, resolve_device, wants_cuda
from gptbert.distributed.ray_launcher import ray_workers

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")


def test_device_values_are_checked_by_the_config():
    for value in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert TrainConfig(device=value).device == value
    for value in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(ConfigError) as err:
            TrainConfig(device=value)
        assert err.value.field == "device" and "auto, cpu, cuda, cuda:N" in str(err.value)


def test_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert wants_cuda("cuda") and wants_cuda("cuda:3") and not wants_cuda("auto") and not wants_cuda("cpu")


@NO_CUDA
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_without_cuda_names_the_field(spec):
    with pytest.raises(DeviceError) as err:
        resolve_device(spec, "eval.device")
    assert err.value.field == "eval.device"
    assert str(err.value).startswith("config field 'eval.device': ") and "no CUDA device" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a GPU")
def test_a_device_index_past_the_last_gpu_is_refused():
    n = torch.cuda.device_count()
    assert resolve_device(f"cuda:{n - 1}") == torch.device("cuda", n - 1)
    with pytest.raises(DeviceError, match=f"has {n} CUDA device"):
        resolve_device(f"cuda:{n}")


@pytest.mark.parametrize("device, workers, gpus, expected", [
    ("cpu", 0, 0, (False, 1)),
    ("cpu", 3, 8, (False, 3)),      # cpu never takes the cluster's GPUs
    ("auto", 0, 0, (False, 1)),
    ("auto", 2, 0, (False, 2)),
    ("auto", 0, 8, (True, 8)),      # one worker per GPU by default
    ("cuda", 0, 16, (True, 16)),
    ("cuda", 4, 16, (True, 4)),
])
def test_ray_workers_follow_train_device_and_the_cluster(device, workers, gpus, expected):
    assert ray_workers(device, workers, gpus) == expected


def test_ray_workers_refuse_what_the_cluster_cannot_give():
    with pytest.raises(DeviceError) as err:
        ray_workers("cuda", 0, 0)
    assert err.value.field == "train.device" and "no GPU" in str(err.value)
    with pytest.raises(ConfigError) as err:
        ray_workers("auto", 4, 2)
    assert err.value.field == "launch.num_workers" and "has 2" in str(err.value)

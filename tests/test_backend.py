import warnings

import pytest
import torch

import rlhf_fast as rf
from rlhf_fast import backend


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.select("gae", None, torch.device("cpu")) == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=backend.ENV_VAR):
        backend.select("gae", None, torch.device("cpu"))
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    assert backend.select("gae", "torch", torch.device("cpu")) == "torch"  # the argument wins


def test_auto_on_cpu_picks_the_cpp_kernels():
    assert backend.select("gae", "auto", torch.device("cpu")) == "cpu"


def test_explicit_cuda_on_cpu_tensors_raises_with_reason():
    with pytest.raises(rf.BackendUnavailable, match="cuda backend runs CUDA tensors"):
        rf.gae(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(rf.BackendUnavailable, match="TRITON_INTERPRET=1"):
        rf.gae(torch.randn(2, 3), torch.randn(2, 3), backend="triton")


def test_auto_falls_back_once_with_a_warning(monkeypatch):
    monkeypatch.setattr(backend, "_compiled", None)
    monkeypatch.setattr(backend, "_compiled_error", "compiled library rlhf_fast._C failed to load: test")
    monkeypatch.setattr(backend, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend.select("gae", "auto", torch.device("cpu")) == "torch"
        assert backend.select("gae", "auto", torch.device("cpu")) == "torch"
    messages = [str(w.message) for w in caught if "runs on the torch backend" in str(w.message)]
    assert len(messages) == 1 and "failed to load" in messages[0]


def test_status_reports_every_backend():
    status = backend.status()
    assert set(status) == {"torch", "cpu", "cuda", "triton"}
    assert status["torch"] is None
    if not torch.cuda.is_available():
        assert "no CUDA device" in status["cuda"]

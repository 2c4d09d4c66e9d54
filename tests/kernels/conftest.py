"""Fixtures of the native-engine tests: every instruction set this machine runs, a seeded generator."""
import pytest
import torch

from kernels import native

#: the instruction sets the native engine can run here (the CI machine's CPU decides which)
ISAS = [name for name, runs in native.isas() if runs] if native.available() else []


@pytest.fixture(params=ISAS)
def isa(request):
    with native.using_isa(request.param):
        yield request.param


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20261203)

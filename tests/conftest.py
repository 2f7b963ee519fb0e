"""Test-session setup shared by every test module."""

import os

# Triton kernels run on the CPU through Triton's interpreter in the tests. The variable must be set before anything
# imports triton (torch and kornia may do so on import), so it is set here, before any test module is collected.
# On a machine with a GPU, run the suite with TRITON_INTERPRET=0 to test the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

# No thread count is pinned: the short training runs (a few epochs that must beat chance, an AUROC above 0.5) pass
# with 1 intra-op thread as with 2 (the whole suite was run both ways), so they do not hang on the order of float
# reductions that the thread count sets.

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The built-in digits shards with 40% symmetric noise, built once for the whole session."""
    from ccl.pipeline.convert import ensure_digits

    return ensure_digits(tmp_path_factory.mktemp("digits"), noise="sym", rate=0.4, seed=0)


@pytest.fixture
def float64():
    """float64 as torch's default dtype for one test: loss references compared to 1e-10."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

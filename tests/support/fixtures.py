"""pytest fixtures shared by the unit and integration suites (loaded from tests/conftest.py)."""

import pytest

from fake_llm import FakeLLM
from release_server import ReleaseServer
from sigstore_lab import PrivateSigstore


@pytest.fixture(scope="session")
def lab():
    """One private test Sigstore for the whole run (keys are generated in-process, offline)."""
    return PrivateSigstore()


@pytest.fixture(scope="session")
def lab_root(lab, tmp_path_factory):
    """The lab's trusted_root.json on disk."""
    return lab.write_trusted_root(tmp_path_factory.mktemp("trust") / "trusted_root.json")


@pytest.fixture
def release_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/releases as GitHub lays releases out."""
    root = tmp_path / "releases"
    root.mkdir()
    with ReleaseServer(root) as server:
        yield server


@pytest.fixture(scope="session")
def fake_llm():
    """One fake Ollama-compatible LLM provider on 127.0.0.1 for the whole run (tests/support/fake_llm.py).
    Configure a host with `providers: {ollama: {baseUrl: fake_llm.base_url}}`. Its faults are reset around every
    test that uses it; a test that needs a failing or slow provider is better served by its own FakeLLM()."""
    with FakeLLM() as llm:
        yield llm


@pytest.fixture
def llm(fake_llm):
    """The session's fake LLM with its faults reset before and after the test."""
    fake_llm.set_faults()
    yield fake_llm
    fake_llm.set_faults()

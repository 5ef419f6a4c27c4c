"""pytest fixtures shared by the unit and integration suites (loaded from tests/conftest.py)."""

import pytest

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

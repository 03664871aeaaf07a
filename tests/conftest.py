"""Shared test setup: every test is hermetic with respect to the real MNIST.

CI exports $MNIST_DIR so that the training commands find the real data; the unit tests must
not depend on it (they write tiny IDX files instead), and a test that checks behaviour without
data would otherwise fall through --data-dir to $MNIST_DIR and find it.
"""

import pytest


@pytest.fixture(autouse=True)
def _no_mnist_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MNIST_DIR", raising=False)

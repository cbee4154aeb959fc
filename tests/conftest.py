"""Shared test set-up.

Service fixtures (S3, SLURM, Ray, Prometheus) live in tests/fixtures/, one module per
service, registered as plugins below; each service is started once per test session on a
loopback port chosen at random and stopped by its process id. Plain helpers (no fixtures)
live in tests/support/.
"""

import pytest
import torch

pytest_plugins = [
    "fixtures.datasets",
    "fixtures.faults",
    "fixtures.prometheus",
    "fixtures.ray",
    "fixtures.s3",
    "fixtures.slurm",
]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; the CPU path is tested with tiny models")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)

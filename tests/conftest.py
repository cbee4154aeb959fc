"""Shared test set-up.

Service fixtures (S3, SLURM, Ray, Prometheus) live in tests/fixtures/*.py, one module per
service, and are imported here so every test module can use them. Each service is started
once per test session on a loopback port chosen at random and stopped by its process id.
"""

import importlib
import pathlib
import sys

import pytest
import torch

_here = pathlib.Path(__file__).parent
if str(_here) not in sys.path:
    sys.path.insert(0, str(_here))

for _path in sorted((_here / "fixtures").glob("*.py")):
    if _path.stem.startswith("_"):
        continue
    _mod = importlib.import_module(f"fixtures.{_path.stem}")
    for _name in dir(_mod):
        _obj = getattr(_mod, _name)
        if type(_obj).__name__ == "FixtureFunctionDefinition" or hasattr(
            _obj, "_pytestfixturefunction"
        ):
            globals()[_name] = _obj


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; the CPU path is tested with tiny models")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)

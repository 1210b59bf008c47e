"""Fixtures of the detector model tests: tiny models built once per test module, an offline torch hub.

Pretrained files are state dicts of freshly built models saved under the names torchvision expects, so the
real loading path runs without network; downloading is made to fail so nothing can hang on it.
"""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

from detectors.models import BUILDERS
from tests.detectors.tiny_detectors import tiny


@pytest.fixture(scope="module")
def built():
    """variant name -> a 3-class tiny model without weights, built once per module."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = BUILDERS[name](num_classes=3, **tiny(name))
        return cache[name]

    return get


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub dir under tmp_path ($TORCH_HOME); any download attempt raises URLError."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # restored afterwards; set_dir below changes it
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: refusing to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints

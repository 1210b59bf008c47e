"""Shared fixtures: a small generated shapes dataset, made once per test session."""

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when tests spawn dataloader workers.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    from detectors.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=8, num_val=4, image_size=(160, 160), seed=0)
    return root

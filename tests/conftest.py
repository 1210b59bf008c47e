"""Shared fixtures: a small generated shapes dataset, made once per test session; train.py run in this process."""

import os
import sys

import pytest
import torch

# Two cores: keep torch from oversubscribing them when tests spawn dataloader workers. An OMP_NUM_THREADS
# setting wins (torch read it at import): on cores other jobs share, two threads can make a step 5x slower.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    from detectors.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=8, num_val=4, image_size=(160, 160), seed=0)
    return root


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: small models are overhead-bound, and two threads on cores other jobs
    share spin-wait for each other (the Keras-flow example: 8 s on one thread, 80 s on two beside other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def train_py(capsys, monkeypatch):
    """``python train.py ARGS`` as ``train.main`` in this process (an interpreter start-up, ~10 s here, would be
    most of many tests): a function of ARGS returning (exit status, stdout, stderr). An exception other than
    SystemExit propagates: what a user would see as a traceback fails the test."""
    from train import main

    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when sys.argv holds pytest's own

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run

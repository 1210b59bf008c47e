import pytest

from .helpers import write_coco


@pytest.fixture
def coco_files(tmp_path):
    return write_coco(tmp_path)

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import FAMILIES  # noqa: E402


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param

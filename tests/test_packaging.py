"""One version everywhere: the package, its installed metadata and the compiled core."""

from importlib import metadata

import cpuattn
from cpuattn import _native


def test_version_agrees_with_metadata_and_core():
    assert metadata.version("cpuattn") == cpuattn.__version__
    if _native.available():
        assert _native._core.__version__ == cpuattn.__version__

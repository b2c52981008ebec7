"""Smoke check of an installed wheel, run from outside the source tree: the native backend loads
from site-packages and computes what the NumPy backend computes. With --no-compiler, also
checks that no C/C++ compiler is on PATH (a user's machine, as .ci/run sets it up)."""

import shutil
import sys
from pathlib import Path

import numpy as np

import cpuattn

if "--no-compiler" in sys.argv[1:]:
    compilers = [c for c in ("cc", "gcc", "c++", "g++", "clang", "clang++") if shutil.which(c)]
    assert not compilers, f"a compiler is reachable: {compilers}"
location = Path(cpuattn.__file__).resolve()
assert "site-packages" in location.parts, f"cpuattn imported from {location}, not the wheel"
info = cpuattn.info()
assert info["native"], f"native backend did not load: {info['native_error']}"

rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, 4, 33, 40), dtype=np.float32) for _ in range(3))
native = cpuattn.attention(q, k, v, causal=True, backend="native")
reference = cpuattn.attention(q, k, v, causal=True, backend="numpy")
np.testing.assert_allclose(native, reference, rtol=1e-5, atol=1e-5)
print(f"wheel OK: {location.parent} isa={info['isa']} openmp={info['openmp']}", file=sys.stderr)

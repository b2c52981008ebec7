"""K, V, their int8 scales and q that end right before an unreadable page: the kernels read
nothing past an array, also a row's last D % L elements (masked loads, not whole vectors).
Each case runs in a child process, so that a read past the end is a failed test (the child
dies of SIGSEGV), not a crashed test run."""

import subprocess
import sys
import textwrap

import pytest
from conftest import ISAS

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect via libc"),
    pytest.mark.skipif(not ISAS, reason="no native extension"),
]

CHILD = textwrap.dedent(
    """
    import ctypes, mmap, sys
    import ml_dtypes
    import numpy as np
    import cpuattn
    from cpuattn import _native

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    PAGE = mmap.PAGESIZE
    keep = []

    def guarded(x):
        '''A copy of x whose last byte is the last before a PROT_NONE page.'''
        nbytes = x.nbytes
        pages = -(-nbytes // PAGE)
        buf = mmap.mmap(-1, (pages + 1) * PAGE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        if libc.mprotect(addr + pages * PAGE, PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
        a = np.frombuffer(buf, np.uint8, nbytes, pages * PAGE - nbytes).view(x.dtype)
        a = a.reshape(x.shape)
        a[...] = x
        keep.append(buf)
        return a

    lq, d = int(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(d)
    for isa in _native._core.supported_isas():
        _native._core.select_isa(isa)
        for dtype in ("float32", "float16", "bfloat16", "bfloat16 q", "int8"):
            print(isa, dtype, flush=True)  # the last line printed names a crashed case
            q = rng.standard_normal((1, 4, lq, d)).astype(np.float32)
            k, v = rng.standard_normal((2, 1, 2, 37, d)).astype(np.float32)
            kw = {}
            if dtype == "int8":
                (k, ks), (v, vs) = cpuattn.quantize_int8(k), cpuattn.quantize_int8(v)
                kw = {"k_scale": ks, "v_scale": vs}
            else:
                dt = np.dtype(ml_dtypes.bfloat16 if dtype.startswith("bfloat16") else dtype)
                k, v = k.astype(dt), v.astype(dt)
                q = q.astype(dt) if dtype == "bfloat16 q" else q
            expected = cpuattn.attention(q, k, v, backend="native", **kw)
            got = cpuattn.attention(
                guarded(q), guarded(k), guarded(v), backend="native",
                **{n: guarded(s) for n, s in kw.items()},
            )
            np.testing.assert_array_equal(got, expected)
    print("ok")
    """
)


@pytest.mark.parametrize("d", [13, 40, 72])
@pytest.mark.parametrize("lq", [1, 70], ids=["decode", "prefill"])
def test_nothing_is_read_past_the_arrays(lq, d):
    """Every ISA and K/V dtype (float32, float16, bfloat16 with a float32 or bfloat16 q,
    int8), in one child per shape."""
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(lq), str(d)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = run.stdout.strip().splitlines()[-1:] or [""]
    assert run.returncode == 0, (run.returncode, last, run.stderr[-2000:])
    assert last == ["ok"], (last, run.stderr[-2000:])

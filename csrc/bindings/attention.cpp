// Binding for the attention driver: converts NumPy buffers to a Params and checks everything
// that memory safety depends on (shapes agree, strides are whole elements, the last axis is
// unit-stride, outputs are writable, kv_lengths lie in [0, Lk]). The Python layer has already
// validated the contract with user-facing messages; these checks only guard the C++ side.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::optional arguments

#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"

namespace py = pybind11;

namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("_core.attention: " + what);
}

std::vector<int64_t> shape_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

// Strides in elements; with unit_last the last axis (if longer than 1) must be unit-stride.
cpuattn::View view_of(const char* name, const py::array& a, bool unit_last, bool writable) {
  if (writable && !a.writeable()) fail(std::string(name) + " is read-only");
  const int64_t item = a.itemsize();
  if (reinterpret_cast<uintptr_t>(a.data()) % static_cast<uintptr_t>(item) != 0 && a.size() > 0) {
    fail(std::string(name) + " is not aligned to its element size");
  }
  cpuattn::View v;
  v.data = a.data();
  for (py::ssize_t dim = 0; dim < a.ndim(); ++dim) {
    const int64_t s = a.strides(dim);
    if (s % item != 0 && a.size() > 0)
      fail(std::string(name) + " has a stride that is not a whole element");
    v.strides.push_back(s / item);
  }
  // An empty array is never dereferenced, whatever its strides.
  if (unit_last && a.size() > 0 && a.ndim() > 0 && a.shape(a.ndim() - 1) > 1 &&
      v.strides.back() != 1) {
    fail(std::string(name) + " must be unit-stride on its last axis");
  }
  return v;
}

void expect_shape(const char* name, const py::array& a, const std::vector<int64_t>& want) {
  if (shape_of(a) != want) fail(std::string(name) + " has the wrong shape");
}

// The storage type of an array the kernels may read or write; anything else is a TypeError.
// bfloat16 (ml_dtypes) has no NumPy type number of its own: known by name and size.
cpuattn::DType dtype_of(const char* name, const py::array& a) {
  const py::dtype dt = a.dtype();
  if (dt.is(py::dtype::of<float>())) return cpuattn::DType::F32;
  if (dt.is(py::dtype::of<double>())) return cpuattn::DType::F64;
  if (dt.is(py::dtype("float16"))) return cpuattn::DType::F16;
  if (dt.itemsize() == 2 && py::str(dt).cast<std::string>() == "bfloat16")
    return cpuattn::DType::BF16;
  throw py::type_error(std::string("_core.attention: unsupported dtype for ") + name);
}

// Packed-sequence offsets: int64, contiguous, B + 1 of them, 0 first, non-decreasing, `total`
// last (so every sequence lies inside its array). Returns B.
int64_t offsets_of(const char* name, const py::array& a, int64_t total, const int64_t** data) {
  if (!a.dtype().is(py::dtype::of<int64_t>())) {
    throw py::type_error(std::string("_core.attention: ") + name + " must be int64");
  }
  if (a.ndim() != 1 || a.size() < 1 || !(a.flags() & py::array::c_style)) {
    fail(std::string(name) + " must be a contiguous 1-D array of B + 1 offsets");
  }
  const auto* cu = static_cast<const int64_t*>(a.data());
  const int64_t n = a.size();
  if (cu[0] != 0 || cu[n - 1] != total)
    fail(std::string(name) + " must run from 0 to the total length");
  for (int64_t b = 1; b < n; ++b) {
    if (cu[b] < cu[b - 1]) fail(std::string(name) + " must be non-decreasing");
  }
  *data = cu;
  return n - 1;
}

bool is_half(cpuattn::DType t) { return t == cpuattn::DType::F16 || t == cpuattn::DType::BF16; }

void attention(const py::array& q, const py::array& k, const py::array& v, const py::array& out,
               const std::optional<py::array>& lse, const std::optional<py::array>& mask,
               const std::optional<py::array>& kv_lengths, double scale, bool causal, int align,
               int64_t window_left, int64_t window_right, int num_threads, double softcap,
               const std::optional<py::array>& alibi, const std::optional<py::array>& additive_w,
               const std::optional<py::array>& cu_seqlens_q,
               const std::optional<py::array>& cu_seqlens_k) {
  cpuattn::Params p;
  // Storage types; the compute type is F64 for float64 q, else F32 (half inputs included).
  p.q_dtype = dtype_of("q", q);
  p.kv_dtype = dtype_of("k", k);
  p.out_dtype = dtype_of("out", out);
  p.dtype = p.q_dtype == cpuattn::DType::F64 ? cpuattn::DType::F64 : cpuattn::DType::F32;
  const bool half_kv = is_half(p.kv_dtype);
  if (dtype_of("v", v) != p.kv_dtype)
    throw py::type_error("_core.attention: k and v dtypes differ");
  if (half_kv ? p.dtype != cpuattn::DType::F32 ||
                    (p.q_dtype != cpuattn::DType::F32 && p.q_dtype != p.kv_dtype)
              : p.kv_dtype != p.dtype || p.q_dtype != p.dtype) {
    throw py::type_error("_core.attention: q, k, v dtypes do not go together");
  }
  if (p.out_dtype != p.dtype && p.out_dtype != p.q_dtype) {
    throw py::type_error("_core.attention: out must be q's dtype or the compute dtype");
  }

  const py::ssize_t n = q.ndim();
  if (n < 3 || k.ndim() != n || v.ndim() != n || out.ndim() != n)
    fail("q, k, v, out must share ndim >= 3");
  const size_t nb = static_cast<size_t>(n - 3);
  const std::vector<int64_t> qs = shape_of(q), ks = shape_of(k), vs = shape_of(v);
  p.batch_shape.assign(qs.begin(), qs.begin() + nb);
  p.hq = qs[nb];
  p.lq = qs[nb + 1];
  p.d = qs[nb + 2];
  p.hkv = ks[nb];
  p.lk = ks[nb + 1];
  p.dv = vs[nb + 2];

  auto with_batch = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> s(p.batch_shape);
    s.insert(s.end(), tail);
    return s;
  };
  expect_shape("k", k, with_batch({p.hkv, p.lk, p.d}));
  expect_shape("v", v, with_batch({p.hkv, p.lk, p.dv}));
  expect_shape("out", out, with_batch({p.hq, p.lq, p.dv}));
  if (p.hkv == 0 ? p.hq != 0 : p.hq % p.hkv != 0) fail("Hq must be a multiple of Hkv");

  p.q = view_of("q", q, true, false);
  p.k = view_of("k", k, true, false);
  p.v = view_of("v", v, true, false);
  p.out = view_of("out", out, true, true);

  if (lse) {
    if (dtype_of("lse", *lse) != p.dtype)
      throw py::type_error("_core.attention: lse must have the compute dtype");
    expect_shape("lse", *lse, with_batch({p.hq, p.lq}));
    p.lse = view_of("lse", *lse, false, true);
  }
  if (mask) {
    if (mask->dtype().is(py::dtype::of<bool>())) {
      p.mask_kind = cpuattn::MaskKind::Bool;
    } else if (dtype_of("mask", *mask) == p.dtype) {
      p.mask_kind = cpuattn::MaskKind::Additive;
    } else {
      throw py::type_error("_core.attention: mask must be bool or the compute dtype");
    }
    expect_shape("mask", *mask, with_batch({p.hq, p.lq, p.lk}));
    p.mask = view_of("mask", *mask, false, false);
  }
  if (kv_lengths) {
    if (!kv_lengths->dtype().is(py::dtype::of<int64_t>())) {
      throw py::type_error("_core.attention: kv_lengths must be int64");
    }
    expect_shape("kv_lengths", *kv_lengths, p.batch_shape);
    if (!(kv_lengths->flags() & py::array::c_style)) fail("kv_lengths must be C-contiguous");
    const auto* len = static_cast<const int64_t*>(kv_lengths->data());
    for (py::ssize_t b = 0; b < kv_lengths->size(); ++b) {
      if (len[b] < 0 || len[b] > p.lk) fail("kv_lengths values must lie in [0, Lk]");
    }
    p.kv_lengths = view_of("kv_lengths", *kv_lengths, false, false);
  }
  if (align != 0 && align != 1) fail("align must be 0 (bottom-right) or 1 (top-left)");
  if (window_left < -1 || window_right < -1) fail("window values must be >= -1");
  if (num_threads < 0) fail("num_threads must be >= 0");

  if (cu_seqlens_q || cu_seqlens_k) {
    if (!cu_seqlens_q || !cu_seqlens_k) fail("cu_seqlens_q and cu_seqlens_k go together");
    if (nb != 0) fail("packed sequences take q, k, v as (H, total, D)");
    if (mask || kv_lengths || additive_w)
      fail("packed sequences take no mask, kv_lengths or additive_w");
    const int64_t batch = offsets_of("cu_seqlens_q", *cu_seqlens_q, p.lq, &p.cu_seqlens_q);
    if (offsets_of("cu_seqlens_k", *cu_seqlens_k, p.lk, &p.cu_seqlens_k) != batch) {
      fail("cu_seqlens_q and cu_seqlens_k differ in length");
    }
    // Sequences are the batch: stride 0, each found by its row offsets.
    p.batch_shape = {batch};
    for (cpuattn::View* view : {&p.q, &p.k, &p.v, &p.out, &p.lse}) {
      if (view->data) view->strides.insert(view->strides.begin(), 0);
    }
  }

  if (!(softcap >= 0) || std::isinf(softcap)) fail("softcap must be >= 0 and finite");
  p.softcap = softcap;
  if (alibi) {
    if (dtype_of("alibi", *alibi) != p.dtype)
      throw py::type_error("_core.attention: alibi must have the compute dtype");
    std::vector<int64_t> want(p.batch_shape);
    want.push_back(p.hq);
    expect_shape("alibi", *alibi, want);
    p.alibi = view_of("alibi", *alibi, false, false);
  }
  if (additive_w) {
    if (dtype_of("additive_w", *additive_w) != p.dtype)
      throw py::type_error("_core.attention: additive_w must have the compute dtype");
    expect_shape("additive_w", *additive_w, {p.d});
    if (!(additive_w->flags() & py::array::c_style)) fail("additive_w must be contiguous");
    p.additive_w = additive_w->data();
  }
  p.scale = scale;
  p.causal = causal;
  p.align = static_cast<cpuattn::Align>(align);
  p.window_left = window_left;
  p.window_right = window_right;
  p.num_threads = num_threads;

  // Safe without the GIL: every buffer is owned by an argument that outlives this call, and
  // the driver only touches the memory described by the views checked above.
  py::gil_scoped_release release;
  cpuattn::attention(p);
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("mask"), py::arg("kv_lengths"), py::arg("scale"), py::arg("causal"),
        py::arg("align"), py::arg("window_left"), py::arg("window_right"), py::arg("num_threads"),
        py::arg("softcap"), py::arg("alibi"), py::arg("additive_w"),
        py::arg("cu_seqlens_q") = py::none(), py::arg("cu_seqlens_k") = py::none(),
        "Attention into `out` (and `lse`). Arguments must already be validated and canonical: "
        "see cpuattn._native.");
}

// Binding for the attention driver: converts NumPy buffers to a Params and checks everything
// that memory safety depends on (shapes agree, strides are whole elements, the last axis is
// unit-stride, outputs are writable, every view lies inside the memory it views, kv_lengths and
// cu_seqlens are valid offsets). The Python layer has already validated the contract with
// user-facing messages; these checks only guard the C++ side, so that _core is memory-safe when
// called directly too.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::optional arguments

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "backward.h"

namespace py = pybind11;

namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("_core.attention: " + what);
}

std::vector<int64_t> shape_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

// ---- Every view inside the memory it views ----
//
// The kernels trust every index inside a view's shape. NumPy's own views stay inside their
// memory, but np.lib.stride_tricks.as_strided (an object's __array_interface__) can make an
// array whose shape and strides reach past it, so the rule here is: every byte an array's shape
// and strides reach lies inside the memory of the object that owns it. The owner is found by
// following `base` from the array, through ndarrays (views; their base is read-only) and
// through other objects' `base` attribute (as_strided's wrapper of the array it views), to the
// first of:
//  - an ndarray that owns its data: its shape and strides describe what NumPy allocated;
//  - an object exporting the buffer protocol (bytes, bytearray, mmap, memoryview, ctypes): the
//    buffer pybind11's buffer protocol reports;
//  - anything else: memory NumPy was handed through the C API, DLPack or __array_interface__
//    by whatever owns it (e.g. a torch tensor's .numpy()), whose bounds only that owner knows:
//    the last ndarray on the way stands for it, as its owner described it.
// The call holds the owner, and the exported buffer, until it returns: a thread that drops the
// wrapper's `base` cannot free the memory, and an exporter cannot resize or close a buffer that
// is exported. Empty arrays are never dereferenced and need no owner.

// What the call holds until it returns, the GIL held again by then (declared before the
// gil_scoped_release, it is destroyed after it).
// A buffer exported by its owner, released when the call ends.
struct ExportedBuffer {
  Py_buffer view{};
  bool held = false;
  ExportedBuffer() = default;
  ExportedBuffer(const ExportedBuffer&) = delete;
  ExportedBuffer& operator=(const ExportedBuffer&) = delete;
  ~ExportedBuffer() {
    if (held) PyBuffer_Release(&view);
  }
};

struct Holds {
  std::vector<py::object> owners;
  std::vector<std::unique_ptr<ExportedBuffer>> buffers;
};

// Bytes [lo, hi) that an array at address `data` reaches with this shape and these strides
// (bytes); false if that overflows int64. Only for arrays with no zero-length axis.
bool byte_extent(const void* data, int64_t itemsize, const py::ssize_t* shape,
                 const py::ssize_t* strides, size_t ndim, int64_t& lo, int64_t& hi) {
  const auto address = static_cast<int64_t>(reinterpret_cast<intptr_t>(data));
  int64_t below = 0, above = itemsize;
  for (size_t dim = 0; dim < ndim; ++dim) {
    int64_t span;
    if (__builtin_mul_overflow(int64_t(shape[dim]) - 1, int64_t(strides[dim]), &span)) {
      return false;
    }
    int64_t& side = span < 0 ? below : above;
    if (__builtin_add_overflow(side, span, &side)) return false;
  }
  return !__builtin_add_overflow(address, below, &lo) &&
         !__builtin_add_overflow(address, above, &hi);
}

bool array_extent(const py::array& a, int64_t& lo, int64_t& hi) {
  return byte_extent(a.data(), a.itemsize(), a.shape(), a.strides(), size_t(a.ndim()), lo, hi);
}

// The message is built only on failure: the check runs for every array of every call.
[[noreturn]] void fail_outside(const char* name) {
  fail(std::string(name) + " reaches outside the memory it views");
}

// Fails unless every byte `a` reaches lies inside the memory of its owner (the rule above).
void check_inside_owner(const char* name, const py::array& a, Holds& holds) {
  if (a.size() == 0) return;
  int64_t lo, hi;
  if (!array_extent(a, lo, hi)) fail_outside(name);
  py::array last = a;  // the last ndarray on the way to the owner
  py::object at = a;
  int64_t owner_lo = 0, owner_hi = 0;
  for (int hops = 0;; ++hops) {
    if (hops > 64) fail(std::string(name) + ": its chain of `base` objects is too long");
    if (py::isinstance<py::array>(at)) {
      last = py::reinterpret_borrow<py::array>(at);
      const py::object base = last.base();
      // NumPy's allocation, or foreign memory (a base of None, or NULL through the C API).
      if (last.owndata() || !base || base.is_none()) {
        // A non-empty view never lies inside an empty owner (whose strides NumPy lets anyone
        // set, and whose allocation may be a single byte).
        if (last.size() == 0 || !array_extent(last, owner_lo, owner_hi)) fail_outside(name);
        holds.owners.push_back(last);
        break;
      }
      at = base;
      continue;
    }
    if (PyObject_CheckBuffer(at.ptr())) {
      // Only the extent is needed: no format asked for, so any exporter that can give strides
      // qualifies.
      auto exported = std::make_unique<ExportedBuffer>();
      if (PyObject_GetBuffer(at.ptr(), &exported->view, PyBUF_STRIDES) != 0) {
        PyErr_Clear();
        fail(std::string(name) + ": the object that owns its memory did not export its buffer");
      }
      exported->held = true;
      const Py_buffer& b = exported->view;
      static_assert(sizeof(Py_ssize_t) == sizeof(py::ssize_t), "Py_ssize_t is pybind11's ssize_t");
      if (b.len == 0 ||
          !byte_extent(b.buf, b.itemsize, b.shape, b.strides, size_t(b.ndim), owner_lo, owner_hi)) {
        fail_outside(name);
      }
      holds.owners.push_back(at);
      holds.buffers.push_back(std::move(exported));
      break;
    }
    py::object next = py::getattr(at, "base", py::none());
    if (next.is_none() || next.is(at)) {  // foreign memory: as `last` describes it
      if (last.size() == 0 || !array_extent(last, owner_lo, owner_hi)) fail_outside(name);
      holds.owners.push_back(last);
      break;
    }
    at = next;
  }
  if (lo < owner_lo || hi > owner_hi) fail_outside(name);
}

// Strides in elements; with unit_last the last axis (if longer than 1) must be unit-stride.
// A length-1 axis is only ever indexed at 0: NumPy lets its stride be anything (a field of a
// record array has such strides and is still C-contiguous), and one that is not a whole
// element is taken as 0. Checks that the view lies inside the memory it views
// (check_inside_owner).
cpuattn::View view_of(const char* name, const py::array& a, bool unit_last, bool writable,
                      Holds& holds) {
  if (writable && !a.writeable()) fail(std::string(name) + " is read-only");
  const int64_t item = a.itemsize();
  if (reinterpret_cast<uintptr_t>(a.data()) % static_cast<uintptr_t>(item) != 0 && a.size() > 0) {
    fail(std::string(name) + " is not aligned to its element size");
  }
  cpuattn::View v;
  v.data = a.data();
  for (py::ssize_t dim = 0; dim < a.ndim(); ++dim) {
    const int64_t s = a.strides(dim);
    if (s % item != 0 && a.size() > 0) {
      if (a.shape(dim) > 1) fail(std::string(name) + " has a stride that is not a whole element");
      v.strides.push_back(0);
      continue;
    }
    v.strides.push_back(s / item);
  }
  // An empty array is never dereferenced, whatever its strides.
  if (unit_last && a.size() > 0 && a.ndim() > 0 && a.shape(a.ndim() - 1) > 1 &&
      v.strides.back() != 1) {
    fail(std::string(name) + " must be unit-stride on its last axis");
  }
  check_inside_owner(name, a, holds);
  return v;
}

void expect_shape(const char* name, const py::array& a, const std::vector<int64_t>& want) {
  if (shape_of(a) != want) fail(std::string(name) + " has the wrong shape");
}

// Whether a's dtype is T's: compared by type number and native byte order, never by
// identity (an array unpickled with protocol 5, as dask or multiprocessing deliver it, has an
// equal dtype that is not NumPy's singleton).
template <typename T>
bool has_dtype(const py::array& a) {
  const py::dtype dt = a.dtype();
  return dt.num() == py::dtype::of<T>().num() && dt.byteorder() != '>' && dt.byteorder() != '<';
}
bool is_int64(const py::array& a) { return has_dtype<int64_t>(a); }

// The storage type of an array the kernels may read or write; anything else is a TypeError.
// bfloat16 (ml_dtypes) has no NumPy type number of its own: known by name and size.
cpuattn::DType dtype_of(const char* name, const py::array& a) {
  const py::dtype dt = a.dtype();
  if (has_dtype<float>(a)) return cpuattn::DType::F32;
  if (has_dtype<double>(a)) return cpuattn::DType::F64;
  static const int float16_num = py::dtype("float16").num();  // NumPy's, fixed once imported
  if (dt.num() == float16_num && dt.byteorder() != '>' && dt.byteorder() != '<')
    return cpuattn::DType::F16;
  if (dt.itemsize() == 2 && py::str(dt).cast<std::string>() == "bfloat16")
    return cpuattn::DType::BF16;
  if (has_dtype<int8_t>(a)) return cpuattn::DType::I8;
  throw py::type_error(std::string("_core.attention: unsupported dtype for ") + name);
}

// The int64 values of a small C-contiguous array, copied: the driver reads the copy, which
// was validated and which no Python thread can change once the GIL is released.
std::vector<int64_t> copy_int64(const char* name, const py::array& a, Holds& holds) {
  if (!is_int64(a))
    throw py::type_error(std::string("_core.attention: ") + name + " must be int64");
  if (!(a.flags() & py::array::c_style)) fail(std::string(name) + " must be C-contiguous");
  check_inside_owner(name, a, holds);
  // memcpy: the array may be misaligned (an int64 view of a bytes object at an odd offset).
  std::vector<int64_t> values(static_cast<size_t>(a.size()));
  if (!values.empty()) std::memcpy(values.data(), a.data(), values.size() * sizeof(int64_t));
  return values;
}

// Packed-sequence offsets, copied: int64, contiguous, B + 1 of them, 0 first, non-decreasing,
// `total` last (so every sequence lies inside its array).
std::vector<int64_t> offsets_of(const char* name, const py::array& a, int64_t total, Holds& holds) {
  if (!is_int64(a))
    throw py::type_error(std::string("_core.attention: ") + name + " must be int64");
  if (a.ndim() != 1 || a.size() < 1)
    fail(std::string(name) + " must be a 1-D array of B + 1 offsets");
  std::vector<int64_t> cu = copy_int64(name, a, holds);
  const size_t n = cu.size();
  if (cu[0] != 0 || cu[n - 1] != total)
    fail(std::string(name) + " must run from 0 to the total length");
  for (size_t b = 1; b < n; ++b) {
    if (cu[b] < cu[b - 1]) fail(std::string(name) + " must be non-decreasing");
  }
  return cu;
}

bool is_half(cpuattn::DType t) { return t == cpuattn::DType::F16 || t == cpuattn::DType::BF16; }

// The storage and compute types of q, k, v and out. The compute type is F64 for float64 q,
// else F32: half or int8 k and v are computed in F32, with q float32 or (half k, v) q's own
// type or (int8 k, v) either half type; out is q's type or the compute type.
void read_dtypes(cpuattn::Params& p, const py::array& q, const py::array& k, const py::array& v,
                 const py::array& out) {
  using cpuattn::DType;
  p.q_dtype = dtype_of("q", q);
  p.kv_dtype = dtype_of("k", k);
  p.out_dtype = dtype_of("out", out);
  p.compute_dtype = p.q_dtype == DType::F64 ? DType::F64 : DType::F32;
  if (dtype_of("v", v) != p.kv_dtype)
    throw py::type_error("_core.attention: k and v dtypes differ");
  bool fits;
  if (is_half(p.kv_dtype)) {
    fits = p.compute_dtype == DType::F32 && (p.q_dtype == DType::F32 || p.q_dtype == p.kv_dtype);
  } else if (p.kv_dtype == DType::I8) {
    fits = p.q_dtype == DType::F32 || is_half(p.q_dtype);
  } else {
    fits = p.kv_dtype == p.compute_dtype && p.q_dtype == p.compute_dtype;
  }
  if (!fits) throw py::type_error("_core.attention: q, k, v dtypes do not go together");
  if (p.out_dtype != p.compute_dtype && p.out_dtype != p.q_dtype) {
    throw py::type_error("_core.attention: out must be q's dtype or the compute dtype");
  }
}

// A call's Params and what they point to: the arrays' owners and buffers and the private
// copies of the offsets the driver reads (copy_int64), held until the call returns.
struct Call {
  cpuattn::Params p;
  Holds holds;
  std::vector<int64_t> lengths, cu_q, cu_k, globals;
  std::vector<int32_t> table;  // a paged call's block table

  std::vector<int64_t> with_batch(std::initializer_list<int64_t> tail) const {
    std::vector<int64_t> s(p.batch_shape);
    s.insert(s.end(), tail);
    return s;
  }
};

// q, k, v: the dimensions and their views (dtypes are the caller's to check).
void read_qkv(Call& c, const py::array& q, const py::array& k, const py::array& v) {
  cpuattn::Params& p = c.p;
  const py::ssize_t n = q.ndim();
  if (n < 3 || k.ndim() != n || v.ndim() != n) fail("q, k, v must share ndim >= 3");
  const size_t nb = static_cast<size_t>(n - 3);
  const std::vector<int64_t> qs = shape_of(q), ks = shape_of(k), vs = shape_of(v);
  p.batch_shape.assign(qs.begin(), qs.begin() + nb);
  p.hq = qs[nb];
  p.lq = qs[nb + 1];
  p.d = qs[nb + 2];
  p.hkv = ks[nb];
  p.lk = ks[nb + 1];
  p.dv = vs[nb + 2];
  expect_shape("k", k, c.with_batch({p.hkv, p.lk, p.d}));
  expect_shape("v", v, c.with_batch({p.hkv, p.lk, p.dv}));
  if (p.hkv == 0 ? p.hq != 0 : p.hq % p.hkv != 0) fail("Hq must be a multiple of Hkv");
  p.q = view_of("q", q, true, false, c.holds);
  p.k = view_of("k", k, true, false, c.holds);
  p.v = view_of("v", v, true, false, c.holds);
}

// An lse-shaped (*batch, Hq, Lq) array in the compute type.
cpuattn::View row_values(Call& c, const char* name, const py::array& a, bool writable) {
  if (dtype_of(name, a) != c.p.compute_dtype)
    throw py::type_error(std::string("_core.attention: ") + name + " must have the compute dtype");
  expect_shape(name, a, c.with_batch({c.p.hq, c.p.lq}));
  return view_of(name, a, false, writable, c.holds);
}

void read_mask_and_lengths(Call& c, const std::optional<py::array>& mask,
                           const std::optional<py::array>& kv_lengths) {
  cpuattn::Params& p = c.p;
  const size_t nb = p.batch_shape.size();
  if (mask) {
    if (has_dtype<bool>(*mask)) {
      p.mask_kind = cpuattn::MaskKind::Bool;
    } else if (dtype_of("mask", *mask) == p.compute_dtype) {
      p.mask_kind = cpuattn::MaskKind::Additive;
    } else {
      throw py::type_error("_core.attention: mask must be bool or the compute dtype");
    }
    expect_shape("mask", *mask, c.with_batch({p.hq, p.lq, p.lk}));
    p.mask = view_of("mask", *mask, false, false, c.holds);
  }
  if (kv_lengths) {
    if (!is_int64(*kv_lengths)) throw py::type_error("_core.attention: kv_lengths must be int64");
    expect_shape("kv_lengths", *kv_lengths, p.batch_shape);
    c.lengths = copy_int64("kv_lengths", *kv_lengths, c.holds);
    for (int64_t n_keys : c.lengths) {
      if (n_keys < 0 || n_keys > p.lk) fail("kv_lengths values must lie in [0, Lk]");
    }
    // The copy, row-major over *batch (an empty batch has no work item that reads it).
    p.kv_lengths.data = c.lengths.data();
    p.kv_lengths.strides.assign(nb, 1);
    for (size_t dim = nb; dim-- > 1;) {
      p.kv_lengths.strides[dim - 1] = p.kv_lengths.strides[dim] * p.batch_shape[dim];
    }
  }
}

// The scalar options and ALiBi slopes, after the batch shape is final (packed sequences).
void read_options(Call& c, double scale, bool causal, int align, int64_t window_left,
                  int64_t window_right, int num_threads, double softcap,
                  const std::optional<py::array>& alibi, std::optional<int64_t> diagonal,
                  const std::optional<py::array>& global_tokens) {
  cpuattn::Params& p = c.p;
  if (align != 0 && align != 1) fail("align must be 0 (bottom-right) or 1 (top-left)");
  if (window_left < -1 || window_right < -1) fail("window values must be >= -1");
  if (num_threads < 0) fail("num_threads must be >= 0");
  if (p.lq > cpuattn::kMaxLength || p.lk > cpuattn::kMaxLength)
    fail("Lq and Lk must be at most 2**60 (attention.h: kMaxLength)");
  if (!(softcap >= 0) || std::isinf(softcap)) fail("softcap must be >= 0 and finite");
  p.softcap = softcap;
  if (alibi) {
    if (dtype_of("alibi", *alibi) != p.compute_dtype)
      throw py::type_error("_core.attention: alibi must have the compute dtype");
    std::vector<int64_t> want(p.batch_shape);
    want.push_back(p.hq);
    expect_shape("alibi", *alibi, want);
    p.alibi = view_of("alibi", *alibi, false, false, c.holds);
  }
  p.scale = scale;
  p.causal = causal;
  p.align = static_cast<cpuattn::Align>(align);
  if (diagonal) {
    if (*diagonal < -cpuattn::kMaxDiagonal || *diagonal > cpuattn::kMaxDiagonal)
      fail("diagonal must lie in [-2**61, 2**61]");
    p.has_diagonal = true;
    p.diagonal = *diagonal;
  }
  // A window side longer than any distance between a key and a diagonal (< Lq + Lk, plus
  // |diagonal|) keeps the same keys as an unbounded one; as -1 it cannot overflow the diagonal
  // arithmetic of mask.h.
  const int64_t farthest = p.lq + p.lk + (p.diagonal < 0 ? -p.diagonal : p.diagonal);
  const auto bounded = [&](int64_t side) { return side > farthest ? int64_t(-1) : side; };
  p.window_left = bounded(window_left);
  p.window_right = bounded(window_right);
  p.num_threads = num_threads;
  if (global_tokens) {
    // Copied (a concurrent writer cannot change them after the checks); searched and compared
    // with diagonals only, never used as an address.
    if (global_tokens->ndim() != 1) fail("global_tokens must be 1-D");
    c.globals = copy_int64("global_tokens", *global_tokens, c.holds);
    for (size_t k = 0; k < c.globals.size(); ++k) {
      const int64_t x = c.globals[k];
      if (x < -cpuattn::kMaxDiagonal || x > cpuattn::kMaxDiagonal)
        fail("global_tokens must lie in [-2**61, 2**61]");
      if (k > 0 && x <= c.globals[k - 1]) fail("global_tokens must be strictly increasing");
    }
    // Without a window every row keeps every key below its cap already: nothing to add.
    if (p.window_left >= 0 || p.window_right >= 0) {
      p.globals = c.globals.data();
      p.n_globals = static_cast<int64_t>(c.globals.size());
    }
  }
}

// int8 k and v's float32 scales, shaped `shape` (k's without D): both with int8 k and v,
// neither otherwise.
void read_scales(Call& c, const std::optional<py::array>& k_scale,
                 const std::optional<py::array>& v_scale, const std::vector<int64_t>& shape) {
  const bool int8 = c.p.kv_dtype == cpuattn::DType::I8;
  if (int8 != bool(k_scale) || int8 != bool(v_scale))
    fail("k_scale and v_scale go with int8 k and v, and only with them");
  if (!int8) return;
  const char* names[] = {"k_scale", "v_scale"};
  const py::array* arrays[] = {&*k_scale, &*v_scale};
  cpuattn::View* views[] = {&c.p.k_scale, &c.p.v_scale};
  for (int i = 0; i < 2; ++i) {
    if (!has_dtype<float>(*arrays[i]))
      throw py::type_error(std::string("_core.attention: ") + names[i] + " must be float32");
    expect_shape(names[i], *arrays[i], shape);
    *views[i] = view_of(names[i], *arrays[i], false, false, c.holds);
  }
}

// Sink logits (*batch, Hq) in the compute type; packed sequences share one (Hq,).
void read_sinks(Call& c, const std::optional<py::array>& sinks) {
  if (!sinks) return;
  if (dtype_of("sinks", *sinks) != c.p.compute_dtype)
    throw py::type_error("_core.attention: sinks must have the compute dtype");
  expect_shape("sinks", *sinks, c.with_batch({c.p.hq}));
  c.p.sinks = view_of("sinks", *sinks, false, false, c.holds);
}

void attention(const py::array& q, const py::array& k, const py::array& v, const py::array& out,
               const std::optional<py::array>& lse, const std::optional<py::array>& mask,
               const std::optional<py::array>& kv_lengths, double scale, bool causal, int align,
               int64_t window_left, int64_t window_right, int num_threads, double softcap,
               const std::optional<py::array>& alibi, const std::optional<py::array>& additive_w,
               const std::optional<py::array>& cu_seqlens_q,
               const std::optional<py::array>& cu_seqlens_k, std::optional<int64_t> diagonal,
               const std::optional<py::array>& sinks, const std::optional<py::array>& k_scale,
               const std::optional<py::array>& v_scale,
               const std::optional<py::array>& global_tokens) {
  Call c;
  cpuattn::Params& p = c.p;
  read_dtypes(p, q, k, v, out);
  read_qkv(c, q, k, v);
  read_scales(c, k_scale, v_scale, c.with_batch({p.hkv, p.lk}));
  if (out.ndim() != q.ndim()) fail("q, k, v, out must share ndim >= 3");
  expect_shape("out", out, c.with_batch({p.hq, p.lq, p.dv}));
  p.out = view_of("out", out, true, true, c.holds);
  if (lse) p.lse = row_values(c, "lse", *lse, true);
  read_mask_and_lengths(c, mask, kv_lengths);

  read_sinks(c, sinks);
  if (cu_seqlens_q || cu_seqlens_k) {
    if (!cu_seqlens_q || !cu_seqlens_k) fail("cu_seqlens_q and cu_seqlens_k go together");
    if (!p.batch_shape.empty()) fail("packed sequences take q, k, v as (H, total, D)");
    if (mask || kv_lengths || additive_w || diagonal || k_scale)
      fail("packed sequences take no mask, kv_lengths, additive_w, diagonal or k_scale");
    c.cu_q = offsets_of("cu_seqlens_q", *cu_seqlens_q, p.lq, c.holds);
    c.cu_k = offsets_of("cu_seqlens_k", *cu_seqlens_k, p.lk, c.holds);
    if (c.cu_q.size() != c.cu_k.size()) fail("cu_seqlens_q and cu_seqlens_k differ in length");
    p.cu_seqlens_q = c.cu_q.data();
    p.cu_seqlens_k = c.cu_k.data();
    const auto batch = static_cast<int64_t>(c.cu_q.size()) - 1;
    // Sequences are the batch: stride 0, each found by its row offsets.
    p.batch_shape = {batch};
    for (cpuattn::View* view : {&p.q, &p.k, &p.v, &p.out, &p.lse, &p.sinks}) {
      if (view->data) view->strides.insert(view->strides.begin(), 0);
    }
  }

  read_options(c, scale, causal, align, window_left, window_right, num_threads, softcap, alibi,
               diagonal, global_tokens);
  if (additive_w) {
    if (p.kv_dtype == cpuattn::DType::I8) fail("additive_w takes no int8 k and v");
    if (dtype_of("additive_w", *additive_w) != p.compute_dtype)
      throw py::type_error("_core.attention: additive_w must have the compute dtype");
    expect_shape("additive_w", *additive_w, {p.d});
    if (!(additive_w->flags() & py::array::c_style)) fail("additive_w must be contiguous");
    p.additive_w = view_of("additive_w", *additive_w, true, false, c.holds).data;
  }

  // Safe without the GIL: every view lies inside memory that `holds` keeps alive (and exported,
  // for buffer objects) until the call returns, the driver only touches the memory described
  // by the views checked above, and the offsets it reads are private copies, validated here.
  py::gil_scoped_release release;
  cpuattn::attention(p);
}

// Attention over paged caches: k_cache (num_blocks, block_size, Hkv, D), v_cache (..., Dv),
// their scales (num_blocks, block_size, Hkv) for int8; block_table int32 (B, max_blocks) and
// kv_lengths int64 (B,), both copied, every block a sequence's length reaches checked to be
// one of the cache's. q (B, Hq, Lq, D), or packed (Hq, total, D) with cu_seqlens_q (B + 1);
// out and lse shaped like q; alibi and sinks (B, Hq).
void attention_paged(const py::array& q, const py::array& k_cache, const py::array& v_cache,
                     const py::array& block_table, const py::array& kv_lengths,
                     const py::array& out, const std::optional<py::array>& lse, double scale,
                     bool causal, int64_t window_left, int64_t window_right, int num_threads,
                     double softcap, const std::optional<py::array>& alibi,
                     const std::optional<py::array>& sinks, const std::optional<py::array>& k_scale,
                     const std::optional<py::array>& v_scale,
                     const std::optional<py::array>& cu_seqlens_q, std::optional<int64_t> diagonal,
                     const std::optional<py::array>& global_tokens) {
  Call c;
  cpuattn::Params& p = c.p;
  read_dtypes(p, q, k_cache, v_cache, out);
  if (k_cache.ndim() != 4 || v_cache.ndim() != 4)
    fail("k_cache and v_cache must be (num_blocks, block_size, Hkv, D)");
  const std::vector<int64_t> ks = shape_of(k_cache);
  const int64_t num_blocks = ks[0], block_size = ks[1];
  p.hkv = ks[2];
  p.d = ks[3];
  p.dv = v_cache.shape(3);
  expect_shape("v_cache", v_cache, {num_blocks, block_size, p.hkv, p.dv});
  if (block_size < 1) fail("block_size must be >= 1");

  if (block_table.dtype().num() != py::dtype::of<int32_t>().num() ||
      block_table.dtype().byteorder() == '>' || block_table.dtype().byteorder() == '<')
    throw py::type_error("_core.attention_paged: block_table must be int32");
  if (block_table.ndim() != 2) fail("block_table must be (B, max_blocks)");
  if (!(block_table.flags() & py::array::c_style)) fail("block_table must be C-contiguous");
  check_inside_owner("block_table", block_table, c.holds);
  const int64_t batch = block_table.shape(0), table_ld = block_table.shape(1);
  c.table.resize(static_cast<size_t>(batch * table_ld));  // memcpy: it may be misaligned
  if (!c.table.empty())
    std::memcpy(c.table.data(), block_table.data(), c.table.size() * sizeof(int32_t));
  // Keys the table can name; bounded like any Lk so that the diagonal arithmetic stays in
  // int64 (attention.h, kMaxLength).
  if (__builtin_mul_overflow(table_ld, block_size, &p.lk) || p.lk > cpuattn::kMaxLength)
    fail("max_blocks x block_size must be at most 2**60");
  if (!is_int64(kv_lengths))
    throw py::type_error("_core.attention_paged: kv_lengths must be int64");
  expect_shape("kv_lengths", kv_lengths, {batch});
  c.lengths = copy_int64("kv_lengths", kv_lengths, c.holds);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n_keys = c.lengths[size_t(b)];
    if (n_keys < 0 || n_keys > p.lk)
      fail("kv_lengths values must lie in [0, max_blocks x block_size]");
    const int64_t blocks = n_keys / block_size + (n_keys % block_size != 0);
    for (int64_t i = 0; i < blocks; ++i) {
      const int32_t id = c.table[size_t(b * table_ld + i)];
      if (id < 0 || id >= num_blocks)
        fail("block_table names a block outside the cache for keys below kv_lengths");
    }
  }
  p.batch_shape = {batch};
  p.paged = {true, c.table.data(), table_ld, block_size};
  p.k = view_of("k_cache", k_cache, true, false, c.holds);
  p.v = view_of("v_cache", v_cache, true, false, c.holds);
  read_scales(c, k_scale, v_scale, {num_blocks, block_size, p.hkv});

  const bool packed = bool(cu_seqlens_q);
  if (q.ndim() != (packed ? 3 : 4) || out.ndim() != q.ndim())
    fail(packed ? "packed q and out must be (Hq, total, D)" : "q and out must be (B, Hq, Lq, D)");
  const size_t nb = packed ? 0 : 1;
  if (!packed && q.shape(0) != batch) fail("q's batch must match block_table's");
  p.hq = q.shape(nb);
  p.lq = q.shape(nb + 1);
  if (q.shape(nb + 2) != p.d) fail("q's D must match k_cache's");
  if (p.hkv == 0 ? p.hq != 0 : p.hq % p.hkv != 0) fail("Hq must be a multiple of Hkv");
  const std::vector<int64_t> rows =
      packed ? std::vector<int64_t>{p.hq, p.lq} : std::vector<int64_t>{batch, p.hq, p.lq};
  std::vector<int64_t> out_shape(rows);
  out_shape.push_back(p.dv);
  expect_shape("out", out, out_shape);
  p.q = view_of("q", q, true, false, c.holds);
  p.out = view_of("out", out, true, true, c.holds);
  if (lse) {
    if (dtype_of("lse", *lse) != p.compute_dtype)
      throw py::type_error("_core.attention_paged: lse must have the compute dtype");
    expect_shape("lse", *lse, rows);
    p.lse = view_of("lse", *lse, false, true, c.holds);
  }
  if (packed) {
    // Sequences are the batch: q, out and lse rows found by cu_seqlens_q, keys by offsets that
    // stand for kv_lengths (the paged layout reads only their differences).
    c.cu_q = offsets_of("cu_seqlens_q", *cu_seqlens_q, p.lq, c.holds);
    if (int64_t(c.cu_q.size()) != batch + 1) fail("cu_seqlens_q must hold B + 1 offsets");
    c.cu_k.assign(1, 0);
    for (int64_t n_keys : c.lengths) {
      int64_t end;
      if (__builtin_add_overflow(c.cu_k.back(), n_keys, &end) || end > cpuattn::kMaxLength)
        fail("the sum of kv_lengths must be at most 2**60");
      c.cu_k.push_back(end);
    }
    p.cu_seqlens_q = c.cu_q.data();
    p.cu_seqlens_k = c.cu_k.data();
    p.lk = c.cu_k.back();
    for (cpuattn::View* view : {&p.q, &p.out, &p.lse}) {
      if (view->data) view->strides.insert(view->strides.begin(), 0);
    }
  } else {
    p.kv_lengths.data = c.lengths.data();
    p.kv_lengths.strides = {1};
  }
  read_sinks(c, sinks);
  read_options(c, scale, causal, /*align=*/0, window_left, window_right, num_threads, softcap,
               alibi, diagonal, global_tokens);

  // Safe without the GIL, as attention() above; block ids and lengths are private copies.
  py::gil_scoped_release release;
  cpuattn::attention(p);
}

// The backward pass: q, k, v, dout, lse and delta in the compute type (the Python layer
// converts half inputs), dq / dk / dv shaped like q / k / v, writable (every element written).
void attention_backward(const py::array& q, const py::array& k, const py::array& v,
                        const py::array& dout, const py::array& lse, const py::array& delta,
                        const py::array& dq, const py::array& dk, const py::array& dv,
                        const std::optional<py::array>& mask,
                        const std::optional<py::array>& kv_lengths, double scale, bool causal,
                        int align, int64_t window_left, int64_t window_right, int num_threads,
                        double softcap, const std::optional<py::array>& alibi,
                        std::optional<int64_t> diagonal,
                        const std::optional<py::array>& global_tokens, bool bf16_inputs) {
  Call c;
  cpuattn::BackwardParams bp;
  cpuattn::Params& p = c.p;
  const cpuattn::DType t = dtype_of("q", q);
  if (t != cpuattn::DType::F32 && t != cpuattn::DType::F64)
    throw py::type_error("_core.attention_backward: q must be float32 or float64");
  const char* names[] = {"k", "v", "dout", "dq", "dk", "dv"};
  const py::array* arrays[] = {&k, &v, &dout, &dq, &dk, &dv};
  cpuattn::DType grads[3];
  for (int i = 0; i < 6; ++i) {
    const cpuattn::DType dt = dtype_of(names[i], *arrays[i]);
    // The gradients may be float16 / bfloat16 over float32 compute (rounded by the kernels).
    const bool half_grad = i >= 3 && t == cpuattn::DType::F32 &&
                           (dt == cpuattn::DType::F16 || dt == cpuattn::DType::BF16);
    if (dt != t && !half_grad) {
      throw py::type_error(std::string("_core.attention_backward: ") + names[i] +
                           (i >= 3 ? " must have q's dtype, or float16 / bfloat16 for float32"
                                   : " must have q's dtype"));
    }
    if (i >= 3) grads[i - 3] = dt;
  }
  p.q_dtype = p.kv_dtype = p.out_dtype = p.compute_dtype = t;
  read_qkv(c, q, k, v);
  for (const py::array* a : {&dout, &dq, &dk, &dv}) {
    if (a->ndim() != q.ndim()) fail("dout, dq, dk, dv must have q's ndim");
  }
  expect_shape("dout", dout, c.with_batch({p.hq, p.lq, p.dv}));
  expect_shape("dq", dq, c.with_batch({p.hq, p.lq, p.d}));
  expect_shape("dk", dk, c.with_batch({p.hkv, p.lk, p.d}));
  expect_shape("dv", dv, c.with_batch({p.hkv, p.lk, p.dv}));
  bp.dout = view_of("dout", dout, true, false, c.holds);
  bp.dq = view_of("dq", dq, true, true, c.holds);
  bp.dk = view_of("dk", dk, true, true, c.holds);
  bp.dv = view_of("dv", dv, true, true, c.holds);
  p.lse = row_values(c, "lse", lse, false);
  bp.delta = row_values(c, "delta", delta, false);
  read_mask_and_lengths(c, mask, kv_lengths);
  read_options(c, scale, causal, align, window_left, window_right, num_threads, softcap, alibi,
               diagonal, global_tokens);
  bp.fwd = p;
  bp.bf16_inputs = bf16_inputs && t == cpuattn::DType::F32;
  bp.dq_dtype = grads[0];
  bp.dk_dtype = grads[1];
  bp.dv_dtype = grads[2];

  // Safe without the GIL, as attention() above.
  py::gil_scoped_release release;
  cpuattn::attention_backward(bp);
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("mask"), py::arg("kv_lengths"), py::arg("scale"), py::arg("causal"),
        py::arg("align"), py::arg("window_left"), py::arg("window_right"), py::arg("num_threads"),
        py::arg("softcap"), py::arg("alibi"), py::arg("additive_w"),
        py::arg("cu_seqlens_q") = py::none(), py::arg("cu_seqlens_k") = py::none(),
        py::arg("diagonal") = py::none(), py::arg("sinks") = py::none(),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(),
        py::arg("global_tokens") = py::none(),
        "Attention into `out` (and `lse`). Arguments must already be validated and canonical: "
        "see cpuattn._native.");
  m.def("attention_paged", &attention_paged, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_table"), py::arg("kv_lengths"), py::arg("out"), py::arg("lse"),
        py::arg("scale"), py::arg("causal"), py::arg("window_left"), py::arg("window_right"),
        py::arg("num_threads"), py::arg("softcap"), py::arg("alibi"), py::arg("sinks"),
        py::arg("k_scale"), py::arg("v_scale"), py::arg("cu_seqlens_q"), py::arg("diagonal"),
        py::arg("global_tokens") = py::none(),
        "Attention over paged K/V caches into `out` (and `lse`). Arguments must already be "
        "validated and canonical: see cpuattn._native.");
  m.def("attention_backward", &attention_backward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("dout"), py::arg("lse"), py::arg("delta"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"), py::arg("mask"), py::arg("kv_lengths"), py::arg("scale"), py::arg("causal"),
        py::arg("align"), py::arg("window_left"), py::arg("window_right"), py::arg("num_threads"),
        py::arg("softcap"), py::arg("alibi"), py::arg("diagonal"),
        py::arg("global_tokens") = py::none(), py::arg("bf16_inputs") = false,
        "Gradients of attention into dq, dk, dv (every element written). Arguments must "
        "already be validated and canonical: see cpuattn._native. bf16_inputs: q, k, v and "
        "dout (float32) hold bfloat16 values, which lets the products run in bfloat16.");
}

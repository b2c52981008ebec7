// How K and V reach the step: one K/V source per storage kind, chosen once per call
// (choose_kv_source). A source finds a key tile's rows through its layout (kv_layout.h) and
// gives the step either those rows in place or a staged tile (packed K^T, V converted from
// half, bfloat16 pairs), cached per thread for the head's later query tiles, as the step's
// KeyOperand / ValueOperand (kernels/kernel.h). The driver calls it once per key tile and never
// branches on the storage kind itself: a new storage kind is one source type here, its
// alternative in KvSourceOn and its case in choose_kv_source (and, for a new element encoding,
// an Elem value and its KernelSet::encodings entry per ISA); a new layout is one type in
// kv_layout.h, added to KvSourceOn's layouts.
//
// A source has:
//   static constexpr bool kStagedQuery    its step reads q staged (copied and scaled, or as
//                                         pairs), never the caller's rows in place
//   void reserve(KvScratch&, tiles, cache)  a thread's buffers, before the parallel region
//   void setup(TileStep&)                 the step's K/V fields that hold for the whole call
//   Head head(const ItemPos&)             the layout's, once per item
//   void tile(TileStep&, Head, KeyTile, KvScratch&)  the K/V fields of one key tile
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <variant>

#include "aligned_buffer.h"
#include "attention.h"
#include "kernels/kernel.h"
#include "kv_layout.h"
#include "plan.h"
#include "tiles.h"

namespace cpuattn {

// How K and V are multiplied: in the compute type, widened from half to float32, or as
// bfloat16 pairs by the bfloat16 steps (vdpbf16ps, AMX).
enum class KvPath { ComputeType, WidenedToFloat, Bf16Pairs };

// Width of a packed bfloat16 V row: Dv rounded up to whole 16-lane vectors.
inline int64_t bf16_values_width(int64_t dv) { return (dv + 15) / 16 * 16; }

// Tiles of one (batch, kv head) prepared once and reused by the later query tiles of that
// head: packed K^T, V converted from half, bfloat16 pairs of K^T or V (with what packing found,
// get_flagged). Without caching (one query tile, as in decode, or past the element cap) a tile
// is prepared into the caller's spare buffer every time. Neither buffer is initialized: a tile
// is read only once its ready byte is set (nonzero), and the bytes are cleared on the first use
// (owner_ starts at -1) and whenever the owner changes.
template <typename T>
class StagedTileCache {
 public:
  void reserve(int64_t tiles, int64_t tile_elems, bool enable) {
    tile_elems_ = tile_elems;
    // Division, not tiles * tile_elems: with a huge Lk (a zero-stride K) the product overflows.
    if (enable && tile_elems > 0 && tiles <= kMaxPackedKeyElems / tile_elems) {
      data_.allocate(tiles * tile_elems);
      ready_.allocate(tiles);
    }
  }

  // The staged tile: cached, or filled now. fill(dst) stages it into dst.
  template <typename Fill>
  const T* get(int64_t owner, int64_t tile, T* spare, const Fill& fill) {
    return get_flagged(owner, tile, spare,
                       [&](T* dst) {
                         fill(dst);
                         return uint8_t(1);
                       })
        .first;
  }

  // The same for a fill that returns a nonzero byte to keep with the tile (what it found
  // while staging); returned with the tile, cached or not.
  template <typename Fill>
  std::pair<const T*, uint8_t> get_flagged(int64_t owner, int64_t tile, T* spare,
                                           const Fill& fill) {
    if (ready_.size() == 0) return {spare, fill(spare)};
    if (owner != owner_) {
      std::fill(ready_.data(), ready_.data() + ready_.size(), uint8_t(0));
      owner_ = owner;
    }
    T* dst = data_.data() + tile * tile_elems_;
    if (!ready_[tile]) ready_[tile] = fill(dst);
    return {dst, ready_[tile]};
  }

 private:
  AlignedBuffer<T> data_;
  AlignedBuffer<uint8_t> ready_;
  int64_t owner_ = -1;  // b * Hkv + kv head, or -1
  int64_t tile_elems_ = 0;
};

// A thread's K/V buffers: spare tiles and caches. Each source allocates the ones it uses.
template <typename T>
struct KvScratch {
  AlignedBuffer<T> kt, vt, stage;  // packed K^T, converted V, converted K before packing
  StagedTileCache<T> keys, values;
  AlignedBuffer<uint32_t> kt_pairs, v_pairs;  // bfloat16 pairs of K^T and of V
  StagedTileCache<uint32_t> key_pairs, value_pairs;
};

// One key tile of an item.
struct KeyTile {
  int64_t j0;     // first key, a multiple of kTileKeys
  int64_t staged_keys;  // the whole valid tile (the step may use fewer), so every query tile
                        // can reuse it
  int64_t owner;  // b * Hkv + kv head: whose staged tiles a thread's cache holds
  bool more;      // another tile of the item follows (sources in place prefetch its rows)
};

// What every source has: its layout, and K and V rows of storage type E found through it.
template <typename Layout, typename E>
class OnLayout {
 public:
  using Head = typename Layout::Head;
  explicit OnLayout(const Layout& layout) : layout_(layout) {}
  Head head(const ItemPos& pos) const { return layout_.head(pos); }

 protected:
  const E* k_row(const Head& h, int64_t j) const {
    return static_cast<const E*>(layout_.k_row(h, j));
  }
  const E* v_row(const Head& h, int64_t j) const {
    return static_cast<const E*>(layout_.v_row(h, j));
  }
  // Both operands as rows in place, stored as `elem`.
  template <typename T>
  void setup_rows(TileStep<T>& s, Elem elem) const {
    s.key = {KeyForm::Rows, elem, nullptr, layout_.k_ld()};
    s.value = {ValueForm::Rows, elem, nullptr, layout_.v_ld()};
  }

  Layout layout_;
};

// K and V in the compute type, rows in place: scores as dot products with K rows. For few
// query rows per head and no later query tile to reuse a packed K^T (decode).
template <typename T, typename Layout>
class NativeRows : public OnLayout<Layout, T> {
  using Base = OnLayout<Layout, T>;

 public:
  static constexpr bool kStagedQuery = true;
  explicit NativeRows(const Layout& layout) : Base(layout) {}
  void reserve(KvScratch<T>&, int64_t, bool) const {}
  void setup(TileStep<T>& s) const { this->setup_rows(s, Elem::Compute); }
  void tile(TileStep<T>& s, const typename Base::Head& h, const KeyTile& t, KvScratch<T>&) const {
    s.key.data = this->k_row(h, t.j0);
    s.value.data = this->v_row(h, t.j0);
    s.prefetch_next = t.more;
  }
};

// K and V in the compute type: K^T packed per key tile (cached), V rows in place.
template <typename T, typename Layout>
class PackedKeys : public OnLayout<Layout, T> {
  using Base = OnLayout<Layout, T>;

 public:
  using Pack = void (*)(const T*, int64_t, int64_t, int64_t, T*);
  static constexpr bool kStagedQuery = false;
  PackedKeys(const Layout& layout, Pack pack, int64_t d) : Base(layout), pack_(pack), d_(d) {}
  void reserve(KvScratch<T>& sc, int64_t tiles, bool cache) const {
    sc.kt.allocate(d_ * kTileKeys);
    sc.keys.reserve(tiles, kTileKeys * d_, cache);
  }
  void setup(TileStep<T>& s) const {
    this->setup_rows(s, Elem::Compute);
    s.key = {KeyForm::PackedT, Elem::Compute, nullptr, 0};
  }
  void tile(TileStep<T>& s, const typename Base::Head& h, const KeyTile& t,
            KvScratch<T>& sc) const {
    s.key.data = sc.keys.get(t.owner, t.j0 / kTileKeys, sc.kt.data(), [&](T* dst) {
      pack_(this->k_row(h, t.j0), this->layout_.k_ld(), t.staged_keys, d_, dst);
    });
    s.value.data = this->v_row(h, t.j0);
  }

 private:
  Pack pack_;
  int64_t d_;
};

// Half K and V rows in place, widened by the step as it loads them (decode on a half cache):
// the float32 step for float16 or bfloat16, or the vdpbf16ps step for bfloat16.
template <typename Layout>
class HalfRows : public OnLayout<Layout, uint16_t> {
  using Base = OnLayout<Layout, uint16_t>;

 public:
  static constexpr bool kStagedQuery = true;
  HalfRows(const Layout& layout, Elem elem) : Base(layout), elem_(elem) {}
  void reserve(KvScratch<float>&, int64_t, bool) const {}
  void setup(TileStep<float>& s) const { this->setup_rows(s, elem_); }
  void tile(TileStep<float>& s, const typename Base::Head& h, const KeyTile& t,
            KvScratch<float>&) const {
    s.key.data = this->k_row(h, t.j0);
    s.value.data = this->v_row(h, t.j0);
    s.prefetch_next = t.more;
  }

 private:
  Elem elem_;  // F16 or Bf16
};

// Half K and V converted to float32 per key tile (cached): K through the stage, then packed.
template <typename Layout>
class ConvertedTiles : public OnLayout<Layout, uint16_t> {
  using Base = OnLayout<Layout, uint16_t>;

 public:
  using Convert = decltype(EncodingOps::to_float);
  using Pack = void (*)(const float*, int64_t, int64_t, int64_t, float*);
  static constexpr bool kStagedQuery = false;
  ConvertedTiles(const Layout& layout, Convert convert, Pack pack, int64_t d, int64_t dv)
      : Base(layout), convert_(convert), pack_(pack), d_(d), dv_(dv) {}
  void reserve(KvScratch<float>& sc, int64_t tiles, bool cache) const {
    sc.kt.allocate(d_ * kTileKeys);
    sc.stage.allocate(kTileKeys * d_);
    sc.vt.allocate(kTileKeys * dv_);
    sc.keys.reserve(tiles, kTileKeys * d_, cache);
    sc.values.reserve(tiles, kTileKeys * dv_, cache);
  }
  void setup(TileStep<float>& s) const {
    s.key = {KeyForm::PackedT, Elem::Compute, nullptr, 0};
    s.value = {ValueForm::Rows, Elem::Compute, nullptr, dv_};  // the converted tile's rows
  }
  void tile(TileStep<float>& s, const typename Base::Head& h, const KeyTile& t,
            KvScratch<float>& sc) const {
    const int64_t k_ld = this->layout_.k_ld(), v_ld = this->layout_.v_ld();
    s.key.data = sc.keys.get(t.owner, t.j0 / kTileKeys, sc.kt.data(), [&](float* dst) {
      convert_(this->k_row(h, t.j0), k_ld, t.staged_keys, d_, sc.stage.data());
      pack_(sc.stage.data(), d_, t.staged_keys, d_, dst);
    });
    s.value.data = sc.values.get(t.owner, t.j0 / kTileKeys, sc.vt.data(), [&](float* dst) {
      convert_(this->v_row(h, t.j0), v_ld, t.staged_keys, dv_, dst);
    });
  }

 private:
  Convert convert_;
  Pack pack_;
  int64_t d_, dv_;
};

// bfloat16 K and V as bfloat16 pairs per key tile (cached): K^T pairs along D, V pairs of
// consecutive keys. On AMX, K rows are read in place instead (keys_in_place) when a whole
// tile lies in the array.
template <typename Layout>
class Bf16PairTiles : public OnLayout<Layout, uint16_t> {
  using Base = OnLayout<Layout, uint16_t>;

 public:
  static constexpr bool kStagedQuery = true;
  Bf16PairTiles(const Layout& layout, const KernelSet& kernels, int64_t d, int64_t dv,
                int64_t d_pairs, bool keys_in_place)
      : Base(layout), pack_keys_(kernels.pack_bf16_keys), pack_values_(kernels.pack_bf16_values),
        d_(d), dv_(dv), d_pairs_(d_pairs), width_(bf16_values_width(dv)),
        keys_in_place_(keys_in_place) {}
  void reserve(KvScratch<float>& sc, int64_t tiles, bool cache) const {
    const int64_t v_elems = kTileKeys / 2 * width_;
    sc.kt_pairs.allocate(d_pairs_ * kTileKeys);
    sc.v_pairs.allocate(v_elems);
    sc.key_pairs.reserve(tiles, d_pairs_ * kTileKeys, cache);
    sc.value_pairs.reserve(tiles, v_elems, cache);
  }
  void setup(TileStep<float>& s) const {
    s.value = {ValueForm::Bf16Pairs, Elem::Bf16, nullptr, width_};
  }
  void tile(TileStep<float>& s, const typename Base::Head& h, const KeyTile& t,
            KvScratch<float>& sc) const {
    const auto* k16 = this->k_row(h, t.j0);
    const auto* v16 = this->v_row(h, t.j0);
    const int64_t k_ld = this->layout_.k_ld(), v_ld = this->layout_.v_ld();
    if (keys_in_place_ && this->layout_.rows_inside(h, t.j0, kTileKeys)) {
      s.key = {KeyForm::Rows, Elem::Bf16, k16, k_ld};
    } else {
      s.key = {KeyForm::Bf16PairsT, Elem::Bf16, nullptr, 0};
      s.key.data = sc.key_pairs.get(
          t.owner, t.j0 / kTileKeys, sc.kt_pairs.data(),
          [&](uint32_t* dst) { pack_keys_(k16, k_ld, t.staged_keys, d_, d_pairs_, dst); });
    }
    // Kept with the tile: 1 + (the first key whose V row holds an inf or NaN, + 1), 1 if none.
    const auto [values, state] = sc.value_pairs.get_flagged(
        t.owner, t.j0 / kTileKeys, sc.v_pairs.data(), [&](uint32_t* dst) {
          return uint8_t(2 + pack_values_(v16, v_ld, t.staged_keys, dv_, width_, dst));
        });
    s.value.data = values;
    s.value.first_nonfinite_key = state == 1 ? int32_t(kTileKeys) : int32_t(state - 2);
  }

 private:
  decltype(KernelSet::pack_bf16_keys) pack_keys_;
  decltype(KernelSet::pack_bf16_values) pack_values_;
  int64_t d_, dv_, d_pairs_, width_;
  bool keys_in_place_;
};

// The sources a call may use, on each layout: the five storage kinds for float32 compute,
// the native two for float64 (half storage is computed in float32 only).
template <typename T, typename... Layouts>
using KvSourceOn = std::conditional_t<
    std::is_same_v<T, float>,
    std::variant<NativeRows<float, Layouts>..., PackedKeys<float, Layouts>..., HalfRows<Layouts>...,
                 ConvertedTiles<Layouts>..., Bf16PairTiles<Layouts>...>,
    std::variant<NativeRows<double, Layouts>..., PackedKeys<double, Layouts>...>>;
template <typename T>
using KvSource = KvSourceOn<T, DenseLayout>;

// The source for a call on `layout`. path / on_amx / d_pairs: the step's choice (AMX tile
// registers, D's padded bfloat16 pairs).
template <typename T, typename Layout>
KvSource<T> choose_kv_source(const Params& p, const KernelSet& kernels, const WorkPlan& plan,
                             const Layout& layout, KvPath path, bool on_amx, int64_t d_pairs) {
  // A single query tile per head (no packed tile to reuse) of a few rows (decode).
  const bool one_tile = plan.query_tiles_per_head() == 1;
  const bool few_rows = one_tile && plan.rows_per_head_group() <= kInPlaceMaxRows;
  if constexpr (std::is_same_v<T, float>) {
    if (path == KvPath::Bf16Pairs) {
      if (few_rows && !on_amx) return HalfRows<Layout>(layout, Elem::Bf16);
      // AMX takes K rows as they are when D fills whole 32-element chunks and rows go forward.
      const bool keys_in_place =
          on_amx && one_tile && p.d % (2 * kAmxPairs) == 0 && layout.k_ld() > 0;
      return Bf16PairTiles<Layout>(layout, kernels, p.d, p.dv, d_pairs, keys_in_place);
    }
    if (path == KvPath::WidenedToFloat) {
      const Elem elem = p.kv_dtype == DType::BF16 ? Elem::Bf16 : Elem::F16;
      if (few_rows && !p.additive_w) return HalfRows<Layout>(layout, elem);
      return ConvertedTiles<Layout>(layout, kernels.encodings[int(elem)].to_float, kernels.pack_f32,
                                    p.d, p.dv);
    }
  }
  if (few_rows && !p.additive_w) return NativeRows<T, Layout>(layout);
  if constexpr (std::is_same_v<T, float>) {
    return PackedKeys<float, Layout>(layout, kernels.pack_f32, p.d);
  } else {
    return PackedKeys<double, Layout>(layout, kernels.pack_f64, p.d);
  }
}

}  // namespace cpuattn

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
//   bool staged_query()                   its step reads q staged (copied and scaled, or as
//                                         pairs), never the caller's rows in place
//   void reserve(KvScratch&, tiles, cache)  a thread's buffers, before the parallel region
//   void setup(TileStep&)                 the step's K/V fields that hold for the whole call
//   Head head(const ItemPos&)             the layout's, once per item
//   void tile(TileStep&, Head, KeyTile<Head>, KvScratch&)  the K/V fields of one key tile
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
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

// Row tables of key tiles, for sources that read rows in place where a tile is not one run
// (and for the tile to prefetch): the addresses of kv head 0's rows of a batch entry, to which
// each head adds its layout offset. The two used last are kept, so the lockstep heads of a
// batch entry build a tile's table once, and the next head's same tile (to prefetch) is a
// table already built.
class RowTables {
 public:
  void reserve() {
    for (Slot& slot : slots_) slot.table.allocate(kTileKeys);
  }
  // The table of rows [j0, j0 + keys) of `runs` (Layout::runs), whose first is `first`:
  // kept, or filled by build(table).
  template <typename Build>
  const char* const* get(const void* runs, const char* first, int64_t j0, int64_t keys,
                         const Build& build) {
    ++clock_;
    for (Slot& slot : slots_) {
      if (slot.first == first && slot.runs == runs && slot.j0 == j0 && slot.keys == keys) {
        slot.used = clock_;
        return slot.table.data();
      }
    }
    Slot& slot = slots_[0].used <= slots_[1].used ? slots_[0] : slots_[1];
    build(slot.table.data());
    slot.runs = runs;
    slot.first = first;
    slot.j0 = j0;
    slot.keys = keys;
    slot.used = clock_;
    return slot.table.data();
  }

 private:
  struct Slot {
    AlignedBuffer<const char*> table;
    const void* runs = nullptr;
    const char* first = nullptr;  // nullptr: empty
    int64_t j0 = 0, keys = 0;
    uint64_t used = 0;
  };
  Slot slots_[2];
  uint64_t clock_ = 0;
};

// A thread's K/V buffers: spare tiles and caches. Each source allocates the ones it uses.
template <typename T>
struct KvScratch {
  AlignedBuffer<T> kt, vt, stage;  // packed K^T, converted V, converted K before packing
  // A key tile's K and V rows copied run by run where the layout splits the tile (paged
  // caches whose blocks are shorter than a tile), for sources that pack it (K^T, pairs).
  AlignedBuffer<unsigned char> gathered_k, gathered_v;
  AlignedBuffer<float> gathered_k_scales, gathered_v_scales;  // int8 rows' scales, likewise
  // Where each key's K and V rows lie, in this tile when they are not one run and in the
  // tile the thread reads next (KeyTile::next), for a step that reads rows (and prefetches
  // those as it goes).
  RowTables k_rows, v_rows;
  StagedTileCache<T> keys, values;
  AlignedBuffer<uint32_t> kt_pairs, v_pairs;  // bfloat16 pairs of K^T and of V
  StagedTileCache<uint32_t> key_pairs, value_pairs;
};

// The lines of `bytes` bytes from `at`, into the caches.
inline void prefetch_lines(const void* at, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64)
    __builtin_prefetch(static_cast<const char*>(at) + b, 0, 3);
}

// One key tile of an item (of the layout's Head), and the rows the thread reads right after
// it, which sources ask the caches for while this tile is computed: the item's next tile or,
// for heads stepped in lockstep, the next head's same tile. The nearest such rows, not the
// head's own next tile: in lockstep that one is a whole round of heads away, and asking that
// far ahead left decode over a (B, L, H, D) float16 cache 1.4x slower than over (B, H, L, D),
// where asking for the next head's tile made the two equal (measured on a 2-core Xeon).
template <typename Head>
struct KeyTile {
  int64_t j0;     // first key, a multiple of kTileKeys
  int64_t staged_keys;  // the whole valid tile (the step may use fewer), so every query tile
                        // can reuse it
  int64_t owner;  // b * Hkv + kv head: whose staged tiles a thread's cache holds
  struct Next {
    Head head;
    int64_t j0 = 0;    // its first key, a multiple of kTileKeys
    int64_t keys = 0;  // 0: none (the task's last tile, or the next visited tile does not
                       // follow this one: a gap in a window or between global keys)
  } next;
};

// What every source has: its layout, and K and V rows of storage type E found through it.
template <typename Layout, typename E>
class OnLayout {
 public:
  using Head = typename Layout::Head;
  using Tile = KeyTile<Head>;
  explicit OnLayout(const Layout& layout) : layout_(layout) {}
  Head head(const ItemPos& pos) const { return layout_.head(pos); }

 protected:
  // A tile's rows as one run, `ld` elements apart: in place, or copied into scratch.
  struct Rows {
    const E* data;
    int64_t ld;
  };

  const E* k_row(const Head& h, int64_t j) const {
    return static_cast<const E*>(layout_.k_row(h, j));
  }
  const E* v_row(const Head& h, int64_t j) const {
    return static_cast<const E*>(layout_.v_row(h, j));
  }

  // fn(j, n) for each run of keys [j, j + n) that covers [j0, j0 + keys), in order.
  template <typename Fn>
  void for_each_run(int64_t j0, int64_t keys, const Fn& fn) const {
    for (int64_t j = j0, end = j0 + keys; j < end;) {
      const int64_t n = std::min(layout_.run_end(j), end) - j;
      fn(j, n);
      j += n;
    }
  }
  // Whether keys [j0, j0 + keys) lie in one run.
  bool one_run(int64_t j0, int64_t keys) const {
    return Layout::kOneRun || layout_.run_end(j0) >= j0 + keys;
  }
  // Key j of tile t's counterpart in t.next: the key at the same place in that tile.
  static int64_t next_key(const Tile& t, int64_t j) { return j - t.j0 + t.next.j0; }
  // Whether the run [j, j + n) of tile t has its counterpart in t.next: rows that exist, in
  // one run, so a source can prefetch them as it reads these.
  bool ahead(const Tile& t, int64_t j, int64_t n) const {
    return j - t.j0 + n <= t.next.keys && one_run(next_key(t, j), n);
  }
  // Gather buffers for the tiles that are not one run: none for a layout of one run per head.
  void reserve_gather(KvScratch<float>& sc, int64_t d, int64_t dv) const {
    reserve_gather_bytes(sc.gathered_k, sc.gathered_v, d, dv);
  }
  void reserve_gather(KvScratch<double>& sc, int64_t d, int64_t dv) const {
    reserve_gather_bytes(sc.gathered_k, sc.gathered_v, d, dv);
  }
  // K's (V's) rows of tile t's staged keys, `width` elements each: in place when they lie in
  // one run, else copied run by run into `gathered`.
  Rows k_tile(const Head& h, const Tile& t, int64_t width,
              AlignedBuffer<unsigned char>& gathered) const {
    return tile_rows(h, t, width, layout_.k_ld(), gathered,
                     [&](const Head& at, int64_t j) { return k_row(at, j); });
  }
  Rows v_tile(const Head& h, const Tile& t, int64_t width,
              AlignedBuffer<unsigned char>& gathered) const {
    return tile_rows(h, t, width, layout_.v_ld(), gathered,
                     [&](const Head& at, int64_t j) { return v_row(at, j); });
  }
  // The step's K and V rows for a source that reads them in place: one run `ld` apart, or
  // (a paged tile in several blocks) a table of row addresses; and t.next's rows, for the
  // step to prefetch as it goes.
  template <typename T>
  void rows_in_place(TileStep<T>& s, const Head& h, const Tile& t, KvScratch<T>& sc) const {
    s.key.data = k_row(h, t.j0);
    s.key.rows = nullptr;
    if (!one_run(t.j0, t.staged_keys)) {
      s.key.rows =
          row_table(sc.k_rows, h, t.j0, t.staged_keys, layout_.k_ld(), k_at(), layout_.k_offset(h));
      s.key.row_offset = layout_.k_offset(h);
    }
    values_in_place(s, h, t, sc);
    s.prefetch_next = t.next.keys > 0;
    if (!s.prefetch_next) return;
    const Head& n = t.next.head;
    s.key.next_offset = layout_.k_offset(n);
    s.key.next =
        row_table(sc.k_rows, n, t.next.j0, t.next.keys, layout_.k_ld(), k_at(), s.key.next_offset);
    s.value.next_offset = layout_.v_offset(n);
    s.value.next = row_table(sc.v_rows, n, t.next.j0, t.next.keys, layout_.v_ld(), v_at(),
                             s.value.next_offset);
  }
  // The step's V rows in place: one run `ld` apart, or a table of their addresses.
  template <typename T>
  void values_in_place(TileStep<T>& s, const Head& h, const Tile& t, KvScratch<T>& sc) const {
    s.value.data = v_row(h, t.j0);
    s.value.rows = nullptr;
    if (one_run(t.j0, t.staged_keys)) return;
    s.value.row_offset = layout_.v_offset(h);
    s.value.rows =
        row_table(sc.v_rows, h, t.j0, t.staged_keys, layout_.v_ld(), v_at(), s.value.row_offset);
  }
  // k_row, v_row as functions of (head, key).
  auto k_at() const {
    return [this](const Head& at, int64_t j) { return k_row(at, j); };
  }
  auto v_at() const {
    return [this](const Head& at, int64_t j) { return v_row(at, j); };
  }
  // Buffers for rows_in_place, before the parallel region.
  template <typename T>
  void reserve_rows(KvScratch<T>& sc) const {
    sc.k_rows.reserve();
    sc.v_rows.reserve();
  }
  // The scales of int8 rows in place: in place for one run (t.next's prefetched), else
  // copied run by run (t.next's run by run prefetched).
  template <typename T>
  void scales_in_place(TileStep<T>& s, const Head& h, const Tile& t, KvScratch<T>& sc) const {
    scales_of(s.key.scales, s.key.scale_ld, h, t, sc.gathered_k_scales, layout_.k_scale_ld(),
              [&](const Head& at, int64_t j) { return layout_.k_scale(at, j); });
    scales_of(s.value.scales, s.value.scale_ld, h, t, sc.gathered_v_scales, layout_.v_scale_ld(),
              [&](const Head& at, int64_t j) { return layout_.v_scale(at, j); });
  }
  // Both operands as rows in place, stored as `elem`.
  template <typename T>
  void setup_rows(TileStep<T>& s, Elem elem) const {
    s.key = {KeyForm::Rows, elem, nullptr, layout_.k_ld()};
    s.value = {ValueForm::Rows, elem, nullptr, layout_.v_ld()};
  }

  Layout layout_;

 private:
  // The table of rows [j0, j0 + keys) of head h (row_at(h, j), `offset` bytes past kv head
  // 0's), run by run, as kv head 0's addresses: built once for all heads of a batch entry.
  // Its entries past `keys` repeat the first (a valid row, for the step's reads past cols).
  template <typename RowAt>
  const char* const* row_table(RowTables& tables, const Head& h, int64_t j0, int64_t keys,
                               int64_t ld, const RowAt& row_at, int64_t offset) const {
    const char* first = reinterpret_cast<const char*>(row_at(h, j0)) - offset;
    return tables.get(layout_.runs(h), first, j0, keys, [&](const char** table) {
      const int64_t bytes = ld * int64_t(sizeof(E));
      for_each_run(j0, keys, [&](int64_t j, int64_t n) {
        const char* row = reinterpret_cast<const char*>(row_at(h, j)) - offset;
        for (int64_t r = 0; r < n; ++r) table[j - j0 + r] = row + r * bytes;
      });
      for (int64_t i = keys; i < kTileKeys; ++i) table[i] = table[0];
    });
  }
  // at(head, j): key j's scale.
  template <typename At>
  void scales_of(const float*& scales, int64_t& ld, const Head& h, const Tile& t,
                 AlignedBuffer<float>& gathered, int64_t scale_ld, const At& at) const {
    if (one_run(t.j0, t.staged_keys)) {
      scales = at(h, t.j0);
      ld = scale_ld;
      if (t.next.keys > 0 && one_run(t.next.j0, t.next.keys)) {
        prefetch_lines(at(t.next.head, t.next.j0), t.next.keys * scale_ld * 4);
      }
      return;
    }
    for_each_run(t.j0, t.staged_keys, [&](int64_t j, int64_t n) {
      const float* from = at(h, j);
      for (int64_t r = 0; r < n; ++r) gathered[j - t.j0 + r] = from[r * scale_ld];
      if (ahead(t, j, n)) prefetch_lines(at(t.next.head, next_key(t, j)), n * scale_ld * 4);
    });
    scales = gathered.data();
    ld = 1;
  }
  void reserve_gather_bytes(AlignedBuffer<unsigned char>& k, AlignedBuffer<unsigned char>& v,
                            int64_t d, int64_t dv) const {
    if (Layout::kOneRun) return;
    k.allocate(kTileKeys * d * int64_t(sizeof(E)));
    v.allocate(kTileKeys * dv * int64_t(sizeof(E)));
  }
  // t.next's rows are prefetched while these are copied (the step reads a packed tile made
  // from the copy, and prefetches nothing). row_at(head, j): key j's row.
  template <typename RowAt>
  Rows tile_rows(const Head& h, const Tile& t, int64_t width, int64_t ld,
                 AlignedBuffer<unsigned char>& gathered, const RowAt& row_at) const {
    if (one_run(t.j0, t.staged_keys)) return {row_at(h, t.j0), ld};
    E* dst = reinterpret_cast<E*>(gathered.data());
    const int64_t bytes = width * int64_t(sizeof(E));
    if (bytes == 0) return {dst, width};  // D = 0: no buffer (memcpy to null is undefined)
    for_each_run(t.j0, t.staged_keys, [&](int64_t j, int64_t n) {
      const E* src = row_at(h, j);
      const char* next =
          ahead(t, j, n) ? reinterpret_cast<const char*>(row_at(t.next.head, this->next_key(t, j)))
                         : nullptr;
      for (int64_t r = 0; r < n; ++r) {
        if (next) prefetch_lines(next + r * ld * int64_t(sizeof(E)), bytes);
        std::memcpy(dst + (j - t.j0 + r) * width, src + r * ld, size_t(bytes));
      }
    });
    return {dst, width};
  }
};

// K and V in the compute type, rows in place: scores as dot products with K rows. For few
// query rows per head and no later query tile to reuse a packed K^T (decode).
template <typename T, typename Layout>
class NativeRows : public OnLayout<Layout, T> {
  using Base = OnLayout<Layout, T>;

 public:
  bool staged_query() const { return true; }
  explicit NativeRows(const Layout& layout) : Base(layout) {}
  void reserve(KvScratch<T>& sc, int64_t, bool) const { this->reserve_rows(sc); }
  void setup(TileStep<T>& s) const { this->setup_rows(s, Elem::Compute); }
  void tile(TileStep<T>& s, const typename Base::Head& h, const typename Base::Tile& t,
            KvScratch<T>& sc) const {
    this->rows_in_place(s, h, t, sc);
  }
};

// K and V in the compute type: K^T packed per key tile (cached; from a gathered tile where a
// paged cache splits it), V rows in place (through a row table where it splits them).
template <typename T, typename Layout>
class PackedKeys : public OnLayout<Layout, T> {
  using Base = OnLayout<Layout, T>;

 public:
  using Pack = void (*)(const T*, int64_t, int64_t, int64_t, T*, int64_t);
  bool staged_query() const { return false; }
  PackedKeys(const Layout& layout, Pack pack, int64_t d) : Base(layout), pack_(pack), d_(d) {}
  void reserve(KvScratch<T>& sc, int64_t tiles, bool cache) const {
    sc.kt.allocate(d_ * kTileKeys);
    sc.keys.reserve(tiles, kTileKeys * d_, cache);
    this->reserve_gather(sc, d_, 0);  // K only: packed from a gathered tile
    sc.v_rows.reserve();
  }
  void setup(TileStep<T>& s) const {
    this->setup_rows(s, Elem::Compute);
    s.key = {KeyForm::PackedT, Elem::Compute, nullptr, 0};
  }
  void tile(TileStep<T>& s, const typename Base::Head& h, const typename Base::Tile& t,
            KvScratch<T>& sc) const {
    s.key.data = sc.keys.get(t.owner, t.j0 / kTileKeys, sc.kt.data(), [&](T* dst) {
      const auto k = this->k_tile(h, t, d_, sc.gathered_k);
      pack_(k.data, k.ld, t.staged_keys, d_, dst, padded_keys(t.staged_keys));
    });
    this->values_in_place(s, h, t, sc);
  }

 private:
  Pack pack_;
  int64_t d_, dv_;
};

// Half K and V rows in place, widened by the step as it loads them (decode on a half cache):
// the float32 step for float16 or bfloat16, or the vdpbf16ps step for bfloat16.
template <typename Layout>
class HalfRows : public OnLayout<Layout, uint16_t> {
  using Base = OnLayout<Layout, uint16_t>;

 public:
  bool staged_query() const { return true; }
  HalfRows(const Layout& layout, Elem elem) : Base(layout), elem_(elem) {}
  void reserve(KvScratch<float>& sc, int64_t, bool) const { this->reserve_rows(sc); }
  void setup(TileStep<float>& s) const { this->setup_rows(s, elem_); }
  void tile(TileStep<float>& s, const typename Base::Head& h, const typename Base::Tile& t,
            KvScratch<float>& sc) const {
    this->rows_in_place(s, h, t, sc);
  }

 private:
  Elem elem_;  // F16 or Bf16
};

// int8 K and V rows in place, widened by the float32 step as it loads them, their scales
// applied to the scores (K) and the weights (V): decode on an int8 cache.
template <typename Layout>
class Int8Rows : public OnLayout<Layout, int8_t> {
  using Base = OnLayout<Layout, int8_t>;

 public:
  bool staged_query() const { return true; }
  explicit Int8Rows(const Layout& layout) : Base(layout) {}
  void reserve(KvScratch<float>& sc, int64_t, bool) const {
    this->reserve_rows(sc);
    sc.gathered_k_scales.allocate(kTileKeys);
    sc.gathered_v_scales.allocate(kTileKeys);
  }
  void setup(TileStep<float>& s) const { this->setup_rows(s, Elem::I8); }
  void tile(TileStep<float>& s, const typename Base::Head& h, const typename Base::Tile& t,
            KvScratch<float>& sc) const {
    this->rows_in_place(s, h, t, sc);
    this->scales_in_place(s, h, t, sc);
  }
};

// Half or int8 K and V converted to float32 per key tile by their encoding (int8 rows times
// their scales), run by run, so a paged tile needs no separate gather. K is then packed as
// K^T (cached for the head's later query tiles) or, for a few query rows (decode), kept as
// rows: packing K^T for one query tile costs as much as the product it saves.
template <typename Layout>
class ConvertedTiles : public OnLayout<Layout, unsigned char> {
  using Base = OnLayout<Layout, unsigned char>;

 public:
  using Convert = decltype(EncodingOps::to_float);
  using Pack = decltype(KernelSet::pack_f32);
  // K as rows (no pack) is read by score_rows, from a staged q.
  bool staged_query() const { return pack_ == nullptr; }
  // pack: nullptr to keep K as rows.
  ConvertedTiles(const Layout& layout, Convert convert, bool scaled, Pack pack, int64_t d,
                 int64_t dv)
      : Base(layout), convert_(convert), scaled_(scaled), pack_(pack), d_(d), dv_(dv) {}
  void reserve(KvScratch<float>& sc, int64_t tiles, bool cache) const {
    sc.stage.allocate(kTileKeys * d_);
    sc.vt.allocate(kTileKeys * dv_);
    sc.values.reserve(tiles, kTileKeys * dv_, cache);
    if (pack_) {
      sc.kt.allocate(d_ * kTileKeys);
      sc.keys.reserve(tiles, kTileKeys * d_, cache);
    }
  }
  void setup(TileStep<float>& s) const {
    s.key = pack_ ? KeyOperand{KeyForm::PackedT, Elem::Compute, nullptr, 0}
                  : KeyOperand{KeyForm::Rows, Elem::Compute, nullptr, d_};
    s.value = {ValueForm::Rows, Elem::Compute, nullptr, dv_};  // the converted tile's rows
  }
  void tile(TileStep<float>& s, const typename Base::Head& h, const typename Base::Tile& t,
            KvScratch<float>& sc) const {
    const int64_t tile = t.j0 / kTileKeys;
    const auto& lay = this->layout_;
    const auto convert_keys = [&](float* dst) {
      convert_tile(
          h, t, dst, d_, lay.k_ld(), lay.k_scale_ld(),
          [&](const auto& at, int64_t j) { return this->k_row(at, j); },
          [&](const auto& at, int64_t j) { return lay.k_scale(at, j); });
    };
    if (pack_) {
      s.key.data = sc.keys.get(t.owner, tile, sc.kt.data(), [&](float* dst) {
        convert_keys(sc.stage.data());
        pack_(sc.stage.data(), d_, t.staged_keys, d_, dst, padded_keys(t.staged_keys));
      });
    } else {
      convert_keys(sc.stage.data());
      s.key.data = sc.stage.data();
    }
    s.value.data = sc.values.get(t.owner, tile, sc.vt.data(), [&](float* dst) {
      convert_tile(
          h, t, dst, dv_, lay.v_ld(), lay.v_scale_ld(),
          [&](const auto& at, int64_t j) { return this->v_row(at, j); },
          [&](const auto& at, int64_t j) { return lay.v_scale(at, j); });
    });
  }

 private:
  // Head h's tile t (row_at(head, j), ld apart within a run; their scales scale_at(head, j),
  // scale_ld apart) converted run by run into dst, `width` floats a row; t.next's rows
  // prefetched.
  template <typename RowAt, typename ScaleAt>
  void convert_tile(const typename Base::Head& h, const typename Base::Tile& t, float* dst,
                    int64_t width, int64_t ld, int64_t scale_ld, const RowAt& row_at,
                    const ScaleAt& scale_at) const {
    this->for_each_run(t.j0, t.staged_keys, [&](int64_t j, int64_t n) {
      const bool ahead = this->ahead(t, j, n);
      const int64_t next = this->next_key(t, j);
      const float* scales = scaled_ ? scale_at(h, j) : nullptr;
      if (scaled_ && ahead) prefetch_lines(scale_at(t.next.head, next), n * scale_ld * 4);
      convert_(row_at(h, j), ld, scales, scale_ld, n, width, dst + (j - t.j0) * width,
               ahead ? row_at(t.next.head, next) : nullptr);
    });
  }

  Convert convert_;
  bool scaled_;  // int8: rows times the layout's scales
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
  bool staged_query() const { return true; }
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
    this->reserve_gather(sc, d_, dv_);
  }
  void setup(TileStep<float>& s) const {
    s.value = {ValueForm::Bf16Pairs, Elem::Bf16, nullptr, width_};
  }
  void tile(TileStep<float>& s, const typename Base::Head& h, const typename Base::Tile& t,
            KvScratch<float>& sc) const {
    if (keys_in_place_ && this->layout_.rows_inside(h, t.j0, kTileKeys)) {
      s.key = {KeyForm::Rows, Elem::Bf16, this->k_row(h, t.j0), this->layout_.k_ld()};
    } else {
      s.key = {KeyForm::Bf16PairsT, Elem::Bf16, nullptr, 0};
      s.key.data =
          sc.key_pairs.get(t.owner, t.j0 / kTileKeys, sc.kt_pairs.data(), [&](uint32_t* dst) {
            const auto k = this->k_tile(h, t, d_, sc.gathered_k);
            pack_keys_(k.data, k.ld, t.staged_keys, d_, d_pairs_, dst);
          });
    }
    // Kept with the tile: 1 + (the first key whose V row holds an inf or NaN, + 1), 1 if none.
    const auto [values, state] = sc.value_pairs.get_flagged(
        t.owner, t.j0 / kTileKeys, sc.v_pairs.data(), [&](uint32_t* dst) {
          const auto v = this->v_tile(h, t, dv_, sc.gathered_v);
          return uint8_t(2 + pack_values_(v.data, v.ld, t.staged_keys, dv_, width_, dst));
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

// The sources a call may use, on each layout: six for float32 compute, the native two for
// float64 (half and int8 storage are computed in float32 only).
template <typename T, typename... Layouts>
using KvSourceOn = std::conditional_t<
    std::is_same_v<T, float>,
    std::variant<NativeRows<float, Layouts>..., PackedKeys<float, Layouts>..., HalfRows<Layouts>...,
                 Int8Rows<Layouts>..., ConvertedTiles<Layouts>..., Bf16PairTiles<Layouts>...>,
    std::variant<NativeRows<double, Layouts>..., PackedKeys<double, Layouts>...>>;
template <typename T>
using KvSource = KvSourceOn<T, DenseLayout, PagedLayout>;

// The source for a call on `layout`. path / on_amx / d_pairs: the step's choice (AMX tile
// registers, D's padded bfloat16 pairs).
template <typename T, typename Layout>
KvSource<T> choose_kv_source(const Params& p, const KernelSet& kernels, const WorkPlan& plan,
                             const Layout& layout, KvPath path, bool on_amx, int64_t d_pairs) {
  const bool one_tile = plan.query_tiles_per_head() == 1;
  const bool few_rows = plan.rows_in_place();
  if constexpr (std::is_same_v<T, float>) {
    if (path == KvPath::Bf16Pairs) {
      if (few_rows) return HalfRows<Layout>(layout, Elem::Bf16);
      // AMX takes K rows as they are when D fills whole 32-element chunks and rows go forward.
      const bool keys_in_place =
          on_amx && one_tile && p.d % (2 * kAmxPairs) == 0 && layout.k_ld() > 0;
      return Bf16PairTiles<Layout>(layout, kernels, p.d, p.dv, d_pairs, keys_in_place);
    }
    if (path == KvPath::WidenedToFloat) {
      const Elem elem = p.kv_dtype == DType::BF16 ? Elem::Bf16
                        : p.kv_dtype == DType::I8 ? Elem::I8
                                                  : Elem::F16;
      const bool rows = few_rows && !p.additive_w;
      if (rows && elem == Elem::I8) return Int8Rows<Layout>(layout);
      if (rows) return HalfRows<Layout>(layout, elem);
      return ConvertedTiles<Layout>(layout, kernels.encodings[int(elem)].to_float, elem == Elem::I8,
                                    rows ? nullptr : kernels.pack_f32, p.d, p.dv);
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

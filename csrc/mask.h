// Which keys a query row may see, from causal / window / kv_lengths / global tokens, and tile
// classification. A row's window keeps the half-open range [lo(i), hi(i)); both ends are
// non-decreasing in i, so a tile of rows [i_first, i_last] sees window keys only inside
// [lo(i_first), hi(i_last)). Global tokens (hybrid attention) add keys outside that band.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

#include "tiles.h"
#include "types.h"  // KeyRange

namespace cpuattn {

// The keys one task visits of an item (split-KV): [begin, end), multiples of kTileKeys, counted
// over the tiles the item visits (KeyTiles: global keys' tiles before the band, the band from
// its first tile, global keys' tiles after it), not from key 0: a window's keys start far from
// 0. {0, INT64_MAX}: all of them.
struct KeyChunk {
  int64_t begin, end;
};

// Global tokens (Longformer / BigBird global attention, StreamingLLM's sinks): sorted,
// distinct positions. A row keeps its window's keys and every global key below its cap; a
// row whose own position (its diagonal) is global keeps every key below its cap. Empty unless
// the call has a window: without one every row keeps every key below its cap already.
struct GlobalTokens {
  const int64_t* pos = nullptr;
  int64_t n = 0;

  // The index of the first position >= x.
  int64_t first_from(int64_t x) const { return std::lower_bound(pos, pos + n, x) - pos; }
  // Whether some position lies in [a, b).
  bool any_in(int64_t a, int64_t b) const {
    const int64_t k = first_from(a);
    return k < n && pos[k] < b;
  }
  // The key tiles that hold positions in [a, b) (a >= 0), in order: how many, or the keys from
  // the start of the k0-th of them to the end of the (k1 - 1)-th (0-based), clipped to
  // [a, b); empty when there are none.
  int64_t count_tiles(int64_t a, int64_t b) const {
    int64_t tiles = 0;
    for (int64_t k = first_from(a), last = -1; k < n && pos[k] < b; ++k) {
      const int64_t tile = pos[k] / kTileKeys;
      tiles += tile != last;
      last = tile;
    }
    return tiles;
  }
  KeyRange tile_range(int64_t a, int64_t b, int64_t k0, int64_t k1) const {
    KeyRange keys{0, 0};
    int64_t index = -1;
    for (int64_t k = first_from(a), last = -1; k < n && pos[k] < b; ++k) {
      const int64_t tile = pos[k] / kTileKeys;
      if (tile == last) continue;
      last = tile;
      if (++index >= k1) break;
      if (index == k0) keys.lo = std::max(a, tile * kTileKeys);
      if (index >= k0) keys.hi = std::min(b, (tile + 1) * kTileKeys);
    }
    return keys.hi > keys.lo ? keys : KeyRange{0, 0};
  }
};

// global_cols sets one bit per key of a tile.
static_assert(kTileKeys <= 64, "a tile's global keys must fit a uint64_t");

struct RowBounds {
  int64_t n_keys;   // valid keys for this batch entry (kv_lengths[b] or Lk)
  int64_t offset;   // row i's diagonal is key i + offset: n_keys - Lq (bottom-right), 0
                    // (top-left) or the caller's diagonal
  bool causal;
  int64_t left, right;  // window, -1 = unbounded
  GlobalTokens globals{};

  // The window's keys (the band): non-decreasing ends. Always inlined: called, GCC returned
  // the pair in two registers, stored them as two words and reloaded them as one vector to
  // copy into QueryRows::bounds, a failed store forward per row (5-10 % of a call on
  // sentence-sized heads, (32, 12, 16, 32)).
  __attribute__((always_inline)) KeyRange of_row(int64_t i) const {
    const int64_t diag = i + offset;
    int64_t lo = 0, hi = n_keys;
    if (left >= 0) lo = std::max<int64_t>(lo, diag - left);
    if (causal) hi = std::min<int64_t>(hi, diag + 1);
    if (right >= 0) hi = std::min<int64_t>(hi, diag + right + 1);
    lo = std::min(lo, n_keys);  // so that an empty range never points past the valid keys
    return {lo, std::max(lo, hi)};
  }
  // The keys below this are the ones row i keeps without its window (kv_lengths, causal):
  // non-decreasing in i.
  int64_t cap(int64_t i) const {
    const int64_t hi = causal ? std::min<int64_t>(n_keys, i + offset + 1) : n_keys;
    return std::max<int64_t>(hi, 0);
  }
  bool global_rows_in(int64_t i_first, int64_t i_last) const {
    return globals.n > 0 && globals.any_in(i_first + offset, i_last + offset + 1);
  }
  // The range a row's bounds hold (QueryRows::bounds): its band, or for a global row every
  // key below its cap. The global keys a band row keeps besides come from global_cols.
  KeyRange keys_of_row(int64_t i) const {
    return global_rows_in(i, i) ? KeyRange{0, cap(i)} : of_row(i);
  }
  // Whether, of rows [i_first, i_last], only those at global positions keep keys of [j0, j1):
  // the keys lie outside the rows' band and none of them below the cap is global.
  bool only_global_rows(int64_t i_first, int64_t i_last, int64_t j0, int64_t j1) const {
    if (globals.n == 0) return false;
    const bool outside_band = j1 <= of_row(i_first).lo || j0 >= of_row(i_last).hi;
    return outside_band && !globals.any_in(j0, std::min(j1, cap(i_last)));
  }
  // Bit c set: key j0 + c is global, for keys [j0, j1) of one tile.
  uint64_t global_cols(int64_t j0, int64_t j1) const {
    uint64_t bits = 0;
    for (int64_t k = globals.first_from(j0); k < globals.n && globals.pos[k] < j1; ++k) {
      bits |= uint64_t(1) << (globals.pos[k] - j0);
    }
    return bits;
  }
};

enum class TileKind { Skip, Full, Partial };

// Rows [i_first, i_last] against keys [j0, j1). Full means every pair is kept by the bounds
// (a user mask still applies elementwise), Skip means none is.
inline TileKind classify_tile(const RowBounds& rb, int64_t i_first, int64_t i_last, int64_t j0,
                              int64_t j1) {
  const KeyRange first = rb.of_row(i_first), last = rb.of_row(i_last);
  TileKind band = TileKind::Partial;
  if (j1 <= first.lo || j0 >= last.hi) band = TileKind::Skip;
  // Every row keeps [lo(i_last), hi(i_first)) at least.
  if (j0 >= last.lo && j1 <= first.hi) band = TileKind::Full;
  if (band != TileKind::Skip || rb.globals.n == 0) return band;
  // Outside the band: kept where a global key or row lies below the caps (the last row's is
  // the largest).
  const int64_t cap = rb.cap(i_last);
  if (j0 >= cap) return TileKind::Skip;
  const bool kept = rb.global_rows_in(i_first, i_last) || rb.globals.any_in(j0, std::min(j1, cap));
  return kept ? TileKind::Partial : TileKind::Skip;
}

// The key tiles rows [i_first, i_last] visit, in key order: the tiles of global keys before
// their band, the band's tiles, the tiles of global keys after it (global keys below the last
// row's cap; the band is every tile below it when one of the rows is global), never a tile
// between them. `chunk` (split-KV) takes the visited tiles [begin / kTileKeys, end /
// kTileKeys) of that sequence. Tiles start at multiples of kTileKeys (so staged tiles can be
// shared by query tiles; keys of a tile that the rows do not keep are dropped by the
// Partial-tile bounds) and end at tile_end().
class KeyTiles {
 public:
  KeyTiles(const RowBounds& rb, int64_t i_first, int64_t i_last, KeyChunk chunk = {0, INT64_MAX})
      : globals_(rb.globals) {
    int64_t lo = rb.of_row(i_first).lo, hi = rb.of_row(i_last).hi;
    if (globals_.n > 0) {
      cap_ = rb.cap(i_last);
      if (rb.global_rows_in(i_first, i_last)) {
        lo = 0;
        hi = std::max(hi, cap_);
      }
    }
    base_ = lo / kTileKeys * kTileKeys;
    band_hi_ = std::max(hi, base_);
    const int64_t after_band = (band_hi_ + kTileKeys - 1) / kTileKeys * kTileKeys;
    const int64_t before_end = std::min(base_, cap_);
    const int64_t n_before = globals_.n > 0 ? globals_.count_tiles(0, before_end) : 0;
    const int64_t n_band = (band_hi_ - base_ + kTileKeys - 1) / kTileKeys;
    const int64_t n_after = globals_.n > 0 ? globals_.count_tiles(after_band, cap_) : 0;
    tiles_ = n_before + n_band + n_after;

    // This chunk's visited tiles [v0, v1), in the three parts.
    const int64_t v0 = chunk.begin / kTileKeys, v1 = chunk.end / kTileKeys;
    if (v0 < n_before) before_ = globals_.tile_range(0, before_end, v0, v1);
    const int64_t band0 = std::clamp<int64_t>(v0 - n_before, 0, n_band);
    const int64_t band1 = std::clamp<int64_t>(v1 - n_before, 0, n_band);
    band_begin_ = base_ + band0 * kTileKeys;
    band_end_ = band1 == n_band ? band_hi_ : base_ + band1 * kTileKeys;
    if (v1 > n_before + n_band && n_after > 0) {
      after_ = globals_.tile_range(after_band, cap_, std::max<int64_t>(v0 - n_before - n_band, 0),
                                   v1 - n_before - n_band);
    }
    end_ = std::max({band_end_, before_.hi, after_.hi});
  }

  // How many tiles the rows visit in all: what split-KV cuts into chunks.
  int64_t tiles() const { return tiles_; }
  int64_t first() const { return from(0); }
  // The tile after the one at j0, or end().
  int64_t next(int64_t j0) const { return from(j0 + kTileKeys); }
  int64_t end() const { return end_; }
  // One past the last key the tile at j0 needs: up to the band's end (or the chunk's), or past
  // its last global key below the cap (never past the tile).
  int64_t tile_end(int64_t j0) const {
    const bool band = j0 >= band_begin_ && j0 < band_end_;
    int64_t e = band ? std::min(j0 + kTileKeys, band_end_) : j0;
    const int64_t whole = std::min(j0 + kTileKeys, cap_);
    if (globals_.n > 0 && e < whole) {
      const int64_t last = globals_.first_from(whole) - 1;
      if (last >= 0 && globals_.pos[last] >= e) e = globals_.pos[last] + 1;
    }
    return e;
  }

 private:
  // The first tile at or after t (a multiple of kTileKeys) the rows visit, or end_.
  int64_t from(int64_t t) const {
    int64_t best = end_;
    const int64_t band = std::max(t, band_begin_);
    if (band < band_end_) best = band;
    for (const KeyRange& outside : {before_, after_}) {
      if (t >= outside.hi) continue;
      const int64_t k = globals_.first_from(std::max(t, outside.lo));
      if (k < globals_.n && globals_.pos[k] < outside.hi) {
        best = std::min(best, globals_.pos[k] / kTileKeys * kTileKeys);
      }
    }
    return best;
  }

  GlobalTokens globals_;
  int64_t cap_ = 0;  // the last row's cap (with global tokens)
  int64_t base_ = 0, band_hi_ = 0, band_begin_ = 0, band_end_ = 0;
  KeyRange before_{0, 0}, after_{0, 0};  // this chunk's keys of global tiles outside the band
  int64_t tiles_ = 0, end_ = 0;
};

}  // namespace cpuattn

// Smoke test of the C++ core without Python: the driver and the baseline kernel against a
// naive double-precision reference. .ci/aarch64 cross-compiles it for aarch64 (NEON) and runs
// it under qemu, so the portable build is checked on a machine without an ARM CPU.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>
#include "attention.h"
#include "kernels/kernel.h"

int main() {
  std::mt19937 gen(1);
  std::normal_distribution<float> nd;
  int fails = 0;
  // lq = 3: 6 rows per kv head, the decode path (scores from K rows in place).
  for (int64_t lq : {37, 3})
    for (int causal = 0; causal < 2; ++causal) {
      const int64_t hq = 4, hkv = 2, lk = 150, d = 13, dv = 40;
      std::vector<float> q(hq * lq * d), k(hkv * lk * d), v(hkv * lk * dv), out(hq * lq * dv);
      for (auto* a : {&q, &k, &v})
        for (auto& x : *a) x = nd(gen);
      cpuattn::Params p;
      p.hq = hq;
      p.hkv = hkv;
      p.lq = lq;
      p.lk = lk;
      p.d = d;
      p.dv = dv;
      p.q = {q.data(), {lq * d, d, 1}};
      p.k = {k.data(), {lk * d, d, 1}};
      p.v = {v.data(), {lk * dv, dv, 1}};
      p.out = {out.data(), {lq * dv, dv, 1}};
      p.scale = 1.0 / std::sqrt(double(d));
      p.causal = causal;
      cpuattn::attention(p);
      double max_err = 0;
      for (int64_t h = 0; h < hq; ++h) {
        const int64_t g = h / (hq / hkv);
        for (int64_t i = 0; i < lq; ++i) {
          const int64_t hi = causal ? std::min(lk, i + lk - lq + 1) : lk;
          std::vector<double> s(hi);
          double m = -INFINITY, l = 0;
          for (int64_t j = 0; j < hi; ++j) {
            double dot = 0;
            for (int64_t e = 0; e < d; ++e)
              dot += double(q[(h * lq + i) * d + e]) * k[(g * lk + j) * d + e];
            s[j] = dot * p.scale;
            m = std::max(m, s[j]);
          }
          for (auto& x : s) l += (x = std::exp(x - m));
          for (int64_t e = 0; e < dv; ++e) {
            double o = 0;
            for (int64_t j = 0; j < hi; ++j) o += s[j] * v[(g * lk + j) * dv + e];
            max_err = std::max(max_err, std::abs(o / l - out[(h * lq + i) * dv + e]));
          }
        }
      }
      std::printf("isa=%s lq=%d causal=%d max_err=%.2e\n", cpuattn::active_kernels().name,
                  static_cast<int>(lq), causal, max_err);
      fails += max_err > 1e-5;
    }
  return fails;
}

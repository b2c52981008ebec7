// Smoke test of the native backward without Python: gradients of a causal GQA call against a
// naive double-precision reference. .ci/aarch64 runs it under qemu next to attention_smoke.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "backward.h"
#include "kernels/kernel.h"

int main() {
  std::mt19937 gen(2);
  std::normal_distribution<float> nd;
  const int64_t hq = 4, hkv = 2, group = hq / hkv, lq = 70, lk = 90, d = 13, dv = 24;
  std::vector<float> q(hq * lq * d), k(hkv * lk * d), v(hkv * lk * dv), dout(hq * lq * dv);
  for (auto* a : {&q, &k, &v, &dout})
    for (auto& x : *a) x = nd(gen);
  std::vector<float> out(hq * lq * dv), lse(hq * lq), delta(hq * lq);
  std::vector<float> dq(q.size()), dk(k.size(), 0.f), dv_(v.size(), 0.f);
  const double scale = 1.0 / std::sqrt(double(d));

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
  p.lse = {lse.data(), {lq, 1}};
  p.scale = scale;
  p.causal = true;
  cpuattn::attention(p);
  for (int64_t r = 0; r < hq * lq; ++r) {
    double sum = 0;
    for (int64_t e = 0; e < dv; ++e) sum += double(dout[r * dv + e]) * out[r * dv + e];
    delta[r] = float(sum);
  }
  cpuattn::BackwardParams bp;
  bp.fwd = p;
  bp.dout = {dout.data(), {lq * dv, dv, 1}};
  bp.delta = {delta.data(), {lq, 1}};
  bp.dq = {dq.data(), {lq * d, d, 1}};
  bp.dk = {dk.data(), {lk * d, d, 1}};
  bp.dv = {dv_.data(), {lk * dv, dv, 1}};
  cpuattn::attention_backward(bp);

  // The reference: P from the scores, dV = P^T dO, dS = P (dO V^T - delta), dQ = scale dS K,
  // dK = scale dS^T Q, in double.
  std::vector<double> rq(q.size(), 0), rk(k.size(), 0), rv(v.size(), 0);
  for (int64_t h = 0; h < hq; ++h) {
    const int64_t g = h / group;
    for (int64_t i = 0; i < lq; ++i) {
      const int64_t keys = std::min(lk, i + lk - lq + 1);  // bottom-right causal
      std::vector<double> pr(keys), dp(keys);
      double m = -INFINITY, l = 0, dsum = 0;
      for (int64_t j = 0; j < keys; ++j) {
        double dot = 0;
        for (int64_t e = 0; e < d; ++e)
          dot += double(q[(h * lq + i) * d + e]) * k[(g * lk + j) * d + e];
        pr[j] = dot * scale;
        m = std::max(m, pr[j]);
      }
      for (auto& x : pr) l += (x = std::exp(x - m));
      for (int64_t j = 0; j < keys; ++j) {
        pr[j] /= l;
        double dot = 0;
        for (int64_t e = 0; e < dv; ++e)
          dot += double(dout[(h * lq + i) * dv + e]) * v[(g * lk + j) * dv + e];
        dp[j] = dot;
        dsum += pr[j] * dot;
      }
      for (int64_t j = 0; j < keys; ++j) {
        const double ds = pr[j] * (dp[j] - dsum);
        for (int64_t e = 0; e < dv; ++e)
          rv[(g * lk + j) * dv + e] += pr[j] * dout[(h * lq + i) * dv + e];
        for (int64_t e = 0; e < d; ++e) {
          rq[(h * lq + i) * d + e] += scale * ds * k[(g * lk + j) * d + e];
          rk[(g * lk + j) * d + e] += scale * ds * q[(h * lq + i) * d + e];
        }
      }
    }
  }
  int fails = 0;
  const char* names[] = {"dq", "dk", "dv"};
  const std::vector<float>* got[] = {&dq, &dk, &dv_};
  const std::vector<double>* want[] = {&rq, &rk, &rv};
  for (int n = 0; n < 3; ++n) {
    double max_err = 0, max_ref = 0;
    for (size_t i = 0; i < want[n]->size(); ++i) {
      max_err = std::max(max_err, std::abs((*got[n])[i] - (*want[n])[i]));
      max_ref = std::max(max_ref, std::abs((*want[n])[i]));
    }
    std::printf("isa=%s backward %s max_err=%.2e (max %.2e)\n", cpuattn::active_kernels().name,
                names[n], max_err, max_ref);
    fails += max_err > 1e-5 * std::max(1.0, max_ref);
  }
  return fails;
}

#include "runtime/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "jit/ir.h"

namespace flexjit {
namespace {

double at(const TensorView& t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
  return read_element_f64(t, i0 * t.strides[0] + i1 * t.strides[1] + i2 * t.strides[2] + i3 * t.strides[3]);
}

}  // namespace

std::vector<double> to_doubles(const TensorView& t) {
  std::vector<double> out;
  out.reserve(size_t(t.numel()));
  int64_t s[4] = {1, 1, 1, 1}, st[4] = {0, 0, 0, 0};
  for (int i = 0; i < t.rank; ++i) {
    s[4 - t.rank + i] = t.sizes[i];
    st[4 - t.rank + i] = t.strides[i];
  }
  for (int64_t a = 0; a < s[0]; ++a)
    for (int64_t b = 0; b < s[1]; ++b)
      for (int64_t c = 0; c < s[2]; ++c)
        for (int64_t d = 0; d < s[3]; ++d)
          out.push_back(read_element_f64(t, a * st[0] + b * st[1] + c * st[2] + d * st[3]));
  return out;
}

void fill_random(TensorView t, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    float f = float(double(x >> 11) / double(1ull << 53) * 2.0 - 1.0);
    if (dtype_is_float(t.dtype)) write_element_f64(t, i, f);
  }
}

namespace {

// The float64 (or plain fp32) attention of every listed row: K and V are read through
// k_at / v_at(b, kv_head, j, d), sequence b has len(b) keys and its query i sits at position
// qoff(b) + i, which is what the mods see as q_idx.
template <typename KAt, typename VAt, typename Len, typename QOff>
RefResult reference_core(const TensorView& q, int64_t Hkv, int64_t Dv, KAt k_at, VAt v_at, Len len, QOff qoff,
                         const ModSet& mods, const ModBindings& bind, double scale, bool fp32,
                         const std::vector<int64_t>& rows) {
  const int64_t B = q.sizes[0], Hq = q.sizes[1], Lq = q.sizes[2], D = q.sizes[3];
  const int64_t group = Hq / Hkv;
  const double ninf = -std::numeric_limits<double>::infinity();
  RefResult r;
  r.out.assign(size_t(B * Hq * Lq * Dv), 0.0);
  r.lse.assign(size_t(B * Hq * Lq), ninf);
  ir::EvalEnv env;
  env.params = bind.params;
  for (const auto& [n, view] : bind.buffers) env.buffers.push_back({n, view});
  std::vector<double> s;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Lkv = len(b);
    s.assign(size_t(Lkv), 0.0);
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / group;
      for (int64_t ri = 0; ri < (rows.empty() ? Lq : int64_t(rows.size())); ++ri) {
        const int64_t i = rows.empty() ? ri : rows[size_t(ri)];
        if (i < 0 || i >= Lq) continue;
        double mx = ninf;
        for (int64_t j = 0; j < Lkv; ++j) {
          double dot = 0;
          float dotf = 0;
          for (int64_t d = 0; d < D; ++d) {
            double x = at(q, b, h, i, d) * k_at(b, hk, j, d);
            dot += x;
            dotf += float(x);
          }
          double sc = fp32 ? double(float(dotf * float(scale))) : dot * scale;
          env.score = sc;
          env.b = b;
          env.h = h;
          env.q_idx = qoff(b) + i;
          env.kv_idx = j;
          if (mods.score_mod) sc = ir::eval(mods.score_mod, env).as_float();
          if (fp32) sc = double(float(sc));
          if (mods.mask_mod && !ir::eval(mods.mask_mod, env).as_bool()) sc = ninf;
          s[size_t(j)] = sc;
          mx = std::max(mx, sc);
        }
        if (mx == ninf) continue;  // fully masked row (or no keys): out 0, lse -inf
        double sum = 0;
        for (int64_t j = 0; j < Lkv; ++j) {
          s[size_t(j)] = fp32 ? double(std::exp(float(s[size_t(j)] - mx))) : std::exp(s[size_t(j)] - mx);
          sum += s[size_t(j)];
        }
        double* o = &r.out[size_t(((b * Hq + h) * Lq + i) * Dv)];
        for (int64_t j = 0; j < Lkv; ++j) {
          if (s[size_t(j)] == 0) continue;
          double p = s[size_t(j)] / sum;
          if (fp32) p = double(float(p));
          for (int64_t d = 0; d < Dv; ++d) o[d] += p * v_at(b, hk, j, d);
        }
        if (fp32)
          for (int64_t d = 0; d < Dv; ++d) o[d] = double(float(o[d]));
        r.lse[size_t((b * Hq + h) * Lq + i)] = mx + std::log(sum);
      }
    }
  }
  return r;
}

}  // namespace

RefResult reference_attention(const TensorView& q, const TensorView& k, const TensorView& v, const ModSet& mods,
                              const ModBindings& bind, double scale, bool fp32,
                              const std::vector<int64_t>& rows) {
  const int64_t Bkv = k.sizes[0], Lkv = k.sizes[2];
  auto kv_b = [Bkv](int64_t b) { return Bkv == 1 ? 0 : b; };
  return reference_core(
      q, k.sizes[1], v.sizes[3], [&](int64_t b, int64_t h, int64_t j, int64_t d) { return at(k, kv_b(b), h, j, d); },
      [&](int64_t b, int64_t h, int64_t j, int64_t d) { return at(v, kv_b(b), h, j, d); },
      [Lkv](int64_t) { return Lkv; }, [](int64_t) { return int64_t(0); }, mods, bind, scale, fp32, rows);
}

RefGrads reference_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                      const TensorView& dout, const ModSet& mods, const ModBindings& bind,
                                      double scale, const std::vector<std::string>& grad_buffers,
                                      const TensorView* dlse) {
  const int64_t B = q.sizes[0], Hq = q.sizes[1], Lq = q.sizes[2], D = q.sizes[3];
  const int64_t Bkv = k.sizes[0], Hkv = k.sizes[1], Lkv = k.sizes[2], Dv = v.sizes[3];
  const int64_t group = Hq / Hkv;
  const double ninf = -std::numeric_limits<double>::infinity();
  RefGrads g;
  g.dq.assign(size_t(B * Hq * Lq * D), 0.0);
  g.dk.assign(size_t(Bkv * Hkv * Lkv * D), 0.0);
  g.dv.assign(size_t(Bkv * Hkv * Lkv * Dv), 0.0);
  // The buffers as float64 copies the finite differences can perturb.
  std::vector<std::vector<double>> copies;
  ir::EvalEnv env;
  env.params = bind.params;
  copies.reserve(bind.buffers.size());
  for (const auto& [n, view] : bind.buffers) {
    copies.push_back(to_doubles(view));
    TensorView c = view;
    c.data = copies.back().data();
    c.dtype = DType::F64;
    for (int i = c.rank - 1, st = 1; i >= 0; --i) {
      c.strides[i] = st;
      st *= int(c.sizes[i]);
    }
    env.buffers.push_back({n, c});
  }
  std::vector<std::vector<double>*> wanted;
  for (const std::string& n : grad_buffers) {
    size_t i = 0;
    while (i < bind.buffers.size() && bind.buffers[i].first != n) ++i;
    if (i == bind.buffers.size()) throw Error("reference_attention_backward: no buffer '" + n + "' is bound");
    wanted.push_back(&copies[i]);
    g.dbuf.emplace_back(copies[i].size(), 0.0);
  }
  auto mod_at = [&](double s) {
    env.score = s;
    return mods.score_mod ? ir::eval(mods.score_mod, env).as_float() : s;
  };
  std::vector<double> raw(static_cast<size_t>(Lkv)), p(raw), dp(raw);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t bk = Bkv == 1 ? 0 : b, hk = h / group;
      for (int64_t i = 0; i < Lq; ++i) {
        env.b = b;
        env.h = h;
        env.q_idx = i;
        double mx = ninf;
        for (int64_t j = 0; j < Lkv; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += at(q, b, h, i, d) * at(k, bk, hk, j, d);
          raw[size_t(j)] = dot * scale;
          env.kv_idx = j;
          double z = mod_at(raw[size_t(j)]);
          if (mods.mask_mod && !ir::eval(mods.mask_mod, env).as_bool()) z = ninf;
          p[size_t(j)] = z;
          mx = std::max(mx, z);
        }
        if (mx == ninf) continue;  // fully masked: no gradient
        double sum = 0;
        for (int64_t j = 0; j < Lkv; ++j) sum += (p[size_t(j)] = std::exp(p[size_t(j)] - mx));
        double delta = 0;
        for (int64_t j = 0; j < Lkv; ++j) {
          p[size_t(j)] /= sum;
          double x = 0;
          for (int64_t d = 0; d < Dv; ++d) x += at(dout, b, h, i, d) * at(v, bk, hk, j, d);
          dp[size_t(j)] = x;
          delta += p[size_t(j)] * x;
        }
        if (dlse)  // d lse / d z_j = P_j
          delta -= read_element_f64(*dlse, b * dlse->strides[0] + h * dlse->strides[1] + i * dlse->strides[2]);
        for (int64_t j = 0; j < Lkv; ++j) {
          if (p[size_t(j)] == 0) continue;
          const double dz = p[size_t(j)] * (dp[size_t(j)] - delta);
          env.kv_idx = j;
          const double s = raw[size_t(j)], eps = 1e-6 * std::max(1.0, std::abs(s));
          const double dmod = mods.score_mod ? (mod_at(s + eps) - mod_at(s - eps)) / (2 * eps) : 1.0;
          const double ds = dz * dmod;
          for (int64_t d = 0; d < D; ++d) {
            g.dq[size_t(((b * Hq + h) * Lq + i) * D + d)] += scale * ds * at(k, bk, hk, j, d);
            g.dk[size_t(((bk * Hkv + hk) * Lkv + j) * D + d)] += scale * ds * at(q, b, h, i, d);
          }
          for (int64_t d = 0; d < Dv; ++d)
            g.dv[size_t(((bk * Hkv + hk) * Lkv + j) * Dv + d)] += p[size_t(j)] * at(dout, b, h, i, d);
          for (size_t w = 0; w < wanted.size(); ++w) {
            std::vector<double>& buf = *wanted[w];
            for (size_t e = 0; e < buf.size(); ++e) {
              const double x0 = buf[e], be = 1e-6 * std::max(1.0, std::abs(x0));
              buf[e] = x0 + be;
              const double up = mod_at(s);
              buf[e] = x0 - be;
              const double down = mod_at(s);
              buf[e] = x0;
              g.dbuf[w][e] += dz * (up - down) / (2 * be);
            }
          }
        }
      }
    }
  return g;
}

RefResult reference_paged_attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                                    const TensorView& block_table, const TensorView& seq_lens, const ModSet& mods,
                                    const ModBindings& bind, double scale, bool fp32,
                                    const std::vector<int64_t>& rows) {
  const int64_t ps = k_cache.sizes[1], Lq = q.sizes[2];
  auto len = [&](int64_t b) { return int64_t(read_element_f64(seq_lens, b * seq_lens.strides[0])); };
  auto page = [&](int64_t b, int64_t j) {
    return int64_t(read_element_f64(block_table, b * block_table.strides[0] + (j / ps) * block_table.strides[1]));
  };
  return reference_core(
      q, k_cache.sizes[2], v_cache.sizes[3],
      [&](int64_t b, int64_t h, int64_t j, int64_t d) { return at(k_cache, page(b, j), j % ps, h, d); },
      [&](int64_t b, int64_t h, int64_t j, int64_t d) { return at(v_cache, page(b, j), j % ps, h, d); }, len,
      [&](int64_t b) { return len(b) - Lq; }, mods, bind, scale, fp32, rows);
}

RefResult reference_varlen_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                                     const std::vector<int32_t>& cu_q, const std::vector<int32_t>& cu_k,
                                     const ModSet& mods, const ModBindings& bind, const VarlenOptions& opt,
                                     bool fp32) {
  const int64_t total_q = q.sizes[0], Hq = q.sizes[1], D = q.sizes[2], Hkv = k.sizes[1], Dv = v.sizes[2];
  const int64_t group = Hq / Hkv, batch = int64_t(cu_q.size()) - 1;
  const double scale = opt.scale ? *opt.scale : 1.0 / std::sqrt(double(D));
  const int64_t wl = opt.window_left, wr = opt.causal ? 0 : opt.window_right;
  const double ninf = -std::numeric_limits<double>::infinity();
  auto el = [](const TensorView& t, int64_t i, int64_t h, int64_t d) {
    return read_element_f64(t, i * t.strides[0] + h * t.strides[1] + d * t.strides[2]);
  };
  RefResult r;
  r.out.assign(size_t(total_q * Hq * Dv), 0.0);
  r.lse.assign(size_t(Hq * total_q), ninf);
  ir::EvalEnv env;
  env.params = bind.params;
  for (const auto& [n, view] : bind.buffers) env.buffers.push_back({n, view});
  std::vector<double> s;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q0 = cu_q[size_t(b)], sq = cu_q[size_t(b) + 1] - q0;
    const int64_t k0 = cu_k[size_t(b)], sk = cu_k[size_t(b) + 1] - k0;
    s.assign(size_t(sk), 0.0);
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / group;
      double slope = 0;
      if (opt.alibi_slopes) {
        const TensorView& sl = *opt.alibi_slopes;
        slope = read_element_f64(sl, sl.rank == 1 ? h * sl.strides[0] : b * sl.strides[0] + h * sl.strides[1]);
      }
      for (int64_t i = 0; i < sq; ++i) {
        double mx = ninf;
        for (int64_t j = 0; j < sk; ++j) {
          double dot = 0;
          float dotf = 0;
          for (int64_t d = 0; d < D; ++d) {
            const double x = el(q, q0 + i, h, d) * el(k, k0 + j, hk, d);
            dot += x;
            dotf += float(x);
          }
          double sc = fp32 ? double(dotf * float(scale)) : dot * scale;
          if (opt.softcap > 0) sc = opt.softcap * std::tanh(sc / opt.softcap);
          if (opt.alibi_slopes) sc -= slope * double(std::llabs(i + sk - sq - j));
          env.score = sc;
          env.b = b;
          env.h = h;
          env.q_idx = i;
          env.kv_idx = j;
          if (mods.score_mod) sc = ir::eval(mods.score_mod, env).as_float();
          if (fp32) sc = double(float(sc));
          const int64_t diag = i + sk - sq;
          bool keep = (wl < 0 || j >= diag - wl) && (wr < 0 || j <= diag + wr);
          if (keep && mods.mask_mod) keep = ir::eval(mods.mask_mod, env).as_bool();
          s[size_t(j)] = keep ? sc : ninf;
          mx = std::max(mx, s[size_t(j)]);
        }
        if (mx == ninf) continue;  // no key kept: out 0, lse -inf
        double sum = 0;
        for (int64_t j = 0; j < sk; ++j) {
          s[size_t(j)] = fp32 ? double(std::exp(float(s[size_t(j)] - mx))) : std::exp(s[size_t(j)] - mx);
          sum += s[size_t(j)];
        }
        double* o = &r.out[size_t(((q0 + i) * Hq + h) * Dv)];
        for (int64_t j = 0; j < sk; ++j) {
          if (s[size_t(j)] == 0) continue;
          double p = s[size_t(j)] / sum;
          if (fp32) p = double(float(p));
          for (int64_t d = 0; d < Dv; ++d) o[d] += p * el(v, k0 + j, hk, d);
        }
        if (fp32)
          for (int64_t d = 0; d < Dv; ++d) o[d] = double(float(o[d]));
        r.lse[size_t(h * total_q + q0 + i)] = mx + std::log(sum);
      }
    }
  }
  return r;
}

double max_abs_error(const TensorView& out, const RefResult& ref, const std::vector<int64_t>& rows) {
  const int64_t BH = out.sizes[0] * out.sizes[1], H = out.sizes[1], Lq = out.sizes[2], Dv = out.sizes[3];
  double e = 0;
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t i : rows)
      for (int64_t d = 0; d < Dv; ++d) {
        int64_t off = (bh / H) * out.strides[0] + (bh % H) * out.strides[1] + i * out.strides[2] + d * out.strides[3];
        e = std::max(e, std::fabs(read_element_f64(out, off) - ref.out[size_t((bh * Lq + i) * Dv + d)]));
      }
  return e;
}

}  // namespace flexjit

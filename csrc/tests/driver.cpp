// Test driver for the C++ core on its own, with no Python: runs fastattn::attention (and, where it
// wrote lse, fastattn::attention_backward) over assorted problems on every instruction set this
// CPU has and checks each against a naive loop in double.
// .ci/leaks.sh runs it under valgrind and under AddressSanitizer + LeakSanitizer, where it must
// report no error and no leak; it exits non-zero on any wrong result.
//
// The problems cover what the Python layer may hand the core: float32 and float64, batch axes
// (broadcast with stride 0), strided, transposed and negative-stride operands, outputs written
// through strides (every byte around them must stay untouched), grouped-query heads, bool and
// additive masks (broadcast), causal and sliding-window bands with either alignment, softcap,
// ALiBi, kv_lengths, weights and log-sum-exp outputs, gradients (dq, dk, dv written through
// strides), 1, 2 or default threads; and the
// inconsistent problems the core must refuse with std::invalid_argument; and bfloat16 storage,
// forward and backward (packed as pairs or for AMX where the variant has them, widened
// elsewhere: the core decides, the caller only gives the storage).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "attention.hpp"

namespace {

using fastattn::StridedView;
using fastattn::Problem;
using Shape = std::vector<int64_t>;

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

// An array of logical shape `shape` laid out in `buf` by `strides` (any sign, 0 = broadcast),
// element 0 at buf[base]. Unused elements of buf hold a sentinel, so stray writes show.
template <class T>
struct Tensor {
  Shape shape, strides;
  std::vector<T> buf;
  int64_t base = 0;

  const T* data() const { return buf.data() + base; }
  T* data() { return buf.data() + base; }
  // Buffer index of the element at multi-index idx.
  int64_t index(const Shape& idx) const {
    int64_t off = base;
    for (size_t d = 0; d < idx.size(); ++d) off += idx[d] * strides[d];
    return off;
  }
  T at(const Shape& idx) const { return buf[size_t(index(idx))]; }
};

// Calls fn(idx) for every multi-index of shape.
template <class Fn>
void for_each_index(const Shape& shape, Fn fn) {
  if (numel(shape) == 0) return;
  Shape idx(shape.size(), 0);
  while (true) {
    fn(idx);
    int d = int(shape.size()) - 1;
    for (; d >= 0; --d) {
      if (++idx[size_t(d)] < shape[size_t(d)]) break;
      idx[size_t(d)] = 0;
    }
    if (d < 0) return;
  }
}

// A tensor in a random layout: axes nested in a random order, some reversed, some with gaps;
// when `broadcast`, some axes of an input get stride 0 (one element stands for all).
template <class T>
Tensor<T> make_tensor(std::mt19937& rng, const Shape& shape, bool broadcast, T sentinel) {
  Tensor<T> t;
  t.shape = shape;
  t.strides.assign(shape.size(), 0);
  std::vector<size_t> order(shape.size());
  for (size_t d = 0; d < order.size(); ++d) order[d] = d;
  std::shuffle(order.begin(), order.end(), rng);
  std::uniform_int_distribution<int> coin(0, 5);
  int64_t stride = 1;
  std::vector<bool> flip(shape.size(), false);
  for (size_t d : order) {  // the innermost axis first
    if (broadcast && coin(rng) == 0) continue;  // stride 0
    t.strides[d] = stride * (coin(rng) == 0 ? 2 : 1);
    flip[d] = coin(rng) == 0;
    stride = std::max<int64_t>(1, shape[d]) * t.strides[d];
  }
  t.buf.assign(size_t(std::max<int64_t>(stride, 1) + 1), sentinel);
  for (size_t d = 0; d < shape.size(); ++d)
    if (flip[d] && shape[d] > 1) {
      t.base += (shape[d] - 1) * t.strides[d];
      t.strides[d] = -t.strides[d];
    }
  return t;
}

// The core's view of a tensor whose leading axes are batch axes.
template <class T>
StridedView view(const Tensor<T>& t, size_t n_batch, bool matrix = true) {
  StridedView op;
  op.data = t.data();
  std::copy(t.strides.begin(), t.strides.begin() + long(n_batch), op.batch_strides);
  if (matrix) {
    op.row_stride = t.strides.size() > n_batch ? t.strides[n_batch] : 0;
    op.col_stride = t.strides.size() > n_batch + 1 ? t.strides[n_batch + 1] : 0;
  }
  return op;
}

struct Case {
  Shape batch;
  int64_t L, S, E, Ev, group;
  int mask_kind;  // 0 none, 1 bool, 2 additive
  bool causal, window, bottom_right, softcap, alibi, kv_lengths, weights, lse;
  int threads;
  // float32 with lse: inputs that bfloat16 holds exactly, and the backward again from bfloat16
  // copies of q, k, v, out and dout; gradients as bfloat16 when grads_bf16.
  bool bf16, grads_bf16;
};

// bfloat16 bits of x, rounded to nearest even (NaN kept a NaN), and back.
uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float bf16_value(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct Stats {
  int problems = 0, failures = 0;
  int bf16_backward = 0;  // problems whose backward ran again from bfloat16 storage
};

template <class T>
void run_case(const Case& c, std::mt19937& rng, const std::string& isa, Stats& stats) {
  const T sentinel = T(12345.5);
  const size_t nb = c.batch.size();
  Shape kv_batch = c.batch;
  if (nb) kv_batch.back() /= c.group;
  auto with = [](Shape s, std::initializer_list<int64_t> tail) {
    s.insert(s.end(), tail);
    return s;
  };
  std::normal_distribution<double> normal(0.0, 1.0);
  auto fill = [&](auto& t, auto value) {
    for_each_index(t.shape, [&](const Shape& idx) { t.buf[size_t(t.index(idx))] = value(); });
  };
  auto q = make_tensor<T>(rng, with(c.batch, {c.L, c.E}), true, sentinel);
  auto k = make_tensor<T>(rng, with(kv_batch, {c.S, c.E}), true, sentinel);
  auto v = make_tensor<T>(rng, with(kv_batch, {c.S, c.Ev}), true, sentinel);
  const bool bf16 = std::is_same_v<T, float> && c.bf16 && c.lse;
  auto value = [&] {  // a normal draw, bfloat16's nearest for the bfloat16 backward
    const double x = normal(rng);
    return bf16 ? T(bf16_value(bf16_bits(float(x)))) : T(x);
  };
  fill(q, value);
  fill(k, value);
  fill(v, value);
  auto mask_b = make_tensor<uint8_t>(rng, with(c.batch, {c.L, c.S}), true, 0);
  auto mask_f = make_tensor<T>(rng, with(c.batch, {c.L, c.S}), true, sentinel);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  fill(mask_b, [&] { return uint8_t(uniform(rng) < 0.7); });
  fill(mask_f, [&] {
    return uniform(rng) < 0.2 ? -std::numeric_limits<T>::infinity() : T(normal(rng));
  });
  auto slopes = make_tensor<T>(rng, c.batch, true, sentinel);
  fill(slopes, [&] { return T(uniform(rng)); });
  auto lengths = make_tensor<int64_t>(rng, c.batch, true, -7);
  fill(lengths, [&] { return int64_t(uniform(rng) * double(c.S + 1)); });
  auto out = make_tensor<T>(rng, with(c.batch, {c.L, c.Ev}), false, sentinel);
  auto weights = make_tensor<T>(rng, with(c.batch, {c.L, c.S}), false, sentinel);
  auto lse = make_tensor<T>(rng, with(c.batch, {c.L}), false, sentinel);
  const auto q0 = q.buf, k0 = k.buf, v0 = v.buf;
  // The backward pass runs where the forward wrote lse: gradients of the full batch shape,
  // zero on entry, against the naive loop's (accumulated in double, with the magnitudes of
  // their terms for the tolerance).
  auto dout = make_tensor<T>(rng, with(c.batch, {c.L, c.Ev}), true, sentinel);
  fill(dout, value);
  auto dq = make_tensor<T>(rng, with(c.batch, {c.L, c.E}), false, sentinel);
  auto dk = make_tensor<T>(rng, with(c.batch, {c.S, c.E}), false, sentinel);
  auto dv = make_tensor<T>(rng, with(c.batch, {c.S, c.Ev}), false, sentinel);
  for (auto* t : {&dq, &dk, &dv}) fill(*t, [] { return T(0); });
  const size_t n_entries = size_t(numel(c.batch));
  std::vector<double> gq(n_entries * size_t(c.L * c.E)), mq(gq.size());
  std::vector<double> gk(n_entries * size_t(c.S * c.E)), mk(gk.size());
  std::vector<double> gv(n_entries * size_t(c.S * c.Ev)), mv(gv.size());

  Problem p;
  p.dtype = sizeof(T) == 8 ? fastattn::DType::kFloat64 : fastattn::DType::kFloat32;
  p.n_batch_dims = int(c.batch.size());
  std::copy(c.batch.begin(), c.batch.end(), p.batch_shape);
  p.L = c.L, p.S = c.S, p.E = c.E, p.Ev = c.Ev;
  p.q = view(q, nb), p.k = view(k, nb), p.v = view(v, nb);
  p.kv_group = c.group;
  p.mask_kind = fastattn::MaskKind(c.mask_kind);
  if (c.mask_kind == 1) p.mask = view(mask_b, nb);
  if (c.mask_kind == 2) p.mask = view(mask_f, nb);
  p.offset = c.bottom_right ? c.S - c.L : 0;
  if (c.causal) p.band_hi = p.offset;
  if (c.window) {
    p.band_lo = p.offset - 3;
    p.band_hi = std::min(p.band_hi, p.offset + 2);
  }
  p.scale = 1.0 / std::sqrt(double(std::max<int64_t>(c.E, 1)));
  p.softcap = c.softcap ? 2.5 : 0.0;
  if (c.alibi) p.alibi = view(slopes, nb, false);
  if (c.kv_lengths) p.kv_lengths = view(lengths, nb, false);
  p.out = view(out, nb);
  if (c.weights) p.weights = view(weights, nb);
  if (c.lse) p.lse = view(lse, nb);
  p.num_threads = c.threads;
  // Finite inputs of ordinary magnitude: no output that is not finite (kOutputNonFinite) and
  // no interrupt to report.
  if (const int flags = fastattn::attention(p); flags != 0) {
    stats.failures++;
    std::printf("FAIL %s: attention reported flags %d for finite inputs\n", isa.c_str(), flags);
  }
  if (c.lse) {
    Problem pb = p;
    pb.weights = StridedView();
    pb.dout = view(dout, nb), pb.dq = view(dq, nb), pb.dk = view(dk, nb), pb.dv = view(dv, nb);
    fastattn::attention_backward(pb);
  }
  // The bfloat16 backward: q, k, v, out and dout as bfloat16 copies in the same layouts (out
  // rounded), lse in float32; gradients into fresh tensors, as bfloat16 or float32.
  auto bits_of = [](const Tensor<T>& t) {
    Tensor<uint16_t> h;
    h.shape = t.shape, h.strides = t.strides, h.base = t.base;
    h.buf.resize(t.buf.size());
    for (size_t n = 0; n < t.buf.size(); ++n) h.buf[n] = bf16_bits(float(t.buf[n]));
    return h;
  };
  const uint16_t gsentinel = 0x7777;
  Tensor<uint16_t> hq, hk, hv, hout, hdout, hdq, hdk, hdv;
  Tensor<T> fdq, fdk, fdv, bout;
  bool bf16_ran = false;
  if (bf16) {
    hq = bits_of(q), hk = bits_of(k), hv = bits_of(v), hout = bits_of(out);
    hdout = bits_of(dout);
    Problem ph = p;
    ph.weights = StridedView();
    ph.storage = fastattn::Storage::kBFloat16;
    ph.q = view(hq, nb), ph.k = view(hk, nb), ph.v = view(hv, nb);
    // The forward from the same bfloat16 storage (the core packs or widens it for its tiles),
    // into a float32 output of its own, before the backward's views replace out.
    bout = make_tensor<T>(rng, with(c.batch, {c.L, c.Ev}), false, sentinel);
    Problem pf = ph;
    pf.lse = StridedView();
    pf.out = view(bout, nb);
    fastattn::attention(pf);
    ph.out = view(hout, nb), ph.dout = view(hdout, nb);
    ph.grads_bf16 = c.grads_bf16;
    if (c.grads_bf16) {
      hdq = make_tensor<uint16_t>(rng, with(c.batch, {c.L, c.E}), false, gsentinel);
      hdk = make_tensor<uint16_t>(rng, with(c.batch, {c.S, c.E}), false, gsentinel);
      hdv = make_tensor<uint16_t>(rng, with(c.batch, {c.S, c.Ev}), false, gsentinel);
      for (auto* t : {&hdq, &hdk, &hdv}) fill(*t, [] { return uint16_t(0); });
      ph.dq = view(hdq, nb), ph.dk = view(hdk, nb), ph.dv = view(hdv, nb);
    } else {
      fdq = make_tensor<T>(rng, with(c.batch, {c.L, c.E}), false, sentinel);
      fdk = make_tensor<T>(rng, with(c.batch, {c.S, c.E}), false, sentinel);
      fdv = make_tensor<T>(rng, with(c.batch, {c.S, c.Ev}), false, sentinel);
      for (auto* t : {&fdq, &fdk, &fdv}) fill(*t, [] { return T(0); });
      ph.dq = view(fdq, nb), ph.dk = view(fdk, nb), ph.dv = view(fdv, nb);
    }
    fastattn::attention_backward(ph);
    bf16_ran = true;
    ++stats.bf16_backward;
  }

  // The naive loop, in double: not long double, which valgrind computes as double anyway (and
  // whose infinities it mangles); double's error is far below the float64 tolerance's 16 eps.
  using LD = double;
  const LD eps = LD(std::numeric_limits<T>::epsilon());
  std::string error;
  auto check = [&](const char* what, LD got, LD want, LD tol, const Shape& idx) {
    const bool same = (std::isnan(got) && std::isnan(want)) || got == want ||
                      std::fabs(got - want) <= tol;
    if (!same && error.empty()) {
      error = std::string(what) + " at [";
      for (int64_t i : idx) error += std::to_string(i) + ",";
      error += "] got " + std::to_string(double(got)) + " want " + std::to_string(double(want));
    }
  };
  const int64_t S = c.S;
  const size_t n_keys = static_cast<size_t>(S);
  std::vector<LD> s(n_keys), w(n_keys), terms(n_keys), z(n_keys), dp(n_keys);
  auto at = [](const auto& t, int64_t off, int64_t i, int64_t j) {  // matrix element (i, j)
    const size_t n = t.shape.size();
    return LD(t.buf[size_t(off + i * t.strides[n - 2] + j * t.strides[n - 1])]);
  };
  LD gtol = 0;
  for_each_index(with(c.batch, {c.L}), [&](const Shape& qi) {
    Shape bi(qi.begin(), qi.end() - 1), kvb = bi;
    if (nb) kvb.back() /= c.group;
    const int64_t i = qi.back();
    const int64_t oq = q.index(with(bi, {0, 0})), ok = k.index(with(kvb, {0, 0}));
    const int64_t ov = v.index(with(kvb, {0, 0})), oo = out.index(with(bi, {0, 0}));
    const int64_t omb = mask_b.index(with(bi, {0, 0})), omf = mask_f.index(with(bi, {0, 0}));
    const int64_t ow = weights.index(with(bi, {0, 0}));
    const int64_t keys = c.kv_lengths ? std::min(S, std::max<int64_t>(lengths.at(bi), 0)) : S;
    LD m = -INFINITY, vmax = 0;
    for (int64_t j = 0; j < S; ++j) {
      LD dot = 0, mag = 0;
      for (int64_t e = 0; e < c.E; ++e) {
        const LD a = at(q, oq, i, e), b = at(k, ok, j, e);
        dot += a * b;
        mag += std::fabs(a * b);
      }
      LD x = dot * LD(p.scale);
      z[size_t(j)] = x;
      terms[size_t(j)] = mag * LD(p.scale);
      if (c.softcap) x = LD(p.softcap) * std::tanh(x / LD(p.softcap));
      bool keep = j >= i + p.band_lo && j <= i + p.band_hi && j < keys;
      if (c.mask_kind == 1) keep = keep && mask_b.buf[size_t(omb + i * mask_b.strides[nb] +
                                                              j * mask_b.strides[nb + 1])] != 0;
      if (c.mask_kind == 2) x += at(mask_f, omf, i, j);
      if (c.alibi) x -= LD(slopes.at(bi)) * LD(std::llabs(j - (i + p.offset)));
      s[size_t(j)] = keep ? x : -INFINITY;
      m = std::max(m, s[size_t(j)]);
    }
    LD total = 0, logits = 0;
    for (int64_t j = 0; j < S; ++j) {
      w[size_t(j)] = m == -INFINITY ? 0 : std::exp(s[size_t(j)] - m);
      total += w[size_t(j)];
      if (w[size_t(j)] > 0) logits = std::max(logits, terms[size_t(j)] + std::fabs(s[size_t(j)]));
    }
    for (int64_t j = 0; j < S; ++j) {
      if (total > 0) w[size_t(j)] /= total;
      for (int64_t e = 0; e < c.Ev; ++e) vmax = std::max(vmax, std::fabs(at(v, ov, j, e)));
    }
    // The kernel rounds each logit (an error of eps times its terms) and sums over S keys.
    const LD tol = 16 * eps * (1 + logits) * std::sqrt(LD(S + 1));
    for (int64_t e = 0; e < c.Ev; ++e) {
      LD o = 0;
      for (int64_t j = 0; j < S; ++j) o += w[size_t(j)] * at(v, ov, j, e);
      check("out", at(out, oo, i, e), o, tol * (vmax + 1), with(bi, {i, e}));
    }
    if (c.weights)
      for (int64_t j = 0; j < S; ++j)
        check("weights", at(weights, ow, i, j), w[size_t(j)], tol, with(bi, {i, j}));
    if (c.lse) check("lse", lse.at(qi), total > 0 ? m + std::log(total) : -INFINITY, tol, qi);
    if (!c.lse) return;
    // The gradient's terms: dS_j = w_j (dP_j - D) (1 - tanh^2 under softcap) * scale.
    int64_t b = 0;
    for (size_t d = 0; d < nb; ++d) b = b * c.batch[d] + bi[d];
    const int64_t od = dout.index(with(bi, {0, 0}));
    // Dabs: the magnitude of D's terms, dO_e v_je one by one (D = rowsum(dO * O) is computed
    // from O, whose rounding is that of each term, not of their sum dP_j, which may cancel).
    LD D = 0, Dabs = 0;
    for (int64_t j = 0; j < S; ++j) {
      dp[size_t(j)] = 0;
      LD terms_j = 0;
      for (int64_t e = 0; e < c.Ev; ++e) {
        dp[size_t(j)] += at(dout, od, i, e) * at(v, ov, j, e);
        terms_j += std::fabs(at(dout, od, i, e) * at(v, ov, j, e));
      }
      if (w[size_t(j)] != 0) D += w[size_t(j)] * dp[size_t(j)];
      Dabs += w[size_t(j)] * terms_j;
    }
    for (int64_t j = 0; j < S; ++j) {
      const LD wj = w[size_t(j)];
      if (wj == 0) continue;  // a key of weight 0 contributes nothing, as in the reference
      LD d = LD(p.scale), t = 0;
      if (c.softcap) t = std::tanh(z[size_t(j)] / LD(p.softcap)), d *= 1 - t * t;
      const LD ds = wj * (dp[size_t(j)] - D) * d, dsm = wj * (std::fabs(dp[size_t(j)]) + Dabs) *
                                                      std::fabs(d);
      for (int64_t e = 0; e < c.E; ++e) {
        const size_t iq = size_t((b * c.L + i) * c.E + e), ik = size_t((b * S + j) * c.E + e);
        gq[iq] += ds * at(k, ok, j, e), mq[iq] += dsm * std::fabs(at(k, ok, j, e));
        gk[ik] += ds * at(q, oq, i, e), mk[ik] += dsm * std::fabs(at(q, oq, i, e));
      }
      for (int64_t e = 0; e < c.Ev; ++e) {
        const size_t iv = size_t((b * S + j) * c.Ev + e);
        gv[iv] += wj * at(dout, od, i, e), mv[iv] += wj * std::fabs(at(dout, od, i, e));
      }
    }
    gtol = std::max(gtol, tol);
  });
  if (c.lse) {
    // Each gradient sums terms over keys or queries, each term's weight rounded as in the forward.
    const LD t = gtol * std::sqrt(LD(c.L + 1));
    auto check_grad = [&](const char* what, const Tensor<T>& g, const std::vector<double>& want,
                          const std::vector<double>& mag) {
      size_t n = 0;
      for_each_index(g.shape, [&](const Shape& idx) {
        check(what, g.at(idx), want[n], t * (mag[n] + 1e-30), idx);
        ++n;
      });
    };
    check_grad("dq", dq, gq, mq);
    check_grad("dk", dk, gk, mk);
    check_grad("dv", dv, gv, mv);
    if (bf16_ran) {
      // Against the same naive gradient (the inputs are bfloat16's own values): the kernel
      // rounds out (for D), P and dS to bfloat16 (each at most half an ulp, 2^-9, of a term)
      // and, with grads_bf16, the gradient itself: 2^-6 of the terms' magnitude covers them.
      const LD tb = t + LD(1) / 64;
      auto check_bf16 = [&](const char* what, const auto& g, const std::vector<double>& want,
                            const std::vector<double>& mag) {
        size_t n = 0;
        for_each_index(g.shape, [&](const Shape& idx) {
          LD got;
          if constexpr (std::is_same_v<std::decay_t<decltype(g.at(idx))>, uint16_t>)
            got = LD(bf16_value(g.at(idx)));
          else
            got = LD(g.at(idx));
          check(what, got, want[n], tb * (mag[n] + 1e-30), idx);
          ++n;
        });
      };
      if (c.grads_bf16) {
        check_bf16("bfloat16 dq", hdq, gq, mq);
        check_bf16("bfloat16 dk", hdk, gk, mk);
        check_bf16("bfloat16 dv", hdv, gv, mv);
      } else {
        check_bf16("bfloat16 backward's dq", fdq, gq, mq);
        check_bf16("bfloat16 backward's dk", fdk, gk, mk);
        check_bf16("bfloat16 backward's dv", fdv, gv, mv);
      }
    }
  }

  // Inputs untouched; outputs written exactly on their elements (the sentinel elsewhere).
  if (q.buf != q0 || k.buf != k0 || v.buf != v0) error += " an input was modified";
  auto only_view = [&](const Tensor<T>& t, bool written, const char* what) {
    std::vector<bool> in_view(t.buf.size(), false);
    if (written)
      for_each_index(t.shape, [&](const Shape& idx) { in_view[size_t(t.index(idx))] = true; });
    for (size_t n = 0; n < t.buf.size(); ++n)
      if (!in_view[n] && t.buf[n] != sentinel) {
        error += std::string(" ") + what + " written outside its elements";
        return;
      }
  };
  only_view(out, true, "out");
  only_view(weights, c.weights, "weights");
  only_view(lse, c.lse, "lse");
  only_view(dq, true, "dq");  // zeroed on their elements before the backward pass, if any
  only_view(dk, true, "dk");
  only_view(dv, true, "dv");
  if (bf16_ran) {
    // The bfloat16 forward against the float32 one on the same values: the pairs and AMX
    // round the weights to bfloat16 (half an ulp, 2^-9, of each), so within 2^-6 of the largest
    // value; a key or feature packed in the wrong place would move an output by far more.
    LD vmax = 0, diff = 0;
    for_each_index(v.shape,
                   [&](const Shape& idx) { vmax = std::max(vmax, LD(std::fabs(v.at(idx)))); });
    for_each_index(out.shape, [&](const Shape& idx) {
      diff = std::max(diff, LD(std::fabs(bout.at(idx) - out.at(idx))));
    });
    if (diff > (vmax + 1) / 64 && error.empty())
      error = "bfloat16 forward off the float32 one by " + std::to_string(double(diff));
    only_view(bout, true, "bfloat16 forward's out");
    auto only_bits = [&](const Tensor<uint16_t>& t, const char* what) {
      std::vector<bool> in_view(t.buf.size(), false);
      for_each_index(t.shape, [&](const Shape& idx) { in_view[size_t(t.index(idx))] = true; });
      for (size_t n = 0; n < t.buf.size(); ++n)
        if (!in_view[n] && t.buf[n] != gsentinel) {
          error += std::string(" ") + what + " written outside its elements";
          return;
        }
    };
    if (c.grads_bf16) {
      only_bits(hdq, "bfloat16 dq");
      only_bits(hdk, "bfloat16 dk");
      only_bits(hdv, "bfloat16 dv");
    } else {
      only_view(fdq, true, "bfloat16 backward's dq");
      only_view(fdk, true, "bfloat16 backward's dk");
      only_view(fdv, true, "bfloat16 backward's dv");
    }
  }

  ++stats.problems;
  if (!error.empty()) {
    ++stats.failures;
    std::printf("FAIL %s %s batch %zu L=%lld S=%lld E=%lld Ev=%lld group=%lld mask=%d causal=%d "
                "window=%d bottom_right=%d softcap=%d alibi=%d kv_lengths=%d weights=%d lse=%d "
                "threads=%d: %s\n",
                isa.c_str(), sizeof(T) == 8 ? "float64" : bf16 ? "float32+bfloat16" : "float32",
                nb, (long long)c.L,
                (long long)c.S, (long long)c.E, (long long)c.Ev, (long long)c.group, c.mask_kind,
                c.causal, c.window, c.bottom_right, c.softcap, c.alibi, c.kv_lengths, c.weights,
                c.lse, c.threads, error.c_str());
  }
}

// Inconsistent problems: each must throw std::invalid_argument (and leak nothing doing so).
int refusals() {
  int failures = 0;
  float x[64] = {};
  auto base = [&] {
    Problem p;
    p.n_batch_dims = 1;
    p.batch_shape[0] = 4;
    p.L = p.S = p.E = p.Ev = 2;
    for (StridedView* op : {&p.q, &p.k, &p.v, &p.out}) {
      op->data = x;
      op->batch_strides[0] = 4;
      op->row_stride = 2;
      op->col_stride = 1;
    }
    return p;
  };
  std::vector<std::pair<const char*, Problem>> bad;
  bad.emplace_back("kv_group not dividing the heads", base());
  bad.back().second.kv_group = 3;
  bad.emplace_back("negative size", base());
  bad.back().second.L = -1;
  bad.emplace_back("null data", base());
  bad.back().second.k.data = nullptr;
  bad.emplace_back("more batch axes than NumPy has", base());
  bad.back().second.n_batch_dims = fastattn::kMaxBatchDims + 1;
  bad.emplace_back("negative softcap", base());
  bad.back().second.softcap = -1.0;
  bad.emplace_back("negative num_threads", base());
  bad.back().second.num_threads = -2;
  for (auto& [what, p] : bad) {
    try {
      fastattn::attention(p);
      std::printf("FAIL no exception for %s\n", what);
      ++failures;
    } catch (const std::invalid_argument&) {
    }
  }
  try {
    fastattn::set_isa("no-such-isa");
    std::printf("FAIL set_isa accepted an unknown name\n");
    ++failures;
  } catch (const std::invalid_argument&) {
  }
  return failures;
}

// Values near float32's largest over many keys: the sum of weights times values overflows before
// it is normalized, and the call must say so (kOutputNonFinite) for the caller to rescale v; with
// values of 1 over the same keys it must not. Row kernel (L = 1) and tiles (L = 40), 1 and 2
// threads (split keys merged), every instruction set.
int overflow_reports() {
  int failures = 0;
  const int64_t S = 1024, E = 4, Ev = 3;
  for (const std::string& isa : fastattn::available_isas()) {
    fastattn::set_isa(isa);
    for (const int64_t L : {int64_t(1), int64_t(40)})
      for (const int threads : {1, 2})
        for (const float value : {1e36f, 1.0f}) {
          std::vector<float> q(size_t(L * E), 0.0f), k(size_t(S * E), 0.0f);
          std::vector<float> v(size_t(S * Ev), value), out(size_t(L * Ev), 0.0f);
          Problem p;
          p.L = L, p.S = S, p.E = E, p.Ev = Ev;
          auto rows = [](std::vector<float>& x, int64_t cols) {
            StridedView op;
            op.data = x.data();
            op.row_stride = cols;
            op.col_stride = 1;
            return op;
          };
          p.q = rows(q, E), p.k = rows(k, E), p.v = rows(v, Ev), p.out = rows(out, Ev);
          p.scale = 0.5;
          p.num_threads = threads;
          const int flags = fastattn::attention(p);
          const bool reported = flags & fastattn::kOutputNonFinite;
          if (reported != (value > 1.0f)) {
            std::printf("FAIL %s L=%lld threads=%d values %g: flags %d\n", isa.c_str(),
                        (long long)L, threads, double(value), flags);
            ++failures;
          }
        }
  }
  fastattn::set_isa("");
  return failures;
}

// A paged KV cache read through its block table (pages of 7 keys in a shuffled order, spare
// pages holding NaN that no sequence may read, page ids past each sequence's keys out of range)
// against the same keys contiguous: float32 and bfloat16 storage, a decode step (row kernel,
// split keys) and a chunk of queries (tiles, or packed or widened bfloat16), per-sequence
// lengths and bottom-right diagonals (diag_shift), on every instruction set. Under valgrind and
// AddressSanitizer a read outside the pages read shows.
int paged_cache() {
  int failures = 0;
  const int64_t B = 2, H = 2, S = 60, E = 16, page = 7, pages = (S + page - 1) / page;
  const int64_t n_pages = B * pages + 2;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> flat(size_t(B * H * S * E));
  for (float& x : flat) x = bf16_value(bf16_bits(normal(rng)));  // exact in bfloat16 too
  std::vector<int32_t> order(static_cast<size_t>(n_pages));
  for (int64_t i = 0; i < n_pages; ++i) order[size_t(i)] = int32_t(i);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<float> paged(size_t(n_pages * H * page * E), std::nanf(""));
  std::vector<int32_t> table(size_t(B * pages), 1 << 30);  // ids past the keys: never read
  const int64_t lengths[B] = {S, 23};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < (lengths[b] + page - 1) / page; ++j) {
      const int32_t id = order[size_t(b * pages + j)];
      table[size_t(b * pages + j)] = id;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t r = 0; r < page && j * page + r < S; ++r)
          for (int64_t e = 0; e < E; ++e)
            paged[size_t(((id * H + h) * page + r) * E + e)] =
                flat[size_t(((b * H + h) * S + j * page + r) * E + e)];
    }
  std::vector<uint16_t> flat16(flat.size()), paged16(paged.size());
  for (size_t i = 0; i < flat.size(); ++i) flat16[i] = bf16_bits(flat[i]);
  for (size_t i = 0; i < paged.size(); ++i) paged16[i] = bf16_bits(paged[i]);
  for (const std::string& isa : fastattn::available_isas()) {
    fastattn::set_isa(isa);
    for (const int64_t L : {int64_t(1), int64_t(9)})
      for (const bool bf16 : {false, true}) {
        std::vector<float> q(size_t(B * H * L * E)), out[2];
        for (float& x : q) x = bf16_value(bf16_bits(normal(rng)));
        std::vector<uint16_t> q16(q.size());
        for (size_t i = 0; i < q.size(); ++i) q16[i] = bf16_bits(q[i]);
        int64_t diag[B];
        for (int64_t b = 0; b < B; ++b) diag[b] = lengths[b] - L;
        for (int paged_run = 0; paged_run < 2; ++paged_run) {
          out[paged_run].assign(size_t(B * H * L * E), 0.0f);
          Problem p;
          p.storage = bf16 ? fastattn::Storage::kBFloat16 : fastattn::Storage::kSame;
          p.n_batch_dims = 2, p.batch_shape[0] = B, p.batch_shape[1] = H;
          p.L = L, p.S = S, p.E = E, p.Ev = E;
          // (B or pages, H, rows, E), C order
          auto matrix = [&](const void* data, int64_t rows) {
            StridedView v;
            v.data = data;
            v.batch_strides[0] = H * rows * E, v.batch_strides[1] = rows * E;
            v.row_stride = E, v.col_stride = 1;
            return v;
          };
          p.q = matrix(bf16 ? static_cast<const void*>(q16.data()) : q.data(), L);
          const void* kv = paged_run ? (bf16 ? static_cast<const void*>(paged16.data())
                                             : paged.data())
                                     : (bf16 ? static_cast<const void*>(flat16.data())
                                             : flat.data());
          p.k = p.v = matrix(kv, paged_run ? page : S);
          p.out = matrix(out[paged_run].data(), L);
          p.kv_lengths.data = lengths;
          p.kv_lengths.batch_strides[0] = 1;
          p.diag_shift.data = diag;
          p.diag_shift.batch_strides[0] = 1;
          p.band_hi = 0;  // causal, bottom-right per sequence
          p.scale = 0.25;
          p.num_threads = 2;
          p.num_splits = L == 1 ? 3 : 0;
          if (paged_run) {
            p.block_table = table.data();
            p.block_table_stride = pages;
            p.page_size = page;
          }
          fastattn::attention(p);
        }
        double err = 0;
        for (size_t i = 0; i < out[0].size(); ++i)
          err = std::max(err, double(std::fabs(out[0][i] - out[1][i])));
        if (!(err < 1e-5)) {
          std::printf("FAIL paged cache %s L=%lld bf16=%d: max difference %g\n", isa.c_str(),
                      (long long)L, int(bf16), err);
          ++failures;
        }
      }
  }
  fastattn::set_isa("");
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 60;  // random problems per type and ISA
  std::mt19937 rng(20240611);
  std::uniform_int_distribution<int> pick(0, 99);
  auto size = [&](int64_t small, int64_t large) {
    const int r = pick(rng);
    return r < 10 ? int64_t(r % 2) : r < 70 ? 1 + pick(rng) % small : 1 + pick(rng) % large;
  };
  Stats stats;
  int failures = refusals() + overflow_reports() + paged_cache();
  for (const std::string& isa : fastattn::available_isas()) {
    fastattn::set_isa(isa);
    for (int r = 0; r < rounds; ++r) {
      Case c;
      const int axes = pick(rng) % 3;
      c.group = 1;
      for (int d = 0; d < axes; ++d) c.batch.push_back(1 + pick(rng) % 3);
      if (axes && pick(rng) % 3 == 0) {
        c.group = 1 + pick(rng) % 3;
        c.batch.back() *= c.group;
      }
      c.L = size(6, 70);  // up to 4 queries: the row kernel; more: the tiles
      c.S = size(20, 300);
      c.E = size(8, 70);
      c.Ev = size(8, 40);
      // At most ~100k multiply-adds a problem, so that valgrind runs them all in a minute.
      while (numel(c.batch) * c.L * c.S * (c.E + c.Ev) > 100000) {
        int64_t* largest = &c.L;
        for (int64_t* d : {&c.S, &c.E, &c.Ev})
          if (*d > *largest) largest = d;
        *largest /= 2;
      }
      c.mask_kind = pick(rng) % 3;
      c.causal = pick(rng) % 3 == 0;
      c.window = pick(rng) % 5 == 0;
      c.bottom_right = pick(rng) % 2 == 0;
      c.softcap = pick(rng) % 5 == 0;
      c.alibi = pick(rng) % 5 == 0;
      c.kv_lengths = pick(rng) % 4 == 0;
      c.weights = pick(rng) % 3 == 0;
      c.lse = pick(rng) % 3 == 0;
      c.threads = pick(rng) % 3;  // 0: the default
      c.bf16 = pick(rng) % 2 == 0;
      c.grads_bf16 = pick(rng) % 2 == 0;
      if (pick(rng) % 2)
        run_case<float>(c, rng, isa, stats);
      else
        run_case<double>(c, rng, isa, stats);
    }
  }
  fastattn::set_isa("");
  failures += stats.failures;
  std::printf("driver: %d problems on %zu instruction sets (", stats.problems,
              fastattn::available_isas().size());
  for (const std::string& isa : fastattn::available_isas()) std::printf(" %s", isa.c_str());
  std::printf(" ), %d of them also through the bfloat16 backward, %d failures\n",
              stats.bf16_backward, failures);
  return failures ? 1 : 0;
}

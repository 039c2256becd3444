// Angular / cosine margin softmax cross-entropy on the CPU, never holding N x C.
//
// cos_ij = rx_i * rw_j * (x_i . W_j), rx/rw the per-row inverse norms (0 for rows
// of norm <= NORM_EPS), so no normalised copy of x or W is made. Class-tiled
// path (no gradients, reduction="none"): rows in chunks of `row_block` x classes
// in blocks of `block`; per tile one ATen GEMM writes the raw dots
// x_chunk @ W_blk^T into one [row_block, block] scratch (bounded whatever N and
// C), then a row loop (at::parallel_for) folds the tile into a running
// log-sum-exp over the non-target classes; the target logit, which needs the
// whole row for ELM's c*, is added at the end. Forward saves per row: lse and c*
// (ELM), and returns AdaCos's statistics (the non-target log-sum-exp and cos_y).
// Backward recomputes each tile's dots, overwrites them with H = dL/d(dot) and
// issues gX_chunk += H @ W_blk and gW_blk += H^T @ x_chunk; the normalisation
// Jacobian is applied once at the end as g - r^2 (g . v) v (x_i . A_i = sum_j
// H_ij dot_ij, so no extra reduction).
// The fused variant (forward with gradients, scalar reductions only) tiles rows
// only: [rows, C] dots per chunk, lse, H in place, the two gradient GEMMs,
// saving the recompute GEMM (3 GEMMs instead of 4; measured faster, see
// bench/bench_angular.py). Float32 rows use a branch-free exp that GCC
// vectorises in the avx512f clone (target_clones; the avx2 and default clones
// stay scalar); float64 and arcgrad's acos use libm (gradcheck runs in float64).
// shard_partials_* (fused_margin.distributed): the class-tiled sweep with each row's
// target column for its label, returning a shard's per-row max, sum of exp, target
// cosine and best wrong column; its backward recomputes the tiles from those. A
// sampled shard's kept rows are gathered one class block at a time (Columns).
// NaN and inf propagate as in the reference: ignored rows and rows of weight 0
// are computed too and multiplied by 0, so their gradient is NaN where the
// reference's 0 * softmax is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "vec_math.h"

namespace fused_margin {

at::Tensor row_inv_norm_cpu(const at::Tensor& x, double eps);  // norms.cpp

namespace {

constexpr double kNormEps = 1e-12;  // reference/angular.py NORM_EPS
constexpr double kCosEps = 1e-6;    // reference/angular.py COS_EPS
constexpr double kPi = 3.14159265358979323846;

enum Kind : int64_t { NORMFACE = 0, ARCFACE, COSFACE, SPHEREFACE, COMBINED, LDAM, ELM, ARCGRAD, ADAFACE };
constexpr double kAdaEps = 1e-3;  // reference/angular.py ADAFACE_EPS: AdaFace's clip of theta

struct Cfg {
  int64_t kind;
  double s, m1, m2, m3, elm_lambda, th, offset;
  int64_t ignore_index;
};

template <typename T>
FM_INLINE T cos_of(T dot, T rx, T rwj) { return dot * rx * rwj; }

template <typename T>
FM_INLINE T clamp_cos(T c) {
  const T lo = T(-1.0 + kCosEps), hi = T(1.0 - kCosEps);
  return c < lo ? lo : (c > hi ? hi : c);
}

template <typename T>
FM_INLINE bool in_clamp(T c) { return c >= T(-1.0 + kCosEps) && c <= T(1.0 - kCosEps); }

// The kinds whose target logit is a function of the clamped cosine (reference THETA_KINDS).
FM_INLINE bool theta_kind(int64_t k) {
  return k == ARCFACE || k == COMBINED || k == SPHEREFACE || k == ARCGRAD || k == ADAFACE;
}

// Non-target logit and its derivative in the cosine (arcgrad: -s*theta).
template <typename T>
FM_INLINE T logit_of(T c, T s, bool arcgrad) { return arcgrad ? -s * std::acos(clamp_cos(c)) : s * c; }

template <typename T>
FM_INLINE T dlogit_of(T c, T s, bool arcgrad) {
  if (!arcgrad) return s;
  if (!in_clamp(c)) return T(0);
  return s / std::sqrt(T(1) - c * c);
}

// The target logit divided by s (without ELM's extra term) and its derivative in cos_y.
template <typename T>
void target_of(T cos, T my, const Cfg& g, T* val, T* der) {
  const int64_t k = g.kind;
  if (k == NORMFACE) { *val = cos; *der = T(1); return; }
  if (k == COSFACE || k == LDAM || k == ELM) { *val = cos - my; *der = T(1); return; }
  const T c = clamp_cos(cos);
  const T mask = in_clamp(cos) ? T(1) : T(0);
  const T sn = std::sqrt(T(1) - c * c);
  if (k == ARCGRAD) { *val = -std::acos(c); *der = mask / sn; return; }
  if (k == ARCFACE) {
    if (c > std::cos(T(kPi) - my)) {
      *val = c * std::cos(my) - sn * std::sin(my);
      *der = mask * (std::cos(my) + c / sn * std::sin(my));
    } else {
      *val = c - my * std::sin(my);
      *der = mask;
    }
    return;
  }
  const T theta = std::acos(c);
  if (k == ADAFACE) {
    // AdaFace: cos(clip(theta - m2 * r, eps, pi - eps)) - m2 * (1 + r), r = my; the clip
    // is torch.clip's (no gradient outside)
    const T a = theta - T(g.m2) * my;
    const T lo = T(kAdaEps), hi = T(kPi - kAdaEps);
    const T ac = std::min(std::max(a, lo), hi);
    *val = std::cos(ac) - T(g.m2) * (T(1) + my);
    *der = (a >= lo && a <= hi) ? mask * std::sin(ac) / sn : T(0);
    return;
  }
  if (k == SPHEREFACE) {
    const T kk = std::floor(my * theta / T(kPi));
    const T sign = T(1) - T(2) * (kk - T(2) * std::floor(kk / T(2)));
    *val = sign * std::cos(my * theta) - T(2) * kk;
    *der = mask * sign * my * std::sin(my * theta) / sn;
    return;
  }
  // COMBINED
  if (c > T(g.th)) {
    const T a = T(g.m1) * theta + T(g.m2);
    *val = std::cos(a) - T(g.m3);
    *der = mask * T(g.m1) * std::sin(a) / sn;
  } else {
    *val = c - T(g.m3) - T(g.offset);
    *der = mask;
  }
}

// ------------------------------------------------------------ row kernels
// Each folds one row segment [0, cb) minus the target column yl (-1: none) into
// the running (M, S): M the largest logit folded so far, S = sum_j exp(logit_j - shift(M)).
// shift(M) = M, or 0 where M is infinite, as torch.logsumexp does: a +inf logit gives
// lse = +inf, and a NaN logit reaches S through exp (the max passes skip NaN, so the
// shift stays finite and the NaN is not lost); S == 0 means nothing folded yet.

template <typename T>
FM_INLINE T shift_of(T m) { return std::isfinite(m) ? m : T(0); }

FM_CLONES void fwd_block_f32(const float* dot, int64_t cb, int64_t yl, float rx, const float* rw,
                             float s, float* M, float* S) {
  if (cb - (yl >= 0 ? 1 : 0) == 0) return;  // nothing but the target here
  float mx = -std::numeric_limits<float>::infinity(), mn = std::numeric_limits<float>::infinity();
  const int64_t segs[2][2] = {{0, yl < 0 ? cb : yl}, {yl < 0 ? cb : yl + 1, cb}};
  for (auto& sg : segs) {
#pragma omp simd reduction(max : mx) reduction(min : mn)
    for (int64_t j = sg[0]; j < sg[1]; ++j) {
      const float c = cos_of(dot[j], rx, rw[j]);
      mx = std::max(mx, c);
      mn = std::min(mn, c);
    }
  }
  const float nm = std::max(*M, std::max(s * mx, s * mn));
  const float sh = shift_of(nm);
  float acc = 0.0f;
  for (auto& sg : segs) {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = sg[0]; j < sg[1]; ++j) acc += exp_f32(s * cos_of(dot[j], rx, rw[j]) - sh);
  }
  *S = (*S == 0.0f ? 0.0f : *S * exp_f32(shift_of(*M) - sh)) + acc;
  *M = nm;
}

// out[j] = dL/d(dot_j) for the non-target softmax terms: coef * p_j * s * rx * rw_j.
FM_CLONES void bwd_block_f32(const float* dot, float* out, int64_t cb, float rx, const float* rw,
                             float s, float lse, float coef) {
  const float k = coef * s * rx;
#pragma omp simd
  for (int64_t j = 0; j < cb; ++j) {
    const float d = dot[j];
    out[j] = k * rw[j] * exp_f32(s * cos_of(d, rx, rw[j]) - lse);
  }
}

// With per-class logit offsets (a sampled shard's log 1/q): the maximum is no longer
// at an extreme cosine, so each logit is formed twice (max pass, sum pass).
template <typename T>
void fwd_block_offset(const T* dot, int64_t cb, int64_t yl, T rx, const T* rw, const T* off, T s,
                      bool arcgrad, T* M, T* S) {
  T mx = -std::numeric_limits<T>::infinity();
  const int64_t segs[2][2] = {{0, yl < 0 ? cb : yl}, {yl < 0 ? cb : yl + 1, cb}};
  for (auto& sg : segs)
    for (int64_t j = sg[0]; j < sg[1]; ++j)
      mx = std::max(mx, logit_of(cos_of(dot[j], rx, rw[j]), s, arcgrad) + off[j]);
  const T nm = std::max(*M, mx);
  const T sh = shift_of(nm);
  T acc = 0;
  for (auto& sg : segs)
    for (int64_t j = sg[0]; j < sg[1]; ++j)
      acc += std::exp(logit_of(cos_of(dot[j], rx, rw[j]), s, arcgrad) + off[j] - sh);
  *S = (*S == T(0) ? T(0) : *S * std::exp(shift_of(*M) - sh)) + acc;
  *M = nm;
}

// off: nullptr, or the block's per-class logit offsets.
template <typename T>
void fwd_block(const T* dot, int64_t cb, int64_t yl, T rx, const T* rw, const T* off, T s,
               bool arcgrad, T* M, T* S) {
  if (cb - (yl >= 0 ? 1 : 0) == 0) return;
  if (off != nullptr) return fwd_block_offset(dot, cb, yl, rx, rw, off, s, arcgrad, M, S);
  if constexpr (std::is_same_v<T, float>) {
    if (!arcgrad) return fwd_block_f32(dot, cb, yl, rx, rw, s, M, S);
  }
  T mx = -std::numeric_limits<T>::infinity(), mn = std::numeric_limits<T>::infinity();
  const int64_t segs[2][2] = {{0, yl < 0 ? cb : yl}, {yl < 0 ? cb : yl + 1, cb}};
  for (auto& sg : segs)
    for (int64_t j = sg[0]; j < sg[1]; ++j) {
      const T c = cos_of(dot[j], rx, rw[j]);
      mx = std::max(mx, c);
      mn = std::min(mn, c);
    }
  // every logit is monotone in the cosine, so its maximum sits at mx or mn
  const T nm = std::max(*M, std::max(logit_of(mx, s, arcgrad), logit_of(mn, s, arcgrad)));
  const T sh = shift_of(nm);
  T acc = 0;
  for (auto& sg : segs)
    for (int64_t j = sg[0]; j < sg[1]; ++j)
      acc += std::exp(logit_of(cos_of(dot[j], rx, rw[j]), s, arcgrad) - sh);
  *S = (*S == T(0) ? T(0) : *S * std::exp(shift_of(*M) - sh)) + acc;
  *M = nm;
}

template <typename T>
void bwd_block(const T* dot, T* out, int64_t cb, T rx, const T* rw, const T* off, T s,
               bool arcgrad, T lse, T coef) {
  if constexpr (std::is_same_v<T, float>) {
    if (!arcgrad && off == nullptr) return bwd_block_f32(dot, out, cb, rx, rw, s, lse, coef);
  }
  for (int64_t j = 0; j < cb; ++j) {
    const T c = cos_of(dot[j], rx, rw[j]);
    const T z = logit_of(c, s, arcgrad) + (off != nullptr ? off[j] : T(0));
    // outside the clamp (NaN included) arcgrad's gradient is 0, not 0 * a NaN softmax:
    // torch.clamp's backward selects
    out[j] = (arcgrad && !in_clamp(c))
                 ? T(0)
                 : coef * std::exp(z - lse) * dlogit_of(c, s, arcgrad) * rx * rw[j];
  }
}

// ------------------------------------------------------------ shared driver state

template <typename T>
struct Rows {
  // inputs
  const int64_t* y;
  const T* roww;  // class weight of the target, 0 for ignored rows
  const T* marg;
  int64_t marg_n;
  const T* rx;
  const T* rw;
  Cfg g;
  int64_t C;
  const T* off = nullptr;  // per-class logit offsets [C], non-target logits only
  bool all_wrong = false;  // best wrong class of every row (a shard's partials), not ELM's only
  // running state per row
  std::vector<T> M, S, cy, best;
  std::vector<int64_t> cstar;

  T m_at(int64_t c) const { return marg[marg_n == 1 ? 0 : c]; }
  // per-sample margins (margin [N, 1], marg_n == -1): row i's own margin, for its
  // target and for ELM's c* term alike
  bool per_row() const { return marg_n < 0; }
  bool valid(int64_t i) const { return y[i] != g.ignore_index; }
  // the target's column in block [c0, c0 + cb), -1 if elsewhere or the row is ignored
  int64_t local_target(int64_t i, int64_t c0, int64_t cb) const {
    return (valid(i) && y[i] >= c0 && y[i] < c0 + cb) ? y[i] - c0 : -1;
  }

  void init(int64_t n) {
    M.assign(n, -std::numeric_limits<T>::infinity());
    S.assign(n, T(0));
    cy.assign(n, T(0));
    best.assign(n, -std::numeric_limits<T>::infinity());
    cstar.assign(n, -1);
  }

  // One row, one class block [c0, c0 + cb) whose dots start at `dot`. An ignored
  // row still folds every column (plain logits, as in the reference): its loss is
  // 0, but its gradient is 0 * softmax, NaN wherever the reference's is.
  void forward(int64_t i, const T* dot, int64_t c0, int64_t cb) {
    const int64_t yl = local_target(i, c0, cb);
    if (yl >= 0) cy[i] = cos_of(dot[yl], rx[i], rw[c0 + yl]);
    fwd_block<T>(dot, cb, yl, rx[i], rw + c0, off != nullptr ? off + c0 : nullptr, T(g.s),
                 g.kind == ARCGRAD, &M[i], &S[i]);
    if ((g.kind == ELM && valid(i)) || all_wrong) {
      T b = best[i];
      int64_t at = cstar[i];
      for (int64_t j = 0; j < cb; ++j) {
        const T c = cos_of(dot[j], rx[i], rw[c0 + j]);
        if (j != yl && c > b) { b = c; at = c0 + j; }
      }
      best[i] = b;
      cstar[i] = at;
    }
  }

  // Target value / s (ELM's term included) and its derivative in cos_y.
  void target(int64_t i, T cos_y, int64_t cst, T* val, T* der) const {
    target_of<T>(cos_y, per_row() ? marg[i] : m_at(y[i]), g, val, der);
    if (g.kind == ELM && C > 1 && cst >= 0)
      *val += T(g.elm_lambda) * (per_row() ? marg[i] : m_at(cst));
  }

  // log sum over the classes folded so far (the non-target ones for a valid row).
  T lse_folded(int64_t i) const { return shift_of(M[i]) + std::log(S[i]); }

  // loss_i = w_i * (lse_i - s * t_i) (0 for ignored rows); returns lse_i.
  T finish(int64_t i, T* loss) const {
    if (!valid(i)) { *loss = T(0); return lse_folded(i); }
    T t, der;
    target(i, cy[i], cstar[i], &t, &der);
    const T lt = T(g.s) * t;
    const T nm = std::max(M[i], lt);
    const T sh = shift_of(nm);
    const T rest = S[i] == T(0) ? T(0) : S[i] * std::exp(shift_of(M[i]) - sh);
    const T lse = sh + std::log(rest + std::exp(lt - sh));
    *loss = roww[i] * (lse - lt);
    return lse;
  }

  // dL/d(dot) for one row, one block, written to out (may alias dot). No shortcut
  // for coef == 0: 0 * a NaN softmax is NaN in the reference too.
  void backward(int64_t i, const T* dot, T* out, int64_t c0, int64_t cb, T lse, int64_t cst,
                T coef) const {
    const int64_t yl = local_target(i, c0, cb);
    const T dy = yl >= 0 ? dot[yl] : T(0);
    bwd_block<T>(dot, out, cb, rx[i], rw + c0, nullptr, T(g.s), g.kind == ARCGRAD, lse, coef);
    if (yl >= 0) {
      T t, der;
      const T cos_y = cos_of(dy, rx[i], rw[c0 + yl]);
      target(i, cos_y, cst, &t, &der);
      const T p = std::exp(T(g.s) * t - lse);
      // the theta kinds clamp cos_y first: a select, so 0 there even when p is NaN
      out[yl] = (theta_kind(g.kind) && !in_clamp(cos_y))
                    ? T(0)
                    : coef * (p - T(1)) * T(g.s) * der * rx[i] * rw[c0 + yl];
    }
  }

  // A shard's partials: dL/d(dot) from dL/dsum_exp (gsum; sum_exp is relative to
  // `shift`) and dL/dcos_y (gcy), whose target logit was formed outside.
  void backward_partials(int64_t i, const T* dot, T* out, int64_t c0, int64_t cb, T shift,
                         T gsum, T gcy) const {
    const int64_t yl = local_target(i, c0, cb);
    bwd_block<T>(dot, out, cb, rx[i], rw + c0, off != nullptr ? off + c0 : nullptr, T(g.s),
                 g.kind == ARCGRAD, shift, gsum);
    if (yl >= 0) out[yl] = gcy * rx[i] * rw[c0 + yl];
  }
};

// Rows per thread chunk: small problems run on the calling thread, since an
// OpenMP region costs more than it saves there (and far more on a busy machine).
int64_t grain_rows(int64_t row_len) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, row_len));
}

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_common(const at::Tensor& labels, const at::Tensor& roww, const at::Tensor& margin,
                  int64_t n, int64_t c, int64_t ignore_index) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n && labels.scalar_type() == at::kLong,
              "margin_cross_entropy: labels must be int64 [N]");
  TORCH_CHECK(roww.dim() == 1 && roww.size(0) == n, "margin_cross_entropy: row weights must be [N]");
  TORCH_CHECK((margin.dim() == 1 && (margin.size(0) == 1 || margin.size(0) == c)) ||
                  (margin.dim() == 2 && margin.size(0) == n && margin.size(1) == 1),
              "margin_cross_entropy: margin must be [1], [C] or (per sample) [N, 1]");
  TORCH_CHECK(c >= 1, "margin_cross_entropy: there must be at least one class");
  auto lab = labels.contiguous();
  const int64_t* y = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(y[i] == ignore_index || (y[i] >= 0 && y[i] < c), "margin_cross_entropy: label ",
                y[i], " at row ", i, " is outside [0, ", c, ") and is not ignore_index");
}

void check_xw(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "margin_cross_entropy: features and weight must be 2-D");
  TORCH_CHECK(x.size(1) == w.size(1), "margin_cross_entropy: features and weight disagree on D");
  TORCH_CHECK(x.is_floating_point() && x.scalar_type() == w.scalar_type(),
              "margin_cross_entropy: features and weight must share one floating dtype");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "margin_cross_entropy: CPU tensors only");
}

// c* comes back from Python into the backward, which reads margin[c*]: -1 or a class.
void check_cstar(const at::Tensor& cstar, int64_t c) {
  const int64_t* p = cstar.data_ptr<int64_t>();
  for (int64_t i = 0, n = cstar.size(0); i < n; ++i)
    TORCH_CHECK(p[i] >= -1 && p[i] < c, "margin_cross_entropy backward: cstar ", p[i], " at row ",
                i, " is outside [-1, ", c, ")");
}

Cfg make_cfg(int64_t kind, double s, double m1, double m2, double m3, double elm_lambda,
             double th, double offset, int64_t ignore_index) {
  TORCH_CHECK(kind >= NORMFACE && kind <= ADAFACE, "margin_cross_entropy: unknown kind ", kind);
  return Cfg{kind, s, m1, m2, m3, elm_lambda, th, offset, ignore_index};
}

template <typename T>
Rows<T> make_rows(const at::Tensor& lab, const at::Tensor& roww, const at::Tensor& marg,
                  const at::Tensor& rx, const at::Tensor& rw, const Cfg& g, int64_t c) {
  Rows<T> r;
  r.y = lab.data_ptr<int64_t>();
  r.roww = roww.data_ptr<T>();
  r.marg = marg.data_ptr<T>();
  r.marg_n = marg.dim() == 2 ? -1 : marg.size(0);
  r.rx = rx.data_ptr<T>();
  r.rw = rw.data_ptr<T>();
  r.g = g;
  r.C = c;
  return r;
}

// Applies the normalisation Jacobian in place: g_i -= r_i^2 (g_i . v_i) v_i.
template <typename T>
void project_rows(at::Tensor& grad, const at::Tensor& v, const at::Tensor& r) {
  const int64_t rows = grad.size(0), d = grad.size(1);
  T* pg = grad.data_ptr<T>();
  const T* pv = v.data_ptr<T>();
  const T* pr = r.data_ptr<T>();
  at::parallel_for(0, rows, grain_rows(d), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T* gi = pg + i * d;
      const T* vi = pv + i * d;
      if (pr[i] == T(0)) {
        // r = 0 for a zero row and for a NaN or inf one: the gradient is then what the
        // reference's autograd forms, g * 0 + v * 0 (the derivative of r is 0 there):
        // 0 for a zero row, NaN wherever g or v is NaN or inf
        for (int64_t k = 0; k < d; ++k) gi[k] = gi[k] * T(0) + vi[k] * T(0);
        continue;
      }
      T dotv = 0;
      for (int64_t k = 0; k < d; ++k) dotv += gi[k] * vi[k];
      const T a = pr[i] * pr[i] * dotv;
      for (int64_t k = 0; k < d; ++k) gi[k] -= a * vi[k];
    }
  });
}

// ------------------------------------------------------------ tile sweeps
// Class blocks of bs x row chunks of rb over one [rb, bs] scratch `buf`: per
// tile one GEMM writes the raw dots, then `row(i, dots_i, c0, cb)` runs over the
// chunk's rows in parallel. The backward sweep lets `row` overwrite the dots
// with H = dL/d(dot), then accumulates gX_chunk += H @ W_blk and
// gW_blk += H^T @ x_chunk (the caller applies project_rows afterwards).

// The sweep's columns: every row of W, or (a sampled shard) the rows `keep` lists,
// gathered one class block at a time into a [bs, D] tile (never a [K, D] copy); the
// gradient of such a block is accumulated in a tile too and written to its rows once
// the block's last row chunk is done.
struct Columns {
  const at::Tensor& wc;
  std::optional<at::Tensor> keep;  // int64 [K], distinct rows of wc
  at::Tensor wtile, gtile;

  Columns(const at::Tensor& w, std::optional<at::Tensor> k, int64_t bs) : wc(w), keep(std::move(k)) {
    if (keep.has_value()) {
      wtile = at::empty({std::min<int64_t>(bs, keep->size(0)), wc.size(1)}, wc.options());
      gtile = at::empty_like(wtile);
    }
  }
  int64_t count() const { return keep.has_value() ? keep->size(0) : wc.size(0); }
  at::Tensor block(int64_t c0, int64_t cb) {
    if (!keep.has_value()) return wc.narrow(0, c0, cb);
    auto out = wtile.narrow(0, 0, cb);
    at::index_select_out(out, wc, 0, keep->narrow(0, c0, cb));
    return out;
  }
  at::Tensor grad_block(at::Tensor& gw, int64_t c0, int64_t cb) {
    return keep.has_value() ? gtile.narrow(0, 0, cb) : gw.narrow(0, c0, cb);
  }
  void commit(at::Tensor& gw, int64_t c0, int64_t cb) {
    if (keep.has_value()) gw.index_copy_(0, keep->narrow(0, c0, cb), gtile.narrow(0, 0, cb));
  }
};

// `after(r0, nr, c0, cb, dots, w_block)` runs once a tile's rows are done.
template <typename T, typename Row, typename After>
void sweep_tiles(const at::Tensor& xc, Columns& cols, int64_t bs, int64_t rb, at::Tensor& buf,
                 Row&& row, After&& after) {
  const int64_t n = xc.size(0), c = cols.count();
  for (int64_t c0 = 0; c0 < c; c0 += bs) {
    const int64_t cb = std::min(bs, c - c0);
    const auto wb = cols.block(c0, cb);
    for (int64_t r0 = 0; r0 < n; r0 += rb) {
      const int64_t nr = std::min(rb, n - r0);
      auto dots = buf.narrow(0, 0, nr * cb).view({nr, cb});
      at::mm_out(dots, xc.narrow(0, r0, nr), wb.t());
      T* pd = dots.data_ptr<T>();
      at::parallel_for(0, nr, grain_rows(cb), [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) row(r0 + k, pd + k * cb, c0, cb);
      });
      after(r0, nr, c0, cb, dots, wb);
    }
  }
}

template <typename T, typename Row>
void sweep_tiles(const at::Tensor& xc, Columns& cols, int64_t bs, int64_t rb, at::Tensor& buf,
                 Row&& row) {
  sweep_tiles<T>(xc, cols, bs, rb, buf, row,
                 [](int64_t, int64_t, int64_t, int64_t, const at::Tensor&, const at::Tensor&) {});
}

template <typename T, typename Row>
void sweep_tiles_backward(const at::Tensor& xc, Columns& cols, int64_t bs, int64_t rb,
                          at::Tensor& buf, bool need_x, bool need_w, at::Tensor& gx,
                          at::Tensor& gw, Row&& row) {
  const int64_t n = xc.size(0);
  sweep_tiles<T>(xc, cols, bs, rb, buf, row,
                 [&](int64_t r0, int64_t nr, int64_t c0, int64_t cb, const at::Tensor& h,
                     const at::Tensor& wb) {
                   auto xb = xc.narrow(0, r0, nr);
                   if (need_x) gx.narrow(0, r0, nr).addmm_(h, wb);
                   if (need_w) {
                     auto gwb = cols.grad_block(gw, c0, cb);
                     if (r0 == 0) {
                       at::mm_out(gwb, h.t(), xb);
                     } else {
                       gwb.addmm_(h.t(), xb);
                     }
                     if (r0 + nr == n) cols.commit(gw, c0, cb);
                   }
                 });
}

// ------------------------------------------------------------ ops: features + weight

// Fills the per-row outputs once every class has been folded: loss, lse, c*, and
// AdaCos's statistics lse_other (the non-target log-sum-exp, read off the running
// state before the target joins it, so no cancellation) and cos_y.
template <typename T>
void finish_rows(const Rows<T>& rows, int64_t b, int64_t e, T* pl, T* ps, int64_t* pc, T* po,
                 T* py) {
  for (int64_t i = b; i < e; ++i) {
    po[i] = rows.lse_folded(i);
    py[i] = rows.cy[i];
    ps[i] = rows.finish(i, pl + i);
    pc[i] = rows.cstar[i];
  }
}

// Class-tiled forward: row chunks of row_block x class blocks of `block`, one
// [row_block, block] scratch whatever N and C.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> angular_ce_fwd(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, const at::Tensor& row_weight,
    const at::Tensor& margin, int64_t kind, double s, double m1, double m2, double m3,
    double elm_lambda, double th, double offset, int64_t ignore_index, int64_t block,
    int64_t row_block) {
  check_xw(x, w);
  const int64_t n = x.size(0), c = w.size(0);
  check_common(labels, row_weight, margin, n, c, ignore_index);
  const Cfg g = make_cfg(kind, s, m1, m2, m3, elm_lambda, th, offset, ignore_index);
  const auto ct = compute_type(x);
  auto xc = x.to(ct).contiguous(), wc = w.to(ct).contiguous();
  auto lab = labels.contiguous();
  auto roww = row_weight.to(ct).contiguous(), marg = margin.to(ct).contiguous();
  auto loss = at::zeros({n}, xc.options()), lse = at::zeros({n}, xc.options());
  auto lse_other = at::zeros({n}, xc.options()), cos_y = at::zeros({n}, xc.options());
  auto cstar = at::full({n}, -1, lab.options());
  if (n == 0) return {loss, lse, cstar, lse_other, cos_y};
  auto rx = row_inv_norm_cpu(xc, kNormEps), rw = row_inv_norm_cpu(wc, kNormEps);
  const int64_t bs = std::max<int64_t>(1, std::min(block, c));
  const int64_t rb = std::max<int64_t>(1, std::min(row_block, n));
  auto buf = at::empty({rb * bs}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "angular_ce_fwd", [&] {
    auto rows = make_rows<scalar_t>(lab, roww, marg, rx, rw, g, c);
    rows.init(n);
    Columns cols(wc, std::nullopt, bs);
    sweep_tiles<scalar_t>(xc, cols, bs, rb, buf, [&](int64_t i, scalar_t* d, int64_t c0,
                                                     int64_t cb) { rows.forward(i, d, c0, cb); });
    finish_rows<scalar_t>(rows, 0, n, loss.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                          cstar.data_ptr<int64_t>(), lse_other.data_ptr<scalar_t>(),
                          cos_y.data_ptr<scalar_t>());
  });
  return {loss, lse, cstar, lse_other, cos_y};
}

// Recomputing backward over the same tiles: per class block and row chunk, the dots
// again, H = dL/d(dot) in their place, gX_chunk += H @ W_blk, gW_blk += H^T @ x_chunk.
std::tuple<at::Tensor, at::Tensor> angular_ce_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
    const at::Tensor& row_weight, const at::Tensor& margin, const at::Tensor& lse,
    const at::Tensor& cstar, int64_t kind, double s, double m1, double m2, double m3,
    double elm_lambda, double th, double offset, int64_t ignore_index, int64_t block,
    int64_t row_block, bool need_x, bool need_w) {
  check_xw(x, w);
  const int64_t n = x.size(0), c = w.size(0);
  check_common(labels, row_weight, margin, n, c, ignore_index);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == n && lse.dim() == 1 && lse.size(0) == n &&
                  cstar.dim() == 1 && cstar.size(0) == n && cstar.scalar_type() == at::kLong,
              "angular_ce_bwd: grad, lse and cstar must be [N]");
  const Cfg g = make_cfg(kind, s, m1, m2, m3, elm_lambda, th, offset, ignore_index);
  const auto ct = compute_type(x);
  auto xc = x.to(ct).contiguous(), wc = w.to(ct).contiguous();
  auto lab = labels.contiguous(), cst = cstar.contiguous();
  check_cstar(cst, c);
  auto roww = row_weight.to(ct).contiguous(), marg = margin.to(ct).contiguous();
  auto gr = grad.to(ct).contiguous(), ls = lse.to(ct).contiguous();
  auto gx = at::zeros_like(xc), gw = at::zeros_like(wc);
  if (n > 0 && (need_x || need_w)) {
    auto rx = row_inv_norm_cpu(xc, kNormEps), rw = row_inv_norm_cpu(wc, kNormEps);
    const int64_t bs = std::max<int64_t>(1, std::min(block, c));
    const int64_t rb = std::max<int64_t>(1, std::min(row_block, n));
    auto buf = at::empty({rb * bs}, xc.options());
    AT_DISPATCH_FLOATING_TYPES(ct, "angular_ce_bwd", [&] {
      auto rows = make_rows<scalar_t>(lab, roww, marg, rx, rw, g, c);
      const scalar_t* pg = gr.data_ptr<scalar_t>();
      const scalar_t* pls = ls.data_ptr<scalar_t>();
      const int64_t* pc = cst.data_ptr<int64_t>();
      Columns cols(wc, std::nullopt, bs);
      sweep_tiles_backward<scalar_t>(
          xc, cols, bs, rb, buf, need_x, need_w, gx, gw,
          [&](int64_t i, scalar_t* d, int64_t c0, int64_t cb) {
            rows.backward(i, d, d, c0, cb, pls[i], pc[i], pg[i] * rows.roww[i]);
          });
      if (need_x) project_rows<scalar_t>(gx, xc, rx);
      if (need_w) project_rows<scalar_t>(gw, wc, rw);
    });
  }
  return {gx.to(x.scalar_type()), gw.to(w.scalar_type())};
}

// Forward with gradients (scalar reductions): rows tiled, each chunk's [rows, C]
// dots computed once. row_weight already holds the reduction's scale; the
// caller multiplies gx, gw by the incoming scalar gradient. Also returns the
// per-row AdaCos statistics (lse_other, cos_y) of this same sweep.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> angular_ce_fused(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, const at::Tensor& row_weight,
    const at::Tensor& margin, int64_t kind, double s, double m1, double m2, double m3,
    double elm_lambda, double th, double offset, int64_t ignore_index, int64_t row_block,
    bool need_x, bool need_w) {
  check_xw(x, w);
  const int64_t n = x.size(0), c = w.size(0);
  check_common(labels, row_weight, margin, n, c, ignore_index);
  const Cfg g = make_cfg(kind, s, m1, m2, m3, elm_lambda, th, offset, ignore_index);
  const auto ct = compute_type(x);
  auto xc = x.to(ct).contiguous(), wc = w.to(ct).contiguous();
  auto lab = labels.contiguous();
  auto roww = row_weight.to(ct).contiguous(), marg = margin.to(ct).contiguous();
  auto loss = at::zeros({n}, xc.options());
  auto lse_other = at::zeros({n}, xc.options()), cos_y = at::zeros({n}, xc.options());
  auto gx = at::zeros_like(xc), gw = at::zeros_like(wc);
  if (n == 0) return {loss, gx, gw, lse_other, cos_y};
  auto rx = row_inv_norm_cpu(xc, kNormEps), rw = row_inv_norm_cpu(wc, kNormEps);
  const int64_t rb = std::max<int64_t>(1, std::min(row_block, n));
  auto buf = at::empty({rb * c}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "angular_ce_fused", [&] {
    auto rows = make_rows<scalar_t>(lab, roww, marg, rx, rw, g, c);
    rows.init(n);
    scalar_t* pl = loss.data_ptr<scalar_t>();
    scalar_t* po = lse_other.data_ptr<scalar_t>();
    scalar_t* py = cos_y.data_ptr<scalar_t>();
    for (int64_t r0 = 0; r0 < n; r0 += rb) {
      const int64_t nr = std::min(rb, n - r0);
      auto dots = buf.narrow(0, 0, nr * c).view({nr, c});
      auto xb = xc.narrow(0, r0, nr);
      at::mm_out(dots, xb, wc.t());
      scalar_t* pd = dots.data_ptr<scalar_t>();
      at::parallel_for(0, nr, grain_rows(c), [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          const int64_t i = r0 + k;
          rows.forward(i, pd + k * c, 0, c);
          po[i] = rows.lse_folded(i);
          py[i] = rows.cy[i];
          const scalar_t lse = rows.finish(i, pl + i);
          rows.backward(i, pd + k * c, pd + k * c, 0, c, lse, rows.cstar[i], rows.roww[i]);
        }
      });
      if (need_x) {
        auto gxb = gx.narrow(0, r0, nr);
        at::mm_out(gxb, dots, wc);
      }
      if (need_w) gw.addmm_(dots.t(), xb);
    }
    if (need_x) project_rows<scalar_t>(gx, xc, rx);
    if (need_w) project_rows<scalar_t>(gw, wc, rw);
  });
  return {loss, gx.to(x.scalar_type()), gw.to(w.scalar_type()), lse_other, cos_y};
}

// ------------------------------------------------------------ ops: a class shard's partials
// fused_margin.distributed's per-row statistics of one class shard, on the class-tiled
// sweep: labels are replaced by each row's target column `col` in [-1, K) (checked
// like labels, -1 = elsewhere), so the same Rows fold excludes the target and picks up
// cos_y; every row's best wrong column is tracked (ties: first column). The target
// logit (and ELM's c*) are formed in Python from O(N) values. Saved by the caller for
// backward: only the inputs and row_max.

std::optional<at::Tensor> offsets_in(const std::optional<at::Tensor>& offset, int64_t k,
                                     at::ScalarType ct) {
  if (!offset.has_value()) return std::nullopt;
  TORCH_CHECK(offset->dim() == 1 && offset->size(0) == k,
              "margin_shard_partials: logit_offset must be [K], one per kept class");
  return offset->to(ct).contiguous();
}

// A sampled shard's kept rows: int64 [K], strictly increasing, inside [0, C_r).
std::optional<at::Tensor> keep_in(const std::optional<at::Tensor>& keep, int64_t c_r) {
  if (!keep.has_value()) return std::nullopt;
  TORCH_CHECK(keep->dim() == 1 && keep->scalar_type() == at::kLong,
              "margin_shard_partials: keep must be int64 [K]");
  auto kc = keep->contiguous();
  const int64_t* p = kc.data_ptr<int64_t>();
  for (int64_t j = 0, k = kc.size(0); j < k; ++j)
    TORCH_CHECK(p[j] >= 0 && p[j] < c_r && (j == 0 || p[j] > p[j - 1]),
                "margin_shard_partials: keep must list distinct rows of the shard in increasing "
                "order; entry ",
                j, " is ", p[j], " (shard of ", c_r, " rows)");
  return kc;
}

int64_t columns_of(const at::Tensor& w, const std::optional<at::Tensor>& keep) {
  return keep.has_value() ? keep->size(0) : w.size(0);
}

// What both shard ops set up once the shapes are known to be non-empty: the columns
// checked like labels, placeholder row weights and margin, the inverse norms (of
// every row of W, and of the sweep's columns), the tile sizes and their scratch.
struct ShardSetup {
  at::Tensor lab, ones, marg, rx, rw_rows, rw, buf;
  std::optional<at::Tensor> off;
  Cfg g;
  int64_t k, bs, rb;
  Columns cols;

  ShardSetup(const at::Tensor& xc, const at::Tensor& wc, const at::Tensor& col,
             const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& keep,
             int64_t kind, double s, int64_t block, int64_t row_block)
      : lab(col.contiguous()),
        ones(at::ones({xc.size(0)}, xc.options())),
        marg(at::zeros({1}, xc.options())),
        g(make_cfg(kind, s, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1)),
        k(columns_of(wc, keep)),
        bs(std::max<int64_t>(1, std::min(block, k))),
        rb(std::max<int64_t>(1, std::min(row_block, xc.size(0)))),
        cols(wc, keep, bs) {
    check_common(lab, ones, marg, xc.size(0), k, -1);
    off = offsets_in(offset, k, xc.scalar_type());
    rx = row_inv_norm_cpu(xc, kNormEps);
    rw_rows = row_inv_norm_cpu(wc, kNormEps);
    rw = keep.has_value() ? rw_rows.index_select(0, *keep) : rw_rows;
    buf = at::empty({rb * bs}, xc.options());
  }

  template <typename T>
  Rows<T> rows() const {
    auto r = make_rows<T>(lab, ones, marg, rx, rw, g, k);
    r.off = off.has_value() ? off->data_ptr<T>() : nullptr;
    return r;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shard_partials_fwd(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& col,
    const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& keep_arg,
    int64_t kind, double s, int64_t block, int64_t row_block) {
  check_xw(x, w);
  const auto keep = keep_in(keep_arg, w.size(0));
  const int64_t n = x.size(0), k = columns_of(w, keep);
  const auto ct = compute_type(x);
  auto xc = x.to(ct).contiguous(), wc = w.to(ct).contiguous();
  auto row_max = at::full({n}, -std::numeric_limits<double>::infinity(), xc.options());
  auto sum_exp = at::zeros({n}, xc.options()), cos_y = at::zeros({n}, xc.options());
  auto wrong = at::full({n}, -std::numeric_limits<double>::infinity(), xc.options());
  auto wcol = at::zeros({n}, col.options());
  if (n == 0 || k == 0) return {row_max, sum_exp, cos_y, wrong, wcol};
  ShardSetup st(xc, wc, col, offset, keep, kind, s, block, row_block);
  AT_DISPATCH_FLOATING_TYPES(ct, "shard_partials_fwd", [&] {
    auto rows = st.rows<scalar_t>();
    rows.all_wrong = true;
    rows.init(n);
    sweep_tiles<scalar_t>(xc, st.cols, st.bs, st.rb, st.buf,
                          [&](int64_t i, scalar_t* d, int64_t c0, int64_t cb) {
                            rows.forward(i, d, c0, cb);
                          });
    scalar_t *pm = row_max.data_ptr<scalar_t>(), *ps = sum_exp.data_ptr<scalar_t>();
    scalar_t *py = cos_y.data_ptr<scalar_t>(), *pw = wrong.data_ptr<scalar_t>();
    int64_t* pc = wcol.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      pm[i] = rows.M[i];
      ps[i] = rows.S[i];
      py[i] = rows.cy[i];
      pw[i] = rows.best[i];
      pc[i] = std::max<int64_t>(rows.cstar[i], 0);
    }
  });
  return {row_max, sum_exp, cos_y, wrong, wcol};
}

// dL/dx, dL/dW from dL/dsum_exp (g_sum) and dL/dcos_y (g_cos_y), recomputing the tiles.
std::tuple<at::Tensor, at::Tensor> shard_partials_bwd(
    const at::Tensor& g_sum, const at::Tensor& g_cos_y, const at::Tensor& x, const at::Tensor& w,
    const at::Tensor& col, const std::optional<at::Tensor>& offset,
    const std::optional<at::Tensor>& keep_arg, const at::Tensor& row_max, int64_t kind, double s,
    int64_t block, int64_t row_block, bool need_x, bool need_w) {
  check_xw(x, w);
  const auto keep = keep_in(keep_arg, w.size(0));
  const int64_t n = x.size(0), k = columns_of(w, keep);
  TORCH_CHECK(g_sum.dim() == 1 && g_sum.size(0) == n && g_cos_y.dim() == 1 &&
                  g_cos_y.size(0) == n && row_max.dim() == 1 && row_max.size(0) == n,
              "shard_partials_bwd: g_sum, g_cos_y and row_max must be [N]");
  const auto ct = compute_type(x);
  auto xc = x.to(ct).contiguous(), wc = w.to(ct).contiguous();
  auto gx = at::zeros_like(xc), gw = at::zeros_like(wc);
  if (n == 0 || k == 0 || !(need_x || need_w)) return {gx.to(x.scalar_type()), gw.to(w.scalar_type())};
  ShardSetup st(xc, wc, col, offset, keep, kind, s, block, row_block);
  auto gs = g_sum.to(ct).contiguous(), gc = g_cos_y.to(ct).contiguous();
  auto rm = row_max.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "shard_partials_bwd", [&] {
    const auto rows = st.rows<scalar_t>();
    const scalar_t *pgs = gs.data_ptr<scalar_t>(), *pgc = gc.data_ptr<scalar_t>();
    const scalar_t* pm = rm.data_ptr<scalar_t>();
    sweep_tiles_backward<scalar_t>(
        xc, st.cols, st.bs, st.rb, st.buf, need_x, need_w, gx, gw,
        [&](int64_t i, scalar_t* d, int64_t c0, int64_t cb) {
          rows.backward_partials(i, d, d, c0, cb, shift_of(pm[i]), pgs[i], pgc[i]);
        });
    if (need_x) project_rows<scalar_t>(gx, xc, st.rx);
    if (need_w) project_rows<scalar_t>(gw, wc, st.rw_rows);  // rows not kept stay 0
  });
  return {gx.to(x.scalar_type()), gw.to(w.scalar_type())};
}

// ------------------------------------------------------------ ops: precomputed cosines

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_ce_fwd(
    const at::Tensor& cos, const at::Tensor& labels, const at::Tensor& row_weight,
    const at::Tensor& margin, int64_t kind, double s, double m1, double m2, double m3,
    double elm_lambda, double th, double offset, int64_t ignore_index) {
  TORCH_CHECK(cos.dim() == 2 && cos.is_floating_point() && cos.device().is_cpu(),
              "margin_cross_entropy_from_cosine: cosine must be a 2-D floating CPU tensor");
  const int64_t n = cos.size(0), c = cos.size(1);
  check_common(labels, row_weight, margin, n, c, ignore_index);
  const Cfg g = make_cfg(kind, s, m1, m2, m3, elm_lambda, th, offset, ignore_index);
  const auto ct = compute_type(cos);
  auto cc = cos.to(ct).contiguous();
  auto lab = labels.contiguous();
  auto roww = row_weight.to(ct).contiguous(), marg = margin.to(ct).contiguous();
  auto loss = at::zeros({n}, cc.options()), lse = at::zeros({n}, cc.options());
  auto cstar = at::full({n}, -1, lab.options());
  if (n == 0) return {loss, lse, cstar};
  auto ones_n = at::ones({n}, cc.options()), ones_c = at::ones({c}, cc.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "cosine_ce_fwd", [&] {
    auto rows = make_rows<scalar_t>(lab, roww, marg, ones_n, ones_c, g, c);
    rows.init(n);
    const scalar_t* pd = cc.data_ptr<scalar_t>();
    scalar_t* pl = loss.data_ptr<scalar_t>();
    scalar_t* ps = lse.data_ptr<scalar_t>();
    int64_t* pc = cstar.data_ptr<int64_t>();
    at::parallel_for(0, n, grain_rows(c), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        rows.forward(i, pd + i * c, 0, c);
        ps[i] = rows.finish(i, pl + i);
        pc[i] = rows.cstar[i];
      }
    });
  });
  return {loss, lse, cstar};
}

at::Tensor cosine_ce_bwd(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& labels,
                         const at::Tensor& row_weight, const at::Tensor& margin,
                         const at::Tensor& lse, const at::Tensor& cstar, int64_t kind, double s,
                         double m1, double m2, double m3, double elm_lambda, double th,
                         double offset, int64_t ignore_index) {
  TORCH_CHECK(cos.dim() == 2 && cos.is_floating_point() && cos.device().is_cpu(),
              "margin_cross_entropy_from_cosine: cosine must be a 2-D floating CPU tensor");
  const int64_t n = cos.size(0), c = cos.size(1);
  check_common(labels, row_weight, margin, n, c, ignore_index);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == n && lse.dim() == 1 && lse.size(0) == n &&
                  cstar.dim() == 1 && cstar.size(0) == n && cstar.scalar_type() == at::kLong,
              "cosine_ce_bwd: grad, lse and cstar must be [N]");
  const Cfg g = make_cfg(kind, s, m1, m2, m3, elm_lambda, th, offset, ignore_index);
  const auto ct = compute_type(cos);
  auto cc = cos.to(ct).contiguous();
  auto lab = labels.contiguous(), cst = cstar.contiguous();
  check_cstar(cst, c);
  auto roww = row_weight.to(ct).contiguous(), marg = margin.to(ct).contiguous();
  auto gr = grad.to(ct).contiguous(), ls = lse.to(ct).contiguous();
  auto out = at::empty_like(cc);
  if (n == 0) return out.to(cos.scalar_type());
  auto ones_n = at::ones({n}, cc.options()), ones_c = at::ones({c}, cc.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "cosine_ce_bwd", [&] {
    auto rows = make_rows<scalar_t>(lab, roww, marg, ones_n, ones_c, g, c);
    const scalar_t* pd = cc.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const scalar_t* pg = gr.data_ptr<scalar_t>();
    const scalar_t* pls = ls.data_ptr<scalar_t>();
    const int64_t* pc = cst.data_ptr<int64_t>();
    at::parallel_for(0, n, grain_rows(c), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        rows.backward(i, pd + i * c, po + i * c, 0, c, pls[i], pc[i], pg[i] * rows.roww[i]);
    });
  });
  return out.to(cos.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_margin, m) {
  // kind: 0 normface, 1 arcface, 2 cosface, 3 sphereface, 4 combined, 5 ldam, 6 elm, 7 arcgrad,
  // 8 adaface.
  // row_weight: class weight of each row's target, 0 for ignored rows; margin: [1], [C] or [N, 1] (per sample);
  // (th, offset): reference.angular.combined_fallback(m1, m2). angular_ce_fwd returns per-row
  // loss, lse, c*, lse_other, cos_y; angular_ce_fused loss, gx, gw, lse_other, cos_y
  // (lse_other = log sum_{j != y} exp(logit_j), cos_y the target cosine: AdaCos's statistics).
  m.def("angular_ce_fwd(Tensor x, Tensor w, Tensor labels, Tensor row_weight, Tensor margin, "
        "int kind, float s, float m1, float m2, float m3, float elm_lambda, float th, "
        "float offset, int ignore_index, int block, int row_block) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("angular_ce_bwd(Tensor grad, Tensor x, Tensor w, Tensor labels, Tensor row_weight, "
        "Tensor margin, Tensor lse, Tensor cstar, int kind, float s, float m1, float m2, "
        "float m3, float elm_lambda, float th, float offset, int ignore_index, int block, "
        "int row_block, bool need_x, bool need_w) -> (Tensor, Tensor)");
  m.def("angular_ce_fused(Tensor x, Tensor w, Tensor labels, Tensor row_weight, Tensor margin, "
        "int kind, float s, float m1, float m2, float m3, float elm_lambda, float th, "
        "float offset, int ignore_index, int row_block, bool need_x, bool need_w) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // A class shard's partials (fused_margin.distributed): col [N] is each row's target
  // column in [-1, K); returns row_max, sum_exp, cos_y, wrong_cos, wrong_column.
  // keep: the sampled shard's kept rows of w (its columns), None for all of them.
  m.def("shard_partials_fwd(Tensor x, Tensor w, Tensor col, Tensor? offset, Tensor? keep, "
        "int kind, float s, int block, int row_block) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("shard_partials_bwd(Tensor g_sum, Tensor g_cos_y, Tensor x, Tensor w, Tensor col, "
        "Tensor? offset, Tensor? keep, Tensor row_max, int kind, float s, int block, "
        "int row_block, bool need_x, bool need_w) -> (Tensor, Tensor)");
  m.def("cosine_ce_fwd(Tensor cos, Tensor labels, Tensor row_weight, Tensor margin, int kind, "
        "float s, float m1, float m2, float m3, float elm_lambda, float th, float offset, "
        "int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def("cosine_ce_bwd(Tensor grad, Tensor cos, Tensor labels, Tensor row_weight, Tensor margin, "
        "Tensor lse, Tensor cstar, int kind, float s, float m1, float m2, float m3, "
        "float elm_lambda, float th, float offset, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_margin, CPU, m) {
  m.impl("angular_ce_fwd", &angular_ce_fwd);
  m.impl("angular_ce_bwd", &angular_ce_bwd);
  m.impl("angular_ce_fused", &angular_ce_fused);
  m.impl("shard_partials_fwd", &shard_partials_fwd);
  m.impl("shard_partials_bwd", &shard_partials_bwd);
  m.impl("cosine_ce_fwd", &cosine_ce_fwd);
  m.impl("cosine_ce_bwd", &cosine_ce_bwd);
}

}  // namespace fused_margin

// ============================================================ raw linear logits
// margin_cross_entropy(normalize=False): logits z_ij = s * (x_i . W_j + b_j), the
// target's lowered by s * m_y (cosface / ldam; normface is plain linear cross-entropy).
// The same Rows fold and tile sweeps as above run on the logits themselves: each
// tile's dots are turned into logits in place, the Rows see them as "cosines" with
// unit inverse norms, scale 1 and margin s * m (scaled by the caller), and the
// per-row coefficient carries s, so what they write back is dL/d(dot) = dL/db
// directly. No normalisation Jacobian; the bias gradient is H's column sum. Scratch:
// one [row_block, block] tile (class-tiled) or [row_block, C] (fused), whatever N.
namespace fused_margin {
namespace {

// d[j] <- s * (d[j] + b[j]) over one row segment (b: nullptr, or the segment's bias).
template <typename T>
FM_INLINE void to_logits(T* d, int64_t cb, T s, const T* b) {
  if (b == nullptr) {
    if (s == T(1)) return;
#pragma omp simd
    for (int64_t j = 0; j < cb; ++j) d[j] *= s;
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < cb; ++j) d[j] = s * (d[j] + b[j]);
}

struct LinearIn {
  at::Tensor xc, wc, lab, roww, marg, bias, ones_n, ones_c;
  bool has_bias;
};

LinearIn linear_in(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                   const at::Tensor& labels, const at::Tensor& row_weight,
                   const at::Tensor& margin, int64_t kind, int64_t ignore_index) {
  check_xw(x, w);
  const int64_t n = x.size(0), c = w.size(0);
  check_common(labels, row_weight, margin, n, c, ignore_index);
  TORCH_CHECK(kind == NORMFACE || kind == COSFACE || kind == LDAM,
              "margin_cross_entropy(normalize=False): kinds normface, cosface, ldam only");
  const auto ct = compute_type(x);
  LinearIn in;
  in.xc = x.to(ct).contiguous();
  in.wc = w.to(ct).contiguous();
  in.lab = labels.contiguous();
  in.roww = row_weight.to(ct).contiguous();
  in.marg = margin.to(ct).contiguous();
  in.has_bias = bias.has_value();
  if (in.has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c, "margin_cross_entropy: bias must be [C]");
    in.bias = bias->to(ct).contiguous();
  }
  in.ones_n = at::ones({n}, in.xc.options());
  in.ones_c = at::ones({c}, in.xc.options());
  return in;
}

// loss, lse per row (class-tiled; no gradients, or reduction="none").
std::tuple<at::Tensor, at::Tensor> linear_ce_fwd(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& row_weight, const at::Tensor& margin,
    int64_t kind, double s, int64_t ignore_index, int64_t block, int64_t row_block) {
  auto in = linear_in(x, w, bias, labels, row_weight, margin, kind, ignore_index);
  const int64_t n = x.size(0), c = w.size(0);
  auto loss = at::zeros({n}, in.xc.options()), lse = at::zeros({n}, in.xc.options());
  if (n == 0) return {loss, lse};
  const Cfg g = make_cfg(kind, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, ignore_index);
  const int64_t bs = std::max<int64_t>(1, std::min(block, c));
  const int64_t rb = std::max<int64_t>(1, std::min(row_block, n));
  auto buf = at::empty({rb * bs}, in.xc.options());
  AT_DISPATCH_FLOATING_TYPES(in.xc.scalar_type(), "linear_ce_fwd", [&] {
    using T = scalar_t;
    auto rows = make_rows<T>(in.lab, in.roww, in.marg, in.ones_n, in.ones_c, g, c);
    rows.init(n);
    const T* pb = in.has_bias ? in.bias.data_ptr<T>() : nullptr;
    const T sc = T(s);
    Columns cols(in.wc, std::nullopt, bs);
    sweep_tiles<T>(in.xc, cols, bs, rb, buf, [&](int64_t i, T* d, int64_t c0, int64_t cb) {
      to_logits<T>(d, cb, sc, pb == nullptr ? nullptr : pb + c0);
      rows.forward(i, d, c0, cb);
    });
    T* pl = loss.data_ptr<T>();
    T* ps = lse.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) ps[i] = rows.finish(i, pl + i);
  });
  return {loss, lse};
}

// Recomputing backward over the same tiles; gx, gw, gb (zeros where not needed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& row_weight,
    const at::Tensor& margin, const at::Tensor& lse, int64_t kind, double s, int64_t ignore_index,
    int64_t block, int64_t row_block, bool need_x, bool need_w, bool need_b) {
  auto in = linear_in(x, w, bias, labels, row_weight, margin, kind, ignore_index);
  const int64_t n = x.size(0), c = w.size(0);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == n && lse.dim() == 1 && lse.size(0) == n,
              "linear_ce_bwd: grad and lse must be [N]");
  const auto ct = in.xc.scalar_type();
  auto gr = grad.to(ct).contiguous(), ls = lse.to(ct).contiguous();
  auto gx = at::zeros_like(in.xc), gw = at::zeros_like(in.wc);
  auto gb = at::zeros({c}, in.xc.options());
  need_b = need_b && in.has_bias;
  if (n > 0 && (need_x || need_w || need_b)) {
    const Cfg g = make_cfg(kind, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, ignore_index);
    const int64_t bs = std::max<int64_t>(1, std::min(block, c));
    const int64_t rb = std::max<int64_t>(1, std::min(row_block, n));
    auto buf = at::empty({rb * bs}, in.xc.options());
    AT_DISPATCH_FLOATING_TYPES(ct, "linear_ce_bwd", [&] {
      using T = scalar_t;
      auto rows = make_rows<T>(in.lab, in.roww, in.marg, in.ones_n, in.ones_c, g, c);
      const T* pb = in.has_bias ? in.bias.data_ptr<T>() : nullptr;
      const T* pg = gr.data_ptr<T>();
      const T* pls = ls.data_ptr<T>();
      const T sc = T(s);
      Columns cols(in.wc, std::nullopt, bs);
      sweep_tiles<T>(
          in.xc, cols, bs, rb, buf,
          [&](int64_t i, T* d, int64_t c0, int64_t cb) {
            to_logits<T>(d, cb, sc, pb == nullptr ? nullptr : pb + c0);
            rows.backward(i, d, d, c0, cb, pls[i], -1, pg[i] * rows.roww[i] * sc);
          },
          [&](int64_t r0, int64_t nr, int64_t c0, int64_t cb, const at::Tensor& h,
              const at::Tensor& wb) {
            auto xb = in.xc.narrow(0, r0, nr);
            if (need_x) gx.narrow(0, r0, nr).addmm_(h, wb);
            if (need_w) {
              auto gwb = gw.narrow(0, c0, cb);
              if (r0 == 0) at::mm_out(gwb, h.t(), xb); else gwb.addmm_(h.t(), xb);
            }
            if (need_b) gb.narrow(0, c0, cb).add_(h.sum(0));
          });
    });
  }
  return {gx.to(x.scalar_type()), gw.to(w.scalar_type()), gb};
}

// Forward with gradients (scalar reductions): rows tiled, each chunk's [rows, C] logits
// formed once; row_weight holds the reduction's scale, the caller scales by the
// incoming gradient. Returns loss [N], gx, gw, gb.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_fused(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& row_weight, const at::Tensor& margin,
    int64_t kind, double s, int64_t ignore_index, int64_t row_block, bool need_x, bool need_w,
    bool need_b) {
  auto in = linear_in(x, w, bias, labels, row_weight, margin, kind, ignore_index);
  const int64_t n = x.size(0), c = w.size(0);
  auto loss = at::zeros({n}, in.xc.options());
  auto gx = at::zeros_like(in.xc), gw = at::zeros_like(in.wc);
  auto gb = at::zeros({c}, in.xc.options());
  if (n == 0) return {loss, gx, gw, gb};
  need_b = need_b && in.has_bias;
  const Cfg g = make_cfg(kind, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, ignore_index);
  const int64_t rb = std::max<int64_t>(1, std::min(row_block, n));
  auto buf = at::empty({rb * c}, in.xc.options());
  AT_DISPATCH_FLOATING_TYPES(in.xc.scalar_type(), "linear_ce_fused", [&] {
    using T = scalar_t;
    auto rows = make_rows<T>(in.lab, in.roww, in.marg, in.ones_n, in.ones_c, g, c);
    rows.init(n);
    const T* pb = in.has_bias ? in.bias.data_ptr<T>() : nullptr;
    const T sc = T(s);
    T* pl = loss.data_ptr<T>();
    for (int64_t r0 = 0; r0 < n; r0 += rb) {
      const int64_t nr = std::min(rb, n - r0);
      auto dots = buf.narrow(0, 0, nr * c).view({nr, c});
      auto xb = in.xc.narrow(0, r0, nr);
      at::mm_out(dots, xb, in.wc.t());
      T* pd = dots.data_ptr<T>();
      at::parallel_for(0, nr, grain_rows(c), [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          const int64_t i = r0 + k;
          T* d = pd + k * c;
          to_logits<T>(d, c, sc, pb);
          rows.forward(i, d, 0, c);
          const T lse = rows.finish(i, pl + i);
          rows.backward(i, d, d, 0, c, lse, -1, rows.roww[i] * sc);
        }
      });
      if (need_x) {
        auto gxb = gx.narrow(0, r0, nr);
        at::mm_out(gxb, dots, in.wc);
      }
      if (need_w) gw.addmm_(dots.t(), xb);
      if (need_b) gb.add_(dots.sum(0));
    }
  });
  return {loss, gx.to(x.scalar_type()), gw.to(w.scalar_type()), gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_margin, m) {
  // normalize=False: kind 0 normface, 2 cosface, 5 ldam; margin already times s.
  m.def("linear_ce_fwd(Tensor x, Tensor w, Tensor? bias, Tensor labels, Tensor row_weight, "
        "Tensor margin, int kind, float s, int ignore_index, int block, int row_block) "
        "-> (Tensor, Tensor)");
  m.def("linear_ce_bwd(Tensor grad, Tensor x, Tensor w, Tensor? bias, Tensor labels, "
        "Tensor row_weight, Tensor margin, Tensor lse, int kind, float s, int ignore_index, "
        "int block, int row_block, bool need_x, bool need_w, bool need_b) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("linear_ce_fused(Tensor x, Tensor w, Tensor? bias, Tensor labels, Tensor row_weight, "
        "Tensor margin, int kind, float s, int ignore_index, int row_block, bool need_x, "
        "bool need_w, bool need_b) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fused_margin, CPU, m) {
  m.impl("linear_ce_fwd", &linear_ce_fwd);
  m.impl("linear_ce_bwd", &linear_ce_bwd);
  m.impl("linear_ce_fused", &linear_ce_fused);
}

}  // namespace fused_margin

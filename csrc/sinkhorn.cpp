// Cost-sensitive family on the CPU: batched entropic Sinkhorn, and weighted /
// real-world-weight cross-entropy fused over classes.
//
// Sinkhorn follows reference/cost_sensitive.py iterate for iterate: F (rows
// match a) then G (columns match b), with the plan T_ij = exp(F_i + G_j - C_ij/eps).
// Samples are split over threads (at::parallel_for: OpenMP in torch's runtime),
// each sample's K x K working set in a per-thread buffer. The
// potentials are kept as absorbed log parts plus multiplicative scalings,
// F = F0 + log u, G = G0 + log v, over the stabilised kernel
// Kst_ij = exp(F0_i + G0_j - C_ij/eps), so a half-step is a K x K mat-vec
// (u = a / (Kst v), as an axpy over the rows of a transposed copy of Kst)
// instead of K^2 exps. The scalings are folded into F0/G0
// (K^2 exps) when they leave [1/TAU, TAU]; a half-step whose sums fall outside
// [LO, HI] (underflow at tiny eps: Kst no longer holds the mass) is redone
// exactly in the log domain (log-sum-exp over the same terms), which also
// rebuilds Kst from the exps it computed. Both are the same iteration, so the
// plans equal the reference's up to rounding at any iteration count.
// With tol, the batch is synchronised every TOL_EVERY iterations on the maximum
// row L1 error (the reference's rule), the state absorbed into [N, K] F0/G0.
// The plans come out as u_i Kst_ij v_j (exp(F + G - C/eps) after an early stop);
// a shared cost's first kernel exp(-C/eps) is computed once for the batch.
// A sample whose a or b is all zero runs the reference's dummy problem (ones),
// so that it enters the tol maximum the same way, and returns F = G = -inf.
// Nothing is saved for backward here: cpu.py forms gradients from F, G.
//
// WCE / CRWWCE: one task per row, a few passes over its K logits computing the
// log-sum-exp, the loss and dL/dlogits for a unit upstream gradient (saved by
// cpu.py, Liger style, and scaled in place in backward); no N x K temporaries
// besides that gradient (half logits are read as they are, in the logits' dtype).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace fused_margin {
namespace {

constexpr int64_t kTolEvery = 10;  // reference/cost_sensitive.py TOL_EVERY

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SK_CLONES
#endif

// s_j = sum_i u_i k_ij, four rows per sweep of s (both half-steps use this
// axpy form, the row one on the transposed kernel: no horizontal reductions)
#define SK_COLDOTS(T)                                                               \
  SK_CLONES void coldots(const T* k, const T* u, T* s, int64_t n) {                 \
    for (int64_t j = 0; j < n; ++j) s[j] = 0;                                       \
    int64_t i = 0;                                                                  \
    for (; i + 4 <= n; i += 4) {                                                    \
      const T u0 = u[i], u1 = u[i + 1], u2 = u[i + 2], u3 = u[i + 3];               \
      const T *r0 = k + i * n, *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;            \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) s[j] +=                   \
          (u0 * r0[j] + u1 * r1[j]) + (u2 * r2[j] + u3 * r3[j]);                    \
    }                                                                               \
    for (; i < n; ++i) {                                                            \
      const T ui = u[i];                                                            \
      const T* r = k + i * n;                                                       \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) s[j] += ui * r[j];        \
    }                                                                               \
  }
SK_COLDOTS(double)
SK_COLDOTS(float)
#undef SK_COLDOTS

// Accepted range of a half-step's sums (below LO, Kst entries lost to underflow
// could matter) and of the scalings before they are absorbed.
template <typename T> struct Lim;
template <> struct Lim<double> {
  static constexpr double LO = 1e-200, HI = 1e200, TAU = 1e30;
};
template <> struct Lim<float> {
  static constexpr float LO = 1e-20f, HI = 1e20f, TAU = 1e5f;
};

// u = m / s where m > 0 (0 elsewhere), branch-free so that it vectorises;
// returns 2 if a sum left [LO, HI] (redo the half-step in the log domain),
// 1 if a scaling left [1/TAU, TAU] (absorb), else 0.
#define SK_SCALE(T)                                                                 \
  SK_CLONES int scale_step(const T* m, const T* s, T* u, int64_t n) {              \
    int bad = 0, big = 0;                                                           \
    for (int64_t i = 0; i < n; ++i) {                                               \
      const bool on = m[i] > 0;                                                     \
      const T q = m[i] / s[i];                                                      \
      u[i] = on ? q : T(0);                                                         \
      bad |= on & !(s[i] >= Lim<T>::LO && s[i] <= Lim<T>::HI);                     \
      big |= on & !(q >= T(1) / Lim<T>::TAU && q <= Lim<T>::TAU);                  \
    }                                                                               \
    return bad ? 2 : big ? 1 : 0;                                                   \
  }
SK_SCALE(double)
SK_SCALE(float)
#undef SK_SCALE

template <typename T>
struct Solver {
  int64_t K;
  const T* a;   // marginals of this sample (ones for an empty sample)
  const T* b;
  const T* cs;  // C / eps, K x K
  T *f0, *g0, *u, *v;  // state, K each
  T* kst;              // K x K
  T* kt;               // its transpose
  T* s;                // K
  T* tmp;              // K

  static constexpr T NEG_INF = -std::numeric_limits<T>::infinity();

  void transpose() {
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) kt[j * K + i] = kst[i * K + j];
  }
  // the first kernel, F0 = G0 = 0, of a shared cost: exp(-C/eps) and its transpose
  void start_kernel(const T* e0, const T* e0t) {
    std::copy(e0, e0 + K * K, kst);
    std::copy(e0t, e0t + K * K, kt);
  }
  // the plan u_i Kst_ij v_j = exp(F_i + G_j - C_ij/eps) of the current state
  void write_plan(T* out) const {
    for (int64_t i = 0; i < K; ++i) {
      const T* row = kst + i * K;
      T* o = out + i * K;
      for (int64_t j = 0; j < K; ++j) o[j] = u[i] * row[j] * v[j];
    }
  }
  void build_kernel() {
    for (int64_t i = 0; i < K; ++i) {
      const T fi = f0[i];
      T* row = kst + i * K;
      const T* c = cs + i * K;
      for (int64_t j = 0; j < K; ++j) row[j] = std::exp(fi + g0[j] - c[j]);
    }
    transpose();
  }
  void absorb(bool rebuild) {
    for (int64_t i = 0; i < K; ++i) { f0[i] += std::log(u[i]); u[i] = 1; }
    for (int64_t j = 0; j < K; ++j) { g0[j] += std::log(v[j]); v[j] = 1; }
    if (rebuild) build_kernel();
  }

  // F = log a - lse_j(G_j - cs_ij), exactly; Kst becomes exp(F_i + G_j - cs_ij).
  void log_row_step() {
    for (int64_t j = 0; j < K; ++j) { tmp[j] = g0[j] + std::log(v[j]); v[j] = 1; g0[j] = tmp[j]; }
    for (int64_t i = 0; i < K; ++i) {
      T* row = kst + i * K;
      const T* c = cs + i * K;
      u[i] = 1;
      if (a[i] == 0) {
        f0[i] = NEG_INF;
        for (int64_t j = 0; j < K; ++j) row[j] = 0;
        continue;
      }
      T m = NEG_INF;
      for (int64_t j = 0; j < K; ++j) { row[j] = tmp[j] - c[j]; m = std::max(m, row[j]); }
      T sum = 0;
      for (int64_t j = 0; j < K; ++j) { row[j] = std::exp(row[j] - m); sum += row[j]; }
      f0[i] = std::log(a[i]) - (m + std::log(sum));
      const T scale = a[i] / sum;
      for (int64_t j = 0; j < K; ++j) row[j] *= scale;
    }
    transpose();
  }
  // G = log b - lse_i(F_i - cs_ij), exactly, column by column through the rows.
  void log_col_step() {
    for (int64_t i = 0; i < K; ++i) { tmp[i] = f0[i] + std::log(u[i]); u[i] = 1; f0[i] = tmp[i]; }
    T* m = s;
    for (int64_t j = 0; j < K; ++j) m[j] = NEG_INF;
    for (int64_t i = 0; i < K; ++i) {
      T* row = kst + i * K;
      const T* c = cs + i * K;
      for (int64_t j = 0; j < K; ++j) { row[j] = tmp[i] - c[j]; m[j] = std::max(m[j], row[j]); }
    }
    std::vector<T> sum(K, T(0));  // small; only on this slow path
    for (int64_t i = 0; i < K; ++i) {
      T* row = kst + i * K;
      for (int64_t j = 0; j < K; ++j) { row[j] = std::exp(row[j] - m[j]); sum[j] += row[j]; }
    }
    for (int64_t j = 0; j < K; ++j) {
      v[j] = 1;
      if (b[j] == 0) { g0[j] = NEG_INF; sum[j] = 0; continue; }
      g0[j] = std::log(b[j]) - (m[j] + std::log(sum[j]));
      sum[j] = b[j] / sum[j];
    }
    for (int64_t i = 0; i < K; ++i) {
      T* row = kst + i * K;
      for (int64_t j = 0; j < K; ++j) row[j] *= sum[j];
    }
    transpose();
  }

  void row_step() {
    coldots(kt, v, s, K);
    const int r = scale_step(a, s, u, K);
    if (r == 2) log_row_step();   // u is recomputed from the unchanged v, G0
    else if (r == 1) absorb(true);
  }
  void col_step() {
    coldots(kst, u, s, K);
    const int r = scale_step(b, s, v, K);
    if (r == 2) log_col_step();
    else if (r == 1) absorb(true);
  }
  // sum_i |rows_i - a_i| of the current plan
  T row_error() {
    coldots(kt, v, s, K);
    T err = 0;
    for (int64_t i = 0; i < K; ++i) err += std::abs(u[i] * s[i] - a[i]);
    return err;
  }
};

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> potentials_impl(
    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& cost_in, double eps,
    int64_t n_iter, double tol, bool want_plan) {
  const auto a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), K = a.size(1);
  const bool shared = cost_in.dim() == 2;
  // the reference divides by eps (not a multiply by 1/eps): same rounding
  const auto cs_all = (cost_in / eps).contiguous();
  auto F = at::zeros({N, K}, a.options());
  auto G = at::zeros({N, K}, a.options());
  // every plan is written below (empty samples get zeros at the end): no memset of [N, K, K]
  auto P = want_plan ? at::empty({N, K, K}, a.options()) : at::empty({0}, a.options());
  if (N == 0) return {F, G, P};
  T* pp = want_plan ? P.data_ptr<T>() : nullptr;
  // a shared cost's first kernel, computed once
  at::Tensor e0, e0t;
  if (shared) {
    e0 = (-cs_all).exp().contiguous();
    e0t = e0.t().contiguous();
  }
  const T *pa = a.data_ptr<T>(), *pb = b.data_ptr<T>(), *pc = cs_all.data_ptr<T>();
  T *pf = F.data_ptr<T>(), *pg = G.data_ptr<T>();
  std::vector<char> empty(N, 0);
  for (int64_t n = 0; n < N; ++n) {
    bool any_a = false, any_b = false;
    for (int64_t i = 0; i < K; ++i) { any_a |= pa[n * K + i] > 0; any_b |= pb[n * K + i] > 0; }
    empty[n] = !(any_a && any_b);
  }
  const std::vector<T> ones(K, T(1));
  const bool use_tol = tol > 0;
  const int64_t chunk = use_tol ? kTolEvery : n_iter;
  std::vector<T> err(N, T(0));

  int64_t done = 0;
  bool stopped = false;
  while (done < n_iter) {
    const int64_t iters = std::min(chunk, n_iter - done);
    const bool last = done + iters == n_iter;
    const bool check = use_tol && !last;  // the reference checks only before the last
    at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
      // the state is worked on in thread-local copies (neighbouring samples'
      // [N, K] rows share cache lines)
      std::vector<T> kst(K * K), kt(K * K), s(K), tmp(K), st(4 * K);
      for (int64_t n = lo; n < hi; ++n) {
        Solver<T> sv{K,
                     empty[n] ? ones.data() : pa + n * K,
                     empty[n] ? ones.data() : pb + n * K,
                     shared ? pc : pc + n * K * K,
                     st.data(), st.data() + K, st.data() + 2 * K, st.data() + 3 * K,
                     kst.data(), kt.data(), s.data(), tmp.data()};
        std::copy(pf + n * K, pf + (n + 1) * K, sv.f0);
        std::copy(pg + n * K, pg + (n + 1) * K, sv.g0);
        std::fill(sv.u, sv.u + K, T(1));  // absorbed at every chunk's end
        std::fill(sv.v, sv.v + K, T(1));
        if (shared && done == 0)
          sv.start_kernel(e0.data_ptr<T>(), e0t.data_ptr<T>());
        else
          sv.build_kernel();
        for (int64_t it = 0; it < iters; ++it) {
          sv.row_step();
          sv.col_step();
        }
        if (check) err[n] = sv.row_error();
        if (pp && !empty[n] && last) sv.write_plan(pp + n * K * K);
        sv.absorb(false);
        std::copy(sv.f0, sv.f0 + K, pf + n * K);
        std::copy(sv.g0, sv.g0 + K, pg + n * K);
      }
    });
    done += iters;
    if (check) {
      T worst = 0;
      for (int64_t n = 0; n < N; ++n) worst = std::max(worst, err[n]);
      if (worst < static_cast<T>(tol)) {
        stopped = true;
        break;
      }
    }
  }
  // stopped early: the plans of the absorbed state (exp(F + G - C/eps))
  if (pp && stopped) {
    at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        if (empty[n]) continue;
        const T* c = shared ? pc : pc + n * K * K;
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < K; ++j)
            pp[(n * K + i) * K + j] = std::exp(pf[n * K + i] + pg[n * K + j] - c[i * K + j]);
      }
    });
  }
  for (int64_t n = 0; n < N; ++n)
    if (empty[n]) {
      for (int64_t i = 0; i < K; ++i) {
        pf[n * K + i] = -std::numeric_limits<T>::infinity();
        pg[n * K + i] = -std::numeric_limits<T>::infinity();
      }
      if (pp) std::fill(pp + n * K * K, pp + (n + 1) * K * K, T(0));
    }
  return {F, G, P};
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fused_margin: ", name, " must be float32 or float64 (cast before the kernel)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_potentials(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost, double eps, int64_t n_iter,
    double tol, bool want_plan) {
  check_float(a, "a");
  TORCH_CHECK(n_iter >= 1, "fused_margin: sinkhorn needs n_iter >= 1, got ", n_iter);
  TORCH_CHECK(b.scalar_type() == a.scalar_type() && cost.scalar_type() == a.scalar_type(),
              "fused_margin: a, b and cost must share one dtype");
  TORCH_CHECK(a.dim() == 2 && b.sizes() == a.sizes(), "a, b must be [N, K]");
  TORCH_CHECK((cost.dim() == 2 && cost.size(0) == a.size(1) && cost.size(1) == a.size(1)) ||
                  (cost.dim() == 3 && cost.size(0) == a.size(0) && cost.size(1) == a.size(1) &&
                   cost.size(2) == a.size(1)),
              "cost must be [K, K] or [N, K, K]");
  if (a.scalar_type() == at::kDouble)
    return potentials_impl<double>(a, b, cost, eps, n_iter, tol, want_plan);
  return potentials_impl<float>(a, b, cost, eps, n_iter, tol, want_plan);
}

// exp(F_i + G_j - C_ij / eps): the plans [N, K, K]
at::Tensor sinkhorn_plan(const at::Tensor& f, const at::Tensor& g, const at::Tensor& cost,
                         double eps) {
  check_float(f, "f");
  const int64_t N = f.size(0), K = f.size(1);
  auto out = at::empty({N, K, K}, f.options());
  const auto ff = f.contiguous(), gg = g.contiguous(), cs = (cost / eps).contiguous();
  const bool shared = cost.dim() == 2;
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "sinkhorn_plan", [&] {
    const scalar_t *pf = ff.data_ptr<scalar_t>(), *pg = gg.data_ptr<scalar_t>(),
                   *pc = cs.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const scalar_t* c = shared ? pc : pc + n * K * K;
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < K; ++j)
            po[(n * K + i) * K + j] =
                std::exp(pf[n * K + i] + pg[n * K + j] - c[i * K + j]);
      }
    });
  });
  return out;
}

// per sample sum_ij T_ij C_ij (+ eps * sum T (log T - 1) when entropic, 0 log 0 = 0)
at::Tensor sinkhorn_cost(const at::Tensor& f, const at::Tensor& g, const at::Tensor& cost,
                         double eps, bool entropic) {
  check_float(f, "f");
  const int64_t N = f.size(0), K = f.size(1);
  auto out = at::empty({N}, f.options());
  const auto ff = f.contiguous(), gg = g.contiguous(), cc = cost.contiguous(),
             cs = (cost / eps).contiguous();
  const bool shared = cost.dim() == 2;
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "sinkhorn_cost", [&] {
    const scalar_t *pf = ff.data_ptr<scalar_t>(), *pg = gg.data_ptr<scalar_t>(),
                   *pcs = cs.data_ptr<scalar_t>(), *pcc = cc.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const int64_t off = shared ? 0 : n * K * K;
        scalar_t tc = 0, ent = 0;
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < K; ++j) {
            const scalar_t lt = pf[n * K + i] + pg[n * K + j] - pcs[off + i * K + j];
            if (!std::isfinite(lt)) continue;
            const scalar_t t = std::exp(lt);
            tc += t * pcc[off + i * K + j];
            ent += t * (lt - 1);
          }
        po[n] = entropic ? tc + static_cast<scalar_t>(eps) * ent : tc;
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------- WCE / CRWWCE

// Logits may be float16 / bfloat16 (read and converted in registers: no float32
// copy of the [N, K] logits), float32 or float64; the math, the per-row outputs
// and the weights are in acc_t (float32 for half logits), the gradient is stored
// in the logits' dtype (cast once per entry).
void check_logits(const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "fused_margin: logits must be a floating dtype");
  TORCH_CHECK(t.dim() == 2, "fused_margin: logits must be [N, K]");
}

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per row: loss w_t (lse - z_t), nll = lse - z_t, and (need_grad) w_t (h - e_t).
std::tuple<at::Tensor, at::Tensor, at::Tensor> wce_fwd(const at::Tensor& logits,
                                                       const at::Tensor& labels,
                                                       const at::Tensor& weight,
                                                       int64_t ignore_index, bool need_grad) {
  check_logits(logits);
  const auto z = logits.contiguous();
  const auto acc = acc_type(z);
  const auto y = labels.to(at::kLong).contiguous();
  const auto w = weight.to(acc).contiguous();
  const int64_t N = z.size(0), K = z.size(1);
  auto loss = at::zeros({N}, z.options().dtype(acc));
  auto nll = at::zeros({N}, z.options().dtype(acc));
  auto grad = need_grad ? at::zeros({N, K}, z.options()) : at::empty({0}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "wce_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pz = z.data_ptr<scalar_t>();
    const acc_t* pw = w.data_ptr<acc_t>();
    const int64_t* py = y.data_ptr<int64_t>();
    acc_t *pl = loss.data_ptr<acc_t>(), *pn = nll.data_ptr<acc_t>();
    scalar_t* pg = need_grad ? grad.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const int64_t t = py[n];
        if (t == ignore_index) continue;
        const scalar_t* row = pz + n * K;
        acc_t m = static_cast<acc_t>(row[0]);
        for (int64_t j = 1; j < K; ++j) m = std::max(m, static_cast<acc_t>(row[j]));
        acc_t sum = 0;
        for (int64_t j = 0; j < K; ++j) sum += std::exp(static_cast<acc_t>(row[j]) - m);
        const acc_t lse = m + std::log(sum);
        const acc_t wt = pw[t];
        pn[n] = lse - static_cast<acc_t>(row[t]);
        pl[n] = wt * pn[n];
        if (pg) {
          scalar_t* gr = pg + n * K;
          for (int64_t j = 0; j < K; ++j) {
            const acc_t gj = wt * std::exp(static_cast<acc_t>(row[j]) - lse);
            gr[j] = static_cast<scalar_t>(j == t ? gj - wt : gj);
          }
        }
      }
    });
  });
  return {loss, nll, grad};
}

// Per row: loss -(fn_t log h_t + sum_{k != t} fp_kt log(1 - h_k)), log h_t, and
// (need_grad) dloss/dz. log(1 - h_k) as in reference.log1m_softmax: for the
// arg-max class lse_{j != top} z_j - lse, else log1p(-h_k) (h_k <= 1/2). The
// gradient: fn_t (h - e_t) + sum_{k != t, top} r_k (e_k - h) with
// r_k = fp_kt h_k / (1 - h_k), and for top != t fp_top,t (h - q) with q the
// softmax over the non-top classes (q_top = 0): bounded however sure the model is.
std::tuple<at::Tensor, at::Tensor, at::Tensor> crwwce_fwd(const at::Tensor& logits,
                                                          const at::Tensor& labels,
                                                          const at::Tensor& fn_weight,
                                                          const at::Tensor& fp_weight,
                                                          int64_t ignore_index, bool need_grad) {
  check_logits(logits);
  const auto z = logits.contiguous();
  const auto acc = acc_type(z);
  const auto y = labels.to(at::kLong).contiguous();
  const auto fn = fn_weight.to(acc).contiguous();
  const auto fp = fp_weight.to(acc).contiguous();
  const int64_t N = z.size(0), K = z.size(1);
  auto loss = at::zeros({N}, z.options().dtype(acc));
  auto logp = at::zeros({N}, z.options().dtype(acc));
  auto grad = need_grad ? at::zeros({N, K}, z.options()) : at::empty({0}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "crwwce_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pz = z.data_ptr<scalar_t>();
    const acc_t *pfn = fn.data_ptr<acc_t>(), *pfp = fp.data_ptr<acc_t>();
    const int64_t* py = y.data_ptr<int64_t>();
    acc_t *pl = loss.data_ptr<acc_t>(), *plp = logp.data_ptr<acc_t>();
    scalar_t* pg = need_grad ? grad.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const int64_t t = py[n];
        if (t == ignore_index) continue;
        const scalar_t* row = pz + n * K;
        auto zv = [row](int64_t j) { return static_cast<acc_t>(row[j]); };
        int64_t top = 0;  // first arg-max, as torch.argmax
        for (int64_t j = 1; j < K; ++j)
          if (zv(j) > zv(top)) top = j;
        const acc_t m = zv(top);
        acc_t sum = 0;
        for (int64_t j = 0; j < K; ++j) sum += std::exp(zv(j) - m);
        const acc_t lse = m + std::log(sum);
        acc_t lse_o = -std::numeric_limits<acc_t>::infinity();
        if (K > 1) {
          acc_t m2 = -std::numeric_limits<acc_t>::infinity();
          for (int64_t j = 0; j < K; ++j)
            if (j != top) m2 = std::max(m2, zv(j));
          acc_t so = 0;
          for (int64_t j = 0; j < K; ++j)
            if (j != top) so += std::exp(zv(j) - m2);
          lse_o = m2 + std::log(so);
        }
        const acc_t fnt = pfn[t];
        const acc_t lpt = zv(t) - lse;
        plp[n] = lpt;
        acc_t l = -fnt * lpt;
        acc_t R = 0;  // sum_{k != t, top} r_k
        for (int64_t k = 0; k < K && K > 1; ++k) {
          if (k == t) continue;
          const acc_t fpk = pfp[k * K + t];
          if (k == top) {
            l -= fpk * (lse_o - lse);
          } else {
            const acc_t h = std::exp(zv(k) - lse);
            l -= fpk * std::log1p(-h);
            R += fpk * h / (1 - h);
          }
        }
        pl[n] = l;
        if (pg) {
          scalar_t* gr = pg + n * K;
          const acc_t fp_top = (K > 1 && top != t) ? pfp[top * K + t] : acc_t(0);
          for (int64_t j = 0; j < K; ++j) {
            const acc_t h = std::exp(zv(j) - lse);
            acc_t gj = fnt * h - h * R + fp_top * h;
            if (j != t && j != top) gj += pfp[j * K + t] * h / (1 - h);
            if (j != top && fp_top != 0) gj -= fp_top * std::exp(zv(j) - lse_o);
            if (j == t) gj -= fnt;
            gr[j] = static_cast<scalar_t>(gj);
          }
        }
      }
    });
  });
  return {loss, logp, grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_margin, m) {
  // Log potentials F, G [N, K] (scaled by 1/eps) after n_iter iterations (tol <= 0: none)
  // and, with plan, the plans [N, K, K] (else an empty tensor); a, b, cost share a float
  // dtype; an all-zero a or b gives F = G = -inf and a zero plan.
  m.def("sinkhorn_potentials(Tensor a, Tensor b, Tensor cost, float eps, int n_iter, float tol, "
        "bool plan) -> (Tensor, Tensor, Tensor)");
  m.def("sinkhorn_plan(Tensor f, Tensor g, Tensor cost, float eps) -> Tensor");
  m.def("sinkhorn_cost(Tensor f, Tensor g, Tensor cost, float eps, bool entropic) -> Tensor");
  // per-row loss, nll (WCE) / log h_t (CRWWCE) in float32 for half logits (else the
  // logits' dtype), and dloss/dlogits for a unit upstream gradient in the logits' dtype
  m.def("wce_fwd(Tensor logits, Tensor labels, Tensor weight, int ignore_index, bool need_grad) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("crwwce_fwd(Tensor logits, Tensor labels, Tensor fn_weight, Tensor fp_weight, "
        "int ignore_index, bool need_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fused_margin, CPU, m) {
  m.impl("sinkhorn_potentials", &sinkhorn_potentials);
  m.impl("sinkhorn_plan", &sinkhorn_plan);
  m.impl("sinkhorn_cost", &sinkhorn_cost);
  m.impl("wce_fwd", &wce_fwd);
  m.impl("crwwce_fwd", &crwwce_fwd);
}

}  // namespace fused_margin

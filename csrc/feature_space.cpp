// Feature-space losses on the CPU without N x N (or N^3) intermediates: soft
// nearest neighbour, triplet mining (semi-hard, batch-hard, all), the k-NN
// neighbour selection behind knn_std / sigma^2R, and the centre losses.
//
// Pairwise distances are produced a block of `block` rows at a time: in one
// parallel region over row blocks, each thread's ATen GEMM writes x[rows] @ x^T
// into its own [block, N] scratch, a row loop turns it into distances by the
// reference's expansion ||a||^2 + ||b||^2 - 2 a.b (clamped at 0, self-distance
// exactly 0) and consumes each row at once: scratch is O(threads x block x N).
// - soft NN: per row two log-sum-exps (same class, all others); forward saves
//   them ([N] each), backward recomputes the block, overwrites it with
//   A_ij = g_i (p_same_ij - p_all_ij) / T and applies the Jacobian of the
//   expansion with two GEMMs (A @ x, A^T @ x[rows]) plus row/column sums.
// - triplet: per anchor the mining is a sweep over its row. Semi-hard sorts the
//   anchor's positives (few) and sweeps its negatives once, a binary search per
//   negative plus a suffix minimum giving each positive its closest strictly
//   farther negative (an anchor without any negative, in a single-class batch,
//   takes its self-distance: TF-Addons' row minimum); batch-hard is an
//   arg-max/arg-min; "all" sorts both sets and counts per (a, p) the negatives
//   with a positive term (binary search + prefix sums) and per (a, n) the
//   positives, never forming the N^3 terms
//   unless reduction="none" asks for them. Forward saves index lists only
//   (O(#pairs)); backward scatters the distance gradients over pair lists
//   (a, b, weight) with thread-private accumulators.
// - k-NN: per row a running sorted top-k over same-class samples on exact
//   squared differences (ties to the lower index); only indices come back, the
//   O(N k D) std math stays in PyTorch.
// - NaN: clamps and relus keep a NaN, arg-extrema prefer it (as torch's),
//   semi-hard sorts it last, "all" gives a row holding one a NaN sum without
//   sorting it, k-NN ranks it as +inf: a NaN feature row gives a NaN loss as in
//   the reference, and no comparator ever sees an unordered value.
// - centre losses: per-sample terms; the contrastive denominator is swept over
//   blocks of centres (GEMM x @ C_blk^T into an [N, block] scratch), forward
//   saves own distance and denominator per row, backward recomputes the block.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "vec_math.h"

namespace fused_margin {
namespace {

enum Distance : int64_t { L2 = 0, SQUARED_L2 = 1, COSINE = 2 };


// NaN-propagating clamp at 0 and relu: `v > 0 ? v : 0` would turn a NaN into
// 0 and hide a NaN feature row; the reference's clamp_min / relu keep it.
template <typename T>
FM_INLINE T clamp0(T v) {
  return v < T(0) ? T(0) : v;
}

template <typename T>
FM_INLINE bool is_nan(T v) {
  return v != v;
}

// Soft NN forward, row i: Gram row -> logits -d_ij / T (-inf at j = i); returns
// their max, NaN if any logit is NaN (std::max and the simd max drop NaNs).
template <typename T>
FM_INLINE T snn_logits_t(T* row, int64_t i, int64_t n, const T* sq, T temp) {
  const T sqi = sq[i];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T raw = sqi + sq[j] - T(2) * row[j];
    row[j] = -clamp0(raw) / temp;
  }
  row[i] = -std::numeric_limits<T>::infinity();
  T mx = -std::numeric_limits<T>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    mx = std::max(mx, row[j]);
    nan |= row[j] != row[j];
  }
  return nan ? std::numeric_limits<T>::quiet_NaN() : mx;
}

template <typename T>
FM_INLINE T sum_exp_t(const T* row, int64_t n, T m) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += exp_any(row[j] - m);
  return acc;
}

// Soft NN backward, row i: Gram row -> c_all * p_all_ij where the clamp passes
// the gradient (raw >= 0), 0 elsewhere and at j = i; returns the row sum.
template <typename T>
FM_INLINE T snn_grad_row_t(T* row, int64_t i, int64_t n, const T* sq, T temp, T lse_all,
                           T c_all) {
  const T sqi = sq[i];
  T rs = 0;
#pragma omp simd reduction(+ : rs)
  for (int64_t j = 0; j < n; ++j) {
    const T raw = sqi + sq[j] - T(2) * row[j];
    // the diagonal is constant (and exp(-lse_all) may overflow there)
    const T v = (raw >= 0 && j != i) ? c_all * exp_any(-raw / temp - lse_all) : T(0);
    row[j] = v;
    rs += v;
  }
  return rs;
}

FM_CLONES float snn_logits_f32(float* row, int64_t i, int64_t n, const float* sq, float temp) {
  return snn_logits_t<float>(row, i, n, sq, temp);
}
FM_CLONES float sum_exp_f32(const float* row, int64_t n, float m) {
  return sum_exp_t<float>(row, n, m);
}
FM_CLONES float snn_grad_row_f32(float* row, int64_t i, int64_t n, const float* sq, float temp,
                                 float lse_all, float c_all) {
  return snn_grad_row_t<float>(row, i, n, sq, temp, lse_all, c_all);
}

template <typename T>
T snn_logits(T* row, int64_t i, int64_t n, const T* sq, T temp) {
  if constexpr (std::is_same_v<T, float>) return snn_logits_f32(row, i, n, sq, temp);
  return snn_logits_t<T>(row, i, n, sq, temp);
}
template <typename T>
T sum_exp(const T* row, int64_t n, T m) {
  if constexpr (std::is_same_v<T, float>) return sum_exp_f32(row, n, m);
  return sum_exp_t<T>(row, n, m);
}
template <typename T>
T snn_grad_row(T* row, int64_t i, int64_t n, const T* sq, T temp, T lse_all, T c_all) {
  if constexpr (std::is_same_v<T, float>)
    return snn_grad_row_f32(row, i, n, sq, temp, lse_all, c_all);
  return snn_grad_row_t<T>(row, i, n, sq, temp, lse_all, c_all);
}

// Triplet backward: pairs [s, e) of (a, b, w), adding w * d dist(a, b) / dx
// into g (one thread's accumulator). For cosine the gradient is w.r.t. u = x /
// ||x|| scaled by 1/||x_i|| (the normalisation Jacobian is applied later).
template <typename T>
FM_INLINE void pair_grad_t(const T* x, const T* sq, const T* inv, const int64_t* a,
                           const int64_t* b, const T* w, int64_t s, int64_t e, int64_t d,
                           int64_t distance, T* g) {
  for (int64_t t = s; t < e; ++t) {
    const T wt = w[t];
    const int64_t i = a[t], j = b[t];
    if (wt == T(0) || i == j) continue;  // self-distances are constant
    const T *xi = x + i * d, *xj = x + j * d;
    T *gi = g + i * d, *gj = g + j * d;
    if (distance == COSINE) {
      const T ci = -wt * inv[i] * inv[j];
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) {
        gi[k] += ci * xj[k];
        gj[k] += ci * xi[k];
      }
      continue;
    }
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t k = 0; k < d; ++k) dot += xi[k] * xj[k];
    const T raw = sq[i] + sq[j] - T(2) * dot;
    T c;
    if (distance == SQUARED_L2) {
      if (raw < 0) continue;  // clamp_min's gradient mask
      c = T(2) * wt;
    } else {
      if (!(raw > 0)) continue;  // safe sqrt
      c = wt / std::sqrt(raw);
    }
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) {
      const T diff = c * (xi[k] - xj[k]);
      gi[k] += diff;
      gj[k] -= diff;
    }
  }
}

FM_CLONES void pair_grad_f32(const float* x, const float* sq, const float* inv, const int64_t* a,
                             const int64_t* b, const float* w, int64_t s, int64_t e, int64_t d,
                             int64_t distance, float* g) {
  pair_grad_t<float>(x, sq, inv, a, b, w, s, e, d, distance, g);
}

template <typename T>
void pair_grad(const T* x, const T* sq, const T* inv, const int64_t* a, const int64_t* b,
               const T* w, int64_t s, int64_t e, int64_t d, int64_t distance, T* g) {
  if constexpr (std::is_same_v<T, float>)
    return pair_grad_f32(x, sq, inv, a, b, w, s, e, d, distance, g);
  pair_grad_t<T>(x, sq, inv, a, b, w, s, e, d, distance, g);
}

void check_inputs(const at::Tensor& x, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": expected 2-D features, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": expected float32 or float64 features (half types are upcast in Python), got ",
              x.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), op, ": labels must be [N] with N = ",
              x.size(0), ", got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64");
  TORCH_CHECK(x.device().is_cpu() && labels.device().is_cpu(), op, ": expected CPU tensors");
}

void check_distance(int64_t distance) {
  TORCH_CHECK(distance >= L2 && distance <= COSINE, "unknown distance code ", distance);
}

// Dense class ids and the members of each class in index order.
struct Classes {
  std::vector<int64_t> id;                    // [N] dense class of each sample
  std::vector<std::vector<int64_t>> members;  // per dense class, ascending indices
  std::unordered_map<int64_t, int64_t> dense; // label -> dense id

  explicit Classes(const at::Tensor& labels) {
    auto y = labels.contiguous();
    const int64_t* py = y.data_ptr<int64_t>();
    const int64_t n = y.numel();
    id.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      auto it = dense.find(py[i]);
      if (it == dense.end()) {
        it = dense.emplace(py[i], int64_t(members.size())).first;
        members.emplace_back();
      }
      id[i] = it->second;
      members[it->second].push_back(i);
    }
  }
  int64_t size_of(int64_t i) const { return int64_t(members[id[i]].size()); }
};

// Per-row inputs of the expansion: ||x_i||^2 and, for cosine, 1/||x_i|| (0 for
// a zero row, as the reference's guarded rsqrt).
template <typename T>
void row_stats(const T* x, int64_t n, int64_t d, std::vector<T>& sq, std::vector<T>& inv) {
  sq.assign(n, T(0));
  inv.assign(n, T(0));
  at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T acc = 0;
      const T* r = x + i * d;
      for (int64_t k = 0; k < d; ++k) acc += r[k] * r[k];
      sq[i] = acc;
      inv[i] = acc > 0 ? T(1) / std::sqrt(acc) : T(0);
    }
  });
}

// Turns row i of the Gram block into distances (in place).
template <typename T>
inline void gram_to_distance(T* row, int64_t i, int64_t n, int64_t distance, const T* sq,
                             const T* inv) {
  if (distance == COSINE) {
    for (int64_t j = 0; j < n; ++j) row[j] = T(1) - inv[i] * inv[j] * row[j];
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const T raw = sq[i] + sq[j] - T(2) * row[j];
    row[j] = clamp0(raw);
  }
  row[i] = 0;
  if (distance == L2)  // 0 and NaN stay as they are
    for (int64_t j = 0; j < n; ++j) row[j] = row[j] > 0 ? std::sqrt(row[j]) : row[j];
}

// Rows per block: at most `block`, and few enough that every thread gets one.
inline int64_t row_block(int64_t block, int64_t n) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t share = std::max<int64_t>(8, (n + threads - 1) / threads);
  return std::max<int64_t>(1, std::min({block, n, share}));
}

// Calls fn(i, row) for every row i of the [N, N] Gram matrix x x^T. One
// parallel region over blocks of rows, each thread running its own (serial)
// GEMM per block into its own [block, N] scratch: one fork/join per call, which
// matters on a loaded machine where every barrier waits for a descheduled thread.
template <typename T, typename Fn>
void for_gram_rows(const at::Tensor& x, int64_t block, Fn fn) {
  const int64_t n = x.size(0);
  if (n == 0) return;
  block = row_block(block, n);
  const int64_t nb = (n + block - 1) / block;
  // worker threads do not inherit the caller's grad mode: no autograd inside
  auto xd = x.detach();
  auto xt = xd.t();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    auto buf = at::empty({block, n}, x.options());
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t r0 = bi * block, rows = std::min(block, n - r0);
      auto g = buf.narrow(0, 0, rows);
      at::mm_out(g, xd.narrow(0, r0, rows), xt);
      T* pg = g.data_ptr<T>();
      for (int64_t r = 0; r < rows; ++r) fn(r0 + r, pg + r * n);
    }
  });
}

// ------------------------------------------------------------ soft NN

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> snn_fwd(const at::Tensor& x_,
                                                                   const at::Tensor& labels,
                                                                   double temperature,
                                                                   int64_t block) {
  check_inputs(x_, labels, "snn_fwd");
  TORCH_CHECK(temperature > 0, "snn_fwd: temperature must be > 0");
  auto x = x_.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  auto per = at::zeros({n}, x.options());
  auto lse_all = at::zeros({n}, x.options());
  auto lse_same = at::zeros({n}, x.options());
  auto has = at::zeros({n}, x.options().dtype(at::kBool));
  Classes cls(labels);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "snn_fwd", [&] {
    using T = scalar_t;
    std::vector<T> sq, inv;
    row_stats(x.data_ptr<T>(), n, d, sq, inv);
    T* pper = per.data_ptr<T>();
    T* pla = lse_all.data_ptr<T>();
    T* pls = lse_same.data_ptr<T>();
    bool* ph = has.data_ptr<bool>();
    const T temp = T(temperature);
    const T ninf = -std::numeric_limits<T>::infinity();
    for_gram_rows<T>(x, block, [&](int64_t i, T* row) {
      if (cls.size_of(i) < 2) return;  // no partner: l_i undefined, left at 0
      const T m_all = snn_logits(row, i, n, sq.data(), temp);
      const T s_all = sum_exp(row, n, m_all);
      // the same-class sum by its own maximum: it may lie far below the overall one
      const auto& mem = cls.members[cls.id[i]];
      T m_same = ninf, s_same = 0;
      for (int64_t j : mem) m_same = std::max(m_same, row[j]);  // row[i] is -inf
      for (int64_t j : mem) s_same += exp_any(row[j] - m_same);
      pla[i] = m_all + std::log(s_all);
      pls[i] = m_same + std::log(s_same);
      pper[i] = pla[i] - pls[i];
      ph[i] = true;
    });
  });
  return {per, lse_all, lse_same, has};
}

at::Tensor snn_bwd(const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& labels,
                   const at::Tensor& lse_all_, const at::Tensor& lse_same_, double temperature,
                   int64_t block) {
  check_inputs(x_, labels, "snn_bwd");
  auto x = x_.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(grad_.numel() == n && lse_all_.numel() == n && lse_same_.numel() == n,
              "snn_bwd: per-row tensors must have N entries");
  auto grad = grad_.to(x.scalar_type()).contiguous();
  auto lse_all = lse_all_.to(x.scalar_type()).contiguous();
  auto lse_same = lse_same_.to(x.scalar_type()).contiguous();
  auto gx = at::zeros_like(x);
  if (n == 0) return gx;
  x = x.detach();  // worker threads do not inherit the caller's grad mode
  Classes cls(labels);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "snn_bwd", [&] {
    using T = scalar_t;
    std::vector<T> sq, inv;
    row_stats(x.data_ptr<T>(), n, d, sq, inv);
    const T* pg = grad.data_ptr<T>();
    const T* pla = lse_all.data_ptr<T>();
    const T* pls = lse_same.data_ptr<T>();
    const T temp = T(temperature);
    // one region over row blocks (see for_gram_rows); per thread: gx, and
    // rowsum + colsum of A for the diagonal part of the Jacobian
    const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
    auto acc = at::zeros({nthreads, n, d}, x.options());
    auto diag = at::zeros({nthreads, n}, x.options());
    const int64_t blk = row_block(block, n);
    const int64_t nb = (n + blk - 1) / blk;
    auto xt = x.t();
    at::parallel_for(0, nb, 1, [&](int64_t bb, int64_t be) {
      const int64_t tid = at::get_thread_num();
      auto gxt = acc.select(0, tid);
      auto dgt = diag.select(0, tid);
      T* pdiag = dgt.data_ptr<T>();
      auto buf = at::empty({blk, n}, x.options());
      std::vector<T> same;
      for (int64_t bi = bb; bi < be; ++bi) {
        const int64_t r0 = bi * blk, rows = std::min(blk, n - r0);
        auto a = buf.narrow(0, 0, rows);
        at::mm_out(a, x.narrow(0, r0, rows), xt);
        T* pa = a.data_ptr<T>();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = r0 + r;
          T* row = pa + r * n;
          const T gi = pg[i];
          if (cls.size_of(i) < 2 || gi == T(0)) {
            std::fill(row, row + n, T(0));
            continue;
          }
          // same-class terms first, while the row still holds the Gram values
          const auto& mem = cls.members[cls.id[i]];
          same.clear();
          for (int64_t j : mem) {
            const T raw = sq[i] + sq[j] - T(2) * row[j];
            same.push_back(j != i && raw >= 0 ? gi / temp * exp_any(-raw / temp - pls[i]) : T(0));
          }
          T rs = snn_grad_row(row, i, n, sq.data(), temp, pla[i], -gi / temp);
          for (size_t k = 0; k < mem.size(); ++k) {
            row[mem[k]] += same[k];
            rs += same[k];
          }
          pdiag[i] += rs;
        }
        // d raw_ij = 2 (x_i - x_j) . dx_i + 2 (x_j - x_i) . dx_j
        gxt.narrow(0, r0, rows).addmm_(a, x, 1, -2);
        gxt.addmm_(a.t(), x.narrow(0, r0, rows), 1, -2);
        dgt.add_(a.sum(0));
      }
    });
    gx = nthreads == 1 ? acc.select(0, 0) : acc.sum(0);
    gx.add_(x * diag.sum(0).unsqueeze(1), 2);
  });
  return gx;
}

// ------------------------------------------------------------ triplet

// Row-major offsets of per-anchor outputs: count(i) entries for anchor i.
template <typename Count>
std::vector<int64_t> offsets(int64_t n, Count count) {
  std::vector<int64_t> off(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) off[i + 1] = off[i] + count(i);
  return off;
}

// Number of entries of the ascending v[0, len) below key: a branch-free lower
// bound (one conditional move per halving), the semi-hard sweep's hot loop.
template <typename T>
inline int64_t count_less(const T* v, int64_t len, T key) {
  if (len == 0) return 0;
  const T* base = v;
  while (len > 1) {
    const int64_t half = len / 2;
    base = base[half - 1] < key ? base + half : base;
    len -= half;
  }
  return (base - v) + (*base < key ? 1 : 0);
}

template <typename T>
struct Cand {
  T d;
  int64_t idx;
};

// (a, p, n) of the semi-hard triplets and their terms, pairs in row-major (a, p) order.
std::vector<at::Tensor> triplet_semihard_fwd(const at::Tensor& x_, const at::Tensor& labels,
                                             double margin, int64_t distance, int64_t block) {
  check_inputs(x_, labels, "triplet_semihard_fwd");
  check_distance(distance);
  auto x = x_.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  Classes cls(labels);
  // every positive pair, also those of an anchor without negatives (TF-Addons)
  auto off = offsets(n, [&](int64_t i) { return cls.size_of(i) - 1; });
  const int64_t total = off[n];
  auto per = at::empty({total}, x.options());
  auto ia = at::empty({total}, labels.options());
  auto ip = at::empty({total}, labels.options());
  auto in = at::empty({total}, labels.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "triplet_semihard_fwd", [&] {
    using T = scalar_t;
    std::vector<T> sq, inv;
    row_stats(x.data_ptr<T>(), n, d, sq, inv);
    T* pper = per.data_ptr<T>();
    int64_t *pa = ia.data_ptr<int64_t>(), *pp = ip.data_ptr<int64_t>(), *pn = in.data_ptr<int64_t>();
    const T m = T(margin);
    for_gram_rows<T>(x, block, [&](int64_t i, T* row) {
      if (off[i + 1] == off[i]) return;
      gram_to_distance(row, i, n, distance, sq.data(), inv.data());
      const int64_t ci = cls.id[i];
      // positives by distance; slot = position in row-major (a, p) order
      std::vector<Cand<T>> pos;  // d, slot
      std::vector<int64_t> pidx;
      int64_t slot = 0;
      for (int64_t p : cls.members[ci]) {
        if (p == i) continue;
        pos.push_back({row[p], slot++});
        pidx.push_back(p);
      }
      // NaN distances last: `<` alone is no strict weak order with NaNs
      std::sort(pos.begin(), pos.end(), [](const Cand<T>& u, const Cand<T>& v) {
        return u.d < v.d || (is_nan(v.d) && !is_nan(u.d));
      });
      std::vector<T> pd(pos.size());
      for (size_t r = 0; r < pos.size(); ++r) pd[r] = pos[r].d;
      // best[r]: the closest negative farther than exactly the r + 1 nearest positives
      std::vector<Cand<T>> best(pos.size(), Cand<T>{T(0), -1});
      // no negative at all (one class in the batch): TF-Addons' masked maximum
      // over an empty mask is the row minimum, the self-distance
      Cand<T> far{row[i], i};
      bool have_neg = false;
      for (int64_t j = 0; j < n; ++j) {
        if (cls.id[j] == ci) continue;
        const T dj = row[j];
        // ascending j: ties keep the lower index; the first NaN wins, as argmax's
        if (!have_neg || dj > far.d || (is_nan(dj) && !is_nan(far.d))) far = {dj, j};
        have_neg = true;
        // a NaN dj is farther than no positive: it is nobody's candidate
        const int64_t k = count_less(pd.data(), int64_t(pd.size()), dj);
        if (k > 0) {
          Cand<T>& b = best[k - 1];
          if (b.idx < 0 || dj < b.d) b = {dj, j};
        }
      }
      // a negative beyond the k nearest positives also serves every nearer one
      for (int64_t r = int64_t(best.size()) - 2; r >= 0; --r) {
        const Cand<T>& nxt = best[r + 1];
        Cand<T>& cur = best[r];
        if (nxt.idx >= 0 &&
            (cur.idx < 0 || nxt.d < cur.d || (nxt.d == cur.d && nxt.idx < cur.idx)))
          cur = nxt;
      }
      for (size_t r = 0; r < pos.size(); ++r) {
        const Cand<T>& choice = best[r].idx >= 0 ? best[r] : far;
        const int64_t t = off[i] + pos[r].idx;
        pper[t] = clamp0((pos[r].d - choice.d) + m);
        pa[t] = i;
        pp[t] = pidx[pos[r].idx];
        pn[t] = choice.idx;
      }
    });
  });
  return {per, ia, ip, in};
}

// Batch-hard: per anchor the farthest positive and the closest negative.
std::vector<at::Tensor> triplet_hard_fwd(const at::Tensor& x_, const at::Tensor& labels,
                                         double margin, int64_t distance, int64_t block) {
  check_inputs(x_, labels, "triplet_hard_fwd");
  check_distance(distance);
  auto x = x_.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  Classes cls(labels);
  auto per = at::zeros({n}, x.options());
  auto valid = at::zeros({n}, x.options().dtype(at::kBool));
  auto ip = at::arange(n, labels.options());
  auto in = at::arange(n, labels.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "triplet_hard_fwd", [&] {
    using T = scalar_t;
    std::vector<T> sq, inv;
    row_stats(x.data_ptr<T>(), n, d, sq, inv);
    T* pper = per.data_ptr<T>();
    bool* pv = valid.data_ptr<bool>();
    int64_t *pp = ip.data_ptr<int64_t>(), *pn = in.data_ptr<int64_t>();
    const T m = T(margin);
    for_gram_rows<T>(x, block, [&](int64_t i, T* row) {
      const int64_t s = cls.size_of(i);
      if (s < 2 || s == n) return;
      gram_to_distance(row, i, n, distance, sq.data(), inv.data());
      const int64_t ci = cls.id[i];
      // the first NaN wins either arg-extremum, as torch's argmax / argmin
      int64_t bp = -1, bn = -1;
      for (int64_t j = 0; j < n; ++j) {
        const T dj = row[j];
        if (cls.id[j] == ci) {
          if (j != i && (bp < 0 || dj > row[bp] || (is_nan(dj) && !is_nan(row[bp])))) bp = j;
        } else if (bn < 0 || dj < row[bn] || (is_nan(dj) && !is_nan(row[bn]))) {
          bn = j;
        }
      }
      pper[i] = clamp0((row[bp] - row[bn]) + m);
      pv[i] = true;
      pp[i] = bp;
      pn[i] = bn;
    });
  });
  return {per, valid, ip, in};
}

// Pair list layout of "all": per anchor with both sets, its positives then its
// negatives, each in index order.
std::vector<int64_t> all_pair_offsets(const Classes& cls, int64_t n) {
  return offsets(n, [&](int64_t i) {
    const int64_t s = cls.size_of(i);
    return (s >= 2 && s < n) ? n - 1 : int64_t(0);
  });
}

// "all" mining. terms=true: the [T] terms in (a, p, n) lexicographic order.
// terms=false: stats = [sum of terms, number of terms > 0] (float64) and the
// pairs (a, j) with integer weights: for a positive j the number of negatives
// with a positive term, for a negative j minus the number of such positives,
// i.e. d(sum of terms) = sum_pairs weight * d(dist_aj).
std::vector<at::Tensor> triplet_all_fwd(const at::Tensor& x_, const at::Tensor& labels,
                                        double margin, int64_t distance, int64_t block, bool terms) {
  check_inputs(x_, labels, "triplet_all_fwd");
  check_distance(distance);
  auto x = x_.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  Classes cls(labels);
  std::vector<int64_t> off;
  if (terms)
    off = offsets(n, [&](int64_t i) {
      const int64_t s = cls.size_of(i);
      return (s - 1) * (n - s);
    });
  else
    off = all_pair_offsets(cls, n);
  const int64_t total = off[n];
  at::Tensor out, pa, pb, pw;
  std::vector<double> row_sum(n, 0.0), row_cnt(n, 0.0);
  if (terms) {
    out = at::empty({total}, x.options());
    pa = pb = pw = at::empty({0}, labels.options());
  } else {
    pa = at::empty({total}, labels.options());
    pb = at::empty({total}, labels.options());
    pw = at::empty({total}, labels.options());
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "triplet_all_fwd", [&] {
    using T = scalar_t;
    std::vector<T> sq, inv;
    row_stats(x.data_ptr<T>(), n, d, sq, inv);
    const T m = T(margin);
    for_gram_rows<T>(x, block, [&](int64_t i, T* row) {
      if (off[i + 1] == off[i]) return;
      gram_to_distance(row, i, n, distance, sq.data(), inv.data());
      const int64_t ci = cls.id[i];
      std::vector<int64_t> pos, neg;
      for (int64_t j = 0; j < n; ++j) {
        if (cls.id[j] != ci) neg.push_back(j);
        else if (j != i) pos.push_back(j);
      }
      if (terms) {
        T* po = out.data_ptr<T>() + off[i];
        for (int64_t p : pos)
          for (int64_t q : neg) *po++ = clamp0((row[p] - row[q]) + m);
        return;
      }
      int64_t* ppa = pa.data_ptr<int64_t>() + off[i];
      int64_t* ppb = pb.data_ptr<int64_t>() + off[i];
      int64_t* ppw = pw.data_ptr<int64_t>() + off[i];
      bool nan = false;
      for (int64_t j = 0; j < n; ++j) nan = nan || is_nan(row[j]);
      if (nan) {
        // a NaN term makes the sum NaN, as in the reference; NaNs cannot be
        // sorted, and the gradient of a NaN loss is not defined: weights 0
        for (const auto* set : {&pos, &neg})
          for (int64_t j : *set) {
            *ppa++ = i;
            *ppb++ = j;
            *ppw++ = 0;
          }
        row_sum[i] = std::numeric_limits<double>::quiet_NaN();
        return;
      }
      // the term (d_ap - d_an) + m is monotone in each distance, so the set
      // with a positive term is a prefix of the sorted negatives (for a
      // positive) and a suffix of the sorted positives (for a negative)
      std::vector<T> nd(neg.size()), pdist(pos.size());
      for (size_t k = 0; k < neg.size(); ++k) nd[k] = row[neg[k]];
      for (size_t k = 0; k < pos.size(); ++k) pdist[k] = row[pos[k]];
      std::sort(nd.begin(), nd.end());
      std::sort(pdist.begin(), pdist.end());
      std::vector<double> prefix(nd.size() + 1, 0.0);
      for (size_t k = 0; k < nd.size(); ++k) prefix[k + 1] = prefix[k] + double(nd[k]);
      double s = 0.0, c = 0.0;
      for (int64_t p : pos) {
        const T dp = row[p];
        const int64_t cnt = std::partition_point(nd.begin(), nd.end(),
                                                 [&](T dn) { return (dp - dn) + m > 0; }) -
                            nd.begin();
        s += double(cnt) * (double(dp) + double(m)) - prefix[cnt];
        c += double(cnt);
        *ppa++ = i;
        *ppb++ = p;
        *ppw++ = cnt;
      }
      for (int64_t q : neg) {
        const T dn = row[q];
        const int64_t below = std::partition_point(pdist.begin(), pdist.end(),
                                                   [&](T dp) { return !((dp - dn) + m > 0); }) -
                              pdist.begin();
        *ppa++ = i;
        *ppb++ = q;
        *ppw++ = -(int64_t(pdist.size()) - below);
      }
      row_sum[i] = s;
      row_cnt[i] = c;
    });
  });
  if (!terms) {
    double s = 0.0, c = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      s += row_sum[i];
      c += row_cnt[i];
    }
    out = at::tensor({s, c}, x.options().dtype(at::kDouble));
  }
  return {out, pa, pb, pw};
}

// Backward of "all" with reduction="none": per-term weights w [T] (upstream
// gradient where the term is > 0) folded into the pair list of all_pair_offsets.
std::vector<at::Tensor> triplet_all_term_pairs(const at::Tensor& w_, const at::Tensor& labels) {
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong,
              "triplet_all_term_pairs: labels must be int64 [N]");
  auto w = w_.contiguous();
  const int64_t n = labels.size(0);
  Classes cls(labels);
  auto toff = offsets(n, [&](int64_t i) {
    const int64_t s = cls.size_of(i);
    return (s - 1) * (n - s);
  });
  TORCH_CHECK(w.dim() == 1 && w.size(0) == toff[n], "triplet_all_term_pairs: expected ", toff[n],
              " term weights, got ", w.sizes());
  auto off = all_pair_offsets(cls, n);
  auto pa = at::empty({off[n]}, labels.options());
  auto pb = at::empty({off[n]}, labels.options());
  auto pw = at::zeros({off[n]}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "triplet_all_term_pairs", [&] {
    using T = scalar_t;
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (off[i + 1] == off[i]) continue;
        const int64_t ci = cls.id[i];
        const int64_t npos = cls.size_of(i) - 1;
        const T* pt = w.data_ptr<T>() + toff[i];
        int64_t* ppa = pa.data_ptr<int64_t>() + off[i];
        int64_t* ppb = pb.data_ptr<int64_t>() + off[i];
        T* ppw = pw.data_ptr<T>() + off[i];
        int64_t k = 0;
        for (int64_t j = 0; j < n; ++j)
          if (cls.id[j] == ci && j != i) ppb[k++] = j;
        for (int64_t j = 0; j < n; ++j)
          if (cls.id[j] != ci) ppb[k++] = j;
        const int64_t nneg = k - npos;
        for (int64_t q = 0; q < k; ++q) ppa[q] = i;
        for (int64_t p = 0; p < npos; ++p)
          for (int64_t q = 0; q < nneg; ++q) {
            const T v = pt[p * nneg + q];
            ppw[p] += v;
            ppw[npos + q] -= v;
          }
      }
    });
  });
  return {pa, pb, pw};
}

// dL/dx for L = sum_t w_t dist(x_{a_t}, x_{b_t}), the distance derivative
// recomputed per pair from one dot product (expansion, clamp, safe sqrt, and
// for cosine the normalisation Jacobian applied once at the end).
at::Tensor triplet_pair_grad(const at::Tensor& x_, const at::Tensor& pa_, const at::Tensor& pb_,
                             const at::Tensor& pw_, int64_t distance) {
  TORCH_CHECK(x_.dim() == 2, "triplet_pair_grad: expected 2-D features");
  check_distance(distance);
  auto x = x_.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  auto pa = pa_.contiguous(), pb = pb_.contiguous();
  auto pw = pw_.to(x.scalar_type()).contiguous();
  const int64_t np = pa.numel();
  TORCH_CHECK(pb.numel() == np && pw.numel() == np, "triplet_pair_grad: pair lists disagree");
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  auto acc = at::zeros({nthreads, n, d}, x.options());
  at::Tensor gx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "triplet_pair_grad", [&] {
    using T = scalar_t;
    std::vector<T> sq, inv;
    const T* px = x.data_ptr<T>();
    row_stats(px, n, d, sq, inv);
    const int64_t *a = pa.data_ptr<int64_t>(), *b = pb.data_ptr<int64_t>();
    const T* w = pw.data_ptr<T>();
    T* pacc = acc.data_ptr<T>();
    at::parallel_for(0, np, 2048, [&](int64_t s, int64_t e) {
      for (int64_t t = s; t < e; ++t)
        TORCH_CHECK(a[t] >= 0 && a[t] < n && b[t] >= 0 && b[t] < n,
                    "triplet_pair_grad: index out of range");
      pair_grad<T>(px, sq.data(), inv.data(), a, b, w, s, e, d, distance,
                   pacc + int64_t(at::get_thread_num()) * n * d);
    });
    gx = acc.sum(0);
    if (distance == COSINE) {
      // g_u was formed as -w inv_i inv_j x_j (= -w inv_i u_j); with u = inv x,
      // dL/dx = inv (g_u - (g_u . u) u) = g' - inv^2 (g' . x) x, g' = the above
      auto invt = at::from_blob(inv.data(), {n}, x.options()).clone();
      auto proj = (gx * x).sum(1) * invt * invt;
      gx = gx - proj.unsqueeze(1) * x;
    }
  });
  return gx;
}

// ------------------------------------------------------------ k-NN

// Per query row the k nearest allowed samples on exact squared differences,
// ties to the lower index; valid[r, s] = slot s holds one.
template <typename T>
void knn_rows(const T* q, int64_t nq, const T* x, int64_t d, int64_t k,
              const std::vector<const std::vector<int64_t>*>& cand, const int64_t* skip,
              int64_t* idx, bool* valid) {
  at::parallel_for(0, nq, 4, [&](int64_t b, int64_t e) {
    std::vector<Cand<T>> top;
    for (int64_t r = b; r < e; ++r) {
      top.clear();
      const T* qr = q + r * d;
      if (cand[r] != nullptr) {
        for (int64_t j : *cand[r]) {
          if (skip != nullptr && j == skip[r]) continue;
          const T* xj = x + j * d;
          T s = 0;
          for (int64_t c = 0; c < d; ++c) {
            const T diff = qr[c] - xj[c];
            s += diff * diff;
          }
          // a NaN ranks as +inf (the reference's rule): `<` cannot order it
          if (is_nan(s)) s = std::numeric_limits<T>::infinity();
          if (int64_t(top.size()) == k && !(s < top.back().d)) continue;
          // after equal distances: candidates come in index order
          auto where = std::upper_bound(top.begin(), top.end(), s,
                                     [](T v, const Cand<T>& u) { return v < u.d; });
          top.insert(where, Cand<T>{s, j});
          if (int64_t(top.size()) > k) top.pop_back();
        }
      }
      for (int64_t s = 0; s < k; ++s) {
        const bool have = s < int64_t(top.size());
        idx[r * k + s] = have ? top[s].idx : 0;
        valid[r * k + s] = have;
      }
    }
  });
}

std::vector<at::Tensor> knn_select(const at::Tensor& x_, const at::Tensor& labels,
                                   const at::Tensor& c_, int64_t n_neighbors) {
  check_inputs(x_, labels, "knn_select");
  TORCH_CHECK(c_.dim() == 2 && c_.size(1) == x_.size(1) && c_.scalar_type() == x_.scalar_type(),
              "knn_select: centers must be [C, D] of the features' dtype");
  TORCH_CHECK(n_neighbors >= 1, "knn_select: n_neighbors must be >= 1");
  auto x = x_.contiguous(), c = c_.contiguous();
  const int64_t n = x.size(0), d = x.size(1), nc = c.size(0);
  const int64_t k = std::min(n_neighbors, n);
  Classes cls(labels);
  auto idx_x = at::empty({n, k}, labels.options());
  auto val_x = at::empty({n, k}, labels.options().dtype(at::kBool));
  auto idx_c = at::empty({nc, k}, labels.options());
  auto val_c = at::empty({nc, k}, labels.options().dtype(at::kBool));
  std::vector<const std::vector<int64_t>*> cand_x(n), cand_c(nc, nullptr);
  std::vector<int64_t> self(n);
  for (int64_t i = 0; i < n; ++i) {
    cand_x[i] = &cls.members[cls.id[i]];
    self[i] = i;
  }
  for (const auto& kv : cls.dense) {
    TORCH_CHECK(kv.first >= 0 && kv.first < nc, "knn_select: label ", kv.first,
                " out of range for ", nc, " centers");
    cand_c[kv.first] = &cls.members[kv.second];
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "knn_select", [&] {
    using T = scalar_t;
    knn_rows<T>(x.data_ptr<T>(), n, x.data_ptr<T>(), d, k, cand_x, self.data(),
                idx_x.data_ptr<int64_t>(), val_x.data_ptr<bool>());
    knn_rows<T>(c.data_ptr<T>(), nc, x.data_ptr<T>(), d, k, cand_c, nullptr,
                idx_c.data_ptr<int64_t>(), val_c.data_ptr<bool>());
  });
  return {idx_x, val_x, idx_c, val_c};
}

// ------------------------------------------------------------ centres

void check_centers(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& c,
                   const char* op) {
  check_inputs(x, labels, op);
  TORCH_CHECK(c.dim() == 2 && c.size(1) == x.size(1) && c.scalar_type() == x.scalar_type(), op,
              ": centers must be [C, D] of the features' dtype");
  if (labels.numel() > 0) {
    TORCH_CHECK(labels.min().item<int64_t>() >= 0 && labels.max().item<int64_t>() < c.size(0), op,
                ": labels out of range for ", c.size(0), " centers");
  }
}

// own_i = ||x_i - c_{y_i}||^2 from explicit differences, as the reference.
template <typename T>
void own_dists(const T* x, const T* c, const int64_t* y, int64_t n, int64_t d, T* own) {
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T *xi = x + i * d, *ci = c + y[i] * d;
      T acc = 0;
      for (int64_t k = 0; k < d; ++k) acc += (xi[k] - ci[k]) * (xi[k] - ci[k]);
      own[i] = acc;
    }
  });
}

// out_i += sum over the other classes' centres j != y_i of f(v_ij), v_ij the
// clamped expanded squared distance ||x_i||^2 + ||c_j||^2 - 2 x_i.c_j, swept over
// blocks of `block` centres (mm_out into a scratch [N, block]).
template <typename T, typename F>
void sum_over_other_centers(const at::Tensor& x, const at::Tensor& c, const int64_t* y,
                            int64_t block, T* out, F f) {
  const int64_t n = x.size(0), d = x.size(1), nc = c.size(0);
  if (n == 0 || nc == 0) return;
  std::vector<T> sq, inv, csq, cinv;
  row_stats(x.data_ptr<T>(), n, d, sq, inv);
  row_stats(c.data_ptr<T>(), nc, d, csq, cinv);
  auto buf = at::empty({n, block}, x.options());
  for (int64_t c0 = 0; c0 < nc; c0 += block) {
    const int64_t cb = std::min(block, nc - c0);
    auto g = buf.narrow(1, 0, cb).contiguous();
    at::mm_out(g, x, c.narrow(0, c0, cb).t());
    const T* pg = g.data_ptr<T>();
    at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        T acc = 0;
        for (int64_t j = 0; j < cb; ++j) {
          if (c0 + j == y[i]) continue;
          acc += f(clamp0(sq[i] + csq[c0 + j] - T(2) * pg[i * cb + j]));
        }
        out[i] += acc;
      }
    });
  }
}

// The backward of sum_over_other_centers: with a_ij = f(i, raw_ij) where j != y_i
// and the clamp passes (raw_ij >= 0), else 0, adds d raw_ij = 2 (x_i - c_j) . dx_i
// + 2 (c_j - x_i) . dc_j weighted by a_ij into gx and gc, block by block.
template <typename T, typename F>
void scatter_over_other_centers(const at::Tensor& x, const at::Tensor& c, const int64_t* y,
                                int64_t block, at::Tensor& gx, at::Tensor& gc, F f) {
  const int64_t n = x.size(0), d = x.size(1), nc = c.size(0);
  std::vector<T> sq, inv, csq, cinv;
  row_stats(x.data_ptr<T>(), n, d, sq, inv);
  row_stats(c.data_ptr<T>(), nc, d, csq, cinv);
  auto rows = at::zeros({n}, x.options());
  T* prow = rows.data_ptr<T>();
  auto buf = at::empty({n, block}, x.options());
  for (int64_t c0 = 0; c0 < nc; c0 += block) {
    const int64_t cb = std::min(block, nc - c0);
    auto a = buf.narrow(1, 0, cb).contiguous();
    auto cblk = c.narrow(0, c0, cb);
    at::mm_out(a, x, cblk.t());
    T* pa = a.data_ptr<T>();
    at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        T rs = 0;
        for (int64_t j = 0; j < cb; ++j) {
          const T raw = sq[i] + csq[c0 + j] - T(2) * pa[i * cb + j];
          // the target column is masked out, the clamp passes raw >= 0
          const T v = (c0 + j != y[i] && raw >= 0) ? f(i, raw) : T(0);
          pa[i * cb + j] = v;
          rs += v;
        }
        prow[i] += rs;
      }
    });
    // d raw_ij = 2 (x_i - c_j) . dx_i + 2 (c_j - x_i) . dc_j
    gx.addmm_(a, cblk, 1, -2);
    auto gcb = gc.narrow(0, c0, cb);
    gcb.addmm_(a.t(), x, 1, -2);
    gcb.add_(cblk * a.sum(0).unsqueeze(1), 2);
  }
  gx.add_(x * rows.unsqueeze(1), 2);
}

// 0.5 ||x_i - c_{y_i}||^2 per sample.
at::Tensor center_fwd(const at::Tensor& x_, const at::Tensor& labels_, const at::Tensor& c_) {
  check_centers(x_, labels_, c_, "center_fwd");
  auto x = x_.contiguous(), c = c_.contiguous(), labels = labels_.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  auto per = at::empty({n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "center_fwd", [&] {
    own_dists<scalar_t>(x.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                        labels.data_ptr<int64_t>(), n, d, per.data_ptr<scalar_t>());
  });
  return per.mul_(0.5);
}

// x_i - c_{y_i} scaled by s_i into gx, and its negative summed per class into gc.
template <typename T>
void scatter_diff(const T* x, const T* c, const int64_t* y, const T* s, int64_t n, int64_t d,
                  T* gx, T* gc) {
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T *xi = x + i * d, *ci = c + y[i] * d;
      for (int64_t k = 0; k < d; ++k) gx[i * d + k] += s[i] * (xi[k] - ci[k]);
    }
  });
  // serial: classes collide
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    const T* ci = c + y[i] * d;
    T* gci = gc + y[i] * d;
    for (int64_t k = 0; k < d; ++k) gci[k] -= s[i] * (xi[k] - ci[k]);
  }
}

std::tuple<at::Tensor, at::Tensor> center_bwd(const at::Tensor& grad_, const at::Tensor& x_,
                                              const at::Tensor& labels_, const at::Tensor& c_) {
  check_centers(x_, labels_, c_, "center_bwd");
  auto x = x_.contiguous(), c = c_.contiguous(), labels = labels_.contiguous();
  TORCH_CHECK(grad_.numel() == x.size(0), "center_bwd: grad must have N entries");
  auto grad = grad_.to(x.scalar_type()).contiguous();
  auto gx = at::zeros_like(x), gc = at::zeros_like(c);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "center_bwd", [&] {
    using T = scalar_t;
    scatter_diff<T>(x.data_ptr<T>(), c.data_ptr<T>(), labels.data_ptr<int64_t>(),
                    grad.data_ptr<T>(), x.size(0), x.size(1), gx.data_ptr<T>(), gc.data_ptr<T>());
  });
  return {gx, gc};
}

// Contrastive centre: per_i = 0.5 own_i / (others_i + delta), others_i the sum
// of the clamped expanded distances to the other centres, swept over blocks of
// `block` centres (scratch [N, block]). Returns per, own, den = others + delta.
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_center_fwd(
    const at::Tensor& x_, const at::Tensor& labels_, const at::Tensor& c_, double delta,
    int64_t block) {
  check_centers(x_, labels_, c_, "contrastive_center_fwd");
  auto x = x_.contiguous(), c = c_.contiguous(), labels = labels_.contiguous();
  const int64_t n = x.size(0), d = x.size(1), nc = c.size(0);
  auto own = at::empty({n}, x.options());
  auto den = at::zeros({n}, x.options());
  block = std::max<int64_t>(1, std::min(block, std::max<int64_t>(nc, 1)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_center_fwd", [&] {
    using T = scalar_t;
    const int64_t* y = labels.data_ptr<int64_t>();
    own_dists<T>(x.data_ptr<T>(), c.data_ptr<T>(), y, n, d, own.data_ptr<T>());
    sum_over_other_centers<T>(x, c, y, block, den.data_ptr<T>(), [](T v) { return v; });
  });
  den.add_(delta);
  auto per = own * 0.5 / den;
  return {per, own, den};
}

std::tuple<at::Tensor, at::Tensor> contrastive_center_bwd(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& labels_,
    const at::Tensor& c_, const at::Tensor& own_, const at::Tensor& den_, int64_t block) {
  check_centers(x_, labels_, c_, "contrastive_center_bwd");
  auto x = x_.contiguous(), c = c_.contiguous(), labels = labels_.contiguous();
  const int64_t n = x.size(0), d = x.size(1), nc = c.size(0);
  TORCH_CHECK(grad_.numel() == n && own_.numel() == n && den_.numel() == n,
              "contrastive_center_bwd: per-row tensors must have N entries");
  auto grad = grad_.to(x.scalar_type()).contiguous();
  auto own = own_.to(x.scalar_type()).contiguous();
  auto den = den_.to(x.scalar_type()).contiguous();
  auto gx = at::zeros_like(x), gc = at::zeros_like(c);
  // d per / d own = 0.5 / den, d per / d others = -0.5 own / den^2
  auto q = (grad / den).contiguous();  // times 2 (x - c_y) * 0.5
  // (own / den) / den: den * den under- or overflows float32 for spreads past ~1e+-10
  auto h = (grad * (own / den) * -0.5 / den).contiguous();
  block = std::max<int64_t>(1, std::min(block, std::max<int64_t>(nc, 1)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_center_bwd", [&] {
    using T = scalar_t;
    const int64_t* y = labels.data_ptr<int64_t>();
    scatter_diff<T>(x.data_ptr<T>(), c.data_ptr<T>(), y, q.data_ptr<T>(), n, d,
                    gx.data_ptr<T>(), gc.data_ptr<T>());
    if (n == 0 || nc == 0) return;
    const T* ph = h.data_ptr<T>();
    scatter_over_other_centers<T>(x, c, y, block, gx, gc,
                                  [&](int64_t i, T) { return ph[i]; });
  });
  return {gx, gc};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_margin, m) {
  // soft nearest neighbour: per-row loss (0 without a partner), the two
  // log-sum-exps backward needs, and which rows have a same-class partner
  m.def("snn_fwd(Tensor x, Tensor labels, float temperature, int block) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("snn_bwd(Tensor grad, Tensor x, Tensor labels, Tensor lse_all, Tensor lse_same, "
        "float temperature, int block) -> Tensor");
  // triplet mining (distance: 0 l2, 1 squared_l2, 2 cosine)
  m.def("triplet_semihard_fwd(Tensor x, Tensor labels, float margin, int distance, int block) "
        "-> Tensor[]");
  m.def("triplet_hard_fwd(Tensor x, Tensor labels, float margin, int distance, int block) "
        "-> Tensor[]");
  m.def("triplet_all_fwd(Tensor x, Tensor labels, float margin, int distance, int block, "
        "bool terms) -> Tensor[]");
  m.def("triplet_all_term_pairs(Tensor w, Tensor labels) -> Tensor[]");
  m.def("triplet_pair_grad(Tensor x, Tensor a, Tensor b, Tensor w, int distance) -> Tensor");
  // k nearest same-class samples of each sample and each centre
  m.def("knn_select(Tensor x, Tensor labels, Tensor centers, int n_neighbors) -> Tensor[]");
  // centre losses: per-sample terms; the contrastive one also returns own and
  // den (= sum over the other centres + delta) for backward
  m.def("center_fwd(Tensor x, Tensor labels, Tensor centers) -> Tensor");
  m.def("center_bwd(Tensor grad, Tensor x, Tensor labels, Tensor centers) -> (Tensor, Tensor)");
  m.def("contrastive_center_fwd(Tensor x, Tensor labels, Tensor centers, float delta, int block) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("contrastive_center_bwd(Tensor grad, Tensor x, Tensor labels, Tensor centers, Tensor own, "
        "Tensor den, int block) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fused_margin, CPU, m) {
  m.impl("snn_fwd", &snn_fwd);
  m.impl("snn_bwd", &snn_bwd);
  m.impl("triplet_semihard_fwd", &triplet_semihard_fwd);
  m.impl("triplet_hard_fwd", &triplet_hard_fwd);
  m.impl("triplet_all_fwd", &triplet_all_fwd);
  m.impl("triplet_all_term_pairs", &triplet_all_term_pairs);
  m.impl("triplet_pair_grad", &triplet_pair_grad);
  m.impl("knn_select", &knn_select);
  m.impl("center_fwd", &center_fwd);
  m.impl("center_bwd", &center_bwd);
  m.impl("contrastive_center_fwd", &contrastive_center_fwd);
  m.impl("contrastive_center_bwd", &contrastive_center_bwd);
}

}  // namespace fused_margin

// ============================================================ Git, triplet-center, contrastive
// git_fwd / git_bwd: lambda_c 0.5 ||x_i - c_{y_i}||^2 (explicit differences) plus
// lambda_g sum_{j != y_i} 1 / (1 + d_ij), d_ij the clamped expansion, swept over
// blocks of `block` centres (scratch [N, block]); backward recomputes each block and
// applies v_ij = -lambda_g g_i / (1 + d_ij)^2 through the expansion's Jacobian.
// tcl_fwd: per row the nearest other centre on the same sweep (squared values: the
// square root is monotone; ties to the lower index; NaN ranks last) and its distance;
// the backward is O(N D) in Python from the saved index.
// contrastive_fwd / contrastive_bwd: per anchor the sum over partners b != a of
// d_ab (same class) or max(0, margin - d_ab) on the Gram row blocks (scratch
// [block, N] per thread); backward with S_ab = (g_a + g_b) dterm_ab/draw_ab, symmetric,
// so each thread's row block gives gx[rows] = 2 rowsum(S) x - 2 S x with no
// transposed accumulation.
namespace fused_margin {
namespace {

// d(distance)/d(raw squared distance) at the clamped value v and raw: 1 (squared,
// where the clamp passes) or 1 / (2 sqrt v) (l2, 0 at v = 0: the safe sqrt).
template <typename T>
FM_INLINE T ddist(T raw, T v, int64_t distance) {
  if (distance == SQUARED_L2) return raw >= T(0) ? T(1) : T(0);
  return v > T(0) ? T(0.5) / std::sqrt(v) : T(0);
}

template <typename T>
FM_INLINE T dist_of(T v, int64_t distance) {
  return distance == L2 ? (v > T(0) ? std::sqrt(v) : v) : v;
}

std::tuple<at::Tensor, at::Tensor> git_fwd(const at::Tensor& x_, const at::Tensor& labels_,
                                           const at::Tensor& c_, double lambda_c, double lambda_g,
                                           int64_t block) {
  check_centers(x_, labels_, c_, "git_fwd");
  auto x = x_.contiguous(), c = c_.contiguous(), labels = labels_.contiguous();
  const int64_t n = x.size(0), d = x.size(1), nc = c.size(0);
  auto own = at::empty({n}, x.options());
  auto push = at::zeros({n}, x.options());
  block = std::max<int64_t>(1, std::min(block, std::max<int64_t>(nc, 1)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "git_fwd", [&] {
    using T = scalar_t;
    const int64_t* y = labels.data_ptr<int64_t>();
    own_dists<T>(x.data_ptr<T>(), c.data_ptr<T>(), y, n, d, own.data_ptr<T>());
    sum_over_other_centers<T>(x, c, y, block, push.data_ptr<T>(),
                              [](T v) { return T(1) / (T(1) + v); });
  });
  auto per = own * (0.5 * lambda_c) + push * lambda_g;
  return {per, own};
}

std::tuple<at::Tensor, at::Tensor> git_bwd(const at::Tensor& grad_, const at::Tensor& x_,
                                           const at::Tensor& labels_, const at::Tensor& c_,
                                           double lambda_c, double lambda_g, int64_t block) {
  check_centers(x_, labels_, c_, "git_bwd");
  auto x = x_.contiguous(), c = c_.contiguous(), labels = labels_.contiguous();
  const int64_t n = x.size(0), d = x.size(1), nc = c.size(0);
  TORCH_CHECK(grad_.numel() == n, "git_bwd: grad must have N entries");
  auto grad = grad_.to(x.scalar_type()).contiguous();
  auto gx = at::zeros_like(x), gc = at::zeros_like(c);
  auto q = (grad * lambda_c).contiguous();  // d(0.5 lambda_c own) = lambda_c (x - c_y)
  block = std::max<int64_t>(1, std::min(block, std::max<int64_t>(nc, 1)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "git_bwd", [&] {
    using T = scalar_t;
    const int64_t* y = labels.data_ptr<int64_t>();
    scatter_diff<T>(x.data_ptr<T>(), c.data_ptr<T>(), y, q.data_ptr<T>(), n, d,
                    gx.data_ptr<T>(), gc.data_ptr<T>());
    if (n == 0 || nc == 0 || lambda_g == 0.0) return;
    const T* pgr = grad.data_ptr<T>();
    const T lg = T(lambda_g);
    scatter_over_other_centers<T>(x, c, y, block, gx, gc, [&](int64_t i, T raw) {
      const T den = T(1) + clamp0(raw);
      return -lg * pgr[i] / (den * den);
    });
  });
  return {gx, gc};
}

// Per row: own distance D(x_i, c_{y_i}) (explicit differences), the nearest other
// centre's index (-1 with one class) and its distance (expansion, clamped), the term.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tcl_fwd(
    const at::Tensor& x_, const at::Tensor& labels_, const at::Tensor& c_, double margin,
    int64_t distance, int64_t block) {
  check_centers(x_, labels_, c_, "tcl_fwd");
  TORCH_CHECK(distance == L2 || distance == SQUARED_L2, "tcl_fwd: distance must be l2 or squared_l2");
  auto x = x_.contiguous(), c = c_.contiguous(), labels = labels_.contiguous();
  const int64_t n = x.size(0), d = x.size(1), nc = c.size(0);
  auto own = at::empty({n}, x.options());
  auto near = at::zeros({n}, x.options());
  auto idx = at::full({n}, -1, labels.options());
  auto per = at::zeros({n}, x.options());
  block = std::max<int64_t>(1, std::min(block, std::max<int64_t>(nc, 1)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tcl_fwd", [&] {
    using T = scalar_t;
    const int64_t* y = labels.data_ptr<int64_t>();
    T* po = own.data_ptr<T>();
    own_dists<T>(x.data_ptr<T>(), c.data_ptr<T>(), y, n, d, po);
    std::vector<T> sq, inv, csq, cinv;
    row_stats(x.data_ptr<T>(), n, d, sq, inv);
    row_stats(c.data_ptr<T>(), nc, d, csq, cinv);
    std::vector<T> best(n, std::numeric_limits<T>::infinity());
    std::vector<T> bestv(n, std::numeric_limits<T>::quiet_NaN());
    int64_t* pi = idx.data_ptr<int64_t>();
    if (n > 0 && nc > 1) {
      auto buf = at::empty({n, block}, x.options());
      for (int64_t c0 = 0; c0 < nc; c0 += block) {
        const int64_t cb = std::min(block, nc - c0);
        auto g = buf.narrow(1, 0, cb).contiguous();
        at::mm_out(g, x, c.narrow(0, c0, cb).t());
        const T* pg = g.data_ptr<T>();
        at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            for (int64_t j = 0; j < cb; ++j) {
              const int64_t col = c0 + j;
              if (col == y[i]) continue;
              const T v = clamp0(sq[i] + csq[col] - T(2) * pg[i * cb + j]);
              if (pi[i] < 0) { pi[i] = col; bestv[i] = v; }  // the first candidate, NaN or not
              if (v < best[i]) { best[i] = v; bestv[i] = v; pi[i] = col; }
            }
          }
        });
      }
    }
    T* pn = near.data_ptr<T>();
    T* pp = per.data_ptr<T>();
    const T m = T(margin);
    for (int64_t i = 0; i < n; ++i) {
      po[i] = dist_of(po[i], distance);
      if (pi[i] < 0) { pp[i] = po[i] * T(0); continue; }  // one class: no other centre
      pn[i] = dist_of(bestv[i], distance);
      const T t = m + po[i] - pn[i];
      pp[i] = t < T(0) ? T(0) : t;  // NaN passes
    }
  });
  return {per, own, near, idx};
}

// Per anchor: sum over b != a of the contrastive term.
at::Tensor contrastive_fwd(const at::Tensor& x_, const at::Tensor& labels_, double margin,
                           int64_t distance, int64_t block) {
  check_inputs(x_, labels_, "contrastive_fwd");
  TORCH_CHECK(distance == L2 || distance == SQUARED_L2,
              "contrastive_fwd: distance must be l2 or squared_l2");
  auto x = x_.contiguous(), labels = labels_.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  auto per = at::zeros({n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_fwd", [&] {
    using T = scalar_t;
    std::vector<T> sq, inv;
    row_stats(x.data_ptr<T>(), n, d, sq, inv);
    const int64_t* y = labels.data_ptr<int64_t>();
    T* pp = per.data_ptr<T>();
    const T m = T(margin);
    for_gram_rows<T>(x, block, [&](int64_t i, T* row) {
      T acc = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (j == i) continue;
        const T dd = dist_of(clamp0(sq[i] + sq[j] - T(2) * row[j]), distance);
        if (y[j] == y[i]) {
          acc += dd;
        } else {
          const T t = m - dd;
          acc += t < T(0) ? T(0) : t;
        }
      }
      pp[i] = acc;
    });
  });
  return per;
}

at::Tensor contrastive_bwd(const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& labels_,
                           double margin, int64_t distance, int64_t block) {
  check_inputs(x_, labels_, "contrastive_bwd");
  auto x = x_.contiguous().detach(), labels = labels_.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(grad_.numel() == n, "contrastive_bwd: grad must have N entries");
  auto grad = grad_.to(x.scalar_type()).contiguous();
  auto gx = at::zeros_like(x);
  if (n < 2) return gx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_bwd", [&] {
    using T = scalar_t;
    std::vector<T> sq, inv;
    row_stats(x.data_ptr<T>(), n, d, sq, inv);
    const int64_t* y = labels.data_ptr<int64_t>();
    const T* pg = grad.data_ptr<T>();
    const T m = T(margin);
    auto diag = at::zeros({n}, x.options());
    T* pdiag = diag.data_ptr<T>();
    const int64_t blk = row_block(block, n);
    const int64_t nb = (n + blk - 1) / blk;
    auto xt = x.t();
    at::parallel_for(0, nb, 1, [&](int64_t bb, int64_t be) {
      auto buf = at::empty({blk, n}, x.options());
      for (int64_t bi = bb; bi < be; ++bi) {
        const int64_t r0 = bi * blk, rows = std::min(blk, n - r0);
        auto a = buf.narrow(0, 0, rows);
        at::mm_out(a, x.narrow(0, r0, rows), xt);
        T* pa = a.data_ptr<T>();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = r0 + r;
          T* row = pa + r * n;
          T rs = 0;
          for (int64_t j = 0; j < n; ++j) {
            if (j == i) { row[j] = T(0); continue; }
            const T raw = sq[i] + sq[j] - T(2) * row[j];
            const T v = clamp0(raw);
            const T k = ddist(raw, v, distance);
            T coef;
            if (y[j] == y[i]) {
              coef = k;
            } else {
              coef = (m - dist_of(v, distance) > T(0)) ? -k : T(0);
            }
            row[j] = (pg[i] + pg[j]) * coef;
            rs += row[j];
          }
          pdiag[i] = rs;
        }
        // rows of gx are this block's alone: S is symmetric
        gx.narrow(0, r0, rows).addmm_(a, x, 1, -2);
      }
    });
    gx.add_(x * diag.unsqueeze(1), 2);
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_margin, m) {
  // distance codes as triplet's: 0 l2, 1 squared_l2.
  m.def("git_fwd(Tensor x, Tensor labels, Tensor centers, float lambda_c, float lambda_g, "
        "int block) -> (Tensor, Tensor)");
  m.def("git_bwd(Tensor grad, Tensor x, Tensor labels, Tensor centers, float lambda_c, "
        "float lambda_g, int block) -> (Tensor, Tensor)");
  m.def("tcl_fwd(Tensor x, Tensor labels, Tensor centers, float margin, int distance, int block) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("contrastive_fwd(Tensor x, Tensor labels, float margin, int distance, int block) -> Tensor");
  m.def("contrastive_bwd(Tensor grad, Tensor x, Tensor labels, float margin, int distance, "
        "int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_margin, CPU, m) {
  m.impl("git_fwd", &git_fwd);
  m.impl("git_bwd", &git_bwd);
  m.impl("tcl_fwd", &tcl_fwd);
  m.impl("contrastive_fwd", &contrastive_fwd);
  m.impl("contrastive_bwd", &contrastive_bwd);
}

}  // namespace fused_margin

// Vectorisable element-wise math shared by the CPU kernels.
//
// FM_CLONES builds AVX-512, AVX2 and generic versions of a row loop and picks
// one at load time; exp_f32 is branch-free so that those loops vectorise.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fused_margin {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FM_CLONES
#endif
#define FM_INLINE inline __attribute__((always_inline))

// Cephes expf, branch-free (selects only) so that it vectorises. exp(x) = 0 for
// x < -87.3 and -inf, +inf above ln(FLT_MAX) and for +inf, NaN for NaN (as std::exp,
// so that a NaN logit reaches the loss instead of a huge finite value); between 88
// and ln(FLT_MAX) it stays at e^88 (no kernel here evaluates exp above about 0).
// The same bits as before NaN/inf handling wherever x is finite: the two extra
// selects cost about 10% of the loop (a full-range 2^128 path cost 40%; measured
// on the project's 2-core Xeon box, AVX-512 clone).
FM_INLINE float exp_f32(float x) {
  const float lo = -87.3365447504f, hi = 88.0f, top = 88.7228391117f;
  // written so that NaN fails both comparisons and passes through the clamp
  float xc = hi < x ? hi : x;
  xc = xc < lo ? lo : xc;
  // round to nearest by the 1.5 * 2^23 trick: std::floor does not vectorise
  // without -fno-trapping-math
  const float magic = 12582912.0f;
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  // n's integer from the bits of t (n = bits(t) - bits(magic)), not a float -> int
  // conversion, which would be undefined for NaN; unsigned, so the shift is defined too
  uint32_t tb, mb;
  std::memcpy(&tb, &t, sizeof(float));
  std::memcpy(&mb, &magic, sizeof(float));
  const uint32_t e = (tb - mb + 127u) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(float));
  const float res = x < lo ? 0.0f : y * scale;
  return x > top ? std::numeric_limits<float>::infinity() : res;
}

FM_INLINE float exp_any(float x) { return exp_f32(x); }
FM_INLINE double exp_any(double x) { return std::exp(x); }  // float64 keeps std::exp (gradcheck)

}  // namespace fused_margin

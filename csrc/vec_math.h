// Vectorisable element-wise math shared by the CPU kernels.
//
// FM_CLONES builds AVX-512, AVX2 and generic versions of a row loop and picks
// one at load time; exp_f32 is branch-free so that those loops vectorise.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fused_margin {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FM_CLONES
#endif
#define FM_INLINE inline __attribute__((always_inline))

// Cephes expf, branch-free so that it vectorises; exp(x) = 0 for x < -87.3 and -inf.
FM_INLINE float exp_f32(float x) {
  const float lo = -87.3365447504f, hi = 88.0f;
  const float xc = std::max(lo, std::min(hi, x));
  // round to nearest by the 1.5 * 2^23 trick: std::floor does not vectorise
  // without -fno-trapping-math
  const float magic = 12582912.0f;
  float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * (r * r) + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(float));
  const float res = y * scale;
  return x < lo ? 0.0f : res;
}

FM_INLINE float exp_any(float x) { return exp_f32(x); }
FM_INLINE double exp_any(double x) { return std::exp(x); }  // float64 keeps std::exp (gradcheck)

}  // namespace fused_margin

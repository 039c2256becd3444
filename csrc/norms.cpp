// Per-row inverse norms, the normalisation that every angular kernel folds in
// instead of materialising normalised copies of features or weights.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>

namespace fused_margin {

at::Tensor row_inv_norm_cpu(const at::Tensor& x, double eps) {
  TORCH_CHECK(x.dim() == 2, "row_inv_norm: expected a 2-D tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.is_floating_point(), "row_inv_norm: expected a floating tensor");
  auto xf = x.to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  auto out = at::empty({xf.size(0)}, xf.options());
  const int64_t rows = xf.size(0), cols = xf.size(1);
  AT_DISPATCH_FLOATING_TYPES(xf.scalar_type(), "row_inv_norm", [&] {
    const scalar_t* px = xf.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        double acc = 0.0;
        const scalar_t* row = px + r * cols;
        for (int64_t c = 0; c < cols; ++c) acc += double(row[c]) * double(row[c]);
        const double n = std::sqrt(acc);
        po[r] = n > eps ? scalar_t(1.0 / n) : scalar_t(0);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(fused_margin, CPU, m) {
  m.impl("row_inv_norm", &row_inv_norm_cpu);
}

}  // namespace fused_margin

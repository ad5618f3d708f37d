// Projections with random weights (uniform in +-1/sqrt(in)) for tests of the matmul paths: the
// model's own start uninitialized (model/layers.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cmath>

#include "hybrid/model/layers.h"

inline hybrid::Projection random_projection(int64_t in, int64_t out) {
  hybrid::Projection p(in, out);
  at::NoGradGuard no_grad;
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  p->weight.uniform_(-bound, bound);
  return p;
}

// Token ids as the tools take them, from an .npy of integers ([T] or [B, T]) or from the command
// line ("12,7,99"): int64 [B, T] with every id inside the model's vocabulary, or one Error that
// names where they came from and the offset of the first bad one.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace hybrid::io {

at::Tensor read_token_ids(const std::string& npy_path, int64_t vocab);
// Ids separated by commas or spaces: one sequence, [1, T].
at::Tensor parse_token_ids(const std::string& text, const std::string& source, int64_t vocab);

}  // namespace hybrid::io

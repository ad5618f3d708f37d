// Which token a row of the chunked delta rule's chunk layout holds (src/ops/delta_chunk_layout.h):
// for the layout kernels, and for the state pass where it writes o straight into the tokens.
#pragma once

#include <cstdint>

namespace hybrid::ops::detail {

struct ChunkTokens {
  const int64_t* gather;  // [rows]: token of each chunk row (B * T for padding), or null: rows of T
  int64_t B, T, chunks_per_row;
};

// Batch row b and position t; b < 0 for padding.
struct Token {
  int64_t b, t;
};

// The token chunk row r (of one head) holds. B * T < 2^32 (the callers check), so the divisions
// are 32-bit: a 64-bit one is a software routine of about a hundred instructions.
__device__ __forceinline__ Token token_of(const ChunkTokens& g, int64_t r) {
  constexpr int64_t kRows = 64;  // a chunk's rows
  if (g.gather) {
    const int64_t tok = g.gather[r];
    if (tok >= g.B * g.T) return {-1, 0};
    const int64_t b = g.B == 1 ? 0 : static_cast<uint32_t>(tok) / static_cast<uint32_t>(g.T);
    return {b, tok - b * g.T};
  }
  const int64_t chunk = r / kRows;
  const int64_t b = g.B == 1 ? 0 : static_cast<uint32_t>(chunk) / static_cast<uint32_t>(g.chunks_per_row);
  const int64_t t = (chunk - b * g.chunks_per_row) * kRows + r % kRows;
  return {t < g.T ? b : -1, t};
}

}  // namespace hybrid::ops::detail

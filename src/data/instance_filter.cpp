#include "hybrid/data/instance_filter.h"

#include <algorithm>

namespace hybrid::data {

int64_t most_repeats(const int64_t* tokens, int64_t n, int64_t min_period, int64_t max_period) {
  int64_t most = 0;
  for (int64_t p = min_period; p <= max_period && p < n; ++p) {
    // run: how many tokens in a row so far equal the one p before; with the p before them they
    // make a stretch of run + p tokens.
    int64_t run = 0, longest = 0;
    for (int64_t i = p; i < n; ++i) {
      run = tokens[i] == tokens[i - p] ? run + 1 : 0;
      longest = std::max(longest, run);
    }
    most = std::max(most, (longest + p) / p);
  }
  return most;
}

bool keeps_instance(const InstanceFilterConfig& filter, const int64_t* tokens, int64_t n) {
  return !filter.enabled || most_repeats(tokens, n, filter.min_period, filter.max_period) < filter.max_count;
}

}  // namespace hybrid::data

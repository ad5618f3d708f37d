// OLMo's instance filter (data.instance_filter): instances with a long run of repeated tokens are
// left out of the loss.
#pragma once

#include <cstdint>

#include "hybrid/config/config.h"

namespace hybrid::data {

// The most repeats of any period in [min_period, max_period] in tokens[0, n): for each period p,
// the longest stretch where every token equals the one p before, as whole periods (a stretch of
// L tokens holds L / p repeats; "abcabcab" is 2 of "abc"). O(n) a period.
int64_t most_repeats(const int64_t* tokens, int64_t n, int64_t min_period, int64_t max_period);

// Whether the filter keeps an instance: true when it is off, or the instance's most repeats are
// below max_count.
bool keeps_instance(const InstanceFilterConfig& filter, const int64_t* tokens, int64_t n);

}  // namespace hybrid::data

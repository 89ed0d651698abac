// Constants shared with Python (trd_fast/constants.py, their one definition) and the Triton kernels;
// tests/test_constants.py checks that the three agree.
#pragma once

#include <cstdint>

namespace trd_fast::cpu {

// Kernel codes of the divergences: the `kind` argument of the divergence ops.
enum Kind : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// The token id that marks a position to ignore in token_logprobs.
constexpr int64_t kIgnoreIndex = -100;

}  // namespace trd_fast::cpu

// New gradient tensors for the backward kernels, from buffers that earlier gradients left behind.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace trd_fast::cpu {

// A new contiguous CPU tensor for a gradient that is written once, in full, row by row (its contents start
// undefined, as with at::empty). See gradient_buffers.cpp for when it reuses memory.
at::Tensor empty_gradient(at::IntArrayRef sizes, at::ScalarType dtype);

// Frees every buffer kept for reuse; returns the bytes freed.
int64_t release_gradient_buffers();

}  // namespace trd_fast::cpu

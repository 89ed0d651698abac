// New gradient tensors for the backward kernels, from buffers that earlier gradients left behind.
//
// A fresh multi-hundred-MB gradient costs its first-touch page faults on every call: ~80 ms for 268 MB with 4 KB
// pages, and with transparent huge pages in "madvise" mode a huge-page advice trades that for synchronous memory
// compaction, which varied from 60 to 570 ms per call on one machine. So a large gradient (>= kReusedBytes) is
// handed out from a small pool of buffers instead: the tensor's deleter, which runs only once nothing references
// its storage any more (no tensor, view or autograd node), returns its buffer to the pool, and the next large
// gradient takes the smallest kept buffer that holds it and is at most twice its size. A buffer still referenced
// is never in the pool, so it is never handed out twice. The pool keeps at most kKeptBuffers (the most recently
// returned), so memory held between steps is bounded by two gradients; release_gradient_buffers() frees them.
// Smaller gradients come from at::empty (malloc recycles those itself).
#include "gradient_buffers.h"

#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace trd_fast::cpu {
namespace {

constexpr size_t kReusedBytes = size_t(16) << 20;
constexpr size_t kKeptBuffers = 2;  // two losses on the same logits have two gradients live at once

struct Buffer {
  void* data;
  size_t bytes;
};

class BufferPool {
 public:
  // The smallest kept buffer of bytes..2 * bytes, else a new one.
  Buffer take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = kept_.end();
      for (auto it = kept_.begin(); it != kept_.end(); ++it) {
        if (it->bytes >= bytes && it->bytes / 2 <= bytes && (best == kept_.end() || it->bytes < best->bytes)) best = it;
      }
      if (best != kept_.end()) {
        const Buffer buffer = *best;
        kept_.erase(best);
        return buffer;
      }
    }
    return {c10::alloc_cpu(bytes), bytes};
  }

  // Called once the buffer's last reference is gone; frees the least recently returned buffer beyond the limit.
  void give_back(Buffer buffer) {
    Buffer evicted{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      kept_.push_back(buffer);
      if (kept_.size() > kKeptBuffers) {
        evicted = kept_.front();
        kept_.erase(kept_.begin());
      }
    }
    if (evicted.data != nullptr) c10::free_cpu(evicted.data);
  }

  int64_t release() {
    std::vector<Buffer> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      freed.swap(kept_);
    }
    int64_t bytes = 0;
    for (const Buffer& buffer : freed) {
      c10::free_cpu(buffer.data);
      bytes += int64_t(buffer.bytes);
    }
    return bytes;
  }

 private:
  std::mutex mutex_;
  std::vector<Buffer> kept_;  // least recently returned first
};

// Never destroyed: a gradient may outlive static destruction at exit, and its deleter still needs the pool.
BufferPool& pool() {
  static auto* instance = new BufferPool();
  return *instance;
}

}  // namespace

at::Tensor empty_gradient(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  if (bytes < kReusedBytes) return at::empty(sizes, options);
  const Buffer buffer = pool().take(bytes);
  return at::from_blob(buffer.data, sizes, [buffer](void*) { pool().give_back(buffer); }, options);
}

int64_t release_gradient_buffers() { return pool().release(); }

}  // namespace trd_fast::cpu

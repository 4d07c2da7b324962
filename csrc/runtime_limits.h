// Every size limit the runtime enforces, in one place. The C++ side (ops, executor, bindings)
// checks them and is the backstop; the Python side reads them through _core.limits() to give
// the friendly message first. A limit exists to keep a hostile or mistaken input from turning
// into a crash, an overflow or a giant allocation -- each comment says which.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pyrt {

// Reduction length of an integer GEMM. Accumulators are int32: |sum w*a| <= 128 * 127 * K, and
// the VNNI kernels subtract 128 * (sum of a row) <= 128 * 127 * K; both stay below 2^31 - 1 for
// K <= 2^17 (128 * 127 * 131072 = 2,130,706,432).
constexpr size_t kMaxK = size_t(1) << 17;

// Tokens per image (patches + prefix tokens). Attention is O(T^2) in time; its scratch is tiled
// to O(tile * T) per thread, but a 400 KB file must still not be able to ask for hours of work.
// 4096 covers 1024x1024 at patch 16 (SAM-size inputs) and DINOv2 at 518 / 14 (1370).
constexpr size_t kMaxTokens = 4096;

// Threads a call may ask for. Each is an OS thread the pool keeps for reuse; asking for more
// is refused, never silently clamped.
constexpr int kMaxThreads = 256;

// Image side (pixels) and model dimensions a graph may declare.
constexpr size_t kMaxImageSide = 65536;
constexpr size_t kMaxDepth = 4096;
constexpr size_t kMaxDim = 65536;  // embed_dim, mlp_hidden, classes, K or N of any layer

}  // namespace pyrt

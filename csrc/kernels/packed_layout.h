// The packed weight layouts every ISA shares (kernels.h says why there is one), as offsets,
// strides and padding rules: the packers (ops.cc), the scalar oracle (ref.cc) and the SIMD
// kernels' panel arithmetic all compute them here, so a layout change is one edit and a
// mismatch between packer and kernel cannot be written.
//
// qc8w (N x K int8, a float scale per output channel):
//   byte[p][g][c][j] = w[16p + c][4g + j], p < panels, g < Kp/4, c < 16, j < 4.
//   Padding channels and k are 0. Scales: panels*16 floats, padding 0.
// qb4w (N x K in [-8, 7], a float scale per block of `block` K values), stored as q + 8 in
//   [0, 15], two per byte. For panel p, block b, group pair gp (8 k values):
//   byte[p][b][gp][c*4 + j]: low nibble  = w[16p + c][b*block + 8gp + j]     + 8,
//                            high nibble = w[16p + c][b*block + 8gp + 4 + j] + 8.
//   Padding weights are stored as 8 (zero). Scales: [p][b][c] floats.
// f32 B operand (K x N, i.e. W^T): data[p][k][c] = B[k][16p + c], padding 0.
//
// Quantised activations (the A operand of the integer GEMMs) are rows of Kp int8 values, zero
// past K, with one int32 sum per kKAlign-wide chunk (qb4w undoes its +8 offset with them).
//
// Every helper is `static` (as kernels.h's): each file that uses one gets its own copy, so an
// ISA-flagged file's copy is never the one generic code links to (isa_kernels.h, ISA_ODR).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels.h"

namespace pyrt {
namespace packed {

// The shapes the SIMD kernels are built around: a qc8w k-group of a panel is one 64-byte line
// (an AVX-512 zmm, four NEON q-registers), a qb4w group pair is 64 bytes as well, and a padded
// activation row holds whole k-groups and whole group pairs.
static_assert(kNR == 16, "the SIMD tiles assume 16-channel panels");
static_assert(kKGroup == 4, "a k-group is one 32-bit lane of int8 values");
static_assert(kNR * kKGroup == 64, "a qc8w k-group of a panel is 64 bytes");
static_assert(kKAlign % (2 * kKGroup) == 0, "padded rows hold whole qb4w group pairs");
static_assert(kKAlign % kKGroup == 0, "padded rows hold whole k-groups");

// Bytes of one qb4w group pair (8 k values of 16 channels, two nibbles a byte).
constexpr size_t kQB4WPairBytes = 2 * kKGroup * kNR / 2;
static_assert(kQB4WPairBytes == 64, "a qb4w group pair is 64 bytes");
// The stored nibble is q + kQB4WOffset; a byte of two zero weights.
constexpr int kQB4WOffset = 8;
constexpr uint8_t kQB4WZeroByte = 0x88;
static_assert(kQB4WZeroByte == (kQB4WOffset | (kQB4WOffset << 4)), "padding encodes zero");

// ---- padding rules

// K padded for integer weights and their activations: qc8w to kKAlign, qb4w to its block (a
// multiple of kKAlign, ops.cc's check_integer_weights). An empty K still gets one chunk.
static constexpr size_t qc8w_kp(size_t K) { return round_up(K > 0 ? K : 1, kKAlign); }
static constexpr size_t qb4w_kp(size_t K, size_t block) { return round_up(K > 0 ? K : 1, block); }
// Activation block sums per row.
static constexpr size_t act_bsums(size_t Kp) { return Kp / kKAlign; }

// ---- qc8w

static constexpr size_t qc8w_panel_bytes(size_t Kp) { return Kp * kNR; }
static constexpr size_t qc8w_bytes(size_t N, size_t Kp) { return num_panels(N) * qc8w_panel_bytes(Kp); }
// Scales are panel-padded: the kernels load whole panels of them.
static constexpr size_t qc8w_scale_count(size_t N) { return num_panels(N) * kNR; }
// Byte of weight (n, k).
static constexpr size_t qc8w_offset(size_t Kp, size_t n, size_t k) {
  return (n / kNR) * qc8w_panel_bytes(Kp) + (k / kKGroup) * kNR * kKGroup + (n % kNR) * kKGroup + k % kKGroup;
}
// Byte of channel c's first value in k-group g of a panel (the 4 values of one 32-bit lane).
static constexpr size_t qc8w_group_offset(size_t g, size_t c) { return g * kNR * kKGroup + c * kKGroup; }

// ---- qb4w

static constexpr size_t qb4w_panel_bytes(size_t Kp) { return Kp * kNR / 2; }
static constexpr size_t qb4w_bytes(size_t N, size_t Kp) { return num_panels(N) * qb4w_panel_bytes(Kp); }
static constexpr size_t qb4w_blocks(size_t Kp, size_t block) { return Kp / block; }
static constexpr size_t qb4w_panel_scales(size_t Kp, size_t block) { return qb4w_blocks(Kp, block) * kNR; }
static constexpr size_t qb4w_scale_count(size_t N, size_t Kp, size_t block) {
  return num_panels(N) * qb4w_panel_scales(Kp, block);
}
// Byte offset of group pair gp (8 k values from k = 8gp) of a block within a panel.
static constexpr size_t qb4w_block_offset(size_t block, size_t b) { return b * block * kNR / 2; }
static constexpr size_t qb4w_pair_offset(size_t gp) { return gp * kQB4WPairBytes; }

// Where weight (n, k)'s nibble lives: its byte, and whether it is the high nibble.
struct NibbleAt {
  size_t byte;
  bool high;
};
static constexpr NibbleAt qb4w_at(size_t Kp, size_t block, size_t n, size_t k) {
  const size_t b = k / block, kb = k % block;
  const size_t gp = kb / (2 * kKGroup), high = (kb % (2 * kKGroup)) / kKGroup, j = kb % kKGroup;
  return {(n / kNR) * qb4w_panel_bytes(Kp) + qb4w_block_offset(block, b) + qb4w_pair_offset(gp) +
              (n % kNR) * kKGroup + j,
          high != 0};
}
// Scale of weight n's block b.
static constexpr size_t qb4w_scale_offset(size_t Kp, size_t block, size_t n, size_t b) {
  return (n / kNR) * qb4w_panel_scales(Kp, block) + b * kNR + n % kNR;
}

// ---- f32

static constexpr size_t f32_panel_floats(size_t K) { return K * kNR; }
static constexpr size_t f32_floats(size_t N, size_t K) { return num_panels(N) * f32_panel_floats(K); }
// Float of B[k][n] (= W[n][k]).
static constexpr size_t f32_offset(size_t K, size_t n, size_t k) {
  return (n / kNR) * f32_panel_floats(K) + k * kNR + n % kNR;
}

// Spot checks of the formulas against the layout as written above, by hand.
static_assert(qc8w_offset(64, 0, 0) == 0 && qc8w_offset(64, 1, 0) == 4 && qc8w_offset(64, 0, 4) == 64);
static_assert(qc8w_offset(64, 17, 5) == 64 * 16 + 64 + 4 + 1, "panel 1, group 1, channel 1, j 1");
static_assert(qb4w_at(64, 32, 0, 4).byte == 0 && qb4w_at(64, 32, 0, 4).high, "k 4..7: high nibbles");
static_assert(qb4w_at(64, 32, 0, 8).byte == 64 && !qb4w_at(64, 32, 0, 8).high, "next group pair");
static_assert(qb4w_at(64, 32, 0, 32).byte == 32 * 8, "block 1 starts after 32 k x 16 channels / 2");
static_assert(qb4w_at(64, 32, 16, 0).byte == 64 * 8, "panel 1");
static_assert(qb4w_scale_offset(64, 32, 17, 1) == 2 * 16 + 16 + 1);
static_assert(f32_offset(3, 17, 2) == 3 * 16 + 2 * 16 + 1);
static_assert(qc8w_kp(0) == 32 && qc8w_kp(33) == 64 && qb4w_kp(33, 64) == 64);

}  // namespace packed
}  // namespace pyrt

// Machine peaks measured in the same run as a benchmark, so kernel figures can be reported as
// a fraction of what this CPU does, not of a datasheet number.
#pragma once

namespace pyrt {

// int8 multiply-accumulate throughput in GOPS (2 ops per MAC) of a register-resident loop of
// the best int8 dot instructions of the CPU (x86: vpdpbusd with AVX-512 VNNI, else
// vpmaddubsw + vpmaddwd; ARM: sdot, or
// smull + sadalp without dotprod), on `threads` threads for about `seconds`. Returns 0 when
// the CPU has no SIMD path.
double int8_peak_gops(int threads, double seconds);

// fp32 FMA throughput in GFLOP/s (2 per FMA) measured the same way.
double fp32_peak_gflops(int threads, double seconds);

}  // namespace pyrt

# Type stub for pyruntime._core, the pybind11 extension built from csrc/bindings/module.cc and
# csrc/bindings/executor_bindings.cc. Keep it in step with those files: tests/test_packaging.py
# checks that the names here and the module's public names are the same set.
#
# Arrays are float32 / int8 / ... C-contiguous on the C++ side; pybind11 converts other numpy
# arrays (a copy) and raises TypeError for what it cannot convert. Bad sizes or values raise
# ValueError. Names bound without py::arg are positional-only here.
from typing import Dict, List, Optional, Tuple, TypedDict

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_I8 = npt.NDArray[np.int8]

def isa() -> str:
    """Name of the ISA used when none is named (PYRUNTIME_ISA, else the best available)."""

def available_isas() -> List[str]:
    """ISAs compiled in and supported by this CPU, best last."""

def physical_cores() -> int: ...
def limits() -> Dict[str, int]:
    """The size limits the runtime enforces: max_k, max_tokens, max_threads, max_image_side,
    max_depth, max_dim (csrc/runtime_limits.h)."""

def int8_peak_gops(threads: int = 1, seconds: float = 0.3) -> float: ...
def fp32_peak_gflops(threads: int = 1, seconds: float = 0.3) -> float: ...
def cpu_features() -> Dict[str, bool]:
    """Keys: avx2, avx512vnni, neon, dotprod, i8mm."""

class QuantizedWeights:
    """Packed weights of one linear layer (int8 per-row, int4 per-block, or fp32)."""

    @property
    def bits(self) -> int: ...
    @property
    def shape(self) -> Tuple[int, int]: ...
    @property
    def block_size(self) -> Optional[int]:
        """The int4 block size; None for 8 and 32 bits."""
    @property
    def nbytes(self) -> int: ...
    def canonical(self) -> Tuple[_I8, _F32]:
        """(q int8 [N, K], scales float32) as quantised; ValueError for fp32 weights."""

def quantize_weights(w: _F32, bits: int, block_size: int) -> QuantizedWeights: ...
def weights_from_canonical(q: _I8, scales: _F32, bits: int, block_size: int) -> QuantizedWeights: ...
def weights_from_int8_unchecked(q: _I8, scales: _F32) -> QuantizedWeights: ...
def dequantize(arg0: QuantizedWeights, /) -> _F32: ...
def linear(x: _F32, qw: QuantizedWeights, bias: Optional[_F32], act_scale: Optional[float],
           act_bits: int, num_threads: Optional[int], isa: Optional[str]) -> _F32: ...
def quantize_acts(x: _F32, bits: int, scale: Optional[float], per_row: bool,
                  isa: Optional[str]) -> Tuple[_I8, _F32, npt.NDArray[np.int32]]:
    """(q int8 [M, K], scale per row [M], block sums int32 [M, Kp / 32])."""

def gemm_f32(a: _F32, b: _F32, bias: Optional[_F32], num_threads: Optional[int],
             isa: Optional[str]) -> _F32: ...
def layernorm(x: _F32, gamma: _F32, beta: _F32, eps: float, isa: Optional[str]) -> _F32: ...
def softmax(x: _F32, scale: float, isa: Optional[str], bias: Optional[_F32] = None) -> _F32: ...
def quick_gelu(x: _F32, isa: Optional[str]) -> _F32: ...
def swiglu(x: _F32, up: Optional[_F32], isa: Optional[str]) -> _F32: ...
def rope(x: _F32, sin: _F32, cos: _F32, heads: int, prefix: int, half: bool, isa: Optional[str]) -> _F32: ...
def attention(q: _F32, k: _F32, v: _F32, scale: float, bias: Optional[_F32], isa: Optional[str]) -> _F32: ...
def gelu(x: _F32, isa: Optional[str]) -> _F32: ...
def add(a: _F32, b: _F32, isa: Optional[str]) -> _F32: ...

class _RunOutput(TypedDict, total=False):
    logits: _F32                          # [B, num_classes]
    exit_block: npt.NDArray[np.int32]     # [B]
    bops: npt.NDArray[np.int64]           # [B]
    stat: _F32                            # [B]
    block_path: npt.NDArray[np.uint8]     # [B, depth]
    isa: str
    exit_logits: _F32                     # [n_exits, B, num_classes], only with collect_exits
    features: _F32                        # [B, embed_dim]
    tokens: _F32                          # [B, tokens, embed_dim], only with tokens

class Executor:
    """A ViT built from a model file's graph (dict) and tensors (numpy arrays)."""

    def __init__(self, graph: dict, tensors: dict) -> None: ...
    def run(self, x: _F32, num_threads: Optional[int] = None, isa: Optional[str] = None,
            collect_exits: bool = False, tokens: bool = False) -> _RunOutput:
        """x: float32 [B, in_chans, H, W]."""
    def set_profiling(self, arg0: bool, /) -> None: ...
    def profile(self) -> Dict[str, float]: ...
    def reset_profile(self) -> None: ...
    @property
    def scratch_bytes(self) -> int: ...
    @property
    def weight_bytes(self) -> int: ...

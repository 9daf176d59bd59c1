"""Quantization settings shared by RTN and GPTQ (and the methods built on them)."""

from __future__ import annotations

import dataclasses

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Settings of the uniform (min/max grid) quantizer and of GPTQ.

    bits:            code width, one of 2, 3, 4, 8.
    group_size:      input columns sharing one (scale, zero); -1 = one pair per output channel.
                     When it does not divide in_features the last group is shorter (as the reference).
    sym:             symmetric grid (zero fixed at 2**(bits-1)).
    act_order:       GPTQ: quantize columns in order of decreasing Hessian diagonal.
    static_groups:   GPTQ: group parameters computed up front on the original weights
                     (so act-order does not scatter groups); ignored when group_size == -1.
    block_size:      GPTQ lazy-batch width (a speed knob; results do not depend on it, see gptq.py).
    percdamp:        damping added to the Hessian diagonal, as a fraction of its mean.
    damp_retries:    if the Cholesky factorisation fails, retry with percdamp * 10**r for
                     r = 1..damp_retries, then give up with a ValueError. The bound is
                     percdamp * 10**damp_retries (0.01 * 10**5 = 1000 by default).
    true_sequential: pipeline flag: quantize the sub-layers of a block one after another.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    block_size: int = 128
    percdamp: float = 0.01
    damp_retries: int = 5
    true_sequential: bool = True

    def __post_init__(self):
        self._check_fields()

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def _check_fields(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be positive or -1 (per channel)")
        if self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size} must be positive")
        if not self.percdamp >= 0:  # also catches NaN
            raise ValueError(f"percdamp={self.percdamp} must be >= 0")
        if self.damp_retries < 0:
            raise ValueError(f"damp_retries={self.damp_retries} must be >= 0")

    def validate(self, in_features: int) -> None:
        """Raise ValueError if these settings cannot quantize a layer with `in_features` inputs."""
        self._check_fields()
        if in_features <= 0:
            raise ValueError(f"in_features={in_features} must be positive")
        if self.group_size != -1 and self.group_size > in_features:
            raise ValueError(
                f"group_size={self.group_size} exceeds in_features={in_features}; "
                "use group_size=-1 for one scale per output channel"
            )

    def num_groups(self, in_features: int) -> int:
        return num_groups(in_features, self.group_size)


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along the input dimension. As in the GPTQ reference and the AutoGPTQ format, a group size that does
    not divide in_features leaves a shorter last group (SmolLM2's 576 inputs at g128: 4 full groups + 64 columns)."""
    return 1 if group_size == -1 else -(-in_features // group_size)

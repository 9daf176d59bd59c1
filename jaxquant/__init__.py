"""jaxquant: post-training quantization of LLMs in JAX."""

from .config import QuantConfig
from .formats import UniformQuantizedWeight
from .gptq import gptq
from .grid import dequantize_codes, find_params, quantize_codes
from .hessian import HessianState, hessian_init, hessian_update
from .packing import pack, pack_qweight, pack_qzeros, unpack, unpack_qweight, unpack_qzeros
from .rtn import rtn
from .pipeline import quantize_model
from .formats_spqr import SpQRWeight, spqr_average_bits
from .spqr import SpQRConfig, spqr  # also registers the "spqr" pipeline method
from .formats_lut import LUTQuantizedWeight
from .squeezellm import SqueezeLLMConfig, squeezellm  # also registers the "squeezellm" pipeline method

__all__ = [
    "QuantConfig",
    "UniformQuantizedWeight",
    "gptq",
    "spqr",
    "SpQRConfig",
    "SpQRWeight",
    "spqr_average_bits",
    "squeezellm",
    "SqueezeLLMConfig",
    "LUTQuantizedWeight",
    "rtn",
    "quantize_model",
    "find_params",
    "quantize_codes",
    "dequantize_codes",
    "HessianState",
    "hessian_init",
    "hessian_update",
    "pack",
    "unpack",
    "pack_qweight",
    "unpack_qweight",
    "pack_qzeros",
    "unpack_qzeros",
]

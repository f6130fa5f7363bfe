"""rmsprop_jax: exact, composable RMSProp-family gradient transformations for JAX and optax.

The public surface is listed in ``__all__``; everything else is private.
"""

import importlib.metadata

from rmsprop_jax import interop as interop
from rmsprop_jax import presets as presets
from rmsprop_jax._alias import rmsprop as rmsprop
from rmsprop_jax._bias_correction import BiasCorrectionState as BiasCorrectionState
from rmsprop_jax._bias_correction import bias_correction as bias_correction
from rmsprop_jax._centered import ScaleByCenteredRmsState as ScaleByCenteredRmsState
from rmsprop_jax._centered import scale_by_centered_rms as scale_by_centered_rms
from rmsprop_jax._packing import PackedTree as PackedTree
from rmsprop_jax._packing import PackLayout as PackLayout
from rmsprop_jax._packing import PackSmallLeavesState as PackSmallLeavesState
from rmsprop_jax._packing import pack_small_leaves as pack_small_leaves
from rmsprop_jax._quantized import QuantizedArray as QuantizedArray
from rmsprop_jax._quantized import QuantizedFormat as QuantizedFormat
from rmsprop_jax._quantized import dequantize as dequantize
from rmsprop_jax._quantized import quantized as quantized
from rmsprop_jax._rms import ScaleByRmsState as ScaleByRmsState
from rmsprop_jax._rms import scale_by_rms as scale_by_rms
from rmsprop_jax._validation import runtime_checks as runtime_checks
from rmsprop_jax._validation import runtime_checks_enabled as runtime_checks_enabled

# The version is written once, in pyproject.toml; this reads it from the installed metadata.
__version__ = importlib.metadata.version("rmsprop_jax")

__all__ = [
    "BiasCorrectionState",
    "PackLayout",
    "PackSmallLeavesState",
    "PackedTree",
    "QuantizedArray",
    "QuantizedFormat",
    "ScaleByCenteredRmsState",
    "ScaleByRmsState",
    "__version__",
    "bias_correction",
    "dequantize",
    "interop",
    "pack_small_leaves",
    "presets",
    "quantized",
    "rmsprop",
    "runtime_checks",
    "runtime_checks_enabled",
    "scale_by_centered_rms",
    "scale_by_rms",
]

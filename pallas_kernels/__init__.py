"""Pallas GPU kernels for quantized matmuls, each next to its pure-jnp reference (kernels arrive with their issue)."""

"""Pallas GPU kernels for GDN decode and MTP verify (installed as `gdn_jax.kernels`).

Depends on jax only: no Flax, no model code, nothing from the rest of gdn_jax.
"""

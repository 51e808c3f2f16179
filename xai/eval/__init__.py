"""The evaluation layer: metrics, the evaluation loop, data loaders, procedural shapes.

Imports the methods layer (``xai``'s methods) and mamba_jax; never the application.
"""

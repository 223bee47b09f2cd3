"""Integrations with diffusion libraries. Each is optional: importing guidance_kernels never imports
them; ``import guidance_kernels.integrations.diffusers`` needs diffusers installed."""

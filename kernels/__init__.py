"""Triton kernels for the X-Portrait runtime; one op per module, each with its plain-PyTorch reference().

    from kernels.reference_attention import reference_attention, reference   # appearance attention
    from kernels.motion_attention import motion_attention, reference         # streaming temporal attention

Importing a module registers its torch custom op (torch.ops.xportrait.*); this package file imports
nothing, so `import kernels` stays free. Note: Hugging Face's `kernels` package uses the same import
name (docs/kernels.md); do not install it into this environment.
"""

__all__ = ["motion_attention", "reference_attention"]

"""quantize: compress a model with llm-compressor (FP8_DYNAMIC by default, the paper's teacher scheme)
into a compressed-tensors checkpoint, and measure its fidelity to the source before committing."""

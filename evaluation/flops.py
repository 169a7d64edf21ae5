"""Model FLOPs utilisation (MFU): the training FLOPs a model needs per token, and the peak of the device.

MFU = achieved FLOP/s / peak FLOP/s, where the achieved figure counts only the FLOPs the model mathematically
needs (no recomputation, no padding waste credited), as in PaLM (Chowdhery et al. 2022, appendix B):

    FLOPs per token = 6 N + 12 L C T

with N the parameters that take part in matrix products (everything but the position table: a lookup costs no
FLOPs; a tied token embedding counts once, for the output projection), L layers, C the hidden size and T the
context length. 6 N is forward (2 N) plus backward (4 N); 12 L C T is attention's QKᵀ and weights·V in forward and
backward. Used by the benchmark (`evaluation/benchmark.py`) and by the training loop
(`course_transformer/commands/train.py`).

>>> transformer_flops_per_token(num_params=123_653_376, num_layers=12, hidden_size=768, seq_len=1024)
855166464
>>> peak_bf16_flops("NVIDIA H100 80GB HBM3")
989000000000000.0
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) from the vendors' data sheets; other devices report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


def transformer_flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token of a Transformer stack: 6 N + 12 L C T."""
    for name, value in (
        ("num_params", num_params),
        ("num_layers", num_layers),
        ("hidden_size", hidden_size),
        ("seq_len", seq_len),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} is invalid: allowed is a positive integer")
    return 6 * num_params + 12 * num_layers * hidden_size * seq_len


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named like `torch.cuda.get_device_name()` returns, or None when unknown."""
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in device_name), None)


def matmul_parameters(model) -> int:
    """Parameters of a course Transformer that enter matrix products: all of them but the learned position table
    (tied weights are counted once, as `model.parameters()` yields a shared tensor once)."""
    total = sum(p.numel() for p in model.parameters())
    for name, parameter in model.named_parameters():
        if name.endswith("position_embeddings.weight"):
            total -= parameter.numel()
    return total


__all__ = ["PEAK_BF16_FLOPS", "matmul_parameters", "peak_bf16_flops", "transformer_flops_per_token"]

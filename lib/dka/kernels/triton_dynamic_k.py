"""Triton kernels for the Dynamic-K linear op: a streaming top-k forward and a scatter backward.

Why a kernel: the PyTorch path has to materialise (rows x out x in) products (in chunks) just to
keep K of them. The forward kernel never writes the products: each program owns a tile of
(rows, outputs), streams over the inputs in blocks and keeps a running top-KP per (row, output)
in registers, where KP is K rounded up to a power of two (Triton's `tl.topk` needs one) and the
surplus KP - K candidates are masked out at the end.

Selection key. Products are compared as one int64 per candidate: the high 32 bits are the fp32
product mapped to an order-preserving signed integer, the low 32 bits are `0x7FFFFFFF - i`. One
`tl.topk` over the keys therefore selects by value and, among equal values, the lowest input index
i — the tie rule is deterministic and documented. `-0.0` is canonicalised to `+0.0` first, so the
many exact zeros after a ReLU tie as well (and go to the lowest indices). The key holds the exact
fp32 product, so the values summed are decoded from the selected keys, not recomputed.

Backward. The forward saves the selected input indices (rows, out, K) as int16 when in <= 32767
(int32 otherwise). The backward kernel gathers W[c, idx] and x[b, idx] and adds g[b, c] times them
into fp32 buffers for dx and dW with atomic adds: results are correct but the order of fp32
additions (and so the last bits) may vary from run to run. `dka.kernels` switches to a
deterministic PyTorch backward when `torch.use_deterministic_algorithms(True)` is on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dynamic_k_forward", "dynamic_k_backward", "next_power_of_two", "prev_power_of_two", "MAX_KP"]

INT64_MIN: tl.constexpr = tl.constexpr(-(2**63))  # the key of "no candidate" (padding)
MAX_KP = 128  # the largest padded K the forward kernel is built for (K <= 128)


@triton.jit
def _dynamic_k_forward_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, idx_ptr,
    n_rows, n_out, n_in, k,
    HAS_BIAS: tl.constexpr,
    STORE_IDX: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_b = rb < n_rows
    mask_c = rc < n_out
    rb64 = rb.to(tl.int64)
    rc64 = rc.to(tl.int64)

    best = tl.full((BLOCK_B, BLOCK_C, KP), INT64_MIN, tl.int64)
    for i0 in range(0, n_in, BLOCK_I):
        ri = i0 + tl.arange(0, BLOCK_I)
        mask_i = ri < n_in
        xt = tl.load(x_ptr + rb64[:, None] * n_in + ri[None, :],
                     mask=mask_b[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + rc64[:, None] * n_in + ri[None, :],
                     mask=mask_c[:, None] & mask_i[None, :], other=0.0).to(tl.float32)
        prod = xt[:, None, :] * wt[None, :, :]
        prod = tl.where(prod == 0.0, 0.0, prod)  # -0.0 -> +0.0: zeros tie, lowest index wins
        bits = prod.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed-int order == float order
        tie = (0x7FFFFFFF - ri).to(tl.int64)
        key = (ordered.to(tl.int64) << 32) | tie[None, None, :]
        key = tl.where(mask_i[None, None, :], key, INT64_MIN)
        if BLOCK_I > KP:
            key = tl.topk(key, KP)
        merged = tl.reshape(tl.join(best, key), (BLOCK_B, BLOCK_C, 2 * KP))
        best = tl.topk(merged, KP)

    hi = (best >> 32).to(tl.int32)
    bits = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    vals = bits.to(tl.float32, bitcast=True)
    sel = 0x7FFFFFFF - best.to(tl.int32)  # low 32 bits (the tie field is in [0, 2**31))
    rk = tl.arange(0, KP)
    keep = rk[None, None, :] < k
    acc = tl.sum(tl.where(keep, vals, 0.0), axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rc, mask=mask_c, other=0.0).to(tl.float32)[None, :]

    mask_bc = mask_b[:, None] & mask_c[None, :]
    tl.store(y_ptr + rb64[:, None] * n_out + rc64[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_bc)
    if STORE_IDX:
        pair = rb64[:, None] * n_out + rc64[None, :]
        tl.store(idx_ptr + pair[:, :, None] * k + rk[None, None, :],
                 sel.to(idx_ptr.dtype.element_ty), mask=mask_bc[:, :, None] & keep)


@triton.jit
def _dynamic_k_backward_kernel(
    x_ptr, w_ptr, g_ptr, idx_ptr, dx_ptr, dw_ptr,
    n_rows, n_out, n_in, k,
    NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rk = tl.arange(0, KP)
    mask_b = rb < n_rows
    mask_c = rc < n_out
    rb64 = rb.to(tl.int64)
    rc64 = rc.to(tl.int64)
    mask_bc = mask_b[:, None] & mask_c[None, :]
    mask3 = mask_bc[:, :, None] & (rk[None, None, :] < k)

    pair = rb64[:, None] * n_out + rc64[None, :]
    sel = tl.load(idx_ptr + pair[:, :, None] * k + rk[None, None, :], mask=mask3, other=0).to(tl.int64)
    g = tl.load(g_ptr + pair, mask=mask_bc, other=0.0).to(tl.float32)[:, :, None]
    if NEED_DX:
        wv = tl.load(w_ptr + rc64[None, :, None] * n_in + sel, mask=mask3, other=0.0).to(tl.float32)
        tl.atomic_add(dx_ptr + rb64[:, None, None] * n_in + sel, g * wv, mask=mask3, sem="relaxed")
    if NEED_DW:
        xv = tl.load(x_ptr + rb64[:, None, None] * n_in + sel, mask=mask3, other=0.0).to(tl.float32)
        tl.atomic_add(dw_ptr + rc64[None, :, None] * n_in + sel, g * xv, mask=mask3, sem="relaxed")


def next_power_of_two(k: int) -> int:
    return 1 << (int(k) - 1).bit_length()


def prev_power_of_two(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _forward_config(kp: int, n_rows: int, n_out: int, n_in: int) -> dict:
    """Tile sizes for the forward: about 2k live int64 candidates per program per operand.

    Chosen by register budget, not tuned on a GPU (none was at hand when this was written);
    `bench/kernels.py` measures the result.
    """
    block_i = max(kp, min(32, next_power_of_two(n_in)))
    per_pair = block_i + 2 * kp  # candidates of this block + running best + merge buffer
    pairs = prev_power_of_two(max(1, 4096 // per_pair))
    block_c = min(16, pairs, next_power_of_two(n_out))  # no idle lanes on narrow problems
    block_b = max(1, min(16, pairs // block_c, next_power_of_two(n_rows)))
    num_warps = 4 if block_b * block_c * per_pair <= 4096 else 8
    return dict(BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_I=block_i, num_warps=num_warps)


def dynamic_k_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int,
                      out_dtype: torch.dtype, want_indices: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y (rows, out) in `out_dtype` and the selected indices (rows, out, k), int16 or int32
    (None unless `want_indices`: inference does not pay for them)."""
    n_rows, n_in = x.shape
    n_out = weight.shape[0]
    kp = next_power_of_two(k)
    if kp > MAX_KP:
        raise ValueError(f"the fused forward handles K <= {MAX_KP}, got K={k}")
    idx_dtype = torch.int16 if n_in <= torch.iinfo(torch.int16).max else torch.int32
    y = torch.empty((n_rows, n_out), device=x.device, dtype=out_dtype)
    idx = torch.empty((n_rows, n_out, k) if want_indices else (1,), device=x.device, dtype=idx_dtype)
    cfg = _forward_config(kp, n_rows, n_out, n_in)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_B"]), triton.cdiv(n_out, cfg["BLOCK_C"]))
    _dynamic_k_forward_kernel[grid](
        x, weight, bias if bias is not None else y, y, idx,
        n_rows, n_out, n_in, k,
        HAS_BIAS=bias is not None, STORE_IDX=want_indices, KP=kp, **cfg,
    )
    return y, (idx if want_indices else None)


def dynamic_k_backward(x: torch.Tensor, weight: torch.Tensor, grad_y: torch.Tensor, idx: torch.Tensor,
                       need_dx: bool, need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """fp32 dx (rows, in) and dW (out, in) from the saved selection (atomic adds)."""
    n_rows, n_in = x.shape
    n_out = weight.shape[0]
    k = idx.shape[-1]
    kp = next_power_of_two(k)
    dx = torch.zeros((n_rows, n_in), device=x.device, dtype=torch.float32) if need_dx else None
    dw = torch.zeros((n_out, n_in), device=x.device, dtype=torch.float32) if need_dw else None
    if not (need_dx or need_dw):
        return dx, dw
    pairs = prev_power_of_two(max(1, 2048 // kp))
    block_c = min(32, pairs, next_power_of_two(n_out))
    block_b = max(1, min(64, pairs // block_c, next_power_of_two(n_rows)))
    grid = (triton.cdiv(n_rows, block_b), triton.cdiv(n_out, block_c))
    _dynamic_k_backward_kernel[grid](
        x, weight, grad_y, idx, dx if need_dx else grad_y, dw if need_dw else grad_y,
        n_rows, n_out, n_in, k,
        NEED_DX=need_dx, NEED_DW=need_dw, KP=kp, BLOCK_B=block_b, BLOCK_C=block_c, num_warps=4,
    )
    return dx, dw

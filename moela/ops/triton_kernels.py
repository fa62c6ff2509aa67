"""The Triton kernels of the triton backend (moela/ops/triton.py holds their wrappers and the op surface).

Portable Triton only: no inline PTX, no TMA or wgmma-specific code, so the same source compiles with
NVIDIA's and ROCm's Triton (and is meant to with triton-ascend). Every kernel loads, converts to fp32,
computes, and casts once when storing; dots accumulate in fp32 through `_dot`.

Under TRITON_INTERPRET=1 (how the tests run them on the CPU) Triton 3.9's interpreter multiplies bf16 bit
patterns in tl.dot and drops the rounding carry of a cast to fp8: `_dot` and `_to_fp8` work around both,
so the kernels give the same answers interpreted and compiled.
Letters: M rows (tokens or (token, head) pairs), N output columns or keys, K the reduced dim,
C latent value width (kv_lora_rank), R rope width, H heads.
"""

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # what triton.jit saw when it decorated the kernels below
_INTERPRET = tl.constexpr(INTERPRET)
FP8_MAX = tl.constexpr(448.0)  # largest finite e4m3fn value


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b in fp32: fp32 operands without tf32; interpreted, in fp32 whatever the operands."""
    if _INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _to_fp8(v):
    """fp32 v (|v| <= 448) -> e4m3fn, rounded to nearest even on the fp32 bits first so the cast is exact."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # keep 3 of fp32's 23 mantissa bits
    return bits.to(tl.float32, bitcast=True).to(tl.float8e4nv)


@triton.jit
def _scaled_dot(acc, a, w, a_scale, w_scale, FP8_A: tl.constexpr):
    """acc + (a @ w) for an fp8 w [K, N] with one scale per column w_scale [N] over this K block: with
    FP8_A, a [M, K] is fp8 with row scales a_scale [M] (fp8 tensor cores); else a is bf16/fp16/fp32 and
    w is converted to a's dtype (any GPU)."""
    if FP8_A:
        if _INTERPRET:
            return acc + _dot(a, w, tl.zeros(acc.shape, tl.float32)) * (a_scale[:, None] * w_scale[None, :])
        return acc + tl.dot(a, w) * (a_scale[:, None] * w_scale[None, :])
    return acc + _dot(a, w.to(a.dtype), tl.zeros(acc.shape, tl.float32)) * w_scale[None, :]


@triton.jit
def rms_norm_kernel(x, res, weight, out, total, n_rows, stride_x, stride_r, D, eps,
                    ADD: tl.constexpr, WEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK_ROWS rows: out = [weight *] rms_norm(x [+ res]), the sum (rounded to out's dtype) stored in total."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    h = tl.load(x + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ADD:
        h = h + tl.load(res + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = h.to(out.dtype.element_ty)
        tl.store(total + rows[:, None] * D + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)
    normed = (h / tl.sqrt(tl.sum(h * h, axis=1) / D + eps)[:, None]).to(out.dtype.element_ty)
    if WEIGHT:
        normed = tl.load(weight + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :] * normed.to(tl.float32)
    tl.store(out + rows[:, None] * D + cols[None, :], normed.to(out.dtype.element_ty), mask=mask)


@triton.jit
def rope_kernel(x, cos, sin, out, n_rows, H, HALF, stride_t, stride_h, stride_c,
                INTERLEAVE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr):
    """BLOCK_ROWS (token, head) rows: rotate pairs (2i, 2i+1) or (i, i + HALF) by cos/sin [T, HALF] (fp32)."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    t, h = rows // H, rows % H
    i = tl.arange(0, BLOCK_R)
    mask = (rows[:, None] < n_rows) & (i[None, :] < HALF)
    if INTERLEAVE:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF
    src = x + (t * stride_t + h * stride_h)[:, None]
    x1 = tl.load(src + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + second[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos + t[:, None] * stride_c + i[None, :], mask=mask, other=0.0)
    s = tl.load(sin + t[:, None] * stride_c + i[None, :], mask=mask, other=0.0)
    dst = out + rows[:, None] * 2 * HALF
    tl.store(dst + first[None, :], (x1 * c - x2 * s).to(out.dtype.element_ty), mask=mask)
    tl.store(dst + second[None, :], (x2 * c + x1 * s).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _latent_rows(table, first, pos, ok, block_size, PAGED: tl.constexpr):
    """Rows of sequence positions pos: through the sequence's block table (PAGED), else first + pos."""
    if PAGED:
        block = tl.load(table + pos // block_size, mask=ok, other=0).to(tl.int64)
        row = block * block_size + pos % block_size
    else:
        row = first + pos
    return row


@triton.jit
def _attend_rows(qc, qr, k_row, ok, c, r, C, R, scale, m, l, acc):
    """One tile of absorbed MLA's online softmax: queries [M, C] + [M, R] against the latent rows k_row [N]
    (keys [c_KV | k_pe], values their first C columns; rows where ok is False count for nothing) ->
    the running max m [M], sum l [M] and output acc [M, C] after them."""
    kc = tl.load(k_row + c[None, :], mask=ok[:, None] & (c[None, :] < C), other=0.0)
    kr = tl.load(k_row + C + r[None, :], mask=ok[:, None] & (r[None, :] < R), other=0.0)
    s = _dot(qr, tl.trans(kr), _dot(qc, tl.trans(kc), tl.zeros([qc.shape[0], kc.shape[0]], tl.float32))) * scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid row yet: nothing to rescale
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    return m_new, l * alpha + tl.sum(p, axis=1), _dot(p.to(kc.dtype), kc, acc * alpha[:, None])


@triton.jit
def latent_attention_kernel(q, keys, tables, tokens, out, part_o, part_lse,
                            stride_qt, stride_qh, stride_tb, stride_k, H, C, R, scale, block_size, splits,
                            PAGED: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """One absorbed query token, BLOCK_M of its heads, one of `splits` slices of the keys it may see.

    tokens [T_abs, 4] int32: (token row, block-table row, keys it sees, first row of its sequence). Keys are
    [c_KV | k_pe] rows of the paged cache (PAGED) or of the step's own latents; values are their first C
    columns. With one split the output is final; else each slice leaves its normalized partial output
    and log-sum-exp for merge_splits_kernel."""
    a = tl.program_id(0)
    split = tl.program_id(2)
    t = tl.load(tokens + 4 * a).to(tl.int64)
    b = tl.load(tokens + 4 * a + 1).to(tl.int64)
    limit = tl.load(tokens + 4 * a + 2)
    heads = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    c, r = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    q_row = q + t * stride_qt + heads[:, None] * stride_qh
    qc = tl.load(q_row + c[None, :], mask=(heads[:, None] < H) & (c[None, :] < C), other=0.0)
    qr = tl.load(q_row + C + r[None, :], mask=(heads[:, None] < H) & (r[None, :] < R), other=0.0)
    per_split = tl.cdiv(tl.cdiv(limit, splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(limit, lo + per_split)
    first = tl.load(tokens + 4 * a + 3).to(tl.int64)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        ok = pos < hi
        row = _latent_rows(tables + b * stride_tb, first, pos, ok, block_size, PAGED)
        m, l, acc = _attend_rows(qc, qr, keys + row[:, None] * stride_k, ok, c, r, C, R, scale, m, l, acc)
    mask = (heads[:, None] < H) & (c[None, :] < C)
    if splits == 1:
        tl.store(out + (t * H + heads)[:, None] * C + c[None, :], (acc / l[:, None]).to(out.dtype.element_ty), mask=mask)
    else:
        part = (a * H + heads).to(tl.int64) * splits + split
        l_safe = tl.where(l == 0.0, 1.0, l)  # an empty slice: weight 0 in the merge
        tl.store(part_o + part[:, None] * C + c[None, :], acc / l_safe[:, None], mask=mask)
        tl.store(part_lse + part, tl.where(l == 0.0, float("-inf"), m + tl.log(l_safe)), mask=heads < H)


@triton.jit
def sparse_latent_attention_kernel(q, keys, tables, owner, indices, out, stride_qt, stride_qh, stride_tb, stride_k,
                                   stride_i, H, C, R, K, scale, block_size, PAGED: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """One query token, BLOCK_M of its heads, over the K latent positions its indexer picked (indices [T, K],
    -1 = none). owner [T]: the token's block-table row (PAGED) or the first row of its sequence in the step's
    own latents. The keys are gathered row by row, so the cost follows K, not the context."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    c, r = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    q_row = q + t * stride_qt + heads[:, None] * stride_qh
    qc = tl.load(q_row + c[None, :], mask=(heads[:, None] < H) & (c[None, :] < C), other=0.0)
    qr = tl.load(q_row + C + r[None, :], mask=(heads[:, None] < H) & (r[None, :] < R), other=0.0)
    base = tl.load(owner + t).to(tl.int64)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for n0 in range(0, K, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        pos = tl.load(indices + t * stride_i + n, mask=n < K, other=-1).to(tl.int64)
        ok = pos >= 0
        pos = tl.maximum(pos, 0)
        row = _latent_rows(tables + base * stride_tb, base, pos, ok, block_size, PAGED)
        m, l, acc = _attend_rows(qc, qr, keys + row[:, None] * stride_k, ok, c, r, C, R, scale, m, l, acc)
    l = tl.where(l == 0.0, 1.0, l)  # a query with no picks at all: zeros
    tl.store(out + (t * H + heads)[:, None] * C + c[None, :], (acc / l[:, None]).to(out.dtype.element_ty),
             mask=(heads[:, None] < H) & (c[None, :] < C))


@triton.jit
def merge_splits_kernel(part_o, part_lse, tokens, out, H, C, SPLITS: tl.constexpr, BLOCK_C: tl.constexpr):
    """One (absorbed token, head): the softmax-weighted sum of its slices' partial outputs, one slice at a time."""
    row = tl.program_id(0).to(tl.int64)  # absorbed token * H + head
    t = tl.load(tokens + 4 * (row // H)).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    lse = tl.load(part_lse + row * SPLITS + tl.arange(0, SPLITS))
    top = tl.max(lse, axis=0)  # finite: the slice holding the token's own position is never empty
    acc = tl.zeros([BLOCK_C], tl.float32)
    for s in range(SPLITS):
        w = tl.exp(tl.load(part_lse + row * SPLITS + s) - top)
        acc += w * tl.load(part_o + (row * SPLITS + s) * C + c, mask=c < C, other=0.0)
    merged = acc / tl.sum(tl.exp(lse - top), axis=0)
    tl.store(out + (t * H + row % H) * C + c, merged.to(out.dtype.element_ty), mask=c < C)


@triton.jit
def causal_attention_kernel(q, k, v, out, S, DK, DV, scale, sq_h, sq_s, sk_h, sk_s, sv_h, sv_s,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """BLOCK_M queries of one head attend keys up to their own position (flash attention, online softmax)."""
    start = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    rows = start + tl.arange(0, BLOCK_M)
    dk, dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    qt = tl.load(q + h * sq_h + rows[:, None] * sq_s + dk[None, :], mask=(rows[:, None] < S) & (dk[None, :] < DK), other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(0, tl.minimum(start + BLOCK_M, S), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(k + h * sk_h + cols[:, None] * sk_s + dk[None, :], mask=(cols[:, None] < S) & (dk[None, :] < DK), other=0.0)
        vt = tl.load(v + h * sv_h + cols[:, None] * sv_s + dv[None, :], mask=(cols[:, None] < S) & (dv[None, :] < DV), other=0.0)
        s = _dot(qt, tl.trans(kt), tl.zeros([BLOCK_M, BLOCK_N], tl.float32)) * scale
        s = tl.where((cols[None, :] <= rows[:, None]) & (cols[None, :] < S), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: key 0 is visible to every row
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = _dot(p.to(vt.dtype), vt, acc * alpha[:, None])
        m = m_new
    o = acc / l[:, None]
    tl.store(out + (h * S + rows[:, None]) * DV + dv[None, :], o.to(out.dtype.element_ty), mask=(rows[:, None] < S) & (dv[None, :] < DV))


@triton.jit
def quantize_kernel(x, q, scale, M, K, stride_x, BLOCK_ROWS: tl.constexpr, GROUP: tl.constexpr):
    """BLOCK_ROWS rows' groups of GROUP values -> e4m3, one fp32 scale (amax / 448) each: DeepSeek's 1x128 activations."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    g = tl.program_id(1)
    k = g * GROUP + tl.arange(0, GROUP)
    mask = (rows[:, None] < M) & (k[None, :] < K)
    v = tl.load(x + rows[:, None] * stride_x + k[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-12) / FP8_MAX
    tl.store(q + rows[:, None] * K + k[None, :], _to_fp8(v / s[:, None]), mask=mask)
    tl.store(scale + rows * tl.cdiv(K, GROUP) + g, s, mask=rows < M)


@triton.jit
def fp8_linear_kernel(a, a_scale, w, w_scale, out, M, N, K, stride_a, stride_w, stride_ws,
                      SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, FP8_A: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [M, N] = a [M, K] @ w [N, K]^T for an e4m3 w with one scale per SCALE_N x SCALE_K block (BLOCK_K
    divides SCALE_K, so each K step lies in one block); with FP8_A, a is e4m3 with one scale per 1 x SCALE_K."""
    m, n, kk = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    rows, cols = tl.program_id(0) * BLOCK_M + m, tl.program_id(1) * BLOCK_N + n
    a_tile = a + (tl.program_id(0) * BLOCK_M).to(tl.int64) * stride_a + m[:, None] * stride_a  # 64-bit base, 32-bit offsets
    w_tile = w + (tl.program_id(1) * BLOCK_N).to(tl.int64) * stride_w + n[None, :] * stride_w
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        at = tl.load(a_tile + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        wt = tl.load(w_tile + k[:, None], mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
        w_s = tl.load(w_scale + (cols // SCALE_N) * stride_ws + k0 // SCALE_K, mask=cols < N, other=0.0)
        a_s = w_s  # unused unless FP8_A
        if FP8_A:
            a_s = tl.load(a_scale + rows * tl.cdiv(K, SCALE_K) + k0 // SCALE_K, mask=rows < M, other=0.0)
        acc = _scaled_dot(acc, at, wt, a_s, w_s, FP8_A)
    tl.store(out + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(out.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def moe_gate_up_kernel(x, x_scale, w, w_scale, pairs, block_expert, h, D, I, TOPK, num_pairs, limit,
                       stride_x, stride_we, stride_wn, stride_se, stride_sn,
                       FP8_W: tl.constexpr, FP8_A: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
                       CLAMP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One block of (token, expert) pairs of one expert, BLOCK_N of its I intermediate columns:
    h[row] = silu(x[token] @ gate^T) * (x[token] @ up^T), gate and up the halves of w [E, 2I, D]; with
    CLAMP (V4), gate <= limit and up within [-limit, limit] first."""
    e = tl.load(block_expert + tl.program_id(0)).to(tl.int64)
    if e < 0:  # past the last expert's rows
        return
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs + rows)
    ok = pair < num_pairs
    token = (pair // TOPK).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    gate_rows = w + e * stride_we + (tl.program_id(1) * BLOCK_N).to(tl.int64) * stride_wn + tl.arange(0, BLOCK_N)[None, :] * stride_wn
    up_rows = gate_rows + I * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + kk
        at = tl.load(x + token[:, None] * stride_x + k[None, :], mask=ok[:, None] & (k[None, :] < D), other=0.0)
        w_mask = (k[:, None] < D) & (n[None, :] < I)
        wg = tl.load(gate_rows + k[:, None], mask=w_mask, other=0.0)
        wu = tl.load(up_rows + k[:, None], mask=w_mask, other=0.0)
        if FP8_W:
            scales = w_scale + e * stride_se + k0 // SCALE_K
            s_g = tl.load(scales + (n // SCALE_N) * stride_sn, mask=n < I, other=0.0)
            s_u = tl.load(scales + ((n + I) // SCALE_N) * stride_sn, mask=n < I, other=0.0)
            a_s = s_g  # unused unless FP8_A
            if FP8_A:
                a_s = tl.load(x_scale + token * tl.cdiv(D, SCALE_K) + k0 // SCALE_K, mask=ok, other=0.0)
            acc_g = _scaled_dot(acc_g, at, wg, a_s, s_g, FP8_A)
            acc_u = _scaled_dot(acc_u, at, wu, a_s, s_u, FP8_A)
        else:
            acc_g = _dot(at, wg, acc_g)
            acc_u = _dot(at, wu, acc_u)
    if CLAMP:
        acc_g = tl.minimum(acc_g, limit)
        acc_u = tl.minimum(tl.maximum(acc_u, -limit), limit)
    out = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h + rows[:, None].to(tl.int64) * I + n[None, :], out.to(h.dtype.element_ty), mask=ok[:, None] & (n[None, :] < I))


@triton.jit
def moe_down_kernel(h, h_scale, w, w_scale, pairs, block_expert, weights, y, D, I, num_pairs,
                    stride_we, stride_wn, stride_se, stride_sn,
                    FP8_W: tl.constexpr, FP8_A: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One block of pairs of one expert, BLOCK_N of the D output columns:
    y[pair] = routing weight of the pair * (h[row] @ down^T), down = w [E, D, I]."""
    e = tl.load(block_expert + tl.program_id(0)).to(tl.int64)
    if e < 0:
        return
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs + rows)
    ok = pair < num_pairs
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    down_rows = w + e * stride_we + (tl.program_id(1) * BLOCK_N).to(tl.int64) * stride_wn + tl.arange(0, BLOCK_N)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + kk
        at = tl.load(h + rows[:, None].to(tl.int64) * I + k[None, :], mask=ok[:, None] & (k[None, :] < I), other=0.0)
        wt = tl.load(down_rows + k[:, None], mask=(k[:, None] < I) & (n[None, :] < D), other=0.0)
        if FP8_W:
            s_w = tl.load(w_scale + e * stride_se + (n // SCALE_N) * stride_sn + k0 // SCALE_K, mask=n < D, other=0.0)
            a_s = s_w  # unused unless FP8_A
            if FP8_A:
                a_s = tl.load(h_scale + rows * tl.cdiv(I, SCALE_K) + k0 // SCALE_K, mask=ok, other=0.0)
            acc = _scaled_dot(acc, at, wt, a_s, s_w, FP8_A)
        else:
            acc = _dot(at, wt, acc)
    rw = tl.load(weights + pair, mask=ok, other=0.0)
    out = acc * rw[:, None]
    tl.store(y + pair[:, None].to(tl.int64) * D + n[None, :], out.to(y.dtype.element_ty), mask=ok[:, None] & (n[None, :] < D))

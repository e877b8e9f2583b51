"""Block geometry and block-mask conventions shared by the block-sparse operators.

Blocks are ``block`` consecutive tokens at ABSOLUTE positions: key block j holds key positions
[j * block, (j + 1) * block); the last one may be partial. With ``Tk`` keys (history first, as in a KV
cache) and ``T`` queries, query i sits at absolute position ``Tk - T + i`` and belongs to absolute
block ``(Tk - T + i) // block``. Query blocks are numbered from the first one that holds a query:

    nK = ceil(Tk / block)        key blocks
    q0 = (Tk - T) // block       absolute block of the first query
    nQ = nK - q0                 query blocks (the first and the last may be partial)

Query block r is absolute block ``q0 + r``: its diagonal key block is ``q0 + r``. With ``T == Tk``
(plain prefill) q0 = 0 and nQ = nK. Note ``q0 = nK - nQ``, so a mask's shape alone gives it.

**Boolean form** ``block_mask``: (B, Hg, nQ, nK) bool, True = the query block attends that key block.
``Hg`` (selection heads) divides the query heads H; query head h uses row ``h // (H // Hg)``. With
Hg = Hk (the KV heads) a GQA group shares one selection (what a SeerAttention gate with shared key
pooling gives); Hg = H is a selection per query head; Hg = 1 one for all heads. Entries above the
block diagonal (key block > q0 + r) are ignored; the exact causal mask applies inside the diagonal
block. The operators expect the sink (key block 0) and the diagonal block kept (the naive reference
asserts it; the kernels do not need it).

**Index form** (``block_mask_to_index``): ``idx`` (B, Hg, nQ, S) int32, the selected causal key blocks
of each query block in ascending order, padded with -1, and ``cnt`` (B, Hg, nQ) int32 their number.
The prefill kernel reads ``idx[..., :cnt]`` and applies the element-wise causal mask to the last entry
only, so every earlier entry must lie strictly before the query block: a list built by hand (from a
top-k, say) must be causal and sorted ascending.

**Decode** (one new token whose key/value are already the cache's last entry, so the query is at
position L - 1 of a cache of L tokens): ``block_idx`` (B, Hg, S) int32 with ``block_cnt`` (B, Hg)
int32: the first ``block_cnt`` entries are the distinct key blocks to read, in any order, the last
partial block included (the caller keeps it). ``decode_index`` builds them from a (B, Hg, nK) mask.
"""

from __future__ import annotations

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_layout(T: int, Tk: int, block: int) -> tuple[int, int, int]:
    """(q0, nQ, nK) for T queries at the end of Tk keys; see the module docstring."""
    if not 0 < T <= Tk:
        raise ValueError(f"need 0 < T <= Tk (queries are the last T of Tk keys), got T={T}, Tk={Tk}")
    nK = cdiv(Tk, block)
    q0 = (Tk - T) // block
    return q0, nK - q0, nK


def causal_block_mask(nQ: int, nK: int, device=None) -> torch.Tensor:
    """(nQ, nK) bool: key block j is causally visible to query block r (j <= nK - nQ + r)."""
    r = torch.arange(nQ, device=device)[:, None]
    j = torch.arange(nK, device=device)[None, :]
    return j <= r + (nK - nQ)


def diagonal_and_sink(nQ: int, nK: int, device=None) -> torch.Tensor:
    """(nQ, nK) bool: the blocks every query block must keep (the sink and the diagonal)."""
    r = torch.arange(nQ, device=device)[:, None]
    j = torch.arange(nK, device=device)[None, :]
    return (j == 0) | (j == r + (nK - nQ))


def check_block_mask(block_mask: torch.Tensor, B: int, H: int, nQ: int, nK: int) -> int:
    """Validate the shape of a boolean block mask; return Hg."""
    if block_mask.dim() != 4 or block_mask.shape[0] != B or tuple(block_mask.shape[2:]) != (nQ, nK):
        raise ValueError(f"block_mask must be (B={B}, Hg, nQ={nQ}, nK={nK}), got {tuple(block_mask.shape)}")
    Hg = block_mask.shape[1]
    if H % Hg:
        raise ValueError(f"block_mask has {Hg} heads, which does not divide the {H} query heads")
    return Hg


def block_mask_to_index(block_mask: torch.Tensor, *, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hg, nQ, nK) bool -> (idx (B, Hg, nQ, S) int32 ascending, -1 padded; cnt (B, Hg, nQ) int32).
    Entries above the block diagonal are dropped. S = the largest count (one host sync) unless
    ``width`` is given (at least that count; a fixed width keeps shapes static)."""
    nQ, nK = block_mask.shape[-2:]
    m = block_mask.bool() & causal_block_mask(nQ, nK, block_mask.device)
    return _mask_rows_to_index(m, width)


def decode_index(mask: torch.Tensor, *, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hg, nK) bool key-block mask for one decoding step -> (block_idx (B, Hg, S), block_cnt (B, Hg))."""
    return _mask_rows_to_index(mask.bool(), width)


def _mask_rows_to_index(m: torch.Tensor, width: int | None):
    nK = m.shape[-1]
    cnt = m.sum(-1, dtype=torch.int32)
    most = int(cnt.max().item()) if m.numel() else 0
    if width is not None and most > width:
        raise ValueError(f"width={width} is smaller than the largest count of selected blocks ({most})")
    S = max(1, most if width is None else int(width))
    # O(n) compaction, no sort: the selected block j goes to slot (number selected before it); the
    # others all go to a spare slot S that is cut off
    slot = torch.where(m, m.cumsum(-1, dtype=torch.int32) - 1, S).long()
    idx = torch.full((*m.shape[:-1], S + 1), -1, dtype=torch.int32, device=m.device)
    idx.scatter_(-1, slot, torch.arange(nK, dtype=torch.int32, device=m.device).expand(m.shape))
    idx = idx[..., :S].contiguous()
    return idx, cnt


def index_to_mask(idx: torch.Tensor, cnt: torch.Tensor, nK: int) -> torch.Tensor:
    """Inverse of the conversions above: (..., S) indices with (...) counts -> (..., nK) bool."""
    S = idx.shape[-1]
    keep = torch.arange(S, device=idx.device) < cnt[..., None].long()
    m = torch.zeros(*idx.shape[:-1], nK + 1, dtype=torch.bool, device=idx.device)
    m.scatter_(-1, torch.where(keep, idx.long(), torch.full_like(idx.long(), nK)), True)
    return m[..., :nK]


def streaming_block_mask(T: int, Tk: int, block: int, sink: int, local: int, device=None) -> torch.Tensor:
    """(1, 1, nQ, nK) bool: the sink blocks and the ``local`` most recent blocks (the diagonal one
    included) of each query block: streaming attention (``streaming_attn/naive.py``) as a block mask."""
    q0, nQ, nK = block_layout(T, Tk, block)
    r = torch.arange(q0, q0 + nQ, device=device)[:, None]
    j = torch.arange(nK, device=device)[None, :]
    return (((j < sink) | (j > r - local)) & (j <= r))[None, None]


def random_block_mask(B: int, Hg: int, T: int, Tk: int, block: int, sparsity: float, *,
                      generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A random (B, Hg, nQ, nK) causal block mask that skips about ``sparsity`` of the causal blocks
    (each causal block other than the sink and the diagonal is kept with probability chosen so that
    the expected kept fraction of all causal blocks is 1 - sparsity, floored at 0), sink and diagonal
    always kept."""
    _, nQ, nK = block_layout(T, Tk, block)
    causal = causal_block_mask(nQ, nK)
    must = diagonal_and_sink(nQ, nK) & causal
    n_causal, n_must = int(causal.sum()), int(must.sum())
    free = n_causal - n_must
    want = (1.0 - sparsity) * n_causal - n_must
    p = 0.0 if free <= 0 else min(1.0, max(0.0, want / free))
    m = torch.rand(B, Hg, nQ, nK, generator=generator) < p
    m = (m & causal) | must
    return m.to(device) if device is not None else m


def density(block_mask: torch.Tensor) -> float:
    """Kept fraction of the causal blocks (what ``--sparsity`` is one minus)."""
    nQ, nK = block_mask.shape[-2:]
    causal = causal_block_mask(nQ, nK, block_mask.device)
    kept = (block_mask.bool() & causal).sum().item()
    return kept / (causal.sum().item() * block_mask.shape[0] * block_mask.shape[1])


def flex_block_mask(block_mask: torch.Tensor, H: int, T: int, Tk: int, block: int, *, exact: bool = False):
    """The same attention pattern as a FlexAttention ``BlockMask`` (for comparisons): the selected
    blocks below the diagonal are full blocks, the diagonal ones partial blocks under the causal
    ``mask_mod``. Heads are expanded to the H query heads. Needs (Tk - T) % block == 0 (FlexAttention
    numbers query blocks from the first query). The compiled kernels skip the blocks the BlockMask
    leaves out; FlexAttention's unfused (eager) path applies only ``mask_mod``, so ``exact`` makes the
    mask_mod read the block mask as well (for checks on CPU; slower when compiled)."""
    from torch.nn.attention.flex_attention import BlockMask

    if (Tk - T) % block:
        raise ValueError("flex_block_mask needs the query offset Tk - T to be a multiple of block")
    q0, nQ, nK = block_layout(T, Tk, block)
    B, Hg = block_mask.shape[:2]
    dev = block_mask.device
    m = block_mask.bool() & causal_block_mask(nQ, nK, dev)
    m = m[:, torch.arange(H, device=dev) // (H // Hg)]
    r = torch.arange(nQ, device=dev)[:, None]
    diag = torch.arange(nK, device=dev)[None, :] == r + q0
    partial, full = m & diag, m & ~diag
    p_idx, p_cnt = _mask_rows_to_index(partial, nK)
    f_idx, f_cnt = _mask_rows_to_index(full, nK)
    # BlockMask wants valid indices everywhere (the counts say how many are used)
    p_idx, f_idx = p_idx.clamp_min(0), f_idx.clamp_min(0)
    off = Tk - T

    def causal(b, h, q_idx, kv_idx):
        return q_idx + off >= kv_idx

    def causal_and_selected(b, h, q_idx, kv_idx):
        return (q_idx + off >= kv_idx) & m[b, h, (q_idx + off) // block - q0, kv_idx // block]

    return BlockMask.from_kv_blocks(p_cnt, p_idx, f_cnt, f_idx, BLOCK_SIZE=block,
                                    mask_mod=causal_and_selected if exact else causal,
                                    seq_lengths=(T, Tk))

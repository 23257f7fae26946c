"""Variable-length attention for packed rows: each sample attends to itself only, and nothing is spent
on the pairs of tokens that belong to different samples.

transformers' `sdpa` path keeps packed samples apart with a block-diagonal mask built from the
restarting `position_ids`, but still computes attention over the whole row (row_length^2 per head).
`varlen` computes it per sample (sum of sample_length^2): on a CUDA device in bf16/fp16 through
PyTorch's own flash-attention varlen kernel (`torch.nn.attention.varlen`, no flash-attn package
needed), elsewhere with one causal `scaled_dot_product_attention` call per sample.

The sample boundaries come as `cu_seq_lens_q` / `max_length_q`, the keyword arguments transformers
already passes from the model call down to every attention layer of the language model (the names
its flash-attention path uses), and only there: the vision tower never sees them. Without them they
are read from restarting `position_ids`, as transformers does. A padded batch (it has an attention
mask) and generation with a cache take transformers' `sdpa` path unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "varlen"


def boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sample starts over the flattened rows (int32, flash-attention's `cu_seqlens`) and the
    longest sample, from position ids that restart at 0 for each sample (and at each row's start)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def flash_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The half-precision dtype the flash kernel is to run in, None when training is in fp32. Under
    bf16 mixed precision (autocast over fp32 weights) queries and keys reach attention in fp32: the
    rotary embedding multiplies them by fp32 cos/sin, and autocast does not cover that product. So
    the query's own dtype is not enough; the autocast dtype counts (as in transformers' flash path)."""
    if query.dtype in (torch.bfloat16, torch.float16):
        return query.dtype
    device = query.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in (
        torch.bfloat16,
        torch.float16,
    ):
        return torch.get_autocast_dtype(device)
    return None


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Same contract as transformers' attention functions: query [b, heads, s, d], key/value
    [b, kv_heads, s, d]; returns [b, s, heads, d]."""
    if (
        attention_mask is not None
        or query.shape[2] != key.shape[2]
        or (cu_seq_lens_q is None and position_ids is None)
    ):
        # a padded batch, or a decoding step against a cache: not packed rows
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if cu_seq_lens_q is None:
        cu_seq_lens_q, max_length_q = boundaries(position_ids.expand(query.shape[0], -1))
    if kwargs.get("sliding_window") is not None:
        raise ValueError("varlen attention does not implement sliding-window layers; use sdpa")
    b, heads, s, d = query.shape
    gqa = key.shape[1] != heads
    half = flash_dtype(query)
    if query.is_cuda and half is not None and not dropout:
        from torch.nn.attention.varlen import varlen_attn

        def flat(t: torch.Tensor) -> torch.Tensor:  # [b, h, s, d] -> [b*s, h, d]
            return t.transpose(1, 2).reshape(b * s, t.shape[1], d).to(half)

        out = varlen_attn(
            flat(query),
            flat(key),
            flat(value),
            cu_seq_lens_q,
            cu_seq_lens_q,
            max_length_q,
            max_length_q,
            scale=scaling,
            window_size=(-1, 0),  # causal
            enable_gqa=gqa,
        )
        return out.view(b, s, heads, d), None
    # One causal sdpa call per sample. A sample never crosses a row: every row starts at position 0.
    parts = []
    cu = cu_seq_lens_q.tolist()
    for start, end in zip(cu[:-1], cu[1:], strict=True):
        row, a = divmod(start, s)
        e = a + end - start
        q, k, v = (t[row : row + 1, :, a:e] for t in (query, key, value))
        o = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout if module.training else 0.0,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        parts.append(o[0].transpose(0, 1))  # [len, heads, d]
    return torch.cat(parts).view(b, s, heads, d), None


def varlen_mask(*, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Padded batches and generation keep sdpa's masks; rows without a padding mask get none: their
    samples are kept apart by `varlen_attention_forward` itself, and the block-diagonal mask
    transformers would build for packed rows is never materialised."""
    return None if attention_mask is None else sdpa_mask(attention_mask=attention_mask, **kwargs)


def register_varlen() -> str:
    """Makes `varlen` an attention implementation transformers knows (`set_attn_implementation`,
    `attn_implementation=`), with its mask function; returns the name. Called where the implementation
    is chosen; calling it again changes nothing."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)
    return NAME

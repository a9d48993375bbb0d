"""Tests of the dense oracle itself against spec/NEIGHBORHOOD.md (needs torch only)."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import reference
import torch
import torch.nn.functional as F
from conftest import assert_close, make_inputs

# The spec's worked 1-D examples, copied verbatim: (L, K, stride, dilation, causal) -> row.
WORKED_EXAMPLES = {
    (7, 3, 1, 1, False): "0:{0,1,2} 1:{0,1,2} 2:{1,2,3} 3:{2,3,4} 4:{3,4,5} 5:{4,5,6} 6:{4,5,6}",
    (7, 4, 1, 1, False): "0:{0..3} 1:{0..3} 2:{0..3} 3:{1..4} 4:{2..5} 5:{3..6} 6:{3..6}",
    (8, 4, 2, 1, False): "0,1:{0..3} 2,3:{1..4} 4,5:{3..6} 6,7:{4..7}",
    (8, 4, 4, 1, False): "0-3:{0..3} 4-7:{4..7}",
    (7, 3, 1, 1, True): "0:{0} 1:{0,1} 2:{0,1,2} 3:{1,2,3} 4:{2,3,4} 5:{3,4,5} 6:{4,5,6}",
    (8, 3, 2, 1, True): "0:{0} 1:{0,1} 2:{1,2} 3:{1,2,3} 4:{3,4} 5:{3,4,5} 6:{5,6} 7:{5,6,7}",
    (10, 3, 1, 3, False): (
        "0:{0,3,6} 1:{1,4,7} 2:{2,5,8} 3:{0,3,6} 4:{1,4,7} 5:{2,5,8} 6:{3,6,9} 7:{1,4,7} "
        "8:{2,5,8} 9:{3,6,9}"
    ),
    (10, 3, 1, 3, True): (
        "0:{0} 1:{1} 2:{2} 3:{0,3} 4:{1,4} 5:{2,5} 6:{0,3,6} 7:{1,4,7} 8:{2,5,8} 9:{3,6,9}"
    ),
    (9, 2, 2, 2, False): (
        "0:{0,2} 1:{1,3} 2:{0,2} 3:{1,3} 4:{4,6} 5:{5,7} 6:{4,6} 7:{5,7} 8:{6,8}"
    ),
}


def _numbers(text: str, range_sep: str) -> list[int]:
    """'0,1' / '0-3' (queries) or '0,1,2' / '0..3' (keys) -> list of ints."""
    if range_sep in text:
        first, last = text.split(range_sep)
        return list(range(int(first), int(last) + 1))
    return [int(n) for n in text.split(",")]


def parse_row(row: str) -> dict[int, list[int]]:
    """Parse one 'query: keys' cell of the spec's table into {query: sorted keys}."""
    keys_of = {}
    for queries, keys in re.findall(r"([\d,-]+):\{([\d,.]+)\}", row):
        for query in _numbers(queries, "-"):
            keys_of[query] = _numbers(keys, "..")
    return keys_of


def mask_rows(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in mask]


@pytest.mark.parametrize("params", list(WORKED_EXAMPLES), ids=str)
def test_worked_example(params):
    length, kernel, stride, dilation, causal = params
    expected = parse_row(WORKED_EXAMPLES[params])
    assert sorted(expected) == list(range(length)), "the table row covers every query"
    keys = reference.axis_keys(length, kernel, stride, dilation, causal)
    assert keys == [expected[i] for i in range(length)]
    mask = reference.neighborhood_mask((length,), kernel, stride, dilation, causal)
    assert mask_rows(mask) == keys


@pytest.mark.parametrize("params", [p for p in WORKED_EXAMPLES if p[2] == 1], ids=str)
def test_worked_example_slots(params):
    length, kernel, _, dilation, causal = params
    expected = parse_row(WORKED_EXAMPLES[params])
    slots = reference.axis_slots(length, kernel, dilation, causal)
    for query, row in enumerate(slots):
        valid = [key for key in row if key >= 0]
        assert valid == expected[query]
        assert row == valid + [-1] * (kernel - len(valid)), "invalid slots come last"


@pytest.mark.parametrize(
    "shape, kernel, stride, dilation",
    [
        ((13,), 5, 1, 2),
        ((11,), 4, 3, 1),
        ((9, 10), (3, 4), (2, 1), (3, 2)),
        ((7, 8, 9), (3, 2, 5), (3, 2, 1), (2, 3, 1)),
        ((6, 7, 5), 2, 2, 1),
    ],
)
def test_non_causal_query_sees_prod_k_keys(shape, kernel, stride, dilation):
    mask = reference.neighborhood_mask(shape, kernel, stride, dilation)
    kernel = (kernel,) * len(shape) if isinstance(kernel, int) else kernel
    assert mask.sum(dim=1).eq(math.prod(kernel)).all()


def _group_keys(length: int, group: int, dilation: int) -> list[int]:
    return [p for p in range(length) if p % dilation == group]


@pytest.mark.parametrize(
    "shape, kernel, dilation",
    [((9, 10), (3, 5), (2, 1)), ((10, 7, 8), (3, 3, 2), (3, 2, 1)), ((12,), (5,), (2,))],
)
def test_corner_query_sees_its_corner_block(shape, kernel, dilation):
    mask = reference.neighborhood_mask(shape, kernel, 1, dilation)
    first = [_group_keys(length, 0, dilation[a])[: kernel[a]] for a, length in enumerate(shape)]
    last = [
        _group_keys(length, (length - 1) % dilation[a], dilation[a])[-kernel[a] :]
        for a, length in enumerate(shape)
    ]
    for query, per_axis in ((0, first), (mask.shape[0] - 1, last)):
        expected = sorted(
            sum(p * math.prod(shape[a + 1 :]) for a, p in enumerate(position))
            for position in itertools.product(*per_axis)
        )
        assert mask_rows(mask[query : query + 1])[0] == expected, query


@pytest.mark.parametrize(
    "shape, kernel, stride, dilation",
    [((9,), 3, 1, 1), ((10, 11), (5, 3), (2, 3), (2, 3)), ((6, 7, 8), 3, (1, 2, 3), 2)],
)
def test_causal_query_zero_sees_only_itself(shape, kernel, stride, dilation):
    mask = reference.neighborhood_mask(shape, kernel, stride, dilation, is_causal=True)
    assert mask_rows(mask[:1]) == [[0]]


@pytest.mark.parametrize("length, kernel, stride, dilation", [(13, 5, 2, 2), (12, 4, 1, 3)])
def test_causal_keys_never_follow_the_query(length, kernel, stride, dilation):
    for query, keys in enumerate(reference.axis_keys(length, kernel, stride, dilation, True)):
        assert keys and max(keys) == query


@pytest.mark.parametrize("shape, kernel", [((12,), 4), ((6, 9), (2, 3)), ((4, 6, 6), (2, 3, 2))])
def test_stride_equal_to_kernel_is_blocked_attention(shape, kernel):
    mask = reference.neighborhood_mask(shape, kernel, stride=kernel)
    kernel = (kernel,) * len(shape) if isinstance(kernel, int) else kernel
    positions = list(itertools.product(*(range(n) for n in shape)))
    blocks = torch.tensor([[p // k for p, k in zip(pos, kernel)] for pos in positions])
    expected = (blocks[:, None, :] == blocks[None, :, :]).all(dim=-1)
    assert torch.equal(mask, expected)


def _sdpa_heads_last(q, k, v, is_causal=False):
    """torch's SDPA on heads-last [B, *spatial, H, D] tensors (tokens flattened)."""
    flat = [t.flatten(1, -3).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*flat, is_causal=is_causal)
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])


@pytest.mark.parametrize("shape", [(9,), (4, 6), (3, 4, 5)])
def test_full_kernel_is_self_attention(shape):
    q, k, v = make_inputs(
        (2, *shape, 3, 8), (2, *shape, 3, 8), (2, *shape, 3, 6), dtype=torch.float64
    )
    out = reference.na(q, k, v, kernel_size=shape)
    assert_close(out, _sdpa_heads_last(q, k, v))
    assert_close(reference.attention(q, k, v), _sdpa_heads_last(q, k, v))


def test_full_causal_kernel_is_causal_attention():
    q, k, v = make_inputs(*[(2, 11, 2, 8)] * 3, dtype=torch.float64)
    expected = _sdpa_heads_last(q, k, v, is_causal=True)
    assert_close(reference.na(q, k, v, 11, is_causal=True), expected)
    assert_close(reference.attention(q, k, v, is_causal=True), expected)


@pytest.mark.parametrize("length, kernel, dilation", [(10, 3, 3), (11, 2, 4), (14, 3, 4)])
def test_unequal_dilation_groups(length, kernel, dilation):
    assert length % dilation != 0
    keys = reference.axis_keys(length, kernel, 1, dilation)
    sizes = []
    for group in range(dilation):
        members = _group_keys(length, group, dilation)
        seen = {key for query in members for key in keys[query]}
        assert seen == set(members), "a group's windows stay in the group and cover it"
        sizes.append(len(members))
    assert sizes == [length // dilation + (g < length % dilation) for g in range(dilation)]
    assert len(set(sizes)) == 2


def test_rpb_index_convention_by_hand():
    # K=3: five entries for offsets -2..+2; index K-1 = 2 is offset 0.
    rpb = torch.tensor([[10.0, 20.0, 30.0, 40.0, 50.0]], dtype=torch.float64)
    bias = reference.rpb_bias((5,), 3, 1, rpb)[0]
    mask = reference.neighborhood_mask((5,), 3)
    windows = [[bias[i, j].item() for j in mask_rows(mask)[i]] for i in range(5)]
    assert windows == [
        [30.0, 40.0, 50.0],  # query 0, keys {0,1,2}: offsets 0, +1, +2
        [20.0, 30.0, 40.0],
        [20.0, 30.0, 40.0],
        [20.0, 30.0, 40.0],
        [10.0, 20.0, 30.0],  # query 4, keys {2,3,4}: offsets -2, -1, 0
    ]


@pytest.mark.parametrize("shape, kernel, dilation", [((11,), 3, 2), ((9, 10), (3, 5), (2, 1))])
def test_rpb_offset_zero_is_index_k_minus_one(shape, kernel, dilation):
    kernel = (kernel,) * len(shape) if isinstance(kernel, int) else kernel
    dilation = (dilation,) * len(shape) if isinstance(dilation, int) else dilation
    rpb = torch.zeros(2, *(2 * k - 1 for k in kernel), dtype=torch.float64)
    rpb[(slice(None), *(k - 1 for k in kernel))] = 1.0
    # One step of +d on the last axis is index K (it is in every non-border window).
    rpb[(slice(None), *(k - 1 for k in kernel[:-1]), kernel[-1])] = 2.0
    bias = reference.rpb_bias(shape, kernel, dilation, rpb)
    mask = reference.neighborhood_mask(shape, kernel, 1, dilation)
    n = mask.shape[0]
    positions = list(itertools.product(*(range(s) for s in shape)))
    expected = torch.zeros(n, n, dtype=torch.float64)
    for i, j in itertools.product(range(n), range(n)):
        delta = [b - a for a, b in zip(positions[i], positions[j])]
        if delta == [0] * len(shape):
            expected[i, j] = 1.0
        elif delta == [0] * (len(shape) - 1) + [dilation[-1]]:
            expected[i, j] = 2.0
    assert torch.equal(torch.where(mask, bias, 0.0)[0], expected * mask)


def test_slot_index_is_row_major_and_matches_mask():
    shape, kernel, dilation, causal = (7, 9, 6), (3, 5, 3), (2, 1, 2), (True, False, True)
    index = reference.slot_index(shape, kernel, dilation, causal)
    slots = [
        reference.axis_slots(n, k, d, c) for n, k, d, c in zip(shape, kernel, dilation, causal)
    ]
    for token, (a, i, j) in enumerate(itertools.product(*(range(n) for n in shape))):
        for slot, (ka, ki, kj) in enumerate(itertools.product(*(range(k) for k in kernel))):
            keys = (slots[0][a][ka], slots[1][i][ki], slots[2][j][kj])
            flat = -1 if min(keys) < 0 else (keys[0] * shape[1] + keys[1]) * shape[2] + keys[2]
            assert index[token, slot].item() == flat
    mask = reference.neighborhood_mask(shape, kernel, 1, dilation, causal)
    for token in range(mask.shape[0]):
        valid = sorted(k for k in index[token].tolist() if k >= 0)
        assert valid == mask_rows(mask[token : token + 1])[0]


def test_out_of_range_axis_is_rejected():
    with pytest.raises(ValueError, match="kernel_size"):
        reference.axis_keys(8, 3, dilation=3)
    with pytest.raises(ValueError, match="stride"):
        reference.axis_keys(8, 3, stride=4)


def test_rpb_outside_its_domain_is_rejected():
    q = torch.zeros(1, 8, 1, 4)
    with pytest.raises(NotImplementedError, match="odd"):
        reference.na(q, q, q, 4, rpb=torch.zeros(1, 7))
    with pytest.raises(NotImplementedError, match="stride"):
        reference.na(q, q, q, 3, stride=2, rpb=torch.zeros(1, 5))


# ---------------------------------------------------------------------------------------------
# Unfused qk/av against fused na: one definition seen through two layouts
# ---------------------------------------------------------------------------------------------

CONSISTENCY_CASES = [
    # spatial, kernel, dilation, causal, rpb, n_extra
    ((13,), 5, 2, False, True, 3),
    ((11,), 3, 3, True, False, 2),
    ((7, 9), (3, 5), (2, 1), False, True, 0),
    ((7, 9), 3, (1, 3), (True, False), False, 1),
    ((5, 6, 7), (3, 3, 5), (1, 2, 1), False, True, 2),
    ((5, 6, 7), 3, 1, (False, True, True), False, 0),
]


def _heads_last(t: torch.Tensor) -> torch.Tensor:
    return t.movedim(1, -2)


@pytest.mark.parametrize("spatial, kernel, dilation, causal, with_rpb, n_extra", CONSISTENCY_CASES)
def test_qk_softmax_av_equals_na(spatial, kernel, dilation, causal, with_rpb, n_extra):
    batch, heads, dim, dim_v = 2, 3, 8, 5
    rank = len(spatial)
    kernels = (kernel,) * rank if isinstance(kernel, int) else kernel
    q, k, ek = make_inputs(
        (batch, heads, *spatial, dim),
        (batch, heads, *spatial, dim),
        (batch, heads, n_extra, dim),
        dtype=torch.float64,
        seed=1,
    )
    v, ev = make_inputs(
        (batch, heads, *spatial, dim_v), (batch, heads, n_extra, dim_v), dtype=torch.float64, seed=2
    )
    rpb = torch.randn(heads, *(2 * k - 1 for k in kernels), dtype=torch.float64)
    rpb = rpb if with_rpb else None
    extras = n_extra > 0
    scale = 0.37
    attn = reference.qk(
        q * scale, k, kernel, dilation, causal, rpb=rpb, additional_keys=ek if extras else None
    )
    assert attn.shape == (batch, heads, *spatial, math.prod(kernels) + n_extra)
    out = reference.av(attn.softmax(-1), v, kernel, dilation, causal, ev if extras else None)
    fused, lse = reference.na(
        _heads_last(q),
        _heads_last(k),
        _heads_last(v),
        kernel,
        1,
        dilation,
        causal,
        scale,
        additional_keys=_heads_last(ek) if extras else None,
        additional_values=_heads_last(ev) if extras else None,
        rpb=rpb,
        return_lse=True,
    )
    assert_close(fused, _heads_last(out))
    assert lse.dtype == torch.float32
    assert_close(lse, attn.logsumexp(-1).movedim(1, -1), torch.float32)


def test_qk_marks_short_causal_windows_with_minus_inf():
    q, k = make_inputs((1, 2, 7, 4), (1, 2, 7, 4), dtype=torch.float64)
    attn = reference.qk(q, k, 3, is_causal=True)
    assert attn[0, 0, 0, 1:].isneginf().all() and attn[0, 0, 1, 2].isneginf()
    assert attn[:, :, 2:].isfinite().all()


def test_av_ignores_invalid_slots_whatever_they_hold():
    attn, v = make_inputs((1, 2, 7, 3), (1, 2, 7, 4), dtype=torch.float64)
    poisoned = attn.clone()
    poisoned[:, :, 0, 1:] = math.nan
    poisoned[:, :, 1, 2] = math.inf
    expected = reference.av(attn, v, 3, is_causal=True)
    assert_close(reference.av(poisoned, v, 3, is_causal=True), expected)
    cleaned = attn.clone()
    cleaned[:, :, 0, 1:] = 0.0
    cleaned[:, :, 1, 2] = 0.0
    assert_close(reference.av(cleaned, v, 3, is_causal=True), expected)


def test_gqa_uses_kv_head_h_over_group():
    q, k, v = make_inputs((2, 6, 7, 4, 8), (2, 6, 7, 2, 8), (2, 6, 7, 2, 3), dtype=torch.float64)
    ek, ev = make_inputs((2, 3, 2, 8), (2, 3, 2, 3), dtype=torch.float64, seed=3)
    out = reference.na(q, k, v, 3, additional_keys=ek, additional_values=ev)
    repeat = [t.repeat_interleave(2, dim=-2) for t in (k, v, ek, ev)]
    expected = reference.na(
        q, repeat[0], repeat[1], 3, additional_keys=repeat[2], additional_values=repeat[3]
    )
    assert_close(out, expected)
    # Head 1 of 4 reads kv head 0; head 2 reads kv head 1.
    single = reference.na(
        q[..., 2:3, :],
        k[..., 1:2, :],
        v[..., 1:2, :],
        3,
        additional_keys=ek[..., 1:2, :],
        additional_values=ev[..., 1:2, :],
    )
    assert_close(out[..., 2:3, :], single)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_return_their_dtype(dtype):
    q, k, v = make_inputs(*[(1, 9, 2, 8)] * 3, dtype=dtype)
    out, lse = reference.na(q, k, v, 3, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    expected = reference.na(q.double(), k.double(), v.double(), 3)
    assert_close(out, expected, dtype)
    attn = reference.qk(q.movedim(-2, 1), k.movedim(-2, 1), 3)
    assert attn.dtype == dtype
    assert reference.av(attn, v.movedim(-2, 1), 3).dtype == dtype


def test_every_function_is_differentiable():
    q, k, v, ek, ev = make_inputs(
        (1, 2, 6, 5, 3),
        (1, 2, 6, 5, 3),
        (1, 2, 6, 5, 2),
        (1, 2, 2, 3),
        (1, 2, 2, 2),
        dtype=torch.float64,
        requires_grad=True,
    )
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    kernel, dilation = 3, (2, 1)
    valid = reference.slot_index((6, 5), kernel, dilation, (True, False)) >= 0

    def chain(q, k, v, ek, ev):
        logits = reference.qk(q, k, kernel, dilation, (True, False), additional_keys=ek)
        return reference.av(logits.softmax(-1), v, kernel, dilation, (True, False), ev)

    def qk_finite(q, k, rpb):
        out = reference.qk(q, k, kernel, dilation, (True, False), rpb=rpb)
        return out.masked_fill(~valid.view(6, 5, -1), 0.0)

    def fused(q, k, v, ek, ev, rpb):
        hl = [t.movedim(1, -2) for t in (q, k, v, ek, ev)]
        return reference.na(
            *hl[:3], kernel, 1, dilation, additional_keys=hl[3], additional_values=hl[4], rpb=rpb
        )

    assert torch.autograd.gradcheck(chain, (q, k, v, ek, ev), fast_mode=True)
    assert torch.autograd.gradcheck(qk_finite, (q, k, rpb), fast_mode=True)
    assert torch.autograd.gradcheck(fused, (q, k, v, ek, ev, rpb), fast_mode=True)

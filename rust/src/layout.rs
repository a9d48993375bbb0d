//! How each tensor's strides map onto the logical axes the kernels index, CPU and CUDA alike:
//! tokens `[batch, heads, s0, s1, s2, channel]` (spatial axes right-aligned, so ranks 1 and 2
//! get leading unit axes), additional tokens `[batch, heads, n, channel]`, bias
//! `[heads, r0, r1, r2]`. Strides are in elements; padding axes get stride 0.

use crate::dlpack::TensorRef;

/// Strides of `t` as `N` logical axes: its leading `lead` axes map to the first ones, the rest
/// to the last ones.
pub fn padded<const N: usize>(t: &TensorRef, lead: usize) -> [isize; N] {
    let mut strides = [0isize; N];
    let tail = t.strides.len() - lead;
    strides[..lead].copy_from_slice(&t.strides[..lead]);
    strides[N - tail..].copy_from_slice(&t.strides[lead..]);
    strides
}

/// A heads-first token tensor `[B, heads, *spatial, C]` of any rank.
pub fn tokens(t: &TensorRef) -> [isize; 6] {
    padded(t, 2)
}

/// An additional-token tensor `[B, heads, n, C]`.
pub fn extras(t: &TensorRef) -> [isize; 4] {
    padded(t, 4)
}

/// A bias tensor `[heads, 2K-1, ...]` of any rank.
pub fn bias(t: &TensorRef) -> [isize; 4] {
    padded(t, 1)
}

/// A heads-last token tensor `[B, *spatial, heads, C]` of `rank` spatial axes; with
/// `channels == false`, a per-token tensor `[B, *spatial, heads]` (channel stride 0).
pub fn tokens_heads_last(t: &TensorRef, rank: usize, channels: bool) -> [isize; 6] {
    let s = &t.strides;
    let mut strides = [0isize; 6];
    strides[0] = s[0];
    strides[1] = s[rank + 1];
    strides[5 - rank..5].copy_from_slice(&s[1..=rank]);
    if channels {
        strides[5] = s[rank + 2];
    }
    strides
}

/// A heads-last additional-token tensor `[B, n, heads, C]`.
pub fn extras_heads_last(t: &TensorRef) -> [isize; 4] {
    let s = &t.strides;
    [s[0], s[2], s[1], s[3]]
}

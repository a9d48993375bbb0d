//! Strided views of borrowed tensors in the kernels' logical index order. Indexing by strides is
//! what lets permuted torch views (heads-first or heads-last) in without a copy.

use crate::dlpack::TensorRef;
use crate::layout;

/// A tensor viewed as `N` logical axes with element strides.
pub struct View<T, const N: usize> {
    ptr: *mut T,
    strides: [isize; N],
}

impl<T, const N: usize> Clone for View<T, N> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, const N: usize> Copy for View<T, N> {}

// SAFETY: a view is an address plus strides. Kernels only read inputs, and write each output
// element from exactly one task; `Problem::expect_output` rules out outputs aliasing inputs.
unsafe impl<T, const N: usize> Send for View<T, N> {}
// SAFETY: as above.
unsafe impl<T, const N: usize> Sync for View<T, N> {}

impl<T, const N: usize> View<T, N> {
    /// View `t` with the logical strides `strides` (from `layout`).
    pub fn new(t: &TensorRef, strides: [isize; N]) -> Self {
        View {
            ptr: t.data as *mut T,
            strides,
        }
    }

    /// View memory at `ptr` with element strides `strides`.
    pub fn from_parts(ptr: *mut T, strides: [isize; N]) -> Self {
        View { ptr, strides }
    }

    /// The same memory viewed as elements of type `U` (the caller knows it holds `U`s).
    pub fn cast<U>(self) -> View<U, N> {
        View {
            ptr: self.ptr as *mut U,
            strides: self.strides,
        }
    }

    /// Stride of the last logical axis.
    pub fn inner_stride(&self) -> isize {
        self.strides[N - 1]
    }

    /// Stride of logical axis `axis`.
    pub fn stride(&self, axis: usize) -> isize {
        self.strides[axis]
    }

    /// The same memory viewed from the element at `index` on (indices count from there).
    ///
    /// # Safety
    /// As `at`.
    #[inline(always)]
    pub unsafe fn rebased(&self, index: [usize; N]) -> Self {
        View {
            // SAFETY: forwarded contract.
            ptr: unsafe { self.at(index) },
            strides: self.strides,
        }
    }

    /// Address of the element at `index`.
    ///
    /// # Safety
    /// `index` must be within the validated shape of the viewed tensor.
    #[inline(always)]
    pub unsafe fn at(&self, index: [usize; N]) -> *mut T {
        let offset: isize = index
            .iter()
            .zip(&self.strides)
            .map(|(&i, &s)| i as isize * s)
            .sum();
        // SAFETY: an in-shape index lands inside the tensor's memory.
        unsafe { self.ptr.offset(offset) }
    }
}

/// Token tensors `[batch, heads, s0, s1, s2, channel]` (queries, keys, values, attention weights
/// with channel = window slot, and their gradients).
pub type Tokens<T> = View<T, 6>;
/// Additional tokens `[batch, heads, n, channel]`.
pub type Extras<T> = View<T, 4>;
/// Relative positional bias `[heads, r0, r1, r2]`.
pub type Bias<T> = View<T, 4>;

/// View a heads-last token tensor `[B, *spatial, heads, C]` of `rank` spatial axes; with
/// `channels == false`, a per-token tensor `[B, *spatial, heads]` (channel index 0 only).
pub fn tokens_heads_last<T>(t: &TensorRef, rank: usize, channels: bool) -> Tokens<T> {
    View::new(t, layout::tokens_heads_last(t, rank, channels))
}

/// View a heads-last additional-token tensor `[B, n, heads, C]` as `[B, heads, n, C]`.
pub fn extras_heads_last<T>(t: &TensorRef) -> Extras<T> {
    View::new(t, layout::extras_heads_last(t))
}

/// View a heads-first token tensor `[B, heads, *spatial, C]` of any rank.
pub fn tokens<T>(t: &TensorRef) -> Tokens<T> {
    View::new(t, layout::tokens(t))
}

/// View an additional-token tensor `[B, heads, n, C]`.
pub fn extras<T>(t: &TensorRef) -> Extras<T> {
    View::new(t, layout::extras(t))
}

/// View a bias tensor `[heads, 2K-1, ...]` of any rank.
pub fn bias<T>(t: &TensorRef) -> Bias<T> {
    View::new(t, layout::bias(t))
}

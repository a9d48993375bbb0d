//! The AMX tier: the tile matrix unit of Intel Xeons from Sapphire Rapids on. One `tdpbf16ps`
//! multiplies a 16 x 32 bfloat16 tile by a 32 x 16 one into 16 x 16 float32 sums (8192
//! multiply-adds, where AVX-512 does 32 a cycle), so the bfloat16 forward attends a block of up
//! to sixteen queries of a line at once: their logits against each run's staged keys, and their
//! probabilities against the staged values, are tile products; only the softmax runs on
//! AVX-512.
//!
//! Rust has no stable AMX intrinsics: the few instructions used are inline assembly, with the
//! tile registers named in the templates (the compiler never allocates them). Tiles hold data
//! only within one `attend_block` call, so nothing else sees them.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::avx512::lanes_below;
use crate::cpu::element::Aligned;
use crate::cpu::math::avx512::exp16;

/// Queries of a block: the rows of a query, logit or output tile.
pub const BLOCK: usize = 16;
/// Box positions of a key group: a value tile reduces over them, two key tiles hold them.
pub const GROUP: usize = 32;
/// Channels of a key chunk (one query tile's row of bfloat16).
pub const KEY_CHUNK: usize = 32;
/// Channels of a value chunk (one output tile's row of float32).
const VALUE_CHUNK: usize = 16;
/// Key chunks the query tiles hold at most (tmm2 to tmm5).
pub const MAX_KEY_CHUNKS: usize = 4;
/// Output tiles summed in one pass over the probabilities (tmm0 to tmm3).
const OUTPUT_TILES: usize = 4;
/// Bytes of a tile row.
const ROW_BYTES: usize = 64;

/// Whether this CPU has AMX tiles with bfloat16 products (and AVX512_BF16 for the conversions
/// around them), and the operating system lets this process use them (asked once).
pub fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| cpu_has_tiles() && os_grants_tiles())
}

/// CPUID's AMX-TILE, AMX-BF16 and AVX512_BF16 bits, and XCR0's tile state bits (set where
/// the kernel manages tile state).
fn cpu_has_tiles() -> bool {
    let bit = |word: u32, n: u32| word >> n & 1 == 1;
    // Leaf 7 is read only where the CPU has it.
    if __cpuid(0).eax < 7 {
        return false;
    }
    let (leaf1, leaf7, leaf7_1) = (__cpuid(1), __cpuid_count(7, 0), __cpuid_count(7, 1));
    let osxsave = bit(leaf1.ecx, 27);
    let features = bit(leaf7.edx, 24) && bit(leaf7.edx, 22) && bit(leaf7_1.eax, 5);
    // SAFETY: XGETBV exists where the OS enabled XSAVE (OSXSAVE, checked first).
    features && osxsave && unsafe { xcr0() } & (0b11 << 17) == 0b11 << 17
}

#[target_feature(enable = "xsave")]
fn xcr0() -> u64 {
    // SAFETY: register 0 exists wherever XGETBV does.
    unsafe { _xgetbv(0) }
}

/// Linux hands out the 8 KB tile state only to processes that ask (`arch_prctl`
/// `ARCH_REQ_XCOMP_PERM`); a tile instruction without leave faults.
#[cfg(target_os = "linux")]
fn os_grants_tiles() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let result: i64;
    // SAFETY: a system call that only changes this process's permissions.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => result,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    result == 0
}

#[cfg(not(target_os = "linux"))]
fn os_grants_tiles() -> bool {
    false
}

/// The tile registers, configured on this thread as sixteen rows of 64 bytes each, until
/// dropped (which returns them to their initial state, so that context switches stop saving
/// them).
pub struct Tiles(());

impl Tiles {
    /// Configure the tiles.
    ///
    /// # Safety
    /// `usable()` must hold.
    pub unsafe fn configure() -> Tiles {
        #[repr(C, align(64))]
        struct Config([u8; 64]);
        let mut config = Config([0; 64]);
        config.0[0] = 1; // palette 1
        for t in 0..8 {
            config.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&(ROW_BYTES as u16).to_le_bytes());
            config.0[48 + t] = BLOCK as u8;
        }
        // SAFETY: a valid palette-1 configuration; the caller's contract.
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
        Tiles(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured (`configure`).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// `$op!(n, args..)` for tile register `n = $tile` (0 to 7): tile registers are named in the
/// instruction, so a runtime number picks one of eight instructions.
macro_rules! on_tile {
    ($tile:expr, $op:ident $(, $arg:expr)*) => {
        match $tile {
            0 => $op!(0 $(, $arg)*),
            1 => $op!(1 $(, $arg)*),
            2 => $op!(2 $(, $arg)*),
            3 => $op!(3 $(, $arg)*),
            4 => $op!(4 $(, $arg)*),
            5 => $op!(5 $(, $arg)*),
            6 => $op!(6 $(, $arg)*),
            7 => $op!(7 $(, $arg)*),
            _ => unreachable!("tile registers are tmm0 to tmm7"),
        }
    };
}

macro_rules! tile_load {
    ($n:literal, $ptr:expr, $stride:expr) => {
        asm!(
            concat!("tileloadd tmm", $n, ", [{p} + {s}*1]"),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack, readonly),
        )
    };
}

macro_rules! tile_store {
    ($n:literal, $ptr:expr, $stride:expr) => {
        asm!(
            concat!("tilestored [{p} + {s}*1], tmm", $n),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack),
        )
    };
}

macro_rules! tile_zero {
    ($n:literal) => {
        asm!(concat!("tilezero tmm", $n), options(nostack, nomem))
    };
}

/// Load tile `t` from sixteen rows of 64 bytes, `stride` bytes apart from `ptr` on.
///
/// # Safety
/// Tiles configured; the rows readable.
#[inline(always)]
unsafe fn load<T>(t: usize, ptr: *const T, stride: usize) {
    // SAFETY: the caller's contract.
    unsafe { on_tile!(t, tile_load, ptr, stride) }
}

/// Store tile `t` to sixteen rows of 64 bytes, `stride` bytes apart from `ptr` on.
///
/// # Safety
/// Tiles configured; the rows writable and ours.
#[inline(always)]
unsafe fn store<T>(t: usize, ptr: *mut T, stride: usize) {
    // SAFETY: the caller's contract.
    unsafe { on_tile!(t, tile_store, ptr, stride) }
}

/// Zero tile `t`.
///
/// # Safety
/// Tiles configured.
#[inline(always)]
unsafe fn zero(t: usize) {
    // SAFETY: the caller's contract.
    unsafe { on_tile!(t, tile_zero) }
}

/// Logit tiles (tmm0: keys 0-15 of a group, tmm1: keys 16-31) += query chunk `chunk`'s tile
/// (tmm2 + chunk) times the group's two key tiles (tmm6, tmm7).
///
/// # Safety
/// Tiles configured and loaded.
#[inline(always)]
unsafe fn dot_keys(chunk: usize) {
    macro_rules! pair {
        ($q:literal) => {
            asm!(
                concat!("tdpbf16ps tmm0, tmm", $q, ", tmm6"),
                concat!("tdpbf16ps tmm1, tmm", $q, ", tmm7"),
                options(nostack, nomem),
            )
        };
    }
    // SAFETY: the caller's contract.
    unsafe {
        match chunk {
            0 => pair!(2),
            1 => pair!(3),
            2 => pair!(4),
            3 => pair!(5),
            _ => unreachable!("at most four key chunks"),
        }
    }
}

/// Output tile `out` (tmm0 to tmm3) += the probability tile (tmm4) times a value tile (tmm5).
///
/// # Safety
/// Tiles configured and loaded.
#[inline(always)]
unsafe fn dot_values(out: usize) {
    macro_rules! product {
        ($o:literal) => {
            asm!(
                concat!("tdpbf16ps tmm", $o, ", tmm4, tmm5"),
                options(nostack, nomem)
            )
        };
    }
    // SAFETY: the caller's contract.
    unsafe {
        match out {
            0 => product!(0),
            1 => product!(1),
            2 => product!(2),
            3 => product!(3),
            _ => unreachable!("four output tiles"),
        }
    }
}

/// The key and value rows of a box of key positions (one kv head) in the layouts tile products
/// take, laid out per box line so that a tile may start at any position of the line (a key
/// tile) or any even one (a value tile), and a block's tiles cover its windows' union and
/// little more:
/// * keys: per chunk of 32 channels, sixteen rows (one per channel pair) of a word per
///   position, the pair's two channels: the key rows transposed a channel pair at a time,
///   as a product with query rows needs (a tile: sixteen consecutive words of each row);
/// * values: a row per pair of positions, a word per channel holding the channel of both
///   positions, as a product with probability rows needs (a tile: sixteen consecutive rows,
///   16 channels of each).
///
/// Lines are padded with zero positions to `line_cap`, so that tiles starting on a window
/// reach past it without leaving the line.
pub struct TileStage {
    keys: Aligned<u32>,
    values: Aligned<u32>,
    /// Positions the buffers hold in all.
    capacity: usize,
    /// Positions per line (padded) of the box being staged.
    line_cap: usize,
    key_chunks: usize,
    dim_v: usize,
}

impl TileStage {
    /// Buffers for `capacity` positions (`positions_of`) of rows of `dims` (keys, values)
    /// channels (multiples of `KEY_CHUNK` and of `GROUP`).
    pub fn new(capacity: usize, (dim, dim_v): (usize, usize)) -> Self {
        TileStage {
            keys: Aligned::new(capacity * dim / 2),
            values: Aligned::new(capacity * dim_v / 2),
            capacity,
            line_cap: 0,
            key_chunks: dim / KEY_CHUNK,
            dim_v,
        }
    }

    /// Positions, padding included, that a box of `lines` lines of `line_len` positions takes.
    pub fn positions_of(lines: usize, line_len: usize) -> usize {
        lines * Self::line_cap(line_len)
    }

    /// Positions a line of `line_len` takes: as far as a block's tiles reach, whole key tiles.
    /// (Its slots start on a tile at or before its first window position, and end less than a
    /// group past its last one, so before `line_len + GROUP - 1`.)
    fn line_cap(line_len: usize) -> usize {
        (line_len + GROUP - BLOCK).next_multiple_of(BLOCK)
    }

    /// Start staging a box of `lines` lines of `line_len` positions (within `capacity`).
    pub fn begin(&mut self, lines: usize, line_len: usize) {
        assert!(
            Self::positions_of(lines, line_len) <= self.capacity,
            "box past the stage"
        );
        self.line_cap = Self::line_cap(line_len);
    }

    /// The key tile of chunk `chunk` of line `line` from position `first` on, and its row
    /// stride in bytes.
    fn key_tile(&self, line: usize, chunk: usize, first: usize) -> (*const u32, usize) {
        let row = (line * self.key_chunks + chunk) * BLOCK;
        let at = row * self.line_cap + first;
        (self.keys.ptr().wrapping_add(at), self.line_cap * 4)
    }

    /// The value tile of channels `16 chunk..16 (chunk + 1)` of line `line` from position
    /// `first` (even) on, and its row stride in bytes.
    fn value_tile(&self, line: usize, chunk: usize, first: usize) -> (*const u32, usize) {
        let pair_row = (line * self.line_cap + first) / 2;
        let at = pair_row * self.dim_v + chunk * VALUE_CHUNK;
        (self.values.ptr().wrapping_add(at), self.dim_v * 4)
    }

    /// Stage line `line`: `count` positions whose key rows lie `steps.0` bytes apart from
    /// `rows.0` on, value rows `steps.1` apart from `rows.1` (dense bfloat16 rows).
    ///
    /// # Safety
    /// `begin` called for a box with this line; the rows readable; `16 * steps.0` within
    /// `i32`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn fill_line(
        &mut self,
        line: usize,
        rows: (*const u16, *const u16),
        steps: (isize, isize),
        count: usize,
    ) {
        // SAFETY (whole block): the line is in the buffers (`begin`); reads stay on the
        // `count` rows.
        unsafe {
            self.fill_keys(line, rows.0 as *const u8, steps.0, count);
            self.fill_values(line, rows.1 as *const u8, steps.1, count);
        }
    }

    /// The key rows of a line (see `TileStage`): sixteen positions' words of a channel pair
    /// at a time, gathered from their rows; positions past `count` zero.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    unsafe fn fill_keys(&mut self, line: usize, rows: *const u8, step: isize, count: usize) {
        let offsets = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(step as i32),
        );
        for first in (0..self.line_cap).step_by(BLOCK) {
            let valid = lanes_below(count.saturating_sub(first));
            let base = rows.wrapping_offset(first as isize * step);
            for chunk in 0..self.key_chunks {
                let (tile, stride) = self.key_tile(line, chunk, first);
                if valid == 0 {
                    for pair in 0..BLOCK {
                        // SAFETY: the tile's rows are in the buffer.
                        unsafe {
                            let to = (tile as *mut u8).add(pair * stride);
                            _mm512_storeu_si512(to as *mut _, _mm512_setzero_si512());
                        }
                    }
                    continue;
                }
                for pair in 0..BLOCK {
                    let at = base.wrapping_add(chunk * KEY_CHUNK * 2 + pair * 4);
                    // SAFETY: lanes of valid positions read their rows' channel pairs; masked
                    // lanes read nothing; the words lie in the line's row of the pair.
                    unsafe {
                        let words = _mm512_mask_i32gather_epi32::<1>(
                            _mm512_setzero_si512(),
                            valid,
                            offsets,
                            at as *const i32,
                        );
                        let to = (tile as *mut u8).add(pair * stride);
                        _mm512_storeu_si512(to as *mut _, words);
                    }
                }
            }
        }
    }

    /// The value rows of a line (see `TileStage`): two positions' rows interleaved channel
    /// by channel; positions past `count` zero.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    unsafe fn fill_values(&mut self, line: usize, rows: *const u8, step: isize, count: usize) {
        // Channel c of the first row to lane 2c, of the second to lane 2c + 1.
        let interleave = |from: i16| {
            let mut lanes = [0i16; 32];
            for (i, lane) in lanes.iter_mut().enumerate() {
                *lane = from + i as i16 / 2 + if i % 2 == 1 { 32 } else { 0 };
            }
            // SAFETY: 32 lanes of 16 bits.
            unsafe { _mm512_loadu_si512(lanes.as_ptr() as *const _) }
        };
        let (low, high) = (interleave(0), interleave(16));
        let row = |n: usize, chunk: usize| {
            if n >= count {
                return _mm512_setzero_si512();
            }
            let at = rows
                .wrapping_offset(n as isize * step)
                .wrapping_add(chunk * 64);
            // SAFETY: channels `32 chunk..32 (chunk + 1)` of a valid position's row.
            unsafe { _mm512_loadu_si512(at as *const _) }
        };
        for n in (0..self.line_cap).step_by(2) {
            let (pair_row, _) = self.value_tile(line, 0, n);
            let pair_row = pair_row as *mut u32;
            for chunk in 0..self.dim_v / GROUP {
                let (a, b) = (row(n, chunk), row(n + 1, chunk));
                // SAFETY: the pair's row of `dim_v` words is in the buffer.
                unsafe {
                    let to = pair_row.add(chunk * GROUP);
                    _mm512_storeu_si512(to as *mut _, _mm512_permutex2var_epi16(a, low, b));
                    let to = to.add(VALUE_CHUNK);
                    _mm512_storeu_si512(to as *mut _, _mm512_permutex2var_epi16(a, high, b));
                }
            }
        }
    }
}

/// Up to sixteen queries of one line, over the same runs of staged keys (lines of a
/// `TileStage`): their rows (dense bfloat16), where each one's window starts on its runs (a
/// position of the staged lines) and how many positions it holds, and where each output and
/// lse goes.
pub struct Block {
    /// Queries in the block.
    pub len: usize,
    /// Query rows.
    pub queries: [*const u16; BLOCK],
    /// First window position on each run.
    pub first: [usize; BLOCK],
    /// Window positions on each run.
    pub count: [usize; BLOCK],
    /// Output rows.
    pub outputs: [*mut u16; BLOCK],
    /// Lse entries.
    pub lse: [*mut f32; BLOCK],
}

impl Block {
    /// The bytes between consecutive query rows of a full block whose rows lie equally far
    /// apart, in increasing order: a tile loads them where they are.
    fn even_rows(&self) -> Option<usize> {
        let at = |j: usize| self.queries[j] as usize;
        let step = at(1).wrapping_sub(at(0));
        let even = (1..BLOCK).all(|j| at(j) == at(0).wrapping_add(j * step));
        (self.len == BLOCK && even && (step as isize) > 0).then_some(step)
    }

    /// An empty block.
    pub fn new() -> Self {
        Block {
            len: 0,
            queries: [std::ptr::null(); BLOCK],
            first: [0; BLOCK],
            count: [0; BLOCK],
            outputs: [std::ptr::null_mut(); BLOCK],
            lse: [std::ptr::null_mut(); BLOCK],
        }
    }
}

/// A worker's scratch for `attend_block`: the block's query rows, its logits and probabilities
/// (a row per query, runs side by side), and its output sums.
pub struct BlockScratch {
    queries: Aligned<u16>,
    logits: Aligned<f32>,
    probabilities: Aligned<u16>,
    outputs: Aligned<f32>,
    /// Logit slots per row the buffers hold.
    slots: usize,
    dims: (usize, usize),
}

impl BlockScratch {
    /// Scratch for rows of `dims` (keys, values) channels.
    pub fn new(dims: (usize, usize)) -> Self {
        BlockScratch {
            queries: Aligned::new(BLOCK * dims.0),
            logits: Aligned::new(0),
            probabilities: Aligned::new(0),
            outputs: Aligned::new(BLOCK * dims.1),
            slots: 0,
            dims,
        }
    }

    /// Make room for `slots` logits per query.
    fn reserve(&mut self, slots: usize) {
        if slots > self.slots {
            self.logits = Aligned::new(BLOCK * slots);
            self.probabilities = Aligned::new(BLOCK * slots);
            self.slots = slots;
        }
    }
}

/// Attend the queries of `block` over the runs `runs` (lines of `stage`'s box), logits times
/// `scale`: writes each query's output (rounded to bfloat16) and lse.
///
/// The block's windows on a run span a few key groups; the logits of all sixteen rows against
/// them are tile products (rows of queries past the block's length are left over from earlier
/// blocks, and their results unread). Each query's softmax then reads only its own window's
/// slots, and writes its probabilities as bfloat16 into a zeroed row, so that the product with
/// the values weighs the other keys of the groups 0.
///
/// # Safety
/// Tiles configured (`Tiles`); the stage filled for a box holding every run; the block's rows
/// of the staged dims, readable (queries) and ours to write (outputs, lse); each window inside
/// the staged lines.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
pub unsafe fn attend_block(
    stage: &TileStage,
    runs: &[usize],
    block: &Block,
    scale: f32,
    s: &mut BlockScratch,
) {
    let len = block.len;
    let lo = block.first[..len].iter().min().copied().unwrap_or(0);
    let hi = (0..len)
        .map(|j| block.first[j] + block.count[j])
        .max()
        .unwrap_or(0);
    let slots = Slots::from(lo, hi);
    assert!(
        slots.origin + slots.span <= stage.line_cap,
        "tiles past the staged line"
    );
    s.reserve(runs.len() * slots.span);
    let (dim, dim_v) = s.dims;
    let row = s.slots;
    // SAFETY (whole block): rows inside the scratch and stage buffers sized above; the
    // block's rows by the caller's contract.
    unsafe {
        let (queries, query_stride) = match block.even_rows() {
            Some(stride) => (block.queries[0], stride),
            None => {
                let to = s.queries.ptr_mut();
                for (j, &q) in block.queries[..len].iter().enumerate() {
                    std::ptr::copy_nonoverlapping(q, to.add(j * dim), dim);
                }
                (to as *const u16, dim * 2)
            }
        };
        let logits = s.logits.ptr_mut();
        let key_chunks = dim / KEY_CHUNK;
        for chunk in 0..key_chunks {
            load(2 + chunk, queries.add(chunk * KEY_CHUNK), query_stride);
        }
        // Logits of keys `slots.origin..hi` (rounded up to whole groups) on each run.
        for (r, &line) in runs.iter().enumerate() {
            for group in (0..slots.span).step_by(GROUP) {
                zero(0);
                zero(1);
                for chunk in 0..key_chunks {
                    let (tile, stride) = stage.key_tile(line, chunk, slots.origin + group);
                    load(6, tile, stride);
                    load(7, tile.add(BLOCK), stride);
                    dot_keys(chunk);
                }
                let at = logits.add(r * slots.span + group);
                store(0, at, row * 4);
                store(1, at.add(BLOCK), row * 4);
            }
        }
        let probabilities = s.probabilities.ptr_mut();
        let mut stats = [Exponentials::default(); BLOCK];
        for (j, stat) in stats[..len].iter_mut().enumerate() {
            let window = (runs.len(), block.first[j], block.count[j]);
            let (logit_row, probability_row) = (logits.add(j * row), probabilities.add(j * row));
            *stat = softmax_row((logit_row, probability_row), slots, window, scale);
        }
        let outputs = s.outputs.ptr_mut();
        let value_chunks = dim_v / VALUE_CHUNK;
        for pass in (0..value_chunks).step_by(OUTPUT_TILES) {
            let tiles = OUTPUT_TILES.min(value_chunks - pass);
            for out in 0..tiles {
                zero(out);
            }
            for (r, &line) in runs.iter().enumerate() {
                for group in (0..slots.span).step_by(GROUP) {
                    load(4, probabilities.add(r * slots.span + group), row * 2);
                    for out in 0..tiles {
                        let (tile, stride) =
                            stage.value_tile(line, pass + out, slots.origin + group);
                        load(5, tile, stride);
                        dot_values(out);
                    }
                }
            }
            for out in 0..tiles {
                store(out, outputs.add((pass + out) * VALUE_CHUNK), dim_v * 4);
            }
        }
        for (j, stat) in stats[..len].iter().enumerate() {
            finish_row(
                outputs.add(j * dim_v),
                dim_v,
                stat.rounded,
                block.outputs[j],
            );
            *block.lse[j] = stat.shift + stat.sum.ln();
        }
    }
}

/// Where a row keeps the slots of each run: position `origin` of the run's line at slot 0
/// of the run's `span` slots (whole groups).
#[derive(Clone, Copy)]
struct Slots {
    origin: usize,
    span: usize,
}

impl Slots {
    /// Slots of positions `lo..hi` at least, from the start of the key tile holding `lo` on:
    /// a tile load whose rows straddle cache lines takes three times as long as one whose
    /// rows are whole lines. (That start is even too, as value tiles need.)
    fn from(lo: usize, hi: usize) -> Slots {
        let origin = lo & !(BLOCK - 1);
        Slots {
            origin,
            span: (hi.max(lo + 1) - origin).next_multiple_of(GROUP),
        }
    }
}

/// Logit slots per run of a block whose windows cover positions `lo..hi` of its runs.
pub fn slots_of(lo: usize, hi: usize) -> usize {
    Slots::from(lo, hi).span
}

/// Logit slots per run that a block of sixteen windows of `kernel` positions each, one
/// position apart, takes where the first one starts a tile: blocks cut so as not to take
/// more are as cheap per query as any.
pub fn slots_cap(kernel: usize) -> usize {
    (kernel + BLOCK - 1).next_multiple_of(GROUP)
}

/// What a query's softmax leaves for writing its output and lse: the shift taken off its
/// scaled logits, the sum of their exponentials, and the sum of those rounded to bfloat16 as
/// the probabilities are (the output's divisor, so that its weights sum to one exactly).
#[derive(Clone, Copy, Default)]
struct Exponentials {
    shift: f32,
    sum: f32,
    rounded: f32,
}

impl Exponentials {
    /// A window's exponentials, taken by `take(shift)` (which writes the probabilities and
    /// returns both sums): unshifted where their sum lies in `UNSHIFTED_SUMS`, else taken
    /// again shifted by the window's largest scaled logit, `max()`.
    #[inline(always)]
    fn of(take: impl Fn(f32) -> (f32, f32), max: impl FnOnce() -> f32) -> Self {
        let (sum, rounded) = take(0.0);
        if UNSHIFTED_SUMS.contains(&sum) {
            return Exponentials {
                shift: 0.0,
                sum,
                rounded,
            };
        }
        let shift = max();
        let (sum, rounded) = take(shift);
        Exponentials {
            shift,
            sum,
            rounded,
        }
    }
}

/// Sums of exponentials accepted from the pass that subtracts no max (see `softmax_row`).
const UNSHIFTED_SUMS: std::ops::RangeInclusive<f32> = 1.0 / (1 << 20) as f32..=(1 << 20) as f32;

/// One query's softmax: the logits of its window (`count` positions from `first` on each of
/// `runs` runs, laid out as `slots`) times `scale`, as probabilities rounded to bfloat16 into
/// the same slots of `probabilities`, the row's other slots zeroed.
///
/// The shift is 0 where that keeps the sum within `UNSHIFTED_SUMS`, as it does for the
/// logits of most attention: float32 exponentials are as precise at any scale, and the
/// bounds keep the largest probability far from the underflow that tile products flush to
/// zero, and its products with values far from overflow. Only other windows take a second
/// pass shifted by their largest scaled logit.
///
/// # Safety
/// Both rows hold `runs` spans; the window lies inside each span.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
unsafe fn softmax_row(
    (logits, probabilities): (*const f32, *mut u16),
    slots: Slots,
    (runs, first, count): (usize, usize, usize),
    scale: f32,
) -> Exponentials {
    let at = first - slots.origin;
    if slots.span == GROUP && count <= BLOCK / 2 {
        // SAFETY: the caller's contract.
        return unsafe { softmax_narrow((logits, probabilities), (runs, at, count), scale) };
    }
    let scale_v = _mm512_set1_ps(scale);
    // Every access below is masked to the window's slots, or is a whole row of 64 bytes
    // inside the row's spans (multiples of 32 slots).
    let window = |r: usize, c: usize| {
        let mask = lanes_below(count - c);
        // SAFETY: as above.
        (mask, unsafe {
            _mm512_maskz_loadu_ps(mask, logits.add(r * slots.span + at + c))
        })
    };
    let exponentials = |shift: f32| {
        let shift = _mm512_set1_ps(shift);
        let (mut sum, mut rounded_sum) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for r in 0..runs {
            for c in (0..count).step_by(16) {
                let (mask, x) = window(r, c);
                let e = _mm512_maskz_mov_ps(mask, exp16(_mm512_fmsub_ps(x, scale_v, shift)));
                let rounded = _mm512_cvtneps_pbh(e);
                sum = _mm512_add_ps(sum, e);
                rounded_sum = _mm512_add_ps(rounded_sum, _mm512_cvtpbh_ps(rounded));
                // SAFETY: as above.
                unsafe {
                    let to = probabilities.add(r * slots.span + at + c);
                    let rounded = std::mem::transmute::<__m256bh, __m256i>(rounded);
                    _mm256_mask_storeu_epi16(to as *mut i16, mask, rounded);
                }
            }
        }
        (_mm512_reduce_add_ps(sum), _mm512_reduce_add_ps(rounded_sum))
    };
    for slot in (0..runs * slots.span).step_by(32) {
        // SAFETY: as above.
        unsafe { _mm512_storeu_si512(probabilities.add(slot) as *mut _, _mm512_setzero_si512()) };
    }
    let max = || {
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for r in 0..runs {
            for c in (0..count).step_by(16) {
                let (mask, x) = window(r, c);
                max = _mm512_mask_max_ps(max, mask, max, _mm512_mul_ps(x, scale_v));
            }
        }
        _mm512_reduce_max_ps(max)
    };
    Exponentials::of(exponentials, max)
}

/// `softmax_row` for windows of at most eight positions per run in spans of one group (P1's
/// kernel 7): two runs' windows share a vector (lanes 0-7 and 8-15), so half the
/// exponentials are taken, and each run's whole span of probabilities is written in one
/// aligned store (the window's lanes moved into place, the rest zero) instead of being
/// zeroed and then written under a mask.
///
/// # Safety
/// As `softmax_row`, with `at + count <= GROUP`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
unsafe fn softmax_narrow(
    (logits, probabilities): (*const f32, *mut u16),
    (runs, at, count): (usize, usize, usize),
    scale: f32,
) -> Exponentials {
    let scale_v = _mm512_set1_ps(scale);
    let half = BLOCK / 2;
    let low = lanes_below(count);
    let both = low | low << half;
    // Each run's probabilities: lanes `at..at + count` of its span from lanes `0..count` of
    // the first run's vector, or `8..8 + count` of the second's.
    let window = (((1u64 << count) - 1) << at) as __mmask32;
    let from_first = _mm512_sub_epi16(lanes_16(), _mm512_set1_epi16(at as i16));
    let from_second = _mm512_add_epi16(from_first, _mm512_set1_epi16(half as i16));
    // Runs `r` and `r + 1` (when there is one) in one vector.
    let pair = |r: usize| {
        // SAFETY: masked to the windows' slots, inside the rows (the caller's contract).
        unsafe {
            let src = logits.add(r * GROUP + at);
            let x = _mm512_maskz_loadu_ps(low, src);
            if r + 1 < runs {
                _mm512_mask_loadu_ps(x, low << half, src.add(GROUP - half))
            } else {
                x
            }
        }
    };
    let lanes = |r: usize| if r + 1 < runs { both } else { low };
    let exponentials = |shift: f32| {
        let shift = _mm512_set1_ps(shift);
        let (mut sum, mut rounded_sum) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for r in (0..runs).step_by(2) {
            let e = _mm512_maskz_mov_ps(lanes(r), exp16(_mm512_fmsub_ps(pair(r), scale_v, shift)));
            let rounded = _mm512_cvtneps_pbh(e);
            sum = _mm512_add_ps(sum, e);
            rounded_sum = _mm512_add_ps(rounded_sum, _mm512_cvtpbh_ps(rounded));
            // SAFETY: 32 bf16 lanes; each store is a run's whole span, inside the row.
            unsafe {
                let rounded =
                    _mm512_castsi256_si512(std::mem::transmute::<__m256bh, __m256i>(rounded));
                let dst = probabilities.add(r * GROUP) as *mut __m512i;
                _mm512_storeu_si512(
                    dst as *mut _,
                    _mm512_maskz_permutexvar_epi16(window, from_first, rounded),
                );
                if r + 1 < runs {
                    let second = _mm512_maskz_permutexvar_epi16(window, from_second, rounded);
                    _mm512_storeu_si512(dst.add(1) as *mut _, second);
                }
            }
        }
        (_mm512_reduce_add_ps(sum), _mm512_reduce_add_ps(rounded_sum))
    };
    let max = || {
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for r in (0..runs).step_by(2) {
            max = _mm512_mask_max_ps(max, lanes(r), max, _mm512_mul_ps(pair(r), scale_v));
        }
        _mm512_reduce_max_ps(max)
    };
    Exponentials::of(exponentials, max)
}

/// Lane numbers `0..32` of 16-bit lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn lanes_16() -> __m512i {
    let mut lanes = [0i16; 32];
    for (i, lane) in lanes.iter_mut().enumerate() {
        *lane = i as i16;
    }
    // SAFETY: 32 lanes of 16 bits.
    unsafe { _mm512_loadu_si512(lanes.as_ptr() as *const _) }
}

/// Write `sums / sum` (`dim_v` floats, a multiple of 32), rounded to bfloat16, to `out`; zeros
/// for a row that saw no key.
///
/// # Safety
/// `sums` readable, `out` writable for `dim_v` elements.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
unsafe fn finish_row(sums: *const f32, dim_v: usize, sum: f32, out: *mut u16) {
    let inv = _mm512_set1_ps(if sum > 0.0 { 1.0 / sum } else { 0.0 });
    for c in (0..dim_v).step_by(16) {
        // SAFETY: channels of the rows, by the caller's contract.
        unsafe {
            let x = _mm512_mul_ps(_mm512_loadu_ps(sums.add(c)), inv);
            let rounded: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(x));
            _mm256_storeu_si256(out.add(c) as *mut __m256i, rounded);
        }
    }
}

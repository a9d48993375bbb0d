//! The bfloat16 forward on AMX tiles (`simd::amx`), for the slabs whose windows it takes: the
//! slab's box of key and value rows is staged in tile layouts, one kv head at a time, then
//! the queries of each line attend in blocks of up to sixteen consecutive points (one dilation
//! group of the last axis), each block in one `attend_block` call. Problems with additional
//! tokens or rpb, and rows of other widths, take the `Slabbed` path.

use std::ops::Range;

use super::{Attention, Forward};
use crate::cpu::element::{Accum, Element};
use crate::cpu::grid::Grid;
use crate::cpu::simd::amx::{
    attend_block, slots_cap, slots_of, Block, BlockScratch, TileStage, Tiles, BLOCK, GROUP,
    KEY_CHUNK, MAX_KEY_CHUNKS,
};
use crate::cpu::stage::{KeyBox, Slabs};
use crate::cpu::view::Tokens;

/// The views of a bfloat16 problem the tile forward reads and writes (elements as their bits).
pub(super) struct TileForward<'g> {
    g: &'g Grid,
    q: Tokens<u16>,
    k: Tokens<u16>,
    v: Tokens<u16>,
    out: Tokens<u16>,
    lse: Tokens<f32>,
    scale: f32,
    /// Query heads per kv head.
    group: usize,
    /// Channels of key and value rows.
    dims: (usize, usize),
    /// Positions of the largest box a stage holds.
    capacity: usize,
}

/// A worker's scratch of the tile forward.
pub(super) struct TileScratch {
    stage: TileStage,
    block: BlockScratch,
    /// The box lines holding a line's runs.
    lines: Vec<usize>,
    /// The staged lines holding a block's runs.
    runs: Vec<usize>,
}

impl<'g> TileForward<'g> {
    /// The tile forward of `f`'s problem, cut into `slabs`, where the element type has tile
    /// kernels on this CPU and the problem is one they take: window keys and values only (no
    /// additional tokens, no rpb), dense rows, key channels a multiple of 32 up to 128, value
    /// channels a multiple of 32.
    pub fn new<T: Element>(f: &Forward<'_, 'g, T>, slabs: &Slabs) -> Option<Self> {
        let a: &Attention<'g, T> = f.a;
        let (k, v) = (a.k?, a.v?);
        let (dim, dim_v) = (a.g.dim, a.dim_v);
        let dense = [a.q, k, v, f.out].iter().all(|t| t.inner_stride() == 1);
        // Key tiles gather sixteen positions' rows at 32-bit offsets from the first.
        let gathers_reach = |t: Tokens<T>| {
            let step = a.g.axes[2].dilation as i64 * t.stride(4) as i64 * 2;
            (BLOCK as i64 * step).abs() <= i32::MAX as i64
        };
        let fits = T::tile_forward()
            && a.ek.is_none()
            && a.bias.is_none()
            && dim % KEY_CHUNK == 0
            && (KEY_CHUNK..=MAX_KEY_CHUNKS * KEY_CHUNK).contains(&dim)
            && dim_v % GROUP == 0
            && dim_v > 0
            && dense
            && gathers_reach(k);
        let d2 = a.g.axes[2].dilation;
        let capacity = slabs
            .boxes
            .iter()
            .flatten()
            .map(|b| {
                let groups = d2 / b.line_step();
                TileStage::positions_of(b.lines() * groups, b.line_len().div_ceil(groups))
            })
            .max()?;
        fits.then(|| TileForward {
            g: a.g,
            q: a.q.cast(),
            k: k.cast(),
            v: v.cast(),
            out: f.out.cast(),
            lse: f.lse,
            scale: a.scale.to_f32(),
            group: a.group,
            dims: (dim, dim_v),
            capacity,
        })
    }

    /// Scratch for one worker.
    pub fn scratch(&self) -> TileScratch {
        TileScratch {
            stage: TileStage::new(self.capacity, self.dims),
            block: BlockScratch::new(self.dims),
            lines: Vec::new(),
            runs: Vec::new(),
        }
    }

    /// The dilation groups of the last axis that each line of `kbox` holds (one where its
    /// lines step by the dilation, else all of them): the stage keeps each group of a line
    /// as a line of its own, so that a window is a stretch of consecutive staged positions.
    fn groups(&self, kbox: &KeyBox) -> usize {
        self.g.axes[2].dilation / kbox.line_step()
    }

    /// Attend the slab `points` (its box `kbox`) of batch `b`, from the query heads of kv
    /// heads `heads`.
    ///
    /// # Safety
    /// `amx::usable()`; points, batch and heads of the validated problem, their outputs
    /// written by this task only; `kbox` holds every window of the points.
    pub unsafe fn attend_slab(
        &self,
        (b, heads): (usize, Range<usize>),
        points: Range<usize>,
        kbox: &KeyBox,
        s: &mut TileScratch,
    ) {
        let length = self.g.axes[2].length;
        // SAFETY (whole block): the caller's contract; the stage is filled before any block
        // reads it.
        unsafe {
            let _tiles = Tiles::configure();
            for hk in heads {
                self.stage(b, hk, kbox, &mut s.stage);
                for h in hk * self.group..(hk + 1) * self.group {
                    let mut start = points.start;
                    while start < points.end {
                        // A line's points are consecutive in the point order.
                        let end = points.end.min((start / length + 1) * length);
                        self.attend_line((b, h), start..end, kbox, s);
                        start = end;
                    }
                }
            }
        }
    }

    /// Stage the key and value rows of batch `b`, kv head `hk` at the positions of `kbox`,
    /// each line's dilation groups as lines of their own (line `groups * line + group`).
    ///
    /// # Safety
    /// As `attend_slab`.
    unsafe fn stage(&self, b: usize, hk: usize, kbox: &KeyBox, stage: &mut TileStage) {
        let (groups, len) = (self.groups(kbox), kbox.line_len());
        stage.begin(kbox.lines() * groups, len.div_ceil(groups));
        let dilation = self.g.axes[2].dilation as isize;
        let step = |t: Tokens<u16>| dilation * t.stride(4) * 2;
        let steps = (step(self.k), step(self.v));
        for line in 0..kbox.lines() {
            let [x0, x1, x2] = kbox.line_start(line);
            for group in 0..groups.min(len) {
                let at = [b, hk, x0, x1, x2 + group * kbox.line_step(), 0];
                // SAFETY: box positions are in shape; `new` checked the gathers' reach.
                unsafe {
                    let rows = (self.k.at(at) as *const u16, self.v.at(at) as *const u16);
                    let count = (len - group).div_ceil(groups);
                    stage.fill_line(groups * line + group, rows, steps, count);
                }
            }
        }
    }

    /// Attend the points `points` of one line (batch `b`, head `h`) in blocks.
    ///
    /// # Safety
    /// As `attend_slab`, for points of one line of the slab, its box staged.
    unsafe fn attend_line(
        &self,
        (b, h): (usize, usize),
        points: Range<usize>,
        kbox: &KeyBox,
        s: &mut TileScratch,
    ) {
        let g = self.g;
        let [x0, x1, _] = g.point(points.start);
        let w = g.window([x0, x1, 0]);
        let d = g.dilations();
        let groups = self.groups(kbox);
        s.lines.clear();
        for s0 in 0..w[0].count {
            for s1 in 0..w[1].count {
                let (y0, y1) = (w[0].first + s0 * d[0], w[1].first + s1 * d[1]);
                s.lines.push(kbox.line_of(y0, y1));
            }
        }
        let mut block = Block::new();
        let mut last: Option<usize> = None;
        // The staged line (dilation group) the block's windows lie on, and the positions
        // they cover on it.
        let (mut group, mut covers) = (0, 0..0);
        let cap = slots_cap(g.axes[2].kernel);
        for p in points {
            let x2 = g.point(p)[2];
            let span = g.span(2, x2);
            let (first, count, point_group) = match span.count {
                0 => (0, 0, group),
                count => {
                    let along = kbox.along_line(span.first);
                    (along / groups, count, along % groups)
                }
            };
            let joined = covers.start.min(first)..covers.end.max(first + count);
            // A block holds consecutive points of one dilation group, and takes no more
            // logit slots than a block of windows starting a tile.
            let full = block.len == BLOCK || slots_of(joined.start, joined.end) > cap;
            if block.len > 0 && (full || last.is_some_and(|l| l + d[2] != x2)) {
                // SAFETY: the caller's contract.
                unsafe { self.attend(&block, (groups, group), s) };
                block.len = 0;
            }
            covers = if block.len == 0 {
                first..first + count
            } else {
                joined
            };
            let j = block.len;
            let at = [b, h, x0, x1, x2, 0];
            // SAFETY: a point of the validated problem.
            unsafe {
                block.queries[j] = self.q.at(at);
                block.outputs[j] = self.out.at(at);
                block.lse[j] = self.lse.at(at);
            }
            (block.first[j], block.count[j], group) = (first, count, point_group);
            block.len += 1;
            last = Some(x2);
        }
        // SAFETY: the caller's contract.
        unsafe { self.attend(&block, (groups, group), s) };
    }

    /// Attend a block (nothing for an empty one) over the staged lines of its runs: dilation
    /// group `group` of each of the line's runs (`s.lines`), `groups` per box line.
    ///
    /// # Safety
    /// As `attend_line`.
    unsafe fn attend(&self, block: &Block, (groups, group): (usize, usize), s: &mut TileScratch) {
        if block.len == 0 {
            return;
        }
        s.runs.clear();
        s.runs
            .extend(s.lines.iter().map(|line| groups * line + group));
        // SAFETY: the caller's contract; AVX-512 and AVX512_BF16 come with the AMX tier.
        unsafe { attend_block(&s.stage, &s.runs, block, self.scale, &mut s.block) };
    }
}

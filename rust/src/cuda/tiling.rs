//! How the tensor-core kernels cut their rows into tiles, and the parameter block that tells a
//! launch its tiles (`NaTcTiling` in kernels/common.cuh): the tile shape, the tiles along each
//! axis, and the divisions a block makes to find its tile, prepared on the host so that a kernel
//! multiplies where it would divide. Pure planning, testable without a GPU.

use super::fused_launch::TC_ROWS;
use crate::window::Axis;

/// The query tile of the tensor-core kernels: `rows` queries at most, grown by doubling,
/// among the axes it is still shorter than the longest dilation group of, the one whose group
/// is longest relative to the tile, so that a tile is as square as the grid allows (a square
/// tile of a square window shares the most keys). Every side is a power of two.
pub fn query_tile(axes: &[Axis; 3], rows: usize) -> [usize; 3] {
    let longest = axes.map(|a| a.length.div_ceil(a.dilation));
    let mut tile = [1; 3];
    while tile.iter().product::<usize>() * 2 <= rows {
        let growable = (0..3).filter(|&a| tile[a] < longest[a]);
        // longest[a] / tile[a], compared across axes without division.
        let Some(axis) = growable.reduce(|best, a| {
            let (x, y) = (longest[a] * tile[best], longest[best] * tile[a]);
            if x > y {
                a
            } else {
                best
            }
        }) else {
            break;
        };
        tile[axis] *= 2;
    }
    tile
}

/// The tiling of a problem with spatial axes `axes` into tiles of `rows` queries at most
/// (`query_tile`): the tile, and the tiles along each axis. The unfused tensor-core kernels tile
/// their queries the same way.
pub fn tiling_of(axes: &[Axis; 3], rows: usize) -> ([usize; 3], [usize; 3]) {
    let tile = query_tile(axes, rows);
    (tile, [0, 1, 2].map(|a| tiles_along(&axes[a], tile[a])))
}

/// Tiles of `tile` queries along one axis, each dilation group cut from its start.
fn tiles_along(axis: &Axis, tile: usize) -> usize {
    (0..axis.dilation.min(axis.length))
        .map(|group| axis.group_len(group).div_ceil(tile))
        .sum()
}

/// Division of numbers below 2^31 by a launch constant, as the kernels take it (`NaDivider`,
/// `na_divide`): the quotient of `n` is the high word of `2 n * magic`, shifted right by
/// `shift`. With `shift = ceil(log2 divisor)` and `magic = ceil(2^(31 + shift) / divisor)`,
/// `n * magic / 2^(31 + shift)` exceeds `n / divisor` by less than `n / (divisor 2^31)`, which
/// is under `1 / divisor`: too little to reach the next whole number. The zero divider
/// (divisor 0) stands for an empty count that nothing is divided by.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Divider {
    /// What it divides by.
    pub divisor: u32,
    /// `ceil(2^(31 + shift) / divisor)`: below 2^32 for every divisor up to 2^31.
    pub magic: u32,
    /// `ceil(log2 divisor)`.
    pub shift: u32,
}

impl Divider {
    /// Division by `divisor`, at most 2^31 (0: the zero divider).
    pub fn new(divisor: usize) -> Divider {
        assert!(divisor <= 1 << 31, "divisor {divisor} over 2^31");
        if divisor == 0 {
            return Divider::default();
        }
        let shift = divisor.next_power_of_two().trailing_zeros();
        let magic = (1u64 << (31 + shift)).div_ceil(divisor as u64);
        Divider {
            divisor: divisor as u32,
            magic: u32::try_from(magic).expect("a magic number below 2^32"),
            shift,
        }
    }
}

/// How the kernels cut one axis into tiles (`NaAxisTiling`): its length is
/// `quot * dilation + rem`, so its first `rem` dilation groups are `quot + 1` long and the others
/// `quot`; each group is cut into tiles of `2^tile_shift` rows from its start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AxisTiling {
    /// Length over dilation.
    pub quot: u32,
    /// Length modulo dilation: the long groups.
    pub rem: u32,
    /// log2 of the tile's side.
    pub tile_shift: i32,
    /// Padding (as in the kernel source).
    pub reserved: u32,
    /// Tiles of a long group.
    pub long_tiles: Divider,
    /// Tiles of a short group (the zero divider where a short group has none).
    pub short_tiles: Divider,
}

impl AxisTiling {
    /// `axis` in tiles of `tile` rows (a power of two).
    fn new(axis: &Axis, tile: usize) -> AxisTiling {
        assert!(tile.is_power_of_two(), "tile side {tile}");
        let (quot, rem) = (axis.length / axis.dilation, axis.length % axis.dilation);
        AxisTiling {
            quot: quot as u32,
            rem: rem as u32,
            tile_shift: tile.trailing_zeros() as i32,
            reserved: 0,
            long_tiles: Divider::new((quot + 1).div_ceil(tile)),
            short_tiles: Divider::new(quot.div_ceil(tile)),
        }
    }
}

/// A tile kernel launch's tasks and tiles (`NaTcTiling`): a task is one tile of one
/// `(batch, head)`, numbered batch-major, then head, then tile, the tiles row-major over the
/// axes. Every task number must fit 31 bits (`tasks_fit_31_bits`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcTiling {
    /// The heads the tasks run over (query heads, or kv heads).
    pub heads: Divider,
    /// Tiles per `(batch, head)`.
    pub per_head: Divider,
    /// Tiles along each axis, every dilation group's together.
    pub tiles: [Divider; 3],
    /// How each axis is cut.
    pub axes: [AxisTiling; 3],
    /// Padding to a multiple of 8 bytes (as in the kernel source).
    pub reserved: u32,
}

// The static_assert of common.cuh checks the same size on the device side.
const _: () = assert!(std::mem::size_of::<TcTiling>() == 5 * 12 + 3 * 40 + 4);

impl TcTiling {
    /// Tiles of `rows` rows at most (`tiling_of`) over `axes`, for each of `heads` heads.
    pub fn new(axes: &[Axis; 3], rows: usize, heads: usize) -> TcTiling {
        let (tile, tiles) = tiling_of(axes, rows);
        TcTiling {
            heads: Divider::new(heads),
            per_head: Divider::new(tiles.iter().product()),
            tiles: tiles.map(Divider::new),
            axes: [0, 1, 2].map(|a| AxisTiling::new(&axes[a], tile[a])),
            reserved: 0,
        }
    }

    /// Tiles of `TC_ROWS` of `count` rows (the additional tokens), numbered along the last
    /// axis, for each of `heads` heads; the axes' cut is unused.
    pub fn of_rows(count: usize, heads: usize) -> TcTiling {
        let tiles = count.div_ceil(TC_ROWS);
        TcTiling {
            heads: Divider::new(heads),
            per_head: Divider::new(tiles),
            tiles: [1, 1, tiles].map(Divider::new),
            ..TcTiling::default()
        }
    }

    /// The tasks of `batch` batches: one block each.
    pub fn tasks(&self, batch: usize) -> usize {
        batch * self.heads.divisor as usize * self.per_head.divisor as usize
    }
}

/// Whether every task number of the tile kernels of a problem (`batch`, `heads` and `axes`,
/// with `extra` additional tokens) fits 31 bits, as their divisions need: tiles of `TC_ROWS`
/// queries or keys (a forward of more warps takes fewer, larger tiles), or of additional tokens.
/// The tokens of a `(batch, head)` must fit 31 bits (`fused_launch::indices_fit_32_bits` asks
/// first).
pub fn tasks_fit_31_bits(batch: usize, heads: usize, axes: &[Axis; 3], extra: usize) -> bool {
    let tiles: usize = tiling_of(axes, TC_ROWS).1.iter().product();
    let tasks = batch
        .checked_mul(heads)
        .and_then(|n| n.checked_mul(tiles.max(extra.div_ceil(TC_ROWS))));
    tasks.is_some_and(|n| n <= i32::MAX as usize)
}

// What the tests read back.
#[cfg(test)]
impl TcTiling {
    /// The rows of a tile along each axis.
    pub fn tile(&self) -> [usize; 3] {
        self.axes.map(|a| 1 << a.tile_shift)
    }

    /// The tiles along each axis.
    pub fn tiles(&self) -> [usize; 3] {
        self.tiles.map(|d| d.divisor as usize)
    }
}

#[cfg(test)]
#[path = "tiling_tests.rs"]
mod tests;

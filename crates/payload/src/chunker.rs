//! Where chunks end: content-defined boundaries on 4 KiB blocks.
//!
//! Fixed-size chunks break adaptive updates: when one file of a filesystem image grows by a
//! block, everything after it moves, and no later chunk lines up with the installed image any
//! more (measured on real erofs images: one file grown by 20 KiB made 80% of 256 KiB chunks
//! new). Here the decision to end a chunk after a block depends only on that block's content
//! (and the chunk's length so far), so after an insertion the boundaries fall back into step
//! within a chunk or two. Filesystems place data in whole blocks, so deciding per 4 KiB block
//! loses nothing and keeps every chunk a whole number of dm-verity blocks.
//!
//! A chunk is cut after a block when it has reached `min` and the block's fingerprint hits
//! one value in `n` (so chunks average `min + n` blocks), or when it reaches `max`. The
//! fingerprint reads eight words spread over the block: cheap, deterministic, and good enough,
//! since it only decides boundaries (every chunk's digest still covers all its bytes).

/// The dm-verity and filesystem block: chunks are whole numbers of these.
pub const BLOCK: usize = 4096;

/// Content-defined chunk boundaries for one average chunk size.
#[derive(Debug, Clone, Copy)]
pub struct Chunker {
    min_blocks: u32,
    max_blocks: u32,
    divisor: u64,
}

impl Chunker {
    /// Chunks averaging about `average` bytes, between a quarter and four times that; `average`
    /// must be a power of two from 16 KiB to 16 MiB.
    pub fn new(average: u32) -> Result<Self, String> {
        if !average.is_power_of_two() || !(16 << 10..=16 << 20).contains(&average) {
            return Err(format!("chunk size {average} is not a power of two between 16 KiB and 16 MiB"));
        }
        let avg_blocks = average / BLOCK as u32;
        let min_blocks = avg_blocks / 4;
        Ok(Self { min_blocks, max_blocks: avg_blocks * 4, divisor: u64::from(avg_blocks - min_blocks) })
    }

    /// The largest chunk, in bytes.
    pub fn max_size(&self) -> u32 {
        self.max_blocks * BLOCK as u32
    }

    /// Whether to end the chunk after `block`, which makes it `blocks` blocks long.
    pub fn cut_after(&self, block: &[u8], blocks: u32) -> bool {
        blocks >= self.max_blocks
            || (blocks >= self.min_blocks && fingerprint(block).is_multiple_of(self.divisor))
    }
}

fn fingerprint(block: &[u8]) -> u64 {
    let mut h: u64 = 0x243F_6A88_85A3_08D3;
    for k in 0..8 {
        let at = k * (block.len() / 8);
        let w = block.get(at..at + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        h = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n * BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn cuts(c: &Chunker, data: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut n = 0;
        for (i, b) in data.chunks(BLOCK).enumerate() {
            n += 1;
            if c.cut_after(b, n) {
                out.push((i + 1) * BLOCK);
                n = 0;
            }
        }
        out
    }

    #[test]
    fn sizes_stay_in_bounds_and_average_out() {
        let c = Chunker::new(256 << 10).unwrap();
        let data = blocks(16_384, 7);
        let cuts = cuts(&c, &data);
        let mut prev = 0;
        for &at in &cuts {
            assert!((64 << 10..=1 << 20).contains(&(at - prev)), "chunk of {} bytes", at - prev);
            prev = at;
        }
        let avg = cuts.last().unwrap() / cuts.len();
        assert!((200 << 10..330 << 10).contains(&avg), "average {avg}");
        assert!(Chunker::new(100_000).is_err() && Chunker::new(8 << 10).is_err());
    }

    #[test]
    fn an_inserted_block_moves_only_nearby_boundaries() {
        let c = Chunker::new(256 << 10).unwrap();
        let data = blocks(8192, 11);
        let mut grown = data[..3000 * BLOCK].to_vec();
        grown.extend_from_slice(&blocks(5, 99));
        grown.extend_from_slice(&data[3000 * BLOCK..]);
        let before: std::collections::HashSet<usize> = cuts(&c, &data).into_iter().collect();
        let after = cuts(&c, &grown);
        // Every boundary past the insertion (and one chunk of resynchronisation) reappears,
        // shifted by the five inserted blocks.
        let late: Vec<usize> = after.into_iter().filter(|&a| a > 3400 * BLOCK).collect();
        assert!(!late.is_empty());
        assert!(late.iter().all(|a| before.contains(&(a - 5 * BLOCK))), "boundaries did not resynchronise");
    }
}

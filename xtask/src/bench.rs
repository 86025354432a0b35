//! Benchmarks. Each prints its own numbers next to a baseline measured in the same run, so the
//! ratio means something on whatever machine runs it.
//!
//! The input is "real files": regular files under /usr, in sorted path order, each padded to
//! 4 KiB as a filesystem would place them, concatenated up to the requested size. That gives
//! the mix of ELF binaries, text and compressed data an OS image really has, without needing a
//! filesystem builder or root.

use crate::tools;
use anyhow::{Context as _, Result, bail};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;
use xshell::{Shell, cmd};

const LEVEL: i32 = payload::DEFAULT_LEVEL;

/// Writes (or reuses) the input image of `mib` MiB of real files.
fn input(sh: &Shell, mib: u64) -> Result<PathBuf> {
    let dir = sh.current_dir().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("usr-{mib}m.img"));
    let size = mib << 20;
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
        return Ok(path);
    }
    println!("writing {} from the files under /usr ...", path.display());
    let mut files = Vec::new();
    collect(Path::new("/usr"), &mut files);
    files.sort();
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let mut written = 0u64;
    'outer: for f in files.iter().cycle().take(files.len() * 4) {
        let Ok(mut data) = std::fs::read(f) else { continue };
        data.resize(data.len().div_ceil(4096) * 4096, 0);
        for piece in data.chunks(1 << 20) {
            let take = (size - written).min(piece.len() as u64) as usize;
            out.write_all(&piece[..take])?;
            written += take as u64;
            if written == size {
                break 'outer;
            }
        }
    }
    out.flush()?;
    if written != size {
        bail!("/usr holds less than {mib} MiB of readable files");
    }
    Ok(path)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            collect(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `cargo xtask bench build`: aclpub build against `zstd -T<cores> -<level>` on the same file.
pub(crate) fn build(sh: &Shell, mib: u64) -> Result<()> {
    tools::ensure(sh, &tools::BENCH_TOOLS)?;
    cmd!(sh, "cargo build --quiet --release --locked -p publish").run()?;
    let aclpub = sh.current_dir().join("target/release/aclpub");
    let input = input(sh, mib)?;
    let dir = sh.current_dir().join("target/bench");
    let out = dir.join("build-out");
    let zst = dir.join("baseline.zst");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_file(&zst);
    let t = threads().to_string();
    let level = LEVEL.to_string();
    // Warm the page cache so that both runs read from memory.
    cmd!(sh, "cat {input}").quiet().ignore_stdout().run()?;

    let started = Instant::now();
    cmd!(sh, "{aclpub} build {input} --out {out} --version 1.0.0 --level {level} --threads {t}")
        .quiet()
        .ignore_stdout()
        .run()?;
    let ours = started.elapsed().as_secs_f64();

    let started = Instant::now();
    cmd!(sh, "zstd -q -T{t} -{level} {input} -o {zst}").run()?;
    let base = started.elapsed().as_secs_f64();

    let m = manifest::Manifest::from_bytes(&std::fs::read(out.join(payload::MANIFEST_FILE))?)?;
    let zst_size = std::fs::metadata(&zst)?.len();
    let bytes = (mib << 20) as f64;
    println!("bench build: {mib} MiB of real files from /usr, zstd level {LEVEL}, {t} threads");
    println!(
        "  aclpub build        {:7.2} s  {:7.1} MB/s  payload {:5.1}% of input (chunked, + SHA-256 x3, verity tree)",
        ours,
        bytes / ours / 1e6,
        100.0 * m.payload.size as f64 / bytes
    );
    println!(
        "  baseline zstd -T{t}  {:7.2} s  {:7.1} MB/s  output  {:5.1}% of input (one stream, no hashing)",
        base,
        bytes / base / 1e6,
        100.0 * zst_size as f64 / bytes
    );
    println!("  ratio (time ours / time baseline): {:.2}", ours / base);
    println!("  rerun: cargo xtask bench build --size-mib {mib}");
    Ok(())
}

/// `cargo xtask bench chunk-size`: payload size and adaptive-update cost by chunk size.
///
/// The update is simulated on the same input: 4 MiB of one package's files rewritten in place
/// and 16 scattered 4 KiB metadata blocks changed, which is what upgrading one package does to
/// a read-only filesystem image built from the same tree. The cost is the compressed size of
/// the chunks the node does not already have.
pub(crate) fn chunk_size(sh: &Shell, mib: u64) -> Result<()> {
    let path = input(sh, mib)?;
    let old = std::fs::read(&path).with_context(|| path.display().to_string())?;
    let mut new = old.clone();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let pkg_at = (old.len() as u64 * 37 / 100) & !4095;
    for b in &mut new[pkg_at as usize..pkg_at as usize + (4 << 20)] {
        *b = b.wrapping_add(1);
    }
    for _ in 0..16 {
        let at = (next() % (old.len() as u64 / 4096)) as usize * 4096;
        new[at + 100] ^= 0xff;
    }
    println!(
        "bench chunk-size: {mib} MiB of real files, zstd level {LEVEL}; update = 4 MiB package + 16 metadata blocks"
    );
    // The same upgrade when the package grows by two blocks and everything after it moves.
    let mut grown = new[..pkg_at as usize + (4 << 20)].to_vec();
    grown.extend_from_slice(&[0x5a; 8192]);
    grown.extend_from_slice(&new[pkg_at as usize + (4 << 20)..new.len() - 8192]);
    println!(
        "  {:>10} {:>9} {:>12} {:>14} {:>12} {:>9} {:>16}",
        "chunk", "chunks", "payload %", "update MiB", "update %", "manifest", "shifted update %"
    );
    for cs in [64usize << 10, 256 << 10, 1 << 20, 4 << 20] {
        let old_sizes = compressed_sizes(&old, cs)?;
        let new_sizes = compressed_sizes(&new, cs)?;
        let payload: u64 = new_sizes.iter().map(|(_, s)| s).sum();
        let have: std::collections::HashSet<_> = old_sizes.iter().map(|(d, _)| *d).collect();
        let update: u64 = new_sizes.iter().filter(|(d, _)| !have.contains(d)).map(|(_, s)| s).sum();
        let manifest_kib = new_sizes.len() as f64 * 140.0 / 1024.0;
        let grown_sizes = compressed_sizes(&grown, cs)?;
        let shifted: u64 = grown_sizes.iter().filter(|(d, _)| !have.contains(d)).map(|(_, s)| s).sum();
        println!(
            "  {:>9}K {:>9} {:>11.1}% {:>14.2} {:>11.2}% {:>7.0}KiB {:>15.1}%",
            cs >> 10,
            new_sizes.len(),
            100.0 * payload as f64 / new.len() as f64,
            update as f64 / 1048576.0,
            100.0 * update as f64 / payload as f64,
            manifest_kib,
            100.0 * shifted as f64 / payload as f64
        );
    }
    println!("  rerun: cargo xtask bench chunk-size --size-mib {mib}");
    Ok(())
}

/// (digest, compressed size) of every chunk, compressed on all cores.
fn compressed_sizes(data: &[u8], cs: usize) -> Result<Vec<(manifest::Sha256Digest, u64)>> {
    let chunks: Vec<&[u8]> = data.chunks(cs).collect();
    let n = threads();
    let per = chunks.len().div_ceil(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .chunks(per)
            .map(|part| {
                s.spawn(move || -> Result<Vec<_>> {
                    let mut c = zstd::bulk::Compressor::new(LEVEL)?;
                    part.iter()
                        .map(|ch| Ok((manifest::Sha256Digest::of(ch), c.compress(ch)?.len() as u64)))
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().expect("bench thread")?);
        }
        Ok(all)
    })
}

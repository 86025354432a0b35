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
use std::time::{Duration, Instant};
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
    let pkg_at = upgrade_one_package(&mut new);
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
    let rows = [
        ("fixed", Cut::Fixed(64 << 10), 64),
        ("fixed", Cut::Fixed(256 << 10), 256),
        ("fixed", Cut::Fixed(1 << 20), 1024),
        ("fixed", Cut::Fixed(4 << 20), 4096),
        ("cdc", Cut::Cdc(64 << 10), 64),
        ("cdc", Cut::Cdc(256 << 10), 256),
        ("cdc", Cut::Cdc(1 << 20), 1024),
    ];
    for (kind, cs, kib) in rows {
        let old_sizes = compressed_sizes(&old, cs)?;
        let new_sizes = compressed_sizes(&new, cs)?;
        let payload: u64 = new_sizes.iter().map(|(_, s)| s).sum();
        let have: std::collections::HashSet<_> = old_sizes.iter().map(|(d, _)| *d).collect();
        let update: u64 = new_sizes.iter().filter(|(d, _)| !have.contains(d)).map(|(_, s)| s).sum();
        let manifest_kib = new_sizes.len() as f64 * 140.0 / 1024.0;
        let grown_sizes = compressed_sizes(&grown, cs)?;
        let shifted: u64 = grown_sizes.iter().filter(|(d, _)| !have.contains(d)).map(|(_, s)| s).sum();
        println!(
            "  {kind:>5} {:>4}K {:>8} {:>11.1}% {:>14.2} {:>11.2}% {:>7.0}KiB {:>15.1}%",
            kib,
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

/// What upgrading one package does to a filesystem image built from the same tree: 4 MiB of
/// its files rewritten in place (at 37% of the image) and 16 scattered 4 KiB metadata blocks
/// changed. Returns where the package lies.
fn upgrade_one_package(data: &mut [u8]) -> u64 {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let pkg_at = (data.len() as u64 * 37 / 100) & !4095;
    for b in &mut data[pkg_at as usize..pkg_at as usize + (4 << 20)] {
        *b = b.wrapping_add(1);
    }
    for _ in 0..16 {
        let at = (next() % (data.len() as u64 / 4096)) as usize * 4096;
        data[at + 100] ^= 0xff;
    }
    pkg_at
}

/// (digest, compressed size) of every chunk, compressed on all cores.
fn compressed_sizes(data: &[u8], cut: Cut) -> Result<Vec<(manifest::Sha256Digest, u64)>> {
    let chunks: Vec<&[u8]> = split(data, cut);
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

/// How a bench row cuts chunks: fixed size, or content-defined as `aclpub build` does.
#[derive(Clone, Copy)]
enum Cut {
    Fixed(usize),
    Cdc(u32),
}

fn split(data: &[u8], cut: Cut) -> Vec<&[u8]> {
    match cut {
        Cut::Fixed(cs) => data.chunks(cs).collect(),
        Cut::Cdc(avg) => {
            let chunker = payload::chunker::Chunker::new(avg).expect("valid average");
            let mut out = Vec::new();
            let (mut start, mut blocks) = (0usize, 0u32);
            for (i, block) in data.chunks(payload::chunker::BLOCK).enumerate() {
                blocks += 1;
                let end = (i * payload::chunker::BLOCK + block.len()).min(data.len());
                if chunker.cut_after(block, blocks) || end == data.len() {
                    out.push(&data[start..end]);
                    start = end;
                    blocks = 0;
                }
            }
            out
        }
    }
}

/// `cargo xtask bench install`: a full install of a `mib` MiB image from nginx on loopback
/// into a slot on a loop device, against `curl | zstd -d | dd oflag=direct` of the same
/// payload into the same slot (which verifies nothing). Also reports our peak RSS.
pub(crate) fn install(sh: &Shell, mib: u64) -> Result<()> {
    tools::ensure(sh, &tools::BENCH_TOOLS)?;
    cmd!(sh, "cargo build --quiet --release --locked -p publish -p aclctl").run()?;
    let root = sh.current_dir();
    let (aclpub, aclctl) = (root.join("target/release/aclpub"), root.join("target/release/aclctl"));
    let input = input(sh, mib)?;
    let dir = root.join(format!("target/bench/install-{mib}m"));
    let repo = dir.join("repo");
    let version = "1.0.0";
    // Built once and kept; rebuilt when the publisher's manifest format changed since.
    let current = std::fs::read(repo.join("images/1.1.0/x86_64/manifest.json"))
        .ok()
        .and_then(|b| manifest::Manifest::from_bytes(&b).ok())
        .is_some_and(|m| m.format == 2);
    if !current {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("trust"))?;
        sh.change_dir(&dir);
        cmd!(sh, "{aclpub} keygen --out keys bench").quiet().ignore_stdout().run()?;
        std::fs::copy(dir.join("keys/bench.pub"), dir.join("trust/bench.pub"))?;
        println!("building the {mib} MiB image (once) ...");
        // Format 2 (BLAKE3 chunk digests): what a fleet of this release's agents gets.
        cmd!(sh, "{aclpub} build {input} --out build --version {version} --manifest-format 2")
            .quiet()
            .ignore_stdout()
            .run()?;
        cmd!(sh, "{aclpub} sign --key keys/bench.key build/manifest.json").quiet().ignore_stdout().run()?;
        cmd!(sh, "{aclpub} publish build --repo repo --channel stable --key keys/bench.key --trust trust")
            .quiet()
            .ignore_stdout()
            .run()?;
        // 1.1.0: one package upgraded in place (4 MiB of files) plus 16 metadata blocks.
        let v2_input = dir.join("input-1.1.0.img");
        let mut data = std::fs::read(&input)?;
        upgrade_one_package(&mut data);
        std::fs::write(&v2_input, data)?;
        cmd!(sh, "{aclpub} build {v2_input} --out build2 --version 1.1.0 --manifest-format 2")
            .quiet()
            .ignore_stdout()
            .run()?;
        cmd!(sh, "{aclpub} sign --key keys/bench.key build2/manifest.json").quiet().ignore_stdout().run()?;
        cmd!(sh, "{aclpub} publish build2 --repo repo --channel stable --key keys/bench.key --trust trust")
            .quiet()
            .ignore_stdout()
            .run()?;
        std::fs::remove_file(&v2_input)?;
        sh.change_dir(&root);
    }
    let m = manifest::Manifest::from_bytes(&std::fs::read(
        repo.join(format!("images/{version}/x86_64/manifest.json")),
    )?)?;

    // A disk-image file with slots big enough, on a loop device. Written in full first: in a
    // sparse file, whichever install runs first would also pay for the file system allocating
    // its blocks (the baseline ran 1.5x slower on a fresh sparse file than on a written one),
    // and a partition on a real disk has nothing to allocate.
    let slot_mib = m.image_size.div_ceil(1 << 20) + 16;
    let disk_file = dir.join("disk.img");
    let _ = std::fs::remove_file(&disk_file);
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&disk_file)?;
        let zeros = vec![0u8; 4 << 20];
        for _ in 0..(2 * slot_mib + 8) / 4 {
            f.write_all(&zeros)?;
        }
        f.write_all(&zeros[..(((2 * slot_mib + 8) % 4) << 20) as usize])?;
        f.sync_all()?;
    }
    let usr = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";
    let a = format!("3:0:+{slot_mib}M");
    let b = format!("4:0:+{slot_mib}M");
    cmd!(
        sh,
        "sgdisk -n {a} -c 3:USR-A -t 3:{usr} -n {b} -c 4:USR-B -t 4:{usr} -A 3:set:48 -A 3:set:56 {disk_file}"
    )
    .quiet()
    .ignore_stdout()
    .run()?;
    let dev = cmd!(sh, "losetup --find --show {disk_file}").read()?;
    let result = (|| -> Result<()> {
        let server = crate::nginx::Nginx::start(&repo, &dir.join("nginx"))?;
        let url = server.url();
        let state = dir.join("state");
        let offset = slot_b_offset(sh, &disk_file)?;

        // Baseline first, so that ours does not profit from anything it warmed.
        let payload_url = format!("{url}/images/{version}/x86_64/payload");
        cmd!(sh, "cat {repo}/images/{version}/x86_64/payload").quiet().ignore_stdout().run()?;
        let started = Instant::now();
        let pipeline = format!(
            "curl -sf {payload_url} | zstd -dq | dd of={dev} oflag=direct,seek_bytes seek={offset} bs=4M status=none"
        );
        cmd!(sh, "sh -c {pipeline}").run()?;
        let base = started.elapsed().as_secs_f64();

        let _ = std::fs::remove_dir_all(&state);
        // Peak RSS (KiB), user and system CPU seconds, minor page faults.
        let time_format = "%M %U %S %R";
        let started = Instant::now();
        let out = cmd!(
            sh,
            "/usr/bin/time -f {time_format} {aclctl} update --disk {dev} --booted A --state-dir {state} --repo {url} --trust {dir}/trust --version {version} --json"
        )
        .output()?;
        let ours = started.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("aclctl update failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let usage: Vec<f64> = stderr
            .lines()
            .last()
            .map(|l| l.split_whitespace().filter_map(|w| w.parse().ok()).collect())
            .unwrap_or_default();
        let (rss_kib, user, system, faults) = match usage[..] {
            [rss, user, system, faults] => (rss as u64, user, system, faults),
            _ => (0, 0.0, 0.0, 0.0),
        };
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let gib = m.image_size as f64 / 1e6;
        println!(
            "bench install: {} MiB image ({} MiB payload), nginx on loopback -> loop device slot",
            m.image_size >> 20,
            m.payload.size >> 20
        );
        println!(
            "  aclctl update       {ours:7.2} s  {:7.1} MB/s  (write {:.2} s, of which the writer was busy {:.2} s, + read-back verify {:.2} s, O_DIRECT {}), peak RSS {:.1} MiB",
            gib / ours,
            report["write_seconds"].as_f64().unwrap_or(0.0),
            report["writer_busy_seconds"].as_f64().unwrap_or(0.0),
            report["verify_seconds"].as_f64().unwrap_or(0.0),
            report["direct_io"],
            rss_kib as f64 / 1024.0
        );
        println!(
            "  baseline curl|zstd -d|dd oflag=direct {base:7.2} s  {:7.1} MB/s  (verifies nothing)",
            gib / base
        );
        println!("  ratio (time ours / time baseline): {:.2}", ours / base);
        let (decode, hash, sha256) = cpu_cost(&repo.join(format!("images/{version}/x86_64/payload")), &m)?;
        let hash_name = match m.chunk_hash() {
            manifest::ChunkHash::Sha256 => "SHA-256",
            manifest::ChunkHash::Blake3 => "BLAKE3",
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // Whether the install is bound by the CPU (near 100 %) or waits (the loop device's
        // writes run in a kernel thread not counted here).
        println!(
            "  CPU used by aclctl: {user:.2} user + {system:.2} system core-seconds = {:.0} % of {cores:.0} cores over its {ours:.2} s; {faults:.0} minor page faults",
            100.0 * (user + system) / (ours * cores)
        );
        println!(
            "  CPU floor: decode {decode:.2} + {hash_name} {hash:.2} core-seconds (one core, this run; SHA-256, format 1's chunk digest, would be {sha256:.2}) over {cores:.0} cores = {:.2} s; ours is {:.2}x that",
            (decode + hash) / cores,
            ours * cores / (decode + hash)
        );
        // The other floor: the device. The same bytes in chunk-sized direct writes and one
        // fdatasync, nothing computed (zeros: the loop device copies them as any other bytes).
        if offset % (256 << 10) != 0 {
            bail!("slot B at byte {offset} is not 256 KiB aligned");
        }
        let (seek, count) =
            ((offset / (256 << 10)).to_string(), m.image_size.div_ceil(256 << 10).to_string());
        let started = Instant::now();
        cmd!(sh, "dd if=/dev/zero of={dev} bs=256K seek={seek} count={count} oflag=direct conv=fdatasync status=none")
            .run()?;
        let device = started.elapsed().as_secs_f64();
        println!(
            "  device floor: the image's bytes alone in 256 KiB O_DIRECT writes + one fdatasync: {device:.2} s (the loop device's kernel thread copies them into its file, on the same {cores:.0} cores)"
        );

        // kill -9 in the middle of a full install, then resume: how much is fetched twice?
        let docs: u64 = ["channels/stable/index.json", "channels/stable/index.json.sig"]
            .iter()
            .map(|p| p.to_string())
            .chain([
                // nginx sends the gzip copy (gzip_static) to a client that accepts it.
                format!("images/{version}/x86_64/manifest.json.gz"),
                format!("images/{version}/x86_64/manifest.json.sig"),
            ])
            .map(|p| std::fs::metadata(repo.join(p)).map_or(0, |m| m.len()))
            .sum();
        let state = dir.join("state-kill");
        let _ = std::fs::remove_dir_all(&state);
        // Slot B holds 1.0.0 now: zeroed, so that the install is a whole one again and the
        // resume finds only what the killed run wrote.
        if offset % (1 << 20) != 0 {
            bail!("slot B at byte {offset} is not MiB-aligned");
        }
        let (seek, count) = ((offset >> 20).to_string(), slot_mib.to_string());
        cmd!(sh, "dd if=/dev/zero of={dev} bs=1M seek={seek} count={count} oflag=direct status=none")
            .run()?;
        let sent_before = server.bytes_sent(&dir.join("nginx"));
        let update = |state: &Path| {
            let mut c = std::process::Command::new(&aclctl);
            c.args([
                "update",
                "--disk",
                &dev,
                "--booted",
                "A",
                "--repo",
                &url,
                "--json",
                "--version",
                version,
                "--trust",
            ])
            .arg(dir.join("trust"))
            .arg("--state-dir")
            .arg(state);
            c
        };
        let mut child = update(&state).stdout(std::process::Stdio::null()).spawn()?;
        let kill_after = report["write_seconds"].as_f64().unwrap_or(1.0) / 2.0;
        std::thread::sleep(std::time::Duration::from_secs_f64(kill_after));
        child.kill()?;
        child.wait()?;
        let out = update(&state).output()?;
        if !out.status.success() {
            bail!("resumed aclctl update failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let resumed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        std::thread::sleep(std::time::Duration::from_millis(200));
        let sent = server.bytes_sent(&dir.join("nginx")) - sent_before;
        let twice = sent.saturating_sub(m.payload.size + 2 * docs);
        println!(
            "  kill -9 after {kill_after:.2} s, then resume: {} MiB of the image were found written; sent twice {:.1} MiB = {:.2}% of the image (as nginx counts: what it handed to its sockets, with their send buffers)",
            resumed["resumed_bytes"].as_u64().unwrap_or(0) >> 20,
            twice as f64 / 1048576.0,
            100.0 * twice as f64 / m.image_size as f64
        );

        // The node confirms 1.0.0 in B, then updates to 1.1.0 (one package changed) into A.
        let trust = dir.join("trust");
        cmd!(sh, "{aclctl} mark-good --disk {dev} --booted B --state-dir {state}")
            .quiet()
            .ignore_stdout()
            .run()?;
        let sent_before = server.bytes_sent(&dir.join("nginx"));
        let out = cmd!(
            sh,
            "{aclctl} update --disk {dev} --booted B --state-dir {state} --repo {url} --trust {trust} --json"
        )
        .read()?;
        std::thread::sleep(std::time::Duration::from_millis(200));
        let adaptive: serde_json::Value = serde_json::from_str(&out)?;
        let sent = server.bytes_sent(&dir.join("nginx")) - sent_before;
        let payload2 = adaptive["payload_bytes"].as_u64().unwrap_or(1);
        println!(
            "  update to 1.1.0 (one package): fetched {:.1} MiB = {:.2}% of its {:.0} MiB payload (documents included); reused {} MiB from slot B",
            sent as f64 / 1048576.0,
            100.0 * sent as f64 / payload2 as f64,
            payload2 as f64 / 1048576.0,
            adaptive["reused_bytes"].as_u64().unwrap_or(0) >> 20
        );
        println!("  rerun: cargo xtask bench install --size-mib {mib}");
        Ok(())
    })();
    let _ = cmd!(sh, "losetup -d {dev}").quiet().run();
    result
}

/// The CPU an install cannot avoid, timed on one core: decompressing every frame of the payload
/// and the digest of every chunk (the check before a chunk is written), in the manifest's hash
/// and, for comparison, in SHA-256 (format 1's). Returns core-seconds.
fn cpu_cost(payload: &Path, m: &manifest::Manifest) -> Result<(f64, f64, f64)> {
    let data = std::fs::read(payload)?;
    let mut ctx = zstd::bulk::Decompressor::new()?;
    let mut buf = vec![0u8; m.max_chunk_size as usize];
    let (mut decode, mut hash, mut sha256) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for c in &m.chunks {
        let frame =
            data.get(c.offset as usize..(c.offset + u64::from(c.length)) as usize).context("frame")?;
        let t = Instant::now();
        let n = ctx.decompress_to_buffer(frame, &mut buf)?;
        decode += t.elapsed();
        let t = Instant::now();
        let ok = c.digest.matches(&buf[..n]);
        hash += t.elapsed();
        if !ok {
            bail!("chunk at {} does not match its digest", c.image_offset);
        }
        let t = Instant::now();
        std::hint::black_box(manifest::Sha256Digest::of(&buf[..n]));
        sha256 += t.elapsed();
    }
    Ok((decode.as_secs_f64(), hash.as_secs_f64(), sha256.as_secs_f64()))
}

/// Byte offset of USR-B (partition 4) in a disk image, from `sgdisk -i 4`.
fn slot_b_offset(sh: &Shell, disk: &Path) -> Result<u64> {
    let out = cmd!(sh, "sgdisk -i 4 {disk}").read()?;
    let first: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("First sector: "))
        .and_then(|l| l.split_whitespace().next())
        .context("sgdisk -i printed no first sector")?
        .parse()?;
    Ok(first * 512)
}

/// `bench idle`: the agent with nothing to do. Runs the release acl-agentd (check mode, a
/// signed file:// repository holding only what runs, metrics served) for `secs` seconds beside a
/// `sleep` process as the baseline, and prints resident memory and wake-ups (context switches
/// over all threads) of both. Goals: RSS at most 15 MiB; no wake-ups beyond the check interval
/// (1 h here, so none in the window after start-up).
pub(crate) fn idle(sh: &Shell, secs: u64, kubernetes: bool) -> Result<()> {
    tools::ensure(sh, &tools::DEMO_TOOLS)?;
    cmd!(sh, "cargo build --quiet --release --locked -p publish -p agent").run()?;
    let root = sh.current_dir();
    let (aclpub, agentd) = (root.join("target/release/aclpub"), root.join("target/release/acl-agentd"));
    let dir = root.join("target/bench/idle");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("trust"))?;
    std::fs::create_dir_all(dir.join("root/etc/acl-update"))?;
    sh.change_dir(&dir);
    std::fs::write(dir.join("fs.img"), vec![7u8; 4 << 20])?;
    cmd!(sh, "{aclpub} keygen --out keys idle").quiet().ignore_stdout().run()?;
    std::fs::copy(dir.join("keys/idle.pub"), dir.join("trust/idle.pub"))?;
    cmd!(sh, "{aclpub} build fs.img --out build --version 1.0.0").quiet().ignore_stdout().run()?;
    cmd!(sh, "{aclpub} sign --key keys/idle.key build/manifest.json").quiet().ignore_stdout().run()?;
    cmd!(sh, "{aclpub} publish build --repo repo --channel stable --key keys/idle.key --trust trust")
        .quiet()
        .ignore_stdout()
        .run()?;
    std::fs::create_dir_all(dir.join("state"))?;
    std::fs::copy(dir.join("build/manifest.json"), dir.join("state/slot-A.manifest.json"))?;
    std::fs::File::create(dir.join("disk.img"))?.set_len(64 << 20)?;
    let usr = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";
    cmd!(
        sh,
        "sgdisk -n 3:0:+24M -c 3:USR-A -t 3:{usr} -n 4:0:+24M -c 4:USR-B -t 4:{usr} -A 3:set:48 -A 3:set:56 disk.img"
    )
    .quiet()
    .ignore_stdout()
    .run()?;
    let d = dir.display();
    std::fs::write(
        dir.join("root/etc/acl-update/config.toml"),
        format!(
            "[updates]\nmode = \"check\"\nrepository = \"file://{d}/repo\"\n[trust]\nkeys = [\"{d}/trust\"]\n\
             [health]\nrequired-dir = \"{d}/none\"\nwanted-dir = \"{d}/none\"\n\
             [agent]\nstate-dir = \"{d}/state\"\nsocket = \"{d}/agent.sock\"\nreboot-command = \"true\"\n\
             metrics-listen = \"127.0.0.1:0\"\n"
        ),
    )?;
    // Kubernetes mode: the agent follows its Node on the test API server (bookmarks once a
    // minute and watches cut after 290 s, like a real one), which runs in this process.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let server = if kubernetes {
        let opts = test_apiserver::Options {
            bookmark_every: std::time::Duration::from_secs(60),
            max_watch: std::time::Duration::from_secs(290),
            ..test_apiserver::Options::default()
        };
        let server = rt.block_on(test_apiserver::ApiServer::start(opts))?;
        let now = "2026-01-01T00:00:00Z";
        server
            .create(
                test_apiserver::Kind::Node,
                serde_json::json!({"metadata": {"name": "bench-node"}, "spec": {}, "status": {"conditions": [
                    {"type": "Ready", "status": "True", "lastHeartbeatTime": now}]}}),
            )
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        std::fs::write(
            dir.join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n\
                 users:\n- name: u\n  user:\n    token: bench\n\
                 contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
                server.url()
            ),
        )?;
        let mut config =
            std::fs::OpenOptions::new().append(true).open(dir.join("root/etc/acl-update/config.toml"))?;
        std::io::Write::write_all(
            &mut config,
            format!(
                "[kubernetes]\nenabled = true\nnode-name = \"bench-node\"\nkubeconfig = \"{d}/kubeconfig\"\n"
            )
            .as_bytes(),
        )?;
        Some(server)
    } else {
        None
    };
    sh.change_dir(&root);
    let mut agent = std::process::Command::new(&agentd)
        .arg("--config-root")
        .arg(dir.join("root"))
        .arg("--disk")
        .arg(dir.join("disk.img"))
        .args(["--booted", "A"])
        .stderr(std::fs::File::create(dir.join("agent.log"))?)
        .spawn()?;
    let mut sleeper = std::process::Command::new("sleep").arg((secs + 30).to_string()).spawn()?;
    // Start-up (first check) done; then the window.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (a0, s0) = (switches(agent.id()), switches(sleeper.id()));
    let requests =
        |s: &Option<test_apiserver::ApiServer>| s.as_ref().map_or(0, |s| s.requests().values().sum::<u64>());
    let r0 = requests(&server);
    println!("measuring {secs} s of idling ...");
    std::thread::sleep(std::time::Duration::from_secs(secs));
    let (a1, s1) = (switches(agent.id()), switches(sleeper.id()));
    let r1 = requests(&server);
    if let Some(status) = agent.try_wait()? {
        bail!("acl-agentd exited ({status}); see {}", dir.join("agent.log").display());
    }
    let (arss, srss) = (rss_kib(agent.id()), rss_kib(sleeper.id()));
    let threads = std::fs::read_dir(format!("/proc/{}/task", agent.id()))?.count();
    let _ = agent.kill();
    let _ = sleeper.kill();
    let _ = agent.wait();
    let _ = sleeper.wait();
    let per_min = |n: u64| n as f64 * 60.0 / secs as f64;
    println!("| process | RSS | threads | wake-ups in {secs} s | per minute |");
    println!("|---|---|---|---|---|");
    println!(
        "| acl-agentd (idle, check mode, metrics on{}) | {:.1} MiB | {threads} | {} | {:.1} |",
        if kubernetes { ", Kubernetes mode" } else { "" },
        arss as f64 / 1024.0,
        wakeups(&a0, &a1),
        per_min(wakeups(&a0, &a1))
    );
    println!(
        "| sleep (baseline) | {:.1} MiB | 1 | {} | {:.1} |",
        srss as f64 / 1024.0,
        wakeups(&s0, &s1),
        per_min(wakeups(&s0, &s1))
    );
    if let Some(server) = &server {
        let annotations = server
            .get(test_apiserver::Kind::Node, "", "bench-node")
            .map(|n| n["metadata"]["annotations"].as_object().map_or(0, |a| a.len()))
            .unwrap_or(0);
        if annotations == 0 {
            bail!("the agent wrote no status onto its Node; see {}", dir.join("agent.log").display());
        }
        println!(
            "Kubernetes mode: {} API requests in the {secs} s window ({annotations} status annotations on the Node)",
            r1 - r0
        );
    }
    println!(
        "RSS ratio agent/sleep: {:.1}; goal <= 15 MiB: {}",
        arss as f64 / srss.max(1) as f64,
        if arss <= 15 * 1024 { "met" } else { "MISSED" }
    );
    Ok(())
}

/// Voluntary plus involuntary context switches of each thread of `pid`.
fn switches(pid: u32) -> std::collections::HashMap<String, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Default::default() };
    tasks
        .flatten()
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let n = status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            Some((t.file_name().to_string_lossy().into_owned(), n))
        })
        .collect()
}

/// Wake-ups between two samples: each surviving thread's new switches, every switch of a
/// thread that appeared, and one for each thread that ended (tokio retires idle blocking
/// threads after 10 s, which is itself a wake-up).
fn wakeups(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> u64 {
    let grown: u64 = after.iter().map(|(tid, n)| n - before.get(tid).copied().unwrap_or(0).min(*n)).sum();
    let ended = before.keys().filter(|tid| !after.contains_key(*tid)).count() as u64;
    grown + ended
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

//! One function per subcommand; each calls into the library crates and prints a summary.

use crate::cli::{BuildArgs, Cli, Command, PublishArgs, TrustArgs};
use anyhow::{Context as _, Result, bail};
use jiff::{SignedDuration, SpanRelativeTo, Timestamp};
use manifest::{ChannelIndex, Manifest, Wave};
use repo::TrustPolicy;
use repo::layout::signature_path;
use repo::local::{self, PublishRequest};
use repo::state::AcceptedState;
use signing::{SecretKey, SignatureFile, TrustedKeys};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub(crate) fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out, name } => keygen(&out, &name),
        Command::StableInodes { image } => stable_inodes(&image),
        Command::Build(args) => build(&args),
        Command::Sign { keys, document } => sign(&keys, &document),
        Command::Publish(args) => publish(&args),
        Command::Verify { repo, trust, state, at, threads } => {
            verify(&repo, &trust, state.as_deref(), at, threads.get())
        }
        Command::VerifyImage { dir, trust, threads } => verify_image(&dir, &trust, threads.get()),
        Command::Show { path } => show(&path),
    }
}

fn keygen(out: &Path, name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') {
        bail!("key name {name:?} must be a plain file name");
    }
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let key = SecretKey::generate().context("read the system's random source")?;
    let secret = out.join(format!("{name}.key"));
    let public = out.join(format!("{name}.pub"));
    key.write_new(&secret)?;
    key.public().write_new(&public)?;
    println!("key {}: secret {} (keep it offline), public {}", key.id(), secret.display(), public.display());
    Ok(())
}

fn build(a: &BuildArgs) -> Result<()> {
    let salt = a
        .salt
        .as_deref()
        .map(|s| hex::decode(s).with_context(|| format!("--salt {s:?} is not hex")))
        .transpose()?;
    let size =
        std::fs::metadata(&a.fs_image).with_context(|| format!("read {}", a.fs_image.display()))?.len();
    let chunk_starts = erofs_chunk_starts(&a.fs_image, size, a.erofs_metadata_chunk)?;
    let opts = payload::BuildOptions {
        version: a.version.clone(),
        arch: a.arch.clone(),
        kernel_cmdline: a.cmdline.clone(),
        chunk_size: a.chunk_size,
        level: a.level,
        threads: a.threads.get(),
        salt,
        chunk_starts,
        chunk_hash: if a.manifest_format == 1 {
            manifest::ChunkHash::Sha256
        } else {
            manifest::ChunkHash::Blake3
        },
    };
    let bar = cliutil::byte_bar("building", size);
    let started = Instant::now();
    let m = payload::build(&a.fs_image, &a.out, &opts, &|done| bar.set_position(done))?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "built {} {}: image {} in {} chunks, payload {} ({:.1}% of image), {:.0} MB/s; verity root {}",
        m.version,
        m.arch,
        human(m.image_size),
        m.chunks.len(),
        human(m.payload.size),
        100.0 * m.payload.size as f64 / m.image_size as f64,
        size as f64 / secs / 1e6,
        m.verity.root_hash
    );
    println!("next: aclpub sign --key KEY {}", a.out.join(payload::MANIFEST_FILE).display());
    Ok(())
}

fn sign(keys: &[PathBuf], document: &Path) -> Result<()> {
    let keys = keys.iter().map(|k| SecretKey::read(k)).collect::<Result<Vec<_>, _>>()?;
    let purpose = local::sign_document(document, &keys)?;
    let ids: Vec<String> = keys.iter().map(|k| k.id().to_string()).collect();
    println!("signed {} ({purpose}) with {}", document.display(), ids.join(", "));
    Ok(())
}

fn policy(t: &TrustArgs) -> Result<TrustPolicy> {
    let keys = TrustedKeys::load(&t.trust)?;
    TrustPolicy::new(keys, t.threshold).map_err(anyhow::Error::msg)
}

fn publish(a: &PublishArgs) -> Result<()> {
    let now = Timestamp::now().round(jiff::Unit::Second)?;
    let expires_in = span_to_duration(&a.expires_in).context("--expires-in")?;
    let waves = a.waves.iter().map(|w| parse_wave(w, now)).collect::<Result<Vec<_>>>()?;
    let keys = a.keys.iter().map(|k| SecretKey::read(k)).collect::<Result<Vec<_>, _>>()?;
    let req = PublishRequest {
        repo: &a.repo,
        image_dir: &a.image,
        channel: &a.channel,
        expires_in,
        waves,
        now,
        threads: a.threads.get(),
    };
    let bar = cliutil::byte_bar("verifying", 0);
    let p = local::publish(&req, &keys, &policy(&a.trust)?, &|d, t| {
        bar.set_length(t);
        bar.set_position(d);
    })?;
    bar.finish_and_clear();
    println!(
        "published {} {} to channel {:?} of {} (index version {}, expires {}){}",
        p.release.version,
        p.release.arch,
        a.channel,
        a.repo.display(),
        p.index_version,
        now + expires_in,
        if p.copied { "" } else { "; image files were already there" }
    );
    Ok(())
}

fn verify(
    repo: &Path,
    trust: &TrustArgs,
    state_path: Option<&Path>,
    at: Option<Timestamp>,
    threads: usize,
) -> Result<()> {
    let policy = policy(trust)?;
    let mut state = state_path.map(AcceptedState::load).transpose()?;
    let now = at.unwrap_or_else(Timestamp::now);
    let bar = cliutil::byte_bar("verifying", 0);
    let report = local::verify_repository(repo, &policy, now, state.as_mut(), threads, &|label, d, t| {
        bar.set_message(label.to_owned());
        bar.set_length(t);
        bar.set_position(d);
    })?;
    bar.finish_and_clear();
    if let (Some(path), Some(state)) = (state_path, &state) {
        state.save(path)?;
    }
    for (name, version, expires, releases) in &report.channels {
        println!("channel {name}: index version {version}, expires {expires}, {releases} release(s): OK");
    }
    println!(
        "repository {} verified: {} image(s), {} checked chunk by chunk, threshold {}",
        repo.display(),
        report.images,
        human(report.image_bytes),
        policy.threshold()
    );
    Ok(())
}

fn verify_image(dir: &Path, trust: &TrustArgs, threads: usize) -> Result<()> {
    let bar = cliutil::byte_bar("verifying", 0);
    let m = local::verify_image_dir(dir, &policy(trust)?, threads, &|d, t| {
        bar.set_length(t);
        bar.set_position(d);
    })?;
    bar.finish_and_clear();
    println!(
        "image {} {} verified: {} in {} chunks, verity root {}",
        m.version,
        m.arch,
        human(m.image_size),
        m.chunks.len(),
        m.verity.root_hash
    );
    Ok(())
}

fn show(path: &Path) -> Result<()> {
    let manifest = path.join(payload::MANIFEST_FILE);
    if manifest.exists() {
        return show_image(&manifest);
    }
    let channels = path.join("channels");
    let mut names: Vec<_> = std::fs::read_dir(&channels)
        .with_context(|| format!("{} is neither an image directory nor a repository", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    for name in names {
        let ipath = channels.join(&name).join(repo::layout::INDEX_FILE);
        let bytes = std::fs::read(&ipath).with_context(|| format!("read {}", ipath.display()))?;
        let index = ChannelIndex::from_bytes(&bytes).with_context(|| ipath.display().to_string())?;
        println!(
            "channel {}: index version {}, issued {}, expires {}, signed by {}",
            index.channel,
            index.index_version,
            index.issued,
            index.expires,
            signers(&ipath)
        );
        for r in &index.releases {
            let waves: Vec<String> = r.waves.iter().map(|w| format!("{}%@{}", w.percent, w.start)).collect();
            println!(
                "  {:<14} {:<8} {}  waves {}",
                r.version.to_string(),
                r.arch,
                r.manifest,
                waves.join(" ")
            );
        }
    }
    Ok(())
}

fn show_image(manifest: &Path) -> Result<()> {
    let bytes = std::fs::read(manifest).with_context(|| format!("read {}", manifest.display()))?;
    let m = Manifest::from_bytes(&bytes).with_context(|| manifest.display().to_string())?;
    let unique: std::collections::BTreeSet<u64> = m.chunks.iter().map(|c| c.offset).collect();
    println!("image {} ({})", m.version, m.arch);
    println!("  image size     {} ({} bytes)", human(m.image_size), m.image_size);
    println!("  image sha256   {}", m.image_sha256);
    println!(
        "  chunks         {} (content-defined, average {}, at most {}), {} distinct",
        m.chunks.len(),
        human(m.image_size / m.chunks.len().max(1) as u64),
        human(u64::from(m.max_chunk_size)),
        unique.len()
    );
    println!(
        "  payload        {} ({}, {:.1}% of image)",
        m.payload.path,
        human(m.payload.size),
        100.0 * m.payload.size as f64 / m.image_size as f64
    );
    println!(
        "  verity         data {} + tree {}, root {}",
        human(m.verity.data_size),
        human(m.image_size - m.verity.data_size),
        m.verity.root_hash
    );
    println!("  cmdline        {}", m.kernel_cmdline);
    println!("  signed by      {}", signers(manifest));
    Ok(())
}

/// The key ids in a document's signature file, or why there are none (not verified).
fn signers(document: &Path) -> String {
    match std::fs::read(signature_path(document)).map(|b| SignatureFile::from_bytes(&b)) {
        Ok(Ok(f)) if !f.signatures.is_empty() => {
            f.signatures.iter().map(|s| s.keyid.to_string()).collect::<Vec<_>>().join(", ")
                + " (not verified)"
        }
        Ok(Ok(_)) => "nobody".into(),
        Ok(Err(e)) => format!("unreadable signature file: {e}"),
        Err(_) => "nobody (no .sig file)".into(),
    }
}

fn span_to_duration(span: &jiff::Span) -> Result<SignedDuration> {
    Ok(span.to_duration(SpanRelativeTo::days_are_24_hours())?)
}

fn parse_wave(s: &str, now: Timestamp) -> Result<Wave> {
    let (start, pct) = s.rsplit_once('=').with_context(|| format!("--wave {s:?}: expected START=PERCENT"))?;
    let percent: u8 = pct.parse().with_context(|| format!("--wave {s:?}: {pct:?} is not a percentage"))?;
    let start = match start.strip_prefix('+') {
        Some(rel) => {
            let span: jiff::Span = rel.parse().with_context(|| format!("--wave {s:?}: bad span {rel:?}"))?;
            now + span_to_duration(&span)?
        }
        None => start.parse().with_context(|| format!("--wave {s:?}: bad time {start:?}"))?,
    };
    Ok(Wave { start, percent })
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", units[u]) }
}

/// Where chunks should start in an erofs image (`erofs_stable::chunk_starts`), or none for
/// another file system or when turned off.
fn erofs_chunk_starts(image: &Path, size: u64, group: u64) -> Result<Vec<u64>> {
    if group == 0 {
        return Ok(Vec::new());
    }
    let file = std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    // Only an optimisation: an image whose layout cannot be read is built without it.
    match erofs_stable::file_extents(&file) {
        Ok((extents, 4096)) => Ok(erofs_stable::chunk_starts(&extents, size.div_ceil(4096), group)),
        Ok((_, block)) => {
            eprintln!(
                "aclpub: {}: erofs blocks of {block} bytes, not 4096: chunks do not follow its layout",
                image.display()
            );
            Ok(Vec::new())
        }
        Err(erofs_stable::Error::NotErofs) => Ok(Vec::new()),
        Err(e) => {
            eprintln!("aclpub: {}: chunks do not follow its erofs layout: {e}", image.display());
            Ok(Vec::new())
        }
    }
}

fn stable_inodes(image: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    let stats = erofs_stable::stabilize(&file).with_context(|| image.display().to_string())?;
    file.sync_all().with_context(|| format!("syncing {}", image.display()))?;
    println!("{}: {} inodes, {} renumbered", image.display(), stats.inodes, stats.changed);
    Ok(())
}

//! Replacing a file crash-safely and concurrency-safely: the one durable-write helper of the
//! workspace ([`replace_file`]).
//!
//! A reader sees the old file or the new one, never a mixture, and after a crash the file is
//! one or the other. The temporary file has a name no other writer uses at the same time (the
//! process id and a per-process counter) and is created with `O_EXCL`, so two writers of the
//! same file, in two processes or two threads of one, never write into or rename each other's
//! temporary file (issue 12: concurrent checks shared `.accepted-index.json.tmp<pid>`, and
//! concurrent installs shared `.install-journal.json.tmp`). The last rename wins, whole. A
//! failed write removes its temporary file.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Temporary files created by this process so far; part of each temporary file's name.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `bytes` atomically and durably: writes a new temporary file beside it,
/// syncs it, renames it over `path` and syncs the directory so that the rename is durable.
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (tmp, mut file) = create_temp(dir, path)?;
    let result = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates `.<name>.tmp.<pid>.<n>` in `dir` with `O_EXCL`; a name left behind by a crashed
/// process with the same pid is skipped.
fn create_temp(dir: &Path, path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} has no file name", path.display()))
    })?;
    let mut last = None;
    for _ in 0..64 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp.{}.{n}", std::process::id()));
        let tmp = dir.join(tmp_name);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary file name")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect()
    }

    #[test]
    fn concurrent_writers_of_one_file_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let path = &path;
                s.spawn(move || {
                    for i in 0..200u32 {
                        let body = format!("writer {t} write {i} {}", "x".repeat(4000));
                        replace_file(path, body.as_bytes()).unwrap();
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("writer ") && text.ends_with(&"x".repeat(4000)), "a torn file");
        assert_eq!(text.len(), "writer 0 write 199 ".len() + 4000);
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file_and_a_stale_one_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a directory: the rename fails.
        let path = dir.path().join("taken");
        std::fs::create_dir(path.join("x").parent().unwrap()).unwrap();
        std::fs::write(path.join("x"), b"").unwrap();
        assert!(replace_file(&path, b"data").is_err());
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
        // A leftover with the next name (a crashed process with our pid) is not written into.
        let next = COUNTER.load(Ordering::Relaxed);
        let stale = dir.path().join(format!(".f.tmp.{}.{next}", std::process::id()));
        std::fs::write(&stale, b"stale").unwrap();
        replace_file(&dir.path().join("f"), b"new").unwrap();
        assert_eq!(std::fs::read(&stale).unwrap(), b"stale");
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"new");
    }
}

//! The first-stage selection on a real GPT disk image: the gptprio rule, tries spent before the
//! attempt, a slot without a valid signed trailer given up, nothing bootable named.

use slot::Disk;
use slot::choice::{self, Slot, Tries};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

struct Fixture {
    dir: tempfile::TempDir,
    disk: PathBuf,
    policy: repo::TrustPolicy,
    key: signing::SecretKey,
}

fn fixture() -> Option<Fixture> {
    let sgdisk = testkit::tool("sgdisk", "gdisk")?;
    let dir = tempfile::tempdir().unwrap();
    let disk = testkit::flatcar_image(&sgdisk, dir.path(), 64, 16);
    let key = signing::SecretKey::from_seed([9; 32]);
    let policy = repo::TrustPolicy::new(signing::TrustedKeys::new([key.public()]).unwrap(), 1).unwrap();
    Some(Fixture { dir, disk, policy, key })
}

impl Fixture {
    /// Builds and signs a 1 MiB image `version` and writes its trailer into `slot` (signed by
    /// `key`, or by the fixture's key).
    fn install_trailer(&self, slot: Slot, version: &str, key: Option<&signing::SecretKey>) {
        self.install_signed(slot, version, std::slice::from_ref(key.unwrap_or(&self.key)));
    }

    /// [`Fixture::install_trailer`] with a manifest signed by every key of `keys`.
    fn install_signed(&self, slot: Slot, version: &str, keys: &[signing::SecretKey]) {
        let fs = self.dir.path().join(format!("fs-{version}"));
        std::fs::write(&fs, vec![version.len() as u8; 1 << 20]).unwrap();
        let out = self.dir.path().join(format!("build-{version}-{slot}"));
        let opts = payload::BuildOptions {
            version: version.parse().unwrap(),
            arch: "x86_64".into(),
            kernel_cmdline: "console=ttyS0 quiet".into(),
            chunk_size: 256 << 10,
            level: 1,
            threads: 1,
            salt: None,
            chunk_starts: Vec::new(),
            chunk_hash: manifest::ChunkHash::Blake3,
        };
        payload::build(&fs, &out, &opts, &|_| {}).unwrap();
        repo::local::sign_document(&out.join("manifest.json"), keys).unwrap();
        let m = std::fs::read(out.join("manifest.json")).unwrap();
        let sig = std::fs::read(out.join("manifest.json.sig")).unwrap();
        let (base, len) = Disk::open(&self.disk, false).unwrap().slot_extent(slot).unwrap();
        let (at, bytes) = trailer::encode(&m, &sig, len);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.disk)
            .unwrap()
            .write_all_at(&bytes, base + at)
            .unwrap();
    }

    fn activate(&self, target: Slot, tries: u8) {
        let mut d = Disk::open(&self.disk, true).unwrap();
        d.update(|s| choice::activate(s, target.other(), Tries::new(tries).unwrap())).unwrap();
    }

    fn select(&self) -> Result<boot::Selection, boot::BootError> {
        boot::select(&self.disk, &self.policy)
    }

    fn slots(&self) -> slot::Slots {
        Disk::open(&self.disk, false).unwrap().slots()
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_confirmed_slot_boots_with_its_verity_parameters() {
    let Some(f) = fixture() else { return };
    f.install_trailer(Slot::A, "1.0.0", None);
    let s = f.select().unwrap();
    assert_eq!((s.slot, s.partition, s.version.as_str(), s.tries_left), (Slot::A, 3, "1.0.0", None));
    let env = s.to_env("/dev/vda");
    for line in [
        "ACL_SLOT='A'",
        "ACL_PART='/dev/vda3'",
        "ACL_CMDLINE='console=ttyS0 quiet'",
        "ACL_HASH_OFFSET='1048576'",
        "ACL_DATA_BLOCKS='256'",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} not in\n{env}");
    }
    assert!(env.contains(&format!("ACL_ROOTHASH='{}'", s.verity.root_hash)));
    testkit::assert_sgdisk_clean(&testkit::tool("sgdisk", "gdisk").unwrap(), Path::new(path(&f.disk)));
}

#[test]
fn a_new_slot_spends_its_tries_then_the_old_one_boots() {
    let Some(f) = fixture() else { return };
    f.install_trailer(Slot::A, "1.0.0", None);
    f.install_trailer(Slot::B, "2.0.0", None);
    f.activate(Slot::B, 2);
    // Each attempt is written before the slot is tried.
    let s = f.select().unwrap();
    assert_eq!((s.slot, s.tries_left), (Slot::B, Some(1)));
    assert_eq!(f.slots().b.tries(), 1);
    let s = f.select().unwrap();
    assert_eq!((s.slot, s.tries_left), (Slot::B, Some(0)));
    // B never confirmed itself: out of tries, A boots.
    let s = f.select().unwrap();
    assert_eq!((s.slot, s.version.as_str(), s.tries_left), (Slot::A, "1.0.0", None));
}

#[test]
fn a_slot_without_a_valid_signed_trailer_is_given_up() {
    let Some(f) = fixture() else { return };
    f.install_trailer(Slot::A, "1.0.0", None);
    // B is set to boot next but was signed by an untrusted key.
    let stranger = signing::SecretKey::from_seed([7; 32]);
    f.install_trailer(Slot::B, "2.0.0", Some(&stranger));
    f.activate(Slot::B, 3);
    let s = f.select().unwrap();
    assert_eq!(s.slot, Slot::A);
    assert_eq!(s.skipped.len(), 1);
    assert!(s.skipped[0].1.contains("key"), "{:?}", s.skipped);
    assert_eq!(f.slots().b.priority(), 0, "given up for good");

    // Nothing valid at all: a clear error listing why.
    let (base, len) = Disk::open(&f.disk, false).unwrap().slot_extent(Slot::A).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&f.disk).unwrap();
    file.write_all_at(&[0u8; 4096], base + len - 4096).unwrap();
    let e = f.select().unwrap_err().to_string();
    assert!(e.contains("no bootable slot") && e.contains("slot A: no slot trailer"), "{e}");
}

/// Issue 12: a table whose USR-B entry covers USR-A (CRCs valid) is refused before any try is
/// spent or any slot given up: acl-boot writes nothing and says why.
#[test]
fn issue_12_an_overlapping_table_is_refused_without_a_write() {
    let Some(f) = fixture() else { return };
    f.install_trailer(Slot::A, "1.0.0", None);
    f.install_trailer(Slot::B, "2.0.0", None);
    f.activate(Slot::B, 3);
    let (a_first, _) = testkit::gpt_edit::extent(&f.disk, 512, 3);
    let (_, b_last) = testkit::gpt_edit::extent(&f.disk, 512, 4);
    testkit::gpt_edit::set_extent(&f.disk, 512, 4, a_first + 8, b_last);
    let before = std::fs::read(&f.disk).unwrap();
    let e = f.select().unwrap_err();
    assert!(matches!(e, boot::BootError::Disk(slot::DiskError::Layout { .. })), "{e}");
    let e = e.to_string();
    assert!(e.contains("overlaps partition 4 USR-B") && e.contains("the disk was not changed"), "{e}");
    assert!(std::fs::read(&f.disk).unwrap() == before, "acl-boot wrote to an unsafe table");
}

/// Stage 2 (`verify_chosen`): the slot stage 1 chose verifies, with the parameters of its own
/// signed manifest; a slot the rule did not choose is refused whatever the command line says;
/// a slot whose trailer no longer verifies is refused; the disk is never written.
#[test]
fn stage_two_opens_only_the_chosen_slot_with_its_signed_parameters() {
    let Some(f) = fixture() else { return };
    f.install_trailer(Slot::A, "1.0.0", None);
    f.install_trailer(Slot::B, "2.0.0", None);
    // Both confirmed, A on top (B was confirmed earlier and rolled back from, say).
    {
        let mut d = Disk::open(&f.disk, true).unwrap();
        d.update(|_| {
            Ok(slot::Slots {
                a: slot::GptPrio::from_parts(2, 0, true).unwrap(),
                b: slot::GptPrio::from_parts(1, 0, true).unwrap(),
            })
        })
        .unwrap();
    }
    let before = std::fs::read(&f.disk).unwrap();
    let s = boot::verify_chosen(&f.disk, Slot::A, &f.policy).unwrap();
    assert_eq!((s.slot, s.version.as_str()), (Slot::A, "1.0.0"));
    let chosen = f.select().unwrap();
    assert_eq!(s.to_env("/dev/vda"), chosen.to_env("/dev/vda"), "stage 2 opens what stage 1 chose");
    // An edited command line naming the older confirmed slot B is refused.
    let e = boot::verify_chosen(&f.disk, Slot::B, &f.policy).unwrap_err();
    assert!(matches!(e, boot::BootError::NotChosen { slot: Slot::B, .. }), "{e}");
    assert!(e.to_string().contains("not the slot the boot rule chose"), "{e}");
    assert_eq!(std::fs::read(&f.disk).unwrap(), before, "stage 2 wrote to the disk");

    // B on trial: after stage 1 spent a try on it, stage 2 accepts B, and no longer A.
    f.activate(Slot::B, 2);
    let s = f.select().unwrap();
    assert_eq!(s.slot, Slot::B);
    assert_eq!(boot::verify_chosen(&f.disk, Slot::B, &f.policy).unwrap().version, "2.0.0");
    assert!(matches!(
        boot::verify_chosen(&f.disk, Slot::A, &f.policy),
        Err(boot::BootError::NotChosen { .. })
    ));

    // B's trailer replaced by one signed with a key this initramfs does not trust: refused.
    let stranger = signing::SecretKey::from_seed([7; 32]);
    f.install_trailer(Slot::B, "2.0.1", Some(&stranger));
    let e = boot::verify_chosen(&f.disk, Slot::B, &f.policy).unwrap_err();
    assert!(matches!(e, boot::BootError::Unverified { slot: Slot::B, .. }), "{e}");
    assert!(e.to_string().contains("key"), "{e}");
}

/// `acl-boot verify` takes its keys and threshold from the agent's configuration files: a
/// manifest with one signature fails a configured threshold of 2, and passes with 2 signers.
#[test]
fn the_boot_path_threshold_comes_from_the_agent_configuration() {
    let Some(f) = fixture() else { return };
    let second = signing::SecretKey::from_seed([5; 32]);
    let root = f.dir.path().join("root");
    let keys = root.join("etc/acl-update/keys");
    std::fs::create_dir_all(&keys).unwrap();
    f.key.public().write_new(&keys.join("one.pub")).unwrap();
    second.public().write_new(&keys.join("two.pub")).unwrap();
    std::fs::write(
        root.join("etc/acl-update/config.toml"),
        "[trust]\nkeys = [\"/etc/acl-update/keys\"]\nthreshold = 2\n",
    )
    .unwrap();
    f.install_trailer(Slot::A, "1.0.0", None);
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_acl-boot"))
            .args(["verify", "--disk", path(&f.disk), "--slot", "A", "--config-root", path(&root)])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run();
    assert!(!ok && err.contains("1 valid signature(s) from trusted keys, 2 required"), "{err}");

    // Signed by both keys: accepted, and the assignments come from the manifest.
    f.install_signed(Slot::A, "1.0.1", &[f.key.clone(), second.clone()]);
    let (ok, env, err) = run();
    assert!(ok, "{err}");
    assert!(env.contains("ACL_VERSION='1.0.1'") && env.contains("ACL_SLOT='A'"), "{env}");

    // The build-time list for the initramfs: the configuration file and both keys.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_acl-boot"))
        .args(["trust-files", "--root", path(&root)])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/etc/acl-update/config.toml\n/etc/acl-update/keys/one.pub\n/etc/acl-update/keys/two.pub\n"
    );
    // A threshold above the number of keys cannot verify anything: refused at build time.
    std::fs::remove_file(keys.join("two.pub")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_acl-boot"))
        .args(["trust-files", "--root", path(&root)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("trusts 1 key(s) but trust.threshold is 2"));
}

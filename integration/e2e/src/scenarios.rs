//! One function per scenario. Each takes the machine as the previous scenario left it (still
//! running, so the next release can be published and checked in the same boot) and returns it
//! running for the next one.
//!
//! | scenario | what happens | asserted |
//! |---|---|---|
//! | a | a fresh disk, 1.0.0 provisioned into slot A, boots | systemd, containerd's workload and the agent come up; health passes, A is confirmed; the units in the image are the repository's |
//! | i | measured inside that boot | the agent's `systemd-analyze security` exposure, its effective capabilities, where it can write |
//! | b | 2.0.0 (another kernel build) published | the agent finds it by itself, installs it into B, reboots with `systemctl reboot`; B boots the new kernel and is confirmed |
//! | c | 3.0.0 whose required check fails | it boots, fails, is marked bad, 2.0.0 boots again; the reason is on the console and in `aclctl history` |
//! | d | 4.0.0 whose init dies (kernel panic) | the boot path spends both tries, 2.0.0 boots without the agent, 4.0.0 is skipped |
//! | e | the power is cut mid-install of 5.0.0 (past half its download, 3 s in; the lab serves that payload slowly) | A is not bootable, 2.0.0 boots, the install resumes and completes, 5.0.0 is confirmed |
//! | f | `aclctl rollback --now` on 5.0.0 | 2.0.0 boots |
//! | g | 6.0.0 in which a systemd unit fails at boot | the systemd check names the unit, the slot is rolled back, the unit is in `aclctl history` |
//! | h | the agent is frozen (SIGSTOP) mid-install of 7.0.0 | the watchdog kills it, systemd restarts it, the install resumes and completes |
//! | j | 8.0.0 whose agent cannot start | `acl-boot-deadline.service` gives the slot up at its deadline, without the agent; 7.0.0 boots |
//! | k | a boot entry edited to jump to stage 2 with the given-up slot and a made-up root hash | stage 2 refuses the slot, nothing is mounted or written |
//! | s1 | Secure Boot machine (OVMF, Microsoft's keys, shim, Debian's signed GRUB): a fresh disk with 1.0.0; then 2.0.0, whose kernel is Debian's unsigned build | the firmware's chain boots; both stages' kernels are locked down (printed from the initramfs and from the booted system); 1.0.0 is confirmed; 2.0.0 installs but its kernel is refused by the locked-down first stage in both tries, and 1.0.0 boots again |
//! | s2 | Secure Boot: 3.0.0 whose required check fails | installed, booted, failed, rolled back |
//! | s3 | Secure Boot: 4.0.0 whose init dies; meanwhile the first stage replaced by one shim refuses (an unsigned kernel, `aclctl first-stage install` on the powered-off disk) | two panicking boots, then 1.0.0 by itself; 4.0.0 skipped; GRUB skips the refused first-stage set and starts the other |
//! | s4 | Secure Boot: 5.0.0; then the first stage replaced from the booted slot on the node | installed, booted (locked down), confirmed; `aclctl first-stage install` writes the set GRUB does not start (the refused one) and switches to it; the next boot starts through it |

use crate::vm::Booted;
use crate::{Lab, Run, ensure};
use anyhow::{Context as _, Result, bail};
use std::time::{Duration, Instant};

/// The phases of one boot up to the agent.
struct Up {
    userspace: Duration,
    multi_user: Duration,
    ready: Duration,
}

/// Waits for a boot of `slot` running `version` to come up: the slot's userspace, systemd's
/// multi-user.target, the agent's READY=1 (systemd says "Started" for a Type=notify unit only
/// then).
fn up(b: &mut Booted, slot: &str, version: &str) -> Result<Up> {
    let userspace = b.wait_for(&format!("acl: up: slot={slot} version={version} "))?;
    let multi_user = b.wait_for("Reached target multi-user.target")?;
    let ready = b.wait_for("Started acl-agentd.service")?;
    Ok(Up { userspace, multi_user, ready })
}

fn up_phases(u: &Up) -> Vec<(&'static str, Duration)> {
    vec![
        ("boot to userspace", u.userspace),
        ("boot to multi-user.target", u.multi_user),
        ("agent ready (READY=1)", u.ready),
    ]
}

/// (a) A fresh disk with 1.0.0 on slot A boots under systemd, its workload answers, the agent
/// confirms it; the agent's units in the image are the repository's, byte for byte.
pub fn a_fresh_disk<L: Lab>(run: &mut Run<'_, L>) -> Result<Booted> {
    say!("\n== (a) fresh disk: 1.0.0 on slot A boots under systemd and is confirmed");
    let mut b = run.vm.boot("a1")?;
    b.wait_for("kernel=6.1.0-56-amd64")?;
    let u = up(&mut b, "A", "1.0.0")?;
    let healthy = b.wait_for("1.0.0 is healthy")?;
    b.wait_for("mark good: done")?;
    for (guest, host) in &run.unit_files {
        let want = manifest::Sha256Digest::of(&std::fs::read(host)?).to_string();
        let out = b.run(&format!("sha256sum {guest}"))?;
        let got = out.lines().find_map(|l| l.strip_suffix(&format!("  {guest}"))).map(str::trim);
        ensure(
            got == Some(want.as_str()),
            format!(
                "{guest} in the image to be {} byte for byte (sha256 {want}, got {got:?})",
                host.display()
            ),
        )?;
        say!("  {guest} is the repository's {} (sha256 {want})", host.display());
    }
    let s = run.bits()?;
    ensure(s.a.successful() && s.a.priority() == 2, format!("A confirmed: {s:?}"))?;
    let mut phases = up_phases(&u);
    phases.push(("to healthy", healthy - u.ready));
    run.time("a", phases);
    Ok(b)
}

/// (i) Inside the booted guest: the agent's exposure by `systemd-analyze security`, its
/// effective capabilities, and which directories it can write (probed from its own mount
/// namespace, where the unit's read-only mounts apply even to root).
pub fn i_sandbox<L: Lab>(run: &mut Run<'_, L>, mut b: Booted) -> Result<Booted> {
    say!("\n== (i) the agent's sandbox, measured inside the guest");
    let t = Instant::now();
    let out = b.run("systemd-analyze security --no-pager acl-agentd.service | tail -n 1")?;
    let exposure: f64 = out
        .split("acl-agentd.service:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no exposure figure in {out:?}"))?;
    say!("  systemd-analyze security: exposure {exposure:.1} (goal at most 2.0)");
    run.check(exposure <= 2.0, format!("an exposure of at most 2.0, not {exposure}"));
    let out = b.run("grep CapEff /proc/$(pidof acl-agentd)/status")?;
    run.check(out.contains("CapEff:\t0000000000000000"), format!("no effective capabilities: {out:?}"));
    say!("  effective capabilities: 0");
    let out = b.run(
        "for d in / /etc /usr /var /var/lib /var/log /root /home /run /var/lib/acl-update /run/acl-update; do \
         if nsenter -t $(pidof acl-agentd) -m -- touch $d/.acl-probe 2>/dev/null; then echo \"probe: writable $d\"; \
         nsenter -t $(pidof acl-agentd) -m -- rm -f $d/.acl-probe; else echo \"probe: read-only $d\"; fi; done",
    )?;
    let writable: Vec<&str> =
        out.lines().filter_map(|l| l.trim().strip_prefix("probe: writable ")).map(str::trim).collect();
    let read_only = out.lines().filter(|l| l.trim().starts_with("probe: read-only ")).count();
    say!("  writable in the agent's view: {writable:?}; read-only: {read_only} others");
    run.check(
        writable == ["/var/lib/acl-update", "/run/acl-update"],
        format!("only the state and runtime directories writable, not {writable:?}"),
    );
    run.time("i", vec![("measurements", t.elapsed())]);
    Ok(b)
}

/// (b) The agent finds 2.0.0 by itself (its periodic check), installs it into B and reboots
/// through systemd; B boots the other kernel build and is confirmed; A stays the way back.
pub fn b_update<L: Lab>(run: &mut Run<'_, L>, mut b: Booted) -> Result<Booted> {
    say!("\n== (b) the agent finds 2.0.0 (kernel 6.1.0-50), installs it into B, reboots into it");
    run.lab.publish(&run.images.v2)?;
    let published = b.elapsed();
    let inst = b.wait_for("installing 2.0.0 into slot B")?;
    let done = b.wait_for("installed version=2.0.0")?;
    b.wait_for("rebooting into 2.0.0")?;
    let rebooted = b.wait_exit()?;
    let write = ms(&b.field_after("installed version=2.0.0", "write_ms=")?)?;
    let verify = ms(&b.field_after("installed version=2.0.0", "verify_ms=")?)?;
    let mut b = run.vm.boot("b2")?;
    b.wait_for("kernel=6.1.0-50-amd64")?;
    let u = up(&mut b, "B", "2.0.0")?;
    let healthy = b.wait_for("2.0.0 is healthy")?;
    b.wait_for("mark good: done")?;
    let s = run.bits()?;
    ensure(
        s.b.successful() && s.b.priority() == 2 && s.a.successful(),
        format!("B confirmed, A the way back: {s:?}"),
    )?;
    let mut phases = vec![
        ("published to install start (periodic check)", inst.saturating_sub(published)),
        ("download+write (streamed together)", write),
        ("read-back verify", verify),
        ("install in all (manifest, plan, activation)", done - inst),
        ("to reboot (systemctl reboot, shutdown)", rebooted - done),
    ];
    phases.extend(up_phases(&u));
    phases.push(("to healthy", healthy - u.ready));
    run.time("b", phases);
    Ok(b)
}

/// Publishes `image`, asks the running agent to check now, and waits for the install and the
/// reboot into it.
fn install_now<L: Lab>(run: &mut Run<'_, L>, b: &mut Booted, image: &crate::Image) -> Result<Duration> {
    run.lab.publish(image)?;
    install_published(b, image)
}

/// Asks the running agent to check now, and waits for the install of `image` (published
/// already) and the reboot into it.
fn install_published(b: &mut Booted, image: &crate::Image) -> Result<Duration> {
    b.type_line("aclctl check")?;
    let inst = b.wait_for(&format!("installing {}", image.version))?;
    let done = b.wait_for(&format!("installed version={}", image.version))?;
    b.wait_exit()?;
    Ok(done - inst)
}

/// (c) 3.0.0's required health check fails: it is marked bad, 2.0.0 boots again, and the
/// reason is on the console and in the history.
pub fn c_health_rollback<L: Lab>(run: &mut Run<'_, L>, b: Booted) -> Result<Booted> {
    say!("\n== (c) 3.0.0 fails its required health check: automatic rollback to 2.0.0");
    let v3 = run.images.get("3.0.0")?;
    health_rollback(run, b, "c", &v3, "app: not answering on :8080")
}

/// Installs `image` into A from the running B (2.0.0), boots it, sees its health checks fail
/// with `reason` in the agent's verdict on the console, and sees 2.0.0 boot again with the
/// reason in `aclctl history` and A given up (scenarios c and g).
fn health_rollback<L: Lab>(
    run: &mut Run<'_, L>,
    mut b: Booted,
    scenario: &'static str,
    image: &crate::Image,
    reason: &str,
) -> Result<Booted> {
    let install = install_now(run, &mut b, image)?;
    let verdict = format!("{} failed its health checks", image.version);
    let mut b = run.vm.boot(&format!("{scenario}2"))?;
    let u = up(&mut b, "A", &image.version)?;
    let failed = b.wait_for(&verdict)?;
    b.wait_for(reason)?;
    ensure(
        b.text().lines().any(|l| l.contains(&verdict) && l.contains(reason)),
        format!("{reason:?} in the agent's verdict on the console"),
    )?;
    b.wait_exit()?;
    let mut b = run.vm.boot(&format!("{scenario}3"))?;
    let back = up(&mut b, "B", "2.0.0")?;
    let out = b.run("aclctl history -n 4")?;
    ensure(
        out.contains(&verdict) && out.contains(reason),
        format!("the failure and {reason:?} in aclctl history: {out:?}"),
    )?;
    let s = run.bits()?;
    ensure(s.a.priority() == 0 && s.b.successful(), format!("A given up, B runs: {s:?}"))?;
    let mut phases = vec![("install (download, write, verify)", install)];
    phases.extend(up_phases(&u));
    phases.push(("to health verdict", failed - u.ready));
    phases.push(("rollback boot: agent ready", back.ready));
    run.time(scenario, phases);
    Ok(b)
}

/// (d) 4.0.0's init dies, so its kernel panics: the boot path spends its tries and 2.0.0
/// boots without the agent's help; the agent then reports 4.0.0 as not booted and skips it.
pub fn d_kernel_panic<L: Lab>(run: &mut Run<'_, L>, mut b: Booted) -> Result<Booted> {
    say!("\n== (d) 4.0.0 panics at boot: its tries run out, 2.0.0 comes back by itself");
    let v4 = run.images.get("4.0.0")?;
    install_now(run, &mut b, &v4)?;
    let panics = panic_boots(&run.vm, "d", "A", "4.0.0")?;
    let mut b = run.vm.boot("d4")?;
    b.wait_for("stage 1: slot B (2.0.0)")?;
    let u = up(&mut b, "B", "2.0.0")?;
    b.wait_for("4.0.0 did not boot; running 2.0.0; 4.0.0 is skipped")?;
    let out = b.run("aclctl check")?;
    ensure(out.contains("4.0.0 failed"), format!("4.0.0 listed as failed by the agent: {out:?}"))?;
    let s = run.bits()?;
    ensure(!s.a.bootable() && s.b.successful(), format!("A out of tries, B runs: {s:?}"))?;
    run.time(
        "d",
        vec![
            ("panic boot 1", panics[0]),
            ("panic boot 2", panics[1]),
            ("fallback boot to userspace", u.userspace),
            ("fallback boot: agent ready", u.ready),
        ],
    );
    Ok(b)
}

/// The two boots of `slot`, running `version` whose init dies: stage 1 spends a try on each
/// (1, then 0 left) and the kernel panics. Power-on to reboot of each; the boots are named
/// `{prefix}2` and `{prefix}3`.
fn panic_boots(vm: &crate::vm::Vm, prefix: &str, slot: &str, version: &str) -> Result<Vec<Duration>> {
    let mut panics = Vec::new();
    for (i, left) in ["1", "0"].iter().enumerate() {
        let mut b = vm.boot(&format!("{prefix}{}", i + 2))?;
        b.wait_for(&format!("stage 1: slot {slot} ({version}), tries left: {left}"))?;
        b.wait_for("Kernel panic")?;
        panics.push(b.wait_exit()?);
    }
    Ok(panics)
}

/// (e) The power is cut mid-install of 5.0.0 (past half its download): the half-written slot is not
/// bootable, 2.0.0 boots, the agent resumes the install and completes it, 5.0.0 is confirmed.
pub fn e_power_cut<L: Lab>(run: &mut Run<'_, L>, mut b: Booted) -> Result<Booted> {
    say!("\n== (e) power cut in the middle of the 5.0.0 install; it resumes after the reboot");
    let v5 = run.images.get("5.0.0")?;
    // What the node must fetch: the frames of chunks slot B (2.0.0) does not hold.
    let to_fetch = fetch_estimate(&run.images.v2.build, &v5.build)?;
    run.lab.publish(&v5)?;
    let before = run.lab.bytes_sent();
    b.type_line("aclctl check")?;
    b.wait_for("installing 5.0.0 into slot A")?;
    let t = Instant::now();
    // Half-way through the download, and not before the installer had a few seconds to make
    // its progress durable (it syncs and journals at least every second). The lab serves this
    // payload at a limited rate, so both come before the download ends; `after` below shows it.
    while run.lab.bytes_sent() - before < to_fetch / 2 || t.elapsed() < Duration::from_secs(3) {
        if t.elapsed() > crate::vm::STEP {
            bail!(
                "the 5.0.0 download did not get half-way ({} of {to_fetch} bytes) in {} s",
                run.lab.bytes_sent() - before,
                crate::vm::STEP.as_secs()
            );
        }
        if b.text().contains("installed version=5.0.0") {
            bail!("the install finished before the power cut");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let cut_at = run.lab.bytes_sent() - before;
    b.power_off();
    let s = run.bits()?;
    ensure(!s.a.bootable() && s.b.successful(), format!("half-written A is not bootable: {s:?}"))?;
    let mut b = run.vm.boot("e2")?;
    let u = up(&mut b, "B", "2.0.0")?;
    let resumed_at = b.wait_for("installed version=5.0.0")?;
    let resumed: u64 = b.field_after("installed version=5.0.0", "resumed=")?.parse().unwrap_or(0);
    b.wait_exit()?;
    let after = run.lab.bytes_sent() - before - cut_at;
    let mut b = run.vm.boot("e3")?;
    let u3 = up(&mut b, "A", "5.0.0")?;
    let healthy = b.wait_for("5.0.0 is healthy")?;
    b.wait_for("mark good: done")?;
    let s = run.bits()?;
    ensure(s.a.successful() && s.a.priority() == 2, format!("A confirmed with 5.0.0: {s:?}"))?;
    ensure(resumed > 0, format!("the install resumed with some bytes in place (resumed={resumed})"))?;
    ensure(
        after > 0,
        format!(
            "the power was cut before the download ended ({} of {to_fetch} bytes fetched after it)",
            after
        ),
    )?;
    say!(
        "  power cut after {:.1} MiB of the {:.1} MiB to fetch; after the reboot {:.1} MiB of the image were in place, {:.1} MiB fetched",
        mib(cut_at),
        mib(to_fetch),
        mib(resumed),
        mib(after)
    );
    run.time(
        "e",
        vec![
            ("after the cut: agent ready", u.ready),
            ("resumed install done", resumed_at - u.ready),
            ("new slot: agent ready", u3.ready),
            ("to healthy", healthy - u3.ready),
        ],
    );
    Ok(b)
}

/// (f) `aclctl rollback --now`: the previous slot boots.
pub fn f_operator_rollback<L: Lab>(run: &mut Run<'_, L>, mut b: Booted) -> Result<Booted> {
    say!("\n== (f) aclctl rollback --now: the previous slot boots");
    b.type_line("aclctl rollback --now --disk /dev/vda")?;
    b.wait_for("rolled back by the operator; rebooting")?;
    let down = b.wait_exit()?;
    let mut b = run.vm.boot("f2")?;
    let u = up(&mut b, "B", "2.0.0")?;
    let s = run.bits()?;
    ensure(s.b.priority() == 2 && s.a.successful(), format!("B boots next, A still good: {s:?}"))?;
    run.time("f", vec![("to reboot", down), ("rollback boot: agent ready", u.ready)]);
    Ok(b)
}

/// (g) 6.0.0 has a systemd unit that fails at boot: the agent's systemd check reports the
/// unit, the slot is rolled back, and the unit's name is in the history and on the console.
pub fn g_failed_unit<L: Lab>(run: &mut Run<'_, L>, b: Booted) -> Result<Booted> {
    say!("\n== (g) 6.0.0 has a unit that fails at boot: the systemd check rolls it back");
    let v6 = run.images.get("6.0.0")?;
    health_rollback(run, b, "g", &v6, "acl-broken.service")
}

/// (h) The agent is frozen (SIGSTOP) in the middle of installing 7.0.0: systemd's watchdog
/// (20 s in the test image's drop-in) kills it, systemd restarts it, the install resumes and
/// completes.
pub fn h_frozen_agent<L: Lab>(run: &mut Run<'_, L>, mut b: Booted) -> Result<Booted> {
    say!("\n== (h) the agent is frozen mid-install: the watchdog restarts it, the install resumes");
    let v7 = run.images.get("7.0.0")?;
    run.lab.publish(&v7)?;
    b.type_line("aclctl check")?;
    b.wait_for("installing 7.0.0 into slot A")?;
    // Let the install get some way in, so that there is progress to resume.
    std::thread::sleep(Duration::from_secs(6));
    if b.text().contains("installed version=7.0.0") {
        bail!("the 7.0.0 install finished before the agent could be frozen");
    }
    b.type_line("kill -STOP $(pidof acl-agentd)")?;
    let frozen = Instant::now();
    b.wait_for("acl-agentd.service: Watchdog timeout")?;
    let killed = frozen.elapsed();
    b.wait_for("Started acl-agentd.service")?;
    let restarted = frozen.elapsed();
    b.wait_for("installed version=7.0.0")?;
    let done = frozen.elapsed();
    let resumed: u64 = b.field_after("installed version=7.0.0", "resumed=")?.parse().unwrap_or(0);
    b.wait_exit()?;
    ensure(resumed > 0, format!("the restarted agent resumed the install (resumed={resumed})"))?;
    say!("  the restarted agent found {:.1} MiB of 7.0.0 already in place", mib(resumed));
    let mut b = run.vm.boot("h2")?;
    let u = up(&mut b, "A", "7.0.0")?;
    b.wait_for("7.0.0 is healthy")?;
    b.wait_for("mark good: done")?;
    run.time(
        "h",
        vec![
            ("frozen to watchdog kill", killed),
            ("frozen to agent ready again", restarted),
            ("frozen to install done", done),
            ("new slot: agent ready", u.ready),
        ],
    );
    Ok(b)
}

/// (j) 8.0.0's agent cannot start: nothing confirms or rejects the slot, and
/// `acl-boot-deadline.service` (no agent involved) gives it up at its deadline; 7.0.0 boots.
pub fn j_agent_cannot_run<L: Lab>(run: &mut Run<'_, L>, mut b: Booted) -> Result<()> {
    say!("\n== (j) 8.0.0's agent cannot start: the boot deadline brings 7.0.0 back");
    let v8 = run.images.get("8.0.0")?;
    install_now(run, &mut b, &v8)?;
    let mut b = run.vm.boot("j2")?;
    let userspace = b.wait_for("acl: up: slot=B version=8.0.0 ")?;
    b.wait_for("acl-agentd.service: Main process exited")?;
    let gave_up = b.wait_for("boot-deadline: slot B was not confirmed")?;
    let down = b.wait_exit()?;
    let mut b = run.vm.boot("j3")?;
    let u = up(&mut b, "A", "7.0.0")?;
    let out = b.run("aclctl history -n 6")?;
    ensure(
        out.contains("slot B was not confirmed"),
        format!("the boot deadline in aclctl history: {out:?}"),
    )?;
    b.power_off();
    let s = run.bits()?;
    ensure(!s.b.bootable() && s.a.successful() && s.a.priority() > 0, format!("B given up, A runs: {s:?}"))?;
    run.time(
        "j",
        vec![
            ("boot to userspace", userspace),
            ("to the deadline's verdict", gave_up),
            ("to reboot", down),
            ("fallback boot: agent ready", u.ready),
        ],
    );
    Ok(())
}

/// (k) An edited boot entry: the first stage's kernel is told it is stage 2, for the slot the
/// rule gave up, with a root hash of the editor's choosing. Stage 2 takes only the slot's name
/// from the command line, finds that the rule did not choose it, and stops; the disk is not
/// written.
pub fn k_edited_boot_entry<L: Lab>(run: &mut Run<'_, L>) -> Result<()> {
    say!("\n== (k) an edited boot entry names the given-up slot and its own root hash: refused");
    let before = run.bits()?;
    let slot = slot::choice::Slot::BOTH
        .into_iter()
        .find(|&x| slot::choice::choose(&before) != Some(x))
        .context("a slot the rule does not choose")?;
    let fake = "ab".repeat(32);
    let edit =
        format!("acl.stage=2 acl.slot={slot} acl.roothash={fake} root=/dev/mapper/acl-root rootfstype=erofs");
    let mut b = run.vm.boot_with("k1", &edit)?;
    let refused = b.wait_for(&format!("acl: stage 2: slot {slot} is not verified for this boot"))?;
    let text = b.text();
    b.power_off();
    run.check(!text.contains("acl: up:"), "no userspace of ours after a refused stage 2");
    run.check(
        text.contains("is not the slot the boot rule chose"),
        "acl-boot's reason (not the slot the boot rule chose) on the console",
    );
    let after = run.bits()?;
    ensure(after == before, format!("the table unchanged: {before:?} then {after:?}"))?;
    run.time("k", vec![("to the refusal", refused)]);
    Ok(())
}

fn ms(v: &str) -> Result<Duration> {
    Ok(Duration::from_millis(v.parse().with_context(|| format!("{v:?} is not milliseconds"))?))
}

fn mib(b: u64) -> f64 {
    b as f64 / 1_048_576.0
}

/// Compressed bytes of `new`'s frames for chunks that `old` does not hold.
fn fetch_estimate(old: &std::path::Path, new: &std::path::Path) -> Result<u64> {
    Ok(crate::fetched_bytes(&crate::manifest_of(old)?, &crate::manifest_of(new)?))
}

/// The kernel's lockdown state as the booted system reads it (the one in use in brackets).
fn booted_lockdown(b: &mut Booted) -> Result<String> {
    let out = b.run("echo \"lockdown: $(cat /sys/kernel/security/lockdown)\"")?;
    Ok(out
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("lockdown: "))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default())
}

/// The lockdown state the first stage printed (`acl: stage 1: lockdown: ...`).
fn stage1_lockdown(b: &mut Booted) -> Result<String> {
    b.wait_for("acl: stage 1: lockdown: ")?;
    let text = b.text();
    Ok(text
        .lines()
        .rev()
        .find_map(|l| l.split("acl: stage 1: lockdown: ").nth(1))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default())
}

/// Runs the host's `aclctl` with `args`, then `files` (each after the preceding flag: `--kernel
/// K --initrd I`), then `more`; its output.
fn host_aclctl<L: Lab>(
    run: &Run<'_, L>,
    args: &[&str],
    files: &[&std::path::Path],
    more: &[&str],
) -> Result<String> {
    let mut c = std::process::Command::new(&run.aclctl);
    c.args(args);
    if let [kernel, initrd] = files {
        c.arg(kernel).arg("--initrd").arg(initrd);
    }
    let out = c.args(more).output().context("run aclctl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for l in text.lines() {
        say!("  aclctl: {l}");
    }
    if !out.status.success() {
        bail!("aclctl {} failed ({}): {text}", args.join(" "), out.status);
    }
    Ok(text)
}

fn locked(lockdown: &str) -> bool {
    lockdown.contains("[integrity]") || lockdown.contains("[confidentiality]")
}

/// (s1) The Secure Boot machine: a fresh disk with 1.0.0 boots through the firmware's chain,
/// locked down in both stages, and is confirmed. Its agent installs 2.0.0 by itself, whose
/// kernel is Debian's unsigned build: the locked-down first stage refuses to start it, spends
/// the slot's tries in two short boots, and 1.0.0 boots again. Left running, paused.
pub fn s1_secure_boot_fresh_disk_and_unsigned_kernel<L: Lab>(run: &mut Run<'_, L>) -> Result<Booted> {
    say!(
        "\n== (s1) Secure Boot: a fresh disk boots through shim and signed GRUB; 2.0.0's unsigned kernel is refused"
    );
    let vm = run.vm.clone();
    let mut b = vm.boot("s1-1")?;
    let grub = b.wait_for("acl: GRUB: loading the first stage")?;
    b.wait_for("Kernel is locked down from EFI Secure Boot")?;
    let lock1 = stage1_lockdown(&mut b)?;
    say!("  stage 1 (the initramfs GRUB loaded): lockdown {lock1}");
    ensure(locked(&lock1), format!("stage 1 locked down, not {lock1:?}"))?;
    let u = up(&mut b, "A", "1.0.0")?;
    let healthy = b.wait_for("1.0.0 is healthy")?;
    b.wait_for("mark good: done")?;
    let s = run.bits()?;
    ensure(s.a.successful() && s.a.priority() == 2, format!("A confirmed: {s:?}"))?;
    // The agent's first check finds 2.0.0 (published before this boot) and installs it by itself.
    let inst = b.wait_for("installing 2.0.0")?;
    let done = b.wait_for("installed version=2.0.0")?;
    b.wait_exit()?;
    let mut refused = Vec::new();
    for (i, left) in ["1", "0"].iter().enumerate() {
        let mut b = vm.boot(&format!("s1-{}", i + 2))?;
        b.wait_for(&format!("stage 1: slot B (2.0.0), tries left: {left}"))?;
        b.wait_for("stage 1: the kernel of slot B was not loaded")?;
        let why = b.text().lines().find(|l| l.contains("was not loaded")).unwrap_or_default().to_owned();
        say!("  {}", why.trim());
        refused.push(b.wait_exit()?);
    }
    let mut b = vm.boot("s1-4")?;
    b.wait_for("stage 1: slot A (1.0.0)")?;
    let back = up(&mut b, "A", "1.0.0")?;
    b.wait_for("2.0.0 did not boot; running 1.0.0; 2.0.0 is skipped")?;
    b.run("aclctl pause")?;
    let lock2 = booted_lockdown(&mut b)?;
    say!("  booted system (the slot's kernel, started with kexec_file_load): lockdown {lock2}");
    ensure(locked(&lock2), format!("the booted system locked down, not {lock2:?}"))?;
    let s = run.bits()?;
    ensure(!s.b.bootable() && s.a.successful(), format!("B out of tries, A runs: {s:?}"))?;
    run.time(
        "s1",
        vec![
            ("power on to GRUB (OVMF, shim)", grub),
            ("boot to userspace", u.userspace),
            ("agent ready (READY=1)", u.ready),
            ("to healthy", healthy - u.ready),
            ("install 2.0.0 (unsigned kernel)", done - inst),
            ("refused boot 1 (power on to reboot)", refused[0]),
            ("refused boot 2", refused[1]),
            ("fallback boot: agent ready", back.ready),
        ],
    );
    Ok(b)
}

/// (s2) Secure Boot: 3.0.0 (whose required check fails) installs, boots under Secure Boot,
/// fails and is rolled back. Left running, paused.
pub fn s2_secure_boot_health_rollback<L: Lab>(run: &mut Run<'_, L>, mut b: Booted) -> Result<Booted> {
    say!("\n== (s2) Secure Boot: 3.0.0 fails its health check and is rolled back");
    let vm = run.vm.clone();
    b.run("aclctl resume")?;
    let v3 = run.images.get("3.0.0")?;
    let install = install_published(&mut b, &v3)?;
    let mut b = vm.boot("s2-2")?;
    b.wait_for("stage 1: slot B (3.0.0)")?;
    let lock = stage1_lockdown(&mut b)?;
    ensure(locked(&lock), format!("stage 1 locked down, not {lock:?}"))?;
    let u = up(&mut b, "B", "3.0.0")?;
    let failed = b.wait_for("3.0.0 failed its health checks")?;
    b.wait_exit()?;
    let mut b = vm.boot("s2-3")?;
    let back = up(&mut b, "A", "1.0.0")?;
    b.run("aclctl pause")?;
    let s = run.bits()?;
    ensure(s.b.priority() == 0 && s.a.successful(), format!("B given up, A runs: {s:?}"))?;
    run.time(
        "s2",
        vec![
            ("install 3.0.0", install),
            ("3.0.0: agent ready", u.ready),
            ("to health verdict", failed - u.ready),
            ("rollback boot: agent ready", back.ready),
        ],
    );
    Ok(b)
}

/// (s3) Secure Boot: 4.0.0, whose init dies: its tries run out in two panicking boots, and
/// 1.0.0 boots by itself. Left running, paused.
pub fn s3_secure_boot_kernel_panic<L: Lab>(run: &mut Run<'_, L>, mut b: Booted) -> Result<Booted> {
    say!("\n== (s3) Secure Boot: 4.0.0 panics at boot; 1.0.0 comes back by itself");
    let vm = run.vm.clone();
    b.run("aclctl resume")?;
    let v4 = run.images.get("4.0.0")?;
    let install = install_published(&mut b, &v4)?;
    let panics = panic_boots(&vm, "s3-", "B", "4.0.0")?;
    // Meanwhile the first stage is replaced by one that shim refuses (2.0.0's unsigned kernel),
    // as a bad first-stage release would be: written as set b and switched to. GRUB skips it
    // and starts set a.
    let out = host_aclctl(
        run,
        &["first-stage", "install", "--disk", &vm.disk.to_string_lossy(), "--kernel"],
        &[&run.images.v2.vmlinuz, &run.images.v2.initrd],
        &["--secure-boot", "on", "--allow-unsigned"],
    )?;
    ensure(
        out.contains("GRUB starts set b from the next boot"),
        format!("first stage set b switched to: {out}"),
    )?;
    let mut b = vm.boot("s3-4")?;
    let skipped = b.wait_for("acl: GRUB: set b could not be loaded, trying the next")?;
    let refusal = b.text().lines().rev().find(|l| l.contains("error:")).unwrap_or_default().trim().to_owned();
    say!("  GRUB said: {refusal}");
    b.wait_for("acl: GRUB: loading the first stage, set a")?;
    b.wait_for("stage 1: slot A (1.0.0)")?;
    let u = up(&mut b, "A", "1.0.0")?;
    b.wait_for("4.0.0 did not boot; running 1.0.0; 4.0.0 is skipped")?;
    let s = run.bits()?;
    ensure(!s.b.bootable() && s.a.successful(), format!("B out of tries, A runs: {s:?}"))?;
    b.run("aclctl pause")?;
    run.time(
        "s3",
        vec![
            ("install 4.0.0", install),
            ("panic boot 1", panics[0]),
            ("panic boot 2", panics[1]),
            ("fallback boot: GRUB skipped the refused first-stage set b", skipped),
            ("fallback boot: agent ready", u.ready),
        ],
    );
    Ok(b)
}

/// (s4) Secure Boot: 5.0.0 installs, boots and is confirmed.
pub fn s4_secure_boot_update<L: Lab>(run: &mut Run<'_, L>, mut b: Booted) -> Result<()> {
    say!("\n== (s4) Secure Boot: 5.0.0 installs, boots and is confirmed");
    let vm = run.vm.clone();
    b.run("aclctl resume")?;
    let v5 = run.images.get("5.0.0")?;
    let install = install_published(&mut b, &v5)?;
    let mut b = vm.boot("s4-2")?;
    let u = up(&mut b, "B", "5.0.0")?;
    let healthy = b.wait_for("5.0.0 is healthy")?;
    b.wait_for("mark good: done")?;
    let lock = booted_lockdown(&mut b)?;
    ensure(
        lock.contains("[integrity]") || lock.contains("[confidentiality]"),
        format!("locked down, not {lock:?}"),
    )?;
    let s = run.bits()?;
    ensure(s.b.successful() && s.b.priority() == 2, format!("B confirmed: {s:?}"))?;
    // The first stage replaced from the booted slot, on the node: GRUB starts set a (b holds
    // the unsigned kernel of s3), so b is written, read back and switched to.
    let t = Instant::now();
    let out =
        b.run("aclctl first-stage install --disk /dev/vda --kernel /boot/vmlinuz --initrd /boot/initrd.img")?;
    let first_stage = t.elapsed();
    ensure(
        out.contains("writing set b") && out.contains("GRUB starts set b from the next boot"),
        format!("the first stage written as set b and switched to: {out}"),
    )?;
    let st = b.run("aclctl first-stage status --disk /dev/vda")?;
    ensure(st.contains("Secure Boot on"), format!("aclctl saw Secure Boot on: {st}"))?;
    // Which set this boot came through, as GRUB put it on the command line and stage 1 passed
    // it on: a (b, unsigned, was refused).
    ensure(st.contains("this boot came through set a"), format!("aclctl knew the set that booted: {st}"))?;
    b.type_line("systemctl reboot")?;
    b.wait_exit()?;
    let mut b = vm.boot("s4-3")?;
    let grub = b.wait_for("acl: GRUB: loading the first stage, set b")?;
    let u2 = up(&mut b, "B", "5.0.0")?;
    ensure(!b.text().contains("could not be loaded"), "GRUB loaded set b at once")?;
    b.power_off();
    let mut phases = vec![("install 5.0.0", install)];
    phases.extend(up_phases(&u));
    phases.push(("to healthy", healthy - u.ready));
    phases.push(("first stage replaced on the node (aclctl first-stage install)", first_stage));
    phases.push(("boot through the new first stage: GRUB loads set b", grub));
    phases.push(("boot through the new first stage: agent ready", u2.ready));
    run.time("s4", phases);
    Ok(())
}

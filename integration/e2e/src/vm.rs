//! The machine: qemu (software emulation) with the node's disk, started the way a bootloader
//! would start the first stage (its kernel and initramfs), and the one set of helpers every
//! scenario uses to watch and steer it: wait for a console line, type on the console's shell,
//! wait for the reboot, pull the plug.
//!
//! `-no-reboot` turns every reboot into qemu exiting, so each boot is its own [`Booted`] with
//! its own console log, and a scenario sees exactly when the node rebooted.
//!
//! Two kinds of machine: [`Firmware::Direct`] starts the first stage as a bootloader would
//! (qemu's `-kernel`), fast and without firmware; [`Firmware::SecureBoot`] is a UEFI machine
//! (OVMF with Microsoft's keys enrolled and Secure Boot on, as Trusted Launch VMs are) that
//! boots the disk's EFI system partition: shim, Debian's signed GRUB, the signed first-stage
//! kernel.

use anyhow::{Context as _, Result};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long one step may take under software emulation before the run fails.
pub const STEP: Duration = Duration::from_secs(300);

/// How the machine starts.
#[derive(Debug, Clone)]
pub enum Firmware {
    /// qemu loads the first stage itself (no firmware, no Secure Boot).
    Direct,
    /// UEFI with Secure Boot enforced, booting the disk's EFI system partition.
    SecureBoot {
        /// OVMF's code (the Secure Boot build, which needs SMM).
        code: PathBuf,
        /// This machine's variable store (a copy of OVMF's, with Microsoft's keys): its
        /// NVRAM, kept across boots.
        vars: PathBuf,
    },
}

/// The machine: the disk and the first stage a bootloader would load.
#[derive(Debug, Clone)]
pub struct Vm {
    /// The node's disk (a GPT disk-image file).
    pub disk: PathBuf,
    /// The first stage's kernel.
    pub vmlinuz: PathBuf,
    /// The first stage's initramfs (dracut/90acl).
    pub initrd: PathBuf,
    /// Where each boot's console log goes.
    pub logs: PathBuf,
    /// How it starts.
    pub firmware: Firmware,
    /// The network namespace qemu runs in (`ip netns`), if not the caller's: qemu's user
    /// network takes the guest's 10.0.2.2 to the loopback of the namespace it runs in, so a
    /// machine in a namespace of its own reaches the repository served there.
    pub netns: Option<String>,
}

impl Vm {
    /// Powers on; the serial console goes to `logs/<name>.log`.
    pub fn boot(&self, name: &str) -> Result<Booted> {
        self.boot_with(name, "")
    }

    /// Powers on with `extra` added to the first stage's kernel command line (an edited boot
    /// entry).
    pub fn boot_with(&self, name: &str, extra: &str) -> Result<Booted> {
        let append = format!("console=ttyS0 panic=3 acl.disk=/dev/vda {extra}");
        let log = self.logs.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let drive = format!("file={},format=raw,if=virtio", self.disk.display());
        let mut qemu = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        // The default CPU model: `-cpu max` doubled the boot time under emulation here.
        // Two vCPUs (multi-threaded TCG): systemd starts units in parallel.
        qemu.args(["-m", "1024", "-smp", "2", "-nographic", "-no-reboot"]);
        match &self.firmware {
            Firmware::Direct => {
                qemu.arg("-kernel").arg(&self.vmlinuz).arg("-initrd").arg(&self.initrd);
                qemu.args(["-append", append.trim_end()]);
            }
            Firmware::SecureBoot { code, vars } => {
                // OVMF's Secure Boot build keeps its variables behind SMM, so that the OS
                // cannot write them (enrol a key, turn Secure Boot off) behind its back.
                let code = format!("if=pflash,format=raw,unit=0,readonly=on,file={}", code.display());
                let vars = format!("if=pflash,format=raw,unit=1,file={}", vars.display());
                qemu.args([
                    "-machine",
                    "q35,smm=on",
                    "-global",
                    "driver=cfi.pflash01,property=secure,value=on",
                ]);
                qemu.args(["-drive", &code, "-drive", &vars]);
            }
        }
        let child = qemu
            .args(["-drive", &drive])
            .args(["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .context("start qemu-system-x86_64")?;
        say!("  power on ({name}), console: {}", log.display());
        Ok(Booted { name: name.to_owned(), child, log, started: Instant::now(), mark: 0 })
    }
}

/// A running machine: one boot.
#[derive(Debug)]
pub struct Booted {
    name: String,
    child: Child,
    log: PathBuf,
    started: Instant,
    /// Where waits start looking in the console text: the end of the text when a line was last
    /// typed, so that what a command prints is looked for in what came after it.
    mark: usize,
}

impl Booted {
    /// Everything on the console so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The time since power-on.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn fail(&mut self, what: &str) -> anyhow::Error {
        let text = self.text();
        let tail: Vec<&str> = text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        let _ = self.child.kill();
        let _ = self.child.wait();
        anyhow::anyhow!(
            "{} ({}): {what}; last console lines:\n{}",
            self.name,
            self.log.display(),
            tail.join("\n")
        )
    }

    /// Waits until `pattern` is on the console (since the last typed line); the time since
    /// power-on.
    pub fn wait_for(&mut self, pattern: &str) -> Result<Duration> {
        self.wait_any(&[pattern]).map(|(_, at)| at)
    }

    /// Waits for the first of `patterns`; which one and the time since power-on.
    pub fn wait_any(&mut self, patterns: &[&str]) -> Result<(usize, Duration)> {
        loop {
            let text = self.text();
            let rest = text.get(self.mark..).unwrap_or("");
            let found =
                patterns.iter().enumerate().filter_map(|(i, p)| rest.find(p).map(|at| (at, i, p))).min();
            if let Some((_, i, p)) = found {
                let t = self.started.elapsed();
                say!("  {:6.1} s  {p}", t.as_secs_f64());
                return Ok((i, t));
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(self.fail(&format!("the machine stopped ({status}) before {patterns:?}")));
            }
            if self.started.elapsed() > STEP * 2 {
                return Err(self.fail(&format!("no {patterns:?} within {} s", (STEP * 2).as_secs())));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for the machine to reboot (qemu exits: -no-reboot); the time since power-on.
    pub fn wait_exit(&mut self) -> Result<Duration> {
        let since = Instant::now();
        loop {
            if self.child.try_wait()?.is_some() {
                let t = self.started.elapsed();
                say!("  {:6.1} s  (reboot)", t.as_secs_f64());
                return Ok(t);
            }
            if since.elapsed() > STEP {
                return Err(self.fail(&format!("no reboot within {} s", STEP.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Types a line on the console's root shell, and waits for its output to end with a
    /// marker the command itself does not contain (so the echo of the typed line is not taken
    /// for it). Returns the output.
    pub fn run(&mut self, command: &str) -> Result<String> {
        let n = self.text().len();
        let done = format!("--done-{n}--");
        self.type_line(&format!("{command}; echo --done-''{n}--"))?;
        self.wait_for(&done)?;
        let text = self.text();
        let rest = text.get(self.mark..).unwrap_or("");
        Ok(rest.split(&done).next().unwrap_or("").to_owned())
    }

    /// Types a line on the console's root shell.
    pub fn type_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("qemu's stdin")?;
        stdin.write_all(format!("{line}\n").as_bytes())?;
        stdin.flush()?;
        self.mark = self.text().len();
        say!("  {:6.1} s  # {line}", self.started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The value after `key` on the first console line containing `line`.
    pub fn field_after(&self, line: &str, key: &str) -> Result<String> {
        let text = self.text();
        let l = text.lines().find(|l| l.contains(line)).with_context(|| format!("no {line:?} line"))?;
        let v = l
            .split(key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .with_context(|| format!("no {key} in {l:?}"))?;
        Ok(v.to_owned())
    }

    /// Pulls the plug.
    pub fn power_off(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        say!("  {:6.1} s  (power off)", self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

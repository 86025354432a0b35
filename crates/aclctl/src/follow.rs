//! Talking to the running agent: `aclctl update` without `--repo` asks the agent to update
//! and, with `--follow`, draws the install's progress from the agent's answers until the new
//! slot is staged; `aclctl rollback` goes through the agent when one runs, so its state
//! machine knows.

use anyhow::{Context as _, Result, bail};
use localapi::{self as api, Answer};
use localapi::{Phase, Request};
use std::path::Path;
use std::time::Duration;

/// The agent's answer to `request`, or `None` when no agent listens on `socket`.
pub(crate) fn try_call(socket: &Path, request: Request) -> Result<Option<Answer>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match rt.block_on(api::call(socket, request)) {
        Ok(a) => Ok(Some(a)),
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("talk to the agent on {}", socket.display())),
    }
}

/// Like [`try_call`], but no agent is an error that says what to do.
pub(crate) fn call(socket: &Path, request: Request) -> Result<Answer> {
    let a = try_call(socket, request)?.with_context(|| {
        format!("no agent answers on {} (is acl-agentd running? are you root?)", socket.display())
    })?;
    if !a.ok {
        bail!("the agent refused: {}", a.error.unwrap_or_default());
    }
    Ok(a)
}

/// Asks the agent to update (to `version`, or the latest), and with `follow` shows progress
/// until the release is staged, the agent reboots into it, or it fails.
pub(crate) fn update(
    socket: &Path,
    version: Option<semver::Version>,
    follow: bool,
    json: bool,
) -> Result<()> {
    let first = call(socket, Request::Update { version })?;
    let state = first.state.context("the agent sent no state")?;
    if !first.checking {
        // Refused by the state machine (paused, busy, mode off): the note says why.
        bail!("{}", state.note);
    }
    if !follow {
        if json {
            println!("{}", serde_json::to_string_pretty(&state)?);
        } else {
            println!("agent: {} (aclctl status, or --follow, shows how it goes)", state.note);
        }
        return Ok(());
    }
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut installing = None;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let Some(a) = try_call(socket, Request::Status)? else {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            bail!("the agent stopped answering on {}", socket.display());
        };
        let state = a.state.context("the agent sent no state")?;
        match &state.phase {
            Phase::Idle if a.checking => {}
            Phase::Installing { version, .. } => {
                let p = a.progress.unwrap_or(localapi::Progress {
                    total: 0,
                    done: 0,
                    reused: 0,
                    resumed: 0,
                    verified: 0,
                });
                installing = Some(version.clone());
                if !json && p.total > 0 {
                    let b = bar.get_or_insert_with(|| cliutil::byte_bar(&version.to_string(), p.total));
                    let verifying = p.verified > 0;
                    b.set_prefix(if verifying { "verifying" } else { "installing" });
                    b.set_position(if verifying { p.verified } else { p.done });
                    b.set_message(format!(
                        "reused {:.1} MiB, resumed {:.1} MiB",
                        p.reused as f64 / 1048576.0,
                        p.resumed as f64 / 1048576.0
                    ));
                }
            }
            phase => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                if json {
                    println!("{}", serde_json::to_string_pretty(&state)?);
                }
                return match phase {
                    Phase::Staged { version } => {
                        if !json {
                            println!(
                                "{version} installed and set to boot next; the agent reboots when a maintenance window allows (agent: {})",
                                state.note
                            );
                        }
                        Ok(())
                    }
                    Phase::Rebooting { version } => {
                        if !json {
                            println!("{version} installed; the agent is rebooting into it");
                        }
                        Ok(())
                    }
                    _ if installing.is_some() || state.note != "up to date" => bail!("{}", state.note),
                    _ => {
                        if !json {
                            println!("up to date");
                        }
                        Ok(())
                    }
                };
            }
        }
    }
}

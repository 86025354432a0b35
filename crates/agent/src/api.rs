//! The local API: a Unix socket that only root can open (mode 0600 in a 0700 directory), one
//! JSON request per line, one JSON answer per line.
//!
//! ```text
//! -> {"request":"pause"}
//! <- {"ok":true,"state":{"phase":{"phase":"idle"},"paused":true,...}}
//! ```
//!
//! Requests: `status`, `check-now`, `pause`, `resume`, `{"rollback":{"now":false}}`,
//! `{"update":{"version":null}}` (or a version); `allow-reboot` is refused here (it is Kubernetes
//! mode's answer once the lock is held and the node drained). Each goes through the daemon's state machine
//! like any other event, so the API can do nothing the machine would not allow. The answer
//! carries the state after the request and, while an install runs, its progress (what
//! `aclctl update --follow` draws its bar from).

use crate::daemon::ApiRequest;
use crate::machine::Request;
pub use localapi::{Answer, RequestLine, call};
use std::path::Path;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::{mpsc, oneshot};

/// Listens on `path` (replacing a stale socket) and forwards requests to the daemon.
pub async fn serve(path: &Path, daemon: mpsc::Sender<ApiRequest>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (sock, _) = listener.accept().await?;
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = match serde_json::from_str::<RequestLine>(&line) {
                    Err(e) => Answer::refused(format!("bad request: {e}")),
                    Ok(RequestLine { request: Request::AllowReboot { .. } }) => Answer::refused(
                        "allow-reboot comes from the cluster coordinator (Kubernetes mode), not the local API"
                            .into(),
                    ),
                    Ok(req) => {
                        let (tx, rx) = oneshot::channel();
                        if daemon.send((req.request, tx)).await.is_err() {
                            Answer::refused("the agent is stopping".into())
                        } else {
                            match rx.await {
                                Ok(snap) => Answer {
                                    ok: true,
                                    checking: snap.checking,
                                    state: Some(snap.state),
                                    progress: snap.progress,
                                    error: None,
                                },
                                Err(_) => Answer::refused("the agent is stopping".into()),
                            }
                        }
                    }
                };
                let mut out = serde_json::to_vec(&answer).expect("answer serialises");
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

// SPDX-License-Identifier: Apache-2.0
//! The accept loop; the state every session shares is in
//! [`crate::broker`].
//!
//! [`serve`] takes an already-bound [`Listener`] and a shutdown future, so
//! a self-bound socket, a socket-activated one and every test share one
//! path. On shutdown it stops accepting, lets every in-flight call finish
//! and reply, and only then returns.
//!
//! Under systemd, `serve` reports `READY=1` once it is about to accept,
//! keeps the watchdog fed from a task that only pings after the accept
//! loop itself has answered (a stalled loop stops the pings, and systemd
//! restarts the broker), keeps `STATUS=` current, and reports
//! `STOPPING=1` on shutdown. [`crate::reload::reload_on_hangup`]
//! re-reads the policy on SIGHUP.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{AuditError, Decision, Event, Record};
use crate::broker::Broker;
use crate::listener::Listener;
use crate::session;

/// How often `STATUS=` is refreshed when no watchdog sets the pace.
const STATUS_PERIOD: Duration = Duration::from_secs(5);
/// The longest pause of the accept loop after a failed accept (EMFILE and
/// the like): it doubles from 1 ms up to this while accepts keep failing.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(200);

/// Serve `listener` until `shutdown` resolves, then drain.
pub async fn serve(
    listener: Listener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AuditError> {
    let socket = listener.path().unwrap_or_default();
    let socket = socket.to_string_lossy();
    let config = broker
        .config_path
        .as_deref()
        .map(|p| p.to_string_lossy())
        .unwrap_or("(built-in example)".into());
    broker.audit.must_record(
        &Record::new(Event::Start, Decision::Info)
            .version(env!("CARGO_PKG_VERSION"))
            .config(&config)
            .socket(&socket),
    )?;
    let _ = broker.socket_path.set(listener.path().unwrap_or_default());
    let sessions = TaskTracker::new();
    let stopping = CancellationToken::new();
    // The keep-alive task asks the accept loop to answer before it tells
    // systemd the broker is alive. `heartbeat` stays open while we loop.
    let (heartbeat, mut heartbeats) = mpsc::channel::<oneshot::Sender<()>>(1);
    broker.notifier.ready(&broker.status());
    let keep_alive = broker
        .notifier
        .enabled()
        .then(|| tokio::spawn(keep_alive(Arc::clone(&broker), heartbeat.clone())));
    tokio::pin!(shutdown);
    let mut backoff: Option<Duration> = None;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(ack) = heartbeats.recv() => {
                let _ = ack.send(());
            }
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    backoff = None;
                    let shared = session::Sessions {
                        tracker: sessions.clone(),
                        stopping: stopping.clone(),
                    };
                    sessions.spawn(session::run(conn, Arc::clone(&broker), shared));
                }
                Err(e) => {
                    // EMFILE and friends: the pending connection stays
                    // queued and the listener open; back off (doubling)
                    // instead of spinning, and say so once per run.
                    let pause = match backoff {
                        None => {
                            eprintln!("keyward-broker: accept: {e}; backing off");
                            Duration::from_millis(1)
                        }
                        Some(p) => (p * 2).min(ACCEPT_BACKOFF_MAX),
                    };
                    backoff = Some(pause);
                    tokio::time::sleep(pause).await;
                }
            },
        }
    }
    broker.notifier.stopping();
    if let Some(task) = keep_alive {
        task.abort();
    }
    drop(heartbeat);
    // Stop accepting (and unlink a self-bound socket) before draining.
    drop(listener);
    stopping.cancel();
    sessions.close();
    sessions.wait().await;
    broker
        .audit
        .must_record(&Record::new(Event::Stop, Decision::Info))?;
    Ok(())
}

/// Feed the watchdog at half its interval, but only after the accept loop
/// has answered a heartbeat: if the loop (or the runtime under it) stalls,
/// the pings stop and systemd restarts the broker. Refresh `STATUS=` when
/// it changed.
async fn keep_alive(broker: Arc<Broker>, heartbeat: mpsc::Sender<oneshot::Sender<()>>) {
    let watchdog = broker.notifier.watchdog();
    let period = watchdog.map_or(STATUS_PERIOD, |w| (w / 2).max(Duration::from_millis(1)));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shown = broker.status();
    loop {
        ticker.tick().await;
        let status = broker.status();
        let changed = (status != shown).then_some(status.as_str());
        if watchdog.is_some() {
            let (ack, answered) = oneshot::channel();
            if heartbeat.send(ack).await.is_err() {
                return;
            }
            match tokio::time::timeout(period, answered).await {
                Ok(Ok(())) => broker.notifier.watchdog_ping(changed),
                // No answer: no ping. systemd acts once the interval passes.
                _ => continue,
            }
        } else if let Some(status) = changed {
            broker.notifier.status(status);
        }
        shown = status;
    }
}

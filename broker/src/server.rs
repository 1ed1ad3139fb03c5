// SPDX-License-Identifier: Apache-2.0
//! The accept loop and the state every session shares.
//!
//! [`serve`] takes an already-bound [`Listener`] and a shutdown future, so
//! a self-bound socket, a socket-activated one and every test share one
//! path. On shutdown it stops accepting, lets every in-flight call finish
//! and reply, and only then returns.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{Audit, Decision, Event, Record};
use crate::executor::Executor;
use crate::listener::Listener;
use crate::policy::Policy;
use crate::session;

/// Everything a session needs: the policy, the executor (which alone holds
/// the credentials), the audit sink and the per-uid connection counts.
#[derive(Debug)]
pub struct Broker {
    policy: RwLock<Arc<Policy>>,
    pub executor: Executor,
    pub audit: Audit,
    connections: Mutex<HashMap<u32, usize>>,
}

impl Broker {
    pub fn new(policy: Policy, executor: Executor, audit: Audit) -> Broker {
        Broker {
            policy: RwLock::new(Arc::new(policy)),
            executor,
            audit,
            connections: Mutex::new(HashMap::new()),
        }
    }

    /// The policy in force now. A session takes it once per request, so a
    /// reload applies from the next request on.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reserve a connection slot for `uid`, or `None` when it already holds
    /// `max_connections_per_uid` connections.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Option<ConnectionSlot> {
        let max = self.policy().broker.max_connections_per_uid;
        let mut counts = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(uid).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            broker: Arc::clone(self),
            uid,
        })
    }
}

/// A held connection slot; released on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    broker: Arc<Broker>,
    uid: u32,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self
            .broker
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// Serve `listener` until `shutdown` resolves, then drain.
pub async fn serve(
    listener: Listener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), crate::audit::AuditError> {
    broker
        .audit
        .must_record(&Record::new(Event::Start, Decision::Info))?;
    let sessions = TaskTracker::new();
    let stopping = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    sessions.spawn(session::run(conn, Arc::clone(&broker), stopping.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the
                    // pending connection stays queued.
                    eprintln!("keyward-broker: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
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

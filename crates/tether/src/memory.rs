//! An in-memory transport: two connected [`Transport`]s, for tests and in-process peers.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use futures::{SinkExt, StreamExt};
//! let (mut a, mut b) = tether::memory::pair(16);
//! a.outgoing.send("{ping:[1]}".to_string()).await.unwrap();
//! assert_eq!(b.incoming.next().await.unwrap().unwrap(), "{ping:[1]}");
//! # }
//! ```

use crate::transport::{Transport, TransportError, TransportInfo, TransportKind};
use futures::{SinkExt, StreamExt};

/// Two transports joined back to back; each holds up to `capacity` unread messages.
/// Closing one side's sink ends the other side's stream.
pub fn pair(capacity: usize) -> (Transport, Transport) {
    let (a_tx, a_rx) = futures::channel::mpsc::channel::<String>(capacity);
    let (b_tx, b_rx) = futures::channel::mpsc::channel::<String>(capacity);
    let info = |local: &str, remote: &str| TransportInfo {
        kind: TransportKind::Tcp,
        local_addr: Some(local.to_owned()),
        remote_addr: Some(remote.to_owned()),
    };
    let a = Transport {
        incoming: Box::pin(b_rx.map(Ok)),
        outgoing: Box::pin(a_tx.sink_map_err(|_| TransportError::Closed)),
        info: info("memory:a", "memory:b"),
    };
    let b = Transport {
        incoming: Box::pin(a_rx.map(Ok)),
        outgoing: Box::pin(b_tx.sink_map_err(|_| TransportError::Closed)),
        info: info("memory:b", "memory:a"),
    };
    (a, b)
}

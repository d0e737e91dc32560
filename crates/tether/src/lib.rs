//! tether: connections that survive.
//!
//! Bidirectional RPC over TCP, TLS, Unix sockets and WebSocket speaking metarhia's JSTP wire
//! format, so `@metarhia/jstp` peers work with it unchanged. A [`Server`] hosts
//! [`Application`]s (`name@version`, interfaces of async methods and event handlers); a client
//! [`connect`]s with an application name (optionally a semver range) and gets a [`Connection`]:
//! [`Connection::call`] with a deadline, [`Connection::emit`] events, [`Connection::inspect`]
//! interfaces, [`Connection::ping`], and a stream of [`ConnectionEvent`]s.
//!
//! One connection is one driver task owning its transport; [`Connection`] is a cheap cloneable
//! handle that talks to it over a bounded channel. Every request ends exactly once: answered,
//! failed on close ([`Error::Closed`]), flushed ([`Error::Flushed`]) or timed out
//! ([`Error::Timeout`], a local error that never goes on the wire).
//!
//! ```
//! use tether::{connect, Application, ClientOptions, Interface, Server, Value};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tether::Error> {
//! let app = Application::new("testApp", "1.0.0")?.interface(
//!     "calculator",
//!     Interface::new().method("answer", |_conn, _args| async { Ok(Value::from(42)) }),
//! );
//! let server = Server::builder().application(app).build()?;
//! let addr = server.listen("jstp://127.0.0.1:0".parse()?).await?;
//!
//! let conn = connect(&format!("jstp://{addr}"), "testApp", ClientOptions::default()).await?;
//! assert_eq!(conn.call("calculator", "answer", vec![]).await?, vec![Value::from(42)]);
//! conn.close().await;
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Cargo features
//!
//! Every protocol part is on by default; a library user who wants less turns the defaults off
//! (`default-features = false, features = [...]`) and names what they use. The core
//! (connections, client, server, the JSTP transports, [`store::MemoryStore`]) is always there.
//! More in `docs/features.md`.
//!
//! | feature | default | brings | dependencies |
//! | --- | --- | --- | --- |
//! | `redb` | yes | `store::RedbStore`, `store::open(PATH)`, `hub::PeerBook::open` | `redb` |
//! | `redis` | yes | `store::RedisStore`, `store::open("redis://…")` | `redis` |
//! | `cluster` | yes | `cluster` (broadcasts shared through Redis), `ServerBuilder::cluster` | the `redis` feature |
//! | `http` | yes | `http` (HTTP/1.1 and HTTP/2 client and server) | none beyond the core (hyper already carries WebSocket) |
//! | `conductor` | yes | `conductor` (Holochain's conductor protocol), the example's conductor server | `rmp-serde`, `rmpv` |
//! | `hub` | yes | `hub` (the multiserver hub; a file-backed peer book also needs `redb`) | none |
//! | `testing` | no | `testing` (`CutProxy`, for tests and benchmarks) | none |
//!
//! Without `redis` or `redb`, [`store::open`] refuses the spec it cannot serve with
//! [`store::StoreError::FeatureDisabled`], naming the feature.
#![warn(missing_docs)]

pub mod app;
pub mod client;
#[cfg(feature = "cluster")]
pub mod cluster;
#[cfg(feature = "conductor")]
pub mod conductor;
pub mod connection;
pub mod error;
pub mod example;
pub mod guard;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "hub")]
pub mod hub;
pub mod memory;
pub mod metrics;
pub mod reconnect;
pub mod server;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;
pub mod typed;

pub use app::{AppRegistry, Application, Interface, MethodResult};
pub use client::{
    connect, connect_and_inspect, connect_endpoint, connect_transport, ClientOptions,
};
pub use connection::{Connection, ConnectionConfig, ConnectionEvent, RemoteProxy, Role};
pub use error::{Error, RemoteError};
pub use server::{AuthPolicy, AuthRequest, LoginPolicy, Server, ServerBuilder, ServerEvent};
pub use tether_macros::interface;
pub use tether_wire::{from_value, to_value, Auth, ErrorCode, Value, ValueError};
pub use transport::{Endpoint, TransportError, TransportKind};
pub use typed::{TypedBroadcast, TypedConnection, TypedError, TypedProxy};

//! The hub's events and tables as [`Stream`]s. Each listener has a bounded queue (the hub's
//! `channel_capacity`); one that falls behind gets a [`Lagged`] item saying how many it missed,
//! then the oldest items still queued — never a silent gap.

use super::{Entry, HubEvent};
use futures::stream::{BoxStream, Stream, StreamExt};
use std::pin::Pin;
use std::task::{Context, Poll};
use thiserror::Error;
use tokio::sync::broadcast::{self, error::RecvError};

/// A listener fell behind and missed this many items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("fell behind and missed {0} items")]
pub struct Lagged(pub u64);

fn items<T: Clone + Send + 'static>(
    rx: broadcast::Receiver<T>,
) -> BoxStream<'static, Result<T, Lagged>> {
    futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(item) => Some((Ok(item), rx)),
            Err(RecvError::Lagged(n)) => Some((Err(Lagged(n)), rx)),
            Err(RecvError::Closed) => None,
        }
    })
    .boxed()
}

/// Transitions, each once, from [`super::Hub::listen`]; ends when the hub is closed.
pub struct Events {
    inner: BoxStream<'static, Result<HubEvent, Lagged>>,
}

impl Events {
    pub(super) fn new(rx: broadcast::Receiver<HubEvent>) -> Events {
        Events { inner: items(rx) }
    }
}

impl Stream for Events {
    type Item = Result<HubEvent, Lagged>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

/// The hub's table, from [`super::Hub::live_entries`]: the current one first, then one after
/// each change; ends when the hub is closed. Each table is complete, so after a [`Lagged`]
/// item the next table is still the truth.
pub struct LiveEntries {
    inner: BoxStream<'static, Result<Vec<(String, Entry)>, Lagged>>,
}

impl LiveEntries {
    pub(super) fn new(
        first: Vec<(String, Entry)>,
        rx: broadcast::Receiver<Vec<(String, Entry)>>,
    ) -> LiveEntries {
        let inner = futures::stream::once(async move { Ok(first) })
            .chain(items(rx))
            .boxed();
        LiveEntries { inner }
    }
}

impl Stream for LiveEntries {
    type Item = Result<Vec<(String, Entry)>, Lagged>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

impl std::fmt::Debug for LiveEntries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveEntries").finish_non_exhaustive()
    }
}

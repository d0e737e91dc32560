//! WebSocket transports: one JSTP message per WebSocket message, subprotocol `metarhia-jstp`.
//!
//! The server side runs hyper's HTTP/1 server for the upgrade; the client side uses
//! tungstenite's client handshake. Both then speak through tokio-tungstenite.

use super::{Transport, TransportError, TransportInfo};
use bytes::Bytes;
use futures::{ready, Sink, SinkExt, Stream, StreamExt};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tether_wire::FrameError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The WebSocket subprotocol JSTP requires.
pub const SUBPROTOCOL: &str = "metarhia-jstp";

/// Default size above which outgoing messages are fragmented (upstream's `websocket` library
/// uses the same 16 KiB).
pub const DEFAULT_FRAGMENT_SIZE: usize = 16 * 1024;

/// Largest allowed fragment payload: Node's `websocket` client refuses frames of 1 MiB and more.
pub const MAX_FRAGMENT_SIZE: usize = 1024 * 1024 - 1;

/// Socket read buffer of a WebSocket transport, allocated with the connection (tungstenite keeps
/// it for the connection's life): small, so an idle connection stays cheap; a large message
/// grows it while it is read.
const WS_READ_BUFFER: usize = 4 * 1024;
/// Outgoing bytes buffered before tungstenite writes to the socket (flush writes earlier).
const WS_WRITE_BUFFER: usize = 64 * 1024;

/// Clamps a configured fragment size into `4..=MAX_FRAGMENT_SIZE` (4 bytes so that every
/// fragment holds at least one UTF-8 character).
pub(crate) fn clamp_fragment_size(size: usize) -> usize {
    size.clamp(4, MAX_FRAGMENT_SIZE)
}

/// The tungstenite configuration for a transport with these limits.
pub(crate) fn ws_config(max_message_size: usize, fragment_size: usize) -> WebSocketConfig {
    let fragment_size = clamp_fragment_size(fragment_size);
    WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        // The buffer only grows past `write_buffer_size` by the frame being queued while the
        // socket is blocked; every frame we send is at most one fragment (plus header).
        .max_write_buffer_size(WS_WRITE_BUFFER + fragment_size + 16 * 1024)
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

/// Splits `text` into consecutive byte ranges of at most `size` bytes (`size >= 4`), never
/// cutting a UTF-8 character.
pub fn fragment_ranges(
    text: &str,
    size: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let size = size.max(4);
    let bytes = text.as_bytes();
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= bytes.len() {
            return None;
        }
        let start = pos;
        pos = next_cut(bytes, start, size);
        Some(start..pos)
    })
}

/// End of the fragment starting at `start`: at most `size` bytes, on a character boundary.
fn next_cut(bytes: &[u8], start: usize, size: usize) -> usize {
    let mut end = (start + size).min(bytes.len());
    // A UTF-8 continuation byte is 0b10xx_xxxx; back off to a character start (at most 3).
    while end < bytes.len() && bytes[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    end
}

// ---------------------------------------------------------------------------------------------
// Incoming messages.

/// The WebSocket shared by the two halves of a transport. The lock is only held during a poll,
/// never across an await.
type SharedWs<S> = Arc<Mutex<WebSocketStream<S>>>;

fn lock<S>(ws: &SharedWs<S>) -> std::sync::MutexGuard<'_, WebSocketStream<S>> {
    ws.lock().unwrap_or_else(|e| e.into_inner())
}

/// Maps tungstenite messages to message texts; ends after the first error.
struct WsIncoming<S> {
    ws: SharedWs<S>,
    done: bool,
    /// Where a protocol violation leaves the close code our close frame will carry.
    close_code: Arc<AtomicU16>,
}

/// The close code RFC 6455 (section 7.4.1) asks for when the peer's input fails this way:
/// 1002 for a protocol violation, 1007 for a text message that is not UTF-8, 1009 for a
/// message or frame over the limit. `None`: not the peer's fault (i/o, already closed).
fn close_code_for(e: &WsError) -> Option<CloseCode> {
    match e {
        WsError::Protocol(_) => Some(CloseCode::Protocol),
        WsError::Utf8(_) => Some(CloseCode::Invalid),
        WsError::Capacity(_) => Some(CloseCode::Size),
        _ => None,
    }
}

fn map_ws_error(e: WsError) -> TransportError {
    match e {
        WsError::Io(e) => TransportError::Io(e),
        WsError::Capacity(CapacityError::MessageTooLong { max_size, .. }) => {
            TransportError::Frame(FrameError::TooLarge { limit: max_size })
        }
        WsError::Utf8(_) => TransportError::Frame(FrameError::InvalidUtf8),
        WsError::ConnectionClosed | WsError::AlreadyClosed => TransportError::Closed,
        other => TransportError::WebSocket(other.to_string()),
    }
}

impl<S> WsIncoming<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Tells the peer why the connection ends: queues a close frame with `code` and tries once
    /// to flush it, so the code goes out whether or not the owner closes the sink (a
    /// connection that has not finished its JSTP handshake is just dropped). The code is also
    /// left for the sink's close, in case the frame could not be queued now.
    fn violation(&self, ws: &mut WebSocketStream<S>, code: CloseCode, cx: &mut Context<'_>) {
        self.close_code.store(code.into(), Ordering::Relaxed);
        let frame = CloseFrame {
            code,
            reason: Default::default(),
        };
        if ws.start_send_unpin(Message::Close(Some(frame))).is_ok() {
            let _ = ws.poll_flush_unpin(cx);
        }
    }
}

impl<S> Stream for WsIncoming<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Item = Result<String, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let shared = self.ws.clone();
        let mut ws = lock(&shared);
        loop {
            let item = match ready!(ws.poll_next_unpin(cx)) {
                None => {
                    // The close handshake is over (or the peer went away): close the socket
                    // now rather than when the transport is dropped, so that the peer's
                    // stream ends too (RFC 6455: the server closes TCP first).
                    let _ = ready!(Pin::new(ws.get_mut()).poll_shutdown(cx));
                    self.done = true;
                    return Poll::Ready(None);
                }
                Some(Ok(Message::Text(text))) => Ok(text.as_str().to_owned()),
                Some(Ok(Message::Binary(data))) => match String::from_utf8(data.into()) {
                    Ok(text) => Ok(text),
                    Err(_) => {
                        // A JSTP message must be text: data inconsistent with it is 1007.
                        self.violation(&mut ws, CloseCode::Invalid, cx);
                        Err(FrameError::InvalidUtf8.into())
                    }
                },
                // Pings are answered by tungstenite. After a close frame, keep reading: that
                // sends the reply and ends the stream when the close handshake completes.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => continue,
                Some(Ok(Message::Frame(_))) => continue,
                Some(Err(e)) => {
                    if let Some(code) = close_code_for(&e) {
                        self.violation(&mut ws, code, cx);
                    }
                    Err(map_ws_error(e))
                }
            };
            let item = match item {
                Ok(text) if text.is_empty() => Err(FrameError::Empty.into()),
                other => other,
            };
            self.done = item.is_err();
            return Poll::Ready(Some(item));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Outgoing messages.

/// The rest of a message being sent as fragments.
struct Fragmenting {
    data: Bytes,
    pos: usize,
}

/// Sends each message as one text message, fragmenting the long ones.
struct WsOutgoing<S> {
    ws: SharedWs<S>,
    pending: Option<Fragmenting>,
    fragment_size: usize,
    /// Our close frame has been queued.
    close_queued: bool,
    /// The close code to send: 1000 unless the incoming side saw a protocol violation.
    close_code: Arc<AtomicU16>,
}

impl<S> WsOutgoing<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Hands every remaining fragment of the current message to the socket.
    fn poll_pending(
        &mut self,
        ws: &mut WebSocketStream<S>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TransportError>> {
        while let Some(p) = self.pending.as_mut() {
            ready!(ws.poll_ready_unpin(cx)).map_err(map_ws_error)?;
            let start = p.pos;
            let end = next_cut(&p.data, start, self.fragment_size);
            let fin = end == p.data.len();
            let opcode = if start == 0 {
                Data::Text
            } else {
                Data::Continue
            };
            let frame = Frame::message(p.data.slice(start..end), OpCode::Data(opcode), fin);
            p.pos = end;
            if fin {
                self.pending = None;
            }
            ws.start_send_unpin(Message::Frame(frame))
                .map_err(map_ws_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S> Sink<String> for WsOutgoing<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let shared = self.ws.clone();
        let mut ws = lock(&shared);
        ready!(self.poll_pending(&mut ws, cx))?;
        ws.poll_ready_unpin(cx).map_err(map_ws_error)
    }

    fn start_send(mut self: Pin<&mut Self>, item: String) -> Result<(), Self::Error> {
        if item.is_empty() {
            return Err(FrameError::Empty.into());
        }
        if item.len() <= self.fragment_size {
            return lock(&self.ws)
                .start_send_unpin(Message::Text(item.into()))
                .map_err(map_ws_error);
        }
        // Fragments go out from `poll_ready`, `poll_flush` and `poll_close`.
        self.pending = Some(Fragmenting {
            data: Bytes::from(item.into_bytes()),
            pos: 0,
        });
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let shared = self.ws.clone();
        let mut ws = lock(&shared);
        ready!(self.poll_pending(&mut ws, cx))?;
        ws.poll_flush_unpin(cx).map_err(map_ws_error)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let shared = self.ws.clone();
        let mut ws = lock(&shared);
        ready!(self.poll_pending(&mut ws, cx))?;
        // Empty the write buffer first so the close frame always fits in it.
        ready!(ws.poll_flush_unpin(cx)).map_err(map_ws_error)?;
        if !self.close_queued {
            // Close with 1000 as upstream does (Node's `websocket` reports a close frame
            // without a status code as an abnormal closure, 1006), or with the RFC 6455 code of
            // the peer's protocol violation. If the peer closed first, this is refused and
            // `poll_close` below just completes the handshake.
            let code = CloseCode::from(self.close_code.load(Ordering::Relaxed));
            let frame = CloseFrame {
                code,
                reason: Default::default(),
            };
            let _ = ws.start_send_unpin(Message::Close(Some(frame)));
            self.close_queued = true;
        }
        ws.poll_close_unpin(cx).map_err(map_ws_error)
    }
}

/// Wraps an established WebSocket in a [`Transport`].
pub(crate) fn ws_transport<S>(
    ws: WebSocketStream<S>,
    fragment_size: usize,
    info: TransportInfo,
) -> Transport
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = Arc::new(Mutex::new(ws));
    let close_code = Arc::new(AtomicU16::new(CloseCode::Normal.into()));
    Transport {
        incoming: Box::pin(WsIncoming {
            ws: ws.clone(),
            done: false,
            close_code: close_code.clone(),
        }),
        outgoing: Box::pin(WsOutgoing {
            ws,
            pending: None,
            fragment_size: clamp_fragment_size(fragment_size),
            close_queued: false,
            close_code,
        }),
        info,
    }
}

// ---------------------------------------------------------------------------------------------
// Server handshake.

/// Whether a comma-separated header (possibly repeated) contains `token`, ignoring ASCII case.
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the client offered the JSTP subprotocol (tokens compare exactly, per RFC 6455).
fn offers_subprotocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == SUBPROTOCOL)
}

type Body = Full<Bytes>;

fn reject(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{reason}\n"))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::UPGRADE_REQUIRED {
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
    resp
}

/// Checks an upgrade request; `Ok(accept key)` or the status and reason to answer with.
fn check_upgrade(req: &Request<Incoming>) -> Result<String, (StatusCode, &'static str)> {
    let headers = req.headers();
    let is_upgrade = req.method() == Method::GET
        && req.version() >= http::Version::HTTP_11
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket");
    if !is_upgrade {
        return Err((
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade request",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version (expected 13)",
        ));
    }
    let key = match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(k) if k.len() == 24 => k,
        _ => {
            return Err((
                StatusCode::BAD_REQUEST,
                "missing or malformed Sec-WebSocket-Key",
            ))
        }
    };
    if !offers_subprotocol(headers) {
        return Err((
            StatusCode::FORBIDDEN,
            "the metarhia-jstp WebSocket subprotocol is required",
        ));
    }
    Ok(derive_accept_key(key.as_bytes()))
}

/// What the HTTP service decided for the connection.
type Outcome = Option<Result<OnUpgrade, String>>;

/// Runs the HTTP/1 server side of the handshake over `io` (TCP or TLS): a WebSocket upgrade
/// offering `metarhia-jstp` gets 101, other upgrades 403 (no subprotocol) or 426 (version), and
/// any other request 400. Resolves to the upgraded WebSocket.
pub(crate) async fn accept_ws<I>(
    io: I,
    config: WebSocketConfig,
) -> Result<WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, TransportError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let outcome: Arc<Mutex<Outcome>> = Arc::default();
    let slot = outcome.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let resp = match check_upgrade(&req) {
            Ok(accept) => {
                let on_upgrade = hyper::upgrade::on(&mut req);
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Ok(on_upgrade));
                let mut resp = Response::new(Body::default());
                *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                let h = resp.headers_mut();
                h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                h.insert(
                    header::SEC_WEBSOCKET_ACCEPT,
                    HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
                );
                h.insert(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(SUBPROTOCOL),
                );
                resp
            }
            Err((status, reason)) => {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err(format!(
                    "refused WebSocket handshake with {status}: {reason}"
                )));
                reject(status, reason)
            }
        };
        std::future::ready(Ok::<_, Infallible>(resp))
    });
    hyper::server::conn::http1::Builder::new()
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
        .map_err(|e| TransportError::WebSocket(format!("HTTP error during handshake: {e}")))?;
    let decided = outcome.lock().unwrap_or_else(|e| e.into_inner()).take();
    let on_upgrade = match decided {
        Some(Ok(on_upgrade)) => on_upgrade,
        Some(Err(why)) => return Err(TransportError::WebSocket(why)),
        None => {
            return Err(TransportError::WebSocket(
                "connection closed before a WebSocket upgrade request".into(),
            ))
        }
    };
    let upgraded = on_upgrade
        .await
        .map_err(|e| TransportError::WebSocket(format!("upgrade failed: {e}")))?;
    Ok(WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await)
}

// ---------------------------------------------------------------------------------------------
// Client handshake.

/// Performs the client handshake for `url` over `io`, requiring the server to accept
/// `metarhia-jstp`.
pub(crate) async fn connect_ws<S>(
    url: &str,
    io: S,
    config: WebSocketConfig,
) -> Result<WebSocketStream<S>, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request = url
        .into_client_request()
        .map_err(|e| TransportError::InvalidAddress(format!("{url:?}: {e}")))?;
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let (ws, response) = tokio_tungstenite::client_async_with_config(request, io, Some(config))
        .await
        .map_err(|e| match e {
            WsError::Http(resp) => TransportError::WebSocket(format!(
                "server refused the WebSocket upgrade with HTTP {}",
                resp.status()
            )),
            WsError::Io(e) => TransportError::Io(e),
            other => TransportError::WebSocket(format!("handshake failed: {other}")),
        })?;
    let accepted = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .is_some_and(|v| v.as_bytes() == SUBPROTOCOL.as_bytes());
    if !accepted {
        return Err(TransportError::WebSocket(
            "server did not accept the metarhia-jstp subprotocol".into(),
        ));
    }
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str, size: usize) -> Vec<&str> {
        fragment_ranges(text, size).map(|r| &text[r]).collect()
    }

    #[test]
    fn fragments_cover_the_text_on_char_boundaries() {
        assert_eq!(split("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(split("abcd", 4), ["abcd"]);
        assert!(split("", 4).is_empty());
        // 'é' is 2 bytes, '😀' 4: never cut inside one.
        assert_eq!(split("aéé", 4), ["aé", "é"]);
        assert_eq!(split("a😀b", 4), ["a", "😀", "b"]);
        assert_eq!(split("a😀b", 5), ["a😀", "b"]);
        let text: String = "x€😀é".repeat(10_000);
        for size in [4, 5, 7, 16 * 1024, MAX_FRAGMENT_SIZE] {
            let parts = split(&text, size);
            assert!(parts.iter().all(|p| !p.is_empty() && p.len() <= size));
            assert_eq!(parts.concat(), text);
        }
    }

    #[test]
    fn three_mib_default_fragments_stay_small() {
        let text = "a".repeat(3 * 1024 * 1024);
        let parts: Vec<_> = fragment_ranges(&text, DEFAULT_FRAGMENT_SIZE).collect();
        assert_eq!(parts.len(), 3 * 64);
        assert!(parts.iter().all(|r| r.len() == DEFAULT_FRAGMENT_SIZE));
    }

    #[test]
    fn fragment_size_is_clamped_below_one_mib() {
        assert_eq!(clamp_fragment_size(0), 4);
        assert_eq!(clamp_fragment_size(usize::MAX), 1024 * 1024 - 1);
        assert_eq!(clamp_fragment_size(DEFAULT_FRAGMENT_SIZE), 16 * 1024);
    }

    #[test]
    fn token_matching() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("a, b"),
        );
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("metarhia-jstp"),
        );
        assert!(header_has_token(&h, header::CONNECTION, "upgrade"));
        assert!(!header_has_token(&h, header::CONNECTION, "close"));
        assert!(offers_subprotocol(&h));
        let mut h = HeaderMap::new();
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("Metarhia-JSTP"),
        );
        assert!(!offers_subprotocol(&h));
    }
}

//! TLS for every Cairn link: rustls runs the handshake and keeps the key schedule; Cairn seals
//! and opens the TLS 1.3 records itself (as kernel TLS would), so that bulk data costs one
//! cipher pass and no extra copies (see [`stream`]).
//!
//! Both ends are Cairn's, and both offer TLS 1.3 only; any standard TLS 1.3 peer interoperates.

mod handshake;
pub mod record;
mod stream;

pub use handshake::{accept, connect};
pub use stream::{READ_BUFFER_BYTES, SEND_BUFFER_BYTES, StreamError, TlsConnectInfo, TlsStream};

//! Transport framing on a QUIC stream.
//!
//! ```text
//! offset 0   kind      u8     Request | Response | OneWay | Watch | Item | End | Cancel
//!        1   reserved  7 bytes, zero
//!        8   id        u64 LE  correlation id (requests, responses, watches); 0 for one-way
//!       16   address   u64 LE  logical endpoint on the receiving side (e.g. a simulated host)
//!       24   envelope  the wire frame: 8-byte header + rkyv body (see cellplane_api::wire)
//! ```
//!
//! The reader reads the 32-byte prefix, checks the envelope header (magic, version, size cap)
//! with `wire::peek_body_len`, and only then allocates for the body. Logical addressing lets
//! one connection carry the traffic of thousands of endpoints.

use cellplane_api::wire::{self, HEADER_LEN, Message, WireError};
use rkyv::util::AlignedVec;

/// Bytes before the envelope.
pub const PREFIX_LEN: usize = 24;
/// Bytes to read before the body: the prefix and the envelope header.
pub const HEAD_LEN: usize = PREFIX_LEN + HEADER_LEN;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Asks for one answer.
    Request = 1,
    /// Answers a request (or refuses it with `Message::Error`).
    Response = 2,
    /// Expects no answer.
    OneWay = 3,
    /// Opens a server stream.
    Watch = 4,
    /// One item of a server stream.
    Item = 5,
    /// The last frame of a server stream.
    End = 6,
    /// The client no longer wants a server stream.
    Cancel = 7,
}

impl FrameKind {
    fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::OneWay,
            4 => Self::Watch,
            5 => Self::Item,
            6 => Self::End,
            7 => Self::Cancel,
            _ => return None,
        })
    }
}

/// A parsed frame head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The kind.
    pub kind: FrameKind,
    /// Correlation id.
    pub id: u64,
    /// Logical address.
    pub address: u64,
    /// Length of the envelope body that follows.
    pub body_len: usize,
}

/// Why a frame head is refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// An unknown frame kind or non-zero reserved bytes.
    #[error("malformed frame head")]
    Malformed,
    /// The envelope header is refused (magic, version, size).
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Encodes one frame into a single aligned buffer (no copy of the body).
pub fn encode(
    kind: FrameKind,
    id: u64,
    address: u64,
    message: &Message,
) -> Result<AlignedVec<16>, WireError> {
    let mut prefix = [0u8; PREFIX_LEN];
    prefix[0] = kind as u8;
    prefix[8..16].copy_from_slice(&id.to_le_bytes());
    prefix[16..24].copy_from_slice(&address.to_le_bytes());
    wire::encode_with_prefix(message, &prefix)
}

/// Parses a frame head, checking the size cap before anything is allocated.
pub fn parse_head(head: &[u8; HEAD_LEN]) -> Result<Head, FrameError> {
    let kind = FrameKind::from_u8(head[0]).ok_or(FrameError::Malformed)?;
    if head[1..8] != [0; 7] {
        return Err(FrameError::Malformed);
    }
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&head[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let mut envelope = [0u8; HEADER_LEN];
    envelope.copy_from_slice(&head[PREFIX_LEN..]);
    let body_len = wire::peek_body_len(&envelope)?;
    Ok(Head { kind, id: word(8), address: word(16), body_len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_api::wire::{ErrorCode, ErrorReply};

    #[test]
    fn frames_round_trip_and_refuse_bad_heads() {
        let message = Message::Error(ErrorReply { code: ErrorCode::Closed, detail: "x".into() });
        let frame = encode(FrameKind::Item, 7, 42, &message).unwrap();
        let head = parse_head(frame[..HEAD_LEN].try_into().unwrap()).unwrap();
        assert_eq!((head.kind, head.id, head.address), (FrameKind::Item, 7, 42));
        assert_eq!(head.body_len, frame.len() - HEAD_LEN);
        assert_eq!(wire::decode_body(&frame[HEAD_LEN..]).unwrap(), message);

        let mut bad = frame.clone();
        bad[0] = 99;
        assert!(matches!(
            parse_head(bad[..HEAD_LEN].try_into().unwrap()),
            Err(FrameError::Malformed)
        ));
        let mut bad = frame.clone();
        bad[3] = 1;
        assert!(matches!(
            parse_head(bad[..HEAD_LEN].try_into().unwrap()),
            Err(FrameError::Malformed)
        ));
        let mut bad = frame;
        bad[PREFIX_LEN + 4..PREFIX_LEN + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse_head(bad[..HEAD_LEN].try_into().unwrap()),
            Err(FrameError::Wire(WireError::TooLarge { .. }))
        ));
    }
}

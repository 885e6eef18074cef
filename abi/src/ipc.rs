//! IPC messages between the core and services.
//!
//! A message is one fixed-size, `#[repr(C)]` struct: a header that says what
//! it is and a payload that the operation's declared request or reply type
//! fills. Both sides move messages through a partition's IPC page as plain
//! bytes; zerocopy turns bytes into types and back with no `unsafe` and no
//! way to fail other than a length check. Every size is pinned by a
//! compile-time assertion, so the core and a service built at different times
//! agree byte for byte or do not build.

use crate::{ABI_VERSION, Error};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Bytes of payload a message carries.
pub const PAYLOAD_SIZE: usize = 232;
/// Bytes of a whole message.
pub const MESSAGE_SIZE: usize = 256;
/// Payload bytes a host hypercall can carry in (x1..x6).
pub const HOST_REQUEST_BYTES: usize = 48;
/// Payload bytes a reply can carry back to the host (x1..x7).
pub const HOST_REPLY_BYTES: usize = 56;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// A request for an operation; answered by a `Reply`.
    Call = 1,
    /// The answer to a `Call`.
    Reply = 2,
}

impl Kind {
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Call),
            2 => Some(Self::Reply),
            _ => None,
        }
    }
}

/// The fixed header of every message.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct MessageHeader {
    /// [`ABI_VERSION`] of the sender.
    pub abi_version: u32,
    /// A [`Kind`].
    pub kind: u16,
    /// The service the message is for (calls) or from (replies).
    pub service: u16,
    /// The operation number within the service's interface.
    pub operation: u16,
    pub reserved: u16,
    /// 0 on success, else an [`Error`] code (replies only).
    pub status: i32,
    /// Bytes of `payload` in use.
    pub payload_len: u32,
    /// Chosen by the caller, echoed by the reply.
    pub sequence: u32,
}

/// One message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Message {
    pub header: MessageHeader,
    pub payload: [u8; PAYLOAD_SIZE],
}

const _: () = assert!(size_of::<MessageHeader>() == 24);
const _: () = assert!(size_of::<Message>() == MESSAGE_SIZE);

impl Default for Message {
    fn default() -> Self {
        Self {
            header: MessageHeader::default(),
            payload: [0; PAYLOAD_SIZE],
        }
    }
}

/// Why a message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageError {
    /// The sender speaks another major ABI version.
    Version(u32),
    /// The kind is not the one expected (or not a kind at all).
    Kind(u16),
    /// A reply for another service, operation or sequence number.
    Mismatch,
    /// `payload_len` exceeds the payload, or the declared type's size.
    Length(u32),
    /// The status is not 0 nor a known error code.
    Status(i32),
    /// The operation is not in the service's interface.
    UnknownOperation(u16),
}

impl MessageError {
    /// The error code a caller receives for a refused message.
    pub const fn to_error(self) -> Error {
        match self {
            MessageError::UnknownOperation(_) => Error::NotSupported,
            MessageError::Version(_) => Error::VersionMismatch,
            _ => Error::InvalidParameters,
        }
    }
}

impl Message {
    /// A call to `operation` of `service` carrying `payload`'s bytes.
    pub fn call(
        service: u16,
        operation: u16,
        sequence: u32,
        payload: &[u8],
    ) -> Result<Self, MessageError> {
        let mut m = Message::default();
        if payload.len() > PAYLOAD_SIZE {
            return Err(MessageError::Length(payload.len() as u32));
        }
        m.payload[..payload.len()].copy_from_slice(payload);
        m.header = MessageHeader::call(service, operation, sequence, payload.len() as u32);
        Ok(m)
    }

    /// The reply to `call` with `status` and `payload`'s bytes.
    pub fn reply_to(call: &MessageHeader, status: Result<&[u8], Error>) -> Self {
        let mut m = Message::default();
        let (code, len) = match status {
            Ok(bytes) => {
                let n = bytes.len().min(PAYLOAD_SIZE);
                m.payload[..n].copy_from_slice(&bytes[..n]);
                (0, n)
            }
            Err(e) => (e.code() as i32, 0),
        };
        m.header = MessageHeader {
            abi_version: ABI_VERSION,
            kind: Kind::Reply as u16,
            service: call.service,
            operation: call.operation,
            reserved: 0,
            status: code,
            payload_len: len as u32,
            sequence: call.sequence,
        };
        m
    }

    /// The payload bytes in use (never longer than the payload).
    pub fn body(&self) -> &[u8] {
        let n = (self.header.payload_len as usize).min(PAYLOAD_SIZE);
        &self.payload[..n]
    }

    /// Checks a call as a service receives it.
    pub fn check_call(&self) -> Result<(), MessageError> {
        check_call_header(&self.header)
    }

    /// Checks a reply against the call it answers, as the core receives it.
    /// On success returns the service's verdict: its payload or its error.
    pub fn check_reply(&self, call: &MessageHeader) -> Result<Result<&[u8], Error>, MessageError> {
        match self.header.check_reply_to(call)? {
            Ok(()) => Ok(Ok(self.body())),
            Err(e) => Ok(Err(e)),
        }
    }
}

impl MessageHeader {
    /// The header of a call.
    pub const fn call(service: u16, operation: u16, sequence: u32, payload_len: u32) -> Self {
        Self {
            abi_version: ABI_VERSION,
            kind: Kind::Call as u16,
            service,
            operation,
            reserved: 0,
            status: 0,
            payload_len,
            sequence,
        }
    }

    /// The header of the reply to `call`: success with `payload_len` bytes, or an error.
    pub const fn reply_to(
        call: &MessageHeader,
        status: Result<(), Error>,
        payload_len: u32,
    ) -> Self {
        let (status, payload_len) = match status {
            Ok(()) => (0, payload_len),
            Err(e) => (e.code() as i32, 0),
        };
        Self {
            abi_version: ABI_VERSION,
            kind: Kind::Reply as u16,
            service: call.service,
            operation: call.operation,
            reserved: 0,
            status,
            payload_len,
            sequence: call.sequence,
        }
    }

    /// Checks a reply header against the call it answers: version, kind,
    /// service, operation, sequence, length and status. On success returns
    /// the service's verdict.
    pub fn check_reply_to(&self, call: &MessageHeader) -> Result<Result<(), Error>, MessageError> {
        check_version(self.abi_version)?;
        if self.kind != Kind::Reply as u16 {
            return Err(MessageError::Kind(self.kind));
        }
        if self.service != call.service
            || self.operation != call.operation
            || self.sequence != call.sequence
        {
            return Err(MessageError::Mismatch);
        }
        if self.payload_len as usize > PAYLOAD_SIZE {
            return Err(MessageError::Length(self.payload_len));
        }
        match self.status {
            0 => Ok(Ok(())),
            code => match Error::from_code(i64::from(code)) {
                Some(e) => Ok(Err(e)),
                None => Err(MessageError::Status(code)),
            },
        }
    }
}

/// Checks a call header as a service receives it.
pub fn check_call_header(h: &MessageHeader) -> Result<(), MessageError> {
    check_version(h.abi_version)?;
    if h.kind != Kind::Call as u16 {
        return Err(MessageError::Kind(h.kind));
    }
    if h.payload_len as usize > PAYLOAD_SIZE {
        return Err(MessageError::Length(h.payload_len));
    }
    Ok(())
}

fn check_version(v: u32) -> Result<(), MessageError> {
    if v >> 16 == ABI_VERSION >> 16 {
        Ok(())
    } else {
        Err(MessageError::Version(v))
    }
}

/// Decodes a request or reply of type `T` from a message body: the body
/// must be exactly `size_of::<T>()` bytes.
pub fn decode<T: FromBytes + KnownLayout + Immutable>(body: &[u8]) -> Result<T, MessageError> {
    T::read_from_bytes(body).map_err(|_| MessageError::Length(body.len() as u32))
}

/// Decodes a request of type `T`: the body holds `T` followed by nothing
/// but zeros (a host call always carries 48 bytes; arguments a request
/// type does not use must be zero, so no argument is ever silently ignored).
pub fn decode_request<T: FromBytes + KnownLayout + Immutable>(
    body: &[u8],
) -> Result<T, MessageError> {
    let (value, rest) =
        T::read_from_prefix(body).map_err(|_| MessageError::Length(body.len() as u32))?;
    if !all_zero(rest) {
        return Err(MessageError::Length(body.len() as u32));
    }
    Ok(value)
}

/// Whether every byte of `bytes` is zero. This runs on every call a service
/// receives, on targets where an unaligned word load is split into bytes:
/// the aligned middle is read as whole words (message bodies are
/// word-aligned in the IPC page), only the ragged ends byte by byte.
fn all_zero(bytes: &[u8]) -> bool {
    let head = bytes.as_ptr().align_offset(8).min(bytes.len());
    let (head, rest) = bytes.split_at(head);
    let (middle, tail) = rest.split_at(rest.len() - rest.len() % 8);
    let middle_zero = match <[u64]>::ref_from_bytes(middle) {
        Ok(words) => words.iter().all(|w| *w == 0),
        Err(_) => middle.iter().all(|b| *b == 0),
    };
    middle_zero && head.iter().all(|b| *b == 0) && tail.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_and_reply_round_trip() {
        let call = Message::call(3, 7, 42, &[1, 2, 3]).unwrap();
        assert!(call.check_call().is_ok());
        assert_eq!(call.body(), &[1, 2, 3]);
        let bytes = call.as_bytes().to_vec();
        let back = Message::read_from_bytes(&bytes).unwrap();
        assert_eq!(back, call);
        let reply = Message::reply_to(&call.header, Ok(&[9, 9]));
        assert_eq!(reply.check_reply(&call.header), Ok(Ok(&[9u8, 9][..])));
        let reply = Message::reply_to(&call.header, Err(Error::Denied));
        assert_eq!(reply.check_reply(&call.header), Ok(Err(Error::Denied)));
    }

    #[test]
    fn every_malformed_reply_is_refused() {
        let call = Message::call(3, 7, 42, &[]).unwrap();
        let good = Message::reply_to(&call.header, Ok(&[]));
        let mut m = good;
        m.header.kind = Kind::Call as u16;
        assert_eq!(m.check_reply(&call.header), Err(MessageError::Kind(1)));
        let mut m = good;
        m.header.kind = 77;
        assert_eq!(m.check_reply(&call.header), Err(MessageError::Kind(77)));
        for (field, value) in [(0, 4u32), (1, 8), (2, 43)] {
            let mut m = good;
            match field {
                0 => m.header.service = value as u16,
                1 => m.header.operation = value as u16,
                _ => m.header.sequence = value,
            }
            assert_eq!(m.check_reply(&call.header), Err(MessageError::Mismatch));
        }
        let mut m = good;
        m.header.payload_len = PAYLOAD_SIZE as u32 + 1;
        assert_eq!(m.check_reply(&call.header), Err(MessageError::Length(233)));
        let mut m = good;
        m.header.status = -1000;
        assert_eq!(
            m.check_reply(&call.header),
            Err(MessageError::Status(-1000))
        );
        let mut m = good;
        m.header.abi_version = 2 << 16;
        assert_eq!(
            m.check_reply(&call.header),
            Err(MessageError::Version(2 << 16))
        );
        // A newer minor version is compatible.
        let mut m = good;
        m.header.abi_version = ABI_VERSION | 5;
        assert!(m.check_reply(&call.header).is_ok());
    }

    #[test]
    fn request_padding_must_be_zero_wherever_the_body_lies() {
        // Every alignment and length, with a stray byte at every position.
        let mut buf = [0u64; 8];
        for start in 0..8 {
            for len in 8..40 {
                let bytes = &mut buf.as_mut_bytes()[start..start + len];
                bytes.fill(0);
                assert_eq!(decode_request::<u64>(bytes), Ok(0));
                for stray in 0..len {
                    bytes.fill(0);
                    bytes[stray] = 1;
                    let expected = if stray < 8 {
                        Ok(1u64 << (8 * stray))
                    } else {
                        Err(MessageError::Length(len as u32))
                    };
                    assert_eq!(
                        decode_request::<u64>(bytes),
                        expected,
                        "start {start} len {len} stray {stray}"
                    );
                }
            }
        }
    }

    #[test]
    fn oversized_payloads_and_decoding() {
        assert_eq!(
            Message::call(1, 1, 1, &[0; PAYLOAD_SIZE + 1]),
            Err(MessageError::Length(233))
        );
        let v: Result<u64, _> = decode(&[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(v, Ok(1));
        let v: Result<u64, _> = decode(&[1, 0, 0]);
        assert_eq!(v, Err(MessageError::Length(3)));
        // Garbage bytes always decode to a message (every bit pattern is valid)
        // and the checks, not the decoder, refuse them.
        let m = Message::read_from_bytes(&[0xa5; MESSAGE_SIZE]).unwrap();
        assert!(m.check_call().is_err());
    }
}

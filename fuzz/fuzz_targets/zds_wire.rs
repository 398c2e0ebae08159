//! ZDS wire decoding: any datagram a ZDS peer can send (up to the
//! 1,024-byte limit `recv` enforces) decodes to a message or to an error
//! saying it is malformed, never a panic; and a message that decodes
//! encodes back to bytes that decode to the same message.

#![no_main]

use ambridge::publish::zds::wire::{self, Ack, MAX_DATAGRAM, Request, WireError};
use libfuzzer_sys::fuzz_target;

/// The decoders judge bytes only: an error from them is about the bytes,
/// never about sizes, fds or system calls, which `recv` checks before.
fn is_about_the_bytes(err: &WireError) -> bool {
    // Display must not panic either: it is what the daemon logs.
    let _ = err.to_string();
    matches!(
        err,
        WireError::Malformed { .. }
            | WireError::NoPayload { .. }
            | WireError::UnsupportedVersion(_)
    )
}

fuzz_target!(|datagram: &[u8]| {
    if datagram.len() > MAX_DATAGRAM {
        return;
    }
    match Request::decode(datagram) {
        Ok(request) => {
            let encoded = request.encode();
            let again = Request::decode(&encoded).expect("an encoded request decodes");
            assert_eq!(again, request, "request round trip through {encoded:02x?}");
            assert_eq!(again.encode(), encoded, "the encoding is canonical");
        }
        Err(err) => assert!(is_about_the_bytes(&err), "{err:?}"),
    }
    match wire::decode_ack(datagram) {
        Ok(ack) => {
            let encoded = ack.encode();
            let again = wire::decode_ack(&encoded).expect("an encoded ack decodes");
            assert_eq!(again, ack, "ack round trip through {encoded:02x?}");
            if let Ack::Nack(error) = &ack {
                assert!(!error.is_empty(), "a NACK always says why");
            }
        }
        Err(err) => assert!(is_about_the_bytes(&err), "{err:?}"),
    }
    match wire::decode_hello(datagram) {
        Ok(version) => assert_eq!(
            wire::decode_hello(&wire::encode_hello()).ok(),
            Some(version)
        ),
        Err(err) => assert!(is_about_the_bytes(&err), "{err:?}"),
    }
});

//! Fuzzes the envelope decoder: any bytes give a message that passes every model rule and
//! re-encodes to a frame that decodes to the same message, or a typed error — never a panic.
//!
//! `cargo +nightly fuzz run envelope` (from the repository root).
#![no_main]

use cellplane_api::model::Validate;
use cellplane_api::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = wire::decode(data) {
        assert!(message.validate().is_ok(), "decode let an invalid message through");
        let again = wire::encode(&message).expect("a decoded message re-encodes");
        assert_eq!(wire::decode(&again).as_ref(), Ok(&message), "round trip changed the message");
    }
});

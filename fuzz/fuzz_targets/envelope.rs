//! What the dispatcher does with a payload before it trusts anything in it: the strict envelope
//! decode, then signature verification. Any input must decode or be refused without a panic, and
//! an envelope that decodes must survive encode → decode unchanged.
#![no_main]

use fleet_schemas::{SignedJob, VerifyingKey, decode, encode};
use libfuzzer_sys::fuzz_target;

/// The dispatcher's default envelope limit.
const MAX: usize = 1 << 20;
/// RFC 8032 test 1, the key of the committed test vectors (the seed envelope verifies with it).
const PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = decode::<SignedJob>(data, MAX) else {
        return;
    };
    let again: SignedJob = decode(&encode(&envelope).expect("encodes"), MAX).expect("re-decodes");
    assert_eq!(again, envelope);
    let key = VerifyingKey::from_hex(PUBLIC).expect("valid key");
    let _ = key.verify(&envelope);
});

//! Arbitrary bytes into the envelope decoder: must never panic, and anything it
//! accepts (which needs a valid signature) must re-encode to the same bytes, since
//! only the canonical encoding decodes.
#![no_main]

use agentmesh_protocols::{Envelope, MAX_ENVELOPE_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data, MAX_ENVELOPE_SIZE) {
        let again = env.encode().expect("a decoded envelope re-encodes");
        assert_eq!(again, data, "only the canonical encoding decodes");
        let back = Envelope::decode(&again, MAX_ENVELOPE_SIZE).expect("and decodes again");
        assert_eq!(back, env);
    }
});

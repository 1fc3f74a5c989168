//! Arbitrary bytes into the safetensors model/update decoder: it must never
//! panic, and anything it accepts must re-encode and decode to the same thing.
#![no_main]

use agentmesh_federated::{decode_params, encode_params};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((arch, params, content)) = decode_params(data) {
        assert!(params.iter().all(|v| v.is_finite()));
        let again = encode_params(&arch, &params, content).expect("a decoded model re-encodes");
        let back = decode_params(&again).expect("and decodes again");
        assert_eq!(back, (arch, params, content));
    }
});

//! Arbitrary text into the join-token parser and verifier: must never panic, and
//! no token it accepts verifies against a key that did not sign it.
#![no_main]

use agentmesh_consensus::JoinToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(token) = JoinToken::parse(text) {
        // The all-zero key is a valid curve point only as the identity; nothing
        // an attacker writes should verify against it.
        assert!(token.verify(&[0u8; 32], &token.body.cluster_id, 0).is_err());
    }
});

//! Per-peer sealing: private data (model updates) encrypted end to end from one member to the
//! members that may read it, so that a node holding, serving or forwarding a copy can neither
//! read nor alter it.
//!
//! Every member has a static X25519 key whose public half it publishes, signed with its
//! identity key, in the replicated registry. Two members derive a key for each direction from
//! their X25519 shared secret through HKDF-SHA256, bound to both peer ids and both public keys.
//! A sealed message is encrypted once with a random data key (XChaCha20-Poly1305), and the data
//! key is wrapped for each recipient under the sender→recipient pair key, as in `age` or HPKE's
//! multi-recipient mode. The caller's context (for an update: job, round, base model, author)
//! is authenticated with every ciphertext: a sealed message replayed into another context does
//! not open.
//!
//! Layout: [`MAGIC`], a big-endian `u32` header length, the CBOR [`Header`], the body
//! ciphertext. The header is decoded with [`MAX_HEADER_SIZE`]; nothing in it is trusted
//! before the wrapped key it names opens.

use chacha20poly1305::{
    aead::{Aead, Payload},
    KeyInit, XChaCha20Poly1305, XNonce,
};
use hkdf::Hkdf;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// The first bytes of every sealed message.
pub const MAGIC: &[u8; 8] = b"AMSEAL1\0";
/// Largest header accepted, in bytes.
pub const MAX_HEADER_SIZE: usize = 64 * 1024;
/// Most recipients one message may be sealed for.
pub const MAX_RECIPIENTS: usize = 64;
/// Bytes of a key id.
pub const KEY_ID_LEN: usize = 8;
/// Bytes the header and tags add to a message sealed for `recipients` members with peer ids
/// of at most 64 bytes (an upper bound, for size limits).
pub fn overhead(recipients: usize) -> usize {
    MAGIC.len() + 4 + 256 + recipients * 192 + 16
}

const HKDF_SALT: &[u8] = b"agentmesh/seal/v1";
const KEY_ID_DOMAIN: &[u8] = b"agentmesh/seal-key-id/v1\0";
const BODY_DOMAIN: &[u8] = b"agentmesh/seal/body/v1\0";
const WRAP_DOMAIN: &[u8] = b"agentmesh/seal/wrap/v1\0";
const NONCE_LEN: usize = 24;
const DATA_KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// Why a message could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The bytes do not start with [`MAGIC`].
    #[error("not a sealed message")]
    NotSealed,
    /// The header does not decode, or its fields have the wrong sizes.
    #[error("malformed sealed message: {0}")]
    Malformed(String),
    /// No wrapped key is for this peer under a key it still holds.
    #[error("not sealed for this node (or for a key it no longer holds)")]
    NotForUs,
    /// The sender's key is not one the registry lists for it.
    #[error("sealed with a key its sender does not publish")]
    UnknownSenderKey,
    /// A ciphertext failed authentication: altered, or opened in the wrong context.
    #[error("the sealed message does not open: it was altered, or replayed into another context")]
    Tampered,
    /// A public key is a low-order point: no secret would be shared.
    #[error("a public key is unusable (low order)")]
    WeakKey,
    /// Too many recipients.
    #[error("{0} recipients; at most {MAX_RECIPIENTS}")]
    TooManyRecipients(usize),
}

/// The id of a public key: the first bytes of its domain-separated SHA-256.
pub fn key_id(public: &[u8; 32]) -> [u8; KEY_ID_LEN] {
    let d = Sha256::new()
        .chain_update(KEY_ID_DOMAIN)
        .chain_update(public)
        .finalize();
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&d[..KEY_ID_LEN]);
    id
}

/// Whether a public key can share a secret: a low-order point gives the all-zero output
/// whatever the (clamped) scalar, so no secret at all.
pub fn is_usable_public(public: &[u8; 32]) -> bool {
    x25519_dalek::x25519([1; 32], *public) != [0; 32]
}

/// A member's static X25519 secret.
#[derive(Clone)]
pub struct SealSecret(StaticSecret);

impl SealSecret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(bytes.as_mut());
        Self(StaticSecret::from(*bytes))
    }

    /// The secret from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(StaticSecret::from(bytes))
    }

    /// The secret's bytes (for the key file).
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public half.
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.0).to_bytes()
    }

    /// The id of the public half.
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        key_id(&self.public())
    }
}

impl std::fmt::Debug for SealSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealSecret({})", hex::encode(self.id()))
    }
}

/// A member a message is sealed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// Its peer id, as text.
    pub peer: String,
    /// Its published X25519 public key.
    pub public: [u8; 32],
}

/// The key for messages from `sender` to `recipient`: HKDF-SHA256 over their X25519 shared
/// secret, bound to both peer ids and both public keys, in that order (each direction has its
/// own key).
fn pair_key(
    secret: &StaticSecret,
    their_public: &[u8; 32],
    sender: (&str, &[u8; 32]),
    recipient: (&str, &[u8; 32]),
) -> Result<Zeroizing<[u8; 32]>, SealError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*their_public));
    if !shared.was_contributory() {
        return Err(SealError::WeakKey);
    }
    let mut info = Vec::with_capacity(160);
    for (peer, public) in [sender, recipient] {
        info.extend_from_slice(&(peer.len() as u32).to_be_bytes());
        info.extend_from_slice(peer.as_bytes());
        info.extend_from_slice(public);
    }
    let mut key = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(HKDF_SALT), shared.as_bytes())
        .expand(&info, key.as_mut())
        .map_err(|_| SealError::Malformed("hkdf output length".into()))?;
    Ok(key)
}

/// One recipient's copy of the data key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Wrapped {
    peer: String,
    key: ByteBuf,
    nonce: ByteBuf,
    data_key: ByteBuf,
}

/// What precedes the body ciphertext.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    v: u8,
    sender: String,
    sender_key: ByteBuf,
    nonce: ByteBuf,
    recipients: Vec<Wrapped>,
}

/// Who a sealed message says it is from and for, read without opening it (nothing here is
/// authenticated until [`open`] succeeds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedInfo {
    /// The sender's peer id.
    pub sender: String,
    /// The id of the sender's key.
    pub sender_key: [u8; KEY_ID_LEN],
    /// The recipients' peer ids.
    pub recipients: Vec<String>,
}

/// The body is authenticated with the context and the whole header (sender, every
/// recipient's entry, nonces): nothing in the message can change without the body failing.
fn body_aad(context: &[u8], head: &[u8]) -> Vec<u8> {
    let mut aad = BODY_DOMAIN.to_vec();
    aad.extend_from_slice(&(context.len() as u32).to_be_bytes());
    aad.extend_from_slice(context);
    aad.extend_from_slice(&Sha256::digest(head));
    aad
}

/// Digest of the recipient list (peer ids and key ids, in order), bound into every wrapped key.
fn recipients_digest<'a>(list: impl Iterator<Item = (&'a str, &'a [u8])>) -> [u8; 32] {
    let mut h = Sha256::new();
    for (peer, key) in list {
        h.update((peer.len() as u32).to_be_bytes());
        h.update(peer.as_bytes());
        h.update(key);
    }
    h.finalize().into()
}

/// A recipient's wrapped data key is bound to the context, both parties and their keys, the
/// body's nonce and the recipient list.
fn wrap_aad(
    context: &[u8],
    sender: (&str, &[u8]),
    recipient: (&str, &[u8]),
    body_nonce: &[u8],
    recipients: &[u8; 32],
) -> Vec<u8> {
    let mut aad = WRAP_DOMAIN.to_vec();
    for part in [
        context,
        sender.0.as_bytes(),
        sender.1,
        recipient.0.as_bytes(),
        recipient.1,
        body_nonce,
        recipients.as_slice(),
    ] {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

/// Seals `plaintext` from `sender` (its peer id and secret) for `recipients`, bound to
/// `context`.
pub fn seal(
    plaintext: &[u8],
    context: &[u8],
    sender: (&str, &SealSecret),
    recipients: &[Recipient],
) -> Result<Vec<u8>, SealError> {
    if recipients.len() > MAX_RECIPIENTS {
        return Err(SealError::TooManyRecipients(recipients.len()));
    }
    let (sender_peer, secret) = sender;
    let sender_public = secret.public();
    let sender_key = key_id(&sender_public);
    let data_key = Zeroizing::new(random::<DATA_KEY_LEN>());
    let body_nonce = random::<NONCE_LEN>();
    let keys: Vec<[u8; KEY_ID_LEN]> = recipients.iter().map(|r| key_id(&r.public)).collect();
    let list = recipients_digest(
        recipients
            .iter()
            .zip(&keys)
            .map(|(r, k)| (r.peer.as_str(), k.as_slice())),
    );
    let mut wrapped = Vec::with_capacity(recipients.len());
    for (r, recipient_key) in recipients.iter().zip(&keys) {
        let key = pair_key(
            &secret.0,
            &r.public,
            (sender_peer, &sender_public),
            (&r.peer, &r.public),
        )?;
        let nonce = random::<NONCE_LEN>();
        let data_key = XChaCha20Poly1305::new(key.as_ref().into())
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: data_key.as_ref(),
                    aad: &wrap_aad(
                        context,
                        (sender_peer, &sender_key),
                        (&r.peer, recipient_key),
                        &body_nonce,
                        &list,
                    ),
                },
            )
            .map_err(|_| SealError::Malformed("wrapping the data key".into()))?;
        wrapped.push(Wrapped {
            peer: r.peer.clone(),
            key: ByteBuf::from(recipient_key.to_vec()),
            nonce: ByteBuf::from(nonce.to_vec()),
            data_key: ByteBuf::from(data_key),
        });
    }
    let header = Header {
        v: 1,
        sender: sender_peer.to_string(),
        sender_key: ByteBuf::from(sender_key.to_vec()),
        nonce: ByteBuf::from(body_nonce.to_vec()),
        recipients: wrapped,
    };
    let mut head = Vec::new();
    ciborium::into_writer(&header, &mut head)
        .map_err(|e| SealError::Malformed(format!("encoding the header: {e}")))?;
    let body = XChaCha20Poly1305::new(data_key.as_ref().into())
        .encrypt(
            XNonce::from_slice(&body_nonce),
            Payload {
                msg: plaintext,
                aad: &body_aad(context, &head),
            },
        )
        .map_err(|_| SealError::Malformed("plaintext too large".into()))?;
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + head.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Whether `bytes` look like a sealed message (they start with [`MAGIC`]).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Splits a sealed message into its checked header and the body ciphertext.
fn split(bytes: &[u8]) -> Result<(Header, &[u8], &[u8]), SealError> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(SealError::NotSealed)?;
    let (len, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| SealError::Malformed("truncated header length".into()))?;
    let len = u32::from_be_bytes(*len) as usize;
    if len > MAX_HEADER_SIZE {
        return Err(SealError::Malformed(format!(
            "header of {len} bytes exceeds {MAX_HEADER_SIZE}"
        )));
    }
    if rest.len() < len + TAG_LEN {
        return Err(SealError::Malformed("truncated message".into()));
    }
    let (head, body) = rest.split_at(len);
    let header: Header =
        ciborium::from_reader(head).map_err(|e| SealError::Malformed(format!("header: {e}")))?;
    // Only the encoding `seal` writes is accepted: no two byte strings mean the same message.
    let mut canonical = Vec::with_capacity(head.len());
    ciborium::into_writer(&header, &mut canonical)
        .map_err(|e| SealError::Malformed(format!("header: {e}")))?;
    if canonical != head {
        return Err(SealError::Malformed(
            "header is not in canonical form".into(),
        ));
    }
    let bad = |what: &str| SealError::Malformed(format!("{what} has the wrong length"));
    if header.v != 1 {
        return Err(SealError::Malformed(format!("version {}", header.v)));
    }
    if header.sender_key.len() != KEY_ID_LEN {
        return Err(bad("the sender's key id"));
    }
    if header.nonce.len() != NONCE_LEN {
        return Err(bad("the nonce"));
    }
    if header.recipients.len() > MAX_RECIPIENTS {
        return Err(SealError::TooManyRecipients(header.recipients.len()));
    }
    for w in &header.recipients {
        if w.key.len() != KEY_ID_LEN {
            return Err(bad("a recipient's key id"));
        }
        if w.nonce.len() != NONCE_LEN {
            return Err(bad("a recipient's nonce"));
        }
        if w.data_key.len() != DATA_KEY_LEN + TAG_LEN {
            return Err(bad("a wrapped key"));
        }
    }
    Ok((header, head, body))
}

/// Reads who a sealed message claims to be from and for, without opening it.
pub fn inspect(bytes: &[u8]) -> Result<SealedInfo, SealError> {
    let (h, _, _) = split(bytes)?;
    let mut sender_key = [0u8; KEY_ID_LEN];
    sender_key.copy_from_slice(&h.sender_key);
    Ok(SealedInfo {
        sender: h.sender,
        sender_key,
        recipients: h.recipients.into_iter().map(|w| w.peer).collect(),
    })
}

/// Opens a message sealed for `me` (its peer id and every secret it still holds, newest
/// first) by `sender`, whose published public keys are `sender_keys`, in `context`.
pub fn open(
    bytes: &[u8],
    context: &[u8],
    me: (&str, &[SealSecret]),
    sender: (&str, &[[u8; 32]]),
) -> Result<Vec<u8>, SealError> {
    let (header, head, body) = split(bytes)?;
    let (my_peer, secrets) = me;
    let (sender_peer, sender_keys) = sender;
    if header.sender != sender_peer {
        return Err(SealError::UnknownSenderKey);
    }
    let sender_public = sender_keys
        .iter()
        .find(|k| key_id(k).as_slice() == header.sender_key.as_slice())
        .ok_or(SealError::UnknownSenderKey)?;
    let (wrapped, secret) = header
        .recipients
        .iter()
        .filter(|w| w.peer == my_peer)
        .find_map(|w| {
            secrets
                .iter()
                .find(|s| s.id().as_slice() == w.key.as_slice())
                .map(|s| (w, s))
        })
        .ok_or(SealError::NotForUs)?;
    let my_public = secret.public();
    let key = pair_key(
        &secret.0,
        sender_public,
        (sender_peer, sender_public),
        (my_peer, &my_public),
    )?;
    let list = recipients_digest(
        header
            .recipients
            .iter()
            .map(|w| (w.peer.as_str(), w.key.as_slice())),
    );
    let data_key = Zeroizing::new(
        XChaCha20Poly1305::new(key.as_ref().into())
            .decrypt(
                XNonce::from_slice(&wrapped.nonce),
                Payload {
                    msg: &wrapped.data_key,
                    aad: &wrap_aad(
                        context,
                        (sender_peer, &header.sender_key),
                        (my_peer, &wrapped.key),
                        &header.nonce,
                        &list,
                    ),
                },
            )
            .map_err(|_| SealError::Tampered)?,
    );
    if data_key.len() != DATA_KEY_LEN {
        return Err(SealError::Tampered);
    }
    XChaCha20Poly1305::new_from_slice(&data_key)
        .map_err(|_| SealError::Tampered)?
        .decrypt(
            XNonce::from_slice(&header.nonce),
            Payload {
                msg: body,
                aad: &body_aad(context, head),
            },
        )
        .map_err(|_| SealError::Tampered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Member {
        peer: String,
        secret: SealSecret,
    }

    fn member(name: &str) -> Member {
        Member {
            peer: format!("12D3Koo{name}"),
            secret: SealSecret::generate(),
        }
    }

    fn to(m: &Member) -> Recipient {
        Recipient {
            peer: m.peer.clone(),
            public: m.secret.public(),
        }
    }

    fn open_as(
        m: &Member,
        sender: &Member,
        bytes: &[u8],
        ctx: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        open(
            bytes,
            ctx,
            (&m.peer, std::slice::from_ref(&m.secret)),
            (&sender.peer, &[sender.secret.public()]),
        )
    }

    #[test]
    fn every_recipient_opens_and_no_one_else() {
        let (a, b, c, d) = (member("a"), member("b"), member("c"), member("d"));
        let sealed = seal(
            b"weights",
            b"job/1",
            (&a.peer, &a.secret),
            &[to(&b), to(&c)],
        )
        .expect("seal");
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(7).any(|w| w == b"weights"));
        assert_eq!(open_as(&b, &a, &sealed, b"job/1").expect("b"), b"weights");
        assert_eq!(open_as(&c, &a, &sealed, b"job/1").expect("c"), b"weights");
        assert_eq!(open_as(&d, &a, &sealed, b"job/1"), Err(SealError::NotForUs));
        // A member that claims d's peer id in the list still lacks d's secret.
        let info = inspect(&sealed).expect("inspect");
        assert_eq!(info.recipients, vec![b.peer.clone(), c.peer.clone()]);
        assert_eq!(info.sender, a.peer);
    }

    #[test]
    fn a_replay_into_another_context_does_not_open() {
        let (a, b) = (member("a"), member("b"));
        let sealed = seal(b"round 3", b"job/3", (&a.peer, &a.secret), &[to(&b)]).expect("seal");
        assert_eq!(open_as(&b, &a, &sealed, b"job/4"), Err(SealError::Tampered));
    }

    #[test]
    fn a_message_is_bound_to_its_sender() {
        let (a, b, m) = (member("a"), member("b"), member("m"));
        let sealed = seal(b"x", b"ctx", (&a.peer, &a.secret), &[to(&b)]).expect("seal");
        // Opened as if from m, with m's key: the sender's key is not m's.
        assert_eq!(
            open_as(&b, &m, &sealed, b"ctx"),
            Err(SealError::UnknownSenderKey)
        );
        // m claiming a's peer id but publishing its own key: the key id does not match.
        let forged = open(
            &sealed,
            b"ctx",
            (&b.peer, std::slice::from_ref(&b.secret)),
            (&a.peer, &[m.secret.public()]),
        );
        assert_eq!(forged, Err(SealError::UnknownSenderKey));
    }

    #[test]
    fn an_older_secret_still_opens_what_was_sealed_for_it() {
        let (a, b) = (member("a"), member("b"));
        let sealed = seal(b"before", b"ctx", (&a.peer, &a.secret), &[to(&b)]).expect("seal");
        let rotated = SealSecret::generate();
        let held = [rotated, b.secret.clone()];
        let out = open(
            &sealed,
            b"ctx",
            (&b.peer, &held),
            (&a.peer, &[a.secret.public()]),
        )
        .expect("open with the older secret");
        assert_eq!(out, b"before");
        // Without the old secret it is gone.
        let only_new = [held[0].clone()];
        assert_eq!(
            open(
                &sealed,
                b"ctx",
                (&b.peer, &only_new),
                (&a.peer, &[a.secret.public()])
            ),
            Err(SealError::NotForUs)
        );
    }

    #[test]
    fn the_recipient_list_is_bound() {
        let (a, b, c) = (member("a"), member("b"), member("c"));
        let sealed = seal(b"x", b"ctx", (&a.peer, &a.secret), &[to(&b), to(&c)]).expect("seal");
        // Drop c's entry and write the header back in canonical form: b must not open it.
        let (mut header, head, body) = split(&sealed).expect("split");
        header.recipients.retain(|w| w.peer == b.peer);
        let mut new_head = Vec::new();
        ciborium::into_writer(&header, &mut new_head).expect("encode");
        assert_ne!(new_head, head);
        let mut forged = MAGIC.to_vec();
        forged.extend_from_slice(&(new_head.len() as u32).to_be_bytes());
        forged.extend_from_slice(&new_head);
        forged.extend_from_slice(body);
        assert_eq!(open_as(&b, &a, &forged, b"ctx"), Err(SealError::Tampered));
        assert_eq!(open_as(&b, &a, &sealed, b"ctx").expect("b"), b"x");
    }

    #[test]
    fn a_low_order_public_key_is_refused() {
        assert!(!is_usable_public(&[0; 32]));
        assert!(is_usable_public(&SealSecret::generate().public()));
        let a = member("a");
        let r = Recipient {
            peer: "zero".into(),
            public: [0u8; 32],
        };
        assert_eq!(
            seal(b"x", b"c", (&a.peer, &a.secret), &[r]),
            Err(SealError::WeakKey)
        );
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert_eq!(inspect(b"plain"), Err(SealError::NotSealed));
        let mut long = MAGIC.to_vec();
        long.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(inspect(&long), Err(SealError::Malformed(_))));
        let mut short = MAGIC.to_vec();
        short.extend_from_slice(&3u32.to_be_bytes());
        short.extend_from_slice(&[0xa0; 40]);
        assert!(matches!(inspect(&short), Err(SealError::Malformed(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trips(plain in proptest::collection::vec(any::<u8>(), 0..2048),
                       ctx in proptest::collection::vec(any::<u8>(), 0..64)) {
            let (a, b) = (member("a"), member("b"));
            let sealed = seal(&plain, &ctx, (&a.peer, &a.secret), &[to(&b)]).expect("seal");
            prop_assert_eq!(open_as(&b, &a, &sealed, &ctx).expect("open"), plain);
        }

        #[test]
        fn any_altered_byte_is_refused(plain in proptest::collection::vec(any::<u8>(), 1..512),
                                       at in any::<prop::sample::Index>(),
                                       flip in 1u8..=255) {
            // Two recipients: altering the other's entry must not go unnoticed either.
            let (a, b, c) = (member("a"), member("b"), member("c"));
            let mut sealed =
                seal(&plain, b"ctx", (&a.peer, &a.secret), &[to(&c), to(&b)]).expect("seal");
            let i = at.index(sealed.len());
            sealed[i] ^= flip;
            prop_assert!(open_as(&b, &a, &sealed, b"ctx").is_err(), "byte {} altered, b opened", i);
            prop_assert!(open_as(&c, &a, &sealed, b"ctx").is_err(), "byte {} altered, c opened", i);
        }
    }
}

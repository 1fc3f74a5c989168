//! The node's Ed25519 identity, kept in its data directory.

use libp2p::identity::Keypair;
use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

/// File name of the identity key inside the data dir.
pub const IDENTITY_FILE: &str = "identity.key";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file exists but is not a valid Ed25519 key.
    #[error(
        "identity key file {path} is corrupted ({reason}); refusing to start with a new \
         identity. Restore the file from a backup, or delete it to start as a new peer \
         (a new peer id)"
    )]
    Corrupted {
        /// Key file.
        path: PathBuf,
        /// Decoder message.
        reason: String,
    },
    /// File system failure.
    #[error("identity key file {path}: {source}")]
    Io {
        /// Key file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// Loads the identity from `data_dir`, creating one (mode 0600) if none exists.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match fs::read(&path) {
        Ok(bytes) => {
            let key =
                Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Corrupted {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if key.clone().try_into_ed25519().is_err() {
                return Err(IdentityError::Corrupted {
                    path,
                    reason: "not an Ed25519 key".into(),
                });
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| io(std::io::Error::other(e.to_string())))?;
            write_private(&path, &bytes).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Writes a secret durably: temp file with 0600, fsync, rename, fsync the dir.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn same_dir_same_peer_id_and_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = fs::metadata(dir.path().join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn corrupted_key_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        fs::write(dir.path().join(IDENTITY_FILE), b"garbage").unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupted { .. }), "{err}");
        assert_eq!(
            fs::read(dir.path().join(IDENTITY_FILE)).unwrap(),
            b"garbage"
        );
    }
}

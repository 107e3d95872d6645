//! Signing a Release with an OpenPGP secret key file (Sequoia): the
//! cleartext-signed InRelease and the detached Release.gpg.
//!
//! The key is checked under Sequoia's `StandardPolicy` before anything is
//! published, with the same policy the agent verifies with (RFC 9580 plus
//! current practice: no SHA-1 bindings, not expired, not revoked, a key
//! with the signing capability). A key that cannot sign is refused with the
//! reason, instead of producing a Release no node would accept.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use openpgp::cert::{Cert, CertParser};
use openpgp::packet::key::{SecretParts, UnspecifiedRole};
use openpgp::packet::{Key, signature::SignatureBuilder};
use openpgp::parse::Parse;
use openpgp::policy::StandardPolicy;
use openpgp::serialize::SerializeInto;
use openpgp::serialize::stream::{Armorer, Message, Signer};
use openpgp::types::{RevocationStatus, SignatureType};
use sequoia_openpgp as openpgp;

use crate::error::PublishError;

/// A secret signing key that may sign now.
pub struct SigningKey {
    path: PathBuf,
    cert: Cert,
    key: Key<SecretParts, UnspecifiedRole>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("SigningKey")
            .field("path", &self.path)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl SigningKey {
    /// Loads the one certificate in `path` (armored or binary, as `gpg
    /// --export-secret-keys` writes it) and picks its signing key.
    pub fn load(path: &Path) -> Result<SigningKey, PublishError> {
        let bytes = std::fs::read(path).map_err(|source| PublishError::ReadSigningKey {
            path: path.to_path_buf(),
            source,
        })?;
        let refuse = |reason: String| PublishError::SigningKey {
            path: path.to_path_buf(),
            reason,
        };
        let certs = CertParser::from_bytes(&bytes)
            .map_err(|e| refuse(format!("not an OpenPGP key file: {e}")))?
            .collect::<Result<Vec<Cert>, _>>()
            .map_err(|e| refuse(format!("not an OpenPGP key file: {e}")))?;
        let cert = match certs.len() {
            1 => certs
                .into_iter()
                .next()
                .ok_or_else(|| refuse("no key".into()))?,
            0 => return Err(refuse("the file holds no key".into())),
            n => return Err(refuse(format!("the file holds {n} keys; give exactly one"))),
        };
        let fingerprint = cert.fingerprint().to_hex();
        if !cert.is_tsk() {
            return Err(refuse(format!(
                "{fingerprint} has no secret key material (a public key?)"
            )));
        }
        let policy = StandardPolicy::new();
        let now = SystemTime::now();
        let valid = cert.with_policy(&policy, now).map_err(|e| {
            refuse(format!(
                "{fingerprint} is not valid under the standard policy: {e}"
            ))
        })?;
        valid
            .alive()
            .map_err(|e| refuse(format!("{fingerprint} is not alive: {e}")))?;
        if let RevocationStatus::Revoked(_) = valid.revocation_status() {
            return Err(refuse(format!("{fingerprint} is revoked")));
        }
        let signing: Vec<_> = valid
            .keys()
            .supported()
            .alive()
            .revoked(false)
            .for_signing()
            .collect();
        if signing.is_empty() {
            return Err(refuse(format!(
                "{fingerprint} has no key with the signing capability that is alive and not revoked"
            )));
        }
        let Some(secret) = signing
            .iter()
            .find_map(|ka| ka.key().clone().parts_into_secret().ok())
        else {
            return Err(refuse(format!(
                "{fingerprint}: the secret part of its signing key is not in the file"
            )));
        };
        if !secret.has_unencrypted_secret() {
            return Err(refuse(format!(
                "{fingerprint}: the secret signing key is protected by a passphrase; \
                 export it without one for the publisher (gpg --export-secret-keys after \
                 gpg --passwd with an empty passphrase), and keep that file in a secret store"
            )));
        }
        let key = secret.role_into_unspecified();
        Ok(SigningKey {
            path: path.to_path_buf(),
            cert,
            key,
        })
    }

    /// Hex fingerprint of the certificate (what `signed-by` pins).
    pub fn fingerprint(&self) -> String {
        self.cert.fingerprint().to_hex()
    }

    /// The public certificate, armored: what a node's keyring holds.
    pub fn public_armored(&self) -> Result<Vec<u8>, PublishError> {
        self.cert.armored().to_vec().map_err(|e| self.sign_error(e))
    }

    fn sign_error(&self, e: impl std::fmt::Display) -> PublishError {
        PublishError::Sign {
            fingerprint: self.fingerprint(),
            reason: e.to_string(),
        }
    }

    fn signer<'a>(
        &self,
        message: Message<'a>,
        kind: SignatureType,
    ) -> Result<Signer<'a>, PublishError> {
        let keypair = self
            .key
            .clone()
            .into_keypair()
            .map_err(|e| self.sign_error(e))?;
        Signer::with_template(message, keypair, SignatureBuilder::new(kind))
            .map_err(|e| self.sign_error(e))
    }

    /// An InRelease: `text` cleartext-signed (RFC 9580 §7). The signed text
    /// is `text` without its final line break, as for `gpg --clearsign`.
    pub fn clearsign(&self, text: &str) -> Result<Vec<u8>, PublishError> {
        let mut sink = Vec::new();
        {
            let message = Message::new(&mut sink);
            let mut signer = self
                .signer(message, SignatureType::Text)?
                .cleartext()
                .build()
                .map_err(|e| self.sign_error(e))?;
            signer
                .write_all(text.strip_suffix('\n').unwrap_or(text).as_bytes())
                .map_err(|e| self.sign_error(e))?;
            signer.finalize().map_err(|e| self.sign_error(e))?;
        }
        Ok(sink)
    }

    /// A Release.gpg: an armored detached signature over `data` (binary
    /// signature, as gpg and dak make it).
    pub fn detach_sign(&self, data: &[u8]) -> Result<Vec<u8>, PublishError> {
        let mut sink = Vec::new();
        {
            let message = Message::new(&mut sink);
            let message = Armorer::new(message)
                .kind(openpgp::armor::Kind::Signature)
                .build()
                .map_err(|e| self.sign_error(e))?;
            let mut signer = self
                .signer(message, SignatureType::Binary)?
                .detached()
                .build()
                .map_err(|e| self.sign_error(e))?;
            signer.write_all(data).map_err(|e| self.sign_error(e))?;
            signer.finalize().map_err(|e| self.sign_error(e))?;
        }
        Ok(sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openpgp::cert::CertBuilder;
    use openpgp::serialize::Serialize;
    use std::time::Duration;

    fn key_file(cert: &Cert, secret: bool) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        if secret {
            cert.as_tsk().armored().serialize(&mut file).unwrap();
        } else {
            cert.armored().serialize(&mut file).unwrap();
        }
        file
    }

    fn keyring_file(key: &SigningKey) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&key.public_armored().unwrap()).unwrap();
        file
    }

    #[test]
    fn signatures_verify_with_the_agents_keyring() {
        let (cert, _) = CertBuilder::new()
            .add_userid("Repo <repo@acme.test>")
            .add_signing_subkey()
            .generate()
            .unwrap();
        let file = key_file(&cert, true);
        let key = SigningKey::load(file.path()).unwrap();
        let keyring_path = keyring_file(&key);
        let keyring = crate::keyring::Keyring::load(keyring_path.path()).unwrap();
        let text = "Suite: production\nDate: x\n- dashed\n";
        let inrelease = key.clearsign(text).unwrap();
        let verified = keyring
            .verify_cleartext("InRelease", &inrelease, SystemTime::now(), Duration::ZERO)
            .unwrap();
        assert_eq!(verified.text, text.trim_end());
        assert_eq!(verified.signer, key.fingerprint());
        let detached = key.detach_sign(text.as_bytes()).unwrap();
        let verified = keyring
            .verify_detached(
                "Release",
                text.as_bytes(),
                &detached,
                SystemTime::now(),
                Duration::ZERO,
            )
            .unwrap();
        assert_eq!(verified.text, text);
    }

    #[test]
    fn a_key_that_cannot_sign_is_refused() {
        let (cert, _) = CertBuilder::new()
            .add_userid("Repo <repo@acme.test>")
            .add_signing_subkey()
            .generate()
            .unwrap();
        let public = key_file(&cert, false);
        let err = SigningKey::load(public.path()).unwrap_err().to_string();
        assert!(err.contains("no secret key material"), "{err}");

        let (encrypt_only, _) = CertBuilder::new()
            .add_userid("Repo <repo@acme.test>")
            .set_primary_key_flags(openpgp::types::KeyFlags::empty().set_certification())
            .add_transport_encryption_subkey()
            .generate()
            .unwrap();
        let file = key_file(&encrypt_only, true);
        let err = SigningKey::load(file.path()).unwrap_err().to_string();
        assert!(err.contains("signing capability"), "{err}");

        let (locked, _) = CertBuilder::new()
            .add_userid("Repo <repo@acme.test>")
            .add_signing_subkey()
            .set_password(Some("secret".into()))
            .generate()
            .unwrap();
        let file = key_file(&locked, true);
        let err = SigningKey::load(file.path()).unwrap_err().to_string();
        assert!(err.contains("passphrase"), "{err}");

        let garbage = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(garbage.path(), b"not a key").unwrap();
        assert!(SigningKey::load(garbage.path()).is_err());
    }
}

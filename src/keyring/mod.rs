//! Pinned signing certificates and the signature policy.
//!
//! Only certificates in the configured keyring may sign a Release. Sequoia's
//! `StandardPolicy` decides what a valid signature is (RFC 9580 plus current
//! practice): SHA-1 signatures, revoked or expired keys and keys without
//! the signing capability are refused. One good signature by a pinned key is
//! enough; other signatures beside it (unknown keys, broken packets) do not
//! spoil it, as with apt/sqv.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use openpgp::cert::{Cert, CertParser};
use openpgp::parse::Parse;
use openpgp::parse::stream::{
    DetachedVerifierBuilder, MessageLayer, MessageStructure, VerificationError, VerificationHelper,
    VerifierBuilder,
};
use openpgp::policy::StandardPolicy;
use sequoia_openpgp as openpgp;

use crate::error::{KeyringError, VerifyError};
use crate::repo::csf;

/// The certificates allowed to sign Release files.
#[derive(Debug, Clone)]
pub struct Keyring {
    path: PathBuf,
    certs: Vec<Cert>,
}

/// Text that a pinned key has signed.
#[derive(Debug)]
pub struct Verified {
    pub text: String,
    /// Fingerprint of the key that made the good signature.
    pub signer: String,
    /// When the good signature says it was made.
    pub signed_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Keyring {
    /// Loads every certificate in `path` (armored or binary). Fails when the
    /// file holds none, holds secret key material, or holds no certificate
    /// that can sign now under the policy.
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        let bytes = std::fs::read(path).map_err(|source| KeyringError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut certs = Vec::new();
        let parser = CertParser::from_bytes(&bytes).map_err(|e| KeyringError::Parse {
            path: path.to_path_buf(),
            message: format!("{e:#}"),
        })?;
        for cert in parser {
            let cert = cert.map_err(|e| KeyringError::Parse {
                path: path.to_path_buf(),
                message: format!("{e:#}"),
            })?;
            certs.push(cert);
        }
        if certs.is_empty() {
            return Err(KeyringError::Empty {
                path: path.to_path_buf(),
            });
        }
        refuse_secret_keys(path, &certs)?;
        let keyring = Keyring {
            path: path.to_path_buf(),
            certs,
        };
        if keyring.signing_fingerprints(SystemTime::now()).is_empty() {
            let details = keyring
                .certs
                .iter()
                .map(|c| format!("{}: {}", c.fingerprint(), cert_problem(c)))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(KeyringError::NoSigningKey {
                path: path.to_path_buf(),
                details,
            });
        }
        Ok(keyring)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fingerprints of the certificates that hold a key able to sign at `now`.
    pub fn signing_fingerprints(&self, now: SystemTime) -> Vec<String> {
        let policy = StandardPolicy::new();
        self.certs
            .iter()
            .filter(|cert| {
                cert.keys()
                    .with_policy(&policy, now)
                    .alive()
                    .revoked(false)
                    .for_signing()
                    .next()
                    .is_some()
            })
            .map(|cert| cert.fingerprint().to_hex())
            .collect()
    }

    /// The earliest expiry among signing-capable keys, if any expires.
    pub fn signing_key_expiry(&self, now: SystemTime) -> Option<SystemTime> {
        let policy = StandardPolicy::new();
        self.certs
            .iter()
            .flat_map(|cert| {
                cert.keys()
                    .with_policy(&policy, now)
                    .alive()
                    .revoked(false)
                    .for_signing()
                    .filter_map(|ka| ka.key_expiration_time())
                    .collect::<Vec<_>>()
            })
            .min()
    }

    /// Verifies an InRelease: strict cleartext framing first, then the
    /// signature over the whole input. Returns the signed text only.
    pub fn verify_cleartext(
        &self,
        url: &str,
        input: &[u8],
        now: SystemTime,
        clock_skew: Duration,
    ) -> Result<Verified, VerifyError> {
        let framed = csf::split(input).map_err(|reason| {
            let marker: &[u8] = b"-----BEGIN PGP SIGNED MESSAGE-----";
            if input.windows(marker.len()).any(|w| w == marker) {
                VerifyError::CleartextFraming {
                    url: url.to_string(),
                    reason,
                }
            } else {
                VerifyError::NotCleartext {
                    url: url.to_string(),
                }
            }
        })?;
        signatures_only(framed.signature.as_bytes()).map_err(|reason| {
            VerifyError::CleartextFraming {
                url: url.to_string(),
                reason,
            }
        })?;
        let (output, good) = self.verify_at(url, now, clock_skew, |policy, time, helper| {
            let mut verifier =
                VerifierBuilder::from_bytes(input)?.with_policy(policy, Some(time), helper)?;
            let mut output = Vec::new();
            let read = verifier.read_to_end(&mut output);
            let processed = verifier.message_processed();
            drop(verifier);
            read?;
            if !processed {
                return Err(openpgp::anyhow::anyhow!("message not fully verified"));
            }
            Ok(output)
        })?;
        let text = String::from_utf8(output).map_err(|_| VerifyError::SignedTextMismatch {
            url: url.to_string(),
            reason: "signed text is not UTF-8".into(),
        })?;
        if text != framed.text {
            return Err(VerifyError::SignedTextMismatch {
                url: url.to_string(),
                reason: format!(
                    "{} signed bytes vs {} framed bytes",
                    text.len(),
                    framed.text.len()
                ),
            });
        }
        Ok(good.verified(text))
    }

    /// Verifies `Release` against a detached `Release.gpg`. The signature
    /// file must hold signatures only: anything else (literal data,
    /// compressed packets, a cleartext message) fails.
    pub fn verify_detached(
        &self,
        url: &str,
        data: &[u8],
        signature: &[u8],
        now: SystemTime,
        clock_skew: Duration,
    ) -> Result<Verified, VerifyError> {
        detached_framing(signature).map_err(|reason| VerifyError::DetachedSignature {
            url: format!("{url}.gpg"),
            reason,
        })?;
        let ((), good) = self.verify_at(url, now, clock_skew, |policy, time, helper| {
            DetachedVerifierBuilder::from_bytes(signature)?
                .with_policy(policy, Some(time), helper)?
                .verify_bytes(data)
        })?;
        let text = String::from_utf8(data.to_vec()).map_err(|_| VerifyError::ReleaseParse {
            url: url.to_string(),
            reason: "not UTF-8".into(),
        })?;
        Ok(good.verified(text))
    }
}

impl Keyring {
    /// Runs a Sequoia verification (`run`, at a time) and returns its output
    /// and the fingerprint of the good signature's certificate.
    ///
    /// Sequoia judges a signature's creation time against the time it is
    /// given with no tolerance, and a node's clock may be behind the
    /// publisher's (a new instance boots before its clock is synchronised).
    /// So when the only fault of a pinned key's signature is that it was
    /// made after `now`, and at most `clock_skew` after, the verification
    /// runs again at `now + clock_skew`. That moves nothing else that
    /// matters: Sequoia judges the key's binding, expiry and revocation at
    /// the signature's creation time either way, and a signature's own
    /// expiry judged at the later time only refuses more. A signature made
    /// further ahead is [`VerifyError::SignedAhead`], which says to check
    /// the time sync, not "bad signature". The Release's own times (Date,
    /// Valid-Until) are judged afterwards by the freshness rules.
    fn verify_at<T>(
        &self,
        url: &str,
        now: SystemTime,
        clock_skew: Duration,
        mut run: impl FnMut(&StandardPolicy<'static>, SystemTime, &mut Helper<'_>) -> openpgp::Result<T>,
    ) -> Result<(T, Good), VerifyError> {
        let policy = StandardPolicy::new();
        let failed = |helper: &Helper, error: openpgp::anyhow::Error| VerifyError::Signature {
            url: url.to_string(),
            keyring: self.path.clone(),
            details: helper.describe(error),
        };
        let mut helper = Helper::new(&self.certs);
        let first = run(&policy, now, &mut helper);
        let error = match (first, helper.good.take()) {
            (Ok(output), Some(good)) => return Ok((output, good)),
            (Ok(_), None) => openpgp::anyhow::anyhow!("no good signature"),
            (Err(e), _) => e,
        };
        let Some(signed_at) = helper.ahead.iter().min().copied() else {
            return Err(failed(&helper, error));
        };
        let latest = now.checked_add(clock_skew).unwrap_or(now);
        if signed_at > latest {
            let ahead = signed_at.duration_since(now).unwrap_or_default();
            return Err(VerifyError::SignedAhead {
                url: url.to_string(),
                signed_at: chrono::DateTime::<chrono::Utc>::from(signed_at).to_rfc2822(),
                // Signature times are whole seconds: round to the nearest.
                ahead: Duration::from_secs(
                    ahead.saturating_add(Duration::from_millis(500)).as_secs(),
                ),
                clock_skew,
            });
        }
        let mut again = Helper::new(&self.certs);
        match (run(&policy, latest, &mut again), again.good.take()) {
            (Ok(output), Some(good)) => Ok((output, good)),
            (Ok(_), None) => Err(failed(
                &again,
                openpgp::anyhow::anyhow!("no good signature"),
            )),
            (Err(e), _) => Err(failed(&again, e)),
        }
    }
}

/// Refuses a keyring with secret key material on any key (primary or
/// subkey, even a stub-exported `--export-secret-subkeys`): a node needs
/// only the public key, and a secret key copied to every node is a signing
/// key anyone who takes one node can use. The error gives the command that
/// exports every certificate of the file without its secrets.
fn refuse_secret_keys(path: &Path, certs: &[Cert]) -> Result<(), KeyringError> {
    let secret: Vec<String> = certs
        .iter()
        .filter(|cert| cert.is_tsk())
        .map(|cert| cert.fingerprint().to_hex())
        .collect();
    if secret.is_empty() {
        return Ok(());
    }
    let fingerprints: Vec<String> = certs
        .iter()
        .map(|cert| cert.fingerprint().to_hex())
        .collect();
    Err(KeyringError::SecretKey {
        path: path.to_path_buf(),
        secret: secret.join(", "),
        fingerprints: fingerprints.join(" "),
    })
}

/// A detached signature file (Release.gpg) is one armored signature block
/// or binary packets, and nothing else: no bytes before the armor, none
/// after it, no second block. apt learned this from CVE-2019-3462's
/// follow-ups, where data around the signature reached the parser.
fn detached_framing(signature: &[u8]) -> Result<(), String> {
    const BEGIN: &[u8] = b"-----BEGIN PGP SIGNATURE-----";
    const END: &[u8] = b"-----END PGP SIGNATURE-----";
    if signature.starts_with(BEGIN) {
        let text = std::str::from_utf8(signature).map_err(|_| "armor is not UTF-8".to_string())?;
        let begins = text.matches("-----BEGIN ").count();
        let end = text
            .find("-----END PGP SIGNATURE-----")
            .ok_or("armor has no END line")?;
        let after = &text[end + END.len()..];
        if begins != 1 || !after.bytes().all(|b| b == b'\n' || b == b'\r') {
            return Err("data outside the single signature armor block".into());
        }
    } else if signature.first().is_none_or(|b| b & 0x80 == 0) {
        return Err("neither an armored signature nor OpenPGP packets".into());
    }
    signatures_only(signature)
}

/// Every top-level packet is a signature (or an unparsable signature,
/// which verification then ignores): no literal data, no compressed or
/// encrypted containers, no one-pass signatures of an inline message.
fn signatures_only(bytes: &[u8]) -> Result<(), String> {
    use openpgp::Packet;
    use openpgp::packet::Tag;
    let pile =
        openpgp::PacketPile::from_bytes(bytes).map_err(|e| format!("unparsable signature: {e}"))?;
    let mut count = 0;
    for packet in pile.children() {
        match packet {
            Packet::Signature(_) => count += 1,
            Packet::Unknown(unknown) if unknown.tag() == Tag::Signature => count += 1,
            other => {
                return Err(format!(
                    "a {} packet where only signatures may be",
                    other.tag()
                ));
            }
        }
    }
    if count == 0 {
        return Err("no signature packet".into());
    }
    Ok(())
}

fn cert_problem(cert: &Cert) -> String {
    let policy = StandardPolicy::new();
    match cert.with_policy(&policy, SystemTime::now()) {
        Err(e) => format!("{e}"),
        Ok(valid) => match valid.alive() {
            Err(e) => format!("{e}"),
            Ok(()) => "no key with the signing capability that is alive and not revoked".into(),
        },
    }
}

/// The first good signature by a pinned key.
struct Good {
    signer: String,
    signed_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Good {
    fn verified(self, text: String) -> Verified {
        Verified {
            text,
            signer: self.signer,
            signed_at: self.signed_at,
        }
    }
}

/// Collects what Sequoia saw so that the error names the keys involved.
struct Helper<'a> {
    certs: &'a [Cert],
    good: Option<Good>,
    problems: Vec<String>,
    /// Creation times of pinned keys' signatures refused only because they
    /// were made after the time of the verification.
    ahead: Vec<SystemTime>,
}

impl<'a> Helper<'a> {
    fn new(certs: &'a [Cert]) -> Self {
        Helper {
            certs,
            good: None,
            problems: Vec::new(),
            ahead: Vec::new(),
        }
    }

    fn describe(&self, error: openpgp::anyhow::Error) -> String {
        if self.problems.is_empty() {
            format!("{error:#}")
        } else {
            self.problems.join("; ")
        }
    }
}

fn issuers(sig: &openpgp::packet::Signature) -> String {
    let issuers: Vec<String> = sig.get_issuers().iter().map(|h| h.to_hex()).collect();
    if issuers.is_empty() {
        "no issuer".into()
    } else {
        issuers.join(",")
    }
}

impl VerificationHelper for &mut Helper<'_> {
    fn get_certs(&mut self, _ids: &[openpgp::KeyHandle]) -> openpgp::Result<Vec<Cert>> {
        Ok(self.certs.to_vec())
    }

    fn check(&mut self, structure: MessageStructure) -> openpgp::Result<()> {
        for layer in structure.into_iter() {
            match layer {
                MessageLayer::SignatureGroup { results } => {
                    for result in results {
                        match result {
                            Ok(good) => {
                                if self.good.is_none() {
                                    self.good = Some(Good {
                                        signer: good.ka.cert().fingerprint().to_hex(),
                                        signed_at: good
                                            .sig
                                            .signature_creation_time()
                                            .map(chrono::DateTime::<chrono::Utc>::from),
                                    });
                                }
                            }
                            Err(error) => {
                                if let Some(at) = made_after_now(&error) {
                                    self.ahead.push(at);
                                }
                                self.problems.push(describe_failure(&error));
                            }
                        }
                    }
                }
                MessageLayer::Compression { .. } => {
                    self.problems
                        .push("compressed data where a plain signature was expected".into());
                    return Err(openpgp::anyhow::anyhow!("compressed message"));
                }
                MessageLayer::Encryption { .. } => {
                    self.problems.push("encrypted message".into());
                    return Err(openpgp::anyhow::anyhow!("encrypted message"));
                }
            }
        }
        if self.good.is_some() {
            Ok(())
        } else {
            if self.problems.is_empty() {
                self.problems.push("no signature".into());
            }
            Err(openpgp::anyhow::anyhow!(
                "no good signature by a pinned key"
            ))
        }
    }
}

/// The creation time of a signature whose only fault is that it was made
/// after the time of the verification (Sequoia's `NotYetLive`). Sequoia
/// checks the key (binding, expiry, revocation, signing capability) before
/// it looks at the signature's time, so such a signature is by a pinned key
/// that may sign.
fn made_after_now(error: &VerificationError) -> Option<SystemTime> {
    match error {
        VerificationError::BadSignature { sig, error, .. } => {
            match error.downcast_ref::<openpgp::Error>() {
                Some(openpgp::Error::NotYetLive(_)) => sig.signature_creation_time(),
                _ => None,
            }
        }
        _ => None,
    }
}

fn describe_failure(error: &VerificationError) -> String {
    match error {
        VerificationError::MissingKey { sig } => {
            format!("signed by key {} which is not in the keyring", issuers(sig))
        }
        VerificationError::UnboundKey { sig, cert, error } => format!(
            "key {} of {} is not valid: {error}",
            issuers(sig),
            cert.fingerprint()
        ),
        VerificationError::BadKey { sig, ka, error } => format!(
            "key {} ({}) may not sign: {error}",
            issuers(sig),
            ka.cert().fingerprint()
        ),
        VerificationError::BadSignature { sig, error, .. } => {
            format!(
                "bad signature by {} (hash {}): {error}",
                issuers(sig),
                sig.hash_algo()
            )
        }
        VerificationError::MalformedSignature { sig, error } => {
            format!("malformed signature by {}: {error}", issuers(sig))
        }
        VerificationError::UnknownSignature { .. } => "unparsable signature".to_string(),
        _ => "unknown verification error".to_string(),
    }
}

#[cfg(test)]
mod tests;

//! Loading keyrings and verifying signatures with certificates made here.

use super::*;
use openpgp::cert::CertBuilder;
use openpgp::packet::signature::SignatureBuilder;
use openpgp::serialize::SerializeInto;
use openpgp::types::{KeyFlags, SignatureType};

fn signing_cert() -> Cert {
    CertBuilder::new()
        .add_userid("Repo <repo@acme.test>")
        .add_signing_subkey()
        .generate()
        .expect("generate a certificate")
        .0
}

fn keyring_file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), bytes).expect("write keyring");
    file
}

#[track_caller]
fn assert_secret_refused(file: &tempfile::NamedTempFile, cert: &Cert) {
    let error = Keyring::load(file.path()).expect_err("a secret keyring was accepted");
    assert!(matches!(error, KeyringError::SecretKey { .. }), "{error:?}");
    let message = error.to_string();
    let command = format!("gpg --export --armor {}", cert.fingerprint().to_hex());
    assert!(message.contains(&command), "{message}");
    assert!(
        message.contains(&file.path().display().to_string()),
        "{message}"
    );
    assert_eq!(
        crate::error::Error::from(error).exit_code(),
        crate::error::exit::USAGE
    );
}

#[test]
fn a_secret_key_is_refused_with_the_export_command() {
    let cert = signing_cert();
    let armored = cert.as_tsk().armored().to_vec().expect("armor");
    assert_secret_refused(&keyring_file(&armored), &cert);
}

#[test]
fn a_secret_subkey_alone_is_refused_too() {
    let cert = signing_cert();
    let primary = cert.fingerprint();
    let tsk = cert
        .as_tsk()
        .set_filter(move |key| key.fingerprint() != primary)
        .to_vec()
        .expect("serialize");
    // The primary key is public: only the signing subkey is secret.
    let parsed = Cert::from_bytes(&tsk).expect("parse");
    assert!(!parsed.primary_key().key().has_secret());
    assert!(parsed.keys().subkeys().any(|k| k.key().has_secret()));
    assert_secret_refused(&keyring_file(&tsk), &cert);
}

#[test]
fn a_secret_key_beside_a_public_one_names_both_in_the_command() {
    let (public, secret) = (signing_cert(), signing_cert());
    let mut bytes = public.armored().to_vec().expect("armor");
    bytes.extend(secret.as_tsk().armored().to_vec().expect("armor"));
    let error = Keyring::load(keyring_file(&bytes).path()).expect_err("accepted");
    let message = error.to_string();
    assert!(
        message.contains(&format!("secret key of {};", secret.fingerprint().to_hex())),
        "{message}"
    );
    assert!(
        message.contains(&public.fingerprint().to_hex()),
        "the public certificate is left out of the export: {message}"
    );
}

fn signing_keypair(cert: &Cert) -> openpgp::crypto::KeyPair {
    cert.keys()
        .with_policy(&StandardPolicy::new(), None)
        .secret()
        .for_signing()
        .next()
        .expect("a signing key")
        .key()
        .clone()
        .into_keypair()
        .expect("keypair")
}

fn binary_signature(builder: SignatureBuilder, cert: &Cert, data: &[u8]) -> Vec<u8> {
    let signature = builder
        .sign_message(&mut signing_keypair(cert), data)
        .expect("sign");
    openpgp::Packet::from(signature)
        .to_vec()
        .expect("serialize")
}

fn armored(binary: &[u8]) -> Vec<u8> {
    let mut writer = openpgp::armor::Writer::new(Vec::new(), openpgp::armor::Kind::Signature)
        .expect("armor writer");
    std::io::Write::write_all(&mut writer, binary).expect("armor");
    writer.finalize().expect("armor")
}

fn keyring_of(cert: &Cert) -> Keyring {
    Keyring {
        path: PathBuf::from("/etc/pulldeploy/keyring.pgp"),
        certs: vec![cert.clone().strip_secret_key_material()],
    }
}

/// `cert`'s signature over `data` with its version byte set to 9, which
/// no parser knows: it parses as an unknown packet with the Signature
/// tag.
fn unknown_version_signature(cert: &Cert, data: &[u8]) -> Vec<u8> {
    let mut packet = binary_signature(SignatureBuilder::new(SignatureType::Binary), cert, data);
    // A new-format header with a one-octet length, then the version.
    assert_eq!((packet[0], packet[1] < 192, packet[2]), (0xc2, true, 4));
    packet[2] = 9;
    packet
}

/// `cert`'s primary key packet with its version byte set to 9: an
/// unknown packet with the PublicKey tag.
fn unknown_version_key(cert: &Cert) -> Vec<u8> {
    let key = cert.primary_key().key().clone();
    let mut packet = openpgp::Packet::from(key).to_vec().expect("serialize");
    assert_eq!((packet[0], packet[1] < 192, packet[2]), (0xc6, true, 4));
    packet[2] = 9;
    packet
}

#[test]
fn a_detached_signature_verifies_armored_or_binary() {
    let cert = signing_cert();
    let data = b"Suite: production\n";
    let binary = binary_signature(SignatureBuilder::new(SignatureType::Binary), &cert, data);
    let armor = armored(&binary);
    let keyring = keyring_of(&cert);
    let now = SystemTime::now();
    let mut armor_then_breaks = armor.clone();
    armor_then_breaks.extend_from_slice(b"\r\n\n");
    for signature in [&binary, &armor, &armor_then_breaks] {
        let verified = keyring
            .verify_detached("file:///r/Release", data, signature, now, Duration::ZERO)
            .expect("a good detached signature");
        assert_eq!(verified.text, "Suite: production\n");
        assert_eq!(verified.signer, cert.fingerprint().to_hex());
    }
}

#[test]
fn detached_framing_refuses_bytes_around_or_instead_of_the_signature() {
    let cert = signing_cert();
    let binary = binary_signature(SignatureBuilder::new(SignatureType::Binary), &cert, b"data");
    let armor = armored(&binary);
    let outside = Err("data outside the single signature armor block".to_string());
    assert_eq!(
        detached_framing(&[armor.as_slice(), b"x"].concat()),
        outside
    );
    assert_eq!(
        detached_framing(&[armor.as_slice(), b"\n "].concat()),
        outside
    );
    assert_eq!(
        detached_framing(&[armor.as_slice(), &armor].concat()),
        outside
    );
    let neither = Err("neither an armored signature nor OpenPGP packets".to_string());
    assert_eq!(detached_framing(b"Suite: evil\n"), neither);
    assert_eq!(detached_framing(b""), neither);
    assert_eq!(
        detached_framing(&[b"\n".as_slice(), &armor].concat()),
        neither
    );
    assert_eq!(detached_framing(&binary), Ok(()));
    assert_eq!(detached_framing(&armor), Ok(()));
}

#[test]
fn only_signature_packets_pass_including_unparsable_ones() {
    let cert = signing_cert();
    let binary = binary_signature(SignatureBuilder::new(SignatureType::Binary), &cert, b"data");
    assert_eq!(signatures_only(&binary), Ok(()));
    let unknown = unknown_version_signature(&cert, b"data");
    assert_eq!(signatures_only(&unknown), Ok(()));
    assert_eq!(
        signatures_only(&[binary.as_slice(), &unknown].concat()),
        Ok(())
    );
    let key = unknown_version_key(&cert);
    for other in [key.clone(), [binary.as_slice(), &key].concat()] {
        let error = signatures_only(&other).expect_err("a non-signature packet passed");
        assert!(
            error.ends_with("packet where only signatures may be"),
            "{error}"
        );
    }
}

#[test]
fn verification_failures_name_what_was_wrong() {
    let cert = signing_cert();
    let keyring = keyring_of(&cert);
    let data = b"Suite: production\n";
    let now = SystemTime::now();
    let details =
        |signature: &[u8]| match keyring.verify_detached("u", data, signature, now, Duration::ZERO)
        {
            Err(VerifyError::Signature { details, .. }) => details,
            other => panic!("expected a signature error, got {other:?}"),
        };
    assert_eq!(
        details(&unknown_version_signature(&cert, data)),
        "unparsable signature"
    );
    let no_creation_time = binary_signature(
        SignatureBuilder::new(SignatureType::Binary)
            .suppress_signature_creation_time()
            .expect("suppress"),
        &cert,
        data,
    );
    let malformed = details(&no_creation_time);
    assert!(
        malformed.starts_with("malformed signature by "),
        "{malformed}"
    );
    let other_text = binary_signature(
        SignatureBuilder::new(SignatureType::Binary),
        &cert,
        b"other text",
    );
    let bad = details(&other_text);
    assert!(bad.starts_with("bad signature by "), "{bad}");
    // Dated before the key existed: the key was not bound to the
    // certificate at the signature's time.
    let key_created = cert.primary_key().key().creation_time();
    let before_the_key = binary_signature(
        SignatureBuilder::new(SignatureType::Binary)
            .set_signature_creation_time(key_created - std::time::Duration::from_secs(86_400))
            .expect("creation time"),
        &cert,
        data,
    );
    let unbound = details(&before_the_key);
    assert!(
        unbound.starts_with("key ")
            && unbound.contains(&format!(" of {} is not valid: ", cert.fingerprint())),
        "{unbound}"
    );
}

#[test]
fn signing_key_expiry_is_that_of_the_signing_subkey() {
    let now = SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    let (cert, _) = CertBuilder::new()
        .set_creation_time(now - day)
        .add_userid("Repo <repo@acme.test>")
        .add_subkey(KeyFlags::empty().set_signing(), 30 * day, None)
        .generate()
        .expect("generate");
    let creation = cert
        .keys()
        .subkeys()
        .next()
        .expect("subkey")
        .key()
        .creation_time();
    assert_eq!(
        keyring_of(&cert).signing_key_expiry(now),
        Some(creation + 30 * day)
    );
    assert_eq!(keyring_of(&signing_cert()).signing_key_expiry(now), None);
}

#[test]
fn a_keyring_without_a_signing_key_says_why_for_each_certificate() {
    let (certify_only, _) = CertBuilder::new()
        .add_userid("Repo <repo@acme.test>")
        .generate()
        .expect("generate");
    let file = keyring_file(&certify_only.armored().to_vec().expect("armor"));
    match Keyring::load(file.path()) {
        Err(KeyringError::NoSigningKey { details, .. }) => assert_eq!(
            details,
            format!(
                "{}: no key with the signing capability that is alive and not revoked",
                certify_only.fingerprint()
            )
        ),
        other => panic!("expected NoSigningKey, got {other:?}"),
    }
}

#[test]
fn the_public_key_alone_loads() {
    let cert = signing_cert();
    let file = keyring_file(&cert.armored().to_vec().expect("armor"));
    let keyring = Keyring::load(file.path()).expect("public keyring");
    assert_eq!(
        keyring.signing_fingerprints(SystemTime::now()),
        [cert.fingerprint().to_hex()]
    );
}

/// A node whose clock is behind the publisher's sees a fresh signature
/// made "in the future". Within `clock_skew` it is good; beyond it the
/// error names the clock, not a bad signature.
#[test]
fn a_signature_from_a_publisher_ahead_is_judged_with_clock_skew() {
    let cert = signing_cert();
    let data = b"Suite: production\n";
    let keyring = keyring_of(&cert);
    // Signature times are whole seconds; so is this clock.
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970");
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs());
    let signed_at = |ahead: u64| {
        let builder = SignatureBuilder::new(SignatureType::Binary)
            .set_signature_creation_time(now + Duration::from_secs(ahead))
            .expect("creation time");
        binary_signature(builder, &cert, data)
    };
    let skew = Duration::from_secs(300);
    for ahead in [10, 120] {
        let verified = keyring
            .verify_detached("s3://r/Release", data, &signed_at(ahead), now, skew)
            .unwrap_or_else(|e| panic!("{ahead} s ahead, clock_skew 5m: {e}"));
        assert_eq!(verified.signer, cert.fingerprint().to_hex());
    }
    let three_hours = signed_at(3 * 3600);
    let error = keyring
        .verify_detached("s3://r/Release", data, &three_hours, now, skew)
        .expect_err("3 h ahead with clock_skew 5m");
    assert!(
        matches!(error, VerifyError::SignedAhead { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("s3://r/Release signed at")
            && message.contains("3h ahead of this node's clock")
            && message.contains("(clock_skew 5m): check time sync"),
        "{message}"
    );
    assert_eq!(
        crate::error::Error::from(error).exit_code(),
        crate::error::exit::DATAERR
    );
    keyring
        .verify_detached(
            "s3://r/Release",
            data,
            &three_hours,
            now,
            4 * 3600 * skew / 300,
        )
        .expect("3 h ahead with clock_skew 4h");
    // No skew: the signature from 10 s ahead is named as such too.
    let error = keyring
        .verify_detached("s3://r/Release", data, &signed_at(10), now, Duration::ZERO)
        .expect_err("10 s ahead with no skew");
    assert!(error.to_string().contains("10s ahead"), "{error}");
}

/// Tolerance for the signature's creation time does not stretch its
/// expiry: a signature that expired before the node's time stays refused.
#[test]
fn clock_skew_does_not_revive_an_expired_signature() {
    let cert = signing_cert();
    let data = b"Suite: production\n";
    let keyring = keyring_of(&cert);
    let now = SystemTime::now();
    let builder = SignatureBuilder::new(SignatureType::Binary)
        .set_signature_creation_time(now - Duration::from_secs(7200))
        .expect("creation time")
        .set_signature_validity_period(Duration::from_secs(3600))
        .expect("validity");
    let signature = binary_signature(builder, &cert, data);
    let error = keyring
        .verify_detached(
            "s3://r/Release",
            data,
            &signature,
            now,
            Duration::from_secs(4 * 3600),
        )
        .expect_err("an expired signature");
    assert!(matches!(error, VerifyError::Signature { .. }), "{error:?}");
}

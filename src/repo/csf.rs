//! Strict framing of OpenPGP cleartext-signed messages (InRelease).
//!
//! RFC 9580 §7 (Cleartext Signature Framework). apt has been bitten by lax
//! framing more than once: CVE-2013-1051 (unsigned text appended after the
//! signature was parsed as if signed) and the CVE-2019-3462 follow-ups. So
//! the framing is checked here before any cryptography, and exactly one
//! shape is accepted:
//!
//! ```text
//! -----BEGIN PGP SIGNED MESSAGE-----
//! Hash: SHA256              (zero or more Hash headers, nothing else)
//!                           (one empty line)
//! dash-escaped text         (a line starting with '-' must start with "- ")
//! -----BEGIN PGP SIGNATURE-----
//! armored signature
//! -----END PGP SIGNATURE-----
//! ```
//!
//! Nothing may come before the first line; only line breaks may follow the
//! last. The caller still verifies the whole input with Sequoia and checks
//! that Sequoia's output equals [`Cleartext::text`], so the text that is
//! parsed is both what the signature covers and what this framing saw.

const BEGIN_MESSAGE: &str = "-----BEGIN PGP SIGNED MESSAGE-----";
const BEGIN_SIGNATURE: &str = "-----BEGIN PGP SIGNATURE-----";
const END_SIGNATURE: &str = "-----END PGP SIGNATURE-----";

/// A cleartext-signed message split along its frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Cleartext<'a> {
    /// The signed text, dash-unescaped, lines joined by `\n`, without the
    /// line break that precedes the signature (RFC 9580 §7.2).
    pub text: String,
    /// The armored signature block, BEGIN to END lines inclusive.
    pub signature: &'a str,
}

/// Splits `input` or says why it is not exactly one cleartext-signed message.
pub fn split(input: &[u8]) -> Result<Cleartext<'_>, String> {
    let input = std::str::from_utf8(input).map_err(|e| format!("not UTF-8: {e}"))?;
    if input.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    let mut lines = Lines::new(input);

    match lines.next() {
        Some(line) if line == BEGIN_MESSAGE => {}
        Some(line) if line.starts_with(BEGIN_MESSAGE) => {
            return Err("junk after the BEGIN PGP SIGNED MESSAGE line".into());
        }
        _ => return Err("does not start with -----BEGIN PGP SIGNED MESSAGE-----".into()),
    }

    // Armor headers of the signed message: only "Hash:" is defined.
    loop {
        match lines.next() {
            None => return Err("ends inside the message headers".into()),
            Some("") => break,
            Some(line) => {
                let algos = line
                    .strip_prefix("Hash: ")
                    .ok_or_else(|| format!("unexpected message header {line:?}"))?;
                if algos.is_empty()
                    || !algos
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b',' || b == b' ' || b == b'-')
                {
                    return Err(format!("malformed Hash header {line:?}"));
                }
            }
        }
    }

    let mut text_lines: Vec<&str> = Vec::new();
    loop {
        match lines.next() {
            None => return Err("no signature block (missing -----BEGIN PGP SIGNATURE-----)".into()),
            Some(BEGIN_SIGNATURE) => break,
            Some(line) if line.starts_with('-') => match line.strip_prefix("- ") {
                Some(unescaped) => text_lines.push(unescaped),
                None => return Err(format!("line {line:?} is not dash-escaped")),
            },
            Some(line) => text_lines.push(line),
        }
    }
    let signature_start = lines.offset_of_last();

    // The signature armor: optional headers, an empty line, base64, an
    // optional CRC line, the END line.
    let mut in_headers = true;
    let mut saw_base64 = false;
    loop {
        match lines.next() {
            None => return Err("signature block is not closed (missing END line)".into()),
            Some(END_SIGNATURE) => break,
            Some(line) if line.starts_with("-----") => {
                return Err(format!(
                    "unexpected armor line {line:?} inside the signature"
                ));
            }
            Some("") if in_headers => in_headers = false,
            Some(line) if in_headers && line.contains(": ") => {
                // RFC 9580 §6.2.2 armor headers; nothing else may hide here.
                let key = line.split(": ").next().unwrap_or_default();
                if !["Version", "Comment", "Hash", "Charset", "MessageID"].contains(&key) {
                    return Err(format!("unknown armor header {line:?} in the signature"));
                }
            }
            Some(line) => {
                in_headers = false;
                let body = line.strip_prefix('=').unwrap_or(line);
                if body.is_empty()
                    || !body
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
                {
                    return Err(format!("malformed armor line {line:?}"));
                }
                saw_base64 = true;
            }
        }
    }
    if !saw_base64 {
        return Err("empty signature block".into());
    }
    let signature_end = lines.offset();
    if !input[signature_end..]
        .bytes()
        .all(|b| b == b'\n' || b == b'\r')
    {
        return Err("data after -----END PGP SIGNATURE-----".into());
    }

    Ok(Cleartext {
        text: text_lines.join("\n"),
        signature: &input[signature_start..signature_end],
    })
}

/// Lines without their terminator (`\n` or `\r\n`), tracking byte offsets.
struct Lines<'a> {
    input: &'a str,
    pos: usize,
    last_start: usize,
}

impl<'a> Lines<'a> {
    fn new(input: &'a str) -> Self {
        Lines {
            input,
            pos: 0,
            last_start: 0,
        }
    }

    fn offset(&self) -> usize {
        self.pos
    }

    fn offset_of_last(&self) -> usize {
        self.last_start
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.pos >= self.input.len() {
            return None;
        }
        let rest = &self.input[self.pos..];
        self.last_start = self.pos;
        let (line, advance) = match rest.find('\n') {
            Some(i) => (&rest[..i], i + 1),
            None => (rest, rest.len()),
        };
        self.pos += advance;
        Some(line.strip_suffix('\r').unwrap_or(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNATURE: &str =
        "-----BEGIN PGP SIGNATURE-----\n\niHUEARYIAB0WIQ=\n=AbCd\n-----END PGP SIGNATURE-----\n";

    fn message(headers: &str, body: &str) -> String {
        format!("{BEGIN_MESSAGE}\n{headers}\n{body}\n{SIGNATURE}")
    }

    #[test]
    fn accepts_the_gpg_shape_and_unescapes() {
        let input = message("Hash: SHA256\n", "Origin: x\n- -dashed\nSuite: s");
        let split = split(input.as_bytes()).unwrap();
        assert_eq!(split.text, "Origin: x\n-dashed\nSuite: s");
        assert_eq!(split.signature, SIGNATURE);
    }

    #[test]
    fn csf_appended_unsigned_text_is_rejected() {
        let input = format!("{}Suite: evil\n", message("Hash: SHA256\n", "Suite: good"));
        assert!(split(input.as_bytes()).unwrap_err().contains("after"));
    }

    #[test]
    fn csf_header_junk_is_rejected() {
        let junk_on_begin = message("Hash: SHA256\n", "a").replacen(
            BEGIN_MESSAGE,
            "-----BEGIN PGP SIGNED MESSAGE-----junk",
            1,
        );
        assert!(split(junk_on_begin.as_bytes()).is_err());
        let junk_before = format!("Suite: evil\n{}", message("Hash: SHA256\n", "a"));
        assert!(split(junk_before.as_bytes()).is_err());
        let junk_header = message("Hash: SHA256\nSuite: evil\n", "a");
        assert!(split(junk_header.as_bytes()).is_err());
    }

    #[test]
    fn csf_dash_escaping() {
        assert!(split(message("Hash: SHA256\n", "-X").as_bytes()).is_err());
        assert!(split(message("Hash: SHA256\n", "- X").as_bytes()).is_ok());
        let bad_in_sig = message("Hash: SHA256\n", "a").replace("=AbCd", "-AbCd");
        assert!(split(bad_in_sig.as_bytes()).is_err());
    }

    #[test]
    fn csf_truncated() {
        let full = message("Hash: SHA256\n", "a");
        let no_end = full.replace("-----END PGP SIGNATURE-----\n", "");
        assert!(split(no_end.as_bytes()).unwrap_err().contains("END"));
        let no_sig = format!("{BEGIN_MESSAGE}\nHash: SHA256\n\nSuite: s\n");
        assert!(split(no_sig.as_bytes()).unwrap_err().contains("signature"));
    }

    #[test]
    fn second_signature_block_is_rejected() {
        let twice = format!("{}{SIGNATURE}", message("Hash: SHA256\n", "a"));
        assert!(split(twice.as_bytes()).is_err());
    }

    /// A message whose signature block holds `armor` between its BEGIN and
    /// END lines.
    fn signed_with_armor(armor: &str) -> String {
        format!("{BEGIN_MESSAGE}\nHash: SHA256\n\na\n{BEGIN_SIGNATURE}\n{armor}{END_SIGNATURE}\n")
    }

    #[test]
    fn the_first_line_errors_say_what_is_wrong() {
        let junk_on_begin = message("Hash: SHA256\n", "a").replacen(
            BEGIN_MESSAGE,
            "-----BEGIN PGP SIGNED MESSAGE-----junk",
            1,
        );
        assert_eq!(
            split(junk_on_begin.as_bytes()).unwrap_err(),
            "junk after the BEGIN PGP SIGNED MESSAGE line"
        );
        let other_first_line = format!("Suite: evil\n{}", message("Hash: SHA256\n", "a"));
        assert_eq!(
            split(other_first_line.as_bytes()).unwrap_err(),
            "does not start with -----BEGIN PGP SIGNED MESSAGE-----"
        );
    }

    #[test]
    fn hash_headers_allow_only_algorithm_names() {
        for good in ["Hash: SHA1, SHA256\n", "Hash: SHA512,SHA3-256\n"] {
            let input = message(good, "a");
            assert_eq!(split(input.as_bytes()).unwrap().text, "a", "{good:?}");
        }
        for bad in [
            "Hash: \n",
            "Hash: SHA256;evil\n",
            "Hash: SHA256\tx\n",
            "Hash: SHA_256\n",
        ] {
            let input = message(bad, "a");
            let error = split(input.as_bytes()).unwrap_err();
            assert!(
                error.starts_with("malformed Hash header"),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn signature_armor_headers_are_the_known_ones_before_the_blank_line() {
        let known = signed_with_armor("Version: 1\nComment: made by a test\n\niHUE+AB/0WIQ=\n");
        let split_known = split(known.as_bytes()).unwrap();
        assert_eq!(split_known.text, "a");
        assert!(split_known.signature.contains("Comment: made by a test"));

        let unknown = signed_with_armor("Evil: x\n\niHUEARYIAB0WIQ=\n");
        assert!(
            split(unknown.as_bytes())
                .unwrap_err()
                .starts_with("unknown armor header")
        );
        let header_after_base64 = signed_with_armor("\niHUEARYIAB0WIQ=\nComment: late\n");
        assert!(
            split(header_after_base64.as_bytes())
                .unwrap_err()
                .starts_with("malformed armor line")
        );
    }

    #[test]
    fn signature_base64_has_no_blank_lines_or_foreign_bytes() {
        let blank_inside = signed_with_armor("\niHUEARYIAB0WIQ=\n\n=AbCd\n");
        assert!(
            split(blank_inside.as_bytes())
                .unwrap_err()
                .starts_with("malformed armor line")
        );
        for bad in ["iHUE.AB0WIQ=", "iHUE AB0WIQ=", "iHUE_AB0WIQ="] {
            let input = signed_with_armor(&format!("\n{bad}\n"));
            let error = split(input.as_bytes()).unwrap_err();
            assert!(
                error.starts_with("malformed armor line"),
                "{bad:?}: {error}"
            );
        }
        let nested = signed_with_armor("\niHUEARYIAB0WIQ=\n-----BEGIN PGP MESSAGE-----\n");
        assert!(
            split(nested.as_bytes())
                .unwrap_err()
                .starts_with("unexpected armor line")
        );
        let no_base64 = signed_with_armor("Comment: x\n\n");
        assert_eq!(
            split(no_base64.as_bytes()).unwrap_err(),
            "empty signature block"
        );
    }

    #[test]
    fn only_line_breaks_may_follow_the_end_line() {
        let base = message("Hash: SHA256\n", "a");
        for tail in ["\n", "\r\n", "\n\r\n\n"] {
            let input = format!("{base}{tail}");
            let split = split(input.as_bytes()).unwrap();
            assert_eq!(split.signature, SIGNATURE, "{tail:?}");
        }
        for tail in ["\n ", "x", "\t\n"] {
            let input = format!("{base}{tail}");
            assert_eq!(
                split(input.as_bytes()).unwrap_err(),
                "data after -----END PGP SIGNATURE-----",
                "{tail:?}"
            );
        }
    }

    #[test]
    fn crlf_is_a_line_break() {
        let input = message("Hash: SHA256\n", "a\nb").replace('\n', "\r\n");
        assert_eq!(split(input.as_bytes()).unwrap().text, "a\nb");
    }
}

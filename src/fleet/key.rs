//! Names in fleet object keys: node ids, package names and versions as
//! one key segment each, encoded so that every name has exactly one key
//! and every key at most one name.
//!
//! Debian versions may hold `:` (epoch), `~` and `+` (Policy §5.6.12).
//! Kept as they are: letters, digits and `. + _ -`, which need no escaping
//! in an S3 key, a URL path or a file name. Everything else (`:`, `~`, `%`,
//! `/`, any other byte) is percent-encoded as `%XX` (upper-case hex), and so
//! is a leading `.` (a directory store skips dot-files as temporary ones,
//! and `.`/`..` are not names). Decoding refuses anything that encoding
//! would not have produced, so a hand-written key cannot alias another.

use std::fmt::Write as _;

fn kept(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'+' | b'_' | b'-')
}

/// `text` as one key segment.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (index, byte) in text.bytes().enumerate() {
        if kept(byte) && !(index == 0 && byte == b'.') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The text of a key segment written by [`encode`]; `None` for anything
/// else (bad escapes, non-UTF-8, a segment not in canonical form).
pub fn decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let hex = segment.get(index + 1..index + 3)?;
                if !hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
                {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                index += 3;
            }
            byte if kept(byte) => {
                out.push(byte);
                index += 1;
            }
            _ => return None,
        }
    }
    let text = String::from_utf8(out).ok()?;
    (encode(&text) == segment).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_versions_round_trip_and_stay_one_segment() {
        for text in [
            "1.0",
            "1:2.0~rc1+b1-3",
            "2.0+dfsg-1~bpo12+1",
            "0~20240101",
            "i-0abc123_def.x",
            ".hidden",
            "..",
            "a/b",
            "50%",
            "ünïcode",
            "",
        ] {
            let key = encode(text);
            assert!(!key.contains('/'), "{text:?} -> {key}");
            assert!(!key.starts_with('.'), "{text:?} -> {key}");
            assert_eq!(decode(&key).as_deref(), Some(text), "{key}");
        }
        assert_eq!(encode("1:2.0~rc1+b1-3"), "1%3A2.0%7Erc1+b1-3");
        assert_eq!(encode(".."), "%2E.");
    }

    #[test]
    fn keys_encoding_would_not_write_are_refused() {
        for key in [
            "1:0",    // a raw ':'
            "%3a",    // lower-case hex
            "%41",    // 'A' needs no escape
            "%2",     // truncated escape
            "%zz",    // not hex
            ".x",     // a raw leading '.'
            "a/b",    // two segments
            "%FF%FE", // not UTF-8
            "a b",
        ] {
            assert_eq!(decode(key), None, "{key}");
        }
    }
}

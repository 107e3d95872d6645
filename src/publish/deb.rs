//! Reading a .deb's control file, to index it: the `ar` archive, its
//! `control.tar{,.gz,.xz,.zst}` member, and `./control` inside it.
//!
//! deb(5): a .deb is an ar archive whose first member is `debian-binary`
//! ("2.0\n"), then `control.tar` (optionally compressed), then
//! `data.tar` (optionally compressed). Members are read by seeking, so a
//! large package costs the size of its control member in memory, capped.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::repo::digest::{HashingReader, StreamDigest};

use super::index::{self, Stanza};
use crate::repo::capped::CappedReader;

/// A control member larger than this is refused: real ones are a few KiB
/// (maintainer scripts, md5sums of every file: rarely over 1 MiB).
const MAX_CONTROL_MEMBER: u64 = 64 << 20;
/// The `control` file itself.
const MAX_CONTROL_FILE: u64 = 1 << 20;

/// Fields that describe a file in an archive, not the package: the
/// publisher writes them, a .deb's control file must not decide them.
const ARCHIVE_FIELDS: &[&str] = &[
    "Filename",
    "Size",
    "MD5sum",
    "SHA1",
    "SHA256",
    "SHA512",
    "Description-md5",
];

/// What the index needs from one .deb.
#[derive(Debug, Clone)]
pub struct DebInfo {
    pub package: String,
    pub version: String,
    pub architecture: String,
    /// The source package name (`Source`, without a version), else `package`.
    pub source: String,
    /// The control stanza, without archive fields.
    pub control: Stanza,
    pub size: u64,
    pub sha256: String,
    pub sha512: String,
}

/// Why a file is not a Debian package, or cannot be read.
#[derive(Debug)]
pub enum DebError {
    Io(std::io::Error),
    Invalid(String),
}

impl std::fmt::Display for DebError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DebError::Io(e) => write!(f, "{e}"),
            DebError::Invalid(reason) => f.write_str(reason),
        }
    }
}

impl From<std::io::Error> for DebError {
    fn from(e: std::io::Error) -> Self {
        DebError::Io(e)
    }
}

fn invalid(reason: impl Into<String>) -> DebError {
    DebError::Invalid(reason.into())
}

/// What a .deb says it is: its control file's Package, Version and
/// Architecture, each checked for form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub package: String,
    pub version: String,
    pub architecture: String,
}

/// Reads the identity of the .deb at `path` from its control file alone
/// (no hashing: the agent asks this of a .deb it has just verified).
pub fn read_identity(path: &Path) -> Result<Identity, DebError> {
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    identity(&control_stanza(&mut file, size)?)
}

/// The single stanza of the control file of the .deb open in `file`.
fn control_stanza(file: &mut std::fs::File, size: u64) -> Result<Stanza, DebError> {
    let control_text = control_file(file, size)?;
    let mut stanzas =
        index::parse_stanzas(&control_text).map_err(|e| invalid(format!("control file: {e}")))?;
    if stanzas.len() != 1 {
        return Err(invalid(format!(
            "control file has {} stanzas, expected one",
            stanzas.len()
        )));
    }
    Ok(stanzas.remove(0))
}

fn identity(control: &Stanza) -> Result<Identity, DebError> {
    let field = |name: &str| {
        control
            .get(name)
            .map(str::to_string)
            .ok_or_else(|| invalid(format!("control file has no {name} field")))
    };
    let package = field("Package")?;
    let version = field("Version")?;
    let architecture = field("Architecture")?;
    if !index::valid_package_name(&package) {
        return Err(invalid(format!(
            "Package {package:?} is not a valid package name"
        )));
    }
    if !index::valid_version(&version) {
        return Err(invalid(format!(
            "Version {version:?} is not a valid Debian version"
        )));
    }
    if !index::valid_architecture(&architecture) {
        return Err(invalid(format!(
            "Architecture {architecture:?} is not valid"
        )));
    }
    Ok(Identity {
        package,
        version,
        architecture,
    })
}

/// Reads `path`: hashes the whole file and parses its control file.
pub fn read(path: &Path) -> Result<DebInfo, DebError> {
    let mut file = std::fs::File::open(path)?;
    let (size, sha256, sha512) = hash(&mut file)?;
    file.seek(SeekFrom::Start(0))?;
    let mut control = control_stanza(&mut file, size)?;
    let Identity {
        package,
        version,
        architecture,
    } = identity(&control)?;
    let source = match control.get("Source") {
        Some(text) => {
            let name = text
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            if !index::valid_package_name(&name) {
                return Err(invalid(format!(
                    "Source {text:?} is not a valid source name"
                )));
            }
            name
        }
        None => package.clone(),
    };
    for name in ARCHIVE_FIELDS {
        control.remove(name);
    }
    Ok(DebInfo {
        package,
        version,
        architecture,
        source,
        control,
        size,
        sha256,
        sha512,
    })
}

fn hash(file: &mut std::fs::File) -> std::io::Result<(u64, String, String)> {
    let digest = HashingReader::new(file, StreamDigest::new(u64::MAX).with_sha512())
        .copy_to(&mut std::io::sink())?;
    let (sha256, sha512, size) = digest.finish_with_sha512();
    Ok((size, sha256, sha512.unwrap_or_default()))
}

/// One ar member header (60 bytes): name, size, and where its data starts.
struct Member {
    name: String,
    size: u64,
    offset: u64,
}

fn read_member(
    file: &mut std::fs::File,
    offset: u64,
    total: u64,
) -> Result<Option<Member>, DebError> {
    if offset >= total {
        return Ok(None);
    }
    if offset + 60 > total {
        return Err(invalid("truncated ar member header"));
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut header = [0u8; 60];
    file.read_exact(&mut header)?;
    if &header[58..60] != b"`\n" {
        return Err(invalid("bad ar member header (no `\\n terminator)"));
    }
    let text = |range: std::ops::Range<usize>| {
        std::str::from_utf8(&header[range])
            .map(|s| s.trim_end().to_string())
            .map_err(|_| invalid("ar member header is not ASCII"))
    };
    let name = text(0..16)?;
    // GNU ar ends names with '/'.
    let name = name.strip_suffix('/').unwrap_or(&name).to_string();
    let size = text(48..58)?
        .parse::<u64>()
        .map_err(|_| invalid(format!("bad size in ar member header of {name:?}")))?;
    let data = offset + 60;
    if data + size > total {
        return Err(invalid(format!(
            "ar member {name:?} runs past the end of the file"
        )));
    }
    Ok(Some(Member {
        name,
        size,
        offset: data,
    }))
}

/// The text of `./control` from the control member.
fn control_file(file: &mut std::fs::File, total: u64) -> Result<String, DebError> {
    let mut magic = [0u8; 8];
    if total < 8 {
        return Err(invalid("too short to be an ar archive"));
    }
    file.read_exact(&mut magic)?;
    if &magic != b"!<arch>\n" {
        return Err(invalid("not an ar archive (no !<arch> magic)"));
    }
    let mut offset = 8;
    let mut members = Vec::new();
    // A .deb has three members; a handful more is tolerated (dpkg allows
    // members starting with '_' after debian-binary). Bounded either way.
    for _ in 0..16 {
        let Some(member) = read_member(file, offset, total)? else {
            break;
        };
        offset = member.offset + member.size + (member.size % 2);
        members.push(member);
    }
    let first = members.first().ok_or_else(|| invalid("empty ar archive"))?;
    if first.name != "debian-binary" {
        return Err(invalid(format!(
            "first member is {:?}, not debian-binary",
            first.name
        )));
    }
    file.seek(SeekFrom::Start(first.offset))?;
    let mut format = Vec::new();
    file.by_ref()
        .take(first.size.min(16))
        .read_to_end(&mut format)?;
    if !format.starts_with(b"2.") {
        return Err(invalid(format!(
            "debian-binary is {:?}, expected 2.x",
            String::from_utf8_lossy(&format).trim()
        )));
    }
    if !members.iter().any(|m| m.name.starts_with("data.tar")) {
        return Err(invalid("no data.tar member"));
    }
    let control = members
        .iter()
        .find(|m| m.name.starts_with("control.tar"))
        .ok_or_else(|| invalid("no control.tar member"))?;
    if control.size > MAX_CONTROL_MEMBER {
        return Err(invalid(format!(
            "{} is {} bytes, more than the {MAX_CONTROL_MEMBER} allowed",
            control.name, control.size
        )));
    }
    file.seek(SeekFrom::Start(control.offset))?;
    let mut compressed = Vec::new();
    file.by_ref()
        .take(control.size)
        .read_to_end(&mut compressed)?;
    let reader: Box<dyn Read> = match control.name.as_str() {
        "control.tar" => Box::new(&compressed[..]),
        "control.tar.gz" => Box::new(flate2::read::GzDecoder::new(&compressed[..])),
        "control.tar.xz" => Box::new(xz2::read::XzDecoder::new(&compressed[..])),
        "control.tar.zst" => Box::new(
            ruzstd::decoding::StreamingDecoder::new(&compressed[..])
                .map_err(|e| invalid(format!("control.tar.zst: {e}")))?,
        ),
        other => return Err(invalid(format!("unsupported control member {other:?}"))),
    };
    let name = control.name.clone();
    // A control member that inflates past this is an error, not a
    // shorter archive (the one capped reader: repo::capped).
    let mut archive = tar::Archive::new(CappedReader::new(reader, MAX_CONTROL_MEMBER * 4));
    let entries = archive
        .entries()
        .map_err(|e| invalid(format!("{name}: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| invalid(format!("{name}: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| invalid(format!("{name}: {e}")))?
            .to_string_lossy()
            .into_owned();
        if path == "./control" || path == "control" {
            if entry.header().entry_type() != tar::EntryType::Regular {
                return Err(invalid(format!("{name}: ./control is not a regular file")));
            }
            let mut text = Vec::new();
            entry.take(MAX_CONTROL_FILE + 1).read_to_end(&mut text)?;
            if text.len() as u64 > MAX_CONTROL_FILE {
                return Err(invalid(format!("{name}: ./control is larger than 1 MiB")));
            }
            return String::from_utf8(text)
                .map_err(|_| invalid(format!("{name}: ./control is not UTF-8")));
        }
    }
    Err(invalid(format!("{name} has no ./control")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ar(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = b"!<arch>\n".to_vec();
        for (name, data) in members {
            let header = format!(
                "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                name,
                0,
                0,
                0,
                "100644",
                data.len()
            );
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(data);
            if data.len() % 2 == 1 {
                out.push(b'\n');
            }
        }
        out
    }

    fn control_tar(control: &str) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(control.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "./control", control.as_bytes())
            .unwrap();
        builder.into_inner().unwrap()
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    const CONTROL: &str = "Package: myapp\nSource: myapp-src (1.0)\nVersion: 1.0-1\nArchitecture: amd64\nSHA256: forged\nDescription: x\n y\n";

    #[test]
    fn reads_control_from_gzip_member() {
        let deb = ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar.gz", &gz(&control_tar(CONTROL))),
            ("data.tar.gz", &gz(&control_tar(""))),
        ]);
        let file = write(&deb);
        let info = read(file.path()).unwrap();
        assert_eq!(info.package, "myapp");
        assert_eq!(info.source, "myapp-src");
        assert_eq!(info.version, "1.0-1");
        assert_eq!(info.size, deb.len() as u64);
        assert!(
            info.control.get("SHA256").is_none(),
            "archive fields are dropped"
        );
        assert_eq!(info.control.get("Description"), Some("x\n y"));
    }

    fn reason(bytes: &[u8]) -> String {
        match read(write(bytes).path()) {
            Err(DebError::Invalid(reason)) => reason,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn not_a_deb_is_named() {
        assert!(reason(b"#!/bin/sh\necho hi\n").contains("ar archive"));
        assert!(reason(&ar(&[("data.tar.gz", b"x")])).contains("debian-binary"));
        assert!(
            reason(&ar(&[
                ("debian-binary", b"2.0\n"),
                ("control.tar.gz", b"junk"),
                ("data.tar", b"")
            ]))
            .contains("control.tar.gz")
        );
        let no_version = control_tar("Package: myapp\nArchitecture: amd64\n");
        assert!(
            reason(&ar(&[
                ("debian-binary", b"2.0\n"),
                ("control.tar", &no_version),
                ("data.tar", b"")
            ]))
            .contains("Version")
        );
        let bad_name = control_tar("Package: My_App\nVersion: 1\nArchitecture: amd64\n");
        assert!(
            reason(&ar(&[
                ("debian-binary", b"2.0\n"),
                ("control.tar", &bad_name),
                ("data.tar", b"")
            ]))
            .contains("package name")
        );
        let mut truncated = ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar", &control_tar(CONTROL)),
            ("data.tar", b"xx"),
        ]);
        truncated.truncate(truncated.len() - 1);
        assert!(reason(&truncated).contains("past the end"));
    }
}

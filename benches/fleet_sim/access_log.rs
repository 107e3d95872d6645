//! moto's access log: the S3 requests werkzeug logged, and what they were for.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// One S3 request as werkzeug logged it.
pub(crate) struct Request {
    method: String,
    path: String,
    status: u16,
}

/// The requests moto logged between two byte offsets of its log (each
/// offset moved to the start of the next whole line).
pub(crate) fn requests_between(log: &Path, from: u64, to: u64) -> Vec<Request> {
    let mut text = Vec::new();
    if let Ok(mut file) = std::fs::File::open(log)
        && file.seek(SeekFrom::Start(from)).is_ok()
    {
        let _ = file.read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    let span = (to.saturating_sub(from)) as usize;
    let skip = match from {
        0 => 0,
        _ => text.find('\n').map_or(text.len(), |i| i + 1),
    };
    let end = text[span.min(text.len())..]
        .find('\n')
        .map_or(text.len(), |i| span.min(text.len()) + i + 1);
    text.get(skip..end.max(skip))
        .unwrap_or("")
        .lines()
        .filter_map(parse_access_line)
        .collect()
}

/// `127.0.0.1 - - [date] "GET /b/k HTTP/1.1" 304 -` (ANSI colours allowed).
fn parse_access_line(line: &str) -> Option<Request> {
    let start = line.find("] \"")? + 3;
    let rest = &line[start..];
    let close = rest.find('"')?;
    let mut request = rest[..close].split_whitespace();
    let method = request.next()?.to_string();
    let path = request.next()?.to_string();
    let status = rest[close + 1..]
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .get(..3)?
        .parse()
        .ok()?;
    Some(Request {
        method,
        path,
        status,
    })
}

pub(crate) fn log_offset(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// What a request was for, in the agent's terms. The SDK adds
/// `?x-id=GetObject` and the like to object requests; a listing has
/// `list-type=2`.
fn classify(request: &Request) -> &'static str {
    let (p, query) = request
        .path
        .split_once('?')
        .unwrap_or((request.path.as_str(), ""));
    let m = request.method.as_str();
    if p.starts_with("/latest/") {
        "IMDS"
    } else if query.contains("list-type") {
        "LIST"
    } else if p.contains("/leases/") {
        match m {
            "PUT" => "lease PUT",
            "DELETE" => "lease DELETE",
            _ => "lease GET",
        }
    } else if p.contains("/halted/") {
        match (m, request.status) {
            ("PUT", _) => "halt PUT",
            (_, 200) => "halt GET 200",
            _ => "halt GET 404",
        }
    } else if p.contains("/nodes/") {
        "report PUT"
    } else if p.ends_with("/InRelease") {
        match request.status {
            304 => "InRelease 304",
            _ => "InRelease 200",
        }
    } else if p.contains("/pool/") {
        ".deb GET"
    } else if p.contains("/binary-") {
        "Packages GET"
    } else if p.ends_with("/rollout.toml") || p.contains("/by-hash/") {
        "rollout.toml GET"
    } else {
        "other"
    }
}

/// Billed as GET (GET, HEAD, other) or PUT (PUT, COPY, POST, LIST);
/// DELETE is free.
fn price_class(request: &Request) -> Option<bool> {
    match request.method.as_str() {
        "DELETE" => None,
        "PUT" | "POST" | "COPY" => Some(true),
        _ => Some(classify(request) == "LIST"),
    }
}

/// Requests of a window, by what they were for.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    by_kind: BTreeMap<&'static str, u64>,
    statuses: BTreeMap<u16, u64>,
    pub(crate) gets: u64,
    pub(crate) puts: u64,
    deletes: u64,
    /// Lease slots granted twice (PUT 200) before a DELETE: moto's
    /// conditional writes are not atomic.
    pub(crate) double_grants: u64,
    pub(crate) total: u64,
}

pub(crate) fn tally(requests: &[Request], suite_marks: &[String]) -> Tally {
    let mut t = Tally::default();
    let mut held: BTreeMap<&str, bool> = BTreeMap::new();
    for r in requests {
        if !suite_marks.iter().any(|m| r.path.contains(m.as_str())) {
            continue;
        }
        t.total += 1;
        *t.by_kind.entry(classify(r)).or_default() += 1;
        *t.statuses.entry(r.status).or_default() += 1;
        match price_class(r) {
            Some(true) => t.puts += 1,
            Some(false) => t.gets += 1,
            None => t.deletes += 1,
        }
        if classify(r).starts_with("lease") {
            let slot = r.path.split_once('?').map_or(r.path.as_str(), |(p, _)| p);
            match (r.method.as_str(), r.status) {
                ("PUT", 200) if held.insert(slot, true) == Some(true) => {
                    t.double_grants += 1;
                }
                ("DELETE", 204) => {
                    held.insert(slot, false);
                }
                _ => {}
            }
        }
    }
    t
}

impl Tally {
    pub(crate) fn describe(&self) -> String {
        let kinds: Vec<String> = self
            .by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect();
        format!(
            "{} requests ({}); statuses {}",
            self.total,
            kinds.join(", "),
            statuses.join(" ")
        )
    }

    pub(crate) fn kind(&self, kind: &str) -> u64 {
        self.by_kind.get(kind).copied().unwrap_or(0)
    }
}

//! Reading the file key by key: a [`Section`] is one table of it, whose
//! `take_*` readers remove a key, check its TOML type and record a problem
//! under the key's full name, so one problem does not hide the next.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use toml::{Table, Value};

/// Collects problems as `key: message` so all are reported at once.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<String>);

/// One table of the file. Each `take_*` removes its key and checks its TOML
/// type; a problem is recorded under the key's full name (`agent.interval`)
/// and reading goes on. [`Section::finish`] reports the keys nobody took.
pub(super) struct Section<'p> {
    /// `None` for the top level of the file.
    name: Option<&'static str>,
    table: Table,
    problems: &'p mut Problems,
}

impl<'p> Section<'p> {
    pub(super) fn new(
        name: Option<&'static str>,
        table: Table,
        problems: &'p mut Problems,
    ) -> Self {
        Section {
            name,
            table,
            problems,
        }
    }

    pub(super) fn problem(&mut self, key: &str, message: impl std::fmt::Display) {
        let problem = match self.name {
            Some(section) => format!("{section}.{key}: {message}"),
            None => format!("{key}: {message}"),
        };
        self.problems.0.push(problem);
    }

    /// `result`'s value, or `None` with its error recorded under `key`.
    pub(super) fn check<T>(&mut self, key: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.problem(key, message)).ok()
    }

    /// Removes `key` and converts its value; a value of another type is
    /// recorded as "expected `expected`, found ...".
    fn take<T>(
        &mut self,
        key: &str,
        expected: &str,
        convert: impl FnOnce(Value) -> Result<T, Value>,
    ) -> Option<T> {
        let value = self.table.remove(key)?;
        match convert(value) {
            Ok(value) => Some(value),
            Err(other) => {
                self.problem(
                    key,
                    format!("expected {expected}, found {}", describe(&other)),
                );
                None
            }
        }
    }

    /// Reads `key` with `read`; its absence is a problem too.
    pub(super) fn need<T>(
        &mut self,
        key: &str,
        read: impl FnOnce(&mut Self, &str) -> Option<T>,
    ) -> Option<T> {
        if self.table.contains_key(key) {
            read(self, key)
        } else {
            self.problem(key, "missing (required)");
            None
        }
    }

    pub(super) fn take_str(&mut self, key: &str) -> Option<String> {
        self.take(key, "a string", string)
    }

    pub(super) fn take_path(&mut self, key: &str) -> Option<PathBuf> {
        let text = self.take(key, "a path (a string)", string)?;
        if text.is_empty() {
            self.problem(key, "expected a path, found an empty string");
            return None;
        }
        Some(PathBuf::from(text))
    }

    /// A duration within `range`, bounded here where it is parsed: the
    /// agent adds these to times and sleeps on them, and a duration past
    /// the calendar (`"300000years"`) must be a named config error, never
    /// an overflow in a cycle. Out of range is reported with the range.
    pub(super) fn take_duration(
        &mut self,
        key: &str,
        range: RangeInclusive<Duration>,
    ) -> Option<Duration> {
        let text = self.take(key, "a string like \"60s\"", string)?;
        let parsed = duration_in(&text, &range);
        self.check(key, parsed)
    }

    pub(super) fn take_u64(&mut self, key: &str) -> Option<u64> {
        self.take(key, "a whole number (0 or more)", |value| match value {
            Value::Integer(n) => u64::try_from(n).map_err(|_| value),
            other => Err(other),
        })
    }

    /// A list of strings. An element of another type is recorded under
    /// `key[i]` and comes back as `None`, so the others keep their index.
    pub(super) fn take_str_list(&mut self, key: &str) -> Option<Vec<Option<String>>> {
        let items = self.take(
            key,
            "a list of strings like [\"myapp\"]",
            |value| match value {
                Value::Array(items) => Ok(items),
                other => Err(other),
            },
        )?;
        let list = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match string(item) {
                Ok(text) => Some(text),
                Err(other) => {
                    let found = describe(&other);
                    self.problem(
                        &format!("{key}[{i}]"),
                        format!("expected a string, found {found}"),
                    );
                    None
                }
            })
            .collect();
        Some(list)
    }

    /// A `[table]` of the top level.
    pub(super) fn take_table(&mut self, key: &str) -> Option<Table> {
        self.take(key, "a table", |value| match value {
            Value::Table(table) => Ok(table),
            other => Err(other),
        })
    }

    /// Reports every key and table that no reader took.
    pub(super) fn finish(mut self) {
        for (key, value) in std::mem::take(&mut self.table) {
            match value {
                Value::Table(_) => self.problem(&key, "unknown table"),
                _ => self.problem(&key, "unknown key"),
            }
        }
    }
}

/// `text` as a duration (humantime: `60s`, `5m`, `7d`) within `range`;
/// out of range, a message naming the range ("is out of range: 0s to
/// 1day"). For the config's keys and the command line's options alike.
pub(crate) fn duration_in(
    text: &str,
    range: &RangeInclusive<Duration>,
) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like \"60s\" or \"5m\": {e}"))?;
    match range.contains(&duration) {
        true => Ok(duration),
        false => Err(format!(
            "{text:?} is out of range: {} to {}",
            humantime::format_duration(*range.start()),
            humantime::format_duration(*range.end())
        )),
    }
}

fn string(value: Value) -> Result<String, Value> {
    match value {
        Value::String(text) => Ok(text),
        other => Err(other),
    }
}

/// A value as a problem names it: its TOML type, and the value if scalar.
fn describe(value: &Value) -> String {
    match value {
        Value::String(text) => format!("string {text:?}"),
        Value::Integer(n) => format!("integer {n}"),
        Value::Float(x) => format!("float {x}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("datetime {d}"),
        Value::Array(_) => "an array".into(),
        Value::Table(_) => "a table".into(),
    }
}

//! What the messages say (Slack's escaping, the texts of rollbacks and
//! suite changes), and who and where they come from.

use std::fmt::Display;

use crate::state::Pending;

use super::MAX_TEXT_CHARS;

/// `text` as Slack wants it: `&`, `<` and `>` escaped (they start links
/// and mentions in its markup), and cut at [`MAX_TEXT_CHARS`].
pub(super) fn slack_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_TEXT_CHARS + 16));
    for (i, c) in text.chars().enumerate() {
        if i == MAX_TEXT_CHARS {
            out.push_str(" [cut]");
            break;
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

// ---- what the messages say -------------------------------------------------

/// The text of a `rollback` event: "myapp 1.0 to 1.1 failed: ERROR", where
/// ERROR (the install error) says whether the old version is back.
pub fn rollback_text(pending: &Pending, error: &impl Display) -> String {
    let changes: Vec<String> = pending
        .packages
        .iter()
        .map(|p| match &p.from {
            Some(from) => format!("{} {} to {}", p.name, from.version, p.to.version),
            None => format!("{} {} (first install)", p.name, p.to.version),
        })
        .collect();
    format!("{} failed: {error}", changes.join(", "))
}

/// The text of a publish or promote: the suite, the repository, and the
/// command's report (what was added, promoted or dropped, and the new
/// InRelease).
pub fn suite_change_text(repository: &impl Display, suite: &str, report: &[String]) -> String {
    format!("suite {suite} of {repository}\n{}", report.join("\n"))
}

// ---- who and where ---------------------------------------------------------

/// This machine's name (`/proc/sys/kernel/hostname`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// "USER@HOST", and the CI run when the environment names one (GitHub
/// Actions, GitLab CI, Jenkins): who ran a publisher command, and where.
pub(super) fn who_and_where() -> String {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let user = env("USER")
        .or_else(|| env("LOGNAME"))
        .unwrap_or_else(user_of_process);
    let mut who = format!("{user}@{}", hostname());
    let github = match (
        env("GITHUB_SERVER_URL"),
        env("GITHUB_REPOSITORY"),
        env("GITHUB_RUN_ID"),
    ) {
        (Some(server), Some(repository), Some(run)) => {
            Some(format!("{server}/{repository}/actions/runs/{run}"))
        }
        _ => None,
    };
    if let Some(run) = github
        .or_else(|| env("CI_JOB_URL"))
        .or_else(|| env("BUILD_URL"))
    {
        who.push_str(&format!(" ({run})"));
    }
    who
}

/// The name of the process's user from /etc/passwd, else "uid N".
fn user_of_process() -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "unknown-user".into();
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id = fields.nth(1)?;
            (id.parse() == Ok(uid)).then(|| name.to_string())
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

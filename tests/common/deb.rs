//! .deb packages built with dpkg-deb: a name, a version, optionally a payload, a dependency
//! and a postinst.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::cmd::{mkdir, random_bytes, run, set_mode, write_file};

/// What [`build_deb`] builds.
#[derive(Debug, Clone, Copy)]
pub struct DebSpec<'a> {
    pub name: &'a str,
    pub version: &'a str,
    /// "amd64" or "all"
    pub arch: &'a str,
    /// Size of a random file shipped as /usr/share/NAME/payload; 0 = no payload.
    pub payload_bytes: usize,
    pub depends: Option<&'a str>,
    /// postinst body; `#!/bin/sh\nset -e\n` is prepended unless it starts with `#!`.
    /// dpkg runs it with `--force-script-chrootless`, i.e. on the host with `$DPKG_ROOT`
    /// set to the sandbox: write to `"$DPKG_ROOT/..."`.
    pub postinst: Option<&'a str>,
}

impl<'a> DebSpec<'a> {
    /// An amd64 package without payload, dependencies or scripts.
    pub fn new(name: &'a str, version: &'a str) -> DebSpec<'a> {
        DebSpec {
            name,
            version,
            arch: "amd64",
            payload_bytes: 0,
            depends: None,
            postinst: None,
        }
    }
}

/// Build `OUT_DIR/NAME_VERSION_ARCH.deb` (epoch left out of the file name) with dpkg-deb.
/// It ships /usr/share/NAME/VERSION (the version and a newline) and, when asked, a random
/// (incompressible) /usr/share/NAME/payload.
pub fn build_deb(out_dir: &Path, spec: &DebSpec) -> PathBuf {
    let tree = tempfile::tempdir().expect("creating a tempdir for a package tree");
    let root = tree.path();
    // dpkg-deb packs the tree root as ./ with its mode; a tempdir is 0700.
    set_mode(root, 0o755);
    let debian = root.join("DEBIAN");
    let share = root.join("usr/share").join(spec.name);
    for dir in [&debian, &share] {
        mkdir(dir);
    }
    for dir in [
        debian.clone(),
        root.join("usr"),
        root.join("usr/share"),
        share.clone(),
    ] {
        set_mode(&dir, 0o755);
    }
    let mut control = format!(
        "Package: {}\nVersion: {}\nArchitecture: {}\nMaintainer: pulldeploy tests <tests@example.invalid>\n\
         Section: misc\nPriority: optional\nInstalled-Size: {}\n",
        spec.name,
        spec.version,
        spec.arch,
        spec.payload_bytes.div_ceil(1024) + 1
    );
    if let Some(dep) = spec.depends {
        let _ = writeln!(control, "Depends: {dep}");
    }
    let _ = writeln!(
        control,
        "Description: pulldeploy test package {}\n test fixture built by tests/common",
        spec.name
    );
    write_file(&debian.join("control"), control);
    set_mode(&debian.join("control"), 0o644);
    if let Some(body) = spec.postinst {
        let script = if body.starts_with("#!") {
            body.to_string()
        } else {
            format!("#!/bin/sh\nset -e\n{body}\n")
        };
        write_file(&debian.join("postinst"), script);
        set_mode(&debian.join("postinst"), 0o755);
    }
    write_file(&share.join("VERSION"), format!("{}\n", spec.version));
    set_mode(&share.join("VERSION"), 0o644);
    if spec.payload_bytes > 0 {
        write_file(&share.join("payload"), random_bytes(spec.payload_bytes));
        set_mode(&share.join("payload"), 0o644);
    }
    mkdir(out_dir);
    let file_version = spec
        .version
        .split_once(':')
        .map_or(spec.version, |(_, v)| v);
    let deb = out_dir.join(format!("{}_{}_{}.deb", spec.name, file_version, spec.arch));
    run(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group", "-Zgzip"])
            .arg(root)
            .arg(&deb),
        "dpkg-deb --build",
    );
    deb
}

//! Records the commit the binary is built from, for `teeway --version` and `teeway_build_info`.
//!
//! `TEEWAY_COMMIT` in the environment wins (a container build may have no `.git`; the
//! Dockerfile passes its `REVISION` build argument); otherwise `git rev-parse`; otherwise
//! `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=TEEWAY_COMMIT");
    let commit = std::env::var("TEEWAY_COMMIT")
        .ok()
        .filter(|c| !c.is_empty() && c != "unknown")
        .or_else(|| {
            // Rebuild when HEAD moves: HEAD itself, and the branch file it points at.
            if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
                println!("cargo:rerun-if-changed={dir}/HEAD");
                if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
                    println!("cargo:rerun-if-changed={dir}/{head}");
                }
                println!("cargo:rerun-if-changed={dir}/packed-refs");
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TEEWAY_COMMIT={commit}");
}

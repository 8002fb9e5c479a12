//! Project automation: `cargo xtask <command>` (the alias lives in `.cargo/config.toml`).
//!
//! - `ci`: every check a change must pass, in order, stopping at the first failure: rustfmt,
//!   clippy with `-D warnings`, the tests, rustdoc with `-D warnings`, each umbrella feature
//!   built on its own, and cargo-deny when it is installed.
//! - `fmt`, `clippy`, `test`, `doc`, `features`, `deny`: one check each.
//! - `bench [--quick]`: runs every comparison project `benches/*/Cargo.toml` and rewrites
//!   `docs/benchmarks.md` with the date, the machine, the toolchain, the exact command of each
//!   section and its output. A project that fails is written down as failed, with its error.
//!
//! Only the standard library is used, so the tool builds in seconds on a clean clone.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// Each umbrella feature that must build on its own (`None`: no feature at all).
const FEATURES: [Option<&str>; 11] = [
    None,
    Some("mock"),
    Some("saga"),
    Some("scheduler"),
    Some("supervisor"),
    Some("loadmanager"),
    Some("sqlite"),
    Some("postgres"),
    Some("tower"),
    Some("system"),
    Some("full"),
];

const USAGE: &str = "usage: cargo xtask <command>

commands:
  ci              fmt, clippy, test, doc, features and deny, stopping at the first failure
  fmt             cargo fmt --all -- --check
  clippy          cargo clippy --workspace --all-targets --all-features -- -D warnings
  test            cargo test --workspace --all-features
  doc             cargo doc --workspace --no-deps --all-features with RUSTDOCFLAGS=-D warnings
  features        cargo check -p architectlm --no-default-features [--features X], each X alone
  deny            cargo deny check (skipped when cargo-deny is not installed)
  bench [--quick] run every benches/*/Cargo.toml project and rewrite docs/benchmarks.md";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::FAILURE;
    };
    let root = workspace_root();
    let result = match cmd.as_str() {
        "ci" => ci(&root),
        "fmt" => fmt(&root),
        "clippy" => clippy(&root),
        "test" => test(&root),
        "doc" => doc(&root),
        "features" => features(&root),
        "deny" => deny(&root),
        "bench" => bench(&root, args.iter().any(|a| a == "--quick")),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

/// The repository root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

fn cargo() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Runs `cargo args...` in `root` with extra environment, inheriting the terminal.
fn run(root: &Path, args: &[&str], envs: &[(&str, &str)]) -> Result {
    let shown = format!(
        "{}cargo {}",
        envs.iter()
            .map(|(k, v)| format!("{k}=\"{v}\" "))
            .collect::<String>(),
        args.join(" ")
    );
    eprintln!("\n==> {shown}");
    let status = Command::new(cargo())
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(root)
        .status()
        .map_err(|e| format!("could not run `{shown}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown}` failed ({status})"))
    }
}

fn ci(root: &Path) -> Result {
    fmt(root)?;
    clippy(root)?;
    test(root)?;
    doc(root)?;
    features(root)?;
    deny(root)?;
    eprintln!("\nxtask ci: all checks passed");
    Ok(())
}

fn fmt(root: &Path) -> Result {
    run(root, &["fmt", "--all", "--", "--check"], &[])
}

fn clippy(root: &Path) -> Result {
    run(
        root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )
}

fn test(root: &Path) -> Result {
    run(root, &["test", "--workspace", "--all-features"], &[])
}

fn doc(root: &Path) -> Result {
    run(
        root,
        &["doc", "--workspace", "--no-deps", "--all-features"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )
}

fn features(root: &Path) -> Result {
    for feature in FEATURES {
        let mut args = vec!["check", "-p", "architectlm", "--no-default-features"];
        if let Some(f) = feature {
            args.extend(["--features", f]);
        }
        run(root, &args, &[])?;
    }
    Ok(())
}

fn deny(root: &Path) -> Result {
    let installed = Command::new(cargo())
        .args(["deny", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!("\n==> cargo deny check: skipped (cargo-deny is not installed)");
        return Ok(());
    }
    run(root, &["deny", "check", "bans", "licenses", "sources"], &[])?;
    // The advisory database is fetched from GitHub; without network access that check cannot
    // run, which is reported rather than failing the other checks' verdict.
    eprintln!("\n==> cargo deny check advisories");
    let out = Command::new(cargo())
        .args(["deny", "check", "advisories"])
        .current_dir(root)
        .output()
        .map_err(|e| format!("could not start cargo deny: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(())
    } else if stderr.contains("failed to fetch advisory database") {
        eprintln!("    skipped: the advisory database could not be fetched (no network access)");
        Ok(())
    } else {
        eprintln!("{stderr}");
        Err("cargo deny check advisories failed".into())
    }
}

// ----- bench ----------------------------------------------------------------------------

/// The outcome of one comparison project.
struct Section {
    project: String,
    command: String,
    outcome: std::result::Result<String, String>,
}

fn bench(root: &Path, quick: bool) -> Result {
    let benches = root.join("benches");
    let mut projects: Vec<PathBuf> = fs::read_dir(&benches)
        .map_err(|e| format!("cannot list {}: {e}", benches.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path().join("Cargo.toml")))
        .filter(|manifest| manifest.is_file())
        .collect();
    projects.sort();
    if projects.is_empty() {
        return Err(format!("no benches/*/Cargo.toml under {}", root.display()));
    }
    let mut sections = Vec::new();
    for manifest in &projects {
        let rel = manifest
            .strip_prefix(root)
            .unwrap_or(manifest)
            .display()
            .to_string();
        let project = manifest
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| rel.clone());
        let mut args = vec!["run", "--release", "--manifest-path", rel.as_str(), "--"];
        if quick {
            args.push("--quick");
        }
        let command = format!("cargo {}", args.join(" "));
        eprintln!("\n==> {command}");
        let output = Command::new(cargo())
            .args(&args)
            .current_dir(root)
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .output();
        let outcome = match output {
            Err(e) => Err(format!("could not start: {e}")),
            Ok(out) => {
                let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                let stderr = String::from_utf8_lossy(&out.stderr);
                if out.status.success() && !stdout.is_empty() {
                    Ok(stdout)
                } else {
                    let tail: Vec<&str> = stderr.lines().rev().take(25).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    let why = if out.status.success() {
                        "exited successfully but printed nothing".to_owned()
                    } else {
                        format!("failed ({})", out.status)
                    };
                    Err(format!("{why}\n\n{}", tail.join("\n")))
                }
            }
        };
        match &outcome {
            Ok(_) => eprintln!("    ok"),
            Err(e) => eprintln!("    FAILED: {}", e.lines().next().unwrap_or_default()),
        }
        sections.push(Section {
            project,
            command,
            outcome,
        });
    }
    let doc = render(&sections, quick);
    let path = root.join("docs").join("benchmarks.md");
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    fs::write(&path, doc).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    eprintln!("\nwrote {}", path.display());
    let failed: Vec<&str> = sections
        .iter()
        .filter(|s| s.outcome.is_err())
        .map(|s| s.project.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "benchmark projects failed: {} (recorded in docs/benchmarks.md)",
            failed.join(", ")
        ))
    }
}

fn render(sections: &[Section], quick: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench{}`; do not edit by hand. Each section below is the output \
         of one comparison project under `benches/`, which runs our implementation and its peers \
         or baseline in the same invocation, so ratios within a section compare like with like. \
         Figures are medians and p99 from one machine; compare ratios rather than absolute numbers across runs.\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| date (UTC) | {} |", utc_now());
    let _ = writeln!(
        s,
        "| mode | {} |",
        if quick {
            "quick (`--quick`, smoke figures)"
        } else {
            "full"
        }
    );
    let _ = writeln!(s, "| machine | {} |", machine());
    let _ = writeln!(s, "| toolchain | {} |", rustc_version());
    let _ = writeln!(s);
    for section in sections {
        match &section.outcome {
            Ok(out) => {
                let _ = writeln!(s, "{out}\n");
                let _ = writeln!(s, "Command: `{}`\n", section.command);
            }
            Err(e) => {
                let _ = writeln!(s, "### {} (FAILED)\n", section.project);
                let _ = writeln!(s, "Command: `{}`\n", section.command);
                let _ = writeln!(
                    s,
                    "The project did not produce figures: {}\n",
                    first_line(e)
                );
                let _ = writeln!(s, "```text\n{}\n```\n", e.trim_end());
            }
        }
    }
    s
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// Cores, CPU model and memory, from the standard library and `/proc`.
fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".to_owned());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown memory".to_owned());
    let os = format!("{} {}", env::consts::OS, env::consts::ARCH);
    format!("{cores} cores available ({model}), {mem} RAM, {os}")
}

fn rustc_version() -> String {
    Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned()))
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown rustc".to_owned())
}

/// The current UTC time as `YYYY-MM-DD HH:MM`, without a date library.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_computed_correctly() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn a_failed_project_is_recorded_with_its_error() {
        let doc = render(
            &[
                Section {
                    project: "core".into(),
                    command: "cargo run --release --manifest-path benches/core/Cargo.toml --"
                        .into(),
                    outcome: Ok("### Core\n\n| a | b |".into()),
                },
                Section {
                    project: "saga".into(),
                    command: "cargo run --release --manifest-path benches/saga/Cargo.toml --"
                        .into(),
                    outcome: Err("failed (exit status: 101)\n\nerror: linking failed".into()),
                },
            ],
            true,
        );
        assert!(doc.contains("### Core"));
        assert!(
            doc.contains(
                "Command: `cargo run --release --manifest-path benches/core/Cargo.toml --`"
            )
        );
        assert!(doc.contains("### saga (FAILED)"));
        assert!(doc.contains("error: linking failed"));
        assert!(doc.contains("| date (UTC) |"));
    }
}

//! The one skip policy of Cairn's tests, shared by every crate's tests (a dev-dependency only).
//!
//! A test that needs something the machine may lack (a client tool, root, a device node) asks
//! here first. If it is there, the test runs. If not, the answer depends on where it runs:
//!
//! * on a developer's machine the test is skipped, and says so: `SKIP <test>: <why>` goes to
//!   the real stderr, because libtest captures `eprintln!` of passing tests and a silent skip
//!   looks like a pass;
//! * under CI (`CI` set and not empty; `ci/test.sh` exports `CI=1`) the test fails instead,
//!   naming what is missing and the Debian package that has it, so a gate that was meant to run
//!   can never pass by not running.
//!
//! [`skip`] is for the other kind of skip, a test that does not apply to how the suite was
//! configured (another NBD server under test); it skips under CI too, and so does
//! [`require_kernel_feature`], for a kernel feature the machine's kernel lacks (the `nbd`
//! module on CI's machine): no package installs it.

use std::fmt::Display;
use std::io::Write;
use std::path::Path;

/// Directories searched for tools besides `PATH`: administration tools (losetup, mkfs.ext4)
/// live there and a non-root `PATH` often lacks them.
const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

/// True when the tests run under CI, where nothing may be skipped for want of a tool.
pub fn under_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// True when `tool` is on `PATH` (or in an sbin directory). Otherwise the test is skipped (false
/// is returned) or, under CI, fails; `apt_pkg` is the Debian package that provides it.
#[track_caller]
pub fn require_tool(tool: &str, apt_pkg: &str) -> bool {
    require(
        on_path(tool),
        format_args!("needs {tool} (apt-get install {apt_pkg}; see PACKAGES in ci/test.sh)"),
    )
}

/// True when the process runs as root. Otherwise the test is skipped or, under CI, fails;
/// `why` says what root is needed for.
#[track_caller]
pub fn require_root(why: &str) -> bool {
    // SAFETY: geteuid(2) takes no arguments, touches no memory and cannot fail.
    let euid = unsafe { libc::geteuid() };
    require(
        euid == 0,
        format_args!("needs root ({why}); euid is {euid}"),
    )
}

/// True when `available`. Otherwise the test is skipped or, under CI, fails; `missing` says
/// what is missing and how to get it.
#[track_caller]
pub fn require(available: bool, missing: impl Display) -> bool {
    if available {
        return true;
    }
    let reason = format!("{}: {missing}", test_name());
    assert!(
        !under_ci(),
        "CI is set, so a missing requirement fails the test instead of skipping it: {reason}"
    );
    say(&format!("SKIP {reason}"));
    false
}

/// True when the kernel has `feature` (`available`). Otherwise the test is skipped with the
/// reason, under CI too: a kernel feature (a module the machine's kernel does not ship) is not
/// a missing package that CI could install, so its absence is reported, never a failure.
#[track_caller]
pub fn require_kernel_feature(available: bool, feature: impl Display) -> bool {
    if !available {
        say(&format!(
            "SKIP {}: the kernel has no {feature} (a kernel feature, not a package: skipped under CI too)",
            test_name()
        ));
    }
    available
}

/// Skips a test that does not apply to this configuration of the suite (not for a missing
/// tool or privilege: those go through [`require`]). Prints why; the caller returns.
pub fn skip(why: impl Display) {
    say(&format!("SKIP {}: {why}", test_name()));
}

/// Prints a note about what a passing test could not observe this time, on the real stderr.
pub fn note(what: impl Display) {
    say(&format!("NOTE {}: {what}", test_name()));
}

/// The running test: libtest names each test's thread after it.
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string()
}

/// Writes a line to the process's stderr, past libtest's capture of `eprintln!`.
fn say(line: &str) {
    drop(writeln!(std::io::stderr(), "{line}"));
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(|d| Path::new(d).to_path_buf()))
        .any(|dir| dir.join(tool).is_file())
}

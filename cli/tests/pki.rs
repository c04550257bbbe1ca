//! The `cellplane pki` commands, run as a user would: the real binary, real files.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

use std::process::{Command, Output};

use cellplane_transport::{Credentials, Identity};

fn cellplane(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellplane")).args(args).output().unwrap()
}

#[test]
fn init_then_issue_writes_credentials_that_name_the_component() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(cellplane(&["pki", "init", "--dir", d, "--region", "eu1"]).status.success());
    let out = cellplane(&[
        "pki", "issue", "--dir", d, "--kind", "client", "--id", "acme", "--role", "operator",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let creds = Credentials::load(dir.path(), "acme").unwrap();
    assert_eq!(creds.identity.to_string(), "cellplane://client/acme/operator");
    let out = cellplane(&["pki", "issue", "--dir", d, "--kind", "cell", "--id", "cell-a"]);
    assert!(out.status.success());
    assert!(matches!(Credentials::load(dir.path(), "cell-a").unwrap().identity, Identity::Cell(_)));
}

#[test]
fn bad_input_exits_2_with_a_message_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // No CA yet.
    let out = cellplane(&["pki", "issue", "--dir", d, "--kind", "host", "--id", "h1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cellplane pki init"));
    assert!(cellplane(&["pki", "init", "--dir", d]).status.success());
    let ca_before = std::fs::read(dir.path().join("ca.key")).unwrap();
    // A second init must not replace the CA.
    assert_eq!(cellplane(&["pki", "init", "--dir", d]).status.code(), Some(2));
    assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), ca_before);
    // An id that is not a DNS label.
    let out = cellplane(&["pki", "issue", "--dir", d, "--kind", "host", "--id", "Host_1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("Host_1.crt").exists());
    // An unknown kind and a missing subcommand are usage errors.
    assert_eq!(
        cellplane(&["pki", "issue", "--dir", d, "--kind", "dog", "--id", "x"]).status.code(),
        Some(2)
    );
    assert_eq!(cellplane(&[]).status.code(), Some(2));
}

#[test]
fn help_explains_each_subcommand() {
    let out = cellplane(&["pki", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("init") && help.contains("issue"), "{help}");
    assert!(help.contains("certificate"), "{help}");
}

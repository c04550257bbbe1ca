//! Capability detection at registration: what this host can really run, so the scheduler sends
//! containers and VMs only where they can run.
//!
//! - containers: the `process` driver runs a container workload's command as a plain process,
//!   so an agent with it can take containers; an OCI runtime (`runc`, `crun`) on `PATH` is
//!   reported for the container driver to come;
//! - VMs: `/dev/kvm` existing proves nothing here (on these machines it is a software nested
//!   virtualizer that cannot boot a standard guest, see DESIGN.md), and there is no VM driver
//!   yet to prove a boot — so a host offers VMs only once a driver has booted one.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cellplane_api::Capabilities;

/// What detection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// An OCI runtime on `PATH`, if any.
    pub oci_runtime: Option<PathBuf>,
    /// Whether `/dev/kvm` exists (reported, not trusted).
    pub kvm_device: bool,
    /// What the host offers the scheduler.
    pub capabilities: Capabilities,
}

impl Detected {
    /// One line for people.
    pub fn describe(&self) -> String {
        let oci = match &self.oci_runtime {
            Some(path) => format!("OCI runtime {}", path.display()),
            None => "no OCI runtime".into(),
        };
        let kvm = if self.kvm_device { "/dev/kvm present, unverified" } else { "no /dev/kvm" };
        format!(
            "containers: {} (process driver; {oci}); VMs: {} (no VM driver yet; {kvm})",
            yes(self.capabilities.container),
            yes(self.capabilities.vm),
        )
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Detects this machine's capabilities for an agent running the process driver.
pub fn detect() -> Detected {
    let path = std::env::var_os("PATH").unwrap_or_default();
    Detected {
        oci_runtime: find_executable(&["runc", "crun"], &path),
        kvm_device: Path::new("/dev/kvm").exists(),
        capabilities: Capabilities { container: true, vm: false },
    }
}

/// The first of `names` that is an executable file in a directory of `path` (a `PATH` value).
pub fn find_executable(names: &[&str], path: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::split_paths(path).find_map(|dir| {
        names.iter().map(|name| dir.join(name)).find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_counts_only_when_it_is_an_executable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = std::env::join_paths([dir.path()]).unwrap();
        assert_eq!(find_executable(&["runc"], &path), None);
        let runc = dir.path().join("runc");
        std::fs::write(&runc, "#!/bin/sh\n").unwrap();
        assert_eq!(find_executable(&["runc"], &path), None, "not executable");
        std::fs::set_permissions(&runc, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_executable(&["runc", "crun"], &path), Some(runc));
        std::fs::create_dir(dir.path().join("crun")).unwrap();
        assert_eq!(find_executable(&["crun"], &path), None, "a directory is not a runtime");
    }

    #[test]
    fn vms_are_never_offered_on_the_strength_of_the_device_alone() {
        assert!(!detect().capabilities.vm);
        assert!(detect().capabilities.container);
    }
}

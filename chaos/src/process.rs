//! Real child processes for process-level harnesses (tests, benchmarks, the demo): started,
//! waited for, and killed — really — when the harness is done with them, even when it fails.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A child process, SIGKILLed and reaped when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program ARGS` in `dir` (stderr discarded) and returns it with the first line it
/// prints; an empty line means it exited before printing one.
pub fn spawn(program: &Path, args: &[&str], dir: &Path) -> std::io::Result<(Killed, String)> {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
    let child = Killed(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    Ok((child, line))
}

/// The address after the word `on` in a line like `cell c1 serving on 127.0.0.1:7101 ...`.
pub fn address(line: &str) -> Option<SocketAddr> {
    let mut words = line.split_whitespace();
    words.by_ref().find(|w| *w == "on")?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_the_word_after_on() {
        let line = "cell c1 serving on 127.0.0.1:7101 at epoch 3\n";
        assert_eq!(address(line), Some("127.0.0.1:7101".parse().unwrap()));
        assert_eq!(address("router of region r serving on nowhere"), None);
        assert_eq!(address("no address here"), None);
    }

    #[test]
    fn a_spawned_child_is_killed_when_dropped() {
        let dir = std::env::temp_dir();
        let (child, line) =
            spawn(Path::new("sh"), &["-c", "echo ready; exec sleep 60"], &dir).unwrap();
        assert_eq!(line, "ready\n");
        let pid = child.0.id();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(child);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "still running after drop");
    }
}

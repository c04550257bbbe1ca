//! The purity rule for cores, as a scanner.
//!
//! A core is any file under a `src/core/` directory of a workspace crate, and the whole model
//! crate (`api/src/`). Cores take time, randomness and IO results as inputs (`handle_*(now, ..)`)
//! and hand effects out (`poll_*()`); they never fetch them themselves.

/// Calls and paths a core must not use, with the reason printed when one is found.
pub const FORBIDDEN: &[(&str, &str)] = &[
    ("Instant::now", "reads the clock: take `now` as an input"),
    ("SystemTime::now", "reads the clock: take `now` as an input"),
    ("thread_rng", "draws randomness: take a seeded generator as an input"),
    ("rand::rng", "draws randomness: take a seeded generator as an input"),
    ("OsRng", "draws randomness: take a seeded generator as an input"),
    ("getrandom", "draws randomness: take a seeded generator as an input"),
    ("tokio::spawn", "spawns a task: return an effect instead"),
    ("thread::spawn", "spawns a thread: return an effect instead"),
    ("tokio::time", "uses timers: take `now` as an input and return deadlines"),
    ("std::fs", "does file IO: return an effect instead"),
    ("tokio::fs", "does file IO: return an effect instead"),
    ("std::net", "does network IO: return an effect instead"),
    ("tokio::net", "does network IO: return an effect instead"),
    ("quinn::", "does network IO: return an effect instead"),
    ("std::process", "starts processes: return an effect instead"),
    ("std::env::var", "reads the environment: take configuration as an input"),
];

/// One forbidden use found in a source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impurity {
    /// 1-based line number.
    pub line: usize,
    /// The forbidden pattern.
    pub pattern: &'static str,
    /// Why it is forbidden.
    pub reason: &'static str,
}

/// Every forbidden use in `source`, ignoring `//` comments.
pub fn impurities(source: &str) -> Vec<Impurity> {
    let mut found = Vec::new();
    for (index, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        for &(pattern, reason) in FORBIDDEN {
            if code.contains(pattern) {
                found.push(Impurity { line: index + 1, pattern, reason });
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_kind_of_impurity() {
        let source = "fn f() {\n    let t = std::time::Instant::now();\n    tokio::spawn(async {});\n    let _ = std::fs::read(\"x\");\n}\n";
        let found: Vec<_> = impurities(source).iter().map(|i| (i.line, i.pattern)).collect();
        assert_eq!(found, [(2, "Instant::now"), (3, "tokio::spawn"), (4, "std::fs")]);
    }

    #[test]
    fn comments_and_pure_code_pass() {
        let source = "// Instant::now is forbidden here\nfn f(now: u64) -> u64 { now + 1 } // not tokio::spawn\n";
        assert!(impurities(source).is_empty());
    }
}

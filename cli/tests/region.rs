//! `cellplane up`, `status`, `tenant create`, `apply`, `get`, `scale`, `delete`, `down`, run
//! as an operator would: the real binary, real processes, real files — and every bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

fn cellplane(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellplane")).args(args).current_dir(dir).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: &Output, code: i32, words: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(stderr.contains(words), "expected {words:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Stops the region whatever happens to the test.
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = cellplane(self.0, &["down", "--data", "region"]);
    }
}

#[test]
fn a_local_region_comes_up_serves_a_tenant_resumes_and_goes_down() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = format!(
        "region = \"local\"\nrouter = \"127.0.0.1:{}\"\n\n[[sites]]\nid = \"dc-1\"\nkind = \"cloud\"\nlocation = \"here\"\n\n\
         [[cells]]\nid = \"c1\"\nsite = \"dc-1\"\nlisten = \"127.0.0.1:{}\"\nhosts = 50\n\n\
         [[cells]]\nid = \"c2\"\nsite = \"dc-1\"\nlisten = \"127.0.0.1:{}\"\nhosts = 50\n",
        free_port(),
        free_port(),
        free_port()
    );
    std::fs::write(d.join("spec.toml"), spec).unwrap();
    let _down = Down(d);
    let up = ok(&cellplane(d, &["up", "--spec", "spec.toml", "--data", "region"]));
    assert!(up.contains("5 processes started"), "{up}");
    assert!(up.contains("region local is up"), "{up}");
    let status = ok(&cellplane(d, &["status", "--data", "region"]));
    assert!(status.contains("c1       healthy") && status.contains("c2       healthy"), "{status}");
    assert!(status.contains("tenants: 0"), "{status}");

    let made = ok(&cellplane(d, &["tenant", "create", "acme", "--data", "region"]));
    assert!(made.contains("tenant acme created"), "{made}");
    assert!(d.join("region/pki/acme.key").exists());
    let manifest = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 3\n  template:\n    spec:\n      containers:\n      - {name: web, image: \"nginx:1\", resources: {requests: {cpu: 500m, memory: 64Mi}}}\n---\napiVersion: cellplane/v1\nkind: Workload\nspec:\n  name: db\n  kind: {container: {image: \"postgres:16\"}}\n  controller: stateful\n  replicas: 2\n  resources: {cpu_milli: 1000, memory_mib: 1024}\n";
    std::fs::write(d.join("app.yaml"), manifest).unwrap();
    let tenant = ["--tenant", "acme", "--data", "region"];
    ok(&cellplane(d, &[&["apply", "-f", "app.yaml"][..], &tenant].concat()));
    let listed = ok(&cellplane(d, &[&["get"][..], &tenant].concat()));
    assert!(listed.contains("web") && listed.contains("db"), "{listed}");
    ok(&cellplane(d, &[&["scale", "web", "4"][..], &tenant].concat()));
    ok(&cellplane(d, &[&["delete", "db"][..], &tenant].concat()));
    let listed = ok(&cellplane(d, &[&["get"][..], &tenant].concat()));
    assert!(listed.contains("web") && !listed.contains("db"), "{listed}");
    assert!(
        listed.lines().any(|l| l.starts_with("web") && l.split_whitespace().nth(2) == Some("4")),
        "{listed}"
    );

    // Bad manifests change nothing: a second document that does not map sinks the first too.
    std::fs::write(d.join("half.yaml"), "apiVersion: v1\nkind: Pod\nmetadata: {name: solo}\nspec: {containers: [{name: a, image: x}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n").unwrap();
    fails(
        &cellplane(d, &[&["apply", "-f", "half.yaml"][..], &tenant].concat()),
        2,
        "half.yaml: document 2: kind: v1 Service has no mapping",
    );
    std::fs::write(d.join("broken.yaml"), "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n")
        .unwrap();
    fails(&cellplane(d, &[&["apply", "-f", "broken.yaml"][..], &tenant].concat()), 2, "line");
    std::fs::write(d.join("probe.yaml"), "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: x, livenessProbe: {}}]}\n").unwrap();
    fails(
        &cellplane(d, &[&["apply", "-f", "probe.yaml"][..], &tenant].concat()),
        2,
        "spec.containers[0].livenessProbe: no mapping",
    );
    fails(
        &cellplane(d, &[&["apply", "-f", "missing.yaml"][..], &tenant].concat()),
        2,
        "missing.yaml",
    );
    let listed = ok(&cellplane(d, &[&["get"][..], &tenant].concat()));
    assert!(!listed.contains("solo"), "a refused manifest applied something: {listed}");
    fails(&cellplane(d, &["get", "--tenant", "ghost", "--data", "region"]), 2, "no credentials");
    std::fs::write(d.join("region/pki/mallory.crt"), "not a certificate").unwrap();
    std::fs::write(d.join("region/pki/mallory.key"), "not a key").unwrap();
    fails(&cellplane(d, &["get", "--tenant", "mallory", "--data", "region"]), 2, "bad credentials");
    std::fs::write(
        d.join("types.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: w}\nspec: {replicas: many}\n",
    )
    .unwrap();
    fails(
        &cellplane(d, &[&["apply", "-f", "types.yaml"][..], &tenant].concat()),
        2,
        "spec.replicas: must be a whole number",
    );
    fails(
        &cellplane(d, &["tenant", "create", "huge", "--replicas", "0", "--data", "region"]),
        2,
        "tenant.quota.replicas",
    );
    // watch follows changes as they happen.
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_cellplane"))
        .args(["watch", "--tenant", "acme", "--data", "region"])
        .current_dir(d)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    ok(&cellplane(d, &[&["scale", "web", "3"][..], &tenant].concat()));
    let stdout = watch.stdout.take().unwrap();
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = sender.send(line);
    });
    let line = lines.recv_timeout(std::time::Duration::from_secs(60));
    let _ = watch.kill();
    let _ = watch.wait();
    let line = line.expect("watch printed nothing");
    assert!(line.starts_with("web "), "{line:?}");
    fails(&cellplane(d, &[&["get", "nothing"][..], &tenant].concat()), 1, "not found");

    // The SDK, end to end against the same processes.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        use cellplane_sdk::{Client, Error, Event, Workload};
        let router = std::fs::read_to_string(d.join("region/run/router.addr")).unwrap();
        let pki = d.join("region/pki");
        let client =
            Client::connect(router.trim().parse().unwrap(), "router", &pki, "acme").await.unwrap();
        let mut events = client.watch().await.unwrap();
        let vm = Workload::vm("vm", "debian-12").stateful().replicas(1).build().unwrap();
        client.apply(vm.clone()).await.unwrap();
        client.apply(vm).await.unwrap(); // the same spec again: a no-op, not a double
        let changed = loop {
            if let Some(Ok(Event::Changed(w))) = events.next().await
                && w.spec.name.as_str() == "vm"
            {
                break w;
            }
        };
        assert_eq!(changed.replicas.len(), 1);
        for _ in 0..200 {
            if client.get("vm").await.unwrap().replicas[0].host.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        client.vm_action("vm", 0, cellplane_sdk::model::VmAction::Reboot).await.unwrap();
        assert!(matches!(client.get("nothing").await, Err(Error::NotFound(_))));
        assert!(matches!(
            client.scale("web", 200_000).await,
            Err(Error::Invalid(_) | Error::QuotaExceeded(_))
        ));
        assert!(matches!(Workload::container("Bad_Name", "x").build(), Err(Error::Invalid(_))));
        client.delete("vm").await.unwrap();
        assert!(matches!(client.get("vm").await, Err(Error::NotFound(_))));
    });

    // Running `up` again resumes: nothing is started twice.
    let again = ok(&cellplane(d, &["up", "--spec", "spec.toml", "--data", "region"]));
    assert!(again.contains("0 processes started"), "{again}");

    let down = ok(&cellplane(d, &["down", "--data", "region"]));
    assert!(down.contains("stopped 5 processes"), "{down}");
    fails(&cellplane(d, &["status", "--data", "region"]), 1, "unreachable");
}

#[test]
fn bad_specs_and_missing_regions_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails(&cellplane(d, &["up", "--spec", "nope.toml", "--data", "r"]), 2, "nope.toml");
    std::fs::write(d.join("typo.toml"), "region = \"x\"\nsites = []\ncells = []\nrouterr = 1\n")
        .unwrap();
    fails(&cellplane(d, &["up", "--spec", "typo.toml", "--data", "r"]), 2, "routerr");
    std::fs::write(d.join("empty.toml"), "region = \"x\"\nsites = []\ncells = []\n").unwrap();
    fails(
        &cellplane(d, &["up", "--spec", "empty.toml", "--data", "r"]),
        2,
        "at least one [[cells]]",
    );
    std::fs::write(d.join("nosite.toml"), "region = \"x\"\nsites = []\n[[cells]]\nid = \"c1\"\nsite = \"dc-9\"\nlisten = \"127.0.0.1:1\"\n").unwrap();
    fails(
        &cellplane(d, &["up", "--spec", "nosite.toml", "--data", "r"]),
        2,
        "which no [[sites]] names",
    );
    fails(&cellplane(d, &["status", "--data", "r"]), 2, "no region");
    fails(&cellplane(d, &["down", "--data", "r"]), 2, "no region");
    fails(&cellplane(d, &["tenant", "create", "Bad_Name", "--data", "r"]), 2, "NAME");
}

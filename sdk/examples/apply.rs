//! Applies a small web workload and follows it until every replica runs.
//!
//! ```text
//! cargo run -p cellplane-sdk --example apply -- ROUTER_ADDR ROUTER_NAME PKI_DIR TENANT
//! ```
//! It needs a region started with `cellplane cell` and `cellplane router`, and the tenant's
//! credentials (as the router issued them) in PKI_DIR.

use cellplane_sdk::model::ReplicaPhase;
use cellplane_sdk::{Client, Event, Workload};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [router, name, pki, tenant] = args.as_slice() else {
        eprintln!("usage: apply ROUTER_ADDR ROUTER_NAME PKI_DIR TENANT");
        std::process::exit(2);
    };
    let client = Client::connect(router.parse()?, name, pki.as_ref(), tenant).await?;
    let mut events = client.watch().await?;
    let web =
        Workload::container("hello", "registry/hello:1").replicas(3).cpu_milli(100).build()?;
    client.apply(web).await?;
    while let Some(event) = events.next().await {
        if let Event::Changed(status) = event? {
            let running = status.replicas.iter().filter(|r| r.phase == ReplicaPhase::Running);
            println!("{}: {}/{} running", status.spec.name, running.count(), status.replicas.len());
            if status.replicas.iter().all(|r| r.phase == ReplicaPhase::Running) {
                break;
            }
        }
    }
    Ok(())
}
